// Row primitives shared by the CPU log-prob kernels (linear_logps_cpu.cpp, logits_logps_cpu.cpp).
//
// Each works on one row segment of logits held in the accumulation type (float for fp16/bf16/fp32 inputs,
// double for fp64 inputs), in place where it writes. The float versions are compiled for AVX-512, AVX2+FMA
// and baseline x86-64 and picked at load time (GCC/Clang target_clones); their sums run over 16 fixed lanes
// combined in a fixed order, so a result never depends on the thread count or on which version runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace fastpref::cpu {

// 1 − tanh² from t = z·cap_k, the tanh that a capped, tempered logit z gives back. A saturated tanh (±1) comes
// back as ±1 or its neighbouring values, so |t| at or above the largest value below 1 counts as saturated and its
// factor is 0, as eager's is (its tanh rounds to ±1 there).
template <typename T>
inline T sech_squared(T t) {
  const T a = std::fabs(t);
  return a >= T(1) - std::numeric_limits<T>::epsilon() / 2 ? T(0) : (T(1) - a) * (T(1) + a);
}

// z[j] <- cap(z[j] + bias[j]) * inv_temperature, cap(a) = softcap * tanh(a / softcap) when softcap > 0, else a.
// bias may be null. The float tanh is accurate to a few ulp relative over the whole range (an odd polynomial
// near 0, where (1 − e)/(1 + e) would cancel), so large softcaps (a / softcap ≈ 0) keep full precision.
void cap_and_temper(float* z, int64_t n, const float* bias, float softcap, float inv_temperature);
void cap_and_temper(double* z, int64_t n, const double* bias, double softcap, double inv_temperature);

// Online log-sum-exp: folds z[0..n) into (running_max, running_sum) so that afterwards
// running_max + log(running_sum) = logsumexp(previous values, z). Start from (-inf, 0). A NaN in z makes
// running_sum NaN.
void online_lse_update(const float* z, int64_t n, float& running_max, float& running_sum);
void online_lse_update(const double* z, int64_t n, double& running_max, double& running_sum);

// Online softmax with weights, for Σ_v p_v·(1 − tanh²)·W_v: folds z[0..n) into (running_max, running_sum)
// exactly as online_lse_update does, and overwrites z[j] with exp(z[j] − new_max)·(1 − (z[j]·cap_k)²)
// (cap_k = 0: no softcap factor). Returns exp(old_max − new_max), the factor by which anything summed over
// earlier entries with the old max must be rescaled (0 while the old max was −inf). A row of only −inf gives
// weights 0; a NaN gives NaN weights and a NaN sum.
float online_softmax_weights(float* z, int64_t n, float cap_k, float& running_max, float& running_sum);
double online_softmax_weights(double* z, int64_t n, double cap_k, double& running_max, double& running_sum);

// Gradient of g * log p[target] with respect to the raw logits of one row segment, in place:
//   z[j] <- (onehot(target)[j] - exp((z[j] - row_max) - log_sum)) * scale * (1 - (z[j] * cap_k)^2)
// where z holds the capped, tempered logits, (row_max, log_sum) the row's max and log Σ exp(z − row_max) kept
// apart (so p is exact to the dtype even when |row_max| is large), scale = g / temperature, and
// cap_k = temperature / softcap (so z[j] * cap_k = tanh(raw / softcap)); cap_k = 0 means no softcap. target
// is the label's index inside this segment; any value outside [0, n) adds no one-hot term.
void softmax_grad(float* z, int64_t n, float row_max, float log_sum, float scale, float cap_k, int64_t target);
void softmax_grad(double* z, int64_t n, double row_max, double log_sum, double scale, double cap_k,
                  int64_t target);

}  // namespace fastpref::cpu
