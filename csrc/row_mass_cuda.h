// Launcher of the CUDA row_attention_mass kernels (runtime API only, like select_topk_cuda.h).
#pragma once
#include <cstdint>

extern "C" {

// Largest head group (query heads per KV head) and head dim the CUDA row mass takes. The kernels keep three
// registers per head of the group: at 32 heads the key-split kernel spills on sm_90a.
constexpr int64_t kMmlatentRowMassMaxGroup = 16;
constexpr int64_t kMmlatentRowMassMaxHeadDim = 256;

// q [B, Hq, D] contiguous; k [B, Hkv, N, D] with strides (ks0, ks1, ks2) in elements and unit stride along D, both
// of `dtype` (MmlatentScoreDtype's codes); key_valid [B, N] bytes or nullptr; image_index [B, Ni] int64
// contiguous; out [B, Ni] float32 with row stride `out_stride`, accumulated in place. `scratch` holds
// mmlatent_row_mass_scratch_floats(...) floats. Returns 0 on success, otherwise a cudaError_t value.
// Key splits per (batch item, KV head) the kernels use: the fused select_image_tokens splits every layer so too.
int64_t mmlatent_row_mass_splits(int64_t batch, int64_t kv_heads, int64_t num_keys);
int64_t mmlatent_row_mass_scratch_floats(int64_t batch, int64_t kv_heads, int64_t group, int64_t num_images,
                                         int64_t splits);
int mmlatent_row_mass_cuda(const void* q, const void* k, int dtype, const uint8_t* key_valid,
                           const int64_t* image_index, float* out, int64_t batch, int64_t q_heads, int64_t kv_heads,
                           int64_t num_keys, int64_t head_dim, int64_t num_images, int64_t ks0, int64_t ks1,
                           int64_t ks2, int64_t out_stride, float scale, float weight, int64_t splits,
                           float* scratch, int64_t stream);

}  // extern "C"
