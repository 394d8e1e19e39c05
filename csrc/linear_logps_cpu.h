// Shared by the files of the linear_logps CPU kernels: linear_logps_cpu.cpp (design notes, checks, forward, op
// registration), linear_logps_backward_cpu.cpp (the backward passes) and linear_logps_bf16_cpu.cpp (the native
// bf16 GEMM calls). Tiling constants and plans, the gathered active rows, the GEMM calls and the backward entry
// point.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastpref::cpu::linear {

constexpr int64_t kRowBlock = 256;                 // active rows per tile
constexpr int64_t kTileElems = 256 * 2048;         // logits per tile: 2 MiB in float32
constexpr int64_t kWeightBlockElems = int64_t{1} << 21;  // upcast weight block ≤ 8 MiB in float32
constexpr int64_t kVocabQuantum = 64;              // vocabulary blocks are multiples of this
constexpr int64_t kGemmDepth = 2048;               // longest float32 dot product of a backward GEMM
constexpr int64_t kForwardItems = 64;              // forward work items to aim for (vocabulary is split to get them)
constexpr int64_t kRowItems = 8;                   // backward dH work items to aim for (row tiles are shortened)
constexpr int64_t kMinRowBlock = 128;              // ... but not below this many rows
constexpr int64_t kFusedGroups = 16;               // fused backward: vocabulary groups (work items) per row tile
constexpr int64_t kUnitBytes = int64_t{16} << 20;  // frozen-head forward: float64 partials of Σ p·W, all segments

struct Tiling {
  int64_t rows;
  int64_t vocab;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiles of `rows` rows (1 <= rows <= kRowBlock) and as many vocabulary entries as the tile and weight-block
// budgets allow, a multiple of kVocabQuantum (or all of V).
inline Tiling plan_tiles(int64_t rows, int64_t vocab, int64_t dim) {
  int64_t cols = std::min(kTileElems / rows, kWeightBlockElems / std::max<int64_t>(dim, 1));
  cols = std::max(kVocabQuantum, cols / kVocabQuantum * kVocabQuantum);
  return {rows, std::min(cols, vocab)};
}

// Row tiles of the forward and of the backward's dW pass: as tall as possible.
inline int64_t tall_row_block(int64_t active_rows) { return std::max<int64_t>(1, std::min(active_rows, kRowBlock)); }

// Row tiles of the backward's dH pass, whose work items are row tiles: short enough to give ~kRowItems items,
// but at least kMinRowBlock rows (shorter tiles make the GEMMs slow) and at most kRowBlock.
inline int64_t short_row_block(int64_t active_rows) {
  const int64_t rows = ceil_div(ceil_div(active_rows, kRowItems), 16) * 16;
  return std::max<int64_t>(1, std::min({std::max(rows, kMinRowBlock), kRowBlock, active_rows}));
}

// The active rows, gathered and upcast; the bias upcast; the labels of the active rows (-1 for a label outside
// [0, V), so that no index arithmetic on a bad label can overflow or land inside the vocabulary).
struct GatheredRows {
  at::Tensor index;     // [n] int64: position of each active row in the input
  at::Tensor hidden;    // [n, D] accumulation type, contiguous
  at::Tensor bias;      // [V] accumulation type, or undefined
  std::vector<int64_t> labels;
  at::Tensor low_hidden;  // [n, D] bf16, contiguous, when the GEMMs run natively in bf16 (native_bf16), else undefined
};

// Whether the GEMMs of `dtype` inputs run natively in bf16 (bf16_gemm_cpu.h: bf16 products accumulated and
// returned in float32, no bf16 rounding of the logits): bf16 inputs on a CPU with AVX-512 BF16, unless
// FASTPREF_CPU_UPCAST_BF16=1 forces the upcast path. Then the logits GEMM reads the bf16 rows and weight as they
// are, and the float32 tiles fed to the other GEMMs (the softmax-gradient tile of dH and dW, the frozen head's
// weights of Σ p·W) are split into two bf16 parts, high + low (about 16 bits; one bf16 rounding, as eager's
// gradient gets, missed the 2×eager rule on cancelling sums), the target entry of the Σ p·W weights added apart
// (see accumulate_products). Otherwise (fp16, fp32, fp64, bf16 on other CPUs) the tiles are upcast to the
// accumulation type and the GEMMs are MKL's.
bool native_bf16(at::ScalarType dtype);

// Per-thread scratch of the native bf16 GEMMs: a packed B operand and the two bf16 parts of an A operand
// (undefined when the GEMMs do not run natively).
struct LowScratch {
  at::Tensor packed, operand;
};
LowScratch low_scratch(const GatheredRows& rows, int64_t tile_rows, int64_t tile_vocab, int64_t dim);

// logits [rn, vn] (accumulation type) = gathered rows r0.. · (weight rows v0..)ᵀ: natively from the bf16 rows
// and weight when rows.low_hidden is defined, else from the upcast block w_block.
void logits_gemm(at::Tensor& logits, const GatheredRows& rows, int64_t r0, const at::Tensor& weight, int64_t v0,
                 const at::Tensor& w_block, LowScratch& low);

// product [rn, D] (float) = tile [rn, kn] (float, row stride ld) · weight rows v0.. [kn, D], natively: the tile
// split into bf16 high and low parts, the bf16 weight packed.
void tile_times_weight_bf16(const float* tile, int64_t rn, int64_t kn, int64_t ld, const at::Tensor& weight,
                            int64_t v0, at::Tensor& product, LowScratch& low);

// product [vn, D] (float) = tileᵀ · rows: tile [rn, vn] (float, row stride vn) split in two bf16 parts, packed_rows the
// bf16 rows [rn, D] packed (pack_hidden_rows).
void tile_t_times_rows_bf16(const float* tile, int64_t rn, int64_t vn, const at::Tensor& packed_rows,
                            at::Tensor& product, LowScratch& low);

// The bf16 gathered rows [r0, r0 + rn) packed as the B operand of tile_t_times_rows_bf16.
at::Tensor pack_hidden_rows(const GatheredRows& rows, int64_t r0, int64_t rn);

// Rows [start, start + count) of the contiguous weight in the accumulation type: a view when no upcast is
// needed, else a copy into `buffer`.
inline at::Tensor weight_block(const at::Tensor& weight, int64_t start, int64_t count, at::Tensor& buffer) {
  at::Tensor block = weight.narrow(0, start, count);
  if (!buffer.defined()) return block;
  at::Tensor upcast = buffer.narrow(0, 0, count * weight.size(1)).view({count, weight.size(1)});
  upcast.copy_(block);
  return upcast;
}

// What the backward needs per gathered row, in the accumulation type: the forward's row max and
// log Σ exp(z − max) (kept apart: p = exp((z − max) − log_sum) is exact to the dtype) and g / T.
template <typename acc_t>
struct RowStats {
  std::vector<acc_t> max, log_sum, grad_scale;
};

// The backward over the gathered rows (linear_logps_backward_cpu.cpp). dhidden_rows: [n, D] float64 zeros or
// undefined; dweight: [V, D] zeros in the weight's dtype or undefined; dbias: [V] zeros in the bias dtype or
// undefined.
void backward_rows(const GatheredRows& rows, const at::Tensor& weight, const RowStats<float>& stats,
                   double temperature, double softcap, at::Tensor& dhidden_rows, at::Tensor& dweight,
                   at::Tensor& dbias);
void backward_rows(const GatheredRows& rows, const at::Tensor& weight, const RowStats<double>& stats,
                   double temperature, double softcap, at::Tensor& dhidden_rows, at::Tensor& dweight,
                   at::Tensor& dbias);

}  // namespace fastpref::cpu::linear
