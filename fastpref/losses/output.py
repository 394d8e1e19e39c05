"""The result type of :func:`fastpref.preference_loss`."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PreferenceLossOutput(NamedTuple):
    """Result of :func:`fastpref.preference_loss`: float64 for float64 inputs, float32 otherwise.

    loss:             scalar, Σ_k loss_weights[k]·mean_i(weights_i·ℓ_k,i) = mean_i(losses_i).
    losses:           [B], per-pair Σ_k loss_weights[k]·weights_i·ℓ_k,i (for aot types, i is the sorted position).
    chosen_rewards:   [B], β·(chosen − ref_chosen), detached (TRL's metric).
    rejected_rewards: [B], β·(rejected − ref_rejected), detached.
    margins:          [B], chosen_rewards − rejected_rewards, detached.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
