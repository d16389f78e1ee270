// select_image_tokens of the native backend as one C++ call: the image-token mass of the last query row in every
// layer (row_mass.cpp's kernel, all layers' tasks in one parallel region), summed into [B, Ni] in layer order,
// then the top-k selection with the exclusion update and the gather (select_topk.cpp's). The same arithmetic as
// row_attention_mass per layer followed by select_topk_tokens, so the same tokens, ties and NaN included.
#include <torch/extension.h>

#include <vector>

#include "row_mass.h"
#include "select_topk.h"

namespace {

std::tuple<at::Tensor, at::Tensor> select_image_tokens_cpu(at::TensorList q, at::TensorList k,
                                                           const at::Tensor& image_index, int64_t k_select,
                                                           const std::optional<at::Tensor>& key_valid,
                                                           const std::optional<at::Tensor>& exclude,
                                                           const std::optional<at::Tensor>& valid,
                                                           const std::optional<at::Tensor>& embeds, double scale,
                                                           at::ArrayRef<double> layer_weights, bool order_by_score) {
  TORCH_CHECK_VALUE(!q.empty() && q.size() == k.size(), "q, k: expected one tensor per layer in each, got ",
                    q.size(), " and ", k.size());
  TORCH_CHECK_VALUE(layer_weights.size() == q.size(), "layer_weights: expected ", q.size(), " values, got ",
                    layer_weights.size());
  at::Tensor scores = at::zeros(image_index.sizes(), image_index.options().dtype(at::kFloat));
  for (size_t layer = 0; layer < q.size(); ++layer) {
    TORCH_CHECK_VALUE(q[layer].sizes() == q[0].sizes() && k[layer].sizes() == k[0].sizes(), "q, k: every layer "
                      "must have the shapes of layer 0, layer ", layer, " has ", q[layer].sizes(), " and ",
                      k[layer].sizes());
    // every layer has layer 0's cache length: its index range is checked once, not once per layer
    mmlatent_check_row_mass_args(q[layer], k[layer], image_index, scores, key_valid, layer == 0);
  }
  mmlatent_add_row_masses_cpu(q.vec(), k.vec(), image_index, scores, key_valid, scale, layer_weights.vec());
  return mmlatent_select_topk_cpu(scores, k_select, exclude, valid, embeds, order_by_score);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmlatent, m) {
  m.def(
      "select_image_tokens_native(Tensor[] q, Tensor[] k, Tensor image_index, int k_select, Tensor? key_valid, "
      "Tensor(a!)? exclude, Tensor? valid, Tensor? embeds, float scale, float[] layer_weights, bool order_by_score)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmlatent, CPU, m) { m.impl("select_image_tokens_native", &select_image_tokens_cpu); }
