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
