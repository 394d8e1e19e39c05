"""Backward of the fused linear log-prob, exact for any per-row upstream gradient g_t = ∂L/∂log p_t.

With z = (cap(h·Wᵀ + b)) / T and log p_t = z_t[y_t] − lse_t, the gradient on the raw logit a = h·Wᵀ + b is

    ∂L/∂a_tv = g_t · (onehot(y_t)_v − softmax(z_t)_v) / T · (1 − tanh²(a_tv / c))   (last factor: softcap c)

and dH = ∂L/∂a · W, dW = (∂L/∂a)ᵀ · H, dbias = Σ_t ∂L/∂a_t. Only rows with a label and g ≠ 0 are active;
they are compacted first (device-side), every other row gets an exact zero and costs no work.

Work goes in chunks of (compacted rows R) × (vocabulary C) through three kernels, all deterministic (no
atomics: every output element has exactly one writer per launch):

1. `dlogits_kernel` recomputes the logits tile by tile from the saved row max and log-sum and writes ∂L/∂a for R × C into a
   workspace in the input dtype (as eager PyTorch rounds its logits gradient).
2. `hidden_grad_kernel` adds workspace · W[C] into a float32 accumulator of R's rows of dH; at the last vocabulary
   chunk it writes dH in the input dtype straight to the rows' original positions.
3. `weight_grad_kernel` forms workspaceᵀ · H[R] for W[C] with the reduction over R's rows in registers; it
   writes dW[C] for the first row chunk and adds to it (float32 add, one rounding) for later ones. dbias the same,
   in a float32 [V] buffer.

The row chunk is as large as the workspace budget allows (float32 dH rows + the logits-gradient chunk), so
dW is usually formed in one rounding; extra memory stays under ``WORKSPACE_BYTES``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import compact_rows, dot_precision, refuse_float64, store_dtype, tile_config, upcast_operands
from .tile_math import grouped_tile, raw_logits_tile, transform_logits

WORKSPACE_BYTES = 48 << 20
VOCAB_CHUNK = 4096


@triton.jit
def dlogits_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, state_ptr, grad_ptr, order_ptr, count_ptr, dz_ptr,
    row_start, chunk_rows, vocab_start, chunk_cols, D, V, stride_h, stride_w, stride_dz, stride_state,
    softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(chunk_rows, BLOCK_M), tl.cdiv(chunk_cols, BLOCK_N),
                                  GROUP_M)
    active = tl.load(count_ptr) - row_start
    first = tile_m * BLOCK_M
    if first >= active:
        return
    pos = first + tl.arange(0, BLOCK_M)  # position inside the row chunk
    pos_ok = pos < active
    rows = tl.load(order_ptr + row_start + pos, mask=pos_ok, other=0).to(tl.int64)
    labels = tl.load(labels_ptr + rows, mask=pos_ok, other=-1)
    row_max = tl.load(state_ptr + rows, mask=pos_ok, other=0.0)
    log_sum = tl.load(state_ptr + stride_state + rows, mask=pos_ok, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=pos_ok, other=0.0)
    local_cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = vocab_start + local_cols
    cols_ok = local_cols < chunk_cols

    raw = raw_logits_tile(h_ptr, stride_h, rows, pos_ok, w_ptr, stride_w, cols.to(tl.int64), cols_ok, D,
                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_D, UPCAST, PRECISION)
    z, tanh = transform_logits(raw, b_ptr, cols, cols_ok, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP)
    onehot = (cols[None, :] == labels[:, None]).to(tl.float32)
    # p = e^{(z − m) − log s}: max and log-sum apart keep p exact to float32 at any logit magnitude.
    dz = (onehot - tl.exp((z - row_max[:, None]) - log_sum[:, None])) * (grad * inv_temperature)[:, None]
    if HAS_SOFTCAP:
        dz = dz * (1.0 - tanh * tanh)
    # Rows past the count inside this block become exact zeros: the dH kernel reads whole blocks.
    dz = tl.where(pos_ok[:, None], dz, 0.0)
    out = dz_ptr + pos[:, None].to(tl.int64) * stride_dz + local_cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=(pos < chunk_rows)[:, None] & cols_ok[None, :])


@triton.jit
def hidden_grad_kernel(
    dz_ptr, w_ptr, acc_ptr, dh_ptr, order_ptr, count_ptr,
    row_start, chunk_rows, vocab_start, chunk_cols, D, stride_dz, stride_w, stride_acc, stride_dh,
    FIRST_CHUNK: tl.constexpr, LAST_CHUNK: tl.constexpr, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc[R] (+)= dz · W[C] over this vocabulary chunk; on the last chunk dH[order[R]] = acc in dH's dtype.
    EVEN_K: the chunk's width is a multiple of BLOCK_K; EVEN_D: D is a multiple of BLOCK_N (unmasked contiguous
    dimensions keep the loads pipelined)."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(chunk_rows, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    active = tl.load(count_ptr) - row_start
    first = tile_m * BLOCK_M
    if first >= active:
        return
    pos = first + tl.arange(0, BLOCK_M)
    pos_in_chunk = pos < chunk_rows
    dims = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims_ok = dims < D
    offs_k = tl.arange(0, BLOCK_K)
    dz_rows = dz_ptr + pos[:, None].to(tl.int64) * stride_dz
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, chunk_cols, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < chunk_cols
        w_tile = w_ptr + (vocab_start + k[:, None]).to(tl.int64) * stride_w + dims[None, :]
        if EVEN_K:
            a = tl.load(dz_rows + k[None, :], mask=pos_in_chunk[:, None], other=0.0)
        else:
            a = tl.load(dz_rows + k[None, :], mask=pos_in_chunk[:, None] & k_ok[None, :], other=0.0)
        if EVEN_D:
            b = tl.load(w_tile, mask=k_ok[:, None], other=0.0)
        else:
            b = tl.load(w_tile, mask=k_ok[:, None] & dims_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)

    acc_tile = acc_ptr + pos[:, None].to(tl.int64) * stride_acc + dims[None, :]
    tile_ok = pos_in_chunk[:, None] & dims_ok[None, :]
    if not FIRST_CHUNK:
        acc += tl.load(acc_tile, mask=tile_ok, other=0.0)
    if LAST_CHUNK:
        pos_ok = pos < active
        rows = tl.load(order_ptr + row_start + pos, mask=pos_ok, other=0).to(tl.int64)
        tl.store(dh_ptr + rows[:, None] * stride_dh + dims[None, :], acc.to(dh_ptr.dtype.element_ty),
                 mask=pos_ok[:, None] & dims_ok[None, :])
    else:
        tl.store(acc_tile, acc, mask=tile_ok)


@triton.jit
def weight_grad_kernel(
    dz_ptr, h_ptr, dw_ptr, db_ptr, order_ptr, count_ptr,
    row_start, chunk_rows, vocab_start, chunk_cols, D, stride_dz, stride_h, stride_dw,
    FIRST_CHUNK: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, EVEN_V: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW[C] (+)= dzᵀ · H[order[R]] and dbias[C] (+)= Σ_R dz; the first row chunk writes, later ones add.
    EVEN_V: the chunk's width is a multiple of BLOCK_M; EVEN_D: D is a multiple of BLOCK_N."""
    tile_v, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(chunk_cols, BLOCK_M),
                                  tl.maximum(tl.cdiv(D, BLOCK_N), 1), GROUP_M)  # one column even if D = 0
    active = tl.minimum(tl.load(count_ptr) - row_start, chunk_rows)
    if not FIRST_CHUNK:  # noqa: SIM102 (a constexpr test and a run-time one stay separate in Triton)
        if active <= 0:
            return  # nothing to add; the first row chunk already wrote this tile
    local_v = tile_v * BLOCK_M + tl.arange(0, BLOCK_M)
    v_ok = local_v < chunk_cols
    dims = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims_ok = dims < D
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, active, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < active
        dz_tile = dz_ptr + k[None, :].to(tl.int64) * stride_dz + local_v[:, None]
        if EVEN_V:
            a = tl.load(dz_tile, mask=k_ok[None, :], other=0.0)
        else:
            a = tl.load(dz_tile, mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        if NEED_BIAS:
            bias_acc += tl.sum(a.to(tl.float32), axis=1)
        if NEED_WEIGHT:
            rows = tl.load(order_ptr + row_start + k, mask=k_ok, other=0).to(tl.int64)
            h_tile = h_ptr + rows[:, None] * stride_h + dims[None, :]
            if EVEN_D:
                b = tl.load(h_tile, mask=k_ok[:, None], other=0.0)
            else:
                b = tl.load(h_tile, mask=k_ok[:, None] & dims_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)

    cols = (vocab_start + local_v).to(tl.int64)
    if NEED_WEIGHT:
        dw_tile = dw_ptr + cols[:, None] * stride_dw + dims[None, :]
        tile_ok = v_ok[:, None] & dims_ok[None, :]
        if not FIRST_CHUNK:
            acc += tl.load(dw_tile, mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(dw_tile, acc.to(dw_ptr.dtype.element_ty), mask=tile_ok)
    if NEED_BIAS:  # noqa: SIM102 (a constexpr test and a run-time one stay separate in Triton)
        if tile_n == 0:  # one program per vocabulary tile writes the bias gradient
            if not FIRST_CHUNK:
                bias_acc += tl.load(db_ptr + cols, mask=v_ok, other=0.0)
            tl.store(db_ptr + cols, bias_acc, mask=v_ok)


def backward_chunks(rows: int, dim: int, vocab: int, workspace_itemsize: int, block_m: int) -> tuple[int, int]:
    """(row chunk, vocabulary chunk) fitting float32 dH rows plus the logits-gradient chunk in WORKSPACE_BYTES."""
    vocab_chunk = min(VOCAB_CHUNK, vocab)
    per_row = dim * 4 + vocab_chunk * workspace_itemsize
    fitting = max(block_m, WORKSPACE_BYTES // per_row // block_m * block_m)
    return min(fitting, triton.cdiv(rows, block_m) * block_m), vocab_chunk


def unit_backward(unit: torch.Tensor, grad_rows: torch.Tensor, temperature: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """dH = g_t·G_t / T from the forward's hidden-gradient unit G (frozen head): no vocabulary work."""
    return ((grad_rows / temperature)[:, None] * unit.float()).to(dtype)


def linear_logps_backward(head, state, grad_rows, wanted):
    """(dH | None, dW | None, dbias | None) in the inputs' dtypes, float32 accumulation, for the
    :class:`fastpref.logps.contract.LinearHead` `head` (contiguous tensors) and the gradients `wanted`
    (:class:`~fastpref.logps.contract.GradsWanted`). `state` [2, N] is the forward's (row max, log-sum)."""
    hidden, weight, bias, labels = head.hidden, head.weight, head.bias, head.labels
    need_hidden, need_weight, need_bias = wanted
    refuse_float64("hidden", hidden)
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    out_dtype = store_dtype(hidden.dtype)
    order, count = compact_rows((labels != head.ignore_index) & (grad_rows != 0))
    dh = torch.zeros(rows, dim, device=device, dtype=out_dtype) if need_hidden else None
    dw = torch.empty(vocab, dim, device=device, dtype=out_dtype) if need_weight else None
    db = torch.empty(vocab, device=device, dtype=torch.float32) if need_bias else None
    if rows == 0:
        if dw is not None:
            dw.zero_()
        if db is not None:
            db.zero_()
    else:
        _run_chunks(head, state, grad_rows, (order, count), (dh, dw, db))
    return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


def _run_chunks(head, state, grad_rows, work, outputs):
    """Launch the backward kernels chunk by chunk over (rows, vocabulary); `work` = (order, count) of the rows with
    work, `outputs` = (dh, dw, db), each None when not wanted."""
    hidden, weight, bias, labels = head.hidden, head.weight, head.bias, head.labels
    temperature, softcap = head.temperature, head.softcap
    (order, count), (dh, dw, db) = work, outputs
    out_dtype = store_dtype(hidden.dtype)
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    tiles = {name: tile_config(name, hidden.dtype) for name in ("dlogits", "hidden_grad", "weight_grad")}
    block_m = tiles["dlogits"].block_m
    assert tiles["hidden_grad"].block_m == block_m, "the row kernels share the row block"
    row_chunk, vocab_chunk = backward_chunks(rows, dim, vocab, out_dtype.itemsize, block_m)
    dz = torch.empty(row_chunk, vocab_chunk, device=hidden.device, dtype=out_dtype)
    acc = torch.empty(row_chunk, dim, device=hidden.device) if dh is not None else None
    modes = dict(UPCAST=upcast_operands(hidden.dtype), PRECISION=dot_precision(hidden.dtype))

    def blocks(name):
        cfg = tiles[name]
        return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                    **modes, **cfg.launch())

    for row_start in range(0, rows, row_chunk):
        chunk_rows = min(row_chunk, rows - row_start)
        for vocab_start in range(0, vocab, vocab_chunk):
            chunk_cols = min(vocab_chunk, vocab - vocab_start)
            cfg = tiles["dlogits"]
            grid = (triton.cdiv(chunk_rows, cfg.block_m) * triton.cdiv(chunk_cols, cfg.block_n),)
            dlogits_kernel[grid](
                hidden, weight, hidden if bias is None else bias, labels, state, grad_rows, order, count, dz,
                row_start, chunk_rows, vocab_start, chunk_cols, dim, vocab, hidden.stride(0), weight.stride(0),
                dz.stride(0), state.stride(0), 1.0 if softcap is None else softcap, 1.0 / temperature,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, EVEN_D=dim % cfg.block_k == 0,
                **blocks("dlogits"),
            )
            if dh is not None:
                cfg = tiles["hidden_grad"]
                grid = (triton.cdiv(chunk_rows, cfg.block_m) * triton.cdiv(dim, cfg.block_n),)
                hidden_grad_kernel[grid](
                    dz, weight, acc, dh, order, count,
                    row_start, chunk_rows, vocab_start, chunk_cols, dim, dz.stride(0), weight.stride(0),
                    acc.stride(0), dh.stride(0),
                    FIRST_CHUNK=vocab_start == 0, LAST_CHUNK=vocab_start + vocab_chunk >= vocab,
                    EVEN_K=chunk_cols % cfg.block_k == 0, EVEN_D=dim % cfg.block_n == 0, **blocks("hidden_grad"),
                )
            if dw is not None or db is not None:
                cfg = tiles["weight_grad"]
                grid = (triton.cdiv(chunk_cols, cfg.block_m) * max(1, triton.cdiv(dim, cfg.block_n)),)
                weight_grad_kernel[grid](
                    dz, hidden, hidden if dw is None else dw, grad_rows if db is None else db, order, count,
                    row_start, chunk_rows, vocab_start, chunk_cols, dim, dz.stride(0), hidden.stride(0),
                    dim,
                    FIRST_CHUNK=row_start == 0, NEED_WEIGHT=dw is not None, NEED_BIAS=db is not None,
                    EVEN_V=chunk_cols % cfg.block_m == 0, EVEN_D=dim % cfg.block_n == 0, **blocks("weight_grad"),
                )
