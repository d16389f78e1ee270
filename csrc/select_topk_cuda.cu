// CUDA kernel of select_topk_tokens: one thread block per batch row ranks the row's eligible tokens with a
// bitonic sort of packed 64-bit keys in shared memory, then writes the indices, the exclusion update and the
// gathered embeddings. Runtime API only (see select_topk_cuda.h for why).
#include "select_topk_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

__device__ __forceinline__ float load_score(const void* p, int dtype, int64_t i) {
  if (dtype == MMLATENT_F16) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == MMLATENT_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// Packs (rank class | order-preserving float bits, ~index) so that a larger key is a better token:
// higher score first, NaN below every number, ties to the lower index; key 0 marks an ineligible slot.
__device__ __forceinline__ unsigned long long pack_key(float score, bool eligible, uint32_t index) {
  if (!eligible) return 0ull;
  uint32_t hi;
  if (isnan(score)) {
    hi = 1u;
  } else {
    uint32_t bits = __float_as_uint(score);
    hi = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    // -inf maps to 0x007FFFFF, above the NaN class.
  }
  return (static_cast<unsigned long long>(hi) << 32) | static_cast<unsigned long long>(~index);
}

__device__ void bitonic_sort(unsigned long long* s, int n, bool descending) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int j = i ^ stride;
        if (j > i) {
          bool up = ((i & size) == 0) != descending;  // this pair's direction in the current merge
          unsigned long long a = s[i], b = s[j];
          if ((a > b) == up) { s[i] = b; s[j] = a; }
        }
      }
      __syncthreads();
    }
  }
}

template <typename Word>
__device__ void copy_rows(const Word* src, Word* dst, const unsigned long long* rows, int64_t k,
                          int64_t words_per_row) {
  const int64_t total = k * words_per_row;
  for (int64_t t = threadIdx.x; t < total; t += blockDim.x) {
    int64_t r = t / words_per_row, c = t - r * words_per_row;
    dst[r * words_per_row + c] = src[static_cast<int64_t>(rows[r]) * words_per_row + c];
  }
}

__global__ void select_topk_kernel(const void* scores, int score_dtype, const uint8_t* valid, uint8_t* exclude,
                                   const char* embeds, int64_t num_tokens, int64_t k, int64_t row_bytes,
                                   int padded, int k_padded, bool order_by_score, int64_t* idx_out,
                                   char* gathered_out) {
  extern __shared__ unsigned long long keys[];
  const int64_t b = blockIdx.x;
  const int64_t base = b * num_tokens;

  for (int i = threadIdx.x; i < padded; i += blockDim.x) {
    unsigned long long key = 0ull;
    if (i < num_tokens) {
      bool eligible = (valid == nullptr || valid[base + i]) && (exclude == nullptr || !exclude[base + i]);
      key = pack_key(load_score(scores, score_dtype, base + i), eligible, static_cast<uint32_t>(i));
    }
    keys[i] = key;
  }
  __syncthreads();
  bitonic_sort(keys, padded, /*descending=*/true);

  // The first k keys are the winners in rank order: turn them into indices (each thread rewrites only its own
  // slots), then re-sort them by position unless rank order was asked for.
  const int convert = order_by_score ? static_cast<int>(k) : k_padded;
  for (int i = threadIdx.x; i < convert; i += blockDim.x)
    keys[i] = i < k ? static_cast<unsigned long long>(~static_cast<uint32_t>(keys[i] & 0xffffffffull)) : ~0ull;
  __syncthreads();
  if (!order_by_score) bitonic_sort(keys, k_padded, /*descending=*/false);

  // Every thread read `exclude` before the first barrier, so updating it now cannot race.
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    int64_t index = static_cast<int64_t>(keys[i]);
    idx_out[b * k + i] = index;
    if (exclude != nullptr) exclude[base + index] = 1;
  }
  if (embeds == nullptr) return;

  const char* src = embeds + base * row_bytes;
  char* dst = gathered_out + b * k * row_bytes;
  const bool aligned16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (aligned16) {
    copy_rows(reinterpret_cast<const uint4*>(src), reinterpret_cast<uint4*>(dst), keys, k, row_bytes / 16);
  } else if (row_bytes % 4 == 0) {
    copy_rows(reinterpret_cast<const uint32_t*>(src), reinterpret_cast<uint32_t*>(dst), keys, k, row_bytes / 4);
  } else {
    copy_rows(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), keys, k, row_bytes / 2);
  }
}

int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
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
