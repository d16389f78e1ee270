// CUDA row_attention_mass: the KV cache read once, GQA by index arithmetic.
//   1. row_mass_partial: one block per (batch item, KV head, key split); its warps stride over the split's keys,
//      each warp computing the G query heads' logits against one key (lanes split the head dim) and keeping an
//      online (max, sum) per head; the block's warps combine in shared memory into one (max, sum) per head.
//   2. row_mass_images: one block per (batch item, KV head): the splits' (max, sum) give each head's log-sum-exp,
//      then each warp takes image slots, reads those keys and sums exp(logit - lse) over the G heads.
//   3. row_mass_accumulate: out[b, j] += weight * sum over KV heads, in a fixed order (deterministic).
// Runtime API only (see select_topk_cuda.h for why). A NaN logit drops its heads, as the other backends do.
#include "row_mass_cuda.h"
#include "select_topk_cuda.h"  // MmlatentScoreDtype

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPerLane = kMmlatentRowMassMaxHeadDim / 32;  // head-dim elements a lane holds

__device__ __forceinline__ float load(const void* p, int dtype, int64_t i) {
  if (dtype == MMLATENT_F16) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == MMLATENT_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The lane's share of a key row, in float: elements lane, lane + 32, ...
__device__ __forceinline__ void load_key(const void* k, int dtype, int64_t base, int64_t d, float (&key)[kPerLane]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t c = lane + 32 * i;
    key[i] = c < d ? load(k, dtype, base + c) : 0.0f;
  }
}

// q . key for query head g, q scaled, from shared memory [G, D].
__device__ __forceinline__ float logit(const float* q_shared, int64_t g, int64_t d, const float (&key)[kPerLane]) {
  const int lane = threadIdx.x & 31;
  float partial = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t c = lane + 32 * i;
    if (c < d) partial += q_shared[g * d + c] * key[i];
  }
  return warp_sum(partial);
}

__global__ void row_mass_partial(const void* q, const void* k, int dtype, const uint8_t* key_valid, int64_t q_heads,
                                 int64_t kv_heads, int64_t num_keys, int64_t d, int64_t ks0, int64_t ks1,
                                 int64_t ks2, float scale, int64_t splits, float* partial_max, float* partial_sum) {
  extern __shared__ float shared[];
  const int64_t group = q_heads / kv_heads;
  float* q_shared = shared;                              // [G, D]
  float* warp_max = q_shared + group * d;                // [kWarps, G]
  float* warp_sum_exp = warp_max + kWarps * group;       // [kWarps, G]
  const int64_t task = blockIdx.x, split = blockIdx.y;
  const int64_t b = task / kv_heads, h = task % kv_heads;
  for (int64_t i = threadIdx.x; i < group * d; i += blockDim.x)
    q_shared[i] = load(q, dtype, (b * q_heads + h * group) * d + i) * scale;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t g = lane; g < group; g += 32) {
    warp_max[warp * group + g] = -INFINITY;
    warp_sum_exp[warp * group + g] = 0.0f;
  }
  __syncthreads();
  const int64_t per_split = (num_keys + splits - 1) / splits;
  const int64_t begin = split * per_split, end = begin + per_split < num_keys ? begin + per_split : num_keys;
  float key[kPerLane];
  for (int64_t n = begin + warp; n < end; n += kWarps) {
    if (key_valid != nullptr && !key_valid[b * num_keys + n]) continue;
    load_key(k, dtype, b * ks0 + h * ks1 + n * ks2, d, key);
    for (int64_t g = 0; g < group; ++g) {
      const float s = logit(q_shared, g, d, key);
      if (lane == 0) {  // the warp's running (max, sum) of head g; NaN makes the sum NaN, which drops the head
        float& m = warp_max[warp * group + g];
        float& l = warp_sum_exp[warp * group + g];
        const float next = fmaxf(m, s);
        l = (m == -INFINITY ? 0.0f : l * expf(m - next)) + expf(s - next);
        if (isnan(s)) l = NAN;
        m = next;
      }
    }
  }
  __syncthreads();
  for (int64_t g = threadIdx.x; g < group; g += blockDim.x) {
    float m = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_max[w * group + g]);
    float l = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      const float wm = warp_max[w * group + g];
      if (wm != -INFINITY || isnan(warp_sum_exp[w * group + g])) l += warp_sum_exp[w * group + g] * expf(wm - m);
    }
    const int64_t slot = (task * splits + split) * group + g;
    partial_max[slot] = m;
    partial_sum[slot] = l;
  }
}

__global__ void row_mass_images(const void* q, const void* k, int dtype, const uint8_t* key_valid,
                                const int64_t* image_index, int64_t q_heads, int64_t kv_heads, int64_t num_keys,
                                int64_t d, int64_t num_images, int64_t ks0, int64_t ks1, int64_t ks2, float scale,
                                int64_t splits, const float* partial_max, const float* partial_sum, float* mass) {
  extern __shared__ float shared[];
  const int64_t group = q_heads / kv_heads;
  float* q_shared = shared;          // [G, D]
  float* lse = q_shared + group * d;  // [G]
  const int64_t task = blockIdx.x;
  const int64_t b = task / kv_heads, h = task % kv_heads;
  for (int64_t i = threadIdx.x; i < group * d; i += blockDim.x)
    q_shared[i] = load(q, dtype, (b * q_heads + h * group) * d + i) * scale;
  for (int64_t g = threadIdx.x; g < group; g += blockDim.x) {
    float m = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) m = fmaxf(m, partial_max[(task * splits + s) * group + g]);
    float l = 0.0f;
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t slot = (task * splits + s) * group + g;
      if (partial_max[slot] != -INFINITY || isnan(partial_sum[slot]))
        l += partial_sum[slot] * expf(partial_max[slot] - m);
    }
    lse[g] = l > 0.0f ? m + logf(l) : -INFINITY;  // not positive: no valid key, or a NaN logit
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float key[kPerLane];
  for (int64_t j = warp; j < num_images; j += kWarps) {
    const int64_t n = image_index[b * num_images + j];
    float total = 0.0f;
    if (n >= 0 && (key_valid == nullptr || key_valid[b * num_keys + n])) {
      load_key(k, dtype, b * ks0 + h * ks1 + n * ks2, d, key);
      for (int64_t g = 0; g < group; ++g) {
        const float s = logit(q_shared, g, d, key);
        if (lse[g] != -INFINITY) total += expf(s - lse[g]);
      }
    }
    if (lane == 0) mass[task * num_images + j] = total;
  }
}

__global__ void row_mass_accumulate(const int64_t* image_index, const float* mass, float* out, int64_t kv_heads,
                                    int64_t num_images, int64_t out_stride, float weight) {
  const int64_t b = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= num_images || image_index[b * num_images + j] < 0) return;
  float total = 0.0f;
  for (int64_t h = 0; h < kv_heads; ++h) total += mass[(b * kv_heads + h) * num_images + j];
  out[b * out_stride + j] += weight * total;
}

}  // namespace

extern "C" int64_t mmlatent_row_mass_scratch_floats(int64_t batch, int64_t kv_heads, int64_t group,
                                                    int64_t num_images, int64_t splits) {
  return 2 * batch * kv_heads * splits * group + batch * kv_heads * num_images;
}

extern "C" int mmlatent_row_mass_cuda(const void* q, const void* k, int dtype, const uint8_t* key_valid,
                                      const int64_t* image_index, float* out, int64_t batch, int64_t q_heads,
                                      int64_t kv_heads, int64_t num_keys, int64_t head_dim, int64_t num_images,
                                      int64_t ks0, int64_t ks1, int64_t ks2, int64_t out_stride, float scale,
                                      float weight, int64_t splits, float* scratch, int64_t stream) {
  if (batch == 0 || q_heads == 0 || num_images == 0) return 0;
  const int64_t group = q_heads / kv_heads;
  if (group > kMmlatentRowMassMaxGroup || head_dim > kMmlatentRowMassMaxHeadDim || splits < 1 || batch > 65535)
    return static_cast<int>(cudaErrorInvalidValue);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t partials = batch * kv_heads * splits * group;
  float* partial_max = scratch;
  float* partial_sum = scratch + partials;
  float* mass = scratch + 2 * partials;
  const size_t partial_smem = (group * head_dim + 2 * kWarps * group) * sizeof(float);
  row_mass_partial<<<dim3(static_cast<unsigned>(batch * kv_heads), static_cast<unsigned>(splits)), kThreads,
                     partial_smem, s>>>(q, k, dtype, key_valid, q_heads, kv_heads, num_keys, head_dim, ks0, ks1, ks2,
                                        scale, splits, partial_max, partial_sum);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  const size_t image_smem = (group * head_dim + group) * sizeof(float);
  row_mass_images<<<static_cast<unsigned>(batch * kv_heads), kThreads, image_smem, s>>>(
      q, k, dtype, key_valid, image_index, q_heads, kv_heads, num_keys, head_dim, num_images, ks0, ks1, ks2, scale,
      splits, partial_max, partial_sum, mass);
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  row_mass_accumulate<<<dim3(static_cast<unsigned>((num_images + 255) / 256), static_cast<unsigned>(batch)), 256, 0,
                        s>>>(image_index, mass, out, kv_heads, num_images, out_stride, weight);
  return static_cast<int>(cudaGetLastError());
}
