// Device code of the CUDA top-k selection, shared by select_topk_tokens (select_topk_cuda.cu) and the fused
// select_image_tokens (select_image_cuda.cu), so that both rank, exclude and gather in exactly the same way.
// One thread block owns one batch row: it packs the row's tokens into 64-bit keys in shared memory, sorts them
// (bitonic), then writes the indices, the exclusion update and the gathered embeddings.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace mmlatent_select {

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

__device__ __forceinline__ bool eligible(const uint8_t* valid, const uint8_t* exclude, int64_t i) {
  return (valid == nullptr || valid[i]) && (exclude == nullptr || !exclude[i]);
}

__device__ inline void bitonic_sort(unsigned long long* s, int n, bool descending) {
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

// Ranks batch row b whose `padded` keys (a power of two; zero past the row's tokens) the block has written into
// `keys` and passed a barrier, then writes idx_out[b, :k], sets exclude[b, idx] and gathers embeds' rows.
// `exclude` must have been read (into the keys) before that barrier: updating it here cannot race.
__device__ inline void rank_and_write(unsigned long long* keys, int padded, int k_padded, int64_t b,
                                      int64_t num_tokens, int64_t k, bool order_by_score, uint8_t* exclude,
                                      const char* embeds, int64_t row_bytes, int64_t* idx_out, char* gathered_out) {
  bitonic_sort(keys, padded, /*descending=*/true);
  const int64_t base = b * num_tokens;
  // The first k keys are the winners in rank order: turn them into indices (each thread rewrites only its own
  // slots), then re-sort them by position unless rank order was asked for.
  const int convert = order_by_score ? static_cast<int>(k) : k_padded;
  for (int i = threadIdx.x; i < convert; i += blockDim.x)
    keys[i] = i < k ? static_cast<unsigned long long>(~static_cast<uint32_t>(keys[i] & 0xffffffffull)) : ~0ull;
  __syncthreads();
  if (!order_by_score) bitonic_sort(keys, k_padded, /*descending=*/false);

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

inline int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace mmlatent_select
