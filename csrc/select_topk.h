// The CPU selection of the native select_topk_tokens, shared with the fused select_image_tokens.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>

// The checks of select_topk_tokens' arguments on either device (shapes, dtypes, devices, 1 <= k <= Ni).
void mmlatent_check_select_args(const at::Tensor& scores, int64_t k, const std::optional<at::Tensor>& exclude,
                                const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& embeds);

// (idx [B, k] int64, gathered [B, k, Dm]) of the k best eligible tokens per row of scores [B, Ni]: higher score
// first, NaN below every number, ties to the lower index; exclude updated in place. Every row is checked before
// anything is modified (a row with fewer than k eligible tokens is a ValueError naming it).
std::tuple<at::Tensor, at::Tensor> mmlatent_select_topk_cpu(const at::Tensor& scores, int64_t k,
                                                            const std::optional<at::Tensor>& exclude,
                                                            const std::optional<at::Tensor>& valid,
                                                            const std::optional<at::Tensor>& embeds,
                                                            bool order_by_score);
