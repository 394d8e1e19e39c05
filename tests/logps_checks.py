"""Shared checks of the log-prob op tests: the eager same-dtype baseline, the error rule, upstream gradients.

Error rule (Cut Cross-Entropy's): the fast path's error against the float64 oracle may not exceed the error of
plain eager PyTorch in the same dtype plus a small tolerance scaled by the oracle's magnitude.
"""

from __future__ import annotations

import torch

import fastpref
from fastpref.logps import oracle as logps_oracle

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-9}


def assert_within_eager(name, fast, eager, oracle, dtype):
    fast, eager, oracle = fast.double(), eager.double(), oracle.double()
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    err_fast = (fast - oracle).abs().max().item()
    err_eager = (eager - oracle).abs().max().item()
    bound = err_eager + ATOL[dtype] * max(1.0, oracle.abs().max().item())
    assert err_fast <= bound, f"{name}: error {err_fast:.3g} > eager {dtype} error {err_eager:.3g} + tolerance"


def eager_linear_logps(hidden, weight, labels, bias, softcap, temperature, token_weights, cu_seqlens):
    """What a user writes today, in the inputs' dtype: full logits, float32 log_softmax, gather."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return logps_oracle.logits_logps(z, labels, temperature=temperature, token_weights=token_weights,
                                  cu_seqlens=cu_seqlens, return_token_logps=True)


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
    the token-statistics tests."""
    log_p = torch.log_softmax(z.double(), dim=-1)
    scored = labels != -100
    expected = {
        "token_logps": log_p.gather(1, labels.clamp(min=0)[:, None]).squeeze(1),
        "entropy": -(log_p.exp() * log_p).sum(1),
        "log_sum_sq_probs": torch.logsumexp(2 * log_p, dim=1),
        "mean_logits": z.double().mean(1),
    }
    return {name: torch.where(scored, value, 0.0) for name, value in expected.items()}
