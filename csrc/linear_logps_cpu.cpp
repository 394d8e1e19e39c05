// CPU kernels of fastpref.linear_logps: per-row log-probabilities from hidden states and the lm_head weight,
// and their exact gradients, without ever holding the [N, V] logits.
//
// Formula. For row t with label y_t: a_t = h_t·Wᵀ (+ b); z_t = c·tanh(a_t / c) when softcap c > 0, else a_t;
// z_t = z_t / T;  log p_t = z_t[y_t] − logsumexp(z_t).  Backward, for an upstream gradient g_t on log p_t:
//   ∂/∂a_t = (onehot(y_t) − softmax(z_t)) · g_t / T · (1 − tanh²(a_t / c)),
//   dH_t = Σ_v ∂/∂a_tv · W_v,   dW_v = Σ_t ∂/∂a_tv · h_t,   db_v = Σ_t ∂/∂a_tv.
//
// Tiling. Only the active rows (label ≠ ignore_index; in backward also g_t ≠ 0) are gathered and upcast once
// to the accumulation type (float32 for fp16/bf16/fp32, float64 for fp64); the others cost no vocabulary work
// and get 0. Logits exist only as rows × vocab tiles (≤ 256 × 2048 float32 at 256 rows): one GEMM (at::mm on
// upcast operands, MKL) into a per-thread scratch tile, then our own row loops (logps_cpu_rows.cpp): bias,
// softcap, temperature, and the online log-sum-exp (forward) or the in-place softmax gradient (backward).
//
// Parallelism. Work is cut into items that own their outputs (no atomics, no reduction across threads); an
// item runs its tiles on one thread, so its GEMMs run single-threaded:
//   forward        one region; items = (row tile, vocabulary segment); partial (max, sum) per row, merged in
//                  segment order;
//   dH only        one region; items = row tiles, each walking the whole vocabulary;
//   dW/db only     one region; items = vocabulary blocks, each walking all rows;
//   dH and dW/db   one region per row tile; items = fixed groups of vocabulary blocks, each owning its dW rows
//                  and a partial of the tile's dH, the partials added in group order (three GEMMs per tile).
// Few, long regions matter: many short ones (a GEMM and a loop per tile) stalled badly on a busy machine.
// Scratch: per thread one tile, one upcast weight block and GEMM products; the gathered rows with their
// float64 dH; the fused pass adds kFusedGroups dH partials of one row tile, and for fp16/bf16 weights a
// float32 dW accumulator (the size of dW). Never O(N × V).
//
// Determinism. Tile shapes, segments and item boundaries depend only on the shapes and the number of active
// rows, never on the thread count; every output element is accumulated by one item in a fixed order. The
// GEMMs are MKL's, whose bits depend only on the shapes here (tests/test_cpp_ops.py checks 1 vs 2 threads).
//
// Files. This one: checks, forward, op registration. linear_logps_backward_cpu.cpp: the backward passes and
// their accuracy measures. linear_logps_cpu.h: tiling and the gathered rows, shared by both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "linear_logps_cpu.h"
#include "logps_cpu_rows.h"

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

void check_row_vector(const char* op, const char* name, const at::Tensor& t, int64_t rows) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must be [N] with N = ", rows, ", got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

// Indices of the rows that need vocabulary work: label ≠ ignore_index and, when grad is given, grad ≠ 0.
std::vector<int64_t> active_rows(const int64_t* labels, const float* grad, int64_t n, int64_t ignore_index) {
  std::vector<int64_t> rows;
  rows.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] != ignore_index && (grad == nullptr || grad[i] != 0.0f)) rows.push_back(i);
  }
  return rows;
}

at::Tensor index_tensor(const std::vector<int64_t>& rows) {
  return at::from_blob(const_cast<int64_t*>(rows.data()), {static_cast<int64_t>(rows.size())}, at::kLong)
      .clone();
}

GatheredRows gather_rows(const at::Tensor& hidden, const std::optional<at::Tensor>& bias, const int64_t* labels,
                         const std::vector<int64_t>& rows, at::ScalarType acc) {
  GatheredRows g;
  g.index = index_tensor(rows);
  g.hidden = hidden.index_select(0, g.index).to(acc).contiguous();
  if (bias.has_value()) g.bias = bias->to(acc).contiguous();
  g.labels.reserve(rows.size());
  for (int64_t r : rows) g.labels.push_back(labels[r]);
  return g;
}

// Forward over the gathered rows: fills lse and the target logit of each active row.
//
// One parallel region: the work items are (row block, vocabulary segment) pairs, a segment being a run of
// vocabulary blocks; each item runs its tiles on its own thread (the GEMM then runs single-threaded) and
// leaves a partial (max, sum) per row, merged afterwards in segment order. The segments are chosen from the
// shapes alone (enough items for kForwardItems threads), so the result does not depend on the thread count,
// and a single parallel region keeps the kernel fast on a busy machine where many short regions would stall.
template <typename acc_t>
void forward_rows(const GatheredRows& rows, const at::Tensor& weight, double temperature, double softcap,
                  std::vector<acc_t>& lse, std::vector<acc_t>& target) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t n = rows.hidden.size(0);
  const int64_t vocab = weight.size(0);
  const int64_t dim = weight.size(1);
  const Tiling tiling = plan_tiles(tall_row_block(n), vocab, dim);
  const int64_t row_blocks = ceil_div(n, tiling.rows);
  const int64_t vocab_blocks = ceil_div(vocab, tiling.vocab);
  const int64_t blocks_per_segment =
      ceil_div(vocab_blocks, std::min(vocab_blocks, ceil_div(kForwardItems, row_blocks)));
  const int64_t segments = ceil_div(vocab_blocks, blocks_per_segment);
  std::vector<acc_t> part_max(segments * n, kNegInf);
  std::vector<acc_t> part_sum(segments * n, acc_t(0));
  target.assign(n, std::numeric_limits<acc_t>::quiet_NaN());  // stays NaN for a label outside [0, V)
  const acc_t inv_temperature = acc_t(1.0 / temperature);
  const acc_t cap = acc_t(softcap);
  const acc_t* bias = rows.bias.defined() ? rows.bias.data_ptr<acc_t>() : nullptr;
  const auto opts = rows.hidden.options();
  const bool upcast = weight.scalar_type() != rows.hidden.scalar_type();

  at::parallel_for(0, row_blocks * segments, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch state is per thread
    at::Tensor tile = at::empty({tiling.rows * tiling.vocab}, opts);
    at::Tensor weight_buffer = upcast ? at::empty({tiling.vocab * dim}, opts) : at::Tensor();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t segment = item % segments;
      const int64_t r0 = (item / segments) * tiling.rows;
      const int64_t rn = std::min(tiling.rows, n - r0);
      const at::Tensor h_rows = rows.hidden.narrow(0, r0, rn);
      const int64_t last_block = std::min(vocab_blocks, (segment + 1) * blocks_per_segment);
      for (int64_t block = segment * blocks_per_segment; block < last_block; ++block) {
        const int64_t v0 = block * tiling.vocab;
        const int64_t vn = std::min(tiling.vocab, vocab - v0);
        at::Tensor logits = tile.narrow(0, 0, rn * vn).view({rn, vn});
        at::mm_out(logits, h_rows, weight_block(weight, v0, vn, weight_buffer).t());
        acc_t* base = logits.data_ptr<acc_t>();
        for (int64_t i = 0; i < rn; ++i) {
          acc_t* z = base + i * vn;
          const int64_t row = r0 + i;
          cap_and_temper(z, vn, bias != nullptr ? bias + v0 : nullptr, cap, inv_temperature);
          const int64_t local = rows.labels[row] - v0;
          if (local >= 0 && local < vn) target[row] = z[local];
          online_lse_update(z, vn, part_max[segment * n + row], part_sum[segment * n + row]);
        }
      }
    }
  });

  lse.resize(n);
  for (int64_t row = 0; row < n; ++row) {
    acc_t best = kNegInf;
    for (int64_t seg = 0; seg < segments; ++seg) best = std::max(best, part_max[seg * n + row]);
    acc_t sum = 0;
    for (int64_t seg = 0; seg < segments; ++seg) {
      const acc_t part = part_sum[seg * n + row];
      if (part != 0) sum += part * std::exp(part_max[seg * n + row] - best);  // a NaN part makes sum NaN
    }
    lse[row] = best + std::log(sum);
  }
}

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> linear_logps_fwd_cpu(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& labels_in, int64_t ignore_index,
                                                         double temperature, double softcap, bool need_lse) {
  const char* op = "fastpref::linear_logps_fwd";
  // Inner ATen calls are implementation details: keep them below autograd (no graph, no out= checks).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_inputs(op, hidden_in, weight_in, bias, labels_in, temperature, softcap);
  const int64_t n = hidden_in.size(0);
  const auto f32 = hidden_in.options().dtype(at::kFloat);
  at::Tensor token_logps = at::zeros({n}, f32);
  at::Tensor lse = at::zeros({need_lse ? n : 0}, f32);
  const at::Tensor labels = labels_in.contiguous();
  const std::vector<int64_t> active = active_rows(labels.data_ptr<int64_t>(), nullptr, n, ignore_index);
  if (active.empty()) return {token_logps, lse};

  const at::Tensor weight = weight_in.contiguous();
  const auto acc = accumulation_type(hidden_in.scalar_type());
  const GatheredRows rows = gather_rows(hidden_in, bias, labels.data_ptr<int64_t>(), active, acc);
  float* out_logps = token_logps.data_ptr<float>();
  float* out_lse = need_lse ? lse.data_ptr<float>() : nullptr;
  auto finish = [&](const auto& row_lse, const auto& row_target) {
    for (size_t k = 0; k < active.size(); ++k) {
      out_logps[active[k]] = static_cast<float>(row_target[k] - row_lse[k]);
      if (out_lse != nullptr) out_lse[active[k]] = static_cast<float>(row_lse[k]);
    }
  };
  if (acc == at::kDouble) {
    std::vector<double> row_lse, row_target;
    forward_rows<double>(rows, weight, temperature, softcap, row_lse, row_target);
    finish(row_lse, row_target);
  } else {
    std::vector<float> row_lse, row_target;
    forward_rows<float>(rows, weight, temperature, softcap, row_lse, row_target);
    finish(row_lse, row_target);
  }
  return {token_logps, lse};
}

template <typename acc_t>
void run_backward(const GatheredRows& rows, const at::Tensor& weight, const std::vector<int64_t>& active,
                  const float* lse, const float* grad, double temperature, double softcap, at::Tensor& dhidden_rows,
                  at::Tensor& dweight, at::Tensor& dbias) {
  std::vector<acc_t> row_lse(active.size()), grad_scale(active.size());
  for (size_t k = 0; k < active.size(); ++k) {
    row_lse[k] = acc_t(lse[active[k]]);
    grad_scale[k] = acc_t(grad[active[k]]) / acc_t(temperature);
  }
  linear::backward_rows(rows, weight, row_lse, grad_scale, temperature, softcap, dhidden_rows, dweight, dbias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logps_bwd_cpu(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels_in, const at::Tensor& lse_in, const at::Tensor& grad_rows_in, int64_t ignore_index,
    double temperature, double softcap, bool need_hidden, bool need_weight, bool need_bias) {
  const char* op = "fastpref::linear_logps_bwd";
  // Inner ATen calls are implementation details: keep them below autograd (no graph, no out= checks).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_inputs(op, hidden_in, weight_in, bias, labels_in, temperature, softcap);
  const int64_t n = hidden_in.size(0);
  check_row_vector(op, "lse", lse_in, n);
  check_row_vector(op, "grad_rows", grad_rows_in, n);
  TORCH_CHECK(!need_bias || bias.has_value(), op, ": need_bias=True but no bias was given");
  const auto empty = hidden_in.options().dtype(at::kFloat);
  at::Tensor dhidden = need_hidden ? at::zeros(hidden_in.sizes(), hidden_in.options()) : at::empty({0}, empty);
  at::Tensor dweight = need_weight ? at::zeros(weight_in.sizes(), weight_in.options()) : at::empty({0}, empty);
  at::Tensor dbias = need_bias ? at::zeros(bias->sizes(), bias->options()) : at::empty({0}, empty);
  if (!need_hidden && !need_weight && !need_bias) return {dhidden, dweight, dbias};

  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor grad_rows = grad_rows_in.contiguous();
  const std::vector<int64_t> active =
      active_rows(labels.data_ptr<int64_t>(), grad_rows.data_ptr<float>(), n, ignore_index);
  if (active.empty()) return {dhidden, dweight, dbias};

  const at::Tensor weight = weight_in.contiguous();
  const auto acc = accumulation_type(hidden_in.scalar_type());
  const GatheredRows rows = gather_rows(hidden_in, bias, labels.data_ptr<int64_t>(), active, acc);
  at::Tensor dhidden_rows =
      need_hidden ? at::zeros(rows.hidden.sizes(), rows.hidden.options().dtype(at::kDouble)) : at::Tensor();
  at::Tensor dweight_out = need_weight ? dweight : at::Tensor();
  at::Tensor dbias_out = need_bias ? dbias : at::Tensor();
  if (acc == at::kDouble) {
    run_backward<double>(rows, weight, active, lse.data_ptr<float>(), grad_rows.data_ptr<float>(), temperature,
                         softcap, dhidden_rows, dweight_out, dbias_out);
  } else {
    run_backward<float>(rows, weight, active, lse.data_ptr<float>(), grad_rows.data_ptr<float>(), temperature,
                        softcap, dhidden_rows, dweight_out, dbias_out);
  }
  if (need_hidden) dhidden.index_copy_(0, rows.index, dhidden_rows.to(dhidden.scalar_type()));
  return {dhidden, dweight, dbias};
}

}  // namespace
}  // namespace fastpref::cpu

TORCH_LIBRARY_FRAGMENT(fastpref, m) {
  m.def(
      "linear_logps_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
      "float temperature, float softcap, bool need_lse) -> (Tensor token_logps, Tensor lse)");
  m.def(
      "linear_logps_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, Tensor grad_rows, "
      "int ignore_index, float temperature, float softcap, bool need_hidden, bool need_weight, bool need_bias) "
      "-> (Tensor dhidden, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(fastpref, CPU, m) {
  m.impl("linear_logps_fwd", &fastpref::cpu::linear_logps_fwd_cpu);
  m.impl("linear_logps_bwd", &fastpref::cpu::linear_logps_bwd_cpu);
}
