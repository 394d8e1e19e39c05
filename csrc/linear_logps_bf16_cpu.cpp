// The native bf16 GEMMs of the linear_logps CPU kernels (native_bf16 in linear_logps_cpu.h): the logits GEMM on
// the bf16 rows and weight as they are, and the GEMMs that multiply a float32 tile (softmax gradient, frozen-head
// weights) by the weight or the rows, the tile split into two bf16 parts (high + low, about 16 bits: one bf16
// rounding of the tile, as eager's, missed the 2×eager rule on fuzz cases with cancelling sums). All run
// bf16_gemm_cpu.h's kernel: float32 accumulation and float32 results, single-threaded inside the work item.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "bf16_gemm_cpu.h"
#include "linear_logps_cpu.h"

namespace fastpref::cpu::linear {
namespace {

const c10::BFloat16* bf16_ptr(const at::Tensor& t) {
  return reinterpret_cast<const c10::BFloat16*>(t.data_ptr<at::BFloat16>());
}
c10::BFloat16* bf16_ptr(at::Tensor& t) { return reinterpret_cast<c10::BFloat16*>(t.data_ptr<at::BFloat16>()); }

bool upcast_forced() {
  const char* on = std::getenv("FASTPREF_CPU_UPCAST_BF16");
  return on != nullptr && std::strcmp(on, "1") == 0;
}

}  // namespace

bool native_bf16(at::ScalarType dtype) { return dtype == at::kBFloat16 && bf16::supported() && !upcast_forced(); }

LowScratch low_scratch(const GatheredRows& rows, int64_t tile_rows, int64_t tile_vocab, int64_t dim) {
  if (!rows.low_hidden.defined()) return {};
  const int64_t packed = std::max(bf16::packed_elems(dim, tile_vocab),
                                  bf16::packed_elems(std::min(tile_vocab, kGemmDepth), dim));
  const auto opts = rows.low_hidden.options();
  // the high and low parts of an A operand, the low part staggered against the high one as well
  const int64_t part = (tile_rows + 1) * bf16::staggered_stride(tile_vocab) + 48;
  return {at::empty({packed}, opts), at::empty({2, part}, opts)};
}

void logits_gemm(at::Tensor& logits, const GatheredRows& rows, int64_t r0, const at::Tensor& weight, int64_t v0,
                 const at::Tensor& w_block, LowScratch& low) {
  const int64_t rn = logits.size(0), vn = logits.size(1), dim = weight.size(1);
  if (!rows.low_hidden.defined()) {
    at::mm_out(logits, rows.hidden.narrow(0, r0, rn), w_block.t());
    return;
  }
  bf16::pack_cols(bf16_ptr(weight) + v0 * dim, dim, dim, vn, bf16_ptr(low.packed));
  bf16::gemm(rn, vn, dim, bf16_ptr(rows.low_hidden) + r0 * dim, nullptr, dim, bf16_ptr(low.packed),
             logits.data_ptr<float>(), vn);
}

void tile_times_weight_bf16(const float* tile, int64_t rn, int64_t kn, int64_t ld, const at::Tensor& weight,
                            int64_t v0, at::Tensor& product, LowScratch& low) {
  const int64_t dim = weight.size(1);
  const int64_t lda = bf16::staggered_stride(kn);
  c10::BFloat16* hi = bf16_ptr(low.operand);
  c10::BFloat16* lo = hi + low.operand.size(1);
  bf16::round_rows(tile, rn, kn, ld, hi, lo, lda);
  bf16::pack_rows(bf16_ptr(weight) + v0 * dim, dim, kn, dim, bf16_ptr(low.packed));
  bf16::gemm(rn, dim, kn, hi, lo, lda, bf16_ptr(low.packed), product.data_ptr<float>(), dim);
}

void tile_t_times_rows_bf16(const float* tile, int64_t rn, int64_t vn, const at::Tensor& packed_rows,
                            at::Tensor& product, LowScratch& low) {
  const int64_t dim = product.size(1);
  c10::BFloat16* hi = bf16_ptr(low.operand);
  c10::BFloat16* lo = hi + low.operand.size(1);
  bf16::pair_rows(tile, rn, vn, vn, hi, lo);
  bf16::gemm_paired(vn, dim, rn, hi, lo, bf16_ptr(packed_rows), product.data_ptr<float>(), dim);
}

at::Tensor pack_hidden_rows(const GatheredRows& rows, int64_t r0, int64_t rn) {
  const int64_t dim = rows.low_hidden.size(1);
  at::Tensor packed = at::empty({bf16::packed_elems(rn, dim)}, rows.low_hidden.options());
  bf16::pack_rows(bf16_ptr(rows.low_hidden) + r0 * dim, dim, rn, dim, bf16_ptr(packed));
  return packed;
}

}  // namespace fastpref::cpu::linear
