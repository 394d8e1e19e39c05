// bf16 × bf16 → float32 GEMM for the CPU kernels, on AVX-512 BF16 (vdpbf16ps: products of bf16 pairs, exact in
// float32, accumulated in float32), with float32 output: no bf16 rounding of the result. ATen exports no such
// GEMM (at::mm of bf16 rounds its output to bf16; MKL's bf16 GEMM runs no faster than its float32 one here), so
// this is our own register-blocked kernel: C[m, n] = A[m, k]·B[k, n], A row-major bf16, B packed once per block
// into pairs of k (pack_rows / pack_cols). Every output element is one fixed-order sum over k, so the bits depend
// only on the shapes, never on the thread count or on which thread runs it.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fastpref::cpu::bf16 {

// Whether the CPU runs the kernel (AVX-512 F/BW and BF16), checked once at run time.
bool supported();

// bf16 elements of a packed [k, n] B (columns padded to the panel width, k to even).
int64_t packed_elems(int64_t k, int64_t n);

// Packs B [k, n] given row-major (b[i·ldb + j] = B[i, j]) into `out` (packed_elems(k, n) elements). The packs
// and the GEMMs require supported().
void pack_rows(const c10::BFloat16* b, int64_t ldb, int64_t k, int64_t n, c10::BFloat16* out);

// Packs B [k, n] given as its transpose, row-major (b[j·ldb + i] = B[i, j]) into `out`.
void pack_cols(const c10::BFloat16* b, int64_t ldb, int64_t k, int64_t n, c10::BFloat16* out);

// c[i·ldc + j] = Σ_p A[i, p]·B[p, j] (overwritten) for i < m, j < n; a[i·lda + p] = A[i, p], plus
// a_lo[i·lda + p] when a_lo is not null (A = a + a_lo: a float32 operand split by round_rows, twice the work);
// packed_b from pack_rows / pack_cols with the same k and n. Requires supported().
void gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, const c10::BFloat16* a_lo, int64_t lda,
          const c10::BFloat16* packed_b, float* c, int64_t ldc);

// C = A·B as gemm, A given as pairs of its k: pair_rows(Aᵀ) (a_pairs[(p·m + i)·2 + s] = A[i, 2p + s]), plus
// a_pairs_lo when not null.
void gemm_paired(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a_pairs, const c10::BFloat16* a_pairs_lo,
                 const c10::BFloat16* packed_b, float* c, int64_t ldc);

// out = x [rows, cols] (row stride ldx) rounded to bf16 (nearest even), row-major with row stride ld_out; out_lo
// (may be null) = bf16(x − out), so that out + out_lo carries x to about 16 bits (x finite).
void round_rows(const float* x, int64_t rows, int64_t cols, int64_t ldx, c10::BFloat16* out, c10::BFloat16* out_lo,
                int64_t ld_out);

// A row stride of at least `cols` bf16 elements that is not a multiple of 4 KiB apart from row to row: the
// GEMM reads 12 rows of A (and of its low part) at once, which a 4 KiB stride would map to one set of L1.
inline int64_t staggered_stride(int64_t cols) { return (cols + 31) / 32 * 32 + 16; }

// x [rows, cols] (row stride ldx) rounded to bf16 and interleaved by pairs of rows: out[(p·cols + j)·2 + s] =
// x[2p + s, j] (0 past the last row), 2·ceil(rows / 2)·cols elements — the A operand of gemm_paired for
// A = xᵀ (m = cols, k = rows); out_lo (may be null) the same for what the rounding left.
void pair_rows(const float* x, int64_t rows, int64_t cols, int64_t ldx, c10::BFloat16* out, c10::BFloat16* out_lo);

// How many bf16 GEMMs (gemm, gemm_paired) have run in this process: lets tests see that the native path ran.
int64_t gemm_calls();

}  // namespace fastpref::cpu::bf16
