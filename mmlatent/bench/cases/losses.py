"""Losses family: linear_cross_entropy and linear_log_probs, forward + backward, the gradients returned
(torch.autograd.grad), so peak memory includes the gradients themselves; "frozen head" rows are the LoRA case
(no weight gradient).

Baselines:

- ``logits+F.cross_entropy``: the naive loss as transformers computes it: full logits, upcast to float32, then
  F.cross_entropy; ``logits+log_softmax``: the same with log_softmax + gather for per-token log-probs;
- ``liger``: Liger-Kernel's fused linear cross-entropy, when liger-kernel is installed (it needs CUDA);
- ``cut-cross-entropy (torch_compile)``: Apple's cut-cross-entropy, when installed (``pip install
  'mmlatent[bench]'``), its ``torch_compile`` implementation: the fastest CPU peer (its Triton one needs CUDA),
  compiled once in the warm-up;
- ``torch backend``: the op itself with ``MMLATENT_BACKEND=torch``, against which the native row kernel is measured.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from mmlatent.kernels import linear_cross_entropy, linear_log_probs

from ..case import Case, Inputs, Make
from ..ceilings import linear_head_flops
from .inputs import cpu_generator, pinned_backend

# Qwen2-7B's language-model head.
QWEN2_7B_HIDDEN, QWEN2_7B_VOCAB = 3584, 152064


def _loss_inputs(T: int, H: int, V: int, trainable_head: bool) -> Make:
    """hidden [T, H] (requires grad) and weight [V, H] (requires grad if ``trainable_head``) in the run's dtype;
    labels [T] int64; upstream [T] float32, the gradient the log-probs rows are weighted by."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = cpu_generator()
        hidden = torch.randn(T, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
        weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device=device, dtype=dtype)
        labels = torch.randint(0, V, (T,), generator=g).to(device)
        return dict(hidden=hidden, weight=weight.requires_grad_(trainable_head), labels=labels,
                    upstream=torch.randn(T, generator=g).to(device))
    return make


def _grads(a, loss):
    params = [a["hidden"]] + ([a["weight"]] if a["weight"].requires_grad else [])
    return torch.autograd.grad(loss, params)


def _head_label(T: int, H: int, V: int, trainable_head: bool) -> str:
    return f"T{T} H{H} V{V} {'trainable head' if trainable_head else 'frozen head'}"


def _naive_cross_entropy(a):
    logits = (a["hidden"] @ a["weight"].T).float()  # transformers' ForCausalLMLoss upcasts the logits
    return _grads(a, F.cross_entropy(logits, a["labels"]))


def _liger_cross_entropy(a):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return _grads(a, liger_fused_linear_cross_entropy(a["hidden"], a["weight"], a["labels"]))


def _liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # not installed (it needs a CUDA torch), or broken
        return False
    return torch.cuda.is_available()


def _cce_cross_entropy(a):
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
    return _grads(a, cce_linear_cross_entropy(a["hidden"], a["weight"], a["labels"], impl="torch_compile"))


def _cce_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("cut_cross_entropy") is not None


def _ours_cross_entropy(a):
    return _grads(a, linear_cross_entropy(a["hidden"], a["weight"], a["labels"]))


def cross_entropy_case(T: int, H: int, V: int, trainable_head: bool = True) -> Case:
    """Mean cross-entropy of T tokens through an [V, H] head, forward + backward."""
    baselines = {"logits+F.cross_entropy": _naive_cross_entropy}
    if _liger_available():
        baselines["liger"] = _liger_cross_entropy
    if _cce_available():
        baselines["cut-cross-entropy (torch_compile)"] = _cce_cross_entropy
    baselines["torch backend"] = pinned_backend("torch", _ours_cross_entropy)
    return Case("linear_cross_entropy", _head_label(T, H, V, trainable_head), _loss_inputs(T, H, V, trainable_head),
                _ours_cross_entropy, baselines, flops=linear_head_flops(T, H, V, trainable_head))


def _naive_log_probs(a):
    logp = torch.log_softmax((a["hidden"] @ a["weight"].T).float(), -1).gather(1, a["labels"][:, None]).squeeze(1)
    return _grads(a, (logp * a["upstream"]).sum())


def _ours_log_probs(a):
    return _grads(a, (linear_log_probs(a["hidden"], a["weight"], a["labels"]) * a["upstream"]).sum())


def log_probs_case(T: int, H: int, V: int, trainable_head: bool = False) -> Case:
    """Per-token log-probs of the labels (as RL losses use them), weighted by an upstream gradient, forward +
    backward."""
    return Case("linear_log_probs", _head_label(T, H, V, trainable_head), _loss_inputs(T, H, V, trainable_head),
                _ours_log_probs, {"logits+log_softmax": _naive_log_probs,
                                  "torch backend": pinned_backend("torch", _ours_log_probs)},
                flops=linear_head_flops(T, H, V, trainable_head))


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":
        return [cross_entropy_case(64, 32, 500), log_probs_case(64, 32, 500), log_probs_case(64, 32, 500, True)]
    if sizes == "gpu":
        H, V = QWEN2_7B_HIDDEN, QWEN2_7B_VOCAB
        out = [cross_entropy_case(T, H, V, trainable) for T in (1024, 8192, 32768) for trainable in (True, False)]
        return out + [log_probs_case(T, H, V, trainable) for T in (1024, 8192) for trainable in (False, True)]
    return [cross_entropy_case(2048, 256, 32000, True), cross_entropy_case(2048, 256, 32000, False),
            log_probs_case(2048, 256, 32000), log_probs_case(2048, 256, 32000, trainable_head=True)]
