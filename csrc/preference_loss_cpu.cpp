// Fused CPU kernels of fastpref.preference_loss (the "cpp" backend): one pass forward over the B pairs writes the
// per-pair losses, their mean, and TRL's detached rewards; one pass backward writes the exact gradients of the
// four log-prob inputs (chosen, rejected, ref_chosen, ref_rejected) for any upstream gradient on loss and losses.
//
// The formulas and their papers are the loss table in fastpref/losses/table.py; the codes below are the
// positions of its entries. Inputs arrive in the slot order of fastpref/losses/fused.py (absent = undefined).
// Notation: r_w = chosen − ref_chosen, r_l = rejected − ref_rejected, s = f(r) the f-divergence score,
// n the token counts (≥ 1 for length-normalized types), o the offset, Δ the Sr-DPO term (no gradient),
// sp(x) = log(1 + eˣ), σ the logistic. Per-pair arithmetic in float32 (as the
// Triton kernel), batch sums in float64; outputs are float32.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace fastpref {
namespace cpu {
namespace {

enum LossCode : int64_t {
  SIGMOID = 0, HINGE, IPO, SIGMOID_NORM, ROBUST, EXO_PAIR, NCA_PAIR, BCO_PAIR, SPPO_HARD, AOT, AOT_UNPAIRED,
  APO_ZERO, APO_DOWN, DISCOPOP, SFT, CDPO, SIMPO, ODPO, RDPO, SR_DPO, SR_IPO, NUM_CODES
};

// The slots this kernel reads; the list it receives has NUM_SLOTS entries, the last eight (the Triton kernel's
// pre-sorted aot inputs) absent: the aot types are sorted here.
enum Slot : int {
  CHOSEN = 0, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_COUNTS, REJECTED_COUNTS, AUG_CHOSEN, AUG_REJECTED,
  AUG_REF_CHOSEN, AUG_REF_REJECTED, TAU, OFFSET, WEIGHTS, NUM_READ_SLOTS, NUM_SLOTS = NUM_READ_SLOTS + 8
};

enum Divergence : int64_t { REVERSE_KL = 0, FORWARD_KL, JS_DIVERGENCE, ALPHA_DIVERGENCE };

// Per-pair arithmetic type: float, like the Triton kernel (sums over the batch accumulate in double).
using real = float;

struct Params {
  real beta, eps, lambda, gamma, discopop_tau, alpha, alpha_clamp;
  int64_t divergence;
  bool naive;
};

inline real sigmoid(real x) {
  const real e = std::exp(-std::abs(x));
  return x >= 0 ? 1.0f / (1.0f + e) : e / (1.0f + e);
}
inline real softplus(real x) { return std::max(x, 0.0f) + std::log1p(std::exp(-std::abs(x))); }
inline real log_sigmoid(real x) { return -softplus(-x); }

// f-divergence score s = f(r) and ds/dr (TRL's f'(t) at t = e^r).
inline void score(real r, const Params& p, real& s, real& ds) {
  switch (p.divergence) {
    case FORWARD_KL: ds = std::exp(-r); s = 1.0f - ds; return;
    case JS_DIVERGENCE: s = std::log(2.0f) + log_sigmoid(r); ds = sigmoid(-r); return;
    case ALPHA_DIVERGENCE: {
      const real t = (p.alpha - 1.0f) * r;
      const real e = std::exp(std::min(t, p.alpha_clamp));
      s = (e - 1.0f) / (p.alpha - 1.0f);
      ds = t > p.alpha_clamp ? 0.0f : e;
      return;
    }
    default: s = r; ds = 1.0f;
  }
}

// One input column read in its own dtype (no copies): float types or integer counts.
struct Column {
  const void* data = nullptr;
  at::ScalarType type = at::kFloat;

  real at(int64_t i) const {
    switch (type) {
      case at::kFloat: return static_cast<const float*>(data)[i];
      case at::kDouble: return real(static_cast<const double*>(data)[i]);
      case at::kHalf: return float(static_cast<const at::Half*>(data)[i]);
      case at::kBFloat16: return float(static_cast<const at::BFloat16*>(data)[i]);
      case at::kLong: return real(static_cast<const int64_t*>(data)[i]);
      case at::kInt: return real(static_cast<const int32_t*>(data)[i]);
      case at::kShort: return real(static_cast<const int16_t*>(data)[i]);
      case at::kChar: return real(static_cast<const int8_t*>(data)[i]);
      case at::kByte: return real(static_cast<const uint8_t*>(data)[i]);
      default: TORCH_CHECK(false, "preference_loss: unsupported dtype ", type);
    }
  }
};

// The present slots (contiguous 1-D CPU tensors of B values; copies only for strided ones).
struct Inputs {
  std::vector<at::Tensor> keep;
  Column col[NUM_READ_SLOTS];
  bool present[NUM_READ_SLOTS] = {};
  int64_t size = 0;

  explicit Inputs(const std::vector<std::optional<at::Tensor>>& slots) {
    TORCH_CHECK(slots.size() == NUM_SLOTS, "preference_loss: expected ", int(NUM_SLOTS), " slots");
    size = slots[CHOSEN]->numel();
    for (int k = NUM_READ_SLOTS; k < NUM_SLOTS; ++k)
      TORCH_CHECK(!slots[k].has_value() || !slots[k]->defined(), "preference_loss: slot ", k, " is Triton-only");
    for (int k = 0; k < NUM_READ_SLOTS; ++k) {
      if (!slots[k].has_value() || !slots[k]->defined()) continue;
      TORCH_CHECK(slots[k]->numel() == size && slots[k]->device().is_cpu(), "preference_loss: slot ", k,
                  " must be a CPU tensor of ", size, " values");
      keep.push_back(slots[k]->contiguous());
      present[k] = true;
      col[k] = Column{keep.back().data_ptr(), keep.back().scalar_type()};
    }
  }
  real get(int k, int64_t i, real absent = 0.0f) const { return present[k] ? col[k].at(i) : absent; }
};

// Per-pair quantities shared by every loss type.
struct Pair {
  real cw, cl, rw, rl, r_w, r_l, s_w, ds_w, s_l, ds_l, n_w, n_l, offset, tau, delta;
};

inline Pair load_pair(const Inputs& in, int64_t i, const Params& p) {
  Pair v;
  v.cw = in.get(CHOSEN, i);
  v.cl = in.get(REJECTED, i);
  v.rw = in.get(REF_CHOSEN, i);
  v.rl = in.get(REF_REJECTED, i);
  v.r_w = v.cw - v.rw;
  v.r_l = v.cl - v.rl;
  score(v.r_w, p, v.s_w, v.ds_w);
  score(v.r_l, p, v.s_l, v.ds_l);
  v.n_w = std::max(in.get(CHOSEN_COUNTS, i, 1.0f), 1.0f);
  v.n_l = std::max(in.get(REJECTED_COUNTS, i, 1.0f), 1.0f);
  v.offset = in.get(OFFSET, i);
  v.tau = in.get(TAU, i);
  if (p.naive) {
    v.delta = p.beta * (v.r_w - v.r_l);
  } else {
    v.delta = p.beta * ((in.get(AUG_CHOSEN, i) - in.get(AUG_REF_CHOSEN, i)) -
                        (in.get(AUG_REJECTED, i) - in.get(AUG_REF_REJECTED, i)));
  }
  return v;
}

// ℓ of one pair and its partial derivatives with respect to chosen, rejected, ref_chosen, ref_rejected.
struct Term {
  real loss = 0, d_cw = 0, d_cl = 0, d_rw = 0, d_rl = 0;
};

// Loss φ(z) and φ'(z) for the logit-shaped types.
inline void logit_loss(int64_t code, real z, const Pair& v, const Params& p, real& phi, real& dphi) {
  switch (code) {
    case HINGE: phi = std::max(0.0f, 1.0f - z); dphi = z < 1.0f ? -1.0f : 0.0f; return;
    case ROBUST:
      phi = ((1 - p.eps) * softplus(-z) - p.eps * softplus(z)) / (1 - 2 * p.eps);
      dphi = (-(1 - p.eps) * sigmoid(-z) - p.eps * sigmoid(z)) / (1 - 2 * p.eps);
      return;
    case EXO_PAIR: {
      const real sw = sigmoid(z), sl = sigmoid(-z);
      phi = sw * (log_sigmoid(z) - std::log1p(-p.eps)) + sl * (log_sigmoid(-z) - std::log(p.eps));
      dphi = sw * sl * (z - std::log1p(-p.eps) + std::log(p.eps));
      return;
    }
    case DISCOPOP: {
      const real m = sigmoid(z / p.discopop_tau);
      const real em = std::exp(log_sigmoid(z / p.discopop_tau) - z);  // m·e^(−z) without overflow
      phi = (1 - m) * softplus(-z) + em;
      dphi = -(1 - m) * sigmoid(-z) + m * (1 - m) / p.discopop_tau * (-softplus(-z)) - em +
             em * (1 - m) / p.discopop_tau;
      return;
    }
    case CDPO: case SIMPO: case AOT: case AOT_UNPAIRED:
      phi = (1 - p.eps) * softplus(-z) + p.eps * softplus(z);
      dphi = sigmoid(z) - (1 - p.eps);
      return;
    case RDPO:
      phi = v.tau * softplus(-z) + (1 - v.tau) * softplus(z);
      dphi = sigmoid(z) - v.tau;
      return;
    case IPO: case SR_IPO: {
      const real u = z - 1.0f / (2 * p.beta);
      phi = u * u;
      dphi = 2 * u;
      return;
    }
    default:  // SIGMOID, SIGMOID_NORM, ODPO, SR_DPO
      phi = softplus(-z);
      dphi = -sigmoid(-z);
  }
}

inline Term pair_term(int64_t code, const Pair& v, const Params& p) {
  Term t;
  const real b = p.beta;
  switch (code) {
    case NCA_PAIR: case BCO_PAIR: case APO_ZERO: case APO_DOWN: case SPPO_HARD: {
      // functions of the two rewards a = c·r_w, b = c·r_l (c = β; c = 1 for sppo_hard)
      const real c = code == SPPO_HARD ? 1.0f : b;
      const real x = c * v.r_w, y = c * v.r_l;
      real dx, dy;
      if (code == NCA_PAIR) {
        t.loss = softplus(-x) + 0.5f * softplus(x) + 0.5f * softplus(y);
        dx = -sigmoid(-x) + 0.5f * sigmoid(x);
        dy = 0.5f * sigmoid(y);
      } else if (code == BCO_PAIR) {
        t.loss = softplus(-x) + softplus(y);
        dx = -sigmoid(-x);
        dy = sigmoid(y);
      } else if (code == APO_ZERO) {
        t.loss = 1 - sigmoid(x) + sigmoid(y);
        dx = -sigmoid(x) * sigmoid(-x);
        dy = sigmoid(y) * sigmoid(-y);
      } else if (code == APO_DOWN) {
        const real g = sigmoid(x - y) * sigmoid(y - x);
        t.loss = sigmoid(x) + 1 - sigmoid(x - y);
        dx = sigmoid(x) * sigmoid(-x) - g;
        dy = g;
      } else {  // SPPO_HARD
        const real u = x - 0.5f / b, w = y + 0.5f / b;
        t.loss = u * u + w * w;
        dx = 2 * u;
        dy = 2 * w;
      }
      t.d_cw = c * dx; t.d_rw = -c * dx;
      t.d_cl = c * dy; t.d_rl = -c * dy;
      return t;
    }
    default: break;
  }
  // logit-shaped: z = Σ of coefficients × inputs; dz_* are ∂z/∂(chosen, rejected, ref_chosen, ref_rejected)
  real z, dz_cw, dz_cl, dz_rw, dz_rl;
  switch (code) {
    case IPO: case SIGMOID_NORM: {
      const real c = code == IPO ? 1.0f : b;
      z = c * (v.s_w / v.n_w - v.s_l / v.n_l) - (code == IPO ? 0.0f : v.offset);
      dz_cw = c * v.ds_w / v.n_w; dz_rw = -dz_cw;
      dz_cl = -c * v.ds_l / v.n_l; dz_rl = -dz_cl;
      break;
    }
    case SIMPO:
      z = b * (v.cw / v.n_w - v.cl / v.n_l) - p.gamma - v.offset;
      dz_cw = b / v.n_w; dz_cl = -b / v.n_l; dz_rw = 0; dz_rl = 0;
      break;
    case SR_DPO:
      z = b * (v.r_w - v.r_l) - p.lambda * v.delta - v.offset;
      dz_cw = b; dz_rw = -b; dz_cl = -b; dz_rl = b;
      break;
    case SR_IPO:
      z = (v.r_w - v.r_l) - p.lambda * v.delta;
      dz_cw = 1; dz_rw = -1; dz_cl = -1; dz_rl = 1;
      break;
    default:  // SIGMOID, HINGE, ROBUST, EXO_PAIR, DISCOPOP, CDPO, ODPO, RDPO: z = β·(s_w − s_l) − o
      z = b * (v.s_w - v.s_l) - v.offset;
      dz_cw = b * v.ds_w; dz_rw = -dz_cw;
      dz_cl = -b * v.ds_l; dz_rl = -dz_cl;
  }
  real phi, dphi;
  logit_loss(code, z, v, p, phi, dphi);
  t.loss = phi;
  t.d_cw = dphi * dz_cw; t.d_cl = dphi * dz_cl; t.d_rw = dphi * dz_rw; t.d_rl = dphi * dz_rl;
  return t;
}

// aot types: position i pairs the i-th smallest values of two batch quantities, z_i = β·(first_i − second_i);
// aot: first = chosen − rejected, second = ref_chosen − ref_rejected; aot_unpaired: first = r_w, second = r_l.
// rank[j] is pair j's position in each sorted order.
struct SortedBatch {
  std::vector<real> first, second;
  std::vector<int64_t> first_rank, second_rank;

  real logit(int64_t i, const Params& p) const { return p.beta * (first[i] - second[i]); }
};

void sort_with_rank(std::vector<real>& values, std::vector<int64_t>& rank) {
  const int64_t size = int64_t(values.size());
  std::vector<int64_t> order(size);
  std::iota(order.begin(), order.end(), 0);
  // NaN last, so the order stays a strict weak ordering even when value checks are switched off
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return values[a] < values[b] || (std::isnan(values[b]) && !std::isnan(values[a]));
  });
  std::vector<real> sorted(size);
  rank.resize(size);
  for (int64_t i = 0; i < size; ++i) {
    sorted[i] = values[order[i]];
    rank[order[i]] = i;
  }
  values.swap(sorted);
}

SortedBatch sort_batch(const Inputs& in, int64_t code) {
  SortedBatch s;
  s.first.resize(in.size);
  s.second.resize(in.size);
  for (int64_t i = 0; i < in.size; ++i) {
    const real cw = in.get(CHOSEN, i), cl = in.get(REJECTED, i);
    const real rw = in.get(REF_CHOSEN, i), rl = in.get(REF_REJECTED, i);
    s.first[i] = code == AOT ? cw - cl : cw - rw;
    s.second[i] = code == AOT ? rw - rl : cl - rl;
  }
  sort_with_rank(s.first, s.first_rank);
  sort_with_rank(s.second, s.second_rank);
  return s;
}

Params make_params(c10::ArrayRef<double> scalars, int64_t divergence, bool naive) {
  TORCH_CHECK(scalars.size() == 7, "preference_loss: expected 7 scalars");
  return Params{real(scalars[0]), real(scalars[1]), real(scalars[2]), real(scalars[3]), real(scalars[4]),
                real(scalars[5]), real(scalars[6]), divergence, naive};
}

bool has_code(c10::ArrayRef<int64_t> codes, int64_t wanted) {
  for (int64_t code : codes)
    if (code == wanted) return true;
  return false;
}

void check_codes(c10::ArrayRef<int64_t> codes, c10::ArrayRef<double> loss_weights, const Inputs& in) {
  TORCH_CHECK(codes.size() == loss_weights.size() && !codes.empty(), "preference_loss: codes/weights mismatch");
  for (int64_t code : codes) {
    TORCH_CHECK(code >= 0 && code < NUM_CODES, "preference_loss: unknown loss code ", code);
    if (code == SFT) TORCH_CHECK(in.present[CHOSEN_COUNTS], "preference_loss: sft needs chosen_counts");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_fwd_cpu(
    const std::vector<std::optional<at::Tensor>>& slots, c10::ArrayRef<int64_t> codes,
    c10::ArrayRef<double> loss_weights, c10::ArrayRef<double> scalars, int64_t divergence, bool naive) {
  const Inputs in(slots);
  const Params p = make_params(scalars, divergence, naive);
  check_codes(codes, loss_weights, in);
  const int64_t size = in.size;
  auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  at::Tensor losses = at::empty({size}, opts), chosen_rewards = at::empty({size}, opts);
  at::Tensor rejected_rewards = at::empty({size}, opts), margins = at::empty({size}, opts);
  float *out = losses.data_ptr<float>(), *cr = chosen_rewards.data_ptr<float>();
  float *rr = rejected_rewards.data_ptr<float>(), *mg = margins.data_ptr<float>();

  real sft_value = 0;  // −Σ chosen / Σ chosen_counts (TRL's batch token mean)
  const SortedBatch aot = has_code(codes, AOT) ? sort_batch(in, AOT) : SortedBatch{};
  const SortedBatch aot_unpaired = has_code(codes, AOT_UNPAIRED) ? sort_batch(in, AOT_UNPAIRED) : SortedBatch{};
  if (has_code(codes, SFT)) {
    double total = 0, tokens = 0;
    for (int64_t i = 0; i < size; ++i) { total += in.get(CHOSEN, i); tokens += in.get(CHOSEN_COUNTS, i); }
    sft_value = real(-total / tokens);
  }
  std::vector<double> totals(size);
  for (int64_t i = 0; i < size; ++i) {
    const Pair v = load_pair(in, i, p);
    real total = 0;
    for (size_t k = 0; k < codes.size(); ++k) {
      const int64_t code = codes[k];
      real value;
      if (code == SFT) {
        value = sft_value;
      } else if (code == AOT || code == AOT_UNPAIRED) {
        real dphi;
        logit_loss(code, (code == AOT ? aot : aot_unpaired).logit(i, p), v, p, value, dphi);
      } else {
        value = pair_term(code, v, p).loss;
      }
      total += loss_weights[k] * value;
    }
    total *= in.get(WEIGHTS, i, 1.0f);
    totals[i] = total;
    out[i] = float(total);
    cr[i] = float(p.beta * v.r_w);
    rr[i] = float(p.beta * v.r_l);
    mg[i] = float(p.beta * v.r_w - p.beta * v.r_l);
  }
  double sum = 0;
  for (int64_t i = 0; i < size; ++i) sum += totals[i];
  at::Tensor loss = at::full({}, sum / double(size), opts);
  return {loss, losses, chosen_rewards, rejected_rewards, margins};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_bwd_cpu(
    const std::vector<std::optional<at::Tensor>>& slots, c10::ArrayRef<int64_t> codes,
    c10::ArrayRef<double> loss_weights, c10::ArrayRef<double> scalars, int64_t divergence, bool naive,
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_losses) {
  const Inputs in(slots);
  const Params p = make_params(scalars, divergence, naive);
  check_codes(codes, loss_weights, in);
  const int64_t size = in.size;
  const double mean_grad = grad_loss.to(at::kDouble).item<double>() / double(size);
  at::Tensor upstream_tensor;
  const float* upstream = nullptr;
  if (grad_losses.has_value() && grad_losses->defined()) {
    upstream_tensor = grad_losses->to(at::kFloat).contiguous();
    TORCH_CHECK(upstream_tensor.numel() == size, "preference_loss: grad_losses must have B values");
    upstream = upstream_tensor.data_ptr<float>();
  }
  // G_i = ∂L/∂losses_i: the mean's share plus any direct upstream gradient on losses
  auto G = [&](int64_t i) { return real(mean_grad + (upstream ? double(upstream[i]) : 0.0f)); };

  auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  at::Tensor d_chosen = at::empty({size}, opts), d_rejected = at::empty({size}, opts);
  at::Tensor d_ref_chosen = at::empty({size}, opts), d_ref_rejected = at::empty({size}, opts);
  float *dcw = d_chosen.data_ptr<float>(), *dcl = d_rejected.data_ptr<float>();
  float *drw = d_ref_chosen.data_ptr<float>(), *drl = d_ref_rejected.data_ptr<float>();

  real sft_grad = 0;  // ∂L/∂chosen_j of the sft term = −Σ_i G_i·w_i / Σ chosen_counts (per unit loss weight)
  const SortedBatch aot = has_code(codes, AOT) ? sort_batch(in, AOT) : SortedBatch{};
  const SortedBatch aot_unpaired = has_code(codes, AOT_UNPAIRED) ? sort_batch(in, AOT_UNPAIRED) : SortedBatch{};
  if (has_code(codes, SFT)) {
    double weighted = 0, tokens = 0;
    for (int64_t i = 0; i < size; ++i) {
      weighted += G(i) * in.get(WEIGHTS, i, 1.0f);
      tokens += in.get(CHOSEN_COUNTS, i);
    }
    sft_grad = real(-weighted / tokens);
  }
  for (int64_t j = 0; j < size; ++j) {
    const Pair v = load_pair(in, j, p);
    const real scale = G(j) * in.get(WEIGHTS, j, 1.0f);
    real gcw = 0, gcl = 0, grw = 0, grl = 0;
    for (size_t k = 0; k < codes.size(); ++k) {
      const int64_t code = codes[k];
      const real lw = loss_weights[k];
      if (code == SFT) {
        gcw += lw * sft_grad;
      } else if (code == AOT || code == AOT_UNPAIRED) {
        // pair j sits at position rank_first[j] of the first sorted quantity and rank_second[j] of the second
        const SortedBatch& sorted = code == AOT ? aot : aot_unpaired;
        const int64_t at_first = sorted.first_rank[j], at_second = sorted.second_rank[j];
        real phi, d_first, d_second;
        logit_loss(code, sorted.logit(at_first, p), v, p, phi, d_first);
        logit_loss(code, sorted.logit(at_second, p), v, p, phi, d_second);
        d_first *= lw * G(at_first) * p.beta;
        d_second *= lw * G(at_second) * p.beta;
        if (code == AOT) {  // first = chosen − rejected, second = ref_chosen − ref_rejected
          gcw += d_first; gcl -= d_first; grw -= d_second; grl += d_second;
        } else {  // first = chosen − ref_chosen, second = rejected − ref_rejected
          gcw += d_first; grw -= d_first; gcl -= d_second; grl += d_second;
        }
      } else {
        const Term t = pair_term(code, v, p);
        gcw += scale * lw * t.d_cw; gcl += scale * lw * t.d_cl;
        grw += scale * lw * t.d_rw; grl += scale * lw * t.d_rl;
      }
    }
    dcw[j] = float(gcw); dcl[j] = float(gcl); drw[j] = float(grw); drl[j] = float(grl);
  }
  return {d_chosen, d_rejected, d_ref_chosen, d_ref_rejected};
}

}  // namespace cpu
}  // namespace fastpref

TORCH_LIBRARY_FRAGMENT(fastpref, m) {
  m.def(
      "preference_loss_fwd(Tensor?[] slots, int[] codes, float[] loss_weights, float[] scalars, int divergence, "
      "bool naive) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "preference_loss_bwd(Tensor?[] slots, int[] codes, float[] loss_weights, float[] scalars, int divergence, "
      "bool naive, Tensor grad_loss, Tensor? grad_losses) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastpref, CPU, m) {
  m.impl("preference_loss_fwd", &fastpref::cpu::preference_loss_fwd_cpu);
  m.impl("preference_loss_bwd", &fastpref::cpu::preference_loss_bwd_cpu);
}
