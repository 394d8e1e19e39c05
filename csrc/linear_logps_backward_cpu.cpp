// Backward passes of the linear_logps CPU kernels: dH, dW and db from recomputed logits tiles. The design
// (tiling, work items, determinism) is described at the top of linear_logps_cpu.cpp; the accuracy measures at
// backward_rows_impl below.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "linear_logps_cpu.h"
#include "logps_cpu_rows.h"

namespace fastpref::cpu::linear {
namespace {

// What the backward needs per active row, and the scalars of the op.
template <typename acc_t>
struct BackwardProblem {
  const GatheredRows& rows;
  const at::Tensor& weight;            // [V, D] contiguous, input dtype
  const RowStats<acc_t>& stats;        // row max, log-sum and g_t / T per active row
  acc_t cap, cap_k, inv_temperature;   // softcap (0 = none), T / softcap (0 = none), 1 / T

  // Raw tile [rn, vn] (rows r0.., vocabulary v0..) -> ∂/∂a = (onehot(y) − p)·g/T·(1 − tanh²), in place.
  void grad_tile(acc_t* base, int64_t rn, int64_t vn, int64_t r0, int64_t v0) const {
    const acc_t* bias = rows.bias.defined() ? rows.bias.template data_ptr<acc_t>() + v0 : nullptr;
    for (int64_t i = 0; i < rn; ++i) {
      acc_t* z = base + i * vn;
      const int64_t row = r0 + i;
      cap_and_temper(z, vn, bias, cap, inv_temperature);
      // labels are -1 or in [0, V): no overflow, and -1 adds no one-hot term
      const int64_t local = rows.labels[row] >= 0 ? rows.labels[row] - v0 : -1;
      softmax_grad(z, vn, stats.max[row], stats.log_sum[row], stats.grad_scale[row], cap_k, local);
    }
  }

  bool native() const { return rows.low_hidden.defined(); }

  // product [rn, D] = tile columns k0.. [rn, kn] · weight rows v0 + k0..: natively (the tile split in two bf16
  // parts) or from the upcast block w_block.
  void times_weight(const at::Tensor& tile, int64_t k0, int64_t kn, int64_t v0, const at::Tensor& w_block,
                    at::Tensor& product, LowScratch& low) const {
    if (native()) {
      tile_times_weight_bf16(tile.data_ptr<float>() + k0, tile.size(0), kn, tile.size(1), weight, v0 + k0, product,
                             low);
    } else {
      at::mm_out(product, tile.narrow(1, k0, kn), w_block.narrow(0, k0, kn));
    }
  }

  // product [vn, D] = tileᵀ · gathered rows r0.. [rn, D]: natively (the tile split in two bf16 parts, packed_rows from
  // pack_hidden_rows) or on the upcast rows.
  void t_times_rows(const at::Tensor& tile, int64_t r0, const at::Tensor& packed_rows, at::Tensor& product,
                    LowScratch& low) const {
    if (native()) {
      tile_t_times_rows_bf16(tile.data_ptr<float>(), tile.size(0), tile.size(1), packed_rows, product, low);
    } else {
      at::mm_out(product, tile.t(), rows.hidden.narrow(0, r0, tile.size(0)));
    }
  }

  // The B operands of t_times_rows for the row tiles of `rows_per_tile` rows (empty unless native).
  std::vector<at::Tensor> packed_row_tiles(int64_t rows_per_tile) const {
    std::vector<at::Tensor> packed;
    const int64_t n = rows.hidden.size(0);
    for (int64_t r0 = 0; native() && r0 < n; r0 += rows_per_tile) {
      packed.push_back(pack_hidden_rows(rows, r0, std::min(rows_per_tile, n - r0)));
    }
    return packed;
  }
};

// dH of the active rows into dhidden_rows ([n, D] float64). Work items: row tiles, each walking the whole
// vocabulary on its own thread; item i owns rows of tile i, so nothing is shared.
template <typename acc_t>
void backward_hidden(const BackwardProblem<acc_t>& p, at::Tensor& dhidden_rows) {
  const at::Tensor& hidden = p.rows.hidden;
  const int64_t n = hidden.size(0);
  const int64_t vocab = p.weight.size(0);
  const int64_t dim = p.weight.size(1);
  const Tiling tiling = plan_tiles(short_row_block(n), vocab, dim);
  const auto opts = hidden.options();
  const bool upcast = p.weight.scalar_type() != hidden.scalar_type() && !p.native();
  double* dh = dhidden_rows.data_ptr<double>();
  at::parallel_for(0, ceil_div(n, tiling.rows), 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch state is per thread
    at::Tensor tile = at::empty({tiling.rows * tiling.vocab}, opts);
    at::Tensor weight_buffer = upcast ? at::empty({tiling.vocab * dim}, opts) : at::Tensor();
    at::Tensor product = at::empty({tiling.rows, dim}, opts);
    LowScratch low = low_scratch(p.rows, tiling.rows, tiling.vocab, dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r0 = item * tiling.rows;
      const int64_t rn = std::min(tiling.rows, n - r0);
      at::Tensor rows_product = product.narrow(0, 0, rn);
      const acc_t* prod = rows_product.data_ptr<acc_t>();
      for (int64_t v0 = 0; v0 < vocab; v0 += tiling.vocab) {
        const int64_t vn = std::min(tiling.vocab, vocab - v0);
        const at::Tensor w_block = p.native() ? at::Tensor() : weight_block(p.weight, v0, vn, weight_buffer);
        at::Tensor logits = tile.narrow(0, 0, rn * vn).view({rn, vn});
        logits_gemm(logits, p.rows, r0, p.weight, v0, w_block, low);
        p.grad_tile(logits.data_ptr<acc_t>(), rn, vn, r0, v0);
        for (int64_t k0 = 0; k0 < vn; k0 += kGemmDepth) {
          const int64_t kn = std::min(kGemmDepth, vn - k0);
          p.times_weight(logits, k0, kn, v0, w_block, rows_product, low);
          for (int64_t j = 0; j < rn * dim; ++j) dh[r0 * dim + j] += prod[j];
        }
      }
    }
  });
}

// dW and/or db. Work items: vocabulary blocks, each walking all active rows on its own thread; item i owns
// the dW rows and db entries of block i, accumulated in float64 in a fixed order, then cast into the output.
template <typename acc_t>
void backward_weight(const BackwardProblem<acc_t>& p, at::Tensor& dweight, at::Tensor& dbias) {
  const at::Tensor& hidden = p.rows.hidden;
  const int64_t n = hidden.size(0);
  const int64_t vocab = p.weight.size(0);
  const int64_t dim = p.weight.size(1);
  const Tiling tiling = plan_tiles(tall_row_block(n), vocab, dim);
  const auto opts = hidden.options();
  const bool upcast = p.weight.scalar_type() != hidden.scalar_type() && !p.native();
  const std::vector<at::Tensor> packed_rows =
      dweight.defined() ? p.packed_row_tiles(tiling.rows) : std::vector<at::Tensor>();
  at::parallel_for(0, ceil_div(vocab, tiling.vocab), 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch state is per thread
    at::Tensor tile = at::empty({tiling.rows * tiling.vocab}, opts);
    at::Tensor weight_buffer = upcast ? at::empty({tiling.vocab * dim}, opts) : at::Tensor();
    at::Tensor product = dweight.defined() ? at::empty({tiling.vocab, dim}, opts) : at::Tensor();
    at::Tensor dw_acc = dweight.defined() ? at::empty({tiling.vocab, dim}, opts.dtype(at::kDouble)) : at::Tensor();
    at::Tensor db_acc = dbias.defined() ? at::empty({tiling.vocab}, opts.dtype(at::kDouble)) : at::Tensor();
    LowScratch low = low_scratch(p.rows, tiling.rows, tiling.vocab, dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t v0 = item * tiling.vocab;
      const int64_t vn = std::min(tiling.vocab, vocab - v0);
      // only the logits GEMM reads the weight here: no upcast block when it runs natively
      const at::Tensor w_block = p.native() ? at::Tensor() : weight_block(p.weight, v0, vn, weight_buffer);
      double* dw = dweight.defined() ? dw_acc.data_ptr<double>() : nullptr;
      double* db = dbias.defined() ? db_acc.data_ptr<double>() : nullptr;
      if (dw != nullptr) std::fill(dw, dw + vn * dim, 0.0);
      if (db != nullptr) std::fill(db, db + vn, 0.0);
      for (int64_t r0 = 0; r0 < n; r0 += tiling.rows) {
        const int64_t rn = std::min(tiling.rows, n - r0);
        at::Tensor logits = tile.narrow(0, 0, rn * vn).view({rn, vn});
        logits_gemm(logits, p.rows, r0, p.weight, v0, w_block, low);
        acc_t* base = logits.data_ptr<acc_t>();
        p.grad_tile(base, rn, vn, r0, v0);
        if (dw != nullptr) {
          at::Tensor block_product = product.narrow(0, 0, vn);
          const at::Tensor packed = p.native() ? packed_rows[r0 / tiling.rows] : at::Tensor();
          p.t_times_rows(logits, r0, packed, block_product, low);
          const acc_t* prod = block_product.data_ptr<acc_t>();
          for (int64_t j = 0; j < vn * dim; ++j) dw[j] += prod[j];
        }
        if (db != nullptr) {
          for (int64_t i = 0; i < rn; ++i) {
            for (int64_t j = 0; j < vn; ++j) db[j] += base[i * vn + j];
          }
        }
      }
      if (dw != nullptr) dweight.narrow(0, v0, vn).copy_(dw_acc.narrow(0, 0, vn));
      if (db != nullptr) dbias.narrow(0, v0, vn).copy_(db_acc.narrow(0, 0, vn));
    }
  });
}

// dH together with dW and/or db, in one pass over the tiles (three GEMMs per tile, not four). Row tiles are
// walked in order, one parallel region each; its items are kFusedGroups fixed groups of vocabulary blocks.
// An item owns the dW rows and db entries of its blocks (accumulated across row tiles in the accumulation
// type: float32 for fp16/bf16/fp32) and writes its share of the tile's dH into its own partial; the partials
// are then added to dH in group order. Groups depend only on the shapes, so the bits do not depend on the
// thread count.
template <typename acc_t>
void backward_fused(const BackwardProblem<acc_t>& p, at::Tensor& dhidden_rows, at::Tensor& dweight,
                    at::Tensor& dbias) {
  const at::Tensor& hidden = p.rows.hidden;
  const int64_t n = hidden.size(0);
  const int64_t vocab = p.weight.size(0);
  const int64_t dim = p.weight.size(1);
  const Tiling tiling = plan_tiles(tall_row_block(n), vocab, dim);
  const int64_t vocab_blocks = ceil_div(vocab, tiling.vocab);
  const int64_t blocks_per_group = ceil_div(vocab_blocks, std::min(vocab_blocks, kFusedGroups));
  const int64_t groups = ceil_div(vocab_blocks, blocks_per_group);
  const auto opts = hidden.options();
  const bool upcast = p.weight.scalar_type() != hidden.scalar_type() && !p.native();
  // dW accumulates in place when the weight already has the accumulation dtype, else in a float32 copy.
  const bool dweight_direct = dweight.defined() && dweight.scalar_type() == hidden.scalar_type();
  at::Tensor dw_acc = !dweight.defined() ? at::Tensor() : dweight_direct ? dweight : at::zeros({vocab, dim}, opts);
  at::Tensor db_acc = dbias.defined() ? at::zeros({vocab}, opts.dtype(at::kDouble)) : at::Tensor();
  at::Tensor partials = at::empty({groups, tiling.rows, dim}, opts);
  double* dh = dhidden_rows.data_ptr<double>();

  for (int64_t r0 = 0; r0 < n; r0 += tiling.rows) {
    const int64_t rn = std::min(tiling.rows, n - r0);
    const at::Tensor packed_rows =
        p.native() && dweight.defined() ? pack_hidden_rows(p.rows, r0, rn) : at::Tensor();
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch state is per thread
      at::Tensor tile = at::empty({tiling.rows * tiling.vocab}, opts);
      at::Tensor weight_buffer = upcast ? at::empty({tiling.vocab * dim}, opts) : at::Tensor();
      at::Tensor dh_product = at::empty({rn, dim}, opts);
      at::Tensor dw_product = dweight.defined() ? at::empty({tiling.vocab, dim}, opts) : at::Tensor();
      LowScratch low = low_scratch(p.rows, tiling.rows, tiling.vocab, dim);
      const acc_t* dh_prod = dh_product.data_ptr<acc_t>();
      for (int64_t group = begin; group < end; ++group) {
        acc_t* partial = partials.data_ptr<acc_t>() + group * tiling.rows * dim;
        std::fill(partial, partial + rn * dim, acc_t(0));
        const int64_t last_block = std::min(vocab_blocks, (group + 1) * blocks_per_group);
        for (int64_t block = group * blocks_per_group; block < last_block; ++block) {
          const int64_t v0 = block * tiling.vocab;
          const int64_t vn = std::min(tiling.vocab, vocab - v0);
          const at::Tensor w_block = p.native() ? at::Tensor() : weight_block(p.weight, v0, vn, weight_buffer);
          at::Tensor logits = tile.narrow(0, 0, rn * vn).view({rn, vn});
          logits_gemm(logits, p.rows, r0, p.weight, v0, w_block, low);
          acc_t* base = logits.data_ptr<acc_t>();
          p.grad_tile(base, rn, vn, r0, v0);
          for (int64_t k0 = 0; k0 < vn; k0 += kGemmDepth) {
            const int64_t kn = std::min(kGemmDepth, vn - k0);
            p.times_weight(logits, k0, kn, v0, w_block, dh_product, low);
            for (int64_t j = 0; j < rn * dim; ++j) partial[j] += dh_prod[j];
          }
          acc_t* dw = dweight.defined() ? dw_acc.data_ptr<acc_t>() + v0 * dim : nullptr;
          double* db = dbias.defined() ? db_acc.data_ptr<double>() + v0 : nullptr;
          if (dw != nullptr) {
            at::Tensor block_product = dw_product.narrow(0, 0, vn);
            p.t_times_rows(logits, r0, packed_rows, block_product, low);
            const acc_t* prod = block_product.data_ptr<acc_t>();
            for (int64_t j = 0; j < vn * dim; ++j) dw[j] += prod[j];
          }
          if (db != nullptr) {
            for (int64_t i = 0; i < rn; ++i) {
              for (int64_t j = 0; j < vn; ++j) db[j] += base[i * vn + j];
            }
          }
        }
      }
    });
    at::parallel_for(0, rn, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double* out = dh + (r0 + i) * dim;
        for (int64_t group = 0; group < groups; ++group) {
          const acc_t* partial = partials.data_ptr<acc_t>() + (group * tiling.rows + i) * dim;
          for (int64_t d = 0; d < dim; ++d) out[d] += partial[d];
        }
      }
    });
  }
  if (dweight.defined() && !dweight_direct) dweight.copy_(dw_acc);
  if (dbias.defined()) dbias.copy_(db_acc);
}

// Backward over the gathered rows. dhidden_rows: [n, D] float64 zeros or undefined; dweight: [V, D] zeros in
// the weight's dtype or undefined; dbias: [V] zeros in the bias dtype or undefined. grad_scale[i] = g_i / T.
// Which pass runs depends only on which gradients are wanted (see the top of the file).
//
// Accuracy. A long float32 accumulation of many tiny softmax terms loses them to rounding against the growing
// sum (at V = 2^20 a single GEMM over the vocabulary was off by 1e-3 relative). So each GEMM's inner dimension
// is bounded (kGemmDepth vocabulary entries for dH, one row tile for dW) and each product is formed from zero
// and added to an accumulator: float64 for dH and db, float64 per block for dW alone, the accumulation dtype
// for dW in the fused pass (one addition per row tile, ~1e-6 relative at V = 2^20). The tiles carry the whole
// (onehot(y) − p)·g/T·(1 − tanh²), the one-hot term added to its entry before any GEMM, so that
// 1 − p_y cancels in one element, exactly when p_y = 1 (V = 1 gives gradients of exactly 0), and p itself is
// exp((z − max) − log Σ) with the row max and log-sum kept apart.
template <typename acc_t>
void backward_rows_impl(const GatheredRows& rows, const at::Tensor& weight, const RowStats<acc_t>& stats,
                        double temperature, double softcap, at::Tensor& dhidden_rows, at::Tensor& dweight,
                        at::Tensor& dbias) {
  const BackwardProblem<acc_t> problem{rows,
                                       weight,
                                       stats,
                                       acc_t(softcap),
                                       softcap > 0 ? acc_t(temperature / softcap) : acc_t(0),
                                       acc_t(1.0 / temperature)};
  const bool need_weight_or_bias = dweight.defined() || dbias.defined();
  if (dhidden_rows.defined() && need_weight_or_bias) {
    backward_fused(problem, dhidden_rows, dweight, dbias);
  } else if (dhidden_rows.defined()) {
    backward_hidden(problem, dhidden_rows);
  } else if (need_weight_or_bias) {
    backward_weight(problem, dweight, dbias);
  }
}

}  // namespace

void backward_rows(const GatheredRows& rows, const at::Tensor& weight, const RowStats<float>& stats,
                   double temperature, double softcap, at::Tensor& dhidden_rows, at::Tensor& dweight,
                   at::Tensor& dbias) {
  backward_rows_impl<float>(rows, weight, stats, temperature, softcap, dhidden_rows, dweight, dbias);
}

void backward_rows(const GatheredRows& rows, const at::Tensor& weight, const RowStats<double>& stats,
                   double temperature, double softcap, at::Tensor& dhidden_rows, at::Tensor& dweight,
                   at::Tensor& dbias) {
  backward_rows_impl<double>(rows, weight, stats, temperature, softcap, dhidden_rows, dweight, dbias);
}

}  // namespace fastpref::cpu::linear
