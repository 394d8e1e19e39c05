"""Log-probs from ready logits: log p_t = z_t[y_t] − logsumexp(z_t), z = logits / T, and the backward
∂L/∂logits_t = g_t · (onehot(y_t) − softmax(z_t)) / T.

One program per row walks the vocabulary in BLOCK_V slices, reading the logits in their own dtype and
accumulating in float32 (the whole tensor is never upcast). The online log-sum-exp keeps a running max and sum
per lane and folds the lanes at the end. A row with the ignore label (forward), or with a zero gradient
(backward), returns at once; the backward writes its row of zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import interpreted, store_dtype


@triton.jit
def logits_logps_fwd_kernel(logits_ptr, labels_ptr, token_logps_ptr, lse_ptr, V, stride_row, ignore_index,
                            inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        return  # outputs are zero-initialized
    row_ptr = logits_ptr + row * stride_row
    lane_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    lane_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
        new_max = tl.maximum(lane_max, z)
        # Lanes that have seen only -inf keep a zero sum (guard the -inf − -inf = nan).
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - safe_max) + tl.exp(z - safe_max)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
    target = tl.load(row_ptr + label).to(tl.float32) * inv_temperature
    tl.store(token_logps_ptr + row, target - lse)
    tl.store(lse_ptr + row, lse)


@triton.jit
def logits_logps_bwd_kernel(logits_ptr, labels_ptr, lse_ptr, grad_ptr, dlogits_ptr, V, stride_row, stride_drow,
                            ignore_index, inv_temperature, BLOCK_V: tl.constexpr):
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
    lse = tl.load(lse_ptr + row)
    scale = grad * inv_temperature
    row_ptr = logits_ptr + row * stride_row
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        cols_ok = cols < V
        z = tl.load(row_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32) * inv_temperature
        dz = ((cols == label).to(tl.float32) - tl.exp(z - lse)) * scale
        tl.store(out_ptr + cols, dz.to(dlogits_ptr.dtype.element_ty), mask=cols_ok)


def _block_v(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), 64 if interpreted() else 4096)


def logits_logps_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_logps [N] f32, lse [N] f32), 0 at ignored rows; `logits` [N, V] with unit stride along V."""
    rows, vocab = logits.shape
    token_logps = torch.zeros(rows, device=logits.device)
    lse = torch.zeros(rows, device=logits.device)
    if rows:
        logits_logps_fwd_kernel[(rows,)](logits, labels, token_logps, lse, vocab, logits.stride(0), ignore_index,
                                         1.0 / temperature, BLOCK_V=_block_v(vocab), num_warps=8)
    return token_logps, lse


def logits_logps_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                          ignore_index: int, temperature: float) -> torch.Tensor:
    """dlogits [N, V] in the logits' dtype."""
    rows, vocab = logits.shape
    dlogits = torch.empty(rows, vocab, device=logits.device, dtype=store_dtype(logits.dtype))
    if rows:
        logits_logps_bwd_kernel[(rows,)](logits, labels, lse, grad_rows, dlogits, vocab, logits.stride(0),
                                         dlogits.stride(0), ignore_index, 1.0 / temperature,
                                         BLOCK_V=_block_v(vocab), num_warps=8)
    return dlogits.to(logits.dtype)
