// The argument checks of the native row_attention_mass, shared by its CPU op and its CUDA op (and by the fused
// select_image_tokens, which calls the same mass per layer).
#pragma once
#include <torch/extension.h>

#include <optional>

void mmlatent_check_row_mass_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& image_index,
                                  const at::Tensor& out, const std::optional<at::Tensor>& key_valid);
