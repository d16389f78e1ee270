// CUDA row_attention_mass: the KV cache read once, GQA by index arithmetic (row_mass_device.cuh has the math).
//   1. row_mass_partial: one block per (batch item, KV head, key split): each head's (max, sum of exp) over the
//      split's keys.
//   2. row_mass_images: one block per (batch item, KV head, run of 64 image slots): the splits' partials give each
//      head's log-sum-exp, then each image slot's mass summed over the G heads.
//   3. row_mass_accumulate: out[b, j] += weight * sum over KV heads, in a fixed order (deterministic).
// Runtime API only (see select_topk_cuda.h for why).
#include "row_mass_cuda.h"
#include "row_mass_device.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace {

using namespace mmlatent_row_mass;

constexpr int64_t kSlotsPerBlock = 64;

template <int MaxG>
__global__ void __launch_bounds__(kThreads) row_mass_partial(const void* q, const void* k, const uint8_t* key_valid,
                                                             Shape s, int64_t splits, float* partial_max,
                                                             float* partial_sum) {
  extern __shared__ float shared[];
  float* q_shared = shared;
  float* reduce = q_shared + s.group * s.padded_dim;
  const int64_t task = blockIdx.x, split = blockIdx.y;
  const int64_t b = static_cast<int>(task) / static_cast<int>(s.kv_heads), h = task - b * s.kv_heads;
  load_queries(q, s, b, h, q_shared);
  const int64_t per_split = (s.num_keys + splits - 1) / splits;
  const int64_t begin = split * per_split, end = begin + per_split < s.num_keys ? begin + per_split : s.num_keys;
  const int64_t slot = (task * splits + split) * s.group;
  partial_block<MaxG>(q_shared, k, key_valid, s, b, h, begin, end, reduce, partial_max + slot, partial_sum + slot);
}

template <int MaxG>
__global__ void __launch_bounds__(kThreads) row_mass_images(const void* q, const void* k, const uint8_t* key_valid,
                                                            const int64_t* image_index, Shape s, int64_t splits,
                                                            const float* partial_max, const float* partial_sum,
                                                            float* mass) {
  extern __shared__ float shared[];
  float* q_shared = shared;
  float* lse = q_shared + s.group * s.padded_dim + 2 * kWarps * s.group;
  const int64_t task = blockIdx.x;
  const int64_t b = static_cast<int>(task) / static_cast<int>(s.kv_heads), h = task - b * s.kv_heads;
  head_lse(partial_max + task * splits * s.group, partial_sum + task * splits * s.group, s.group, splits, lse);
  load_queries(q, s, b, h, q_shared);
  const int64_t first = blockIdx.y * kSlotsPerBlock;
  const int64_t last = first + kSlotsPerBlock < s.num_images ? first + kSlotsPerBlock : s.num_images;
  image_block<MaxG>(q_shared, lse, k, key_valid, image_index, s, b, h, first, last, mass + task * s.num_images);
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

template <int MaxG>
cudaError_t launch(const void* q, const void* k, const uint8_t* key_valid, const int64_t* image_index, float* out,
                   const Shape& s, int64_t out_stride, float weight, int64_t splits, float* scratch,
                   cudaStream_t stream) {
  const int64_t tasks = s.batch * s.kv_heads;
  float* partial_max = scratch;
  float* partial_sum = partial_max + tasks * splits * s.group;
  float* mass = partial_sum + tasks * splits * s.group;
  const size_t smem = shared_bytes(s.group, s.padded_dim);
  row_mass_partial<MaxG><<<dim3(static_cast<unsigned>(tasks), static_cast<unsigned>(splits)), kThreads, smem,
                           stream>>>(q, k, key_valid, s, splits, partial_max, partial_sum);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned slot_blocks = static_cast<unsigned>((s.num_images + kSlotsPerBlock - 1) / kSlotsPerBlock);
  row_mass_images<MaxG><<<dim3(static_cast<unsigned>(tasks), slot_blocks), kThreads, smem, stream>>>(
      q, k, key_valid, image_index, s, splits, partial_max, partial_sum, mass);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  row_mass_accumulate<<<dim3(static_cast<unsigned>((s.num_images + 255) / 256), static_cast<unsigned>(s.batch)), 256,
                        0, stream>>>(image_index, mass, out, s.kv_heads, s.num_images, out_stride, weight);
  return cudaGetLastError();
}

}  // namespace

extern "C" int64_t mmlatent_row_mass_splits(int64_t batch, int64_t kv_heads, int64_t num_keys) {
  return splits_for(batch, kv_heads, num_keys);
}

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
  if (group > kMmlatentRowMassMaxGroup || head_dim > kMmlatentRowMassMaxHeadDim || splits < 1 || splits > 65535 ||
      (num_images + kSlotsPerBlock - 1) / kSlotsPerBlock > 65535 || batch > 65535)
    return static_cast<int>(cudaErrorInvalidValue);
  const Shape s{batch, q_heads, kv_heads, group, num_keys, head_dim, (head_dim + kChunk - 1) / kChunk * kChunk,
                num_images, ks0, ks1, ks2, dtype, vector_loads(k, dtype, head_dim, ks0, ks1, ks2), scale};
  auto stream_ = reinterpret_cast<cudaStream_t>(stream);
  const cudaError_t err = group <= 8 ? launch<8>(q, k, key_valid, image_index, out, s, out_stride, weight, splits,
                                                 scratch, stream_)
                                     : launch<16>(q, k, key_valid, image_index, out, s, out_stride, weight, splits,
                                                  scratch, stream_);
  return static_cast<int>(err);
}
