"""Listwise preference losses over K ranked responses per prompt: :func:`listwise_loss`.

Each row holds K responses y_1..y_K of one prompt with judge scores s_k (higher is better) and the implicit
rewards r_k = β·(log π(y_k|x) − log π_ref(y_k|x)) (π_ref = 1 when the reference is absent). ``mask`` [B, K] marks
the responses that exist (ragged K); the others take no part in a row's loss and get no gradient.

``plackett_luce`` — ListMLE of the score order σ (s_σ(1) ≥ … ≥ s_σ(n)), the Plackett-Luce likelihood of the DPO
paper's appendix (Rafailov et al. 2023, arXiv 2305.18290, §A.3) as TPO uses it for preference lists (arXiv
2405.16681):  ℓ = −Σ_{k=1}^{n−1} [ r_σ(k) − log Σ_{j≥k} exp r_σ(j) ].  Tied scores are ordered stably (the
earlier column first), so a tie counts as a preference of the earlier response.

``lambda_rank`` — LiPO-λ (Liu et al. 2024, arXiv 2402.01878): the pairwise logistic loss over every ordered pair
(i, j) with s_i > s_j, each weighted by LambdaRank's |ΔNDCG|,  w_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)|  with
gains G = 2^s, discounts D(τ) = log2(1 + τ) and τ_i the 1-based rank of response i by the current rewards r
(ties in r ordered stably); the weights are constants of the gradient, as in LambdaRank. The row's loss is the
weighted mean  ℓ = Σ w_ij·(−log σ(r_i − r_j)) / Σ w_ij.  This normalisation makes the common factors of w drop
out (IDCG, the −1 of the gains 2^s − 1 and any shift of the scores), and with one pair (K = 2) its weight is 1.
Pairs with equal scores contribute nothing; a row without a strictly ordered pair has loss 0.

With K = 2 and s_1 ≠ s_2 both types equal DPO's ``sigmoid`` loss −log σ(r_w − r_l).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastpref.logps.inputs import value_checks_enabled

LISTWISE_LOSS_TYPES = ("plackett_luce", "lambda_rank")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Padding for absent responses in the suffix log-sum-exp: far below every present reward, so exp underflows to 0
# exactly (finite, so no NaN reaches the gradient of absent entries).
_ABSENT_GAP = 1.0e4


class ListwiseLossOutput(NamedTuple):
    """Result of :func:`listwise_loss`: float64 for float64 inputs, float32 otherwise.

    loss:    scalar, the mean of ``losses`` over the B rows (0 when B = 0).
    losses:  [B], each row's listwise loss (0 for a row with fewer than two present responses).
    rewards: [B, K], r_k = β·(policy − ref), detached; 0 where ``mask`` is False.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor


def _check_tensor(name: str, tensor, shape: torch.Size | None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must be [B, K] with K >= 1, got shape {tuple(tensor.shape)}")
    if shape is not None and tensor.shape != shape:
        raise ValueError(f"{name} must have the shape of policy_logps {tuple(shape)}, got {tuple(tensor.shape)}")


def _check_args(policy_logps, ref_logps, scores, loss_type, beta, mask) -> None:
    _check_tensor("policy_logps", policy_logps, None)
    if policy_logps.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"policy_logps must be a floating tensor, got {policy_logps.dtype}")
    shape = policy_logps.shape
    for name, tensor in (("ref_logps", ref_logps), ("scores", scores), ("mask", mask)):
        if tensor is not None:
            _check_tensor(name, tensor, shape)
            if tensor.device != policy_logps.device:
                raise ValueError(f"{name} is on {tensor.device}, policy_logps on {policy_logps.device}")
    if ref_logps is not None and ref_logps.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"ref_logps must be a floating tensor, got {ref_logps.dtype}")
    if not (scores.dtype.is_floating_point or scores.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"scores must be a float or integer tensor, got {scores.dtype}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if loss_type not in LISTWISE_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; listwise types are: {', '.join(LISTWISE_LOSS_TYPES)}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or beta == float("inf"):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_values(policy_logps, ref_logps, scores, present) -> None:
    """Present entries must be finite (one host read); absent ones may hold anything."""
    if not value_checks_enabled():
        return
    named = [(name, t) for name, t in (("policy_logps", policy_logps), ("ref_logps", ref_logps), ("scores", scores))
             if t is not None]
    finite = torch.stack([(torch.isfinite(t.detach()) | ~present).all() for _, t in named]).tolist()
    for (name, _), ok in zip(named, finite, strict=True):
        if not ok:
            raise ValueError(f"{name} holds NaN or infinite values where mask is True")


def _plackett_luce(rewards: torch.Tensor, scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """ListMLE: absent responses sort last; each present position adds log Σ_{j≥k} e^{r_σ(j)} − r_σ(k)."""
    order_key = torch.where(present, scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(order_key, dim=1, descending=True, stable=True).indices
    ordered_present = present.gather(1, order)
    ordered = rewards.gather(1, order)
    floor = ordered.detach().amin(dim=1, keepdim=True) - _ABSENT_GAP
    padded = torch.where(ordered_present, ordered, floor)
    suffix_lse = torch.logcumsumexp(padded.flip(1), dim=1).flip(1)
    terms = torch.where(ordered_present, suffix_lse - padded, torch.zeros_like(padded))
    return terms.sum(dim=1)


def _lambda_weights(rewards: torch.Tensor, scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """w_ij = |2^s_i − 2^s_j|·|1/D(τ_i) − 1/D(τ_j)| for pairs with s_i > s_j (0 otherwise), no gradient."""
    weight_dtype = torch.float64
    shift = torch.where(present, scores, torch.full_like(scores, float("-inf"))).amax(dim=1, keepdim=True)
    exponent = torch.where(present, scores - shift, torch.zeros_like(scores)).to(weight_dtype)
    gains = torch.where(present, torch.exp2(exponent), torch.zeros_like(exponent))
    rank_key = torch.where(present, rewards.detach(), torch.full_like(rewards, float("-inf")))
    ranked = torch.sort(rank_key, dim=1, descending=True, stable=True).indices
    positions = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(
        1, ranked.shape[1] + 1, device=ranked.device).expand_as(ranked).contiguous())
    inv_discount = 1.0 / torch.log2(1.0 + positions.to(weight_dtype))
    ordered_pair = (scores.unsqueeze(2) > scores.unsqueeze(1)) & present.unsqueeze(2) & present.unsqueeze(1)
    weights = ((gains.unsqueeze(2) - gains.unsqueeze(1)).abs()
               * (inv_discount.unsqueeze(2) - inv_discount.unsqueeze(1)).abs())
    return torch.where(ordered_pair, weights, torch.zeros_like(weights))


def _lambda_rank(rewards: torch.Tensor, scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    weights = _lambda_weights(rewards, scores, present).to(rewards.dtype)
    pair_losses = -F.logsigmoid(rewards.unsqueeze(2) - rewards.unsqueeze(1))
    total = weights.sum(dim=(1, 2))
    weighted = (weights * pair_losses).sum(dim=(1, 2))
    return torch.where(total > 0, weighted / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total))


def listwise_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, scores: torch.Tensor,
                  loss_type: str = "plackett_luce", beta: float = 0.1,
                  mask: torch.Tensor | None = None) -> ListwiseLossOutput:
    """Listwise loss over K responses per prompt (formulas and papers in :mod:`fastpref.losses.listwise`).

    ``policy_logps``, ``ref_logps`` (None: reference-free) and ``scores`` are [B, K]; ``mask`` [B, K] bool marks
    the responses that exist (None: all). Returns :class:`ListwiseLossOutput`; gradients are exact with respect
    to the log-probs (the lambda_rank weights and the orders are constants). Bad input raises TypeError or
    ValueError naming the argument.
    """
    _check_args(policy_logps, ref_logps, scores, loss_type, beta, mask)
    present = torch.ones_like(policy_logps, dtype=torch.bool) if mask is None else mask
    _check_values(policy_logps, ref_logps, scores, present)
    dtype = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    ratio = policy_logps.to(dtype) if ref_logps is None else policy_logps.to(dtype) - ref_logps.to(dtype)
    rewards = torch.where(present, beta * ratio, torch.zeros_like(ratio))
    score_values = scores.to(torch.float64)
    loss_of = _plackett_luce if loss_type == "plackett_luce" else _lambda_rank
    losses = loss_of(rewards, score_values, present)
    return ListwiseLossOutput(losses.sum() / max(losses.shape[0], 1), losses, rewards.detach())
