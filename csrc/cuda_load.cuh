// One element of a float32 / float16 / bfloat16 buffer (MmlatentScoreDtype's codes) as a float: the load every
// CUDA kernel that reads a runtime-chosen dtype shares.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "select_topk_cuda.h"  // MmlatentScoreDtype

__device__ __forceinline__ float mmlatent_load_float(const void* p, int dtype, int64_t i) {
  if (dtype == MMLATENT_F16) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == MMLATENT_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}
