// select_image_tokens of the native backend as one C++ call: the image-token mass of the last query row in every
// layer, summed into [B, Ni] in layer order, then the top-k selection with the exclusion update and the gather.
// CPU: row_mass.cpp's kernel (all layers' tasks in one parallel region), then select_topk.cpp's selection. CUDA:
// one launch of select_image_cuda.cu's kernel. Either way the same arithmetic as row_attention_mass per layer
// followed by select_topk_tokens on that device, so the same tokens, ties and NaN included.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <vector>

#include "cuda_dtype.h"
#include "row_mass.h"
#include "select_image_cuda.h"
#include "select_topk.h"

namespace {

// The checks of both devices; `scores` is the [B, Ni] float32 buffer the row-mass checks compare against.
void check_layers(at::TensorList q, at::TensorList k, const at::Tensor& image_index, const at::Tensor& scores,
                  const std::optional<at::Tensor>& key_valid, at::ArrayRef<double> layer_weights,
                  bool check_index_range) {
  TORCH_CHECK_VALUE(!q.empty() && q.size() == k.size(), "q, k: expected one tensor per layer in each, got ",
                    q.size(), " and ", k.size());
  TORCH_CHECK_VALUE(layer_weights.size() == q.size(), "layer_weights: expected ", q.size(), " values, got ",
                    layer_weights.size());
  for (size_t layer = 0; layer < q.size(); ++layer) {
    TORCH_CHECK_VALUE(q[layer].sizes() == q[0].sizes() && k[layer].sizes() == k[0].sizes(), "q, k: every layer "
                      "must have the shapes of layer 0, layer ", layer, " has ", q[layer].sizes(), " and ",
                      k[layer].sizes());
    // every layer has layer 0's cache length: its index range is checked once, not once per layer
    mmlatent_check_row_mass_args(q[layer], k[layer], image_index, scores, key_valid,
                                 check_index_range && layer == 0);
  }
}

std::tuple<at::Tensor, at::Tensor> select_image_tokens_cpu(at::TensorList q, at::TensorList k,
                                                           const at::Tensor& image_index, int64_t k_select,
                                                           const std::optional<at::Tensor>& key_valid,
                                                           const std::optional<at::Tensor>& exclude,
                                                           const std::optional<at::Tensor>& valid,
                                                           const std::optional<at::Tensor>& embeds, double scale,
                                                           at::ArrayRef<double> layer_weights, bool order_by_score) {
  at::Tensor scores = at::zeros(image_index.sizes(), image_index.options().dtype(at::kFloat));
  check_layers(q, k, image_index, scores, key_valid, layer_weights, /*check_index_range=*/true);
  mmlatent_add_row_masses_cpu(q.vec(), k.vec(), image_index, scores, key_valid, scale, layer_weights.vec());
  return mmlatent_select_topk_cpu(scores, k_select, exclude, valid, embeds, order_by_score);
}

#ifdef MMLATENT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> select_image_tokens_cuda(at::TensorList q, at::TensorList k,
                                                            const at::Tensor& image_index_in, int64_t k_select,
                                                            const std::optional<at::Tensor>& key_valid_in,
                                                            const std::optional<at::Tensor>& exclude,
                                                            const std::optional<at::Tensor>& valid_in,
                                                            const std::optional<at::Tensor>& embeds_in, double scale,
                                                            at::ArrayRef<double> layer_weights, bool order_by_score) {
  const at::Tensor scores_like = at::empty(image_index_in.sizes(), image_index_in.options().dtype(at::kFloat));
  check_layers(q, k, image_index_in, scores_like, key_valid_in, layer_weights, /*check_index_range=*/false);
  mmlatent_check_select_args(scores_like, k_select, exclude, valid_in, embeds_in);
  const int dtype = mmlatent_cuda_dtype(q[0], "q");
  const int64_t L = static_cast<int64_t>(q.size());
  const int64_t B = q[0].size(0), Hq = q[0].size(1), D = q[0].size(2), Hkv = k[0].size(1), N = k[0].size(2);
  const int64_t Ni = image_index_in.size(1);
  TORCH_CHECK_VALUE(L <= kMmlatentSelectImageMaxLayers, "q: the CUDA select_image_tokens takes at most ",
                    kMmlatentSelectImageMaxLayers, " layers, got ", L);
  TORCH_CHECK_VALUE(Hq / Hkv <= kMmlatentRowMassMaxGroup && D <= kMmlatentRowMassMaxHeadDim, "q: the CUDA "
                    "select_image_tokens takes at most ", kMmlatentRowMassMaxGroup, " query heads per KV head and "
                    "head dim ", kMmlatentRowMassMaxHeadDim, ", got ", Hq / Hkv, " and ", D);
  TORCH_CHECK_VALUE(Ni <= kMmlatentSelectMaxTokens, "image_index: the CUDA select_image_tokens ranks at most ",
                    kMmlatentSelectMaxTokens, " tokens per row, got Ni = ", Ni);
  TORCH_CHECK_VALUE(!embeds_in || (embeds_in->size(2) * embeds_in->element_size()) % 2 == 0, "embeds: the CUDA "
                    "op gathers rows of an even number of bytes");
  if (B == 0) return {at::empty({0, k_select}, image_index_in.options()),
                      embeds_in ? at::empty({0, k_select, embeds_in->size(2)}, embeds_in->options())
                                : at::empty({0, k_select, 0}, q[0].options())};
  c10::DeviceGuard guard(q[0].device());
  const at::Tensor image_index = image_index_in.contiguous();
  std::optional<at::Tensor> key_valid, valid, embeds;
  if (key_valid_in) key_valid = key_valid_in->contiguous();
  if (valid_in) valid = valid_in->contiguous();
  if (embeds_in) embeds = embeds_in->contiguous();
  // The index range and every row's eligible count in one host sync, before anything is written.
  at::Tensor eligible = valid ? valid->clone() : at::ones(image_index.sizes(), image_index.options().dtype(at::kBool));
  if (exclude) eligible.logical_and_(exclude->logical_not());
  const auto [lo, hi] = at::aminmax(image_index);
  const at::Tensor facts = at::cat({lo.reshape({1}), hi.reshape({1}), eligible.sum(1)}).cpu();
  const int64_t* f = facts.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(Ni == 0 || (f[0] >= -1 && f[1] < N), "image_index: entries must be -1 (padding) or key "
                    "positions in [0, ", N, "), found values in [", f[0], ", ", f[1], "]");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(f[2 + b] >= k_select, "select_topk_tokens: row ", b, " has ", f[2 + b],
                      " eligible tokens (valid and not excluded), fewer than k = ", k_select);
  // one set of k strides for every layer (unit stride along D): a layer laid out otherwise is copied
  std::vector<at::Tensor> q_layers, k_layers;
  for (int64_t l = 0; l < L; ++l) {
    q_layers.push_back(q[l].contiguous());
    k_layers.push_back(k[l].size(3) <= 1 || k[l].stride(3) == 1 ? k[l] : k[l].contiguous());
  }
  for (int64_t l = 1; l < L; ++l) {
    if (k_layers[l].strides() != k_layers[0].strides()) {
      for (auto& layer : k_layers) layer = layer.contiguous();
      break;
    }
  }
  std::vector<const void*> q_ptrs, k_ptrs;
  std::vector<float> weights;
  for (int64_t l = 0; l < L; ++l) {
    q_ptrs.push_back(q_layers[l].data_ptr());
    k_ptrs.push_back(k_layers[l].data_ptr());
    weights.push_back(static_cast<float>(layer_weights[l]));
  }
  at::Tensor idx = at::empty({B, k_select}, image_index.options());
  at::Tensor gathered = embeds ? at::empty({B, k_select, embeds->size(2)}, embeds->options())
                               : at::empty({B, k_select, 0}, q[0].options());
  at::Tensor scratch = at::empty({mmlatent_select_image_scratch_bytes(L, B, Hkv, Hq / Hkv, N, Ni)},
                                 image_index.options().dtype(at::kByte));
  auto stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(q[0].device());
  const at::Tensor& k0 = k_layers[0];
  const int code = mmlatent_select_image_cuda(
      q_ptrs.data(), k_ptrs.data(), weights.data(), L, dtype,
      key_valid ? reinterpret_cast<const uint8_t*>(key_valid->data_ptr<bool>()) : nullptr,
      image_index.data_ptr<int64_t>(), valid ? reinterpret_cast<const uint8_t*>(valid->data_ptr<bool>()) : nullptr,
      exclude ? reinterpret_cast<uint8_t*>(exclude->data_ptr<bool>()) : nullptr,
      embeds ? embeds->data_ptr() : nullptr, B, Hq, Hkv, N, D, Ni, k0.stride(0), k0.stride(1), k0.stride(2),
      static_cast<float>(scale), k_select, embeds ? embeds->size(2) * embeds->element_size() : 0, order_by_score,
      idx.data_ptr<int64_t>(), embeds ? gathered.data_ptr() : nullptr, scratch.data_ptr(),
      reinterpret_cast<int64_t>(stream.native_handle()));
  TORCH_CHECK(code == 0, "select_image_tokens CUDA kernel failed: ", mmlatent_cuda_error_string(code));
  return {idx, gathered};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmlatent, m) {
  m.def(
      "select_image_tokens_native(Tensor[] q, Tensor[] k, Tensor image_index, int k_select, Tensor? key_valid, "
      "Tensor(a!)? exclude, Tensor? valid, Tensor? embeds, float scale, float[] layer_weights, bool order_by_score)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmlatent, CPU, m) { m.impl("select_image_tokens_native", &select_image_tokens_cpu); }

#ifdef MMLATENT_WITH_CUDA
TORCH_LIBRARY_IMPL(mmlatent, CUDA, m) { m.impl("select_image_tokens_native", &select_image_tokens_cuda); }
#endif
