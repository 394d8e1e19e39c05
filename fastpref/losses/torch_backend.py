"""The "torch" backend: the table's formulas evaluated with plain PyTorch ops; autograd gives the gradients.

Its ``KERNELS`` implements :meth:`LossKernels.run` directly rather than the compiled backends' forward/backward
pair: it has no hand-written derivative (autograd differentiates the table, a second derivation besides the
kernels'), and plain differentiable ops are what torch.compile traces best. Arithmetic in float32 for 16/32-bit
inputs, float64 for float64; Δ (the Sr-DPO refinement) is detached.
"""

from __future__ import annotations

import torch

from fastpref.losses.fused import LossKernels
from fastpref.losses.inputs import PreferenceProblem
from fastpref.losses.output import PreferenceLossOutput
from fastpref.losses.table import PairTerms, f_divergence_score


def pair_terms(problem: PreferenceProblem, dtype: torch.dtype) -> PairTerms:
    """The per-pair quantities of `problem` in `dtype` (absent refs and offset are 0)."""
    params = problem.params
    chosen, rejected = problem.chosen.to(dtype), problem.rejected.to(dtype)
    zeros = torch.zeros_like(chosen)
    ref_chosen = zeros if problem.ref_chosen is None else problem.ref_chosen.to(dtype)
    ref_rejected = zeros if problem.ref_rejected is None else problem.ref_rejected.to(dtype)

    def optional(value):
        return None if value is None else value.to(dtype)

    return PairTerms(
        chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
        chosen_scores=f_divergence_score(chosen - ref_chosen, params),
        rejected_scores=f_divergence_score(rejected - ref_rejected, params),
        chosen_counts=optional(problem.chosen_counts),
        rejected_counts=optional(problem.rejected_counts),
        offset=zeros if problem.offset is None else problem.offset.to(dtype),
        tau=optional(problem.tau),
        refinement=optional(problem.delta()),
    )


def evaluate(problem: PreferenceProblem) -> PreferenceLossOutput:
    """loss = mean_i Σ_k loss_weights[k]·weights_i·ℓ_k,i in the problem's compute dtype, with TRL's detached
    rewards."""
    dtype = problem.compute_dtype
    terms = pair_terms(problem, dtype)
    losses = torch.zeros_like(terms.chosen)
    for definition, loss_weight in zip(problem.definitions, problem.loss_weights):
        losses = losses + loss_weight * definition.per_pair(terms, problem.params)
    if problem.weights is not None:
        losses = losses * problem.weights.to(dtype)
    chosen_rewards = problem.params.beta * (terms.chosen - terms.ref_chosen).detach()
    rejected_rewards = problem.params.beta * (terms.rejected - terms.ref_rejected).detach()
    return PreferenceLossOutput(loss=losses.mean(), losses=losses, chosen_rewards=chosen_rewards,
                                rejected_rewards=rejected_rewards, margins=chosen_rewards - rejected_rewards)


class TorchLossKernels(LossKernels):
    name = "torch"

    def run(self, problem: PreferenceProblem) -> PreferenceLossOutput:
        return evaluate(problem)


KERNELS = TorchLossKernels()
