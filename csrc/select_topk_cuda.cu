// CUDA kernel of select_topk_tokens: one thread block per batch row (select_topk_device.cuh ranks it).
// Runtime API only (see select_topk_cuda.h for why).
#include "select_topk_cuda.h"
#include "cuda_load.cuh"
#include "select_topk_device.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace {

using namespace mmlatent_select;

__global__ void select_topk_kernel(const void* scores, int score_dtype, const uint8_t* valid, uint8_t* exclude,
                                   const char* embeds, int64_t num_tokens, int64_t k, int64_t row_bytes,
                                   int padded, int k_padded, bool order_by_score, int64_t* idx_out,
                                   char* gathered_out) {
  extern __shared__ unsigned long long keys[];
  const int64_t b = blockIdx.x;
  const int64_t base = b * num_tokens;
  for (int i = threadIdx.x; i < padded; i += blockDim.x) {
    keys[i] = i < num_tokens ? pack_key(mmlatent_load_float(scores, score_dtype, base + i),
                                        eligible(valid, exclude, base + i), static_cast<uint32_t>(i))
                             : 0ull;
  }
  __syncthreads();
  rank_and_write(keys, padded, k_padded, b, num_tokens, k, order_by_score, exclude, embeds, row_bytes, idx_out,
                 gathered_out);
}

}  // namespace

extern "C" int mmlatent_select_topk_cuda(const void* scores, int score_dtype, const uint8_t* valid, uint8_t* exclude,
                                         const void* embeds, int64_t batch, int64_t num_tokens, int64_t k,
                                         int64_t embed_dim, int64_t elem_size, bool order_by_score, int64_t* idx_out,
                                         void* gathered_out, int64_t stream) {
  if (batch == 0 || k == 0) return 0;
  if (num_tokens > kMmlatentSelectMaxTokens || k > num_tokens) return static_cast<int>(cudaErrorInvalidValue);
  const int padded = next_pow2(num_tokens);
  const int k_padded = next_pow2(k);
  const int threads = padded < 1024 ? (padded < 32 ? 32 : padded) : 1024;
  const size_t smem = static_cast<size_t>(padded) * sizeof(unsigned long long);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(select_topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  select_topk_kernel<<<static_cast<unsigned>(batch), threads, smem, reinterpret_cast<cudaStream_t>(stream)>>>(
      scores, score_dtype, valid, exclude, static_cast<const char*>(embeds), num_tokens, k, embed_dim * elem_size,
      padded, k_padded, order_by_score, idx_out, static_cast<char*>(gathered_out));
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* mmlatent_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
