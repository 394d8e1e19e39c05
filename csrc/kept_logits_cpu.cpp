// CPU kernels of fastpref.linear_preference_loss: the trainable head with the loss known, three GEMMs per chunk.
//
// A chunk is a set of rows (whole preference pairs, chosen by the caller under a memory budget). For row t with
// label y_t: z_t = cap(h_t·Wᵀ + b) / T exactly as in linear_logps_cpu.cpp (cap(a) = c·tanh(a / c) for softcap
// c > 0), log p_t = z_t[y_t] − max_t − log Σ_v exp(z_tv − max_t), the row max and log-sum kept apart. The chunk's
// logits are KEPT (one float32 tile [active rows × V]; float64 for float64 inputs) between the two calls:
//
//   kept_logits_fwd   Z = H·Wᵀ into the tile, epilogue (bias, softcap, temperature), per-row max, log-sum and
//                     log p_t. The caller turns the log-probs into the chunk's pair losses and per-row upstream
//                     gradients g_t (a pair-local loss needs nothing outside the chunk).
//   kept_logits_bwd   in place G = (onehot(y) − softmax(z))·g / T·(1 − tanh²(a / c)), then dH = G·W and
//                     dW += Gᵀ·H, db += Σ_t G_t. No logits recompute: 3 GEMMs per chunk instead of 4.
//
// Tiling. The tile is stored block-major: vocabulary block b (columns [v0, v0 + vn)) occupies n·vn contiguous
// elements at offset n·v0, so every GEMM writes a contiguous [n, vn] matrix. The blocks are cut into kKeptGroups
// consecutive groups, the work items of one at::parallel_for region per call: the forward's item computes its
// blocks' logits and each row's partial (max, sum) over its columns, merged in group order afterwards; the
// backward's item forms G on its blocks, owns their dW (and db) rows, and adds G·W_block into its own partial dH,
// the partials summed in group order. The weight is upcast one block at a time (fp16/bf16) into per-thread scratch.
// Only active rows (label ≠ ignore_index) are gathered and cost vocabulary work; ignored rows get log p 0, dH 0.
//
// Callers. fastpref/losses/linear_loss.py calls both inside its custom op fastpref::kept_preference_loss, which
// carries the fake kernel and the autograd formula; these two are never traced, so they have no fake kernel.
//
// Determinism. Blocks and groups depend only on (V, D); each output element is written by one item in a fixed
// order; each item's GEMMs run on one thread. So the bits do not depend on the thread count.
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
#include "op_checks.h"

namespace fastpref::cpu {
namespace {

using namespace linear;

constexpr int64_t kKeptGroups = 16;  // work items of each call (vocabulary groups)

struct KeptPlan {
  int64_t block, blocks, blocks_per_group, groups;
};

// Vocabulary blocks of at most kWeightBlockElems weights (a multiple of kVocabQuantum), small enough that there
// are at least kKeptGroups of them when V allows; then kKeptGroups groups of consecutive blocks.
KeptPlan plan_kept(int64_t vocab, int64_t dim) {
  const int64_t by_weight = std::max(kVocabQuantum, kWeightBlockElems / std::max<int64_t>(dim, 1) / kVocabQuantum *
                                                        kVocabQuantum);
  const int64_t by_groups = ceil_div(ceil_div(vocab, kKeptGroups), kVocabQuantum) * kVocabQuantum;
  KeptPlan plan;
  plan.block = std::min({by_weight, by_groups, vocab});
  plan.blocks = ceil_div(vocab, plan.block);
  plan.blocks_per_group = ceil_div(plan.blocks, std::min(plan.blocks, kKeptGroups));
  plan.groups = ceil_div(plan.blocks, plan.blocks_per_group);
  return plan;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& tile,
                  double temperature, double softcap) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu() &&
                  tile.device().is_cpu(), op, ": expects CPU tensors");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": hidden must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [N, D], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) >= 1, op,
              ": weight must be [V, D] with V >= 1 and D = ", hidden.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dt, op, ": weight dtype ", weight.scalar_type(), " must equal hidden dtype ", dt);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == dt &&
                    bias->device().is_cpu(), op, ": bias must be a CPU [V] tensor of the hidden dtype, got ",
                bias->sizes(), " ", bias->scalar_type());
  }
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0) && labels.scalar_type() == at::kLong, op,
              ": labels must be int64 [N] with N = ", hidden.size(0), ", got ", labels.sizes(), " ",
              labels.scalar_type());
  TORCH_CHECK(tile.dim() == 1 && tile.is_contiguous() && tile.scalar_type() == acc_type(dt), op,
              ": tile must be a contiguous 1-D ", acc_type(dt), " buffer, got ", tile.sizes(), " ", tile.scalar_type());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0 = none), got ",
              softcap);
}

// The active rows of a chunk, gathered and upcast (labels outside [0, V) stored as -1: no target, no one-hot).
struct KeptRows {
  std::vector<int64_t> rows, labels;
  at::Tensor index, hidden, bias;
};

KeptRows gather(const at::Tensor& hidden, const std::optional<at::Tensor>& bias, const at::Tensor& labels_in,
                int64_t ignore_index, int64_t vocab, const at::Tensor& tile) {
  KeptRows k;
  const at::Tensor labels = labels_in.contiguous();
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.size(0); ++i) {
    if (y[i] == ignore_index) continue;
    k.rows.push_back(i);
    k.labels.push_back(y[i] >= 0 && y[i] < vocab ? y[i] : -1);
  }
  const int64_t n = static_cast<int64_t>(k.rows.size());
  TORCH_CHECK(tile.numel() >= n * vocab, "fastpref::kept_logits: tile holds ", tile.numel(), " elements, the chunk ",
              "needs active rows x V = ", n, " x ", vocab);
  k.index = at::from_blob(k.rows.data(), {n}, at::kLong).clone();
  const auto acc = acc_type(hidden.scalar_type());
  k.hidden = hidden.index_select(0, k.index).to(acc).contiguous();
  if (bias.has_value()) k.bias = bias->to(acc).contiguous();
  return k;
}

// One vocabulary block of the tile: [n, vn] contiguous at offset n·v0.
at::Tensor tile_block(const at::Tensor& tile, int64_t n, int64_t v0, int64_t vn) {
  return tile.narrow(0, n * v0, n * vn).view({n, vn});
}

template <typename acc_t>
struct Epilogue {
  const acc_t* bias;
  acc_t cap, inv_temperature, cap_k;
};

template <typename acc_t>
Epilogue<acc_t> epilogue(const KeptRows& k, double temperature, double softcap) {
  return {k.bias.defined() ? k.bias.data_ptr<acc_t>() : nullptr, acc_t(softcap), acc_t(1.0 / temperature),
          softcap > 0 ? acc_t(temperature / softcap) : acc_t(0)};
}

// Runs item(group, first block, last block, weight scratch) for every group in one parallel region.
template <typename Fn>
void for_groups(const KeptPlan& plan, const at::Tensor& weight, at::ScalarType acc, Fn&& item) {
  const bool upcast = weight.scalar_type() != acc;
  at::parallel_for(0, plan.groups, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch state is per thread
    at::Tensor buffer = upcast ? at::empty({plan.block * weight.size(1)}, weight.options().dtype(acc)) : at::Tensor();
    for (int64_t g = begin; g < end; ++g) {
      item(g, g * plan.blocks_per_group, std::min(plan.blocks, (g + 1) * plan.blocks_per_group), buffer);
    }
  });
}

template <typename acc_t>
void forward_chunk(const KeptRows& k, const at::Tensor& weight, const at::Tensor& tile, const KeptPlan& plan,
                   const Epilogue<acc_t>& epi, acc_t* out_logps, acc_t* out_max, acc_t* out_log_sum) {
  const int64_t n = k.hidden.size(0), vocab = weight.size(0);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> part_max(plan.groups * n, kNegInf), part_sum(plan.groups * n, acc_t(0));
  std::vector<acc_t> target(n, std::numeric_limits<acc_t>::quiet_NaN());
  for_groups(plan, weight, tile.scalar_type(), [&](int64_t g, int64_t b0, int64_t b1, at::Tensor& buffer) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * plan.block, vn = std::min(plan.block, vocab - v0);
      at::Tensor z_block = tile_block(tile, n, v0, vn);
      at::mm_out(z_block, k.hidden, weight_block(weight, v0, vn, buffer).t());
      acc_t* base = z_block.data_ptr<acc_t>();
      for (int64_t i = 0; i < n; ++i) {
        acc_t* z = base + i * vn;
        cap_and_temper(z, vn, epi.bias != nullptr ? epi.bias + v0 : nullptr, epi.cap, epi.inv_temperature);
        const int64_t local = k.labels[i] - v0;  // labels are -1 or in [0, V): no overflow
        if (k.labels[i] >= 0 && local >= 0 && local < vn) target[i] = z[local];
        online_lse_update(z, vn, part_max[g * n + i], part_sum[g * n + i]);
      }
    }
  });
  for (int64_t i = 0; i < n; ++i) {
    acc_t row_max = kNegInf, row_sum = 0;
    for (int64_t g = 0; g < plan.groups; ++g) row_max = std::max(row_max, part_max[g * n + i]);
    for (int64_t g = 0; g < plan.groups; ++g) {
      const acc_t part = part_sum[g * n + i];
      if (part != 0) row_sum += part * std::exp(part_max[g * n + i] - row_max);  // a NaN part makes it NaN
    }
    const int64_t r = k.rows[i];
    out_max[r] = row_max;
    out_log_sum[r] = std::log(row_sum);
    out_logps[r] = (target[i] - row_max) - out_log_sum[r];
  }
}

template <typename acc_t>
at::Tensor backward_chunk(const KeptRows& k, const at::Tensor& weight, const at::Tensor& tile, const KeptPlan& plan,
                          const Epilogue<acc_t>& epi, const acc_t* max, const acc_t* log_sum, const acc_t* scale,
                          at::Tensor& dweight, at::Tensor& dbias) {
  const int64_t n = k.hidden.size(0), vocab = weight.size(0), dim = weight.size(1);
  at::Tensor partials = at::zeros({plan.groups, n, dim}, k.hidden.options());
  for_groups(plan, weight, tile.scalar_type(), [&](int64_t g, int64_t b0, int64_t b1, at::Tensor& buffer) {
    at::Tensor partial = partials[g];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * plan.block, vn = std::min(plan.block, vocab - v0);
      at::Tensor z_block = tile_block(tile, n, v0, vn);
      acc_t* base = z_block.data_ptr<acc_t>();
      for (int64_t i = 0; i < n; ++i) {
        softmax_grad(base + i * vn, vn, max[i], log_sum[i], scale[i], epi.cap_k, k.labels[i] - v0);
      }
      const at::Tensor w_block = weight_block(weight, v0, vn, buffer);
      partial.addmm_(z_block, w_block);
      at::Tensor dw_block = dweight.narrow(0, v0, vn);
      dw_block.addmm_(z_block.t(), k.hidden);
      if (dbias.defined()) {
        acc_t* db = dbias.data_ptr<acc_t>() + v0;
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j = 0; j < vn; ++j) db[j] += base[i * vn + j];
        }
      }
    }
  });
  at::Tensor dh = partials[0];
  for (int64_t g = 1; g < plan.groups; ++g) dh.add_(partials[g]);
  return dh;
}

// Forward of one chunk: token_logps, row_max, row_log_sum [N] in the accumulation dtype (0 at ignored rows); the
// active rows' logits left in `tile` for kept_logits_bwd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_logits_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& tile, int64_t ignore_index, double temperature, double softcap) {
  const char* op = "fastpref::kept_logits_fwd";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_inputs(op, hidden, weight_in, bias, labels, tile, temperature, softcap);
  const int64_t rows = hidden.size(0);
  const auto opts = hidden.options().dtype(acc_type(hidden.scalar_type()));
  at::Tensor logps = at::zeros({rows}, opts), row_max = at::zeros({rows}, opts), log_sum = at::zeros({rows}, opts);
  const at::Tensor weight = weight_in.contiguous();
  const KeptRows k = gather(hidden, bias, labels, ignore_index, weight.size(0), tile);
  if (k.rows.empty()) return {logps, row_max, log_sum};
  const KeptPlan plan = plan_kept(weight.size(0), weight.size(1));
  AT_DISPATCH_FLOATING_TYPES(acc_type(hidden.scalar_type()), "kept_logits_fwd", [&] {
    forward_chunk<scalar_t>(k, weight, tile, plan, epilogue<scalar_t>(k, temperature, softcap),
                            logps.data_ptr<scalar_t>(), row_max.data_ptr<scalar_t>(), log_sum.data_ptr<scalar_t>());
  });
  return {logps, row_max, log_sum};
}

// Backward of one chunk from the kept tile (overwritten with G): returns dhidden [N, D] in the accumulation dtype
// (0 at ignored rows) and adds into dweight [V, D] and dbias [V] (accumulation dtype, the caller's running sums over
// chunks). grad_rows [N]: the upstream gradient of each row's log p, in the accumulation dtype.
at::Tensor kept_logits_bwd_cpu(const at::Tensor& hidden, const at::Tensor& weight_in,
                               const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& tile,
                               const at::Tensor& row_max, const at::Tensor& row_log_sum, const at::Tensor& grad_rows,
                               const at::Tensor& dweight_in, const std::optional<at::Tensor>& dbias_in,
                               int64_t ignore_index, double temperature, double softcap) {
  const char* op = "fastpref::kept_logits_bwd";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_inputs(op, hidden, weight_in, bias, labels, tile, temperature, softcap);
  const int64_t rows = hidden.size(0);
  const auto acc = acc_type(hidden.scalar_type());
  check_row_vector(op, "row_max", row_max, rows, acc, acc);
  check_row_vector(op, "row_log_sum", row_log_sum, rows, acc, acc);
  check_row_vector(op, "grad_rows", grad_rows, rows, acc, acc);
  TORCH_CHECK(dweight_in.sizes() == weight_in.sizes() && dweight_in.scalar_type() == acc && dweight_in.is_contiguous(),
              op, ": dweight must be a contiguous ", acc, " tensor of the weight's shape");
  TORCH_CHECK(dbias_in.has_value() == bias.has_value(), op, ": dbias must be given exactly when bias is");
  if (dbias_in.has_value()) {
    TORCH_CHECK(dbias_in->sizes() == bias->sizes() && dbias_in->scalar_type() == acc && dbias_in->is_contiguous(), op,
                ": dbias must be a contiguous ", acc, " [V] tensor");
  }
  at::Tensor dhidden = at::zeros(hidden.sizes(), hidden.options().dtype(acc));
  const at::Tensor weight = weight_in.contiguous();
  const KeptRows k = gather(hidden, bias, labels, ignore_index, weight.size(0), tile);
  if (k.rows.empty()) return dhidden;
  const KeptPlan plan = plan_kept(weight.size(0), weight.size(1));
  at::Tensor dweight = dweight_in;
  at::Tensor dbias = dbias_in.has_value() ? *dbias_in : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "kept_logits_bwd", [&] {
    const int64_t n = static_cast<int64_t>(k.rows.size());
    std::vector<scalar_t> max(n), log_sum(n), scale(n);
    const at::Tensor m = row_max.contiguous(), l = row_log_sum.contiguous(), g = grad_rows.contiguous();
    for (int64_t i = 0; i < n; ++i) {
      max[i] = m.data_ptr<scalar_t>()[k.rows[i]];
      log_sum[i] = l.data_ptr<scalar_t>()[k.rows[i]];
      scale[i] = g.data_ptr<scalar_t>()[k.rows[i]] / scalar_t(temperature);
    }
    const at::Tensor dh = backward_chunk<scalar_t>(k, weight, tile, plan, epilogue<scalar_t>(k, temperature, softcap),
                                                   max.data(), log_sum.data(), scale.data(), dweight, dbias);
    dhidden.index_copy_(0, k.index, dh);
  });
  return dhidden;
}

}  // namespace
}  // namespace fastpref::cpu

TORCH_LIBRARY_FRAGMENT(fastpref, m) {
  m.def(
      "kept_logits_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor(a!) tile, int ignore_index, "
      "float temperature, float softcap) -> (Tensor token_logps, Tensor row_max, Tensor row_log_sum)");
  m.def(
      "kept_logits_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor(a!) tile, Tensor row_max, "
      "Tensor row_log_sum, Tensor grad_rows, Tensor(b!) dweight, Tensor(c!)? dbias, int ignore_index, "
      "float temperature, float softcap) -> Tensor dhidden");
}

TORCH_LIBRARY_IMPL(fastpref, CPU, m) {
  m.impl("kept_logits_fwd", &fastpref::cpu::kept_logits_fwd_cpu);
  m.impl("kept_logits_bwd", &fastpref::cpu::kept_logits_bwd_cpu);
}
