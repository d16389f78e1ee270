// The normal noise of PhiloxNoise, one element at a time, for the C++ CPU and the CUDA kernels alike (the Triton
// kernel calls tl.randn, the torch backend mmlatent.kernels.diffusion.torch_impl.philox_normal). Element i of a
// draw at stream position `offset` is Triton's tl.randn(seed, offset + i) for an int64 offset: Philox-4x32 with
// 10 rounds on the counter (low, high 32 bits of offset + i, 0, 0) under the key (low, high 32 bits of seed); the
// first two words become uniforms in [0, 1) and the cosine branch of Box-Muller turns them into one normal.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MMLATENT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMLATENT_HOST_DEVICE inline
#endif

MMLATENT_HOST_DEVICE uint32_t mmlatent_mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// An int32 of the random word, folded onto [0, 2^31) and scaled into [0, 1): Triton's uint_to_uniform_float.
MMLATENT_HOST_DEVICE float mmlatent_uniform(uint32_t word) {
  int32_t v = static_cast<int32_t>(word);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

MMLATENT_HOST_DEVICE float mmlatent_philox_normal(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mmlatent_mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mmlatent_mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const float u1 = fmaxf(1.0e-7f, mmlatent_uniform(c0));
  const float theta = 6.283185307179586f * mmlatent_uniform(c1);
  return sqrtf(-2.0f * logf(u1)) * cosf(theta);
}
