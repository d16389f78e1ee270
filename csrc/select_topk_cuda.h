// Launcher of the CUDA select_topk_tokens kernel. The .cu side uses only the CUDA runtime API (no ATen), so it
// can be compiled by nvcc and linked into an extension that was built against a CPU-only torch.
#pragma once
#include <cstdint>

extern "C" {

// Element types the CUDA kernels read (select_topk: scores; row mass: q and k; denoise_step_: model_out, the
// only one that also reads float64).
enum MmlatentScoreDtype { MMLATENT_F32 = 0, MMLATENT_F16 = 1, MMLATENT_BF16 = 2, MMLATENT_F64 = 3 };

// Largest Ni one thread block can rank: Ni keys of 8 bytes live in shared memory.
constexpr int64_t kMmlatentSelectMaxTokens = 16384;

// scores [B,Ni] (contiguous, dtype `score_dtype`); valid/exclude [B,Ni] bytes (0/1, contiguous) or nullptr;
// embeds [B,Ni,Dm] contiguous with `elem_size`-byte elements or nullptr; idx_out [B,k] int64;
// gathered_out [B,k,Dm] or nullptr. `stream` is a cudaStream_t passed as an integer.
// Returns 0 on success, otherwise a cudaError_t value (see mmlatent_cuda_error_string).
int mmlatent_select_topk_cuda(const void* scores, int score_dtype, const uint8_t* valid, uint8_t* exclude,
                              const void* embeds, int64_t batch, int64_t num_tokens, int64_t k, int64_t embed_dim,
                              int64_t elem_size, bool order_by_score, int64_t* idx_out, void* gathered_out,
                              int64_t stream);

const char* mmlatent_cuda_error_string(int code);

}  // extern "C"
