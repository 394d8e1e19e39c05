"""Forward of the fused linear log-prob: log p_t = z_t[y_t] − logsumexp(z_t) with z_t = h_t·Wᵀ (+ b), capped,
tempered, never materializing the [N, V] logits (Cut Cross-Entropy, Wijmans et al. 2024, arXiv 2411.09009).

Each program owns BLOCK_M compacted scored rows and one contiguous slice of the vocabulary (a "split"): it
walks the slice in BLOCK_N tiles, computes each tile of logits with tl.dot over D, and folds it into an online
log-sum-exp (running max and rescaled sum) and the target logit. The partial (max, sum, target) of every split
lands in a small [splits, N] buffer; `combine_splits` merges them in a fixed order, so the result is
deterministic. Splitting the vocabulary gives parallelism when rows are few. Saved state: lse [N] only.

With WITH_STATS the same pass also folds per-token statistics of p = softmax(z) (for logging, no gradient):
entropy −Σ p·log p = lse − Σ p·z, log Σ p², the mean logit Σ z / V, and whether the target is the argmax
(first index on ties, as torch.argmax). Per split it keeps Σ e·z and Σ e² with e = exp(z − running max),
rescaled like the running sum, plus Σ z and the first column holding the running max.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import compact_rows, dot_precision, sm_count, tile_config, upcast_operands
from .tile_math import raw_logits_tile, transform_logits


@triton.jit
def linear_logps_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr,
    part_max_ptr, part_sum_ptr, part_target_ptr, part_stats_ptr, part_argmax_ptr,
    N, D, V, stride_h, stride_w, tiles_per_split, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Vocabulary splits vary fastest: programs running together share the same rows of hidden in L2.
    split = tl.program_id(0)
    block = tl.program_id(1)
    count = tl.load(count_ptr)
    first = block * BLOCK_M
    if first >= count:
        return
    pos = first + tl.arange(0, BLOCK_M)
    pos_ok = pos < count
    rows = tl.load(order_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
    labels = tl.load(labels_ptr + rows, mask=pos_ok, other=-1)

    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_ez = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_e2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_max_col = tl.zeros((BLOCK_M,), dtype=tl.int32)
    tiles = tl.cdiv(V, BLOCK_N)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, tiles)
    for tile in range(tile_start, tile_end):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = cols < V
        raw = raw_logits_tile(h_ptr, stride_h, rows, pos_ok, w_ptr, stride_w, cols.to(tl.int64), cols_ok, D,
                              BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, PRECISION)
        z, _ = transform_logits(raw, b_ptr, cols, cols_ok, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(cols_ok[None, :], z, float("-inf"))
        # Online log-sum-exp: every tile holds at least one real column, so the new max is finite.
        tile_max = tl.max(z, axis=1)
        new_max = tl.maximum(running_max, tile_max)
        rescale = tl.exp(running_max - new_max)
        e = tl.exp(z - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(e, axis=1)
        if WITH_STATS:
            finite_z = tl.where(cols_ok[None, :], z, 0.0)
            sum_ez = sum_ez * rescale + tl.sum(e * finite_z, axis=1)
            sum_e2 = sum_e2 * rescale * rescale + tl.sum(e * e, axis=1)
            sum_z += tl.sum(finite_z, axis=1)
            # Strictly greater: on ties the earlier column stays (torch.argmax's first index).
            tile_first = tile * BLOCK_N + tl.argmax(z, axis=1).to(tl.int32)
            first_max_col = tl.where(tile_max > running_max, tile_first, first_max_col)
        running_max = new_max
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)

    out = split * N + pos
    tl.store(part_max_ptr + out, running_max, mask=pos_ok)
    tl.store(part_sum_ptr + out, running_sum, mask=pos_ok)
    tl.store(part_target_ptr + out, target, mask=pos_ok)
    if WITH_STATS:
        plane = tl.num_programs(0) * N
        tl.store(part_stats_ptr + out, sum_ez, mask=pos_ok)
        tl.store(part_stats_ptr + plane + out, sum_e2, mask=pos_ok)
        tl.store(part_stats_ptr + 2 * plane + out, sum_z, mask=pos_ok)
        tl.store(part_argmax_ptr + out, first_max_col, mask=pos_ok)


def vocabulary_splits(rows: int, vocab: int, block_m: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split): enough programs for about four waves over the SMs when every row is scored,
    and every split holding at least one vocabulary tile."""
    tiles = triton.cdiv(vocab, block_n)
    row_blocks = max(1, triton.cdiv(rows, block_m))
    wanted = max(1, min(tiles, triton.cdiv(4 * sm_count(device), row_blocks)))
    tiles_per_split = triton.cdiv(tiles, wanted)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split


def _to_rows(values: torch.Tensor, order: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Compacted per-position values → original rows; 0 at rows past the count."""
    zeros = torch.zeros(order.numel(), device=order.device, dtype=values.dtype)
    return zeros.scatter_(0, order.long(), torch.where(valid, values, torch.zeros_like(values)))


def combine_splits(part_max, part_sum, part_target, order, count) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split partials [splits, N] (compacted positions) into (target − lse, lse) per original row,
    0 at rows past the count."""
    best = part_max.max(dim=0).values
    lse = best + torch.log((part_sum * torch.exp(part_max - best)).sum(dim=0))
    target = part_target.sum(dim=0)
    valid = torch.arange(order.numel(), device=order.device) < count
    return _to_rows(target - lse, order, valid), _to_rows(lse, order, valid)


def combine_stats(part_max, part_sum, part_stats, part_argmax, lse_rows, labels, order, count,
                  vocab: int) -> dict[str, torch.Tensor]:
    """Per-row statistics from the split partials (see the module docstring); 0 / False at unscored rows."""
    best = part_max.max(dim=0).values
    weight = torch.exp(part_max - best)
    sum_e = (part_sum * weight).sum(dim=0)
    sum_ez = (part_stats[0] * weight).sum(dim=0)
    sum_e2 = (part_stats[1] * weight * weight).sum(dim=0)
    # First column of the global max: the smallest per-split first-max column among splits reaching it.
    at_best = part_max == best
    first_col = torch.where(at_best, part_argmax, torch.full_like(part_argmax, vocab)).min(dim=0).values
    valid = torch.arange(order.numel(), device=order.device) < count
    lse = lse_rows[order.long()]
    compact_labels = labels[order.long()]
    return {
        "entropy": _to_rows(lse - sum_ez / sum_e, order, valid),
        "log_sum_sq_probs": _to_rows(torch.log(sum_e2) + 2 * best - 2 * lse, order, valid),
        "mean_logits": _to_rows(part_stats[2].sum(dim=0) / vocab, order, valid),
        "is_top1": _to_rows(first_col.long() == compact_labels, order, valid),
    }


def linear_logps_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, ignore_index: int, temperature: float, softcap: float | None,
                         with_stats: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(token_logps [N] f32, lse [N] f32, stats), 0 at ignored rows. Inputs contiguous, same dtype. `stats` is
    {} unless `with_stats`: then entropy, log_sum_sq_probs, mean_logits (float32 [N]) and is_top1 (bool [N])."""
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    if rows == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        stats = {"entropy": empty, "log_sum_sq_probs": empty, "mean_logits": empty,
                 "is_top1": torch.zeros(0, dtype=torch.bool, device=hidden.device)} if with_stats else {}
        return empty, empty, stats
    cfg = tile_config(hidden.dtype)
    # The statistics hold four more running values per row: half-width vocabulary tiles keep them out of spills.
    block_n = max(16, cfg.block_n // 2) if with_stats else cfg.block_n
    order, count = compact_rows(labels != ignore_index)
    splits, tiles_per_split = vocabulary_splits(rows, vocab, cfg.block_m, block_n, hidden.device)
    part_max, part_sum, part_target = (torch.empty(splits, rows, device=hidden.device) for _ in range(3))
    part_stats = torch.empty(3 if with_stats else 0, splits, rows, device=hidden.device)
    part_argmax = torch.empty(splits if with_stats else 0, rows, device=hidden.device, dtype=torch.int32)
    grid = (splits, triton.cdiv(rows, cfg.block_m))
    linear_logps_fwd_kernel[grid](
        hidden, weight, hidden if bias is None else bias, labels, order, count,
        part_max, part_sum, part_target, part_stats, part_argmax,
        rows, dim, vocab, hidden.stride(0), weight.stride(0), tiles_per_split,
        1.0 if softcap is None else softcap, 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_STATS=with_stats,
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k, EVEN_K=dim % cfg.block_k == 0,
        UPCAST=upcast_operands(hidden.dtype), PRECISION=dot_precision(hidden.dtype), **cfg.launch(),
    )
    token_logps, lse = combine_splits(part_max, part_sum, part_target, order, count)
    stats = combine_stats(part_max, part_sum, part_stats, part_argmax, lse, labels, order, count,
                          vocab) if with_stats else {}
    return token_logps, lse, stats
