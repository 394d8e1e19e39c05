"""The "triton" backend of :func:`fastpref.preference_loss`: one launch of
:func:`fastpref.kernels.preference_loss.preference_loss_kernel` forward, one backward (a single program over
the pairs; see the kernel's docstring). It computes in float32: float64 inputs are refused (``dtypes``), and
``backend=None`` sends them to the "torch" backend instead."""

from __future__ import annotations

import math

import torch
import triton

from fastpref.kernels.preference_loss import SETTINGS, preference_loss_kernel
from fastpref.losses.fused import CompiledLossKernels, FusedProblem
from fastpref.losses.table import LOSS_CODES, LossParams

_MAX_BLOCK = 1024


def kernel_settings(params: LossParams) -> tuple[float, ...]:
    """The kernel's `settings` (:data:`fastpref.kernels.preference_loss.SETTINGS`), derived in float64 so ε is
    never rounded before it is amplified (ε/(1 − 2ε) of robust near ε = ½)."""
    eps = params.label_smoothing
    values = {
        "beta": params.beta, "refine_lambda": params.refine_lambda, "simpo_gamma": params.simpo_gamma,
        "alpha": params.f_alpha_divergence_coef, "alpha_clamp": params.alpha_clamp, "keep": 1.0 - eps, "flip": eps,
        "robust_slope": eps / (1.0 - 2.0 * eps) if eps != 0.5 else 0.0,
        "exo_keep": math.log1p(-eps) if 0.0 < eps < 1.0 else 0.0,
        "exo_flip": math.log(eps) if 0.0 < eps < 1.0 else 0.0,
        "ipo_target": 0.5 / params.beta, "inv_discopop_tau": 1.0 / params.discopop_tau,
    }
    return tuple(float(values[name]) for name in SETTINGS)


def _launch(fused: FusedProblem, backward: bool, outputs: list[torch.Tensor], grad_loss=None, grad_losses=None):
    chosen = fused.slots[0]
    num_pairs = chosen.numel()
    present = tuple(s is not None for s in fused.slots)
    pointers = [chosen if s is None else s for s in fused.slots]  # absent slots are never read (PRESENT)
    sorted_batch = [chosen if s is None else s for s in fused.sorted_batch]
    forward_out = outputs if not backward else [chosen] * 5
    backward_out = outputs if backward else [chosen] * 4
    preference_loss_kernel[(1,)](
        *pointers, *sorted_batch, *forward_out,
        chosen if grad_loss is None else grad_loss, chosen if grad_losses is None else grad_losses, *backward_out,
        num_pairs, kernel_settings(fused.params), tuple(float(w) for w in fused.loss_weights),
        CODES=tuple(fused.codes), DIVERGENCE=fused.params.divergence_code, PRESENT=present,
        HAS_SFT=LOSS_CODES["sft"] in fused.codes, BACKWARD=backward, HAS_GRAD_LOSSES=grad_losses is not None,
        BLOCK=min(_MAX_BLOCK, max(16, triton.next_power_of_2(num_pairs))),
    )


class TritonLossKernels(CompiledLossKernels):
    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    presorts = True

    def forward(self, fused: FusedProblem):
        chosen = fused.slots[0]
        losses, chosen_rewards, rejected_rewards, margins = (
            torch.empty(chosen.numel(), device=chosen.device, dtype=torch.float32) for _ in range(4))
        loss = torch.empty((), device=chosen.device, dtype=torch.float32)
        _launch(fused, False, [losses, loss, chosen_rewards, rejected_rewards, margins])
        return loss, losses, chosen_rewards, rejected_rewards, margins

    def backward(self, fused: FusedProblem, grad_loss: torch.Tensor, grad_losses: torch.Tensor | None):
        chosen = fused.slots[0]
        grads = [torch.empty(chosen.numel(), device=chosen.device, dtype=torch.float32) for _ in range(4)]
        _launch(fused, True, grads, grad_loss=grad_loss, grad_losses=grad_losses)
        return tuple(grads)


KERNELS = TritonLossKernels()
