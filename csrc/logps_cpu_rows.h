// Row primitives shared by the CPU log-prob kernels (linear_logps_cpu.cpp, logits_logps_cpu.cpp).
//
// Each works on one row segment of logits held in the accumulation type (float for fp16/bf16/fp32 inputs,
// double for fp64 inputs), in place where it writes. The float versions are compiled for AVX-512, AVX2+FMA
// and baseline x86-64 and picked at load time (GCC/Clang target_clones); their sums run over 16 fixed lanes
// combined in a fixed order, so a result never depends on the thread count or on which version runs.
#pragma once

#include <cstdint>

namespace fastpref::cpu {

// z[j] <- cap(z[j] + bias[j]) * inv_temperature, cap(a) = softcap * tanh(a / softcap) when softcap > 0, else a.
// bias may be null.
void cap_and_temper(float* z, int64_t n, const float* bias, float softcap, float inv_temperature);
void cap_and_temper(double* z, int64_t n, const double* bias, double softcap, double inv_temperature);

// Online log-sum-exp: folds z[0..n) into (running_max, running_sum) so that afterwards
// running_max + log(running_sum) = logsumexp(previous values, z). Start from (-inf, 0). A NaN in z makes
// running_sum NaN.
void online_lse_update(const float* z, int64_t n, float& running_max, float& running_sum);
void online_lse_update(const double* z, int64_t n, double& running_max, double& running_sum);

// Gradient of g * log p[target] with respect to the raw logits of one row segment, in place:
//   z[j] <- (onehot(target)[j] - exp(z[j] - lse)) * scale * (1 - (z[j] * cap_k)^2)
// where z holds the capped, tempered logits, scale = g / temperature, and cap_k = temperature / softcap
// (so z[j] * cap_k = tanh(raw / softcap)); cap_k = 0 means no softcap. target is the label's index inside
// this segment; any value outside [0, n) adds no one-hot term.
void softmax_grad(float* z, int64_t n, float lse, float scale, float cap_k, int64_t target);
void softmax_grad(double* z, int64_t n, double lse, double scale, double cap_k, int64_t target);

}  // namespace fastpref::cpu
