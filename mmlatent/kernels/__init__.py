"""Fused operators of mmlatent, grouped by family (``attention/``, ``selection/``, ``losses/``, ``diffusion/``,
``fusion/``, ``activations/``, ``norms/``); each family holds its public ops (op.py), its torch backend
(torch_impl.py) and its Triton kernels (triton_kernels.py); dispatch.py chooses a backend once per call
(docs/design.md, "Operators: backends and dispatch").

    row_attention_mass      image-token attention mass of one query row, accumulated in place
    attention_with_scores   forward-only attention that accumulates the same mass in the same pass
    select_topk_tokens      fused eligibility mask + deterministic top-k + gather + exclusion update
    select_image_tokens     every layer's image-token mass of the last query row, then that selection, one call
    linear_cross_entropy    cross-entropy of hidden @ weight.T + bias in row chunks, never building [T, V] logits
    linear_log_probs        log-softmax of the same logits at given tokens (policy gradients), same memory bound
    denoise_step_           one DDPM / DDIM / flow-Euler step for every row (ragged steps, CFG), in place
    layer_norm_modulate     adaLN: LayerNorm (no affine) * (1 + scale) + shift, one pass forward and backward
    diffusion_mse           the denoiser's training MSE, target formed on the fly, gradient in the same pass
    gated_mix               MM-CoT's fusion gate: two summed GEMMs, sigmoid and mix in one pass, forward and backward
    geglu                   gelu(gate) * up of a gated feed-forward layer, only its two inputs kept for the backward
    rms_norm                T5's RMS layer norm, only its input and one statistic per row kept for the backward
"""
from . import checks  # noqa: F401
from .dispatch import BACKENDS, BackendUnavailableError, native_module, requested_backend  # noqa: F401

# The C++ extension registers the mmlatent::*_native ops; load it before the Python ops add to the namespace.
native_module()

from .attention import (ATTENTION_WITH_SCORES, ROW_ATTENTION_MASS, attention_with_scores,  # noqa: E402
                        row_attention_mass)
from .selection import (SELECT_IMAGE_TOKENS, SELECT_TOPK_TOKENS, select_image_tokens,  # noqa: E402
                        select_topk_tokens)
from .losses import LINEAR_CROSS_ENTROPY, LINEAR_LOG_PROBS, linear_cross_entropy, linear_log_probs  # noqa: E402
from .diffusion import (DENOISE_STEP, DIFFUSION_MSE, LAYER_NORM_MODULATE, PhiloxNoise,  # noqa: E402
                        SamplerSchedule, denoise_step_, diffusion_mse, layer_norm_modulate)
from .fusion import GATED_MIX, gated_mix  # noqa: E402
from .activations import GEGLU, geglu  # noqa: E402
from .norms import RMS_NORM, rms_norm  # noqa: E402

from .selection.op import register_native_fake as _register_selection_fake  # noqa: E402
from .diffusion.op import register_native_fake as _register_denoise_fake  # noqa: E402
from .attention.op import register_native_fake as _register_row_mass_fake  # noqa: E402
from .selection.op import register_image_tokens_native_fake as _register_image_tokens_fake  # noqa: E402
from .losses.op import register_native_fake as _register_loss_rows_fake  # noqa: E402

for _register_fake in (_register_selection_fake, _register_denoise_fake, _register_row_mass_fake,
                       _register_image_tokens_fake, _register_loss_rows_fake):  # shapes of the C++ ops, for compile
    _register_fake()

OPS = {op.name: op for op in (ROW_ATTENTION_MASS, ATTENTION_WITH_SCORES, SELECT_TOPK_TOKENS, SELECT_IMAGE_TOKENS,
                              LINEAR_CROSS_ENTROPY, LINEAR_LOG_PROBS, DENOISE_STEP, LAYER_NORM_MODULATE,
                              DIFFUSION_MSE, GATED_MIX, GEGLU, RMS_NORM)}


def backend_report(op: str, **inputs) -> dict:
    """Every backend of ``op`` with "ok" or all the reasons it cannot run inputs described by ``inputs``."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
    return OPS[op].report(**inputs)


__all__ = ["row_attention_mass", "attention_with_scores", "select_topk_tokens", "select_image_tokens",
           "linear_cross_entropy",
           "linear_log_probs", "denoise_step_", "layer_norm_modulate", "diffusion_mse", "gated_mix",
           "geglu", "rms_norm",
           "SamplerSchedule", "PhiloxNoise", "BACKENDS",
           "BackendUnavailableError", "requested_backend", "backend_report", "OPS"]
