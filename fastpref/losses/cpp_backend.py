"""The "cpp" backend of :func:`fastpref.preference_loss`: ``torch.ops.fastpref.preference_loss_fwd/_bwd`` from
``csrc/preference_loss_cpu.cpp`` (one pass over the pairs each way, float32 arithmetic with float64 batch
sums, float32 results)."""

from __future__ import annotations

import torch

from fastpref import _ext
from fastpref.losses.fused import FusedProblem, LossKernels

if _ext.extension() is None:  # resolve_backend never picks "cpp" then; importing directly is a usage error
    raise ImportError(f"the cpp backend needs the compiled extension: {_ext.missing_reason()}")

_ops = torch.ops.fastpref


@torch.library.register_fake("fastpref::preference_loss_fwd")
def _forward_fake(slots, codes, loss_weights, scalars, divergence, naive):
    """Shapes only (FakeTensorMode, torch.compile): a float32 scalar and four float32 [B]."""
    chosen = slots[0]
    per_pair = [chosen.new_empty(chosen.shape, dtype=torch.float32) for _ in range(4)]
    return (chosen.new_empty((), dtype=torch.float32), *per_pair)


@torch.library.register_fake("fastpref::preference_loss_bwd")
def _backward_fake(slots, codes, loss_weights, scalars, divergence, naive, grad_loss, grad_losses):
    chosen = slots[0]
    return tuple(chosen.new_empty(chosen.shape, dtype=torch.float32) for _ in range(4))


def _scalars(fused: FusedProblem) -> list[float]:
    return [fused.beta, fused.label_smoothing, fused.refine_lambda, fused.simpo_gamma, fused.discopop_tau,
            fused.alpha, fused.alpha_clamp]


def _forward(fused: FusedProblem):
    """(loss, losses, chosen_rewards, rejected_rewards, margins), float32."""
    return _ops.preference_loss_fwd(fused.slots, list(fused.codes), list(fused.loss_weights), _scalars(fused),
                                    fused.divergence, fused.naive_refinement)


def _backward(fused: FusedProblem, grad_loss: torch.Tensor, grad_losses: torch.Tensor | None):
    """(d_chosen, d_rejected, d_ref_chosen, d_ref_rejected), float32."""
    return _ops.preference_loss_bwd(fused.slots, list(fused.codes), list(fused.loss_weights), _scalars(fused),
                                    fused.divergence, fused.naive_refinement, grad_loss, grad_losses)


class CppLossKernels(LossKernels):
    name = "cpp"
    forward = staticmethod(_forward)
    backward = staticmethod(_backward)


KERNELS = CppLossKernels()
