// Row primitives of the CPU log-prob kernels; see logps_cpu_rows.h for what each computes.
//
// float: a branch-free exp (Cephes-style range reduction and degree-6 polynomial, ~1 ulp on [-87.3, 88]; 0
// below; NaN passes through) written as plain loops that the compiler vectorizes, in three target clones.
// Reductions keep 16 independent lanes (j mod 16) merged in a fixed order: deterministic and ISA-independent.
// double: straightforward loops over std::exp / std::tanh (the fp64 path is for checking, not speed).
#include "logps_cpu_rows.h"

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__)
#define FASTPREF_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTPREF_SIMD_CLONES
#endif

#if defined(__GNUC__)
#define FASTPREF_INLINE inline __attribute__((always_inline))
#else
#define FASTPREF_INLINE inline
#endif

namespace fastpref::cpu {
namespace {

constexpr int kLanes = 16;

FASTPREF_INLINE float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

FASTPREF_INLINE uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// exp(x) in float: x = n·ln2 + r with |r| <= ln2/2, exp(r) by polynomial, 2^n built in the exponent bits.
// The clamps are written so that NaN compares false and flows through to a NaN result.
FASTPREF_INLINE float fast_exp(float x) {
  constexpr float kMaxArg = 88.0f;          // exp(88) < FLT_MAX, n <= 127
  constexpr float kMinArg = -87.33654475f;  // below: the result would be subnormal; return 0
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer in the low bits
  float clamped = x > kMaxArg ? kMaxArg : x;
  clamped = clamped < kMinArg ? kMinArg : clamped;
  const float shifted = clamped * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // The low mantissa bits of `shifted` hold n + 2^22; turn n into the exponent field of 2^n.
  const uint32_t exponent = (float_to_bits(shifted) - float_to_bits(kRoundMagic) + 127u) << 23;
  const float result = p * bits_to_float(exponent);
  return x < kMinArg ? 0.0f : result;
}

// tanh(x). For |x| < 0.625 the odd minimax polynomial x + x³·P(x²) (the coefficients of Cephes' tanhf, ~1 ulp
// relative), which keeps full relative precision as x → 0 (a large softcap); above, sign(x)·(1 − e)/(1 + e) with
// e = exp(−2|x|) ≤ 0.29, where nothing cancels and the result saturates cleanly. Both are computed and one is
// selected, so loops over it stay branch-free. NaN gives NaN.
FASTPREF_INLINE float fast_tanh(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float x2 = x * x;
  float p = -5.70498872745e-3f;
  p = p * x2 + 2.06390887954e-2f;
  p = p * x2 - 5.37397155531e-2f;
  p = p * x2 + 1.33314422036e-1f;
  p = p * x2 - 3.33332819422e-1f;
  const float near_zero = x + x * x2 * p;
  const float e = fast_exp(-2.0f * ax);
  const float t = (1.0f - e) / (1.0f + e);
  const float far = x < 0.0f ? -t : t;
  return ax < 0.625f ? near_zero : far;
}

FASTPREF_INLINE float segment_max(const float* z, int64_t n) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] = z[j + l] > lanes[l] ? z[j + l] : lanes[l];
  }
  float best = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < kLanes; ++l) best = lanes[l] > best ? lanes[l] : best;
  for (; j < n; ++j) best = z[j] > best ? z[j] : best;
  return best;
}

FASTPREF_INLINE float segment_sum_exp(const float* z, int64_t n, float shift) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += fast_exp(z[j + l] - shift);
  }
  float tail = 0.0f;
  for (; j < n; ++j) tail += fast_exp(z[j] - shift);
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total + tail;
}

}  // namespace

FASTPREF_SIMD_CLONES
void cap_and_temper(float* z, int64_t n, const float* bias, float softcap, float inv_temperature) {
  if (bias != nullptr) {
    for (int64_t j = 0; j < n; ++j) z[j] += bias[j];
  }
  if (softcap > 0.0f) {
    const float inv_cap = 1.0f / softcap;
    const float out_scale = softcap * inv_temperature;
    for (int64_t j = 0; j < n; ++j) z[j] = fast_tanh(z[j] * inv_cap) * out_scale;
  } else if (inv_temperature != 1.0f) {
    for (int64_t j = 0; j < n; ++j) z[j] *= inv_temperature;
  }
}

void cap_and_temper(double* z, int64_t n, const double* bias, double softcap, double inv_temperature) {
  for (int64_t j = 0; j < n; ++j) {
    double a = bias != nullptr ? z[j] + bias[j] : z[j];
    if (softcap > 0.0) a = softcap * std::tanh(a / softcap);
    z[j] = a * inv_temperature;
  }
}

FASTPREF_SIMD_CLONES
void online_lse_update(const float* z, int64_t n, float& running_max, float& running_sum) {
  if (n <= 0) return;
  const float new_max = std::fmax(running_max, segment_max(z, n));
  if (new_max == -std::numeric_limits<float>::infinity()) {  // only -inf and NaN so far: sum stays 0 unless NaN
    for (int64_t j = 0; j < n; ++j) {
      if (z[j] != z[j]) running_sum = std::numeric_limits<float>::quiet_NaN();
    }
    return;
  }
  const float rescale = fast_exp(running_max - new_max);  // 0 while running_max is -inf
  running_sum = running_sum * rescale + segment_sum_exp(z, n, new_max);
  running_max = new_max;
}

void online_lse_update(const double* z, int64_t n, double& running_max, double& running_sum) {
  if (n <= 0) return;
  double seg_max = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) seg_max = z[j] > seg_max ? z[j] : seg_max;
  const double new_max = std::fmax(running_max, seg_max);
  if (new_max == -std::numeric_limits<double>::infinity()) {
    for (int64_t j = 0; j < n; ++j) {
      if (z[j] != z[j]) running_sum = std::numeric_limits<double>::quiet_NaN();
    }
    return;
  }
  double sum = running_sum * std::exp(running_max - new_max);
  for (int64_t j = 0; j < n; ++j) sum += std::exp(z[j] - new_max);
  running_sum = sum;
  running_max = new_max;
}

FASTPREF_SIMD_CLONES
float online_softmax_weights(float* z, int64_t n, float cap_k, float& running_max, float& running_sum) {
  if (n <= 0) return 1.0f;
  const float new_max = std::fmax(running_max, segment_max(z, n));
  if (new_max == -std::numeric_limits<float>::infinity()) {  // only -inf and NaN so far
    for (int64_t j = 0; j < n; ++j) {
      if (z[j] != z[j]) running_sum = std::numeric_limits<float>::quiet_NaN();
      z[j] = z[j] != z[j] ? z[j] : 0.0f;
    }
    return 1.0f;
  }
  const float rescale = fast_exp(running_max - new_max);  // 0 while running_max is -inf
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float e = fast_exp(z[j + l] - new_max);
      const float t = z[j + l] * cap_k;
      lanes[l] += e;
      z[j + l] = e * sech_squared(t);
    }
  }
  float total = 0.0f;
  for (; j < n; ++j) {
    const float e = fast_exp(z[j] - new_max);
    const float t = z[j] * cap_k;
    total += e;
    z[j] = e * sech_squared(t);
  }
  float lane_total = 0.0f;
  for (int l = 0; l < kLanes; ++l) lane_total += lanes[l];
  running_sum = running_sum * rescale + (lane_total + total);
  running_max = new_max;
  return rescale;
}

double online_softmax_weights(double* z, int64_t n, double cap_k, double& running_max, double& running_sum) {
  if (n <= 0) return 1.0;
  double seg_max = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) seg_max = z[j] > seg_max ? z[j] : seg_max;
  const double new_max = std::fmax(running_max, seg_max);
  if (new_max == -std::numeric_limits<double>::infinity()) {
    for (int64_t j = 0; j < n; ++j) {
      if (z[j] != z[j]) running_sum = std::numeric_limits<double>::quiet_NaN();
      z[j] = z[j] != z[j] ? z[j] : 0.0;
    }
    return 1.0;
  }
  const double rescale = std::exp(running_max - new_max);
  double sum = running_sum * rescale;
  for (int64_t j = 0; j < n; ++j) {
    const double e = std::exp(z[j] - new_max);
    const double t = z[j] * cap_k;
    sum += e;
    z[j] = e * sech_squared(t);
  }
  running_sum = sum;
  running_max = new_max;
  return rescale;
}

FASTPREF_SIMD_CLONES
void softmax_grad(float* z, int64_t n, float row_max, float log_sum, float scale, float cap_k, int64_t target) {
  const bool has_target = target >= 0 && target < n;
  const float target_z = has_target ? z[target] : 0.0f;
  if (cap_k != 0.0f) {
    for (int64_t j = 0; j < n; ++j) {
      const float t = z[j] * cap_k;
      z[j] = -fast_exp((z[j] - row_max) - log_sum) * scale * sech_squared(t);
    }
  } else {
    const float neg_scale = -scale;
    for (int64_t j = 0; j < n; ++j) z[j] = fast_exp((z[j] - row_max) - log_sum) * neg_scale;
  }
  if (has_target) {  // (1 − p_y) formed directly: exactly 0 when p_y = 1, and no cancellation against −p_y
    const float t = target_z * cap_k;
    z[target] = (1.0f - fast_exp((target_z - row_max) - log_sum)) * scale * sech_squared(t);
  }
}

void softmax_grad(double* z, int64_t n, double row_max, double log_sum, double scale, double cap_k,
                  int64_t target) {
  const bool has_target = target >= 0 && target < n;
  const double target_z = has_target ? z[target] : 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double t = z[j] * cap_k;
    z[j] = -std::exp((z[j] - row_max) - log_sum) * scale * sech_squared(t);
  }
  if (has_target) {
    const double t = target_z * cap_k;
    z[target] = (1.0 - std::exp((target_z - row_max) - log_sum)) * scale * sech_squared(t);
  }
}

}  // namespace fastpref::cpu
