"""The compiled backends ("cpp", "triton") of :func:`fastpref.preference_loss`: one kernel launch forward (losses,
loss, rewards, margins), one backward (gradients of the four log-prob inputs), no host syncs.

Both backends take the same :class:`FusedProblem`: the per-pair tensors in the fixed order of ``SLOTS`` (None
when absent), the loss codes of the table with their weights, and the scalar settings. The batch-coupled aot
types need sorted values: for the Triton kernel they are sorted here, before the launch, together with each
pair's rank (its position in the sorted order) so the kernel only ever gathers, never scatters; the C++ kernel
sorts inside its single call. Δ of sr_dpo/sr_ipo enters the
kernel as four plain inputs that receive no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.backends import load_kernels
from fastpref.losses.inputs import PreferenceProblem
from fastpref.losses.output import PreferenceLossOutput

SLOTS = (
    "chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_counts", "rejected_counts",
    "aug_chosen", "aug_rejected", "aug_ref_chosen", "aug_ref_rejected", "tau", "offset", "weights",
    # aot: sorted policy margins (π_w − π_l) and reference margins, and each pair's rank in them
    "aot_policy_sorted", "aot_reference_sorted", "aot_policy_rank", "aot_reference_rank",
    # aot_unpaired: sorted chosen and rejected log-ratios, and each pair's rank in them
    "aotu_chosen_sorted", "aotu_rejected_sorted", "aotu_chosen_rank", "aotu_rejected_rank",
)
DIVERGENCE_CODES = {"reverse_kl": 0, "forward_kl": 1, "js_divergence": 2, "alpha_divergence": 3}


@dataclass
class FusedProblem:
    """What a compiled backend receives (see the module docstring)."""

    slots: list[torch.Tensor | None]
    codes: tuple[int, ...]
    loss_weights: tuple[float, ...]
    beta: float
    label_smoothing: float
    refine_lambda: float
    simpo_gamma: float
    discopop_tau: float
    alpha: float
    alpha_clamp: float
    divergence: int
    naive_refinement: bool


def _sorted_with_rank(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted values, rank) with sorted[rank[j]] = values[j]; all on the device, no host sync."""
    ordered, order = torch.sort(values)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(values.numel(), device=values.device))
    return ordered, rank


def _aot_slots(problem: PreferenceProblem, name: str) -> list[torch.Tensor]:
    chosen, rejected = problem.chosen.detach().float(), problem.rejected.detach().float()
    zeros = torch.zeros_like(chosen)
    ref_chosen = zeros if problem.ref_chosen is None else problem.ref_chosen.detach().float()
    ref_rejected = zeros if problem.ref_rejected is None else problem.ref_rejected.detach().float()
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
    aug = problem.aug or (None,) * 4
    slots = [problem.chosen, problem.rejected, problem.ref_chosen, problem.ref_rejected, problem.chosen_counts,
             problem.rejected_counts, *aug, problem.tau, problem.offset, problem.weights]
    names = {d.name for d in problem.definitions}
    slots += _aot_slots(problem, "aot") if presort and "aot" in names else [None] * 4
    slots += _aot_slots(problem, "aot_unpaired") if presort and "aot_unpaired" in names else [None] * 4
    slots = [None if s is None else s.detach().contiguous() for s in slots]
    assert len(slots) == len(SLOTS)
    params = problem.params
    divergence = DIVERGENCE_CODES[params.f_divergence_type]
    if divergence == 3 and abs(params.f_alpha_divergence_coef - 1.0) < 1e-6:
        divergence = 0  # TRL: α → 1 is the reverse KL
    return FusedProblem(slots=slots, codes=tuple(d.code for d in problem.definitions),
                        loss_weights=problem.loss_weights, beta=params.beta, label_smoothing=params.label_smoothing,
                        refine_lambda=params.refine_lambda, simpo_gamma=params.simpo_gamma,
                        discopop_tau=params.discopop_tau, alpha=params.f_alpha_divergence_coef,
                        alpha_clamp=params.alpha_clamp, divergence=divergence,
                        naive_refinement=problem.refinement == "naive")


class LossKernels:
    """The interface of a compiled loss backend (``cpp_backend``, ``triton_backend`` define ``KERNELS``)."""

    name: str = ""

    def forward(self, fused: FusedProblem):
        """(loss, losses, chosen_rewards, rejected_rewards, margins), float32."""
        raise NotImplementedError

    def backward(self, fused: FusedProblem, grad_loss: torch.Tensor, grad_losses: torch.Tensor | None):
        """(d_chosen, d_rejected, d_ref_chosen, d_ref_rejected), float32."""
        raise NotImplementedError


class _FusedPreferenceLoss(torch.autograd.Function):
    """loss, losses from the kernels; rewards and margins come out of the same launch, non-differentiable."""

    @staticmethod
    def forward(ctx, chosen, rejected, ref_chosen, ref_rejected, fused: FusedProblem, kernels: LossKernels):
        loss, losses, chosen_rewards, rejected_rewards, margins = kernels.forward(fused)
        ctx.fused, ctx.kernels = fused, kernels
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (chosen, rejected, ref_chosen, ref_rejected))
        ctx.mark_non_differentiable(chosen_rewards, rejected_rewards, margins)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensors
        return loss, losses, chosen_rewards, rejected_rewards, margins

    @staticmethod
    def backward(ctx, grad_loss, grad_losses, *_unused):
        if grad_loss is None:
            grad_loss = torch.zeros((), device=ctx.fused.slots[0].device)
        elif grad_loss.dtype != torch.float32:
            grad_loss = grad_loss.float()
        if grad_losses is not None:
            grad_losses = grad_losses.float().contiguous()
        grads = ctx.kernels.backward(ctx.fused, grad_loss, grad_losses)
        out = []
        for grad, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad[:4]):
            out.append(grad.to(dtype) if needed else None)
        return (*out, None, None)


def run_fused(problem: PreferenceProblem, backend: str) -> PreferenceLossOutput:
    """Evaluate `problem` with the compiled `backend` ("cpp" or "triton")."""
    outputs = _FusedPreferenceLoss.apply(problem.chosen, problem.rejected, problem.ref_chosen, problem.ref_rejected,
                                         fused_problem(problem, presort=backend == "triton"),
                                         load_kernels("losses", backend))
    return PreferenceLossOutput(*outputs)
