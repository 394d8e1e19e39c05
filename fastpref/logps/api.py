"""Per-sequence log-probabilities: ``linear_logps`` (from hidden states and the lm_head weight, no logits) and
``logits_logps`` (from ready logits).

For row t with target y_t, logits z_t = h_t·Wᵀ (+ b); with a softcap c, z_t = c·tanh(z_t / c); then
z_t = z_t / temperature, and

    log p_t = z_t[y_t] − logsumexp(z_t),      logps_s = Σ_{t ∈ s, y_t ≠ ignore} w_t · log p_t.

The backend kernel returns the per-row log p_t (0 at ignored rows) and its exact gradient for any upstream
gradient on it; the per-sequence weighted sum is taken here with plain differentiable tensor ops, so an
upstream gradient on ``logps`` and one on ``token_logps`` both reach the kernel as one per-row gradient
g_t = ∂L/∂logps_s · w_t + ∂L/∂token_logps_t.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastpref.backends import load_kernels, preload_kernels, resolve_backend
from fastpref.logps.contract import GradsWanted, LinearHead, LogitsRows, LogpsKernels
from fastpref.logps.inputs import LogpsProblem, check_linear_logps_args, check_logits_logps_args


class TokenStats(NamedTuple):
    """Per-row statistics of p = softmax(z_t) (what TRL logs and WPO weighting needs), shape of labels, no gradient,
    0 / False at ignored rows.

    entropy:          −Σ_v p_v log p_v.
    log_sum_sq_probs: log Σ_v p_v².
    mean_logits:      Σ_v z_v / V (after softcap and temperature).
    is_top1:          bool, the target is argmax_v z_v (first index on ties, as torch.argmax).
    """

    entropy: torch.Tensor
    log_sum_sq_probs: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor


class LogpsOutput(NamedTuple):
    """Result of :func:`linear_logps` / :func:`logits_logps`.

    logps:       [S] float32 (float64 for float64 inputs), Σ_t w_t · log p_t over each sequence's scored rows (0 for
                 a sequence with none); a NaN or −inf in one sequence stays in that sequence.
    counts:      [S] int64, scored rows per sequence (0 for a sequence with none).
    token_logps: shape of labels, the dtype of ``logps``, unweighted log p_t, 0 at ignored rows; None unless asked for.
    token_stats: :class:`TokenStats`; None unless asked for (``linear_logps(..., return_token_stats=True)``).
    """

    logps: torch.Tensor
    counts: torch.Tensor
    token_logps: torch.Tensor | None = None
    token_stats: TokenStats | None = None


class _LinearTokenLogps(torch.autograd.Function):
    """Per-row log p_t from hidden rows and the lm_head weight; the backend decides what its backward needs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, settings: tuple, kernels: LogpsKernels, with_stats: bool):
        head = LinearHead(hidden, weight, bias, labels, *settings)
        wanted = GradsWanted(*ctx.needs_input_grad[:2], ctx.needs_input_grad[2] and bias is not None)
        if with_stats:
            token_logps, state, stats = kernels.linear_forward_with_stats(head, wanted)
        else:
            (token_logps, state), stats = kernels.linear_forward(head, wanted), ()
        if wanted.any:
            ctx.save_for_backward(hidden, weight, bias, labels, *state)
            ctx.settings, ctx.kernels, ctx.wanted = settings, kernels, wanted
        ctx.mark_non_differentiable(*stats)
        return (token_logps, *stats)

    @staticmethod
    def backward(ctx, grad_token_logps, *_grad_no_diff):
        hidden, weight, bias, labels, *state = ctx.saved_tensors
        head = LinearHead(hidden, weight, bias, labels, *ctx.settings)
        grad_rows = grad_token_logps.to(ctx.kernels.grad_dtype(hidden.dtype)).contiguous()
        dh, dw, db = ctx.kernels.linear_backward(head, tuple(state), grad_rows, ctx.wanted)
        return dh, dw, db, None, None, None, None


class _LogitsTokenLogps(torch.autograd.Function):
    """Per-row log p_t from ready logits, never upcasting the whole logits tensor."""

    @staticmethod
    def forward(ctx, logits, labels, settings: tuple, kernels: LogpsKernels):
        need_grad = ctx.needs_input_grad[0]
        token_logps, state = kernels.logits_forward(LogitsRows(logits, labels, *settings), need_grad)
        if need_grad:
            ctx.save_for_backward(logits, labels, *state)
            ctx.settings, ctx.kernels = settings, kernels
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        logits, labels, *state = ctx.saved_tensors
        rows = LogitsRows(logits, labels, *ctx.settings)
        grad_rows = grad_token_logps.to(ctx.kernels.grad_dtype(logits.dtype)).contiguous()
        return ctx.kernels.logits_backward(rows, tuple(state), grad_rows), None, None, None


def output_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``logps`` and ``token_logps``: float64 for float64 inputs, float32 for 16/32-bit ones."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def sequence_sums(values: torch.Tensor, problem: LogpsProblem) -> torch.Tensor:
    """Σ of per-row `values` [N] over each sequence of `problem` → [S], deterministic and without host syncs.

    Each sequence is summed on its own, so a NaN or ±inf in one sequence never reaches another: padded problems
    sum each row of the [B, T] view, packed ones take a segment sum over the ``cu_seqlens`` ranges (no atomics).
    Floating values are summed in float64 and returned in their dtype; integer ones (counts) are exact
    differences of an integer prefix sum.
    """
    if not values.dtype.is_floating_point:
        if problem.padded:
            return values.view(problem.label_shape).sum(dim=1)
        prefix = F.pad(values.cumsum(0), (1, 0))
        return prefix[problem.cu_seqlens[1:]] - prefix[problem.cu_seqlens[:-1]]
    if problem.padded:
        return values.view(problem.label_shape).double().sum(dim=1).to(values.dtype)
    sums = torch.segment_reduce(values.double(), "sum", offsets=problem.cu_seqlens, axis=0, unsafe=True)
    return sums.to(values.dtype)


def _reduce(problem: LogpsProblem, token_logps: torch.Tensor, return_token_logps: bool,
            stats: tuple = ()) -> LogpsOutput:
    scored = problem.labels != problem.ignore_index
    token_logps = token_logps.to(output_dtype(problem.rows.dtype))
    weights = problem.token_weights
    weighted = token_logps if weights is None else token_logps * weights.to(token_logps.dtype)
    logps = sequence_sums(weighted, problem)
    counts = sequence_sums(scored.to(torch.int64), problem)
    token_out = token_logps.view(problem.label_shape) if return_token_logps else None
    token_stats = TokenStats(*(s.view(problem.label_shape) for s in stats)) if stats else None
    return LogpsOutput(logps=logps, counts=counts, token_logps=token_out, token_stats=token_stats)


def linear_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                 bias: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: float | None = None, token_weights: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None, return_token_logps: bool = False,
                 return_token_stats: bool = False, backend: str | None = None) -> LogpsOutput:
    """Per-sequence log-probs Σ_t w_t·log softmax(z_t)[labels_t] from hidden states, never building [N, V] logits.

    Args:
        hidden: [B, T, D] (one sequence per batch row) or [N, D] packed rows.
        weight: [V, D] lm_head weight, same dtype and device as ``hidden``.
        labels: [B, T] or [N] integer targets aligned with rows (row t scores labels[t]; the caller shifts).
            Rows equal to ``ignore_index`` count nothing and cost no vocabulary work.
        bias: optional [V] lm_head bias.
        temperature: logits are divided by it (after the softcap).
        softcap: if given, z = softcap·tanh(z/softcap) (Gemma-2 style) before the temperature.
        token_weights: optional per-row weights w_t, shape of labels; default 1.
        cu_seqlens: [S+1] int32/int64 sequence boundaries of the packed form (starts at 0, ends at N);
            packed input without it is one sequence.
        return_token_logps: also return the unweighted per-row log-probs (0 at ignored rows).
        return_token_stats: also return :class:`TokenStats` (entropy, log Σp², mean logit, top-1) per row; on the
            triton backend from the same fused pass, elsewhere from one more tiled pass. Off by default.
        backend: "triton", "cpp", "torch" or None (see :mod:`fastpref.backends`).

    Returns:
        :class:`LogpsOutput` (``logps`` [S] float32, float64 for float64 inputs, ``counts`` [S] int64,
        ``token_logps`` and ``token_stats`` or None).
        Differentiable, exactly, with respect to hidden, weight and bias (and token_weights) for any upstream
        gradient on ``logps`` and ``token_logps``. A sequence without scored rows has logps 0 and count 0.
    """
    problem, weight, bias = check_linear_logps_args(hidden, weight, labels, bias, ignore_index, temperature,
                                                    softcap, token_weights, cu_seqlens)
    kernels = load_kernels("logps", resolve_backend(backend, problem.rows.device))
    settings = (problem.ignore_index, problem.temperature, problem.softcap)
    token_logps, *stats = _LinearTokenLogps.apply(problem.rows, weight, bias, problem.labels, settings, kernels,
                                                  return_token_stats)
    return _reduce(problem, token_logps, return_token_logps, tuple(stats))


def logits_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                 temperature: float = 1.0, token_weights: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None, return_token_logps: bool = False,
                 backend: str | None = None) -> LogpsOutput:
    """Per-sequence log-probs from ready logits [B, T, V] or [N, V] (+ ``cu_seqlens``); see :func:`linear_logps`.

    The logits are read block by block in their own dtype with float32 accumulation (float64 for float64 logits):
    the whole tensor is never upcast. Differentiable with respect to ``logits``.
    """
    problem = check_logits_logps_args(logits, labels, ignore_index, temperature, token_weights, cu_seqlens)
    kernels = load_kernels("logps", resolve_backend(backend, problem.rows.device))
    settings = (problem.ignore_index, problem.temperature)
    token_logps = _LogitsTokenLogps.apply(problem.rows, problem.labels, settings, kernels)
    return _reduce(problem, token_logps, return_token_logps)


preload_kernels("logps")  # before any torch.compile trace reaches load_kernels (see its docstring)
