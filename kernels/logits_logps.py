"""Log-probs from ready logits: log p_t = z_t[y_t] − logsumexp(z_t), z = logits / T, and the backward
∂L/∂logits_t = g_t · (onehot(y_t) − softmax(z_t)) / T.

One program per row walks the vocabulary in BLOCK_V slices, reading the logits in their own dtype and
accumulating in float32 (the whole tensor is never upcast). The online log-sum-exp keeps a running max and sum
per lane (the rest r = Σ e^{z−m} − 1 rather than the sum, so log-sum = log1p(r) stays exact for a near one-hot
row) and folds the lanes at the end; the row max and log-sum are saved apart, so p = e^{(z − m) − log-sum} is
exact to float32 at any logit magnitude. A row with the ignore label (forward), or with a zero gradient
(backward), returns at once; the backward writes its row of zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import interpreted, refuse_float64, store_dtype
from .tile_math import log1p_f32


@triton.jit
def logits_logps_fwd_kernel(logits_ptr, labels_ptr, token_logps_ptr, state_ptr, V, stride_row, stride_state,
                            ignore_index, inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        return  # outputs are zero-initialized
    row_ptr = logits_ptr + row * stride_row
    # Per lane: running max m and rest r = Σ e^{z − m} − 1 (the maximal term, exactly 1, left out).
    lane_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    lane_rest = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
        grows = z > lane_max
        # e^{−|z − m|}, 0 for a -inf column (guards the -inf − -inf = nan of lanes that have seen only -inf).
        term = tl.where(z == float("-inf"), 0.0, tl.exp(tl.minimum(z, lane_max) - tl.maximum(z, lane_max)))
        lane_rest = tl.where(grows, (1.0 + lane_rest) * term, lane_rest + term)
        lane_max = tl.maximum(lane_max, z)
    row_max, first = tl.max(lane_max, axis=0, return_indices=True, return_indices_tie_break_left=True)
    weight = tl.where(lane_max == float("-inf"), 0.0, tl.exp(lane_max - row_max))
    rest = tl.sum(tl.where(tl.arange(0, BLOCK_V) == first, lane_rest, weight * (1.0 + lane_rest)), axis=0)
    log_sum = log1p_f32(rest)
    # With value checks skipped a label may lie outside [0, V): the load is masked (a wrong number, never a bad
    # read); such a row gets −inf.
    label_ok = (label >= 0) & (label < V)
    target = tl.load(row_ptr + label, mask=label_ok, other=float("-inf")).to(tl.float32) * inv_temperature
    tl.store(token_logps_ptr + row, (target - row_max) - log_sum)
    tl.store(state_ptr + row, row_max)
    tl.store(state_ptr + stride_state + row, log_sum)


@triton.jit
def logits_logps_bwd_kernel(logits_ptr, labels_ptr, state_ptr, grad_ptr, dlogits_ptr, V, stride_row, stride_drow,
                            stride_state, ignore_index, inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    grad = tl.load(grad_ptr + row)
    out_ptr = dlogits_ptr + row * stride_drow
    idle = (label == ignore_index) | (grad == 0.0)
    if idle:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(out_ptr + cols, tl.zeros((BLOCK_V,), dtype=dlogits_ptr.dtype.element_ty), mask=cols < V)
        return
    row_max = tl.load(state_ptr + row)
    log_sum = tl.load(state_ptr + stride_state + row)
    scale = grad * inv_temperature
    row_ptr = logits_ptr + row * stride_row
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        cols_ok = cols < V
        z = tl.load(row_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32) * inv_temperature
        dz = ((cols == label).to(tl.float32) - tl.exp((z - row_max) - log_sum)) * scale
        tl.store(out_ptr + cols, dz.to(dlogits_ptr.dtype.element_ty), mask=cols_ok)


def _block_v(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), 64 if interpreted() else 4096)


def logits_logps_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_logps [N] f32, state [2, N] f32: row max and log-sum), 0 at ignored rows; `logits` [N, V] with
    unit stride along V (float64 refused)."""
    refuse_float64("logits", logits)
    rows, vocab = logits.shape
    token_logps = torch.zeros(rows, device=logits.device)
    state = torch.zeros(2, rows, device=logits.device)
    if rows:
        logits_logps_fwd_kernel[(rows,)](logits, labels, token_logps, state, vocab, logits.stride(0),
                                         state.stride(0), ignore_index, 1.0 / temperature,
                                         BLOCK_V=_block_v(vocab), num_warps=8)
    return token_logps, state


def logits_logps_backward(logits: torch.Tensor, labels: torch.Tensor, state: torch.Tensor,
                          grad_rows: torch.Tensor, ignore_index: int, temperature: float) -> torch.Tensor:
    """dlogits [N, V] in the logits' dtype; `state` is the forward's."""
    refuse_float64("logits", logits)
    rows, vocab = logits.shape
    dlogits = torch.empty(rows, vocab, device=logits.device, dtype=store_dtype(logits.dtype))
    if rows:
        logits_logps_bwd_kernel[(rows,)](logits, labels, state, grad_rows, dlogits, vocab, logits.stride(0),
                                         dlogits.stride(0), state.stride(0), ignore_index, 1.0 / temperature,
                                         BLOCK_V=_block_v(vocab), num_warps=8)
    return dlogits.to(logits.dtype)
