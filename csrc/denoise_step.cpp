// denoise_step_ of the native backend: a C++ CPU op (rows split over threads by at::parallel_for, OpenMP in
// PyTorch's builds; a branch-free inner loop per row that the compiler vectorises) and, when the extension was
// built with nvcc, a CUDA op whose kernel lives in denoise_step_cuda.cu. One pass over memory either way: each
// element of x, model_out and noise is read once and x written once, with no temporaries.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cuda_dtype.h"
#include "cpu_math.h"  // philox_normals
#include "denoise_step_cuda.h"
#include "select_topk_cuda.h"  // mmlatent_cuda_error_string

namespace {

// The checks the Python op made, repeated where a direct call of the registered op could skip them.
void check_args(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& table, int64_t step,
                const std::optional<at::Tensor>& steps, const std::optional<at::Tensor>& noise,
                const std::optional<at::Tensor>& philox_state, bool cfg) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.scalar_type() == at::kFloat, "x: expected [R, C] float32, got ",
                    x.scalar_type(), " of shape ", x.sizes());
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK_VALUE(model_out.dim() == 2 && model_out.size(0) == (cfg ? 2 : 1) * rows && model_out.size(1) == cols,
                    "model_out: expected [", (cfg ? 2 : 1) * rows, ", ", cols, "], got ", model_out.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(model_out.scalar_type()), "model_out: expected a floating dtype, got ",
                   model_out.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == 6 && table.scalar_type() == at::kFloat,
                    "table: expected [S, 6] float32, got ", table.scalar_type(), " of shape ", table.sizes());
  TORCH_CHECK_VALUE(steps.has_value() || (step >= 0 && step < table.size(0)), "step: expected 0 <= step < ",
                    table.size(0), ", got ", step);
  if (steps) {
    TORCH_CHECK_VALUE(steps->dim() == 1 && steps->size(0) == rows, "steps: expected [", rows, "], got ",
                      steps->sizes());
  }
  if (noise) {
    TORCH_CHECK_VALUE(noise->sizes() == x.sizes(), "noise: expected the shape of x ", x.sizes(), ", got ",
                      noise->sizes());
  }
  if (philox_state) {
    TORCH_CHECK_VALUE(!noise, "noise, philox_state: give one source of noise, not both");
    TORCH_CHECK_VALUE(philox_state->dim() == 1 && philox_state->size(0) == 2 &&
                      philox_state->scalar_type() == at::kLong && philox_state->device() == x.device() &&
                      philox_state->is_contiguous(),
                      "philox_state: expected a contiguous int64 [2] (seed, offset) on ", x.device(), ", got ",
                      philox_state->scalar_type(), " of shape ", philox_state->sizes(), " on ",
                      philox_state->device());
  }
  for (const at::Tensor* t : {&model_out, &table}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "expected every tensor on ", x.device(), ", got ", t->device());
  }
  TORCH_CHECK_VALUE(cols <= 1 || x.stride(1) == 1, "x: expected unit stride along C (it is updated in place)");
}

// Unit stride along C for the kernels' row loops: a copy only when the caller's layout lacks it.
at::Tensor unit_stride_rows(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

// Where the noise term comes from: none, a tensor, or drawn in the kernel (philox.h).
enum NoiseSource { kNoNoise = 0, kNoiseTensor = 1, kPhilox = 2 };

struct PhiloxStream {
  uint64_t seed, offset;
};

template <typename out_t, bool CFG, bool CLIP, int NOISE>
void denoise_rows_cpu(float* x, int64_t stride_x, const out_t* out, int64_t stride_o, const float* table,
                      const int64_t* steps, int64_t step, const float* noise, int64_t stride_n, PhiloxStream philox,
                      int64_t rows, int64_t cols, float cfg_scale, float clip) {
  // Enough elements per task that a thread's start-up is noise next to its work.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> drawn(NOISE == kPhilox ? cols : 0);  // a row's noise, drawn in vectorised passes
    for (int64_t r = begin; r < end; ++r) {
      const float* t = table + 6 * (steps != nullptr ? steps[r] : step);
      const float cx = t[0], co = t[1], px = t[2], po = t[3], c0 = t[4], sigma = t[5];
      float* xr = x + r * stride_x;
      const out_t* cond = out + r * stride_o;
      const out_t* uncond = out + (r + rows) * stride_o;
      const float* nr = NOISE == kNoiseTensor ? noise + r * stride_n : drawn.data();
      if (NOISE == kPhilox)
        mmlatent_cpu::philox_normals(philox.seed, philox.offset + static_cast<uint64_t>(r * cols), cols, drawn.data());
      // The torch backend's order of operations, so that both round alike.
      for (int64_t c = 0; c < cols; ++c) {
        float o = static_cast<float>(cond[c]);
        if (CFG) {
          const float u = static_cast<float>(uncond[c]);
          o = u + cfg_scale * (o - u);
        }
        const float xv = xr[c];
        float value = cx * xv + co * o;
        if (CLIP) value += c0 * std::min(std::max(px * xv + po * o, -clip), clip);
        if (NOISE != kNoNoise) value += sigma * nr[c];
        xr[c] = value;
      }
    }
  });
}

template <typename out_t, int NOISE>
void denoise_cpu_flags(float* x, int64_t sx, const out_t* out, int64_t so, const float* table, const int64_t* steps,
                       int64_t step, const float* noise, int64_t sn, PhiloxStream philox, int64_t rows, int64_t cols,
                       bool cfg, float cfg_scale, bool clip_on, float clip) {
#define MMLATENT_DENOISE_CPU(CFG, CLIP)                                                                           \
  return denoise_rows_cpu<out_t, CFG, CLIP, NOISE>(x, sx, out, so, table, steps, step, noise, sn, philox, rows, cols, \
                                                   cfg_scale, clip)
  if (cfg) {
    if (clip_on) MMLATENT_DENOISE_CPU(true, true);
    MMLATENT_DENOISE_CPU(true, false);
  }
  if (clip_on) MMLATENT_DENOISE_CPU(false, true);
  MMLATENT_DENOISE_CPU(false, false);
#undef MMLATENT_DENOISE_CPU
}

template <typename out_t>
void denoise_cpu_noise(float* x, int64_t sx, const out_t* out, int64_t so, const float* table, const int64_t* steps,
                       int64_t step, const float* noise, int64_t sn, const int64_t* philox_state, int64_t rows,
                       int64_t cols, bool cfg, float cfg_scale, bool clip_on, float clip) {
  if (philox_state != nullptr) {
    const PhiloxStream philox{static_cast<uint64_t>(philox_state[0]), static_cast<uint64_t>(philox_state[1])};
    return denoise_cpu_flags<out_t, kPhilox>(x, sx, out, so, table, steps, step, noise, sn, philox, rows, cols, cfg,
                                             cfg_scale, clip_on, clip);
  }
  const PhiloxStream none{0, 0};
  if (noise != nullptr)
    return denoise_cpu_flags<out_t, kNoiseTensor>(x, sx, out, so, table, steps, step, noise, sn, none, rows, cols,
                                                  cfg, cfg_scale, clip_on, clip);
  return denoise_cpu_flags<out_t, kNoNoise>(x, sx, out, so, table, steps, step, noise, sn, none, rows, cols, cfg,
                                            cfg_scale, clip_on, clip);
}

void denoise_step_cpu(at::Tensor& x, const at::Tensor& model_out_in, const at::Tensor& table_in, int64_t step,
                      const std::optional<at::Tensor>& steps_in, std::optional<double> clip,
                      const std::optional<at::Tensor>& noise_in, std::optional<double> cfg_scale,
                      const std::optional<at::Tensor>& philox_state) {
  check_args(x, model_out_in, table_in, step, steps_in, noise_in, philox_state, cfg_scale.has_value());
  const int64_t rows = x.size(0), cols = x.size(1);
  if (rows == 0 || cols == 0) return;
  const at::Tensor model_out = unit_stride_rows(model_out_in);
  const at::Tensor table = table_in.contiguous();
  std::optional<at::Tensor> steps, noise;
  if (steps_in) {
    steps = steps_in->to(at::kLong).contiguous();
    const auto [lo, hi] = at::aminmax(*steps);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < table.size(0), "steps: entries must be in [0, ",
                      table.size(0), ")");
  }
  if (noise_in) noise = unit_stride_rows(noise_in->to(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_out.scalar_type(), "denoise_step_cpu", [&] {
    denoise_cpu_noise<scalar_t>(x.data_ptr<float>(), x.stride(0), model_out.data_ptr<scalar_t>(),
                                model_out.stride(0), table.data_ptr<float>(),
                                steps ? steps->data_ptr<int64_t>() : nullptr, step,
                                noise ? noise->data_ptr<float>() : nullptr, noise ? noise->stride(0) : 0,
                                philox_state ? philox_state->data_ptr<int64_t>() : nullptr, rows, cols,
                                cfg_scale.has_value(), static_cast<float>(cfg_scale.value_or(0.0)), clip.has_value(),
                                static_cast<float>(clip.value_or(0.0)));
  });
}

#ifdef MMLATENT_WITH_CUDA
void denoise_step_cuda(at::Tensor& x, const at::Tensor& model_out_in, const at::Tensor& table_in, int64_t step,
                       const std::optional<at::Tensor>& steps_in, std::optional<double> clip,
                       const std::optional<at::Tensor>& noise_in, std::optional<double> cfg_scale,
                       const std::optional<at::Tensor>& philox_state) {
  check_args(x, model_out_in, table_in, step, steps_in, noise_in, philox_state, cfg_scale.has_value());
  const int64_t rows = x.size(0), cols = x.size(1);
  if (rows == 0 || cols == 0) return;
  c10::DeviceGuard guard(x.device());
  const int out_dtype = mmlatent_cuda_dtype(model_out_in, "model_out", /*allow_double=*/true);
  // No host synchronisation (the step range was checked by the public op outside a capture), so a CUDA graph
  // can capture this call.
  const at::Tensor model_out = unit_stride_rows(model_out_in);
  const at::Tensor table = table_in.contiguous();
  std::optional<at::Tensor> steps, noise;
  if (steps_in) steps = steps_in->to(at::kLong).contiguous();
  if (noise_in) noise = unit_stride_rows(noise_in->to(at::kFloat));
  auto stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(x.device());
  const int code = mmlatent_denoise_step_cuda(
      x.data_ptr<float>(), x.stride(0), model_out.data_ptr(), out_dtype, model_out.stride(0), table.data_ptr<float>(),
      steps ? steps->data_ptr<int64_t>() : nullptr, step, noise ? noise->data_ptr<float>() : nullptr,
      noise ? noise->stride(0) : 0, philox_state ? philox_state->data_ptr<int64_t>() : nullptr, rows, cols,
      cfg_scale.has_value(), static_cast<float>(cfg_scale.value_or(0.0)),
      clip.has_value(), static_cast<float>(clip.value_or(0.0)), reinterpret_cast<int64_t>(stream.native_handle()));
  TORCH_CHECK(code == 0, "denoise_step_ CUDA kernel failed: ", mmlatent_cuda_error_string(code));
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmlatent, m) {
  m.def(
      "denoise_step_native(Tensor(a!) x, Tensor model_out, Tensor table, int step, Tensor? steps, float? clip, "
      "Tensor? noise, float? cfg_scale, Tensor? philox_state=None) -> ()");
}

TORCH_LIBRARY_IMPL(mmlatent, CPU, m) { m.impl("denoise_step_native", &denoise_step_cpu); }

#ifdef MMLATENT_WITH_CUDA
TORCH_LIBRARY_IMPL(mmlatent, CUDA, m) { m.impl("denoise_step_native", &denoise_step_cuda); }
#endif
