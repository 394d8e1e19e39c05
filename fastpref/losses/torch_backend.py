"""The "torch" backend: the table's formulas evaluated with plain PyTorch ops; autograd gives the gradients.

The float64 oracle (:mod:`fastpref.losses.oracle`) runs this same evaluation in float64; the backend runs it
in float32. Δ (the Sr-DPO refinement) is detached, so no gradient flows through it.
"""

from __future__ import annotations

import torch

from fastpref.losses.table import PairTerms, f_divergence_score
from fastpref.losses.inputs import PreferenceProblem
from fastpref.losses.output import PreferenceLossOutput


def pair_terms(problem: PreferenceProblem, dtype: torch.dtype) -> PairTerms:
    """The per-pair quantities of `problem` in `dtype` (absent refs and offset are 0)."""
    params = problem.params
    chosen, rejected = problem.chosen.to(dtype), problem.rejected.to(dtype)
    zeros = torch.zeros_like(chosen)
    ref_chosen = zeros if problem.ref_chosen is None else problem.ref_chosen.to(dtype)
    ref_rejected = zeros if problem.ref_rejected is None else problem.ref_rejected.to(dtype)

    def optional(value):
        return None if value is None else value.to(dtype)

    refinement = None
    if any(d.refined for d in problem.definitions):
        if problem.refinement == "naive":
            refinement = params.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        else:
            aug_w, aug_l, aug_ref_w, aug_ref_l = (a.to(dtype) for a in problem.aug)
            refinement = params.beta * ((aug_w - aug_ref_w) - (aug_l - aug_ref_l))
        refinement = refinement.detach()
    return PairTerms(
        chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
        chosen_scores=f_divergence_score(chosen - ref_chosen, params),
        rejected_scores=f_divergence_score(rejected - ref_rejected, params),
        chosen_counts=optional(problem.chosen_counts),
        rejected_counts=optional(problem.rejected_counts),
        offset=zeros if problem.offset is None else problem.offset.to(dtype),
        tau=optional(problem.tau),
        refinement=refinement,
    )


def evaluate(problem: PreferenceProblem, dtype: torch.dtype) -> PreferenceLossOutput:
    """loss = mean_i Σ_k loss_weights[k]·weights_i·ℓ_k,i in `dtype`, with TRL's detached rewards."""
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
