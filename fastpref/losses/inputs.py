"""Checks the arguments of :func:`fastpref.preference_loss` and gathers them into one :class:`PreferenceProblem`.

Bad input raises ``TypeError``/``ValueError`` naming the argument. Shape, dtype, device and scalar checks cost
nothing; the checks that read tensor values (finite inputs, τ in [0, 1], counts ≥ 0) are stacked into one tensor
read once — a single host sync on CUDA, removed by ``FASTPREF_SKIP_VALUE_CHECKS=1`` (as for the log-prob ops).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastpref.logps.inputs import value_checks_enabled
from fastpref.losses.table import (F_DIVERGENCES, LOSS_DEFINITIONS, LOSS_TYPES, REFINEMENTS, LossDefinition,
                                   LossParams, refinement_delta)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AUG_NAMES = ("aug_chosen_logps", "aug_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps")


@dataclass
class PreferenceProblem:
    """Checked inputs of one preference-loss call: per-pair tensors [B] (None when absent) and the settings."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_counts: torch.Tensor | None
    rejected_counts: torch.Tensor | None
    aug: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    tau: torch.Tensor | None
    offset: torch.Tensor | None
    weights: torch.Tensor | None
    definitions: tuple[LossDefinition, ...]
    loss_weights: tuple[float, ...]
    params: LossParams
    refinement: str

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 for float64 inputs, float32 for 16/32-bit ones: the dtype of the arithmetic and the outputs."""
        return torch.float64 if self.chosen.dtype == torch.float64 else torch.float32

    def delta(self) -> torch.Tensor | None:
        """Δ of the refined types (no gradient), None when no type reads it: from the aug_* log-probs, or with
        refinement="naive" from the plain ones (the same formula, :func:`fastpref.losses.refinement_delta`)."""
        if not any(d.refined for d in self.definitions):
            return None
        if self.refinement == "naive":
            return refinement_delta(self.params.beta, self.chosen, self.rejected, self.ref_chosen, self.ref_rejected)
        return refinement_delta(self.params.beta, *self.aug)


def _number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")
    return float(value)


def _loss_types(loss_type) -> tuple[LossDefinition, ...]:
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"loss_type must be a loss name or a non-empty list of names, got {loss_type!r}")
    for name in names:
        if name not in LOSS_DEFINITIONS:
            raise ValueError(f"unknown loss_type {name!r}; valid types are: {', '.join(LOSS_TYPES)}")
    return tuple(LOSS_DEFINITIONS[name] for name in names)


def _loss_weights(loss_weights, count: int) -> tuple[float, ...]:
    if loss_weights is None:
        return (1.0,) * count
    if not isinstance(loss_weights, Sequence) or isinstance(loss_weights, str):
        raise TypeError(f"loss_weights must be a list of numbers, got {type(loss_weights).__name__}")
    if len(loss_weights) != count:
        raise ValueError(f"loss_weights has {len(loss_weights)} entries for {count} loss types")
    return tuple(_number(f"loss_weights[{i}]", w) for i, w in enumerate(loss_weights))


def _check_label_smoothing(eps: float, definitions: tuple[LossDefinition, ...]) -> None:
    users = [d for d in definitions if d.smoothing is not None]
    if eps != 0.0 and not users:
        raise ValueError(f"label_smoothing={eps} has no effect on loss types {[d.name for d in definitions]}; "
                         "types that use it: " + ", ".join(n for n, d in LOSS_DEFINITIONS.items() if d.smoothing)
                         + " (conservative DPO is 'cdpo')")
    for d in users:
        low, high, low_closed, high_closed = d.smoothing
        inside = (eps >= low if low_closed else eps > low) and (eps <= high if high_closed else eps < high)
        if not inside:
            interval = f"{'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"
            raise ValueError(f"label_smoothing must lie in {interval} for loss_type {d.name!r}, got {eps}")


def _tensor(name: str, value, batch_shape, device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape != batch_shape:
        raise ValueError(f"{name} must have shape {tuple(batch_shape)} (one value per pair), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but chosen_logps is on {device}")
    return value


def _logps(name: str, value, like: torch.Tensor) -> torch.Tensor:
    value = _tensor(name, value, like.shape, like.device)
    if value.dtype != like.dtype:
        raise TypeError(f"{name} dtype {value.dtype} must equal chosen_logps dtype {like.dtype}")
    return value


def _constant(name: str, value, like: torch.Tensor, *, counts: bool = False) -> torch.Tensor:
    """A per-pair input that carries no gradient (counts, τ, offset, weights)."""
    value = _tensor(name, value, like.shape, like.device)
    allowed = value.dtype in _FLOAT_DTYPES or (counts and not value.dtype.is_floating_point
                                               and not value.dtype.is_complex and value.dtype != torch.bool)
    if not allowed:
        raise TypeError(f"{name} must be {'an integer or ' if counts else ''}a float tensor, got {value.dtype}")
    if value.requires_grad:
        raise ValueError(f"{name} enters the loss as a constant and gets no gradient: pass {name}.detach()")
    return value


def _check_values(problem: PreferenceProblem) -> None:
    """Every data-dependent condition read at once (one host sync on CUDA); raises on the first that fails."""
    if not value_checks_enabled():
        return
    checks: list[tuple[torch.Tensor, str]] = []
    named = [("chosen_logps", problem.chosen), ("rejected_logps", problem.rejected),
             ("ref_chosen_logps", problem.ref_chosen), ("ref_rejected_logps", problem.ref_rejected),
             *zip(AUG_NAMES, problem.aug or (None,) * 4), ("tau", problem.tau), ("offset", problem.offset),
             ("weights", problem.weights), ("chosen_counts", problem.chosen_counts),
             ("rejected_counts", problem.rejected_counts)]
    for name, tensor in named:
        if tensor is not None and tensor.dtype.is_floating_point:
            checks.append((~torch.isfinite(tensor.detach()).all(), f"{name} holds NaN or infinite values"))
    if problem.tau is not None:
        checks.append((((problem.tau < 0) | (problem.tau > 1)).any(), "tau must lie in [0, 1] for every pair"))
    for name, counts in (("chosen_counts", problem.chosen_counts), ("rejected_counts", problem.rejected_counts)):
        if counts is not None:
            checks.append(((counts < 0).any(), f"{name} must be >= 0"))
    if any(d.name == "sft" for d in problem.definitions):
        checks.append((problem.chosen_counts.sum() <= 0, "chosen_counts sum to 0: the 'sft' token mean is empty"))
    failed = torch.stack([flag for flag, _ in checks]).tolist()
    for bad, (_, message) in zip(failed, checks):
        if bad:
            raise ValueError(message)


@dataclass(frozen=True)
class LossArguments:
    """The arguments of :func:`fastpref.preference_loss` as given (unchecked); ``aug`` holds the four aug_* ones."""

    chosen_logps: Any
    rejected_logps: Any
    ref_chosen_logps: Any = None
    ref_rejected_logps: Any = None
    loss_type: Any = "sigmoid"
    beta: Any = 0.1
    loss_weights: Any = None
    label_smoothing: Any = 0.0
    chosen_counts: Any = None
    rejected_counts: Any = None
    aug: tuple = (None, None, None, None)
    refine_lambda: Any = 0.5
    tau: Any = None
    offset: Any = None
    weights: Any = None
    simpo_gamma: Any = 0.5
    discopop_tau: Any = 0.05
    f_divergence_type: Any = "reverse_kl"
    f_alpha_divergence_coef: Any = 0.5
    refinement: Any = "prompt"


def _params(args: LossArguments, definitions: tuple[LossDefinition, ...], dtype: torch.dtype) -> LossParams:
    eps = _number("label_smoothing", args.label_smoothing)
    _check_label_smoothing(eps, definitions)
    kind = args.f_divergence_type
    if kind not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {kind!r}")
    refused = [d.name for d in definitions if not d.f_divergence]
    if kind != "reverse_kl" and refused:
        raise ValueError(f"f_divergence_type={kind!r} applies only to loss types "
                         f"{[n for n, d in LOSS_DEFINITIONS.items() if d.f_divergence]}; got {refused}")
    if args.refinement not in REFINEMENTS:
        raise ValueError(f"refinement must be one of {REFINEMENTS}, got {args.refinement!r}")
    return LossParams(
        beta=_number("beta", args.beta, positive=True),
        label_smoothing=eps,
        refine_lambda=_number("refine_lambda", args.refine_lambda),
        simpo_gamma=_number("simpo_gamma", args.simpo_gamma),
        discopop_tau=_number("discopop_tau", args.discopop_tau, positive=True),
        f_divergence_type=kind,
        f_alpha_divergence_coef=_number("f_alpha_divergence_coef", args.f_alpha_divergence_coef),
        alpha_clamp=11.0 if dtype == torch.float16 else 80.0,
    )


def _chosen(chosen_logps) -> torch.Tensor:
    if not isinstance(chosen_logps, torch.Tensor):
        raise TypeError(f"chosen_logps must be a torch.Tensor, got {type(chosen_logps).__name__}")
    if chosen_logps.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"chosen_logps must be float16, bfloat16, float32 or float64, got {chosen_logps.dtype}")
    if chosen_logps.dim() != 1 or chosen_logps.shape[0] == 0:
        raise ValueError(f"chosen_logps must be 1-D [B] with B >= 1 pairs, got shape {tuple(chosen_logps.shape)}")
    return chosen_logps


def _logprob_tensors(args: LossArguments, chosen: torch.Tensor) -> dict:
    """rejected, ref_* and the aug set, checked against chosen (same shape, device and dtype)."""
    if (args.ref_chosen_logps is None) != (args.ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    given_aug = [a is not None for a in args.aug]
    if any(given_aug) and not all(given_aug):
        missing = [n for n, g in zip(AUG_NAMES, given_aug) if not g]
        raise ValueError(f"the augmented log-probs come as a set of four; missing {missing}")

    def optional(name, value):
        return None if value is None else _logps(name, value, chosen)

    return {"rejected": _logps("rejected_logps", args.rejected_logps, chosen),
            "ref_chosen": optional("ref_chosen_logps", args.ref_chosen_logps),
            "ref_rejected": optional("ref_rejected_logps", args.ref_rejected_logps),
            "aug": tuple(_logps(n, a, chosen) for n, a in zip(AUG_NAMES, args.aug)) if all(given_aug) else None}


def _constants(args: LossArguments, chosen: torch.Tensor) -> dict:
    def optional(name, counts=False):
        value = getattr(args, name)
        return None if value is None else _constant(name, value, chosen, counts=counts)

    return {"chosen_counts": optional("chosen_counts", counts=True),
            "rejected_counts": optional("rejected_counts", counts=True),
            "tau": optional("tau"), "offset": optional("offset"), "weights": optional("weights")}


def _check_needs(definitions: tuple[LossDefinition, ...], given: dict, refinement: str) -> None:
    """Each type gets the inputs it requires, and no input goes to types that ignore it."""
    if given["aug"] is not None and not (any(d.refined for d in definitions) and refinement == "prompt"):
        raise ValueError("aug_* log-probs are used only by loss types 'sr_dpo'/'sr_ipo' with refinement='prompt'")
    present = {name for name, value in given.items() if value is not None and name != "aug"}
    if given["aug"] is not None or refinement == "naive":
        present |= set(AUG_NAMES)
    for d in definitions:
        missing = [name for name in d.requires if name not in present]
        if missing:
            hint = " (or refinement='naive')" if d.refined else ""
            raise ValueError(f"loss_type {d.name!r} requires {', '.join(missing)}{hint}")
    if given["offset"] is not None:
        refused = [d.name for d in definitions if not d.takes_offset and d.kind != "batch"]
        if refused:
            raise ValueError(f"offset is subtracted inside the logit of sigmoid-family types only; {refused} take none")
    if given["weights"] is not None:
        refused = [d.name for d in definitions if not d.takes_weights]
        if refused:
            raise ValueError(f"per-pair weights do not apply to {refused}: those losses sort the batch, so position i "
                             "is not pair i")
    if given["tau"] is not None and not any(d.name == "rdpo" for d in definitions):
        raise ValueError("tau is used only by loss_type 'rdpo'")


def check_preference_loss_args(args: LossArguments) -> PreferenceProblem:
    """Validate every argument of :func:`fastpref.preference_loss` (see the module docstring)."""
    definitions = _loss_types(args.loss_type)
    loss_weights = _loss_weights(args.loss_weights, len(definitions))
    params = _params(args, definitions, getattr(args.chosen_logps, "dtype", None))
    chosen = _chosen(args.chosen_logps)
    tensors = _logprob_tensors(args, chosen)
    constants = _constants(args, chosen)
    _check_needs(definitions, {**constants, "aug": tensors["aug"]}, args.refinement)
    problem = PreferenceProblem(chosen=chosen, **tensors, **constants, definitions=definitions,
                                loss_weights=loss_weights, params=params, refinement=args.refinement)
    _check_values(problem)
    return problem
