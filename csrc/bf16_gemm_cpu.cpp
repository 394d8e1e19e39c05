// bf16 × bf16 → float32 GEMM on AVX-512 BF16; see bf16_gemm_cpu.h. Layout of a packed B: panels of kPanel
// columns; inside a panel, for each pair p of k, kPanel 32-bit words (B[2p, j], B[2p + 1, j]) — the operand
// vdpbf16ps multiplies by a broadcast pair (A[i, 2p], A[i, 2p + 1]). Padding (columns ≥ n, the k row of an odd
// k) is zero, and the A element that would pair with the padded k row is read as zero, so that neither can
// turn an Inf or NaN of A into a stray NaN.
#include "bf16_gemm_cpu.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTPREF_BF16_KERNEL 1
#include <immintrin.h>
#define FASTPREF_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define FASTPREF_BF16_KERNEL 0
#endif

namespace fastpref::cpu::bf16 {
namespace {

constexpr int64_t kPanel = 32;  // columns per panel: two 16-lane float32 accumulators per row
constexpr int kRows = 12;       // rows per register block: 24 accumulators
constexpr int64_t kDepthPairs = 128;  // pairs of k per pass over a panel: its slice (16 KiB) stays in L1

uint16_t bits(c10::BFloat16 x) { return x.x; }

int64_t pairs(int64_t k) { return (k + 1) / 2; }

std::atomic<int64_t> calls{0};

#if FASTPREF_BF16_KERNEL
// A[row, 2p..2p+1] as one 32-bit word; at the end of an odd k only A[row, k − 1] (high half zero).
FASTPREF_TARGET_BF16 inline int32_t a_pair(const uint16_t* row, int64_t p, int64_t k) {
  if (2 * p + 1 < k) {
    int32_t word;
    std::memcpy(&word, row + 2 * p, sizeof(word));
    return word;
  }
  return int32_t(row[2 * p]);
}

// The pair (A[i, 2p], A[i, 2p + 1]) as one 32-bit word, from a row-major A (Rows) or from a pair-major word
// array (Pairs: word p·ld + i, as pair_rows writes it).
struct RowsA {
  static constexpr bool kSplit = false;
  const uint16_t* a;
  int64_t lda, k;
  FASTPREF_TARGET_BF16 int32_t operator()(int64_t i, int64_t p) const { return a_pair(a + i * lda, p, k); }
  RowsA shifted(int64_t i0) const { return {a + i0 * lda, lda, k}; }
};
struct PairsA {
  static constexpr bool kSplit = false;
  const int32_t* a;
  int64_t ld;
  FASTPREF_TARGET_BF16 int32_t operator()(int64_t i, int64_t p) const { return a[p * ld + i]; }
  PairsA shifted(int64_t i0) const { return {a + i0, ld}; }
};
// A as the sum of two bf16 operands (a float32 tile split into bf16 high and low parts): both multiply B.
template <typename A>
struct SplitA {
  static constexpr bool kSplit = true;
  A hi, lo;
  FASTPREF_TARGET_BF16 int32_t operator()(int64_t i, int64_t p) const { return hi(i, p); }
  FASTPREF_TARGET_BF16 int32_t low(int64_t i, int64_t p) const { return lo(i, p); }
  SplitA shifted(int64_t i0) const { return {hi.shifted(i0), lo.shifted(i0)}; }
};

// c[0..R)[0..n) (+)= A rows [R, pairs p0..p1) · the same pairs of one packed panel; n ≤ kPanel columns stored,
// added to what c holds unless p0 = 0.
template <int R, typename A>
FASTPREF_TARGET_BF16 void block(const A& a, const uint16_t* panel, int64_t p0, int64_t p1, float* c, int64_t ldc,
                                int64_t n) {
  const __mmask16 m0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? __mmask16(0xFFFF) : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1);
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = p0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, c + r * ldc);
    acc[r][1] = p0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, c + r * ldc + 16);
  }
  for (int64_t p = p0; p < p1; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * kPanel + kPanel);
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(a(r, p));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
      if constexpr (A::kSplit) {
        const __m512bh y = (__m512bh)_mm512_set1_epi32(a.low(r, p));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], y, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], y, b1);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc[r][0]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc[r][1]);
  }
}

template <int R, typename A>
void block_rows(int rows, const A& a, const uint16_t* panel, int64_t p0, int64_t p1, float* c, int64_t ldc,
                int64_t n) {
  if constexpr (R > 1) {
    if (rows < R) return block_rows<R - 1>(rows, a, panel, p0, p1, c, ldc, n);
  }
  block<R>(a, panel, p0, p1, c, ldc, n);
}

// Panels outer, then slices of kDepthPairs pairs of k, register blocks of rows inner: the panel's slice stays in
// L1 while all rows of A pass over it. Each output element sums its k in order, slice after slice.
template <typename A>
void gemm_impl(int64_t m, int64_t n, int64_t k, const A& a, const uint16_t* b, float* c, int64_t ldc) {
  const int64_t np = pairs(k), panel_elems = np * 2 * kPanel;
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const uint16_t* panel = b + j0 / kPanel * panel_elems;
    const int64_t width = std::min(kPanel, n - j0);
    for (int64_t p0 = 0; p0 < np; p0 += kDepthPairs) {
      const int64_t p1 = std::min(np, p0 + kDepthPairs);
      for (int64_t i0 = 0; i0 < m; i0 += kRows) {
        const int rows = int(std::min<int64_t>(kRows, m - i0));
        block_rows<kRows>(rows, a.shifted(i0), panel, p0, p1, c + i0 * ldc + j0, ldc, width);
      }
    }
  }
}

// bf16 of 16 floats, and of what that rounding left (x − bf16(x), exact in float32).
FASTPREF_TARGET_BF16 inline __m256i round16(__m512 x, __m256i* low) {
  const __m256i hi = (__m256i)_mm512_cvtneps_pbh(x);
  const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
  *low = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, back));
  return hi;
}

uint16_t low_part(float x, uint16_t hi) {
  uint32_t word = uint32_t(hi) << 16;
  float back;
  std::memcpy(&back, &word, sizeof(back));
  return bits(c10::BFloat16(x - back));
}

// out[j] = bf16(x[j]), out_lo[j] = bf16(x[j] − out[j]) (out_lo may be null), j < n.
FASTPREF_TARGET_BF16 void round_row(const float* x, int64_t n, uint16_t* out, uint16_t* out_lo) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256i lo;
    const __m256i hi = round16(_mm512_loadu_ps(x + j), &lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), hi);
    if (out_lo != nullptr) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_lo + j), lo);
  }
  for (; j < n; ++j) {
    out[j] = bits(c10::BFloat16(x[j]));
    if (out_lo != nullptr) out_lo[j] = low_part(x[j], out[j]);
  }
}

// out[2j] = bf16(lo[j]), out[2j + 1] = bf16(hi[j]) (0 without hi), j < n; out_lo (may be null) the same for
// what the rounding left.
FASTPREF_TARGET_BF16 void pair_row(const float* lo, const float* hi, int64_t n, uint16_t* out, uint16_t* out_lo) {
  int64_t j = 0;
  if (hi != nullptr) {
    for (; j + 16 <= n; j += 16) {
      __m256i l_rest, h_rest;
      const __m512i l = _mm512_cvtepu16_epi32(round16(_mm512_loadu_ps(lo + j), &l_rest));
      const __m512i h = _mm512_cvtepu16_epi32(round16(_mm512_loadu_ps(hi + j), &h_rest));
      _mm512_storeu_si512(out + 2 * j, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
      if (out_lo != nullptr) {
        const __m512i lr = _mm512_cvtepu16_epi32(l_rest), hr = _mm512_cvtepu16_epi32(h_rest);
        _mm512_storeu_si512(out_lo + 2 * j, _mm512_or_si512(lr, _mm512_slli_epi32(hr, 16)));
      }
    }
  }
  for (; j < n; ++j) {
    out[2 * j] = bits(c10::BFloat16(lo[j]));
    out[2 * j + 1] = hi != nullptr ? bits(c10::BFloat16(hi[j])) : 0;
    if (out_lo != nullptr) {
      out_lo[2 * j] = low_part(lo[j], out[2 * j]);
      out_lo[2 * j + 1] = hi != nullptr ? low_part(hi[j], out[2 * j + 1]) : 0;
    }
  }
}

// One pair of rows of pack_rows into one panel row: dst[2j] = lo[j], dst[2j + 1] = hi[j] (0 without hi) for
// j < width, zeros up to kPanel.
FASTPREF_TARGET_BF16 void pack_pair(const uint16_t* lo, const uint16_t* hi, int64_t width, uint16_t* dst) {
  for (int64_t j = 0; j < kPanel; j += 16) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, width - j));
    const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, lo + j));
    const __m512i h = hi != nullptr ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, hi + j))
                                    : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + 2 * j, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
  }
}

// One panel of pack_cols: source rows j < width (b[j·ldb + i] = B[i, j]), whole pairs of k gathered 16 rows at
// a time, the last pair of an odd k (whose second element lies outside the row) and the padding set one by one.
FASTPREF_TARGET_BF16 void pack_cols_panel(const uint16_t* b, int64_t ldb, int64_t k, int64_t width, uint16_t* panel) {
  const int64_t whole = k / 2;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i stride = _mm512_set1_epi32(int32_t(ldb));  // pack_cols checks that 15·ldb fits
  for (int h = 0; h < 2; ++h) {
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(16, width - 16 * h));
    const __mmask16 mask = rows >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rows) - 1);
    const __m512i index = _mm512_mullo_epi32(lane, stride);
    const uint16_t* src = b + 16 * h * ldb;
    for (int64_t p = 0; p < whole; ++p) {
      const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, index, src + 2 * p, 2);
      _mm512_storeu_si512(panel + p * 2 * kPanel + 32 * h, words);
    }
  }
  if (k % 2 != 0) {
    uint16_t* dst = panel + whole * 2 * kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      dst[2 * j] = j < width ? b[j * ldb + k - 1] : 0;
      dst[2 * j + 1] = 0;
    }
  }
}
#endif

}  // namespace

bool supported() {
#if FASTPREF_BF16_KERNEL
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

int64_t packed_elems(int64_t k, int64_t n) { return (n + kPanel - 1) / kPanel * pairs(k) * 2 * kPanel; }

void pack_rows(const c10::BFloat16* b_in, int64_t ldb, int64_t k, int64_t n, c10::BFloat16* out_in) {
  TORCH_CHECK(supported(), "fastpref: the bf16 GEMM needs a CPU with AVX-512 BF16");
#if FASTPREF_BF16_KERNEL
  const uint16_t* b = reinterpret_cast<const uint16_t*>(b_in);
  uint16_t* out = reinterpret_cast<uint16_t*>(out_in);
  const int64_t np = pairs(k);
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t width = std::min(kPanel, n - j0);
    for (int64_t p = 0; p < np; ++p) {
      const uint16_t* lo = b + 2 * p * ldb + j0;
      pack_pair(lo, 2 * p + 1 < k ? lo + ldb : nullptr, width, out + (j0 / kPanel * np + p) * 2 * kPanel);
    }
  }
#endif
}

void pack_cols(const c10::BFloat16* b_in, int64_t ldb, int64_t k, int64_t n, c10::BFloat16* out_in) {
  TORCH_CHECK(supported(), "fastpref: the bf16 GEMM needs a CPU with AVX-512 BF16");
#if FASTPREF_BF16_KERNEL
  const uint16_t* b = reinterpret_cast<const uint16_t*>(b_in);
  TORCH_CHECK(ldb < (int64_t{1} << 26), "fastpref: bf16 pack_cols: row stride ", ldb, " too large");
  uint16_t* out = reinterpret_cast<uint16_t*>(out_in);
  const int64_t np = pairs(k);
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t width = std::min(kPanel, n - j0);
    pack_cols_panel(b + j0 * ldb, ldb, k, width, out + j0 / kPanel * np * 2 * kPanel);
  }
#endif
}

void gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, const c10::BFloat16* a_lo, int64_t lda,
          const c10::BFloat16* packed_b, float* c, int64_t ldc) {
  TORCH_CHECK(supported(), "fastpref: the bf16 GEMM needs a CPU with AVX-512 BF16");
#if FASTPREF_BF16_KERNEL
  calls.fetch_add(1, std::memory_order_relaxed);
  const uint16_t* b = reinterpret_cast<const uint16_t*>(packed_b);
  const RowsA hi{reinterpret_cast<const uint16_t*>(a), lda, k};
  if (a_lo == nullptr) return gemm_impl(m, n, k, hi, b, c, ldc);
  gemm_impl(m, n, k, SplitA<RowsA>{hi, {reinterpret_cast<const uint16_t*>(a_lo), lda, k}}, b, c, ldc);
#endif
}

void gemm_paired(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a_pairs, const c10::BFloat16* a_pairs_lo,
                 const c10::BFloat16* packed_b, float* c, int64_t ldc) {
  TORCH_CHECK(supported(), "fastpref: the bf16 GEMM needs a CPU with AVX-512 BF16");
#if FASTPREF_BF16_KERNEL
  calls.fetch_add(1, std::memory_order_relaxed);
  const uint16_t* b = reinterpret_cast<const uint16_t*>(packed_b);
  const PairsA hi{reinterpret_cast<const int32_t*>(a_pairs), m};
  if (a_pairs_lo == nullptr) return gemm_impl(m, n, k, hi, b, c, ldc);
  gemm_impl(m, n, k, SplitA<PairsA>{hi, {reinterpret_cast<const int32_t*>(a_pairs_lo), m}}, b, c, ldc);
#endif
}

void round_rows(const float* x, int64_t rows, int64_t cols, int64_t ldx, c10::BFloat16* out_in,
                c10::BFloat16* out_lo_in, int64_t ld_out) {
  TORCH_CHECK(supported(), "fastpref: the bf16 GEMM needs a CPU with AVX-512 BF16");
#if FASTPREF_BF16_KERNEL
  uint16_t* out = reinterpret_cast<uint16_t*>(out_in);
  uint16_t* out_lo = reinterpret_cast<uint16_t*>(out_lo_in);
  for (int64_t i = 0; i < rows; ++i) {
    round_row(x + i * ldx, cols, out + i * ld_out, out_lo != nullptr ? out_lo + i * ld_out : nullptr);
  }
#endif
}

void pair_rows(const float* x, int64_t rows, int64_t cols, int64_t ldx, c10::BFloat16* out_in,
               c10::BFloat16* out_lo_in) {
  TORCH_CHECK(supported(), "fastpref: the bf16 GEMM needs a CPU with AVX-512 BF16");
#if FASTPREF_BF16_KERNEL
  uint16_t* out = reinterpret_cast<uint16_t*>(out_in);
  uint16_t* out_lo = reinterpret_cast<uint16_t*>(out_lo_in);
  for (int64_t p = 0; p < pairs(rows); ++p) {
    const float* lo = x + 2 * p * ldx;
    pair_row(lo, 2 * p + 1 < rows ? lo + ldx : nullptr, cols, out + 2 * p * cols,
             out_lo != nullptr ? out_lo + 2 * p * cols : nullptr);
  }
#endif
}

int64_t gemm_calls() { return calls.load(std::memory_order_relaxed); }

}  // namespace fastpref::cpu::bf16
