"""Shared checks of the log-prob op tests: the eager same-dtype baseline, the error rule, upstream gradients.

Error rule (Cut Cross-Entropy's): against the float64 oracle, the fast path's largest error may not exceed twice
the largest error of plain eager PyTorch computing the same thing in the inputs' dtype (full logits in that dtype,
``torch.log_softmax``, gather), plus a relative tolerance of the oracle's largest magnitude: 1e-6 for 16/32-bit
inputs, 1e-12 for float64 ones (where a float32 computation inside would pass 1e-6). Where eager happens to come
out closer than the oracle rounded to the result's dtype (a few elements, lucky roundings), that rounding error,
which no result in that dtype can beat, takes its place.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

import fastpref
from fastpref.logps import oracle as logps_oracle

REL_TOL = {torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6, torch.float64: 1e-12}


# float64 results that are small differences of O(1) terms (a gradient W[y] − Σ p·W) carry ulps of those terms,
# which a lucky eager can miss entirely: float64's floor is absolute at scale 1, still 1e5× below a float32 error.
ABS_FLOOR = {torch.float64: 1e-12}


def error_bound(eager_err: float, scale: float, dtype: torch.dtype) -> float:
    return 2 * eager_err + REL_TOL[dtype] * scale + ABS_FLOOR.get(dtype, 0.0)


def assert_within_eager(name, fast, eager, oracle, dtype):
    """max|fast − oracle| ≤ 2·max(max|eager − oracle|, max|round(oracle) − oracle|) + REL_TOL[dtype]·scale,
    scale = max|oracle|, round() to fast's dtype (see the module docstring)."""
    rounded = oracle.to(fast.dtype).double()
    fast, eager, oracle = fast.double(), eager.double(), oracle.double()
    assert fast.shape == oracle.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    err_fast = (fast - oracle).abs().max().item() if fast.numel() else 0.0
    err_eager = (eager - oracle).abs().max().item() if eager.numel() else 0.0
    assert math.isfinite(err_eager), f"{name}: the eager {dtype} baseline overflowed; the case cannot judge"
    err_eager = max(err_eager, (rounded - oracle).abs().max().item() if oracle.numel() else 0.0)
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    bound = error_bound(err_eager, scale, dtype)
    assert err_fast <= bound, (f"{name}: error {err_fast:.3g} > 2 x eager {dtype} error {err_eager:.3g} + "
                               f"{REL_TOL[dtype]:g} x {scale:.3g}")


class EagerLogps(NamedTuple):
    logps: torch.Tensor
    counts: torch.Tensor
    token_logps: torch.Tensor


def eager_token_logps(z: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log_softmax(z)[labels] in z's own dtype (0 at ignored rows): what a user writes today."""
    scored = labels != ignore_index
    picked = torch.log_softmax(z, dim=-1).gather(-1, torch.where(scored, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros_like(picked))


def _per_sequence(token: torch.Tensor, labels, ignore_index, token_weights, cu_seqlens) -> EagerLogps:
    """Sequence sums of the eager token log-probs, taken in float64 so that only the per-token error counts."""
    flat, scored = token.reshape(-1).double(), (labels != ignore_index).reshape(-1)
    if token_weights is not None:
        flat = flat * token_weights.reshape(-1).double()
    if labels.dim() == 2:
        num = labels.shape[0]
        seq = torch.arange(num).repeat_interleave(labels.shape[1])
    else:
        cu = torch.tensor([0, labels.shape[0]]) if cu_seqlens is None else cu_seqlens.long()
        num = cu.numel() - 1
        seq = torch.arange(num).repeat_interleave(cu[1:] - cu[:-1])
    logps = torch.zeros(num, dtype=torch.float64).index_add(0, seq, flat)
    counts = torch.zeros(num, dtype=torch.int64).index_add(0, seq, scored.long())
    return EagerLogps(logps, counts, token)


def eager_logits_logps(logits, labels, *, ignore_index=-100, temperature=1.0, token_weights=None, cu_seqlens=None):
    """The eager baseline of ``logits_logps``: logits / T and log_softmax in the logits' dtype, gathered."""
    token = eager_token_logps(logits / temperature, labels, ignore_index)
    return _per_sequence(token, labels, ignore_index, token_weights, cu_seqlens)


def eager_linear_logps(hidden, weight, labels, bias, softcap, temperature, token_weights, cu_seqlens,
                       ignore_index=-100):
    """The eager baseline of ``linear_logps``: full logits h·Wᵀ (+ b), softcap, temperature and log_softmax, all in
    the inputs' dtype, gathered."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    token = eager_token_logps(z / temperature, labels, ignore_index)
    return _per_sequence(token, labels, ignore_index, token_weights, cu_seqlens)


def float64_copies(*tensors):
    """Float64 leaves holding the same values (None stays None): the oracle's inputs, so that its gradients are
    float64 too rather than rounded to the inputs' dtype."""
    return tuple(None if t is None else t.detach().double().requires_grad_() for t in tensors)


def upstream_grads(out, params, g_seq, g_tok):
    """Gradients of Σ g_seq·logps + Σ g_tok·token_logps (non-uniform upstream gradients) for the given params."""
    loss = (out.logps.double() * g_seq).sum() + (out.token_logps.double() * g_tok).sum()
    return torch.autograd.grad(loss, [p for p in params if p is not None])


def token_stats_via_api(hidden, weight, labels, **kwargs):
    """The public API's token statistics (same fused pass on the triton backend) as a dict with token_logps."""
    out = fastpref.linear_logps(hidden, weight, labels, return_token_logps=True, return_token_stats=True,
                                backend="triton", **kwargs)
    return {"token_logps": out.token_logps, **out.token_stats._asdict()}


def expected_token_stats(z: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 token log-probs and statistics from final logits z [N, V] (0 at ignored rows): the ground truth of
    the token-statistics tests (the oracle's forms, accurate near one-hot rows)."""
    out = logps_oracle.logits_logps(z.double(), labels, return_token_logps=True, return_token_stats=True)
    stats = out.token_stats
    return {"token_logps": out.token_logps, "entropy": stats.entropy, "log_sum_sq_probs": stats.log_sum_sq_probs,
            "mean_logits": stats.mean_logits}
