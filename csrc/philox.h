// The normal noise of PhiloxNoise, for the C++ CPU and the CUDA kernels alike (the Triton kernel calls tl.randn,
// the torch backend mmlatent.kernels.diffusion.torch_impl.philox_normal). Element i of a draw at stream position
// `offset` is Triton's tl.randn(seed, offset + i) for an int64 offset: Philox-4x32 with 10 rounds on the counter
// (low, high 32 bits of offset + i, 0, 0) under the key (low, high 32 bits of seed); the first two words become
// uniforms in [0, 1) and the cosine branch of Box-Muller turns them into one normal.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MMLATENT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMLATENT_HOST_DEVICE __attribute__((always_inline)) inline  // inlined into vectorised CPU loops
#endif

// An int32 of the random word, folded onto [0, 2^31) and scaled into [0, 1): Triton's uint_to_uniform_float.
MMLATENT_HOST_DEVICE float mmlatent_uniform(uint32_t word) {
  int32_t v = static_cast<int32_t>(word);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

// The two uniforms of counter (c0, c1, 0, 0) under key (k0, k1); the first clamped to at least 1e-7, as
// Box-Muller's log needs (Triton clamps it so too).
MMLATENT_HOST_DEVICE void mmlatent_philox_uniforms(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, float& u1,
                                                   float& u2) {
  uint32_t c2 = 0u, c3 = 0u;
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0, p2 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t next0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = next0;
    c2 = next2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const float first = mmlatent_uniform(c0);
  u1 = first < 1.0e-7f ? 1.0e-7f : first;  // a select, not fmaxf: the CPU loop around it stays vectorised
  u2 = mmlatent_uniform(c1);
}

// The normal at stream position `counter`, with the platform's logf / cosf (the CUDA kernel's; the CPU kernel
// draws whole rows with cpu_math.h's philox_normals).
MMLATENT_HOST_DEVICE float mmlatent_philox_normal(uint64_t seed, uint64_t counter) {
  float u1, u2;
  mmlatent_philox_uniforms(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                           static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), u1, u2);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}
