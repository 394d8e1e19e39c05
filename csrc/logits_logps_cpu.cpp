// CPU kernels of fastpref.logits_logps: per-row log-probabilities from ready logits [N, V] and their gradient.
//
// Formula. z_t = logits_t / T;  log p_t = z_t[y_t] − logsumexp(z_t);  for an upstream gradient g_t on log p_t,
//   ∂/∂logits_t = (onehot(y_t) − softmax(z_t)) · g_t / T.
//
// Work. Parallel over rows (at::parallel_for); each row is streamed in chunks of kChunk values that are read
// in the logits' own dtype and upcast into a per-thread float32 buffer (float64 for fp64 logits), so the
// logits tensor is never upcast as a whole. Forward folds the chunks into an online log-sum-exp and reads the
// target logit directly; only rows with label ≠ ignore_index are read. Backward recomputes each chunk's
// softmax from the saved row max and log Σ exp(z − max), kept apart (p exact to the dtype), and writes the gradient in the logits' dtype; rows that are ignored or have
// g_t = 0 are written as zeros without reading the logits.
//
// Determinism. Every row is handled by one thread in a fixed chunk order, so results do not depend on the
// thread count. A label outside [0, V) (possible only when the Python value checks are off) is never used to
// read memory: its log-prob is NaN and its gradient has no one-hot term.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "logps_cpu_rows.h"
#include "op_checks.h"

namespace fastpref::cpu {
namespace {

constexpr int64_t kChunk = 4096;  // values of one row upcast at a time

int64_t row_grain(int64_t row_length) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_length, 1)); }

template <typename scalar_t>
using acc_type_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t, typename acc_t>
void load_scaled(const scalar_t* src, int64_t n, acc_t scale, acc_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]) * scale;
}

template <typename scalar_t, typename acc_t>
void store(const acc_t* src, int64_t n, scalar_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

// Logits with unit stride along the vocabulary (rows may be strided); copies only when that fails.
at::Tensor unit_stride_rows(const at::Tensor& logits) {
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

void check_logits_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), op, ": expects CPU tensors");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, op, ": logits must be [N, V] with V >= 1, got shape ",
              logits.sizes());
  const auto t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, op,
              ": logits must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels must be [N] with N = ",
              logits.size(0), ", got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
}

// Forward op: token_logps [N], row_max and row_log_sum [N] (or [0] unless need_lse), in the accumulation dtype
// (float32; float64 for float64 logits), 0 at ignored rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_logps_fwd_cpu(const at::Tensor& logits_in,
                                                                     const at::Tensor& labels_in,
                                                                     int64_t ignore_index, double temperature,
                                                                     bool need_lse) {
  const char* op = "fastpref::logits_logps_fwd";
  // Inner ATen calls are implementation details: keep them below autograd (no graph, no out= checks).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_logits_inputs(op, logits_in, labels_in, temperature);
  const int64_t n = logits_in.size(0);
  const int64_t vocab = logits_in.size(1);
  const auto acc = logits_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = logits_in.options().dtype(acc);
  at::Tensor token_logps = at::zeros({n}, acc_opts);
  at::Tensor row_max = at::zeros({need_lse ? n : 0}, acc_opts);
  at::Tensor row_log_sum = at::zeros({need_lse ? n : 0}, acc_opts);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t* label = labels.data_ptr<int64_t>();
  std::vector<int64_t> active;
  active.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (label[i] != ignore_index) active.push_back(i);
  }
  if (active.empty()) return {token_logps, row_max, row_log_sum};

  const at::Tensor logits = unit_stride_rows(logits_in);
  const int64_t row_stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logits_logps_fwd", [&] {
    using acc_t = acc_type_of<scalar_t>;
    acc_t* out_logps = token_logps.data_ptr<acc_t>();
    acc_t* out_max = need_lse ? row_max.data_ptr<acc_t>() : nullptr;
    acc_t* out_log_sum = need_lse ? row_log_sum.data_ptr<acc_t>() : nullptr;
    const scalar_t* base = logits.data_ptr<scalar_t>();
    const acc_t inv_temperature = acc_t(1.0 / temperature);
    const int64_t count = static_cast<int64_t>(active.size());
    at::parallel_for(0, count, row_grain(vocab), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> chunk(std::min(kChunk, vocab));
      for (int64_t k = begin; k < end; ++k) {
        const int64_t row = active[k];
        const scalar_t* src = base + row * row_stride;
        acc_t running_max = -std::numeric_limits<acc_t>::infinity();
        acc_t running_sum = 0;
        for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
          const int64_t cn = std::min(kChunk, vocab - c0);
          load_scaled(src + c0, cn, inv_temperature, chunk.data());
          online_lse_update(chunk.data(), cn, running_max, running_sum);
        }
        const acc_t log_sum = std::log(running_sum);
        const int64_t y = label[row];
        const acc_t target = (y >= 0 && y < vocab) ? static_cast<acc_t>(src[y]) * inv_temperature
                                                   : std::numeric_limits<acc_t>::quiet_NaN();
        out_logps[row] = (target - running_max) - log_sum;
        if (out_max != nullptr) {
          out_max[row] = running_max;
          out_log_sum[row] = log_sum;
        }
      }
    });
  });
  return {token_logps, row_max, row_log_sum};
}

// Backward op: row_max and row_log_sum from the forward (accumulation dtype), grad_rows [N] float32 or in the
// accumulation dtype.
at::Tensor logits_logps_bwd_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                const at::Tensor& row_max_in, const at::Tensor& row_log_sum_in,
                                const at::Tensor& grad_rows_in, int64_t ignore_index, double temperature) {
  const char* op = "fastpref::logits_logps_bwd";
  // Inner ATen calls are implementation details: keep them below autograd (no graph, no out= checks).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_logits_inputs(op, logits_in, labels_in, temperature);
  const int64_t n = logits_in.size(0);
  const int64_t vocab = logits_in.size(1);
  const auto acc = logits_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_row_vector(op, "row_max", row_max_in, n, acc, acc);
  check_row_vector(op, "row_log_sum", row_log_sum_in, n, acc, acc);
  check_row_vector(op, "grad_rows", grad_rows_in, n, at::kFloat, acc);
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor max_t = row_max_in.contiguous();
  const at::Tensor log_sum_t = row_log_sum_in.contiguous();
  const at::Tensor grad_rows = grad_rows_in.to(at::kDouble).contiguous();
  const at::Tensor logits = unit_stride_rows(logits_in);
  at::Tensor dlogits = at::empty({n, vocab}, logits.options());
  const int64_t* label = labels.data_ptr<int64_t>();
  const double* grad = grad_rows.data_ptr<double>();
  const int64_t row_stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logits_logps_bwd", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const scalar_t* base = logits.data_ptr<scalar_t>();
    scalar_t* out = dlogits.data_ptr<scalar_t>();
    const acc_t inv_temperature = acc_t(1.0 / temperature);
    const acc_t* max = max_t.data_ptr<acc_t>();
    const acc_t* log_sum = log_sum_t.data_ptr<acc_t>();
    at::parallel_for(0, n, row_grain(vocab), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> chunk(std::min(kChunk, vocab));
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* dst = out + row * vocab;
        if (label[row] == ignore_index || grad[row] == 0.0) {
          std::fill(dst, dst + vocab, scalar_t(0));
          continue;
        }
        const scalar_t* src = base + row * row_stride;
        const acc_t scale = acc_t(grad[row]) * inv_temperature;
        const int64_t y = label[row] >= 0 && label[row] < vocab ? label[row] : -1;  // -1: no one-hot term
        for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
          const int64_t cn = std::min(kChunk, vocab - c0);
          load_scaled(src + c0, cn, inv_temperature, chunk.data());
          softmax_grad(chunk.data(), cn, max[row], log_sum[row], scale, acc_t(0), y < 0 ? -1 : y - c0);
          store(chunk.data(), cn, dst + c0);
        }
      }
    });
  });
  return dlogits;
}

}  // namespace
}  // namespace fastpref::cpu

TORCH_LIBRARY_FRAGMENT(fastpref, m) {
  m.def(
      "logits_logps_fwd(Tensor logits, Tensor labels, int ignore_index, float temperature, bool need_lse) "
      "-> (Tensor token_logps, Tensor row_max, Tensor row_log_sum)");
  m.def(
      "logits_logps_bwd(Tensor logits, Tensor labels, Tensor row_max, Tensor row_log_sum, Tensor grad_rows, "
      "int ignore_index, "
      "float temperature) -> Tensor dlogits");
}

TORCH_LIBRARY_IMPL(fastpref, CPU, m) {
  m.impl("logits_logps_fwd", &fastpref::cpu::logits_logps_fwd_cpu);
  m.impl("logits_logps_bwd", &fastpref::cpu::logits_logps_bwd_cpu);
}
