"""The public op :func:`preference_loss`: checks, backend choice, and the result."""

from __future__ import annotations

import os

import torch

from fastpref.backends import load_kernels, resolve_backend
from fastpref.losses.fused import LossKernels
from fastpref.losses.inputs import LossArguments, check_preference_loss_args
from fastpref.losses.output import PreferenceLossOutput


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None, *,
                    loss_type: str | list[str] = "sigmoid", beta: float = 0.1, loss_weights: list[float] | None = None,
                    label_smoothing: float = 0.0, chosen_counts: torch.Tensor | None = None,
                    rejected_counts: torch.Tensor | None = None, aug_chosen_logps: torch.Tensor | None = None,
                    aug_rejected_logps: torch.Tensor | None = None, aug_ref_chosen_logps: torch.Tensor | None = None,
                    aug_ref_rejected_logps: torch.Tensor | None = None, refine_lambda: float = 0.5,
                    tau: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None, simpo_gamma: float = 0.5, discopop_tau: float = 0.05,
                    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                    refinement: str = "prompt", backend: str | None = None) -> PreferenceLossOutput:
    """The DPO family of preference losses over B pairs, as one fused op.

    Every per-pair input is [B]; ``ref_*=None`` means reference-free (0). ``loss_type`` is a name of
    :data:`fastpref.losses.LOSS_TYPES` or a list of them combined with ``loss_weights``; the formulas are in
    :mod:`fastpref.losses.table` (and the README). Modifiers: ``offset`` is subtracted inside the logit of
    sigmoid-family types, ``weights`` scale each pair, ``f_divergence_type`` (reverse_kl, forward_kl, js_divergence,
    alpha_divergence with ``f_alpha_divergence_coef``) transforms the log-ratios as TRL does. sr_dpo/sr_ipo need
    the four ``aug_*`` log-probs (of the responses after the refinement prompt) unless ``refinement="naive"``.

    Returns :class:`PreferenceLossOutput`: float64 for float64 inputs (computed in float64), else float32.
    Gradients are exact with respect to the policy log-probs, and
    the reference log-probs when they require grad; the refinement term Δ carries none; counts, ``tau``,
    ``offset`` and ``weights`` are constants. ``backend``: "triton", "cpp", "torch" or None (see
    :mod:`fastpref.backends`).
    """
    problem = check_preference_loss_args(LossArguments(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type=loss_type, beta=beta,
        loss_weights=loss_weights, label_smoothing=label_smoothing, chosen_counts=chosen_counts,
        rejected_counts=rejected_counts,
        aug=(aug_chosen_logps, aug_rejected_logps, aug_ref_chosen_logps, aug_ref_rejected_logps),
        refine_lambda=refine_lambda, tau=tau, offset=offset, weights=weights, simpo_gamma=simpo_gamma,
        discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, refinement=refinement))
    return _kernels(backend, chosen_logps).run(problem)


def _kernels(backend: str | None, chosen: torch.Tensor) -> LossKernels:
    """The backend's KERNELS; a default choice that cannot compute the inputs' dtype (triton and float64) falls
    back to "torch", an explicit one (argument or FASTPREF_BACKEND) raises."""
    kernels = load_kernels("losses", resolve_backend(backend, chosen.device))
    if chosen.dtype in kernels.dtypes:
        return kernels
    if backend is None and not os.environ.get("FASTPREF_BACKEND"):
        return load_kernels("losses", "torch")
    raise TypeError(f"backend {kernels.name!r} computes preference_loss in float32 only, got {chosen.dtype} "
                    "inputs: use backend='torch' or 'cpp' (CPU), or backend=None to pick one")
