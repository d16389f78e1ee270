// The row kernel of the linear-softmax losses (linear_cross_entropy, linear_log_probs) as a C++ CPU op, for one
// chunk of logits [C, V] that the chunk's GEMM wrote: rows split over threads, each row in two passes over memory
// and one exponential per logit. Pass 1, per block of kBlock logits: the temperature, the block's maximum m_b, and
// e = exp(s - m_b) written over the block, with its sum; the row's log-sum-exp combines the blocks. Pass 2 turns
// e into the gradient, e * exp(m_b - lse) being the softmax share. The torch backend makes about nine passes and
// the same one exponential. Float32 arithmetic (float64 logits: float64), the torch backend's formulas; the
// logit softcap is left to the torch backend (its derivative needs the logits this kernel overwrites).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace {

constexpr int64_t kBlock = 2048;  // logits per block: its exponentials are summed while they are in L1

template <typename acc_t>
void loss_rows(acc_t* logits, int64_t rows, int64_t V, const int64_t* targets, bool log_probs, double smoothing,
               double temperature, const float* lse_in, const float* coef, int64_t coef_stride, float* values,
               float* lse_out) {
  const acc_t inv_temperature = acc_t(1) / acc_t(temperature);
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> block_max(blocks), block_sum(blocks);
    for (int64_t r = begin; r < end; ++r) {
      acc_t* s = logits + r * V;
      const int64_t y = targets[r];
      if (temperature != 1.0)
        for (int64_t j = 0; j < V; ++j) s[j] *= inv_temperature;
      const acc_t s_y = s[y];
      acc_t lse;
      if (lse_in == nullptr) {
        acc_t total = 0, row_max = kNegInf;
        for (int64_t b = 0; b < blocks; ++b) {
          acc_t* block = s + b * kBlock;
          const int64_t width = std::min(kBlock, V - b * kBlock);
          acc_t m = kNegInf, sum = 0;
          if constexpr (std::is_same_v<acc_t, float>) {
            m = mmlatent_cpu::max_of(block, width, kNegInf);
            if (smoothing > 0) total += mmlatent_cpu::sum_of(block, width);
            sum = m == kNegInf ? 0.0f : mmlatent_cpu::exp_shifted_(block, m, width);
          } else {
            for (int64_t j = 0; j < width; ++j) {
              m = std::max(m, block[j]);
              total += block[j];
            }
            for (int64_t j = 0; j < width; ++j) sum += (block[j] = std::exp(block[j] - m));
          }
          block_max[b] = m;
          block_sum[b] = sum;
          row_max = std::max(row_max, m);
        }
        acc_t l = 0;
        for (int64_t b = 0; b < blocks; ++b)
          if (block_max[b] != kNegInf) l += block_sum[b] * std::exp(block_max[b] - row_max);
        lse = row_max + std::log(l);
        acc_t value = log_probs ? s_y - lse : lse - acc_t(1.0 - smoothing) * s_y;
        if (!log_probs && smoothing > 0) value -= acc_t(smoothing) * (total / acc_t(V));
        values[r] = static_cast<float>(value);
        lse_out[r] = static_cast<float>(lse);
      } else {
        lse = static_cast<acc_t>(lse_in[r]);
        lse_out[r] = lse_in[r];
      }
      if (coef == nullptr) continue;
      // d(coef * value)/dz_j = coef / T * (ce: p_j - (1 - smoothing) [j = y] - smoothing / V; logp: [j = y] - p_j)
      const acc_t c = static_cast<acc_t>(coef[r * coef_stride]) * inv_temperature;
      const acc_t scale = log_probs ? -c : c;
      const acc_t uniform = log_probs ? acc_t(0) : acc_t(smoothing / static_cast<double>(V));
      for (int64_t b = 0; b < blocks; ++b) {
        acc_t* block = s + b * kBlock;
        const int64_t width = std::min(kBlock, V - b * kBlock);
        if (lse_in == nullptr) {  // block holds exp(s - m_b)
          const acc_t factor = block_max[b] == kNegInf ? acc_t(0) : std::exp(block_max[b] - lse);
          if constexpr (std::is_same_v<acc_t, float>) {
            mmlatent_cpu::scaled_shares_(block, factor, uniform, scale, width);
          } else {
            for (int64_t j = 0; j < width; ++j) block[j] = scale * (block[j] * factor - uniform);
          }
        } else {  // block holds s
          if constexpr (std::is_same_v<acc_t, float>) {
            mmlatent_cpu::exp_shifted_(block, lse, width);
            mmlatent_cpu::scaled_shares_(block, 1.0f, uniform, scale, width);
          } else {
            for (int64_t j = 0; j < width; ++j) block[j] = scale * (std::exp(block[j] - lse) - uniform);
          }
        }
      }
      s[y] += log_probs ? c : -acc_t(1.0 - smoothing) * c;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> softmax_loss_chunk_cpu(at::Tensor& logits, const at::Tensor& targets_in,
                                                          bool log_probs, double label_smoothing, double temperature,
                                                          const std::optional<at::Tensor>& lse_in,
                                                          const std::optional<at::Tensor>& coef_in) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) >= 1,
                    "logits: expected a contiguous [C, V] with V >= 1, got ", logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                   "logits: the native row kernel takes float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(temperature > 0, "temperature: expected a positive number, got ", temperature);
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(targets_in.dim() == 1 && targets_in.size(0) == rows && targets_in.scalar_type() == at::kLong,
                    "targets: expected [", rows, "] int64, got ", targets_in.scalar_type(), " of shape ",
                    targets_in.sizes());
  const at::Tensor targets = targets_in.contiguous();
  if (rows) {
    const auto [lo, hi] = at::aminmax(targets);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < V, "targets: entries must be in [0, ", V,
                      "), found values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
  std::optional<at::Tensor> lse, coef;
  if (lse_in) {
    TORCH_CHECK_VALUE(lse_in->numel() == rows && lse_in->scalar_type() == at::kFloat, "lse: expected [", rows,
                      "] float32, got ", lse_in->scalar_type(), " of shape ", lse_in->sizes());
    lse = lse_in->contiguous();
  }
  if (coef_in) {
    TORCH_CHECK_VALUE((coef_in->numel() == rows || coef_in->numel() == 1) && coef_in->scalar_type() == at::kFloat,
                      "coef: expected [", rows, "] or [1] float32, got ", coef_in->scalar_type(), " of shape ",
                      coef_in->sizes());
    coef = coef_in->contiguous();
  }
  at::Tensor values = at::empty({lse ? 0 : rows}, logits.options().dtype(at::kFloat));
  at::Tensor lse_out = at::empty({rows}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "softmax_loss_chunk_cpu", [&] {
    loss_rows<scalar_t>(logits.data_ptr<scalar_t>(), rows, V, targets.data_ptr<int64_t>(), log_probs,
                        label_smoothing, temperature, lse ? lse->data_ptr<float>() : nullptr,
                        coef ? coef->data_ptr<float>() : nullptr, coef && coef->numel() > 1 ? 1 : 0,
                        values.data_ptr<float>(), lse_out.data_ptr<float>());
  });
  return {values, lse_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmlatent, m) {
  m.def(
      "softmax_loss_chunk_native(Tensor(a!) logits, Tensor targets, bool log_probs, float label_smoothing, "
      "float temperature, Tensor? lse, Tensor? coef) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmlatent, CPU, m) { m.impl("softmax_loss_chunk_native", &softmax_loss_chunk_cpu); }
