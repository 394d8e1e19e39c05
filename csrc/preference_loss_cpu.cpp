// Fused CPU kernels of fastpref.preference_loss (the "cpp" backend): one pass forward over the B pairs writes the
// per-pair losses, their mean, and TRL's detached rewards; one pass backward writes the exact gradients of the
// four log-prob inputs (chosen, rejected, ref_chosen, ref_rejected) for any upstream gradient on loss and losses.
//
// The formulas and their papers are the loss table in fastpref/losses/table.py, which also fixes the layout read
// here: loss codes, slots, scalars and f-divergences in the order of the enums below (preference_loss_layout
// reports their names; a test compares them with the table). Notation: r_w = chosen − ref_chosen,
// r_l = rejected − ref_rejected, s = f(r) the f-divergence score, n the token counts (≥ 1 for length-normalized
// types), o the offset, Δ the Sr-DPO term (an input, no gradient), sp(x) = log(1 + eˣ), σ the logistic.
// Per-pair arithmetic in the inputs' precision (`real`: double for float64 inputs, float otherwise) in forms that
// do not cancel (σ(−z), never 1 − σ(z)); settings and the coefficients derived from them in double; batch sums in
// double. Outputs in double for float64 inputs, else float.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

namespace fastpref {
namespace cpu {
namespace {

// ---- the layout (fastpref/losses/table.py: LOSS_DEFINITIONS order, PAIR_SLOTS, SCALARS, F_DIVERGENCES) --------
enum LossCode : int64_t {
  SIGMOID = 0, HINGE, IPO, SIGMOID_NORM, ROBUST, EXO_PAIR, NCA_PAIR, BCO_PAIR, SPPO_HARD, AOT, AOT_UNPAIRED,
  APO_ZERO, APO_DOWN, DISCOPOP, SFT, CDPO, SIMPO, ODPO, RDPO, SR_DPO, SR_IPO, ORPO, ASFT,
  IPO_SUM, NUM_CODES
};
const char* const kLossNames[NUM_CODES] = {
    "sigmoid", "hinge", "ipo", "sigmoid_norm", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "cdpo", "simpo", "odpo", "rdpo", "sr_dpo", "sr_ipo",
    "orpo", "asft", "ipo_sum"};

enum Slot : int {
  CHOSEN = 0, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_COUNTS, REJECTED_COUNTS, DELTA, TAU, OFFSET, WEIGHTS,
  NUM_SLOTS
};
const char* const kSlotNames[NUM_SLOTS] = {"chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_counts",
                                           "rejected_counts", "delta", "tau", "offset", "weights"};

enum Scalar : int {
  BETA = 0, LABEL_SMOOTHING, REFINE_LAMBDA, SIMPO_GAMMA, DISCOPOP_TAU, F_ALPHA, ALPHA_CLAMP, NUM_SCALARS
};
const char* const kScalarNames[NUM_SCALARS] = {"beta", "label_smoothing", "refine_lambda", "simpo_gamma",
                                               "discopop_tau", "f_alpha_divergence_coef", "alpha_clamp"};

enum Divergence : int64_t { REVERSE_KL = 0, FORWARD_KL, JS_DIVERGENCE, ALPHA_DIVERGENCE, NUM_DIVERGENCES };
const char* const kDivergenceNames[NUM_DIVERGENCES] = {"reverse_kl", "forward_kl", "js_divergence",
                                                       "alpha_divergence"};

// The settings of one call as named fields, and the coefficients derived from them, all in double: ε is never
// rounded before it is amplified (1 − 2ε for robust near ε = ½).
struct Settings {
  double beta, eps, lambda, gamma, discopop_tau, alpha, alpha_clamp;
  int64_t divergence;
  double keep, flip;                // 1 − ε and ε (cdpo, simpo, aot)
  double robust_slope;              // ε/(1 − 2ε)
  double exo_keep, exo_flip;        // log(1 − ε) and log ε (exo_pair, 0 < ε < 1)
  double ipo_target;                // 1/(2β)
};

Settings make_settings(c10::ArrayRef<double> scalars, int64_t divergence) {
  TORCH_CHECK(scalars.size() == NUM_SCALARS, "preference_loss: expected ", int(NUM_SCALARS), " scalars");
  TORCH_CHECK(divergence >= 0 && divergence < NUM_DIVERGENCES, "preference_loss: unknown divergence ", divergence);
  Settings s{};
  s.beta = scalars[BETA];
  s.eps = scalars[LABEL_SMOOTHING];
  s.lambda = scalars[REFINE_LAMBDA];
  s.gamma = scalars[SIMPO_GAMMA];
  s.discopop_tau = scalars[DISCOPOP_TAU];
  s.alpha = scalars[F_ALPHA];
  s.alpha_clamp = scalars[ALPHA_CLAMP];
  s.divergence = divergence;
  s.keep = 1.0 - s.eps;
  s.flip = s.eps;
  s.robust_slope = s.eps / (1.0 - 2.0 * s.eps);
  const bool open = s.eps > 0.0 && s.eps < 1.0;
  s.exo_keep = open ? std::log1p(-s.eps) : 0.0;
  s.exo_flip = open ? std::log(s.eps) : 0.0;
  s.ipo_target = 0.5 / s.beta;
  return s;
}

template <typename real>
inline real sigmoid(real x) {
  const real e = std::exp(-std::abs(x));
  return x >= 0 ? real(1) / (real(1) + e) : e / (real(1) + e);
}
template <typename real>
inline real softplus(real x) {
  return std::max(x, real(0)) + std::log1p(std::exp(-std::abs(x)));
}
template <typename real>
inline real log_sigmoid(real x) {
  return -softplus(-x);
}

// f-divergence score s = f(r) and ds/dr (TRL's f'(t) at t = e^r).
template <typename real>
inline void score(real r, const Settings& p, real& s, real& ds) {
  switch (p.divergence) {
    case FORWARD_KL: ds = std::exp(-r); s = -std::expm1(-r); return;
    case JS_DIVERGENCE: s = real(std::log(2.0)) + log_sigmoid(r); ds = sigmoid(-r); return;
    case ALPHA_DIVERGENCE: {
      const real a1 = real(p.alpha - 1.0);
      const real t = a1 * r;
      const real e = std::exp(std::min(t, real(p.alpha_clamp)));
      s = (e - real(1)) / a1;
      ds = t > real(p.alpha_clamp) ? real(0) : e;
      return;
    }
    default: s = r; ds = real(1);
  }
}

// One input column read in its own dtype (no copies): float types or integer counts.
struct Column {
  const void* data = nullptr;
  at::ScalarType type = at::kFloat;

  template <typename real>
  real at(int64_t i) const {
    switch (type) {
      case at::kFloat: return real(static_cast<const float*>(data)[i]);
      case at::kDouble: return real(static_cast<const double*>(data)[i]);
      case at::kHalf: return real(float(static_cast<const at::Half*>(data)[i]));
      case at::kBFloat16: return real(float(static_cast<const at::BFloat16*>(data)[i]));
      case at::kLong: return real(static_cast<const int64_t*>(data)[i]);
      case at::kInt: return real(static_cast<const int32_t*>(data)[i]);
      case at::kShort: return real(static_cast<const int16_t*>(data)[i]);
      case at::kChar: return real(static_cast<const int8_t*>(data)[i]);
      case at::kByte: return real(static_cast<const uint8_t*>(data)[i]);
      default: TORCH_CHECK(false, "preference_loss: unsupported dtype ", type);
    }
  }
};

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The present slots (1-D CPU tensors of B values; copies only for strided ones).
struct Inputs {
  std::vector<at::Tensor> keep;
  Column col[NUM_SLOTS];
  bool present[NUM_SLOTS] = {};
  int64_t size = 0;

  explicit Inputs(const std::vector<std::optional<at::Tensor>>& slots) {
    TORCH_CHECK(slots.size() == NUM_SLOTS, "preference_loss: expected ", int(NUM_SLOTS), " slots");
    TORCH_CHECK(given(slots[CHOSEN]) && given(slots[REJECTED]), "preference_loss: chosen and rejected are required");
    size = slots[CHOSEN]->numel();
    for (int k = 0; k < NUM_SLOTS; ++k) {
      if (!given(slots[k])) continue;
      TORCH_CHECK(slots[k]->numel() == size && slots[k]->device().is_cpu(), "preference_loss: slot ", kSlotNames[k],
                  " must be a CPU tensor of ", size, " values");
      keep.push_back(slots[k]->contiguous());
      present[k] = true;
      col[k] = Column{keep.back().data_ptr(), keep.back().scalar_type()};
    }
  }
  template <typename real>
  real get(int k, int64_t i, real absent = real(0)) const {
    return present[k] ? col[k].at<real>(i) : absent;
  }
};

// Per-pair quantities shared by every loss type.
template <typename real>
struct Pair {
  real cw, cl, rw, rl, r_w, r_l, s_w, ds_w, s_l, ds_l, n_w, n_l, offset, tau, delta;
};

template <typename real>
inline Pair<real> load_pair(const Inputs& in, int64_t i, const Settings& p) {
  Pair<real> v;
  v.cw = in.get<real>(CHOSEN, i);
  v.cl = in.get<real>(REJECTED, i);
  v.rw = in.get<real>(REF_CHOSEN, i);
  v.rl = in.get<real>(REF_REJECTED, i);
  v.r_w = v.cw - v.rw;
  v.r_l = v.cl - v.rl;
  score(v.r_w, p, v.s_w, v.ds_w);
  score(v.r_l, p, v.s_l, v.ds_l);
  v.n_w = std::max(in.get<real>(CHOSEN_COUNTS, i, real(1)), real(1));
  v.n_l = std::max(in.get<real>(REJECTED_COUNTS, i, real(1)), real(1));
  v.offset = in.get<real>(OFFSET, i);
  v.tau = in.get<real>(TAU, i);
  v.delta = in.get<real>(DELTA, i);
  return v;
}

// ℓ of one pair and its partial derivatives with respect to chosen, rejected, ref_chosen, ref_rejected.
template <typename real>
struct Term {
  real loss = 0, d_cw = 0, d_cl = 0, d_rw = 0, d_rl = 0;
};

// DiscoPOP: m = σ(z/τ), ℓ = (1 − m)·sp(−z) + m·e^(−z), with 1 − m = σ(−z/τ) and m·e^(−z) = e^(log σ(z/τ) − z).
template <typename real>
inline void discopop(real z, const Settings& p, real& phi, real& dphi) {
  const real inv_tau = real(1.0 / p.discopop_tau);
  const real m = sigmoid(z * inv_tau), keep = sigmoid(-z * inv_tau);
  const real em = std::exp(log_sigmoid(z * inv_tau) - z);
  const real sp = softplus(-z), dm = m * keep * inv_tau;  // dm/dz
  phi = keep * sp + em;
  dphi = -keep * sigmoid(-z) - dm * sp + em * keep * inv_tau - em;
}

// Loss φ(z) and φ'(z) for the logit-shaped types.
template <typename real>
inline void logit_loss(int64_t code, real z, const Pair<real>& v, const Settings& p, real& phi, real& dphi) {
  switch (code) {
    case HINGE: phi = std::max(real(0), real(1) - z); dphi = z < real(1) ? real(-1) : real(0); return;
    case ROBUST: {  // ((1 − ε)·sp(−z) − ε·sp(z))/(1 − 2ε) = sp(−z) − z·ε/(1 − 2ε), with sp(z) = sp(−z) + z: the
                    // two terms, each ~1/(1 − 2ε) times larger than ℓ, no longer cancel
      const real slope = real(p.robust_slope);
      phi = softplus(-z) - slope * z;
      dphi = -sigmoid(-z) - slope;
      return;
    }
    case EXO_PAIR: {
      const real sw = sigmoid(z), sl = sigmoid(-z), keep = real(p.exo_keep), flip = real(p.exo_flip);
      phi = sw * (log_sigmoid(z) - keep) + sl * (log_sigmoid(-z) - flip);
      dphi = sw * sl * (z - keep + flip);
      return;
    }
    case DISCOPOP: discopop(z, p, phi, dphi); return;
    case CDPO: case SIMPO: case AOT: case AOT_UNPAIRED: {
      const real keep = real(p.keep), flip = real(p.flip);
      phi = keep * softplus(-z) + flip * softplus(z);
      dphi = flip * sigmoid(z) - keep * sigmoid(-z);
      return;
    }
    case RDPO:
      phi = v.tau * softplus(-z) + (real(1) - v.tau) * softplus(z);
      dphi = (real(1) - v.tau) * sigmoid(z) - v.tau * sigmoid(-z);
      return;
    case ORPO: {
      const real b = real(p.beta);
      phi = b * softplus(-z);
      dphi = -b * sigmoid(-z);
      return;
    }
    case IPO: case SR_IPO: case IPO_SUM: {
      const real u = z - real(p.ipo_target);
      phi = u * u;
      dphi = 2 * u;
      return;
    }
    default:  // SIGMOID, SIGMOID_NORM, ODPO, SR_DPO
      phi = softplus(-z);
      dphi = -sigmoid(-z);
  }
}

// The types built on the two rewards x = c·r_w, y = c·r_l (c = β; c = 1 for sppo_hard): ℓ, ∂ℓ/∂x, ∂ℓ/∂y.
template <typename real>
inline void reward_loss(int64_t code, real x, real y, const Settings& p, real& loss, real& dx, real& dy) {
  if (code == NCA_PAIR) {
    loss = softplus(-x) + real(0.5) * softplus(x) + real(0.5) * softplus(y);
    dx = real(0.5) * sigmoid(x) - sigmoid(-x);
    dy = real(0.5) * sigmoid(y);
  } else if (code == BCO_PAIR) {
    loss = softplus(-x) + softplus(y);
    dx = -sigmoid(-x);
    dy = sigmoid(y);
  } else if (code == APO_ZERO) {  // 1 − σ(x) + σ(y) = σ(−x) + σ(y)
    loss = sigmoid(-x) + sigmoid(y);
    dx = -sigmoid(x) * sigmoid(-x);
    dy = sigmoid(y) * sigmoid(-y);
  } else if (code == APO_DOWN) {  // σ(x) + 1 − σ(x − y) = σ(x) + σ(y − x)
    const real g = sigmoid(x - y) * sigmoid(y - x);
    loss = sigmoid(x) + sigmoid(y - x);
    dx = sigmoid(x) * sigmoid(-x) - g;
    dy = g;
  } else {  // SPPO_HARD
    const real u = x - real(p.ipo_target), w = y + real(p.ipo_target);
    loss = u * u + w * w;
    dx = 2 * u;
    dy = 2 * w;
  }
}

// Log odds L = m − log(1 − eᵐ) of the mean token log-prob m = logps/n (capped at kMaxMeanLogp: m = 0 is +∞), as
// log(−expm1(m)), and dL/d(logps) = 1/(n·(1 − eᵐ)), 0 above the cap (fastpref/losses/table.py: MAX_MEAN_LOGP).
constexpr double kMaxMeanLogp = -1e-6;
template <typename real>
inline void log_odds(real logps, real n, real& odds, real& d_odds) {
  const real raw = logps / n, cap = real(kMaxMeanLogp);
  const real m = std::min(raw, cap);
  const real one_minus = -std::expm1(m);
  odds = m - std::log(one_minus);
  d_odds = raw > cap ? real(0) : real(1) / (n * one_minus);
}

template <typename real>
inline Term<real> pair_term(int64_t code, const Pair<real>& v, const Settings& p) {
  Term<real> t;
  const real b = real(p.beta);
  if (code == NCA_PAIR || code == BCO_PAIR || code == APO_ZERO || code == APO_DOWN || code == SPPO_HARD) {
    const real c = code == SPPO_HARD ? real(1) : b;
    real dx, dy;
    reward_loss(code, c * v.r_w, c * v.r_l, p, t.loss, dx, dy);
    t.d_cw = c * dx; t.d_rw = -c * dx;
    t.d_cl = c * dy; t.d_rl = -c * dy;
    return t;
  }
  if (code == ASFT) {  // sp(−x) + sp(y) on x = β·L_w, y = β·L_l: bco_pair's form, reference-free
    real lw, dlw, ll, dll, dx, dy;
    log_odds(v.cw, v.n_w, lw, dlw);
    log_odds(v.cl, v.n_l, ll, dll);
    reward_loss(BCO_PAIR, b * lw, b * ll, p, t.loss, dx, dy);
    t.d_cw = b * dlw * dx;
    t.d_cl = b * dll * dy;
    return t;
  }
  // logit-shaped: z = Σ of coefficients × inputs; dz_* are ∂z/∂(chosen, rejected, ref_chosen, ref_rejected)
  real z, dz_cw, dz_cl, dz_rw, dz_rl;
  const real lam = real(p.lambda);
  switch (code) {
    case IPO: case SIGMOID_NORM: {
      const real c = code == IPO ? real(1) : b;
      z = c * (v.s_w / v.n_w - v.s_l / v.n_l) - (code == IPO ? real(0) : v.offset);
      dz_cw = c * v.ds_w / v.n_w; dz_rw = -dz_cw;
      dz_cl = -c * v.ds_l / v.n_l; dz_rl = -dz_cl;
      break;
    }
    case SIMPO:
      z = b * (v.cw / v.n_w - v.cl / v.n_l) - real(p.gamma) - v.offset;
      dz_cw = b / v.n_w; dz_cl = -b / v.n_l; dz_rw = 0; dz_rl = 0;
      break;
    case SR_DPO:
      z = b * (v.r_w - v.r_l) - lam * v.delta - v.offset;
      dz_cw = b; dz_rw = -b; dz_cl = -b; dz_rl = b;
      break;
    case ORPO: {
      real lw, dlw, ll, dll;
      log_odds(v.cw, v.n_w, lw, dlw);
      log_odds(v.cl, v.n_l, ll, dll);
      z = lw - ll;
      dz_cw = dlw; dz_cl = -dll; dz_rw = 0; dz_rl = 0;
      break;
    }
    case IPO_SUM:
      z = v.s_w - v.s_l;
      dz_cw = v.ds_w; dz_rw = -dz_cw;
      dz_cl = -v.ds_l; dz_rl = -dz_cl;
      break;
    case SR_IPO:
      z = (v.r_w - v.r_l) - lam * v.delta;
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
template <typename real>
struct SortedBatch {
  std::vector<real> first, second;
  std::vector<int64_t> first_rank, second_rank;

  real logit(int64_t i, const Settings& p) const { return real(p.beta) * (first[i] - second[i]); }
};

template <typename real>
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

template <typename real>
SortedBatch<real> sort_batch(const Inputs& in, int64_t code) {
  SortedBatch<real> s;
  s.first.resize(in.size);
  s.second.resize(in.size);
  for (int64_t i = 0; i < in.size; ++i) {
    const real cw = in.get<real>(CHOSEN, i), cl = in.get<real>(REJECTED, i);
    const real rw = in.get<real>(REF_CHOSEN, i), rl = in.get<real>(REF_REJECTED, i);
    s.first[i] = code == AOT ? cw - cl : cw - rw;
    s.second[i] = code == AOT ? rw - rl : cl - rl;
  }
  sort_with_rank(s.first, s.first_rank);
  sort_with_rank(s.second, s.second_rank);
  return s;
}

// What one call needs besides the pairs: codes with their weights, settings, and the batch-coupled terms.
template <typename real>
struct Batch {
  c10::ArrayRef<int64_t> codes;
  c10::ArrayRef<double> loss_weights;
  Settings p;
  SortedBatch<real> aot, aot_unpaired;

  bool has(int64_t wanted) const { return std::find(codes.begin(), codes.end(), wanted) != codes.end(); }
  const SortedBatch<real>& sorted(int64_t code) const { return code == AOT ? aot : aot_unpaired; }
};

template <typename real>
Batch<real> make_batch(const Inputs& in, c10::ArrayRef<int64_t> codes, c10::ArrayRef<double> loss_weights,
                       c10::ArrayRef<double> scalars, int64_t divergence) {
  TORCH_CHECK(codes.size() == loss_weights.size() && !codes.empty(), "preference_loss: codes/weights mismatch");
  for (int64_t code : codes) {
    TORCH_CHECK(code >= 0 && code < NUM_CODES, "preference_loss: unknown loss code ", code);
    if (code == SFT) TORCH_CHECK(in.present[CHOSEN_COUNTS], "preference_loss: sft needs chosen_counts");
  }
  Batch<real> batch{codes, loss_weights, make_settings(scalars, divergence), {}, {}};
  if (batch.has(AOT)) batch.aot = sort_batch<real>(in, AOT);
  if (batch.has(AOT_UNPAIRED)) batch.aot_unpaired = sort_batch<real>(in, AOT_UNPAIRED);
  return batch;
}

at::ScalarType output_type(const Inputs& in) {
  return in.col[CHOSEN].type == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename real>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const Inputs& in,
                                                                               const Batch<real>& batch) {
  const int64_t size = in.size;
  const Settings& p = batch.p;
  auto opts = at::TensorOptions().dtype(output_type(in)).device(at::kCPU);
  at::Tensor losses = at::empty({size}, opts), chosen_rewards = at::empty({size}, opts);
  at::Tensor rejected_rewards = at::empty({size}, opts), margins = at::empty({size}, opts);
  real *out = losses.data_ptr<real>(), *cr = chosen_rewards.data_ptr<real>();
  real *rr = rejected_rewards.data_ptr<real>(), *mg = margins.data_ptr<real>();

  double sft_value = 0;  // −Σ chosen / Σ chosen_counts (TRL's batch token mean)
  if (batch.has(SFT)) {
    double total = 0, tokens = 0;
    for (int64_t i = 0; i < size; ++i) {
      total += in.get<double>(CHOSEN, i);
      tokens += in.get<double>(CHOSEN_COUNTS, i);
    }
    sft_value = -total / tokens;
  }
  double sum = 0;
  for (int64_t i = 0; i < size; ++i) {
    const Pair<real> v = load_pair<real>(in, i, p);
    double total = 0;
    for (size_t k = 0; k < batch.codes.size(); ++k) {
      const int64_t code = batch.codes[k];
      real value, unused;
      if (code == SFT) {
        value = real(sft_value);
      } else if (code == AOT || code == AOT_UNPAIRED) {
        logit_loss(code, batch.sorted(code).logit(i, p), v, p, value, unused);
      } else {
        value = pair_term(code, v, p).loss;
      }
      total += batch.loss_weights[k] * double(value);
    }
    out[i] = real(total * in.get<double>(WEIGHTS, i, 1.0));
    sum += double(out[i]);
    cr[i] = real(p.beta * double(v.r_w));
    rr[i] = real(p.beta * double(v.r_l));
    mg[i] = cr[i] - rr[i];
  }
  at::Tensor loss = at::full({}, sum / double(size), opts);
  return {loss, losses, chosen_rewards, rejected_rewards, margins};
}

// Gradient accumulators of one pair, in double.
struct Grads {
  double cw = 0, cl = 0, rw = 0, rl = 0;
};

// aot types: pair j sits at position rank_first[j] of the first sorted quantity and rank_second[j] of the second;
// G_at(i) is ∂L/∂losses at sorted position i.
template <typename real, typename Upstream>
void add_aot_grads(int64_t code, int64_t j, const Pair<real>& v, const Batch<real>& batch, double weight,
                   const Upstream& G_at, Grads& g) {
  const SortedBatch<real>& sorted = batch.sorted(code);
  const int64_t at_first = sorted.first_rank[j], at_second = sorted.second_rank[j];
  real phi, d_first_z, d_second_z;
  logit_loss(code, sorted.logit(at_first, batch.p), v, batch.p, phi, d_first_z);
  logit_loss(code, sorted.logit(at_second, batch.p), v, batch.p, phi, d_second_z);
  const double d_first = double(d_first_z) * weight * G_at(at_first) * batch.p.beta;
  const double d_second = double(d_second_z) * weight * G_at(at_second) * batch.p.beta;
  if (code == AOT) {  // first = chosen − rejected, second = ref_chosen − ref_rejected
    g.cw += d_first; g.cl -= d_first; g.rw -= d_second; g.rl += d_second;
  } else {  // first = chosen − ref_chosen, second = rejected − ref_rejected
    g.cw += d_first; g.rw -= d_first; g.cl -= d_second; g.rl += d_second;
  }
}

template <typename real>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const Inputs& in, const Batch<real>& batch,
                                                                    double grad_loss, const Column* upstream) {
  const int64_t size = in.size;
  const double mean_grad = grad_loss / double(size);
  // G_i = ∂L/∂losses_i: the mean's share plus any direct upstream gradient on losses
  auto G = [&](int64_t i) { return mean_grad + (upstream ? upstream->at<double>(i) : 0.0); };
  auto opts = at::TensorOptions().dtype(output_type(in)).device(at::kCPU);
  at::Tensor d_chosen = at::empty({size}, opts), d_rejected = at::empty({size}, opts);
  at::Tensor d_ref_chosen = at::empty({size}, opts), d_ref_rejected = at::empty({size}, opts);
  real *dcw = d_chosen.data_ptr<real>(), *dcl = d_rejected.data_ptr<real>();
  real *drw = d_ref_chosen.data_ptr<real>(), *drl = d_ref_rejected.data_ptr<real>();

  double sft_grad = 0;  // ∂L/∂chosen_j of the sft term = −Σ_i G_i·w_i / Σ chosen_counts (per unit loss weight)
  if (batch.has(SFT)) {
    double weighted = 0, tokens = 0;
    for (int64_t i = 0; i < size; ++i) {
      weighted += G(i) * in.get<double>(WEIGHTS, i, 1.0);
      tokens += in.get<double>(CHOSEN_COUNTS, i);
    }
    sft_grad = -weighted / tokens;
  }
  for (int64_t j = 0; j < size; ++j) {
    const Pair<real> v = load_pair<real>(in, j, batch.p);
    const double scale = G(j) * in.get<double>(WEIGHTS, j, 1.0);
    Grads g;
    for (size_t k = 0; k < batch.codes.size(); ++k) {
      const int64_t code = batch.codes[k];
      const double lw = batch.loss_weights[k];
      if (code == SFT) {
        g.cw += lw * sft_grad;
      } else if (code == AOT || code == AOT_UNPAIRED) {
        add_aot_grads(code, j, v, batch, lw, G, g);
      } else {
        const Term<real> t = pair_term(code, v, batch.p);
        g.cw += scale * lw * double(t.d_cw); g.cl += scale * lw * double(t.d_cl);
        g.rw += scale * lw * double(t.d_rw); g.rl += scale * lw * double(t.d_rl);
      }
    }
    dcw[j] = real(g.cw); dcl[j] = real(g.cl); drw[j] = real(g.rw); drl[j] = real(g.rl);
  }
  return {d_chosen, d_rejected, d_ref_chosen, d_ref_rejected};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_fwd_cpu(
    const std::vector<std::optional<at::Tensor>>& slots, c10::ArrayRef<int64_t> codes,
    c10::ArrayRef<double> loss_weights, c10::ArrayRef<double> scalars, int64_t divergence) {
  const Inputs in(slots);
  if (output_type(in) == at::kDouble)
    return forward(in, make_batch<double>(in, codes, loss_weights, scalars, divergence));
  return forward(in, make_batch<float>(in, codes, loss_weights, scalars, divergence));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_loss_bwd_cpu(
    const std::vector<std::optional<at::Tensor>>& slots, c10::ArrayRef<int64_t> codes,
    c10::ArrayRef<double> loss_weights, c10::ArrayRef<double> scalars, int64_t divergence,
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_losses) {
  const Inputs in(slots);
  const double upstream_loss = grad_loss.to(at::kDouble).item<double>();
  at::Tensor upstream_tensor;
  Column upstream;
  if (given(grad_losses)) {
    upstream_tensor = grad_losses->contiguous();
    TORCH_CHECK(upstream_tensor.numel() == in.size && upstream_tensor.is_floating_point(),
                "preference_loss: grad_losses must hold B float values");
    upstream = Column{upstream_tensor.data_ptr(), upstream_tensor.scalar_type()};
  }
  const Column* up = given(grad_losses) ? &upstream : nullptr;
  if (output_type(in) == at::kDouble)
    return backward(in, make_batch<double>(in, codes, loss_weights, scalars, divergence), upstream_loss, up);
  return backward(in, make_batch<float>(in, codes, loss_weights, scalars, divergence), upstream_loss, up);
}

// The names of one part of the layout ("losses", "slots", "scalars", "divergences") in code order.
std::vector<std::string> preference_loss_layout(const std::string& part) {
  if (part == "losses") return {kLossNames, kLossNames + NUM_CODES};
  if (part == "slots") return {kSlotNames, kSlotNames + NUM_SLOTS};
  if (part == "scalars") return {kScalarNames, kScalarNames + NUM_SCALARS};
  TORCH_CHECK(part == "divergences", "preference_loss_layout: unknown part ", part);
  return {kDivergenceNames, kDivergenceNames + NUM_DIVERGENCES};
}

}  // namespace cpu
}  // namespace fastpref

TORCH_LIBRARY_FRAGMENT(fastpref, m) {
  m.def(
      "preference_loss_fwd(Tensor?[] slots, int[] codes, float[] loss_weights, float[] scalars, int divergence) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "preference_loss_bwd(Tensor?[] slots, int[] codes, float[] loss_weights, float[] scalars, int divergence, "
      "Tensor grad_loss, Tensor? grad_losses) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("preference_loss_layout(str part) -> str[]", &fastpref::cpu::preference_loss_layout);
}

TORCH_LIBRARY_IMPL(fastpref, CPU, m) {
  m.impl("preference_loss_fwd", &fastpref::cpu::preference_loss_fwd_cpu);
  m.impl("preference_loss_bwd", &fastpref::cpu::preference_loss_bwd_cpu);
}
