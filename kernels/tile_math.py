"""Triton building blocks shared by the log-prob kernels: tile coordinates, one tile of raw logits h·Wᵀ for
gathered rows, the logit transform (bias, softcap, temperature), an accurate tanh and log1p, and the online
softmax step (running max and the rest of the sum, kept apart).

Logits of a row: z = h·Wᵀ (+ b); with a softcap c, z = c·tanh(z / c); then z = z / T. The softcap's derivative
is 1 − tanh²(z / c), which the backward needs, so the transform returns tanh as well.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(tile_m, tile_n) of program `pid` in a 1-D grid, walking GROUP_M row tiles at a time so that programs
    running together share their operand tiles in L2 (the ordering of the Triton matmul tutorial)."""
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    return tile_m, tile_n


@triton.jit
def tanh_f32(x):
    """tanh in float32, within a few ulp over the whole range.

    |x| < 0.5: the Taylor series x − x³/3 + 2x⁵/15 − … through x¹⁷ (coefficients 2²ⁿ(2²ⁿ−1)B₂ₙ/(2n)!; the first
    omitted term is below 2e-9 relative), so a large softcap (x = raw / c ≪ 1) keeps z = c·tanh(x) at
    float32 precision instead of the cancellation in 1 − 2/(e^{2x}+1). |x| ≥ 0.5: 1 − 2/(e^{2|x|}+1), which
    cancels by less than a factor 1.2 there and reaches exactly 1 where the exponential overflows.
    """
    a = tl.abs(x)
    u = a * a
    series = -0.00023912911424355248 * u + 0.000590027440945586
    series = series * u - 0.0014558343870513183
    series = series * u + 0.003592128036572481
    series = series * u - 0.008863235529902197
    series = series * u + 0.021869488536155203
    series = series * u - 0.05396825396825397
    series = series * u + 0.13333333333333333
    series = series * u - 0.3333333333333333
    small = a + a * u * series
    large = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    t = tl.where(a < 0.5, small, large)
    return tl.where(x < 0, -t, t)


@triton.jit
def log1p_f32(x):
    """log(1 + x) for x ≥ 0, accurate for tiny x: log(u)·x/(u − 1) with u = 1 + x (Goldberg's correction of
    the rounding of u), x itself where u rounds to 1."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def online_softmax_step(z, running_max, running_rest, BLOCK_N: tl.constexpr):
    """Fold a [BLOCK_M, BLOCK_N] tile of logits z (−inf at masked columns) into a row's running max m and
    running *rest* r = Σ_v e^{z_v − m} − 1, the sum of every term but one maximal one (that term is exactly 1).

    Keeping r instead of the sum s = 1 + r keeps log s = log1p(r) exact to float32 when the row is near one-hot
    (s rounds to 1 long before r loses precision). Returns (new max, new rest, rescale = e^{m_old − m_new},
    e = e^{z − m_new}, grows: the tile holds the new max, drop: the one position of that max in the tile,
    tile argmax: first index of the tile's max).
    """
    tile_max, tile_arg = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
    new_max = tl.maximum(running_max, tile_max)
    grows = tile_max > running_max
    rescale = tl.exp(running_max - new_max)
    e = tl.exp(z - new_max[:, None])
    drop = grows[:, None] & (tl.arange(0, BLOCK_N)[None, :] == tile_arg[:, None])
    rest = tl.where(grows, (1.0 + running_rest) * rescale, running_rest) + tl.sum(tl.where(drop, 0.0, e), axis=1)
    return new_max, rest, rescale, e, grows, drop, tile_arg


@triton.jit
def raw_logits_tile(h_ptr, stride_h, rows, rows_ok, w_ptr, stride_w, cols, cols_ok, D,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """float32 [BLOCK_M, BLOCK_N] tile of hidden[rows] · weight[cols]ᵀ, accumulated over D in BLOCK_K steps.

    `rows` / `cols` are int64 row indices of hidden / weight; masked-out rows and columns read zeros. EVEN_K
    (D % BLOCK_K == 0) drops the mask along D: a mask on the contiguous dimension stops Triton from turning the
    loads into pipelined 16-byte cp.async copies (seen in the sm_90 PTX). UPCAST converts the operands to
    float32 before the product (the interpreter's bf16 dot is wrong); PRECISION is tl.dot's input_precision
    ("ieee" keeps float32 inputs exact instead of tf32).
    """
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows[:, None] * stride_h
    w_rows = w_ptr + cols[:, None] * stride_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            h = tl.load(h_rows + k[None, :], mask=rows_ok[:, None], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=cols_ok[:, None], other=0.0)
        else:
            k_ok = k < D
            h = tl.load(h_rows + k[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=cols_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def transform_logits(raw, b_ptr, cols, cols_ok, softcap, inv_temperature,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(z, tanh) for a raw tile: add the bias, cap, divide by the temperature. `tanh` is tanh(raw / softcap)
    (a placeholder equal to `raw` without a softcap; the caller then ignores it)."""
    if HAS_BIAS:
        raw = raw + tl.load(b_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
    tanh = raw
    z = raw
    if HAS_SOFTCAP:
        tanh = tanh_f32(raw / softcap)
        z = softcap * tanh
    return z * inv_temperature, tanh
