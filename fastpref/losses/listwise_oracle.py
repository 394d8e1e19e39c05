"""Float64 ground truth of :func:`fastpref.listwise_loss`, written independently with loops over rows and pairs.

Nothing is shared with :mod:`fastpref.losses.listwise`: each row's present responses are listed, ordered by score
with Python's stable ``sorted`` (ties keep column order), and the formulas of that module's docstring are written
out term by term. Give it valid inputs (no checks). Gradients come from autograd; the lambda weights are floats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _row_plackett_luce(rewards: list[torch.Tensor], scores: list[float]) -> torch.Tensor:
    order = sorted(range(len(scores)), key=lambda k: -scores[k])
    total = torch.zeros((), dtype=torch.float64)
    for position in range(len(order) - 1):
        rest = torch.stack([rewards[j] for j in order[position:]])
        total = total + torch.logsumexp(rest, dim=0) - rewards[order[position]]
    return total


def _row_lambda_rank(rewards: list[torch.Tensor], scores: list[float]) -> torch.Tensor:
    by_reward = sorted(range(len(scores)), key=lambda k: -float(rewards[k].detach()))
    rank = {k: position + 1 for position, k in enumerate(by_reward)}
    weighted = torch.zeros((), dtype=torch.float64)
    weight_sum = 0.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if not scores[i] > scores[j]:
                continue
            gain_gap = abs(2.0 ** scores[i] - 2.0 ** scores[j])
            discount_gap = abs(1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j]))
            weight = gain_gap * discount_gap
            weighted = weighted + weight * -F.logsigmoid(rewards[i] - rewards[j])
            weight_sum += weight
    return weighted / weight_sum if weight_sum > 0 else weighted * 0.0


def listwise_loss_reference(policy_logps, ref_logps, scores, loss_type, beta, mask=None):
    """(loss, losses [B]) in float64, row by row."""
    row_loss = _row_plackett_luce if loss_type == "plackett_luce" else _row_lambda_rank
    losses = []
    for b in range(policy_logps.shape[0]):
        present = [k for k in range(policy_logps.shape[1]) if mask is None or bool(mask[b, k])]
        rewards = [beta * (policy_logps[b, k].double() - (0.0 if ref_logps is None else ref_logps[b, k].double()))
                   for k in present]
        losses.append(row_loss(rewards, [float(scores[b, k]) for k in present]))
    stacked = torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64)
    return stacked.sum() / max(len(losses), 1), stacked
