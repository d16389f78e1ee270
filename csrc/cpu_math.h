// Small float kernels shared by the native CPU ops: a dot product and an exp written so that the compiler
// vectorises them (independent accumulators, no branches), each compiled twice (AVX2 + FMA, and the baseline
// x86-64 for older CPUs) and chosen once at load time by the CPU's features.
#pragma once
#include <cmath>
#include <cstdint>

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

}  // namespace mmlatent_cpu
