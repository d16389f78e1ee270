// mmlatent._C: the `native` backend. select_topk_tokens as a C++ CPU op and, when the extension was built with
// nvcc, a CUDA op whose kernel lives in select_topk_cuda.cu (runtime API only; the stream arrives as an integer).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "cuda_dtype.h"
#include "select_topk.h"
// Always included: their caps are what the Python dispatch reads back (select_topk_max_tokens, row_mass_limits),
// and their declarations need no CUDA headers.
#include "row_mass_cuda.h"
#include "select_image_cuda.h"
#include "select_topk_cuda.h"

// Shared argument checks of both devices; errors surface in Python as ValueError / TypeError naming the argument.
void mmlatent_check_select_args(const at::Tensor& scores, int64_t k, const std::optional<at::Tensor>& exclude,
                                const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& embeds) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores: expected [B, Ni], got shape ", scores.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), "scores: expected a floating dtype, got ",
                   scores.scalar_type());
  const int64_t num_tokens = scores.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= num_tokens, "k: expected 1 <= k <= Ni = ", num_tokens, ", got ", k);
  auto check_mask = [&](const std::optional<at::Tensor>& m, const char* name) {
    if (!m) return;
    TORCH_CHECK_TYPE(m->scalar_type() == at::kBool, name, ": expected dtype torch.bool, got ", m->scalar_type());
    TORCH_CHECK_VALUE(m->sizes() == scores.sizes(), name, ": expected shape ", scores.sizes(), ", got ",
                      m->sizes());
    TORCH_CHECK_VALUE(m->device() == scores.device(), name, ": expected device ", scores.device(), ", got ",
                      m->device());
  };
  check_mask(exclude, "exclude");
  check_mask(valid, "valid");
  if (exclude) TORCH_CHECK_VALUE(exclude->is_contiguous(), "exclude: must be contiguous (it is updated in place)");
  if (embeds) {
    TORCH_CHECK_VALUE(embeds->dim() == 3 && embeds->size(0) == scores.size(0) && embeds->size(1) == num_tokens,
                      "embeds: expected [B, Ni, Dm] = [", scores.size(0), ", ", num_tokens, ", Dm], got ",
                      embeds->sizes());
    TORCH_CHECK_VALUE(embeds->device() == scores.device(), "embeds: expected device ", scores.device(), ", got ",
                      embeds->device());
  }
}

namespace {

at::Tensor empty_gathered(const at::Tensor& scores, int64_t k, const std::optional<at::Tensor>& embeds) {
  if (embeds) return at::empty({scores.size(0), k, embeds->size(2)}, embeds->options());
  return at::empty({scores.size(0), k, 0}, scores.options());
}

template <typename scalar_t>
void select_rows_cpu(const at::Tensor& scores, int64_t k, const uint8_t* valid, uint8_t* exclude,
                     const char* embeds, int64_t row_bytes, bool order_by_score, int64_t* idx_out,
                     char* gathered_out) {
  const int64_t batch = scores.size(0), num_tokens = scores.size(1);
  const scalar_t* data = scores.data_ptr<scalar_t>();
  auto eligible = [&](int64_t flat) {
    return (valid == nullptr || valid[flat]) && (exclude == nullptr || !exclude[flat]);
  };
  // All rows are checked before any row is modified, so a failure leaves `exclude` untouched.
  for (int64_t b = 0; b < batch; ++b) {
    int64_t count = 0;
    for (int64_t i = 0; i < num_tokens; ++i) count += eligible(b * num_tokens + i);
    TORCH_CHECK_VALUE(count >= k, "select_topk_tokens: row ", b, " has ", count,
                      " eligible tokens (valid and not excluded), fewer than k = ", k);
  }
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t base = b * num_tokens;
      order.clear();
      for (int64_t i = 0; i < num_tokens; ++i)
        if (eligible(base + i)) order.push_back(i);
      // Higher score first, NaN below every number, ties to the lower index (exact in double for every dtype).
      auto better = [&](int64_t a, int64_t c) {
        const double sa = static_cast<double>(data[base + a]), sc = static_cast<double>(data[base + c]);
        const bool na = std::isnan(sa), nc = std::isnan(sc);
        if (na != nc) return nc;
        if (!na && sa != sc) return sa > sc;
        return a < c;
      };
      std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
      if (!order_by_score) std::sort(order.begin(), order.begin() + k);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t index = order[j];
        idx_out[b * k + j] = index;
        if (exclude != nullptr) exclude[base + index] = 1;
        if (embeds != nullptr)
          std::memcpy(gathered_out + (b * k + j) * row_bytes, embeds + (base + index) * row_bytes, row_bytes);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mmlatent_select_topk_cpu(const at::Tensor& scores_in, int64_t k,
                                                          const std::optional<at::Tensor>& exclude,
                                                          const std::optional<at::Tensor>& valid_in,
                                                          const std::optional<at::Tensor>& embeds_in,
                                                          bool order_by_score) {
  mmlatent_check_select_args(scores_in, k, exclude, valid_in, embeds_in);
  const at::Tensor scores = scores_in.contiguous();
  std::optional<at::Tensor> valid, embeds;
  if (valid_in) valid = valid_in->contiguous();
  if (embeds_in) embeds = embeds_in->contiguous();
  at::Tensor idx = at::empty({scores.size(0), k}, scores.options().dtype(at::kLong));
  at::Tensor gathered = empty_gathered(scores, k, embeds);
  const int64_t row_bytes = embeds ? embeds->size(2) * embeds->element_size() : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "select_topk_tokens_cpu", [&] {
    select_rows_cpu<scalar_t>(scores, k, valid ? reinterpret_cast<const uint8_t*>(valid->data_ptr<bool>()) : nullptr,
                              exclude ? reinterpret_cast<uint8_t*>(exclude->data_ptr<bool>()) : nullptr,
                              embeds ? static_cast<const char*>(embeds->data_ptr()) : nullptr, row_bytes,
                              order_by_score, idx.data_ptr<int64_t>(),
                              embeds ? static_cast<char*>(gathered.data_ptr()) : nullptr);
  });
  return {idx, gathered};
}

namespace {

#ifdef MMLATENT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> select_topk_tokens_cuda(const at::Tensor& scores_in, int64_t k,
                                                           const std::optional<at::Tensor>& exclude,
                                                           const std::optional<at::Tensor>& valid_in,
                                                           const std::optional<at::Tensor>& embeds_in,
                                                           bool order_by_score) {
  mmlatent_check_select_args(scores_in, k, exclude, valid_in, embeds_in);
  const int score_dtype = mmlatent_cuda_dtype(scores_in, "scores");
  TORCH_CHECK_VALUE(scores_in.size(1) <= kMmlatentSelectMaxTokens, "scores: the CUDA op ranks at most ",
                    kMmlatentSelectMaxTokens, " tokens per row, got Ni = ", scores_in.size(1));
  c10::DeviceGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  std::optional<at::Tensor> valid, embeds;
  if (valid_in) valid = valid_in->contiguous();
  if (embeds_in) embeds = embeds_in->contiguous();
  // The eligibility check needs the host; it runs before the kernel so that a failure modifies nothing.
  at::Tensor eligible = valid ? valid->clone() : at::ones_like(scores, scores.options().dtype(at::kBool));
  if (exclude) eligible.logical_and_(exclude->logical_not());
  at::Tensor counts = eligible.sum(1).cpu();
  const int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < scores.size(0); ++b)
    TORCH_CHECK_VALUE(c[b] >= k, "select_topk_tokens: row ", b, " has ", c[b],
                      " eligible tokens (valid and not excluded), fewer than k = ", k);
  at::Tensor idx = at::empty({scores.size(0), k}, scores.options().dtype(at::kLong));
  at::Tensor gathered = empty_gathered(scores, k, embeds);
  auto stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(scores.device());
  const int code = mmlatent_select_topk_cuda(
      scores.data_ptr(), score_dtype, valid ? reinterpret_cast<const uint8_t*>(valid->data_ptr<bool>()) : nullptr,
      exclude ? reinterpret_cast<uint8_t*>(exclude->data_ptr<bool>()) : nullptr,
      embeds ? embeds->data_ptr() : nullptr, scores.size(0), scores.size(1), k, embeds ? embeds->size(2) : 0,
      embeds ? embeds->element_size() : 0, order_by_score, idx.data_ptr<int64_t>(),
      embeds ? gathered.data_ptr() : nullptr, reinterpret_cast<int64_t>(stream.native_handle()));
  TORCH_CHECK(code == 0, "select_topk_tokens CUDA kernel failed: ", mmlatent_cuda_error_string(code));
  return {idx, gathered};
}
#endif

std::string cuda_archs() {
#ifdef MMLATENT_WITH_CUDA
  return MMLATENT_CUDA_ARCHS;
#else
  return "";
#endif
}

}  // namespace

TORCH_LIBRARY(mmlatent, m) {
  m.def(
      "select_topk_tokens_native(Tensor scores, int k, Tensor(a!)? exclude, Tensor? valid, Tensor? embeds, "
      "bool order_by_score) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmlatent, CPU, m) { m.impl("select_topk_tokens_native", &mmlatent_select_topk_cpu); }

#ifdef MMLATENT_WITH_CUDA
TORCH_LIBRARY_IMPL(mmlatent, CUDA, m) { m.impl("select_topk_tokens_native", &select_topk_tokens_cuda); }
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmlatent native backend (C++ CPU ops; CUDA ops when built with nvcc)";
  m.def("cuda_archs", &cuda_archs, "GPU architectures the CUDA ops were compiled for ('' = built without CUDA)");
  m.def("select_topk_max_tokens", [] { return kMmlatentSelectMaxTokens; },
        "Largest Ni the CUDA select_topk_tokens kernel ranks (its rows live in one block's shared memory)");
  m.def("select_image_max_layers", [] { return kMmlatentSelectImageMaxLayers; },
        "Most layers one launch of the fused CUDA select_image_tokens takes (their pointers are kernel parameters)");
  m.def("row_mass_limits", [] { return std::make_pair(kMmlatentRowMassMaxGroup, kMmlatentRowMassMaxHeadDim); },
        "(most query heads per KV head, widest head dim) of the CUDA row_attention_mass kernels");
}
