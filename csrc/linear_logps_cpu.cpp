// CPU kernels of fastpref.linear_logps: per-row log-probabilities from hidden states and the lm_head weight,
// and their exact gradients, without ever holding the [N, V] logits.
//
// Formula. For row t with label y_t: a_t = h_t·Wᵀ (+ b); z_t = c·tanh(a_t / c) when softcap c > 0, else a_t;
// z_t = z_t / T;  log p_t = z_t[y_t] − logsumexp(z_t).  Backward, for an upstream gradient g_t on log p_t:
//   ∂/∂a_t = (onehot(y_t) − softmax(z_t)) · g_t / T · (1 − tanh²(a_t / c)),
//   dH_t = Σ_v ∂/∂a_tv · W_v,   dW_v = Σ_t ∂/∂a_tv · h_t,   db_v = Σ_t ∂/∂a_tv.
// The softmax is carried as the row max m and log Σ exp(z − m), kept apart: p = exp((z − m) − log Σ) is exact to
// the dtype however large |m| is (one rounded log-sum-exp per row is not).
//
// Frozen head (need_hidden_grad: no dW, no db wanted). dH_t = g_t · ∂log p_t/∂h_t with
//   ∂log p_t/∂h_t = (c_t·W[y_t] − Σ_v p_tv·(1 − tanh²_tv)·W_v) / T,   c_t = 1 − tanh²_{t,y_t} (1 without softcap),
// a vector that does not depend on g_t, softcap or not. The forward computes it in its one pass over the
// vocabulary: each tile's weights exp(z − m_running)·(1 − tanh²) multiply the weight block (a second GEMM per
// tile) into a float64 accumulator that is rescaled by exp(m_old − m_new) whenever the running max grows (flash
// attention's online softmax·V). Two GEMM-equivalents in all; the backward only scales it by g_t.
//
// Tiling. Only the active rows (label ≠ ignore_index; in backward also g_t ≠ 0) are gathered and upcast once
// to the accumulation type (float32 for fp16/bf16/fp32, float64 for fp64); the others cost no vocabulary work
// and get 0. Logits exist only as rows × vocab tiles (≤ 256 × 2048 float32 at 256 rows): one GEMM into a
// per-thread scratch tile, then our own row loops (logps_cpu_rows.cpp): bias, softcap, temperature, and the
// online softmax (forward) or the in-place softmax gradient (backward); then the dH, dW and Σ p·W GEMMs of the
// tile. The GEMMs: at::mm (MKL) on upcast operands, except for bf16 inputs on a CPU with AVX-512 BF16
// (native_bf16, linear_logps_cpu.h): there all of them run our bf16 × bf16 → float32 kernel (bf16_gemm_cpu.h),
// the logits GEMM on the bf16 rows and weight as given (float32 logits, no bf16 rounding), the others on the
// float32 tile split into bf16 high and low parts (linear_logps_bf16_cpu.cpp). FASTPREF_CPU_UPCAST_BF16=1
// forces the upcast path.
//
// Parallelism. Work is cut into items that own their outputs (no atomics, no reduction across threads); an
// item runs its tiles on one thread, so its GEMMs run single-threaded:
//   forward        one region; items = (row tile, vocabulary segment); partial (max, sum) per row (and the
//                  frozen head's partial Σ p·W, at most kUnitBytes for all segments), merged in segment order;
//   dH only        one region; items = row tiles, each walking the whole vocabulary;
//   dW/db only     one region; items = vocabulary blocks, each walking all rows;
//   dH and dW/db   one region per row tile; items = fixed groups of vocabulary blocks, each owning its dW rows
//                  and a partial of the tile's dH, the partials added in group order (three GEMMs per tile).
// Few, long regions matter: many short ones (a GEMM and a loop per tile) stalled badly on a busy machine.
// Scratch: per thread one tile, one upcast weight block (or, native bf16, a packed operand and a split tile)
// and GEMM products; the gathered rows (native bf16: also in bf16) with their
// float64 dH; the fused pass adds kFusedGroups dH partials of one row tile, and for fp16/bf16 weights a
// float32 dW accumulator (the size of dW). Never O(N × V).
//
// Determinism. Tile shapes, segments and item boundaries depend only on the shapes and the number of active
// rows, never on the thread count; every output element is accumulated by one item in a fixed order. The
// GEMMs are MKL's, whose bits depend only on the shapes here, or our bf16 kernel, one fixed-order sum per output
// element (tests/test_cpp_ops.py checks 1 vs 2 threads).
//
// Files. This one: checks, forward, op registration. linear_logps_backward_cpu.cpp: the backward passes and
// their accuracy measures. linear_logps_bf16_cpu.cpp: the native bf16 GEMM calls. linear_logps_cpu.h: tiling,
// the gathered rows and those calls, shared by all three.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "linear_logps_cpu.h"
#include "logps_cpu_rows.h"
#include "op_checks.h"

namespace fastpref::cpu {
namespace {

using namespace linear;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_linear_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& labels, double temperature,
                         double softcap) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(), op,
              ": expects CPU tensors");
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [N, D], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) >= 1, op,
              ": weight must be [V, D] with V >= 1 and D = hidden.size(1) = ", hidden.size(1), ", got shape ",
              weight.sizes());
  TORCH_CHECK(is_float_dtype(hidden.scalar_type()), op,
              ": hidden must be float16, bfloat16, float32 or float64, got ", hidden.scalar_type());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " must equal hidden dtype ", hidden.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be a CPU tensor");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [V] with V = ",
                weight.size(0), ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " must equal hidden dtype ", hidden.scalar_type());
  }
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), op, ": labels must be [N] with N = ",
              hidden.size(0), ", got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0 = none), got ",
              softcap);
}

// Indices of the rows that need vocabulary work: label ≠ ignore_index and, when grad is given, grad ≠ 0.
std::vector<int64_t> active_rows(const int64_t* labels, const double* grad, int64_t n, int64_t ignore_index) {
  std::vector<int64_t> rows;
  rows.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] != ignore_index && (grad == nullptr || grad[i] != 0.0)) rows.push_back(i);
  }
  return rows;
}

at::Tensor index_tensor(const std::vector<int64_t>& rows) {
  return at::from_blob(const_cast<int64_t*>(rows.data()), {static_cast<int64_t>(rows.size())}, at::kLong)
      .clone();
}

// Bias, softcap and temperature of one row segment (cap_and_temper), and cap_k = T / softcap (0 = none) with
// which z·cap_k recovers tanh(a / softcap) from a capped, tempered logit z.
template <typename acc_t>
struct RowEpilogue {
  const acc_t* bias;  // [V] or null
  acc_t cap, inv_temperature, cap_k;

  void apply(acc_t* z, int64_t vn, int64_t v0) const {
    cap_and_temper(z, vn, bias != nullptr ? bias + v0 : nullptr, cap, inv_temperature);
  }
};

// Per-thread scratch of the forward: one logits tile, one upcast weight block, one [rows, D] GEMM product.
struct ForwardScratch {
  at::Tensor tile, weight_buffer, product;
  LowScratch low;
};

// unit[i, :] += Σ_j weights[i, j]·W[v0 + j, :] for the rows of `weights` [rn, vn] (rows r0.. of the gathered
// rows), the GEMM's inner dimension cut at kGemmDepth and each product formed from zero, then added to the float64
// accumulator (see the accuracy note in linear_logps_backward_cpu.cpp). Upcast path: W from the upcast block.
// Native bf16: the weights are split into bf16 high and low parts, and the target entry of a row is taken out
// of the tile and its term added apart (the float32 product weight·W[y], as the upcast GEMM forms it): when
// p_y ≈ 1 the gradient (c·W[y] − Σ p·W) / T cancels against that term, and V = 1 then gives exactly 0.
template <typename acc_t>
void accumulate_products(at::Tensor& weights, const GatheredRows& rows, int64_t r0, const at::Tensor& weight,
                         int64_t v0, const at::Tensor& w_block, double* unit, at::Tensor& product, LowScratch& low) {
  const int64_t rn = weights.size(0), vn = weights.size(1), dim = weight.size(1);
  at::Tensor rows_product = product.narrow(0, 0, rn);
  const acc_t* prod = rows_product.data_ptr<acc_t>();
  const bool native = rows.low_hidden.defined();
  if constexpr (std::is_same_v<acc_t, float>) {
    if (native) {
      const at::BFloat16* w = weight.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < rn; ++i) {
        const int64_t local = rows.labels[r0 + i] - v0;  // labels are -1 or in [0, V): no overflow
        if (rows.labels[r0 + i] < 0 || local < 0 || local >= vn) continue;
        float& entry = weights.data_ptr<float>()[i * vn + local];
        const at::BFloat16* w_y = w + rows.labels[r0 + i] * dim;
        for (int64_t d = 0; d < dim; ++d) unit[i * dim + d] += double(entry * float(w_y[d]));
        entry = 0.0f;
      }
    }
  }
  for (int64_t k0 = 0; k0 < vn; k0 += kGemmDepth) {
    const int64_t kn = std::min(kGemmDepth, vn - k0);
    if (native) {
      tile_times_weight_bf16(weights.data_ptr<float>() + k0, rn, kn, vn, weight, v0 + k0, rows_product, low);
    } else {
      at::mm_out(rows_product, weights.narrow(1, k0, kn), w_block.narrow(0, k0, kn));
    }
    for (int64_t j = 0; j < rn * dim; ++j) unit[j] += prod[j];
  }
}

// The active rows gathered and upcast; labels outside [0, V) are stored as -1 so that no later index arithmetic
// (label − block start) can overflow or land inside a block: such a row has no target and no one-hot term.
GatheredRows gather_rows(const at::Tensor& hidden, const std::optional<at::Tensor>& bias, const int64_t* labels,
                         const std::vector<int64_t>& rows, int64_t vocab, at::ScalarType acc) {
  GatheredRows g;
  g.index = index_tensor(rows);
  g.hidden = hidden.index_select(0, g.index).to(acc).contiguous();
  if (bias.has_value()) g.bias = bias->to(acc).contiguous();
  g.labels.reserve(rows.size());
  for (int64_t r : rows) g.labels.push_back(labels[r] >= 0 && labels[r] < vocab ? labels[r] : -1);
  if (native_bf16(hidden.scalar_type())) g.low_hidden = hidden.index_select(0, g.index).contiguous();
  return g;
}

// The forward's work items: (row block, vocabulary segment) pairs, a segment being a run of vocabulary blocks.
struct ForwardPlan {
  Tiling tiling;
  int64_t row_blocks, vocab_blocks, blocks_per_segment, segments;
};

// Segments from the shapes alone (enough items for kForwardItems threads, at most max_segments), so results do
// not depend on the thread count.
ForwardPlan plan_forward(int64_t n, int64_t vocab, int64_t dim, int64_t max_segments) {
  ForwardPlan plan;
  plan.tiling = plan_tiles(tall_row_block(n), vocab, dim);
  plan.row_blocks = ceil_div(n, plan.tiling.rows);
  plan.vocab_blocks = ceil_div(vocab, plan.tiling.vocab);
  const int64_t wanted = std::min({plan.vocab_blocks, ceil_div(kForwardItems, plan.row_blocks), max_segments});
  plan.blocks_per_segment = ceil_div(plan.vocab_blocks, std::max<int64_t>(wanted, 1));
  plan.segments = ceil_div(plan.vocab_blocks, plan.blocks_per_segment);
  return plan;
}

// Per active row: the max and log Σ exp(z − max) of its logits, kept apart so that p = exp((z − max) − log_sum)
// is exact to the dtype however large |max| is; the target logit (NaN for a label outside [0, V)); and, for the
// frozen head, ∂log p/∂h [n, D].
template <typename acc_t>
struct RowSoftmax {
  std::vector<acc_t> max, log_sum, target;
  at::Tensor hidden_grad;
};

// Partial results of the segments, [segment × n] each, and for the frozen head the partial
// Σ_v exp(z_v − max)·(1 − tanh²)·W_v of each segment, [segments, n, D] float64.
template <typename acc_t>
struct SegmentPartials {
  std::vector<acc_t> max, sum;
  at::Tensor unit;
};

// One work item: the tiles of rows [r0, r0 + rn) and the vocabulary blocks of `segment`. Scratch (tile, weight
// buffer, product) belongs to the calling thread.
template <typename acc_t>
void forward_item(const GatheredRows& rows, const at::Tensor& weight, const ForwardPlan& plan, int64_t segment,
                  int64_t r0, const RowEpilogue<acc_t>& epi, SegmentPartials<acc_t>& parts, std::vector<acc_t>& target,
                  ForwardScratch& scratch) {
  const int64_t n = rows.hidden.size(0), vocab = weight.size(0), dim = weight.size(1);
  const int64_t rn = std::min(plan.tiling.rows, n - r0);
  double* unit = parts.unit.defined() ? parts.unit.template data_ptr<double>() + (segment * n + r0) * dim : nullptr;
  const int64_t last_block = std::min(plan.vocab_blocks, (segment + 1) * plan.blocks_per_segment);
  for (int64_t block = segment * plan.blocks_per_segment; block < last_block; ++block) {
    const int64_t v0 = block * plan.tiling.vocab;
    const int64_t vn = std::min(plan.tiling.vocab, vocab - v0);
    // native bf16 GEMMs read the weight as it is: no upcast block
    const at::Tensor w_block =
        rows.low_hidden.defined() ? at::Tensor() : weight_block(weight, v0, vn, scratch.weight_buffer);
    at::Tensor logits = scratch.tile.narrow(0, 0, rn * vn).view({rn, vn});
    logits_gemm(logits, rows, r0, weight, v0, w_block, scratch.low);
    acc_t* base = logits.data_ptr<acc_t>();
    for (int64_t i = 0; i < rn; ++i) {
      acc_t* z = base + i * vn;
      const int64_t row = r0 + i;
      epi.apply(z, vn, v0);
      const int64_t local = rows.labels[row] - v0;  // labels are -1 or in [0, V): no overflow
      if (rows.labels[row] >= 0 && local < vn && local >= 0) target[row] = z[local];
      acc_t& run_max = parts.max[segment * n + row];
      acc_t& run_sum = parts.sum[segment * n + row];
      if (unit == nullptr) {
        online_lse_update(z, vn, run_max, run_sum);
        continue;
      }
      const double rescale = online_softmax_weights(z, vn, epi.cap_k, run_max, run_sum);
      if (rescale != 1.0) {
        for (int64_t d = 0; d < dim; ++d) unit[i * dim + d] *= rescale;
      }
    }
    if (unit != nullptr) {
      accumulate_products<acc_t>(logits, rows, r0, weight, v0, w_block, unit, scratch.product, scratch.low);
    }
  }
}

// The frozen head's ∂log p_t/∂h_t = (c_t·W[y_t] − Σ_v p_tv·(1 − tanh²_tv)·W_v) / T, with c_t = 1 − tanh²(a_t[y_t]/c)
// (1 without a softcap): the merged unit [n, D] float64 divided by the row sum, minus the target row of W.
// A row whose label lies outside [0, V) gets no W[y] term.
template <typename acc_t>
at::Tensor hidden_grad_from_unit(const GatheredRows& rows, const at::Tensor& weight, const at::Tensor& unit,
                                 const std::vector<acc_t>& sum, const std::vector<acc_t>& target,
                                 const RowEpilogue<acc_t>& epi, double temperature) {
  const int64_t n = unit.size(0);
  std::vector<int64_t> safe_labels(n);
  std::vector<acc_t> coef(n);
  std::vector<double> inv_sum(n);
  for (int64_t i = 0; i < n; ++i) {
    const bool valid = rows.labels[i] >= 0;
    // formed, and multiplied by W[y] below, in the accumulation type exactly as the tile weights are, so that
    // V = 1 (p = 1) gives exactly 0
    const acc_t t = target[i] * epi.cap_k;
    safe_labels[i] = valid ? rows.labels[i] : 0;
    coef[i] = valid ? sech_squared(t) : acc_t(0);
    inv_sum[i] = 1.0 / double(sum[i]);
  }
  const auto acc = rows.hidden.scalar_type();
  const at::Tensor w_target = weight.index_select(0, index_tensor(safe_labels)).to(acc);
  const at::Tensor coef_t = at::from_blob(coef.data(), {n, 1}, unit.options().dtype(acc));
  const at::Tensor inv_sum_t = at::from_blob(inv_sum.data(), {n, 1}, unit.options());
  return (((w_target * coef_t).to(at::kDouble) - unit * inv_sum_t) * (1.0 / temperature)).to(acc);
}

// Merges the segments of each row in segment order: max, log Σ and (frozen head) the unit, rescaled to the
// row's max.
template <typename acc_t>
void merge_segments(SegmentPartials<acc_t>& parts, int64_t segments, int64_t n, std::vector<acc_t>& row_max,
                    std::vector<acc_t>& row_sum) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  row_max.assign(n, kNegInf);
  row_sum.assign(n, acc_t(0));
  std::vector<double> scale(segments * n, 0.0);
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t seg = 0; seg < segments; ++seg) row_max[row] = std::max(row_max[row], parts.max[seg * n + row]);
    for (int64_t seg = 0; seg < segments; ++seg) {
      const acc_t part = parts.sum[seg * n + row];
      if (part == 0) continue;  // a NaN part makes the sum NaN
      const acc_t factor = std::exp(parts.max[seg * n + row] - row_max[row]);
      row_sum[row] += part * factor;
      scale[seg * n + row] = double(factor);
    }
  }
  if (!parts.unit.defined()) return;
  at::Tensor merged = parts.unit[0];
  const auto f64 = parts.unit.options();
  merged.mul_(at::from_blob(scale.data(), {n, 1}, f64));
  for (int64_t seg = 1; seg < segments; ++seg) {
    merged.addcmul_(parts.unit[seg], at::from_blob(scale.data() + seg * n, {n, 1}, f64));
  }
  parts.unit = merged;
}

// Forward over the gathered rows: one parallel region over the plan's items, each running its tiles on its own
// thread (the GEMMs then run single-threaded) and leaving partials per row and segment, merged afterwards in
// segment order. A single region keeps the kernel fast on a busy machine where many short ones would stall.
// With want_hidden_grad (the frozen head) each tile's softmax weights also multiply the weight block (a second
// GEMM per tile), accumulating Σ_v p_v·(1 − tanh²)·W_v online, rescaled as the row max grows (flash attention's
// softmax·V); the partials are bounded by kUnitBytes (fewer segments when n·D is large).
template <typename acc_t>
RowSoftmax<acc_t> forward_rows(const GatheredRows& rows, const at::Tensor& weight, double temperature,
                               double softcap, bool want_hidden_grad) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t n = rows.hidden.size(0), vocab = weight.size(0), dim = weight.size(1);
  const int64_t unit_segments = std::max<int64_t>(1, kUnitBytes / (n * dim * int64_t(sizeof(double))));
  const ForwardPlan plan = plan_forward(n, vocab, dim, want_hidden_grad ? unit_segments : vocab);
  SegmentPartials<acc_t> parts{std::vector<acc_t>(plan.segments * n, kNegInf),
                               std::vector<acc_t>(plan.segments * n, acc_t(0)), at::Tensor()};
  const auto opts = rows.hidden.options();
  if (want_hidden_grad) parts.unit = at::zeros({plan.segments, n, dim}, opts.dtype(at::kDouble));
  RowSoftmax<acc_t> out;
  out.target.assign(n, std::numeric_limits<acc_t>::quiet_NaN());  // stays NaN for a label outside [0, V)
  const RowEpilogue<acc_t> epi{rows.bias.defined() ? rows.bias.data_ptr<acc_t>() : nullptr, acc_t(softcap),
                               acc_t(1.0 / temperature), softcap > 0 ? acc_t(temperature / softcap) : acc_t(0)};
  const bool upcast = weight.scalar_type() != rows.hidden.scalar_type() && !rows.low_hidden.defined();

  at::parallel_for(0, plan.row_blocks * plan.segments, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch state is per thread
    ForwardScratch scratch{at::empty({plan.tiling.rows * plan.tiling.vocab}, opts),
                           upcast ? at::empty({plan.tiling.vocab * dim}, opts) : at::Tensor(),
                           want_hidden_grad ? at::empty({plan.tiling.rows, dim}, opts) : at::Tensor(),
                           low_scratch(rows, plan.tiling.rows, plan.tiling.vocab, dim)};
    for (int64_t item = begin; item < end; ++item) {
      forward_item(rows, weight, plan, item % plan.segments, (item / plan.segments) * plan.tiling.rows, epi, parts,
                   out.target, scratch);
    }
  });

  std::vector<acc_t> row_sum;
  merge_segments(parts, plan.segments, n, out.max, row_sum);
  out.log_sum.resize(n);
  for (int64_t row = 0; row < n; ++row) out.log_sum[row] = std::log(row_sum[row]);
  if (want_hidden_grad) {
    out.hidden_grad = hidden_grad_from_unit(rows, weight, parts.unit, row_sum, out.target, epi, temperature);
  }
  return out;
}

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Forward op. token_logps [N], row_max and row_log_sum [N] (or [0] unless need_lse) and hidden_grad [N, D]
// (∂log p_t/∂h_t, or [0] unless need_hidden_grad), all in the accumulation dtype (float32; float64 for float64
// inputs) and 0 at ignored rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logps_fwd_cpu(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels_in, int64_t ignore_index, double temperature, double softcap, bool need_lse,
    bool need_hidden_grad) {
  const char* op = "fastpref::linear_logps_fwd";
  // Inner ATen calls are implementation details: keep them below autograd (no graph, no out= checks).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_inputs(op, hidden_in, weight_in, bias, labels_in, temperature, softcap);
  const int64_t n = hidden_in.size(0);
  const auto acc = accumulation_type(hidden_in.scalar_type());
  const auto acc_opts = hidden_in.options().dtype(acc);
  at::Tensor token_logps = at::zeros({n}, acc_opts);
  at::Tensor row_max = at::zeros({need_lse ? n : 0}, acc_opts);
  at::Tensor row_log_sum = at::zeros({need_lse ? n : 0}, acc_opts);
  at::Tensor hidden_grad = need_hidden_grad ? at::zeros(hidden_in.sizes(), acc_opts) : at::zeros({0}, acc_opts);
  const at::Tensor labels = labels_in.contiguous();
  const std::vector<int64_t> active = active_rows(labels.data_ptr<int64_t>(), nullptr, n, ignore_index);
  if (active.empty()) return {token_logps, row_max, row_log_sum, hidden_grad};

  const at::Tensor weight = weight_in.contiguous();
  const GatheredRows rows = gather_rows(hidden_in, bias, labels.data_ptr<int64_t>(), active, weight.size(0), acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_logps_fwd", [&] {
    const RowSoftmax<scalar_t> result = forward_rows<scalar_t>(rows, weight, temperature, softcap, need_hidden_grad);
    scalar_t* out_logps = token_logps.data_ptr<scalar_t>();
    for (size_t k = 0; k < active.size(); ++k) {
      out_logps[active[k]] = (result.target[k] - result.max[k]) - result.log_sum[k];
      if (need_lse) {
        row_max.data_ptr<scalar_t>()[active[k]] = result.max[k];
        row_log_sum.data_ptr<scalar_t>()[active[k]] = result.log_sum[k];
      }
    }
    if (need_hidden_grad) hidden_grad.index_copy_(0, rows.index, result.hidden_grad);
  });
  return {token_logps, row_max, row_log_sum, hidden_grad};
}

template <typename acc_t>
void run_backward(const GatheredRows& rows, const at::Tensor& weight, const std::vector<int64_t>& active,
                  const at::Tensor& row_max, const at::Tensor& row_log_sum, const double* grad, double temperature,
                  double softcap, at::Tensor& dhidden_rows, at::Tensor& dweight, at::Tensor& dbias) {
  const acc_t* max = row_max.data_ptr<acc_t>();
  const acc_t* log_sum = row_log_sum.data_ptr<acc_t>();
  RowStats<acc_t> stats{std::vector<acc_t>(active.size()), std::vector<acc_t>(active.size()),
                        std::vector<acc_t>(active.size())};
  for (size_t k = 0; k < active.size(); ++k) {
    stats.max[k] = max[active[k]];
    stats.log_sum[k] = log_sum[active[k]];
    stats.grad_scale[k] = acc_t(grad[active[k]]) / acc_t(temperature);
  }
  linear::backward_rows(rows, weight, stats, temperature, softcap, dhidden_rows, dweight, dbias);
}

// Backward op (the recompute path): the forward's row_max and row_log_sum in the accumulation dtype, grad_rows
// [N] float32 or in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logps_bwd_cpu(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels_in, const at::Tensor& row_max_in, const at::Tensor& row_log_sum_in,
    const at::Tensor& grad_rows_in, int64_t ignore_index, double temperature, double softcap, bool need_hidden,
    bool need_weight, bool need_bias) {
  const char* op = "fastpref::linear_logps_bwd";
  // Inner ATen calls are implementation details: keep them below autograd (no graph, no out= checks).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_inputs(op, hidden_in, weight_in, bias, labels_in, temperature, softcap);
  const int64_t n = hidden_in.size(0);
  const auto acc = accumulation_type(hidden_in.scalar_type());
  check_row_vector(op, "row_max", row_max_in, n, acc, acc);
  check_row_vector(op, "row_log_sum", row_log_sum_in, n, acc, acc);
  check_row_vector(op, "grad_rows", grad_rows_in, n, at::kFloat, acc);
  TORCH_CHECK(!need_bias || bias.has_value(), op, ": need_bias=True but no bias was given");
  const auto empty = hidden_in.options().dtype(at::kFloat);
  at::Tensor dhidden = need_hidden ? at::zeros(hidden_in.sizes(), hidden_in.options()) : at::empty({0}, empty);
  at::Tensor dweight = need_weight ? at::zeros(weight_in.sizes(), weight_in.options()) : at::empty({0}, empty);
  at::Tensor dbias = need_bias ? at::zeros(bias->sizes(), bias->options()) : at::empty({0}, empty);
  if (!need_hidden && !need_weight && !need_bias) return {dhidden, dweight, dbias};

  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor grad_rows = grad_rows_in.to(at::kDouble).contiguous();
  const std::vector<int64_t> active =
      active_rows(labels.data_ptr<int64_t>(), grad_rows.data_ptr<double>(), n, ignore_index);
  if (active.empty()) return {dhidden, dweight, dbias};

  const at::Tensor weight = weight_in.contiguous();
  const GatheredRows rows = gather_rows(hidden_in, bias, labels.data_ptr<int64_t>(), active, weight.size(0), acc);
  at::Tensor dhidden_rows =
      need_hidden ? at::zeros(rows.hidden.sizes(), rows.hidden.options().dtype(at::kDouble)) : at::Tensor();
  at::Tensor dweight_out = need_weight ? dweight : at::Tensor();
  at::Tensor dbias_out = need_bias ? dbias : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_logps_bwd", [&] {
    run_backward<scalar_t>(rows, weight, active, row_max_in.contiguous(), row_log_sum_in.contiguous(),
                           grad_rows.data_ptr<double>(), temperature, softcap, dhidden_rows, dweight_out, dbias_out);
  });
  if (need_hidden) dhidden.index_copy_(0, rows.index, dhidden_rows.to(dhidden.scalar_type()));
  return {dhidden, dweight, dbias};
}

}  // namespace
}  // namespace fastpref::cpu

TORCH_LIBRARY_FRAGMENT(fastpref, m) {
  m.def(
      "linear_logps_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
      "float temperature, float softcap, bool need_lse, bool need_hidden_grad) "
      "-> (Tensor token_logps, Tensor row_max, Tensor row_log_sum, Tensor hidden_grad)");
  m.def(
      "linear_logps_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor row_max, "
      "Tensor row_log_sum, Tensor grad_rows, "
      "int ignore_index, float temperature, float softcap, bool need_hidden, bool need_weight, bool need_bias) "
      "-> (Tensor dhidden, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(fastpref, CPU, m) {
  m.impl("linear_logps_fwd", &fastpref::cpu::linear_logps_fwd_cpu);
  m.impl("linear_logps_bwd", &fastpref::cpu::linear_logps_bwd_cpu);
}
