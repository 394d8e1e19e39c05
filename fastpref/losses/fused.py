"""The backend interface of :func:`fastpref.preference_loss` (:class:`LossKernels`) and the machinery shared by
the compiled backends ("cpp", "triton"): one kernel launch forward (losses, loss, rewards, margins), one backward
(gradients of the four log-prob inputs), no host syncs.

Every backend module defines ``KERNELS`` (found by :func:`fastpref.backends.load_kernels`). A compiled backend
gets one :class:`FusedProblem`: the per-pair tensors in the order of :data:`fastpref.losses.table.PAIR_SLOTS`
(None when absent; Δ of sr_dpo/sr_ipo computed once by :func:`fastpref.losses.refinement_delta`), the loss codes
of the table with their weights, and the settings. The batch-coupled aot types need sorted values: for the Triton
kernel they are sorted here, before the launch, together with each pair's rank (its position in the sorted order)
so the kernel only gathers, never scatters; the C++ kernel sorts inside its single call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.losses.inputs import PreferenceProblem
from fastpref.losses.output import PreferenceLossOutput
from fastpref.losses.table import PAIR_SLOTS, LossParams

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class FusedProblem:
    """What a compiled backend receives (see the module docstring). ``sorted_batch`` (Triton only): for aot then
    aot_unpaired, the two sorted quantities and each pair's rank in them (8 entries, None where unused)."""

    slots: list[torch.Tensor | None]
    sorted_batch: list[torch.Tensor | None]
    codes: tuple[int, ...]
    loss_weights: tuple[float, ...]
    params: LossParams
    compute_dtype: torch.dtype


class LossKernels:
    """A loss backend: ``run`` evaluates a checked problem (differentiably); ``dtypes``: the input dtypes it
    computes (others raise, or make ``backend=None`` pick another backend)."""

    name: str = ""
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES

    def run(self, problem: PreferenceProblem) -> PreferenceLossOutput:
        raise NotImplementedError


class CompiledLossKernels(LossKernels):
    """A backend with a hand-written forward and backward; ``run`` wraps them in one autograd Function.
    Outputs and gradients are in the problem's compute dtype (float64 for float64 inputs, else float32)."""

    presorts: bool = False  # sort the aot batch before the launch (see the module docstring)

    def forward(self, fused: FusedProblem):
        """(loss, losses, chosen_rewards, rejected_rewards, margins)."""
        raise NotImplementedError

    def backward(self, fused: FusedProblem, grad_loss: torch.Tensor, grad_losses: torch.Tensor | None):
        """(d_chosen, d_rejected, d_ref_chosen, d_ref_rejected)."""
        raise NotImplementedError

    def run(self, problem: PreferenceProblem) -> PreferenceLossOutput:
        outputs = _FusedPreferenceLoss.apply(problem.chosen, problem.rejected, problem.ref_chosen,
                                             problem.ref_rejected, fused_problem(problem, self.presorts), self)
        return PreferenceLossOutput(*outputs)


def _sorted_with_rank(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted values, rank) with sorted[rank[j]] = values[j]; all on the device, no host sync."""
    ordered, order = torch.sort(values, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(values.numel(), device=values.device))
    return ordered, rank


def _aot_sorted(problem: PreferenceProblem, name: str) -> list[torch.Tensor]:
    dtype = problem.compute_dtype
    chosen, rejected = problem.chosen.detach().to(dtype), problem.rejected.detach().to(dtype)
    zeros = torch.zeros_like(chosen)
    ref_chosen = zeros if problem.ref_chosen is None else problem.ref_chosen.detach().to(dtype)
    ref_rejected = zeros if problem.ref_rejected is None else problem.ref_rejected.detach().to(dtype)
    if name == "aot":
        first, second = chosen - rejected, ref_chosen - ref_rejected
    else:
        first, second = chosen - ref_chosen, rejected - ref_rejected
    first_sorted, first_rank = _sorted_with_rank(first)
    second_sorted, second_rank = _sorted_with_rank(second)
    return [first_sorted, second_sorted, first_rank, second_rank]


def fused_problem(problem: PreferenceProblem, presort: bool) -> FusedProblem:
    """Gather `problem` into the slot layout; with `presort` (the Triton kernel), sort the batch for the aot
    types here (the C++ kernel sorts it itself)."""
    values = {"chosen": problem.chosen, "rejected": problem.rejected, "ref_chosen": problem.ref_chosen,
              "ref_rejected": problem.ref_rejected, "chosen_counts": problem.chosen_counts,
              "rejected_counts": problem.rejected_counts, "delta": problem.delta(), "tau": problem.tau,
              "offset": problem.offset, "weights": problem.weights}
    slots = [None if values[name] is None else values[name].detach().contiguous() for name in PAIR_SLOTS]
    names = {d.name for d in problem.definitions}
    sorted_batch: list[torch.Tensor | None] = [None] * 8
    if presort:
        for start, name in ((0, "aot"), (4, "aot_unpaired")):
            if name in names:
                sorted_batch[start:start + 4] = _aot_sorted(problem, name)
    return FusedProblem(slots=slots, sorted_batch=sorted_batch, codes=tuple(d.code for d in problem.definitions),
                        loss_weights=problem.loss_weights, params=problem.params,
                        compute_dtype=problem.compute_dtype)


class _FusedPreferenceLoss(torch.autograd.Function):
    """loss, losses from the kernels; rewards and margins come out of the same launch, non-differentiable."""

    @staticmethod
    def forward(ctx, chosen, rejected, ref_chosen, ref_rejected, fused: FusedProblem, kernels: CompiledLossKernels):
        loss, losses, chosen_rewards, rejected_rewards, margins = kernels.forward(fused)
        ctx.fused, ctx.kernels = fused, kernels
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (chosen, rejected, ref_chosen, ref_rejected))
        ctx.mark_non_differentiable(chosen_rewards, rejected_rewards, margins)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensors
        return loss, losses, chosen_rewards, rejected_rewards, margins

    @staticmethod
    def backward(ctx, grad_loss, grad_losses, *_unused):
        dtype = ctx.fused.compute_dtype
        if grad_loss is None:
            grad_loss = torch.zeros((), device=ctx.fused.slots[0].device, dtype=dtype)
        grad_loss = grad_loss.to(dtype)
        if grad_losses is not None:
            grad_losses = grad_losses.to(dtype).contiguous()
        grads = ctx.kernels.backward(ctx.fused, grad_loss, grad_losses)
        out = []
        for grad, dtype_in, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad[:4]):
            out.append(grad.to(dtype_in) if needed else None)
        return (*out, None, None)
