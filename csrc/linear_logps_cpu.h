// Shared by the two files of the linear_logps CPU kernels: linear_logps_cpu.cpp (design notes, checks,
// forward, op registration) and linear_logps_backward_cpu.cpp (the backward passes). Tiling constants and
// plans, the gathered active rows, and the backward entry point.
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
  at::Tensor low_hidden;  // [n, D] in the input dtype when the logits GEMMs run natively in it, else undefined
};

// Whether the logits GEMMs h·Wᵀ of `dtype` inputs run natively in it: bf16 on a CPU with AVX-512 BF16 or AMX
// (oneDNN: bf16 products accumulated in float32, the result rounded to bf16 once — exactly the logits eager bf16
// computes), when FASTPREF_CPU_NATIVE_BF16=1 (opt-in). Otherwise (and for fp16, fp32, fp64) tiles are upcast to the
// accumulation type. The dH, dW and Σ p·W GEMMs always run in the accumulation type.
bool native_low_precision_logits(at::ScalarType dtype);

// Per-thread scratch for native logits GEMMs (undefined when they do not run natively).
inline at::Tensor low_precision_tile(const GatheredRows& rows, int64_t elems) {
  return rows.low_hidden.defined() ? at::empty({elems}, rows.low_hidden.options()) : at::Tensor();
}

// logits [rn, vn] (accumulation type) = gathered rows r0.. · (weight rows v0..)ᵀ: natively in the input dtype
// into low_tile and then upcast when rows.low_hidden is defined, else from the upcast block w_block.
inline void logits_gemm(at::Tensor& logits, const GatheredRows& rows, int64_t r0, const at::Tensor& weight,
                        int64_t v0, const at::Tensor& w_block, at::Tensor& low_tile) {
  const int64_t rn = logits.size(0), vn = logits.size(1);
  if (!rows.low_hidden.defined()) {
    at::mm_out(logits, rows.hidden.narrow(0, r0, rn), w_block.t());
    return;
  }
  at::Tensor low = low_tile.narrow(0, 0, rn * vn).view({rn, vn});
  at::mm_out(low, rows.low_hidden.narrow(0, r0, rn), weight.narrow(0, v0, vn).t());
  logits.copy_(low);
}

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
