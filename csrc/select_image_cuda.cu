// CUDA select_image_tokens in one kernel launch (after a memset of its completion counters): every layer's row
// mass and the top-k selection of each batch row, chained inside the launch by "last block done" counters.
//   - Each block takes one (layer, batch item, KV head, key split) and writes its heads' (max, sum of exp), as
//     row_attention_mass's first kernel does (row_mass_device.cuh, the same splits).
//   - The last split of a (layer, batch item, KV head) to finish computes that task's image-slot masses.
//   - The last task of a batch item to finish sums the masses over KV heads and layers, in the order and with the
//     weights of row_attention_mass per layer, then ranks, excludes and gathers (select_topk_device.cuh).
// So the scores, and with them the selected tokens, ties and NaN included, are those of the per-layer op followed
// by select_topk_tokens. A block publishes its results with a device-scope fence before it counts itself done;
// the block that finds itself last reads them through L2 (__ldcg). Runtime API only (see select_topk_cuda.h).
#include "select_image_cuda.h"

#include "row_mass_device.cuh"
#include "select_topk_device.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace {

using namespace mmlatent_row_mass;

struct Layers {
  const void* q[kMmlatentSelectImageMaxLayers];
  const void* k[kMmlatentSelectImageMaxLayers];
  float weight[kMmlatentSelectImageMaxLayers];
};

struct Selection {
  const int64_t* image_index;
  const uint8_t* valid;
  uint8_t* exclude;
  const char* embeds;
  int64_t row_bytes, k_select;
  int padded, k_padded;
  bool order_by_score;
  int64_t* idx_out;
  char* gathered_out;
};

// Whether this block is the last of `total` to pass this point for `counter`; a barrier for the block.
__device__ __forceinline__ bool last_to_arrive(unsigned int* counter, unsigned int total, int* flag) {
  __threadfence();  // this block's results are visible device-wide before it counts itself done
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicAdd(counter, 1u) == total - 1;
  __syncthreads();
  return *flag;
}

template <int MaxG>
__global__ void __launch_bounds__(kThreads) select_image_kernel(const __grid_constant__ Layers layers, Shape s,
                                                                int64_t num_layers, int64_t splits,
                                                                const uint8_t* key_valid, Selection sel,
                                                                float* scratch, unsigned int* counters) {
  extern __shared__ float shared[];
  __shared__ int flag;
  float* q_shared = shared;
  float* reduce = q_shared + s.group * s.padded_dim;
  float* lse = reduce + 2 * kWarps * s.group;
  const int64_t tasks = s.batch * s.kv_heads;  // per layer
  const int64_t unit = blockIdx.x / splits, split = blockIdx.x % splits;  // unit = layer * tasks + task
  const int64_t layer = unit / tasks, task = unit % tasks;
  const int64_t b = task / s.kv_heads, h = task % s.kv_heads;
  float* partial_max = scratch;
  float* partial_sum = partial_max + num_layers * tasks * splits * s.group;
  float* mass = partial_sum + num_layers * tasks * splits * s.group;  // [L, B, Hkv, Ni]
  const void* k = layers.k[layer];

  load_queries(layers.q[layer], s, b, h, q_shared);
  const int64_t per_split = (s.num_keys + splits - 1) / splits;
  const int64_t begin = split * per_split, end = begin + per_split < s.num_keys ? begin + per_split : s.num_keys;
  const int64_t slot = (unit * splits + split) * s.group;
  partial_block<MaxG>(q_shared, k, key_valid, s, b, h, begin, end, reduce, partial_max + slot, partial_sum + slot);
  if (!last_to_arrive(counters + unit, static_cast<unsigned int>(splits), &flag)) return;

  head_lse(partial_max + unit * splits * s.group, partial_sum + unit * splits * s.group, s.group, splits, lse);
  image_block<MaxG>(q_shared, lse, k, key_valid, sel.image_index, s, b, h, 0, s.num_images,
                    mass + unit * s.num_images);
  unsigned int* batch_done = counters + num_layers * tasks;
  if (!last_to_arrive(batch_done + b, static_cast<unsigned int>(num_layers * s.kv_heads), &flag)) return;

  // this block now owns batch row b: scores into shared keys, then the selection
  auto* keys = reinterpret_cast<unsigned long long*>(shared);
  const int64_t row = b * s.num_images;
  for (int64_t j = threadIdx.x; j < sel.padded; j += blockDim.x) {
    unsigned long long key = 0ull;
    if (j < s.num_images) {
      float score = 0.0f;
      if (sel.image_index[row + j] >= 0) {
        for (int64_t l = 0; l < num_layers; ++l) {
          float total = 0.0f;
          for (int64_t hh = 0; hh < s.kv_heads; ++hh)
            total += __ldcg(mass + ((l * s.batch + b) * s.kv_heads + hh) * s.num_images + j);
          score += layers.weight[l] * total;
        }
      }
      key = mmlatent_select::pack_key(score, mmlatent_select::eligible(sel.valid, sel.exclude, row + j),
                                      static_cast<uint32_t>(j));
    }
    keys[j] = key;
  }
  __syncthreads();
  mmlatent_select::rank_and_write(keys, sel.padded, sel.k_padded, b, s.num_images, sel.k_select, sel.order_by_score,
                                  sel.exclude, sel.embeds, sel.row_bytes, sel.idx_out, sel.gathered_out);
}

template <int MaxG>
cudaError_t launch(const Layers& layers, const Shape& s, int64_t num_layers, int64_t splits,
                   const uint8_t* key_valid, const Selection& sel, float* scratch, unsigned int* counters,
                   size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(select_image_kernel<MaxG>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = num_layers * s.batch * s.kv_heads * splits;
  select_image_kernel<MaxG><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      layers, s, num_layers, splits, key_valid, sel, scratch, counters);
  return cudaGetLastError();
}

}  // namespace

extern "C" int64_t mmlatent_select_image_scratch_bytes(int64_t num_layers, int64_t batch, int64_t kv_heads,
                                                       int64_t group, int64_t num_keys, int64_t num_images) {
  const int64_t units = num_layers * batch * kv_heads;
  const int64_t splits = splits_for(batch, kv_heads, num_keys);
  const int64_t floats = 2 * units * splits * group + units * num_images;
  return floats * static_cast<int64_t>(sizeof(float)) + (units + batch) * static_cast<int64_t>(sizeof(unsigned));
}

extern "C" int mmlatent_select_image_cuda(const void* const* q, const void* const* k, const float* weights,
                                          int64_t num_layers, int dtype, const uint8_t* key_valid,
                                          const int64_t* image_index, const uint8_t* valid, uint8_t* exclude,
                                          const void* embeds, int64_t batch, int64_t q_heads, int64_t kv_heads,
                                          int64_t num_keys, int64_t head_dim, int64_t num_images, int64_t ks0,
                                          int64_t ks1, int64_t ks2, float scale, int64_t k_select,
                                          int64_t embed_bytes, bool order_by_score, int64_t* idx_out,
                                          void* gathered_out, void* scratch, int64_t stream) {
  if (batch == 0 || k_select == 0) return 0;
  const int64_t group = q_heads / kv_heads;
  const int64_t splits = splits_for(batch, kv_heads, num_keys);
  const int64_t blocks = num_layers * batch * kv_heads * splits;
  if (num_layers < 1 || num_layers > kMmlatentSelectImageMaxLayers || group > kMmlatentRowMassMaxGroup ||
      head_dim > kMmlatentRowMassMaxHeadDim || num_images > kMmlatentSelectMaxTokens || k_select > num_images ||
      blocks > 0x7fffffff)
    return static_cast<int>(cudaErrorInvalidValue);
  Layers layers;
  for (int64_t l = 0; l < num_layers; ++l) {
    layers.q[l] = q[l];
    layers.k[l] = k[l];
    layers.weight[l] = weights[l];
  }
  bool vec = true;
  for (int64_t l = 0; l < num_layers; ++l) vec = vec && vector_loads(k[l], dtype, head_dim, ks0, ks1, ks2);
  const Shape s{batch, q_heads, kv_heads, group, num_keys, head_dim, (head_dim + kChunk - 1) / kChunk * kChunk,
                num_images, ks0, ks1, ks2, dtype, vec, scale};
  const int padded = mmlatent_select::next_pow2(num_images);
  const Selection sel{image_index, valid, exclude, static_cast<const char*>(embeds), embed_bytes, k_select,
                      padded, mmlatent_select::next_pow2(k_select), order_by_score, idx_out,
                      static_cast<char*>(gathered_out)};
  const int64_t units = num_layers * batch * kv_heads;
  float* floats = static_cast<float*>(scratch);
  auto* counters = reinterpret_cast<unsigned int*>(floats + 2 * units * splits * group + units * num_images);
  auto stream_ = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err = cudaMemsetAsync(counters, 0, (units + batch) * sizeof(unsigned int), stream_);
  if (err != cudaSuccess) return static_cast<int>(err);
  const size_t row_mass_smem = shared_bytes(group, s.padded_dim);
  const size_t keys_smem = static_cast<size_t>(padded) * sizeof(unsigned long long);
  const size_t smem = row_mass_smem > keys_smem ? row_mass_smem : keys_smem;
  err = group <= 8 ? launch<8>(layers, s, num_layers, splits, key_valid, sel, floats, counters, smem, stream_)
                   : launch<16>(layers, s, num_layers, splits, key_valid, sel, floats, counters, smem, stream_);
  return static_cast<int>(err);
}
