"""Float64 oracle of :func:`fastpref.preference_loss`: the loss table's formulas (fastpref.losses.table)
evaluated with plain PyTorch ops in float64; autograd gives the gradients (Δ detached).

Inputs are upcast to float64 (gradients flow back to the originals); outputs are float64.
"""

from __future__ import annotations

import torch

from fastpref.losses.inputs import check_preference_loss_args
from fastpref.losses.output import PreferenceLossOutput
from fastpref.losses.torch_backend import evaluate


def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                    loss_type="sigmoid", beta=0.1, loss_weights=None, label_smoothing=0.0, chosen_counts=None,
                    rejected_counts=None, aug_chosen_logps=None, aug_rejected_logps=None, aug_ref_chosen_logps=None,
                    aug_ref_rejected_logps=None, refine_lambda=0.5, tau=None, offset=None, weights=None,
                    simpo_gamma=0.5, discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                    refinement="prompt") -> PreferenceLossOutput:
    problem = check_preference_loss_args(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type=loss_type, beta=beta,
        loss_weights=loss_weights, label_smoothing=label_smoothing, chosen_counts=chosen_counts,
        rejected_counts=rejected_counts,
        aug=(aug_chosen_logps, aug_rejected_logps, aug_ref_chosen_logps, aug_ref_rejected_logps),
        refine_lambda=refine_lambda, tau=tau, offset=offset, weights=weights, simpo_gamma=simpo_gamma,
        discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, refinement=refinement)
    return evaluate(problem, torch.float64)
