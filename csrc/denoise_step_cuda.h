// Launcher of the CUDA denoise_step_ kernel (runtime API only, like select_topk_cuda.h).
#pragma once
#include <cstdint>

extern "C" {

// x [R, C] float32 with row stride `stride_x` (unit stride along C), updated in place; model_out [R or 2R, C] of
// `out_dtype` (MmlatentScoreDtype) with row stride `stride_o` (with cfg: conditional rows, then unconditional ones); table [S, 6]
// float32 (cx, co, px, po, c0, sigma); steps [R] int64 (each row's step) or nullptr (every row at `step`);
// noise [R, C] float32 with row stride `stride_n`, or nullptr; philox_state: int64 (seed, offset) on the device,
// the noise of element (r, c) drawn in the kernel at position offset + r * C + c (philox.h), or nullptr; neither:
// no noise term. `stream` is a cudaStream_t as an integer. Returns 0 on success, otherwise a cudaError_t value.
int mmlatent_denoise_step_cuda(float* x, int64_t stride_x, const void* model_out, int out_dtype, int64_t stride_o,
                               const float* table, const int64_t* steps, int64_t step, const float* noise,
                               int64_t stride_n, const int64_t* philox_state, int64_t rows, int64_t cols,
                               bool has_cfg, float cfg_scale, bool has_clip, float clip, int64_t stream);

}  // extern "C"
