// row_attention_mass of the native backend as a C++ CPU op: per (batch item, KV head), in parallel, the G query
// heads that share the KV head stream the keys once in blocks of kKeyBlock (the dot products, then an online
// softmax: running max and sum per head), which gives each head's log-sum-exp; then only the image keys are read
// again, for their probabilities. The only buffers are one block of scores per task and [B, Hkv, Ni] partial
// masses, summed over the KV heads at the end (no [H, N] probabilities). Float32 arithmetic (float64 inputs:
// float64), like the torch backend.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "cuda_dtype.h"
#include "cpu_math.h"
#include "row_mass.h"
#include "row_mass_cuda.h"
#include "select_topk_cuda.h"  // mmlatent_cuda_error_string

namespace {

constexpr int64_t kKeyBlock = 64;

template <typename acc_t> acc_t exp_of(acc_t x) { return std::exp(x); }
template <> float exp_of<float>(float x) { return mmlatent_cpu::exp_approx(x); }

// sum_i exp(s[i] - shift), the exponentials written over s (a block of logits no longer needed).
template <typename acc_t> acc_t exp_sum_of(acc_t* s, acc_t shift, int64_t n) {
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (s[i] = std::exp(s[i] - shift));
  return sum;
}
template <> float exp_sum_of<float>(float* s, float shift, int64_t n) {
  return mmlatent_cpu::exp_shifted_(s, shift, n);
}

// scores[g * ld + j] = qg[g] . key(j) for the G heads and `count` keys: key(j) the cache row rows[j], or n0 + j
// without rows. Float caches go straight to the vectorised block kernel; other dtypes are converted row by row.
template <typename scalar_t, typename acc_t>
void logits(const acc_t* qg, int64_t G, int64_t D, const scalar_t* kb, int64_t ks2, const int64_t* rows,
            int64_t n0, int64_t count, acc_t* scores, int64_t ld, acc_t* row) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    mmlatent_cpu::block_scores(qg, G, D, kb + (rows != nullptr ? 0 : n0 * ks2), ks2, rows, count, scores, ld);
  } else {
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t* key = kb + (rows != nullptr ? rows[j] : n0 + j) * ks2;
      const acc_t* kr = row;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        kr = key;
      } else {
        for (int64_t i = 0; i < D; ++i) row[i] = static_cast<acc_t>(key[i]);
      }
      for (int64_t g = 0; g < G; ++g) scores[g * ld + j] = mmlatent_cpu::dot(qg + g * D, kr, D);
    }
  }
}

// Every layer's mass, before the sum over KV heads: partial[l, b, h, j] = sum over the G query heads of KV head h
// of p[b, head, image_index[b, j]] in layer l (0 at padding slots and padding keys). qs[l] [B, Hq, D] and
// ks[l] [B, Hkv, N, D] (rows of unit stride) of one dtype; tasks (layer, batch item, KV head) run in parallel.
template <typename scalar_t>
void layer_masses(const std::vector<at::Tensor>& q_layers, const std::vector<at::Tensor>& k_layers,
                  const at::Tensor& image_index, const std::optional<at::Tensor>& key_valid, double scale,
                  at::Tensor& partial) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t L = static_cast<int64_t>(q_layers.size());
  const at::Tensor& q0 = q_layers[0];
  const at::Tensor& k0 = k_layers[0];
  const int64_t B = q0.size(0), Hq = q0.size(1), D = q0.size(2), Hkv = k0.size(1), N = k0.size(2);
  const int64_t Ni = image_index.size(1), G = Hq / Hkv;
  const int64_t* idx = image_index.data_ptr<int64_t>();
  const bool* valid = key_valid ? key_valid->data_ptr<bool>() : nullptr;
  // q scaled once, in the math dtype: [L, B, Hq, D]
  std::vector<acc_t> qs(L * B * Hq * D);
  for (int64_t layer = 0; layer < L; ++layer) {
    const scalar_t* qd = q_layers[layer].data_ptr<scalar_t>();
    for (int64_t i = 0; i < B * Hq * D; ++i)
      qs[layer * B * Hq * D + i] = static_cast<acc_t>(qd[i]) * static_cast<acc_t>(scale);
  }
  acc_t* mass = partial.data_ptr<acc_t>();
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, L * B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores(G * kKeyBlock), row(D), m(G), l(G), lse(G);
    std::vector<int64_t> slots(kKeyBlock), positions(kKeyBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t layer = task / (B * Hkv), b = (task / Hkv) % B, h = task % Hkv;
      const at::Tensor& k = k_layers[layer];
      const int64_t ks2 = k.stride(2);
      const scalar_t* kb = k.data_ptr<scalar_t>() + b * k.stride(0) + h * k.stride(1);
      const acc_t* qg = qs.data() + ((layer * B + b) * Hq + h * G) * D;
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
        const int64_t width = std::min(kKeyBlock, N - n0);
        logits<scalar_t, acc_t>(qg, G, D, kb, ks2, nullptr, n0, width, scores.data(), kKeyBlock, row.data());
        if (valid != nullptr) {  // a padding key has no logit (whatever its K holds, NaN included)
          for (int64_t j = 0; j < width; ++j)
            if (!valid[b * N + n0 + j])
              for (int64_t g = 0; g < G; ++g) scores[g * kKeyBlock + j] = kNegInf;
        }
        for (int64_t g = 0; g < G; ++g) {
          acc_t* s = scores.data() + g * kKeyBlock;
          acc_t block_max = kNegInf;
          if constexpr (std::is_same_v<acc_t, float>) {
            block_max = mmlatent_cpu::max_of(s, width, kNegInf);
          } else {
            for (int64_t j = 0; j < width; ++j) block_max = std::max(block_max, s[j]);
          }
          if (block_max == kNegInf) continue;  // every key of the block is padding
          const acc_t next = std::max(m[g], block_max);
          l[g] = (m[g] == kNegInf ? acc_t(0) : l[g] * exp_of<acc_t>(m[g] - next)) +
                 exp_sum_of<acc_t>(s, next, width);
          m[g] = next;
        }
      }
      // A head whose sum is not positive (no valid key, or a NaN logit among the valid ones) puts no mass
      // anywhere: the torch and Triton backends' rule.
      for (int64_t g = 0; g < G; ++g) lse[g] = l[g] > 0 ? m[g] + std::log(l[g]) : kNegInf;
      // The image keys again, a block of slots at a time: padding slots and padding keys keep 0.
      acc_t* slot_mass = mass + task * Ni;
      for (int64_t j0 = 0; j0 < Ni; j0 += kKeyBlock) {
        int64_t count = 0;
        for (int64_t j = j0; j < std::min(Ni, j0 + kKeyBlock); ++j) {
          const int64_t n = idx[b * Ni + j];
          slot_mass[j] = 0;
          if (n < 0 || (valid != nullptr && !valid[b * N + n])) continue;
          slots[count] = j;
          positions[count++] = n;
        }
        if (count == 0) continue;
        logits<scalar_t, acc_t>(qg, G, D, kb, ks2, positions.data(), 0, count, scores.data(), kKeyBlock,
                                row.data());
        for (int64_t g = 0; g < G; ++g) {
          if (lse[g] == kNegInf) continue;  // a head with no valid key puts no mass anywhere
          for (int64_t c = 0; c < count; ++c)
            slot_mass[slots[c]] += exp_of<acc_t>(scores[g * kKeyBlock + c] - lse[g]);
        }
      }
    }
  });
}

// out[b, j] += weight[l] * sum_h partial[l, b, h, j] for each layer in order, in float32: what one
// row_attention_mass call per layer adds, in the same order of operations.
template <typename acc_t>
void add_layer_masses(const at::Tensor& partial, const at::Tensor& image_index, const std::vector<double>& weights,
                      at::Tensor& out) {
  const int64_t L = partial.size(0), B = partial.size(1), Hkv = partial.size(2), Ni = partial.size(3);
  const acc_t* mass = partial.data_ptr<acc_t>();
  const int64_t* idx = image_index.data_ptr<int64_t>();
  auto out_a = out.accessor<float, 2>();
  for (int64_t layer = 0; layer < L; ++layer) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < Ni; ++j) {
        if (idx[b * Ni + j] < 0) continue;
        acc_t total = 0;
        for (int64_t h = 0; h < Hkv; ++h) total += mass[((layer * B + b) * Hkv + h) * Ni + j];
        out_a[b][j] = out_a[b][j] + static_cast<float>(weights[layer]) * static_cast<float>(total);
      }
    }
  }
}

}  // namespace

void mmlatent_add_row_masses_cpu(const std::vector<at::Tensor>& q_layers, const std::vector<at::Tensor>& k_layers,
                                 const at::Tensor& image_index_in, at::Tensor& out,
                                 const std::optional<at::Tensor>& key_valid_in, double scale,
                                 const std::vector<double>& weights) {
  const at::Tensor& q0 = q_layers[0];
  const at::Tensor& k0 = k_layers[0];
  if (q0.size(0) == 0 || q0.size(1) == 0 || image_index_in.size(1) == 0) return;
  std::vector<at::Tensor> qs, ks;
  for (const auto& q : q_layers) qs.push_back(q.contiguous());
  // Any layout of the cache along B, H and N; each key row must be contiguous for the dot products.
  for (const auto& k : k_layers) ks.push_back(k.size(3) <= 1 || k.stride(3) == 1 ? k : k.contiguous());
  const at::Tensor image_index = image_index_in.contiguous();
  std::optional<at::Tensor> key_valid;
  if (key_valid_in) key_valid = key_valid_in->contiguous();
  const auto acc = q0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({static_cast<int64_t>(qs.size()), q0.size(0), k0.size(1), image_index.size(1)},
                                 q0.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q0.scalar_type(), "row_attention_mass_cpu", [&] {
    layer_masses<scalar_t>(qs, ks, image_index, key_valid, scale, partial);
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    add_layer_masses<acc_t>(partial, image_index, weights, out);
  });
}

void mmlatent_check_row_mass_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& image_index,
                                  const at::Tensor& out, const std::optional<at::Tensor>& key_valid,
                                  bool check_index_range) {
  TORCH_CHECK_VALUE(q.dim() == 3 && q.size(2) >= 1, "q: expected [B, Hq, D] with D >= 1, got ", q.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "q: expected a floating dtype, got ", q.scalar_type());
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == q.size(0) && k.size(3) == q.size(2), "k: expected [B, Hkv, N, D] "
                    "with B = ", q.size(0), ", D = ", q.size(2), ", got ", k.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k: expected the dtype of q ", q.scalar_type(), ", got ",
                   k.scalar_type());
  TORCH_CHECK_VALUE(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "k: its ", k.size(1),
                    " heads must divide the ", q.size(1), " query heads of q (GQA)");
  TORCH_CHECK_VALUE(image_index.dim() == 2 && image_index.size(0) == q.size(0) &&
                    image_index.scalar_type() == at::kLong, "image_index: expected [B, Ni] int64, got ",
                    image_index.scalar_type(), " of shape ", image_index.sizes());
  TORCH_CHECK_VALUE(out.sizes() == image_index.sizes() && out.scalar_type() == at::kFloat,
                    "out: expected [B, Ni] float32 like image_index, got ", out.scalar_type(), " of shape ",
                    out.sizes());
  if (key_valid) {
    TORCH_CHECK_VALUE(key_valid->dim() == 2 && key_valid->size(0) == q.size(0) && key_valid->size(1) == k.size(2) &&
                      key_valid->scalar_type() == at::kBool, "key_valid: expected [B, N] bool, got ",
                      key_valid->scalar_type(), " of shape ", key_valid->sizes());
  }
  for (const at::Tensor* t : {&k, &image_index, &out}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), "expected every tensor on ", q.device(), ", got ", t->device());
  }
  const int64_t N = k.size(2);
  if (check_index_range && image_index.numel()) {
    const auto [lo, hi] = at::aminmax(image_index);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < N, "image_index: entries must be -1 "
                      "(padding) or key positions in [0, ", N, "), found values in [", lo.item<int64_t>(), ", ",
                      hi.item<int64_t>(), "]");
  }
}

namespace {

void row_attention_mass_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& image_index,
                            at::Tensor& out, const std::optional<at::Tensor>& key_valid, double scale,
                            double weight) {
  mmlatent_check_row_mass_args(q, k, image_index, out, key_valid);
  mmlatent_add_row_masses_cpu({q}, {k}, image_index, out, key_valid, scale, {weight});
}

}  // namespace

#ifdef MMLATENT_WITH_CUDA
namespace {

void row_attention_mass_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& image_index_in,
                             at::Tensor& out, const std::optional<at::Tensor>& key_valid_in, double scale,
                             double weight) {
  mmlatent_check_row_mass_args(q_in, k_in, image_index_in, out, key_valid_in);
  const int dtype = mmlatent_cuda_dtype(q_in, "q");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2), Hkv = k_in.size(1), N = k_in.size(2);
  const int64_t Ni = image_index_in.size(1);
  TORCH_CHECK_VALUE(Hq / Hkv <= kMmlatentRowMassMaxGroup && D <= kMmlatentRowMassMaxHeadDim, "q: the CUDA row mass "
                    "takes at most ", kMmlatentRowMassMaxGroup, " query heads per KV head and head dim ",
                    kMmlatentRowMassMaxHeadDim, ", got ", Hq / Hkv, " and ", D);
  TORCH_CHECK_VALUE(out.size(1) <= 1 || out.stride(1) == 1, "out: expected unit stride along Ni (it is updated in "
                    "place)");
  if (B == 0 || Hq == 0 || Ni == 0) return;
  c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.size(3) <= 1 || k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor image_index = image_index_in.contiguous();
  std::optional<at::Tensor> key_valid;
  if (key_valid_in) key_valid = key_valid_in->contiguous();
  const int64_t splits = mmlatent_row_mass_splits(B, Hkv, N);
  at::Tensor scratch = at::empty({mmlatent_row_mass_scratch_floats(B, Hkv, Hq / Hkv, Ni, splits)},
                                 out.options());
  auto stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(q.device());
  const int code = mmlatent_row_mass_cuda(
      q.data_ptr(), k.data_ptr(), dtype, key_valid ? reinterpret_cast<const uint8_t*>(key_valid->data_ptr<bool>())
      : nullptr, image_index.data_ptr<int64_t>(), out.data_ptr<float>(), B, Hq, Hkv, N, D, Ni, k.stride(0),
      k.stride(1), k.stride(2), out.stride(0), static_cast<float>(scale), static_cast<float>(weight), splits,
      scratch.data_ptr<float>(), reinterpret_cast<int64_t>(stream.native_handle()));
  TORCH_CHECK(code == 0, "row_attention_mass CUDA kernel failed: ", mmlatent_cuda_error_string(code));
}

}  // namespace
#endif

TORCH_LIBRARY_FRAGMENT(mmlatent, m) {
  m.def(
      "row_attention_mass_native(Tensor q, Tensor k, Tensor image_index, Tensor(a!) out, Tensor? key_valid, "
      "float scale, float weight) -> ()");
}

TORCH_LIBRARY_IMPL(mmlatent, CPU, m) { m.impl("row_attention_mass_native", &row_attention_mass_cpu); }

#ifdef MMLATENT_WITH_CUDA
TORCH_LIBRARY_IMPL(mmlatent, CUDA, m) { m.impl("row_attention_mass_native", &row_attention_mass_cuda); }
#endif
