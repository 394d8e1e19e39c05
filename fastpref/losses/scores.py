"""Per-pair inputs of the ODPO and rDPO losses computed from judge / reward-model scores."""

from __future__ import annotations

import math

import torch


def _scores(score_chosen: torch.Tensor, score_rejected: torch.Tensor) -> torch.Tensor:
    for name, value in (("score_chosen", score_chosen), ("score_rejected", score_rejected)):
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float tensor")
    if score_chosen.shape != score_rejected.shape or score_chosen.device != score_rejected.device:
        raise ValueError(f"score_chosen {tuple(score_chosen.shape)} on {score_chosen.device} and score_rejected "
                         f"{tuple(score_rejected.shape)} on {score_rejected.device} must match")
    gap = score_chosen - score_rejected
    if not bool(torch.isfinite(gap).all()):
        raise ValueError("scores must be finite")
    return gap


def odpo_offset(score_chosen: torch.Tensor, score_rejected: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """ODPO's offset (Amini et al. 2024, arXiv:2402.10571): o = α·log(score_chosen − score_rejected).

    Raises ValueError when a chosen response does not score strictly higher than its rejected one."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite number, got {alpha!r}")
    gap = _scores(score_chosen, score_rejected)
    if bool((gap <= 0).any()):
        raise ValueError("odpo_offset needs score_chosen > score_rejected for every pair (log of a non-positive gap)")
    return alpha * torch.log(gap)


def bt_tau(score_chosen: torch.Tensor, score_rejected: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """rDPO's soft label (Gallego 2024, arXiv:2402.08005) from a Bradley–Terry model of the judge's scores:
    τ = σ((score_chosen − score_rejected) / T)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return torch.sigmoid(_scores(score_chosen, score_rejected) / temperature)


TAU_MODES = ("bt", "normalized", "hard")


def check_score_range(score_range) -> tuple[float, float]:
    if score_range is None or isinstance(score_range, (str, bytes)) or len(score_range) != 2:
        raise ValueError(f"score_range must be (lo, hi) with lo < hi for tau_mode 'normalized', got {score_range!r}")
    lo, hi = (float(v) for v in score_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"score_range must be finite with lo < hi, got {score_range!r}")
    return lo, hi


def tau_from_scores(score_chosen: torch.Tensor, score_rejected: torch.Tensor, mode: str = "bt",
                    temperature: float = 1.0, score_range=None) -> torch.Tensor:
    """rDPO's soft label τ ∈ [0, 1] per pair (Gallego 2024, arXiv:2402.08005) from a judge's scores s_w, s_l.

    mode "bt": τ = σ((s_w − s_l)/T) (:func:`bt_tau`; T = temperature). A 0/1 judge gives τ = σ(1) ≈ 0.73 at
    T = 1, not 1: lower T (or use "hard") for labels near 1.
    mode "normalized": τ = (s_w − lo)/((s_w − lo) + (s_l − lo)) on the judge's scale score_range = (lo, hi)
    (required; scores outside it are refused), so negative scores work; τ = ½ when both scores equal lo.
    mode "hard": τ = 1 if s_w > s_l, ½ on ties, 0 otherwise.
    """
    if mode not in TAU_MODES:
        raise ValueError(f"tau_mode must be one of {TAU_MODES}, got {mode!r}")
    if mode == "bt":
        return bt_tau(score_chosen, score_rejected, temperature)
    gap = _scores(score_chosen, score_rejected)
    if mode == "hard":
        return ((gap > 0).to(gap.dtype) + (gap == 0).to(gap.dtype) * 0.5)
    lo, hi = check_score_range(score_range)
    for name, value in (("score_chosen", score_chosen), ("score_rejected", score_rejected)):
        if bool(((value < lo) | (value > hi)).any()):
            raise ValueError(f"{name} has values outside score_range ({lo}, {hi})")
    above_w, above_l = score_chosen - lo, score_rejected - lo
    total = above_w + above_l
    return torch.where(total > 0, above_w / torch.where(total > 0, total, 1.0), 0.5)
