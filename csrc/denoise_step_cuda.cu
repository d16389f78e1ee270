// CUDA kernel of denoise_step_: one thread per element, each row's six schedule coefficients read once per
// thread from the [S, 6] table (an L1 hit after the first warp), the guided output, clamp and noise term in
// registers, x written once. The noise is read from a tensor, or drawn in the kernel (philox.h) at the stream
// position a device-resident (seed, offset) pair holds, so that a captured CUDA graph draws afresh at every replay
// (the caller advances the offset after the launch). Runtime API only (see select_topk_cuda.h for why).
#include "denoise_step_cuda.h"
#include "philox.h"
#include "select_topk_cuda.h"  // MmlatentScoreDtype

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

enum NoiseSource { kNoNoise = 0, kNoiseTensor = 1, kPhilox = 2 };

template <typename Out, bool CFG, bool CLIP, int NOISE>
__global__ void denoise_step_kernel(float* __restrict__ x, int64_t stride_x, const Out* __restrict__ out,
                                    int64_t stride_o, const float* __restrict__ table,
                                    const int64_t* __restrict__ steps, int64_t step,
                                    const float* __restrict__ noise, int64_t stride_n,
                                    const int64_t* __restrict__ philox_state, int64_t rows, int64_t cols,
                                    int64_t row0, float cfg_scale, float clip) {
  const int64_t r = row0 + blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const float* t = table + 6 * (steps != nullptr ? steps[r] : step);
  float o = to_float(out[r * stride_o + c]);
  if (CFG) {
    const float uncond = to_float(out[(r + rows) * stride_o + c]);
    o = uncond + cfg_scale * (o - uncond);
  }
  float* xp = x + r * stride_x + c;
  const float xv = *xp;
  // The torch backend's order of operations, so that both round alike: (cx x + co o) + c0 clamp(...) + sigma n.
  float value = __fadd_rn(__fmul_rn(t[0], xv), __fmul_rn(t[1], o));
  if (CLIP) {
    const float pred = __fadd_rn(__fmul_rn(t[2], xv), __fmul_rn(t[3], o));
    const float clamped = isnan(pred) ? pred : fminf(fmaxf(pred, -clip), clip);  // NaN passes, as torch's clamp
    value = __fadd_rn(value, __fmul_rn(t[4], clamped));
  }
  if (NOISE == kNoiseTensor) value = __fadd_rn(value, __fmul_rn(t[5], noise[r * stride_n + c]));
  if (NOISE == kPhilox) {
    const uint64_t seed = static_cast<uint64_t>(philox_state[0]);
    const uint64_t position = static_cast<uint64_t>(philox_state[1]) + static_cast<uint64_t>(r * cols + c);
    value = __fadd_rn(value, __fmul_rn(t[5], mmlatent_philox_normal(seed, position)));
  }
  *xp = value;
}

template <typename Out, bool CFG, bool CLIP, int NOISE>
cudaError_t launch(float* x, int64_t stride_x, const void* out, int64_t stride_o, const float* table,
                   const int64_t* steps, int64_t step, const float* noise, int64_t stride_n,
                   const int64_t* philox_state, int64_t rows, int64_t cols, float cfg_scale, float clip,
                   cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int64_t kMaxGridRows = 65535;  // grid.y's limit: more rows take several launches
  for (int64_t row0 = 0; row0 < rows; row0 += kMaxGridRows) {
    const int64_t chunk = rows - row0 < kMaxGridRows ? rows - row0 : kMaxGridRows;
    const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads), static_cast<unsigned>(chunk));
    denoise_step_kernel<Out, CFG, CLIP, NOISE><<<grid, kThreads, 0, stream>>>(
        x, stride_x, static_cast<const Out*>(out), stride_o, table, steps, step, noise, stride_n, philox_state, rows,
        cols, row0, cfg_scale, clip);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename Out, int NOISE>
cudaError_t dispatch_flags(float* x, int64_t stride_x, const void* out, int64_t stride_o, const float* table,
                           const int64_t* steps, int64_t step, const float* noise, int64_t stride_n,
                           const int64_t* philox_state, int64_t rows, int64_t cols, bool cfg, float cfg_scale,
                           bool clip_on, float clip, cudaStream_t stream) {
#define MMLATENT_DENOISE_CASE(CFG, CLIP)                                                                           \
  return launch<Out, CFG, CLIP, NOISE>(x, stride_x, out, stride_o, table, steps, step, noise, stride_n, philox_state, \
                                       rows, cols, cfg_scale, clip, stream)
  if (cfg) {
    if (clip_on) MMLATENT_DENOISE_CASE(true, true);
    MMLATENT_DENOISE_CASE(true, false);
  }
  if (clip_on) MMLATENT_DENOISE_CASE(false, true);
  MMLATENT_DENOISE_CASE(false, false);
#undef MMLATENT_DENOISE_CASE
}

template <typename Out>
cudaError_t dispatch_noise(float* x, int64_t stride_x, const void* out, int64_t stride_o, const float* table,
                           const int64_t* steps, int64_t step, const float* noise, int64_t stride_n,
                           const int64_t* philox_state, int64_t rows, int64_t cols, bool cfg, float cfg_scale,
                           bool clip_on, float clip, cudaStream_t stream) {
  if (philox_state != nullptr)
    return dispatch_flags<Out, kPhilox>(x, stride_x, out, stride_o, table, steps, step, noise, stride_n,
                                        philox_state, rows, cols, cfg, cfg_scale, clip_on, clip, stream);
  if (noise != nullptr)
    return dispatch_flags<Out, kNoiseTensor>(x, stride_x, out, stride_o, table, steps, step, noise, stride_n,
                                             philox_state, rows, cols, cfg, cfg_scale, clip_on, clip, stream);
  return dispatch_flags<Out, kNoNoise>(x, stride_x, out, stride_o, table, steps, step, noise, stride_n, philox_state,
                                       rows, cols, cfg, cfg_scale, clip_on, clip, stream);
}

}  // namespace

extern "C" int mmlatent_denoise_step_cuda(float* x, int64_t stride_x, const void* model_out, int out_dtype,
                                          int64_t stride_o, const float* table, const int64_t* steps, int64_t step,
                                          const float* noise, int64_t stride_n, const int64_t* philox_state,
                                          int64_t rows, int64_t cols, bool has_cfg, float cfg_scale, bool has_clip,
                                          float clip, int64_t stream) {
  if (rows == 0 || cols == 0) return 0;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (out_dtype) {
    case MMLATENT_F16:
      err = dispatch_noise<__half>(x, stride_x, model_out, stride_o, table, steps, step, noise, stride_n,
                                   philox_state, rows, cols, has_cfg, cfg_scale, has_clip, clip, s);
      break;
    case MMLATENT_BF16:
      err = dispatch_noise<__nv_bfloat16>(x, stride_x, model_out, stride_o, table, steps, step, noise, stride_n,
                                          philox_state, rows, cols, has_cfg, cfg_scale, has_clip, clip, s);
      break;
    case MMLATENT_F64:
      err = dispatch_noise<double>(x, stride_x, model_out, stride_o, table, steps, step, noise, stride_n,
                                   philox_state, rows, cols, has_cfg, cfg_scale, has_clip, clip, s);
      break;
    default:
      err = dispatch_noise<float>(x, stride_x, model_out, stride_o, table, steps, step, noise, stride_n,
                                  philox_state, rows, cols, has_cfg, cfg_scale, has_clip, clip, s);
  }
  return static_cast<int>(err);
}
