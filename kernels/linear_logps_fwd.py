"""Forward of the fused linear log-prob: log p_t = z_t[y_t] − logsumexp(z_t) with z_t = h_t·Wᵀ (+ b), capped,
tempered, never materializing the [N, V] logits (Cut Cross-Entropy, Wijmans et al. 2024, arXiv 2411.09009).

Each program owns BLOCK_M compacted scored rows and one contiguous slice of the vocabulary (a "split"): it
walks the slice in BLOCK_N tiles, computes each tile of logits with tl.dot over D, and folds it into an online
softmax: the running max m and the running rest r = Σ e^{z−m} − 1 (``tile_math.online_softmax_step``), plus the
target logit. The partials of every split land in small [splits, N] buffers that ``combine_splits`` merges in a
fixed order (deterministic). Saved state: the row max m and log-sum log1p(r) as two rows of one [2, N] tensor,
kept apart so that p = e^{(z − m) − log1p(r)} is exact to float32 at any logit magnitude.

WITH_STATS also folds token statistics of p = softmax(z) (for logging, no gradient), in forms that stay accurate
as p → one-hot: entropy = Σ p·(m − z) + log s (every term ≥ 0), kept as A = Σ e·(m − z) rescaled with the max,
log Σ p² = log1p(r₂) − 2·log1p(r) with r₂ the rest of Σ e², the mean logit Σ z / V, and whether the target is
the first argmax.

WITH_UNIT (a frozen head: only dH is wanted) also accumulates, as flash attention does softmax·V, the
"hidden-gradient unit" U_t = Σ_v e_tv·c_tv·W_v (c = 1 − tanh² with a softcap, else 1) rescaled with the max; the
launcher returns G_t = c_ty·W[y_t] − U_t / s_t, so that dH_t = g_t·G_t / T needs no vocabulary work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import compact_rows, dot_precision, refuse_float64, sm_count, store_dtype, tile_config, upcast_operands
from .tile_math import online_softmax_step, raw_logits_tile, transform_logits

# Largest float32 [splits, N, D] buffer of partial U the frozen-head forward takes for vocabulary splits.
UNIT_SPLIT_BYTES = 256 << 20


@triton.jit
def linear_logps_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr,
    part_max_ptr, part_rest_ptr, part_target_ptr, part_stats_ptr, part_argmax_ptr, part_unit_ptr,
    N, D, V, stride_h, stride_w, tiles_per_split, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr, WITH_UNIT: tl.constexpr,
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
    out = split * N + pos

    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_rest = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_cap = tl.zeros((BLOCK_M,), dtype=tl.float32)  # 1 − tanh² at the target (WITH_UNIT + softcap)
    ent = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rest_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_max_col = tl.zeros((BLOCK_M,), dtype=tl.int32)
    # Splits hold tiles_per_split tiles; the last one's tail past V is all masked columns, which change nothing.
    for step in range(0, tiles_per_split):
        tile = split * tiles_per_split + step
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = cols < V
        raw = raw_logits_tile(h_ptr, stride_h, rows, pos_ok, w_ptr, stride_w, cols.to(tl.int64), cols_ok, D,
                              BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, PRECISION)
        z, tanh = transform_logits(raw, b_ptr, cols, cols_ok, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(cols_ok[None, :], z, float("-inf"))
        old_max, old_rest = running_max, running_rest
        running_max, running_rest, rescale, e, grows, drop, tile_arg = online_softmax_step(
            z, old_max, old_rest, BLOCK_N)
        is_target = cols[None, :] == labels[:, None]
        target += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        if WITH_STATS:
            gap = tl.where(cols_ok[None, :], running_max[:, None] - z, 0.0)  # m − z ≥ 0
            shift = tl.where(old_max == float("-inf"), 0.0, running_max - old_max)
            ent = rescale * (ent + shift * (1.0 + old_rest)) + tl.sum(e * gap, axis=1)
            rest_sq = (tl.where(grows, (1.0 + rest_sq) * rescale * rescale, rest_sq)
                       + tl.sum(tl.where(drop, 0.0, e * e), axis=1))
            sum_z += tl.sum(tl.where(cols_ok[None, :], z, 0.0), axis=1)
            # Strictly greater: on ties the earlier column stays (torch.argmax's first index).
            first_max_col = tl.where(grows, tile * BLOCK_N + tile_arg.to(tl.int32), first_max_col)
        if WITH_UNIT:
            coef = e
            if HAS_SOFTCAP:
                coef = e * (1.0 - tanh * tanh)
                target_cap += tl.sum(tl.where(is_target, 1.0 - tanh * tanh, 0.0), axis=1)
            accumulate_unit(part_unit_ptr + out.to(tl.int64)[:, None] * D, pos_ok, coef, rescale, w_ptr, stride_w,
                            cols.to(tl.int64), cols_ok, D, BLOCK_K, EVEN_K, UPCAST, PRECISION)

    tl.store(part_max_ptr + out, running_max, mask=pos_ok)
    tl.store(part_rest_ptr + out, running_rest, mask=pos_ok)
    tl.store(part_target_ptr + out, target, mask=pos_ok)
    plane = tl.num_programs(0) * N
    if WITH_STATS:
        tl.store(part_stats_ptr + out, ent, mask=pos_ok)
        tl.store(part_stats_ptr + plane + out, rest_sq, mask=pos_ok)
        tl.store(part_stats_ptr + 2 * plane + out, sum_z, mask=pos_ok)
        tl.store(part_argmax_ptr + out, first_max_col, mask=pos_ok)
    if WITH_UNIT and HAS_SOFTCAP:  # the plane after the statistics' three
        if WITH_STATS:
            tl.store(part_stats_ptr + 3 * plane + out, target_cap, mask=pos_ok)
        else:
            tl.store(part_stats_ptr + out, target_cap, mask=pos_ok)


@triton.jit
def accumulate_unit(unit_rows, rows_ok, coef, rescale, w_ptr, stride_w, cols, cols_ok, D,
                    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """unit[rows, :] = unit[rows, :]·rescale + coef · W[cols, :], in BLOCK_D slices of D (float32 buffer, zero
    before the first tile). `coef` [BLOCK_M, BLOCK_N] is 0 at masked columns. EVEN_D: D % BLOCK_D == 0, no mask
    along D (keeps the loads pipelined)."""
    if UPCAST:
        p = coef
    else:
        p = coef.to(w_ptr.dtype.element_ty)
    w_rows = w_ptr + cols[:, None] * stride_w
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            w = tl.load(w_rows + dims[None, :], mask=cols_ok[:, None], other=0.0)
            tile_ok = rows_ok[:, None]
        else:
            dims_ok = dims < D
            w = tl.load(w_rows + dims[None, :], mask=cols_ok[:, None] & dims_ok[None, :], other=0.0)
            tile_ok = rows_ok[:, None] & dims_ok[None, :]
        if UPCAST:
            w = w.to(tl.float32)
        u = tl.load(unit_rows + dims[None, :], mask=tile_ok, other=0.0)
        u = tl.dot(p, w, u * rescale[:, None], input_precision=PRECISION)
        tl.store(unit_rows + dims[None, :], u, mask=tile_ok)


def vocabulary_splits(rows: int, vocab: int, block_m: int, block_n: int, device: torch.device,
                      max_splits: int | None = None) -> tuple[int, int]:
    """(splits, tiles per split): enough programs for about four waves over the SMs when every row is scored
    (at most `max_splits`), and every split holding at least one vocabulary tile."""
    tiles = triton.cdiv(vocab, block_n)
    row_blocks = max(1, triton.cdiv(rows, block_m))
    wanted = max(1, min(tiles, triton.cdiv(4 * sm_count(device), row_blocks), max_splits or tiles))
    tiles_per_split = triton.cdiv(tiles, wanted)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split


def to_rows(values: torch.Tensor, order: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Compacted per-position values [N, ...] → original rows; 0 at positions past the count."""
    values = torch.where(valid.view(-1, *([1] * (values.dim() - 1))), values, torch.zeros_like(values))
    return torch.zeros_like(values).index_copy_(0, order.long(), values)


def _merge_rests(part_max, part_rest, power: int = 1):
    """(best, rest of the merged sum) per position: Σ_i w_i^power·(1 + r_i) − 1 with w_i = e^{m_i − best},
    computed without the 1 − 1: the first split reaching the best max contributes r_i alone."""
    best, first = part_max.max(dim=0)
    weight = torch.exp(part_max - best) ** power
    is_first = torch.arange(part_max.shape[0], device=part_max.device)[:, None] == first[None, :]
    return best, torch.where(is_first, part_rest, weight * (1.0 + part_rest)).sum(dim=0)


def combine_splits(part_max, part_rest, part_target, order, count) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split partials [splits, N] (compacted positions) into (target − lse [N], state [2, N]: row max
    and log-sum) per original row, 0 at rows past the count."""
    best, rest = _merge_rests(part_max, part_rest)
    log_sum = torch.log1p(rest)
    target = part_target.sum(dim=0)
    valid = torch.arange(order.numel(), device=order.device) < count
    token_logps = (target - best) - log_sum
    state = torch.stack([best, log_sum], dim=1)
    return to_rows(token_logps, order, valid), to_rows(state, order, valid).T.contiguous()


def combine_stats(part_max, part_rest, part_stats, part_argmax, labels, order, count,
                  vocab: int) -> dict[str, torch.Tensor]:
    """Per-row statistics from the split partials (see the module docstring); 0 / False at unscored rows."""
    best, rest = _merge_rests(part_max, part_rest)
    _, rest_sq = _merge_rests(part_max, part_stats[1], power=2)
    weight = torch.exp(part_max - best)
    gap = torch.where(weight > 0, (best - part_max) * (1.0 + part_rest), torch.zeros_like(weight))
    ent = torch.where(weight > 0, weight * (part_stats[0] + gap), torch.zeros_like(weight)).sum(dim=0)
    log_sum = torch.log1p(rest)
    # First column of the global max: the smallest per-split first-max column among splits reaching it.
    first_col = torch.where(part_max == best, part_argmax, torch.full_like(part_argmax, vocab)).min(dim=0).values
    valid = torch.arange(order.numel(), device=order.device) < count
    return {
        "entropy": to_rows(ent / (1.0 + rest) + log_sum, order, valid),
        "log_sum_sq_probs": to_rows(torch.log1p(rest_sq) - 2 * log_sum, order, valid),
        "mean_logits": to_rows(part_stats[2].sum(dim=0) / vocab, order, valid),
        "is_top1": to_rows(first_col.long() == labels[order.long()], order, valid),
    }


def combine_unit(part_max, part_rest, part_unit, target_cap, weight, labels, order, count) -> torch.Tensor:
    """G [N, D] = c_y·W[y] − U / s per original row (0 at rows past the count), float32, from the per-split U."""
    best, rest = _merge_rests(part_max, part_rest)
    scale = torch.exp(part_max - best) / (1.0 + rest)
    unit = (part_unit * scale[:, :, None]).sum(dim=0)
    # Labels are in range unless value checks were skipped: clamp, so a bad one gives a wrong row, never a bad read.
    compact_labels = labels[order.long()].clamp(0, weight.shape[0] - 1)
    target_rows = weight[compact_labels].float()
    if target_cap is not None:
        target_rows = target_rows * target_cap[:, None]
    valid = torch.arange(order.numel(), device=order.device) < count
    return to_rows(target_rows - unit, order, valid)


def _empty_outputs(hidden: torch.Tensor, with_stats: bool, with_unit: bool):
    """Outputs of a forward over zero rows: distinct tensors (a custom op may not return one tensor twice)."""
    def empty():
        return hidden.new_zeros(0, dtype=torch.float32)

    stats = {"entropy": empty(), "log_sum_sq_probs": empty(), "mean_logits": empty(),
             "is_top1": torch.zeros(0, dtype=torch.bool, device=hidden.device)} if with_stats else {}
    unit = hidden.new_zeros(0, hidden.shape[1], dtype=store_dtype(hidden.dtype)) if with_unit else None
    return empty(), hidden.new_zeros(2, 0, dtype=torch.float32), stats, unit


def linear_logps_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, ignore_index: int, temperature: float, softcap: float | None,
                         with_stats: bool = False, with_unit: bool = False):
    """(token_logps [N] f32, state [2, N] f32 (row max, log-sum), stats, unit), 0 at ignored rows. Inputs
    contiguous, same dtype (float64 refused). `stats` is {} unless `with_stats`: then entropy, log_sum_sq_probs,
    mean_logits (float32 [N]) and is_top1 (bool [N]). `unit` is None unless `with_unit`: then G [N, D] in the
    input dtype, with dH_t = g_t·G_t / T (see the module docstring)."""
    refuse_float64("hidden", hidden)
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    if rows == 0:
        return _empty_outputs(hidden, with_stats, with_unit)
    cfg = tile_config("forward_unit" if with_unit else "forward_stats" if with_stats else "forward", hidden.dtype)
    order, count = compact_rows(labels != ignore_index)
    max_splits = max(1, UNIT_SPLIT_BYTES // (rows * dim * 4)) if with_unit else None
    splits, tiles_per_split = vocabulary_splits(rows, vocab, cfg.block_m, cfg.block_n, hidden.device, max_splits)
    part_max, part_rest, part_target = (torch.empty(splits, rows, device=hidden.device) for _ in range(3))
    planes = 3 if with_stats else 0
    planes += 1 if with_unit and softcap is not None else 0
    part_stats = torch.empty(planes, splits, rows, device=hidden.device)
    part_argmax = torch.empty(splits if with_stats else 0, rows, device=hidden.device, dtype=torch.int32)
    part_unit = torch.zeros((splits, rows, dim) if with_unit else (0,), device=hidden.device)
    grid = (splits, triton.cdiv(rows, cfg.block_m))
    linear_logps_fwd_kernel[grid](
        hidden, weight, hidden if bias is None else bias, labels, order, count,
        part_max, part_rest, part_target, part_stats, part_argmax, part_unit,
        rows, dim, vocab, hidden.stride(0), weight.stride(0), tiles_per_split,
        1.0 if softcap is None else softcap, 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_STATS=with_stats, WITH_UNIT=with_unit,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=dim % cfg.block_k == 0,
        UPCAST=upcast_operands(hidden.dtype), PRECISION=dot_precision(hidden.dtype), **cfg.launch(),
    )
    token_logps, state = combine_splits(part_max, part_rest, part_target, order, count)
    stats = combine_stats(part_max, part_rest, part_stats, part_argmax, labels, order, count,
                          vocab) if with_stats else {}
    unit = None
    if with_unit:
        target_cap = part_stats[-1].sum(dim=0) if softcap is not None else None
        unit = combine_unit(part_max, part_rest, part_unit, target_cap, weight, labels, order,
                            count).to(store_dtype(hidden.dtype))
    return token_logps, state, stats, unit
