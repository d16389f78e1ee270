// The MmlatentScoreDtype code of a tensor a CUDA kernel reads, shared by the ops' CUDA wrappers.
#pragma once
#include <torch/extension.h>

#include "select_topk_cuda.h"

// float32, float16, bfloat16 (and float64 with allow_double); a TypeError naming `name` otherwise.
inline int mmlatent_cuda_dtype(const at::Tensor& t, const char* name, bool allow_double = false) {
  switch (t.scalar_type()) {
    case at::kFloat: return MMLATENT_F32;
    case at::kHalf: return MMLATENT_F16;
    case at::kBFloat16: return MMLATENT_BF16;
    case at::kDouble:
      if (allow_double) return MMLATENT_F64;
      break;
    default: break;
  }
  TORCH_CHECK_TYPE(false, name, ": the CUDA kernel reads float32, float16 or bfloat16",
                   allow_double ? " or float64" : "", ", got ", t.scalar_type());
  return -1;
}
