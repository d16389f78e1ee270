// Device code of the CUDA row mass, shared by row_attention_mass (row_mass_cuda.cu) and the fused
// select_image_tokens (select_image_cuda.cu): both run this arithmetic in this order, so the fused op's scores
// are bit-identical to the per-layer op's summed over layers.
//
// Work split: 8 lanes share one key row (each reads 8 contiguous head-dim elements at a time, 16-byte loads for
// bf16 / fp16 when aligned) and a 128-thread block handles 16 keys at a time. Each lane group computes the G
// query heads' logits against its key (q of the KV head's group in shared memory, scaled, zero-padded to a
// multiple of 8) and keeps a running (max, sum of exp) per head; the groups then combine in a fixed order.
// A NaN logit makes its head's sum NaN, which drops the head (log-sum-exp -inf), as the other backends do.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_load.cuh"
#include "row_mass_cuda.h"
#include "select_topk_cuda.h"  // MmlatentScoreDtype

namespace mmlatent_row_mass {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kLanesPerKey = 8;
constexpr int kKeyGroups = kThreads / kLanesPerKey;  // keys a block handles at a time
constexpr int kChunk = 8;                             // contiguous head-dim elements a lane reads at once
constexpr int kMaxChunks = static_cast<int>(kMmlatentRowMassMaxHeadDim) / (kLanesPerKey * kChunk);

// The problem as every kernel sees it. `vec`: k's rows and strides allow 16-byte loads of 8 elements.
struct Shape {
  int64_t batch, q_heads, kv_heads, group, num_keys, head_dim, padded_dim, num_images;
  int64_t ks0, ks1, ks2;
  int dtype;
  bool vec;
  float scale;
};

// p[i .. i + 8) as floats; entries at or past `count` are 0.
__device__ __forceinline__ void load_chunk(const void* p, int dtype, int64_t i, int64_t count, bool vec,
                                           float (&v)[kChunk]) {
  if (vec && count >= kChunk) {
    if (dtype == MMLATENT_F32) {
      const float4* src = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
      const float4 a = src[0], b = src[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
      return;
    }
    const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
    // bit arithmetic on the words, not through their addresses: that would put them in local memory
    const bool bf16 = dtype == MMLATENT_BF16;
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t word = words[w];
      v[2 * w] = bf16 ? __uint_as_float(word << 16) : __half2float(__ushort_as_half(static_cast<uint16_t>(word)));
      v[2 * w + 1] = bf16 ? __uint_as_float(word & 0xffff0000u)
                          : __half2float(__ushort_as_half(static_cast<uint16_t>(word >> 16)));
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kChunk; ++j) v[j] = j < count ? mmlatent_load_float(p, dtype, i + j) : 0.0f;
}

// q_shared [G, padded_dim] <- scale * q[b, h * G .. (h + 1) * G, :], zero past head_dim. Ends with a barrier.
__device__ __forceinline__ void load_queries(const void* q, const Shape& s, int64_t b, int64_t h, float* q_shared) {
  // 32-bit index math: at most kMmlatentRowMassMaxGroup * kMmlatentRowMassMaxHeadDim entries
  const int dim = static_cast<int>(s.padded_dim);
  for (int i = threadIdx.x; i < static_cast<int>(s.group) * dim; i += blockDim.x) {
    const int g = i / dim, c = i - g * dim;
    const int64_t row = b * s.q_heads + h * s.group + g;
    q_shared[i] = c < s.head_dim ? mmlatent_load_float(q, s.dtype, row * s.head_dim + c) * s.scale : 0.0f;
  }
  __syncthreads();
}

// The G logits of key row `row` (element offset into k), summed over the lane group: every lane of the group
// returns the same values. Called by all 32 lanes of a warp (the sums are warp shuffles).
template <int MaxG>
__device__ __forceinline__ void key_logits(const float* q_shared, const void* k, const Shape& s, int64_t row,
                                           bool active, float (&logits)[MaxG]) {
  const int sub = threadIdx.x % kLanesPerKey;
#pragma unroll
  for (int g = 0; g < MaxG; ++g) logits[g] = 0.0f;
  if (active) {
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int64_t e = static_cast<int64_t>(c * kLanesPerKey + sub) * kChunk;
      if (e < s.head_dim) {
        float key[kChunk];
        load_chunk(k, s.dtype, row + e, s.head_dim - e, s.vec, key);
#pragma unroll
        for (int g = 0; g < MaxG; ++g) {
          if (g < s.group) {
            const float* qg = q_shared + g * s.padded_dim + e;
#pragma unroll
            for (int j = 0; j < kChunk; ++j) logits[g] = fmaf(qg[j], key[j], logits[g]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < MaxG; ++g) {
    if (g < s.group) {
#pragma unroll
      for (int offset = 1; offset < kLanesPerKey; offset <<= 1)
        logits[g] += __shfl_xor_sync(0xffffffffu, logits[g], offset);
    }
  }
}

// (m, l) <- the running (max, sum of exp(x - max)) of both; a NaN sum stays NaN.
__device__ __forceinline__ void combine(float& m, float& l, float m2, float l2) {
  const float top = fmaxf(m, m2);
  float a = m == -INFINITY ? 0.0f : l * expf(m - top);
  const float b = m2 == -INFINITY ? 0.0f : l2 * expf(m2 - top);
  if (isnan(l) || isnan(l2)) a = NAN;
  m = top;
  l = a + b;
}

// Keys [begin, end) of (b, h): each head's (max, sum) written to partial_max / partial_sum[g]. `reduce` is
// shared scratch of 2 * kWarps * G floats. q_shared loaded (load_queries).
template <int MaxG>
__device__ void partial_block(const float* q_shared, const void* k, const uint8_t* key_valid, const Shape& s,
                              int64_t b, int64_t h, int64_t begin, int64_t end, float* reduce, float* partial_max,
                              float* partial_sum) {
  float m[MaxG], l[MaxG];
#pragma unroll
  for (int g = 0; g < MaxG; ++g) { m[g] = -INFINITY; l[g] = 0.0f; }
  const int key_group = threadIdx.x / kLanesPerKey;
  // the loop bound is the same for every lane of a warp, so the shuffles inside see all 32 lanes
  for (int64_t first = begin; first < end; first += kKeyGroups) {
    const int64_t n = first + key_group;
    const bool active = n < end && (key_valid == nullptr || key_valid[b * s.num_keys + n]);
    float logits[MaxG];
    key_logits<MaxG>(q_shared, k, s, b * s.ks0 + h * s.ks1 + n * s.ks2, active, logits);
    if (active) {
#pragma unroll
      for (int g = 0; g < MaxG; ++g) {
        if (g < s.group) {
          if (isnan(logits[g])) {
            l[g] = NAN;
          } else {
            combine(m[g], l[g], logits[g], 1.0f);
          }
        }
      }
    }
  }
  // the warp's four key groups, then the block's warps, in a fixed order
#pragma unroll
  for (int g = 0; g < MaxG; ++g) {
    if (g < s.group) {
      for (int offset = kLanesPerKey; offset < 32; offset <<= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m[g], offset);
        const float l2 = __shfl_xor_sync(0xffffffffu, l[g], offset);
        combine(m[g], l[g], m2, l2);
      }
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < MaxG; ++g) {
      if (g < s.group) {
        reduce[warp * s.group + g] = m[g];
        reduce[(kWarps + warp) * s.group + g] = l[g];
      }
    }
  }
  __syncthreads();
  for (int64_t g = threadIdx.x; g < s.group; g += blockDim.x) {
    float mg = reduce[g], lg = reduce[kWarps * s.group + g];
    for (int w = 1; w < kWarps; ++w) combine(mg, lg, reduce[w * s.group + g], reduce[(kWarps + w) * s.group + g]);
    partial_max[g] = mg;
    partial_sum[g] = lg;
  }
}

// lse[g] of (b, h) from its `splits` partials (laid out [splits, G]), read through L2: other blocks of the same
// launch may have written them. Ends with a barrier.
__device__ __forceinline__ void head_lse(const float* partial_max, const float* partial_sum, int64_t group,
                                         int64_t splits, float* lse) {
  for (int64_t g = threadIdx.x; g < group; g += blockDim.x) {
    float m = __ldcg(partial_max + g), l = __ldcg(partial_sum + g);
    for (int64_t split = 1; split < splits; ++split)
      combine(m, l, __ldcg(partial_max + split * group + g), __ldcg(partial_sum + split * group + g));
    lse[g] = l > 0.0f ? m + logf(l) : -INFINITY;  // not positive: no valid key, or a NaN logit
  }
  __syncthreads();
}

// mass[j] = sum over the G heads of softmax(q.k)[image_index[b, j]] for the image slots [first, last) of (b, h);
// 0 for padding slots and padding keys. q_shared and lse loaded.
template <int MaxG>
__device__ void image_block(const float* q_shared, const float* lse, const void* k, const uint8_t* key_valid,
                            const int64_t* image_index, const Shape& s, int64_t b, int64_t h, int64_t first,
                            int64_t last, float* mass) {
  const int key_group = threadIdx.x / kLanesPerKey;
  for (int64_t slot = first; slot < last; slot += kKeyGroups) {
    const int64_t j = slot + key_group;
    const int64_t n = j < last ? image_index[b * s.num_images + j] : -1;
    const bool active = n >= 0 && (key_valid == nullptr || key_valid[b * s.num_keys + n]);
    float logits[MaxG];
    key_logits<MaxG>(q_shared, k, s, b * s.ks0 + h * s.ks1 + (active ? n : 0) * s.ks2, active, logits);
    float total = 0.0f;
    if (active) {
#pragma unroll
      for (int g = 0; g < MaxG; ++g) {
        if (g < s.group && lse[g] != -INFINITY) total += expf(logits[g] - lse[g]);
      }
    }
    if (j < last && threadIdx.x % kLanesPerKey == 0) mass[j] = total;
  }
}

// Key splits of one layer's (batch, KV head) pairs: enough blocks to fill an H100 / H200 twice over (132 SMs),
// and at least 128 keys a block. The fused op splits each layer the same way, so its partials are the same.
inline int64_t splits_for(int64_t batch, int64_t kv_heads, int64_t num_keys) {
  const int64_t fill = (264 + batch * kv_heads - 1) / (batch * kv_heads);
  const int64_t by_keys = (num_keys + 127) / 128;
  const int64_t splits = fill < by_keys ? fill : by_keys;
  return splits > 1 ? splits : 1;
}

// Whether k's rows allow load_chunk's 16-byte loads: 8-element rows at 16-byte aligned offsets.
inline bool vector_loads(const void* k, int dtype, int64_t head_dim, int64_t ks0, int64_t ks1, int64_t ks2) {
  const int64_t per16 = dtype == MMLATENT_F32 ? 4 : 8;  // elements in 16 bytes
  return reinterpret_cast<uintptr_t>(k) % 16 == 0 && head_dim % kChunk == 0 && ks0 % per16 == 0 &&
         ks1 % per16 == 0 && ks2 % per16 == 0;
}

// Dynamic shared memory of the row-mass phases: q [G, padded_dim], the block reduction, the lse.
inline size_t shared_bytes(int64_t group, int64_t padded_dim) {
  return static_cast<size_t>(group * padded_dim + 2 * kWarps * group + group) * sizeof(float);
}

}  // namespace mmlatent_row_mass
