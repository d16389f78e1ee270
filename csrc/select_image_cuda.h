// Launcher of the fused CUDA select_image_tokens kernel (runtime API only, like select_topk_cuda.h).
#pragma once
#include <cstdint>

#include "row_mass_cuda.h"    // kMmlatentRowMassMaxGroup, kMmlatentRowMassMaxHeadDim
#include "select_topk_cuda.h"  // kMmlatentSelectMaxTokens, MmlatentScoreDtype

extern "C" {

// Most layers one launch takes: their q / k pointers and weights travel as kernel parameters.
constexpr int64_t kMmlatentSelectImageMaxLayers = 128;

// Bytes of the scratch buffer a launch needs (partials, masses, completion counters).
int64_t mmlatent_select_image_scratch_bytes(int64_t num_layers, int64_t batch, int64_t kv_heads, int64_t group,
                                            int64_t num_keys, int64_t num_images);

// q[l] [B, Hq, D] contiguous and k[l] [B, Hkv, N, D] with the strides (ks0, ks1, ks2) in elements (the same for
// every layer) and unit stride along D, all of `dtype`; weights [L] on the host; key_valid [B, N], valid and
// exclude [B, Ni] bytes or nullptr; image_index [B, Ni] int64; embeds [B, Ni, embed_bytes] or nullptr;
// idx_out [B, k_select] int64; gathered_out [B, k_select, embed_bytes] or nullptr. Every row must have k_select
// eligible tokens (the caller checks). Returns 0 on success, otherwise a cudaError_t value.
int mmlatent_select_image_cuda(const void* const* q, const void* const* k, const float* weights, int64_t num_layers,
                               int dtype, const uint8_t* key_valid, const int64_t* image_index, const uint8_t* valid,
                               uint8_t* exclude, const void* embeds, int64_t batch, int64_t q_heads,
                               int64_t kv_heads, int64_t num_keys, int64_t head_dim, int64_t num_images, int64_t ks0,
                               int64_t ks1, int64_t ks2, float scale, int64_t k_select, int64_t embed_bytes,
                               bool order_by_score, int64_t* idx_out, void* gathered_out, void* scratch,
                               int64_t stream);

}  // extern "C"
