"""The "triton" backend of :func:`fastpref.preference_loss`: one launch of
:func:`fastpref.kernels.preference_loss.preference_loss_kernel` forward, one backward (a single program over
the pairs; see the kernel's docstring)."""

from __future__ import annotations

import math

import torch
import triton

from fastpref.kernels.preference_loss import preference_loss_kernel
from fastpref.losses.fused import FusedProblem, LossKernels

_MAX_BLOCK = 1024


def _launch(fused: FusedProblem, backward: bool, outputs: list[torch.Tensor], grad_loss=None, grad_losses=None):
    slots = fused.slots
    chosen = slots[0]
    num_pairs = chosen.numel()
    present = [s is not None for s in slots]
    pointers = [chosen if s is None else s for s in slots]  # absent slots are never read (HAS_* flags)
    forward_out = outputs if not backward else [chosen] * 5
    backward_out = outputs if backward else [chosen] * 4
    eps = fused.label_smoothing
    exo_keep, exo_flip = (math.log1p(-eps), math.log(eps)) if 0.0 < eps < 1.0 else (0.0, 0.0)
    codes = fused.codes
    preference_loss_kernel[(1,)](
        *pointers, *forward_out,
        chosen if grad_loss is None else grad_loss, chosen if grad_losses is None else grad_losses, *backward_out,
        num_pairs, fused.beta, eps, fused.refine_lambda, fused.simpo_gamma, fused.discopop_tau, fused.alpha,
        fused.alpha_clamp, exo_keep, exo_flip, tuple(float(w) for w in fused.loss_weights),
        CODES=tuple(codes), DIVERGENCE=fused.divergence, NAIVE=fused.naive_refinement, HAS_REF=present[2],
        HAS_COUNTS=present[4] and present[5], HAS_AUG=present[6], HAS_TAU=present[10], HAS_OFFSET=present[11],
        HAS_WEIGHTS=present[12], HAS_SFT=14 in codes, BACKWARD=backward, HAS_GRAD_LOSSES=grad_losses is not None,
        BLOCK=min(_MAX_BLOCK, max(16, triton.next_power_of_2(num_pairs))),
    )


def _forward(fused: FusedProblem):
    """(loss, losses, chosen_rewards, rejected_rewards, margins), float32."""
    chosen = fused.slots[0]
    num_pairs = chosen.numel()
    losses, chosen_rewards, rejected_rewards, margins = (
        torch.empty(num_pairs, device=chosen.device, dtype=torch.float32) for _ in range(4))
    loss = torch.empty((), device=chosen.device, dtype=torch.float32)
    _launch(fused, False, [losses, loss, chosen_rewards, rejected_rewards, margins])
    return loss, losses, chosen_rewards, rejected_rewards, margins


def _backward(fused: FusedProblem, grad_loss: torch.Tensor, grad_losses: torch.Tensor | None):
    """(d_chosen, d_rejected, d_ref_chosen, d_ref_rejected), float32."""
    chosen = fused.slots[0]
    grads = [torch.empty(chosen.numel(), device=chosen.device, dtype=torch.float32) for _ in range(4)]
    _launch(fused, True, grads, grad_loss=grad_loss, grad_losses=grad_losses)
    return tuple(grads)


class TritonLossKernels(LossKernels):
    name = "triton"
    forward = staticmethod(_forward)
    backward = staticmethod(_backward)


KERNELS = TritonLossKernels()
