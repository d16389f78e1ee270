// Small float kernels shared by the native CPU ops: a dot product, exp, log and cos, and the Philox draw, written
// so that the compiler vectorises them (independent accumulators, no branches), each compiled twice (AVX2 + FMA,
// and the baseline x86-64 for older CPUs) and chosen once at load time by the CPU's features.
#pragma once
#include <cmath>
#include <cstdint>

#include "philox.h"

// x86-64-v3 (AVX2, FMA) is chosen by the CPU's features; "arch=haswell" would be chosen by the CPU's model, so
// never on a newer one. No AVX-512 clone: measured here, it made select_image_tokens 3.4x slower.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMLATENT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MMLATENT_CPU_CLONES
#endif

namespace mmlatent_cpu {

// sum_i a[i] * b[i] over n floats, in float32 with 8 partial sums; inlined into its (cloned) callers, so it is
// compiled for their target.
__attribute__((always_inline)) static inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

static double dot(const double* a, const double* b, int64_t n) {
  double acc[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) acc[j] += a[i + j] * b[i + j];
  double tail = 0.0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail;
}

// exp(x) for float32 within 2 ulp where the result is a normal float (Cephes' expf: exp(x) = 2^n exp(r),
// |r| <= ln2 / 2, a degree-6 polynomial for exp(r)); exactly 0 below -87.3 (so -inf gives 0), NaN for NaN.
// Selects instead of branches, so that a loop of it vectorises. Only used where x <= 0 (softmax exponents).
__attribute__((always_inline)) static inline float exp_approx(float x) {
  float c = x < -87.3f ? -87.3f : x;
  c = c > 88.3f ? 88.3f : c;
  c = x == x ? c : 0.0f;  // NaN: any finite value here, the result is replaced below
  // n = round(c / ln2) by the 1.5 * 2^23 trick (a float add rounds to an integer), not floor: a call the
  // loop would not vectorise around
  const float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (c - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float two_n = __builtin_bit_cast(float, bits);
  const float value = x < -87.3f ? 0.0f : y * two_n;
  return x == x ? value : x;
}

// scores[g * ld + j] = q[g] . keys[rows[j]] for g < heads, j < count: the logits of `heads` query rows of
// length d against `count` key rows of a cache whose rows are `key_stride` floats apart (rows = nullptr: rows
// 0 .. count - 1). One call per block of keys, so the dispatch of the clone is paid per block, not per dot.
MMLATENT_CPU_CLONES static void block_scores(const float* q, int64_t heads, int64_t d, const float* keys,
                                             int64_t key_stride, const int64_t* rows, int64_t count, float* scores,
                                             int64_t ld) {
  for (int64_t j = 0; j < count; ++j) {
    const float* key = keys + (rows != nullptr ? rows[j] : j) * key_stride;
    for (int64_t g = 0; g < heads; ++g) scores[g * ld + j] = dot(q + g * d, key, d);
  }
}

// The maximum of n values and `start` (NaN ignored), with 8 running maxima so that it vectorises.
MMLATENT_CPU_CLONES static float max_of(const float* in, int64_t n, float start) {
  float acc[8] = {start, start, start, start, start, start, start, start};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] = in[i + j] > acc[j] ? in[i + j] : acc[j];
  float best = start;
  for (int j = 0; j < 8; ++j) best = acc[j] > best ? acc[j] : best;
  for (; i < n; ++i) best = in[i] > best ? in[i] : best;
  return best;
}

// The sum of n values with 8 partial sums.
MMLATENT_CPU_CLONES static float sum_of(const float* in, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += in[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += in[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// s[i] = exp_approx(s[i] - shift) in place for n values; returns their sum. One pointer, not an input and an
// output that alias: the compiler's overlap check would send an aliased call to its scalar loop.
MMLATENT_CPU_CLONES static float exp_shifted_(float* s, float shift, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = exp_approx(s[i] - shift);
  return sum_of(s, n);
}

// s[i] = scale * (share - uniform) in place with share = s[i] * factor: exponentials relative to a block's maximum
// turned into the softmax gradient of the row (factor = exp(block max - lse)). A share below e^-60 is exactly 0, the
// torch backend's floor: left as it is, shares this small scale into subnormal gradients, on which the GEMMs that
// read them take a slow path.
MMLATENT_CPU_CLONES static void scaled_shares_(float* s, float factor, float uniform, float scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float share = s[i] * factor;
    s[i] = scale * ((share < 8.7565108e-27f ? 0.0f : share) - uniform);
  }
}

// log(x) for normal positive float32 x within 2 ulp (Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a
// degree-9 polynomial in m - 1), branch-free so that a loop of it vectorises. Only called on [1e-7, 1).
__attribute__((always_inline)) static inline float log_approx(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  int32_t e = ((bits >> 23) & 0xff) - 126;                                     // x = m 2^e, m in [0.5, 1)
  float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f000000);
  const bool small = m < 0.707106781186547524f;  // to m in [sqrt(1/2), sqrt(2)), e adjusted
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * m * z;
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return (m + y) + fe * 0.693359375f;
}

// cos(t) for float32 t in [0, 2 pi] within 2 ulp of the absolute error scale (Cephes' sinf / cosf polynomials on
// [-pi/4, pi/4] after t = j pi/2 + r, j = round(2t / pi), pi/2 in three parts), branch-free.
__attribute__((always_inline)) static inline float cos_approx(float t) {
  const float j = (t * 0.636619772367581343f + 12582912.0f) - 12582912.0f;  // round(2t / pi): 0 .. 4
  const float r = ((t - j * 1.5703125f) - j * 4.837512969970703125e-4f) - j * 7.54978995489188216e-8f;
  const float z = r * r;
  float c = 2.443315711809948e-5f;  // cos(r)
  c = c * z - 1.388731625493765e-3f;
  c = c * z + 4.166664568298827e-2f;
  c = c * z * z - 0.5f * z + 1.0f;
  float sn = -1.9515295891e-4f;  // sin(r)
  sn = sn * z + 8.3321608736e-3f;
  sn = sn * z - 1.6666654611e-1f;
  sn = sn * z * r + r;
  const int32_t quadrant = static_cast<int32_t>(j) & 3;  // cos(j pi/2 + r) = cos r, -sin r, -cos r, sin r
  const float value = (quadrant & 1) ? sn : c;
  return (quadrant == 1 || quadrant == 2) ? -value : value;
}

// out[i] = the normal of a PhiloxNoise stream at position + i for i < n (n < 2^32): philox.h's arithmetic, with
// its log and cos replaced by the vectorisable log_approx and cos_approx (the draw is compute-bound on a CPU, and
// the scalar libm calls keep the loop from vectorising); within a few ulp of philox.h's values.
MMLATENT_CPU_CLONES static void philox_normals(uint64_t seed, uint64_t position, int64_t n, float* out) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  // 32-bit lanes only: the counter's low word is low + i, its high word takes the carry out of that sum
  const uint32_t low = static_cast<uint32_t>(position), high = static_cast<uint32_t>(position >> 32);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t c0 = low + static_cast<uint32_t>(i);
    float u1, u2;
    mmlatent_philox_uniforms(key0, key1, c0, high + (c0 < low ? 1u : 0u), u1, u2);
    out[i] = __builtin_sqrtf(-2.0f * log_approx(u1)) * cos_approx(6.283185307179586f * u2);
  }
}

}  // namespace mmlatent_cpu
