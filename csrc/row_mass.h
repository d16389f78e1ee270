// The argument checks of the native row_attention_mass, shared by its CPU op and its CUDA op (and by the fused
// select_image_tokens, which calls the same mass per layer).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

// check_index_range: also the entries of image_index (one host sync); a caller checking several layers against
// the same image_index and cache length checks them once.
void mmlatent_check_row_mass_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& image_index,
                                  const at::Tensor& out, const std::optional<at::Tensor>& key_valid,
                                  bool check_index_range = true);

// out [B, Ni] float32 += sum over layers l (in order) of weights[l] * the image-token mass of q_layers[l]
// [B, Hq, D] against k_layers[l] [B, Hkv, N, D]: one row_attention_mass per layer, every layer's tasks in one
// parallel region. Arguments checked (mmlatent_check_row_mass_args per layer).
void mmlatent_add_row_masses_cpu(const std::vector<at::Tensor>& q_layers, const std::vector<at::Tensor>& k_layers,
                                 const at::Tensor& image_index, at::Tensor& out,
                                 const std::optional<at::Tensor>& key_valid, double scale,
                                 const std::vector<double>& weights);
