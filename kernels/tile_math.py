"""Triton building blocks shared by the log-prob kernels: tile coordinates, one tile of raw logits h·Wᵀ for
gathered rows, and the logit transform (bias, softcap, temperature).

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
    """tanh in float32 through exp; exact limits ±1 where exp over- or underflows."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


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
