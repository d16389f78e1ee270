"""Hugging Face vision-language models as IVT-LR backbones, and the attention function of the latent rollout.

:class:`VLMBackbone` gives one interface over the supported families (Qwen2-VL, Qwen2.5-VL, Chameleon): their
language model, their image embeddings (vision-merger outputs, or Chameleon's embedded VQ tokens), their
positions and their output head. Nothing in transformers is patched: :func:`mmlatent_attention` is registered
with ``AttentionInterface`` (with the previous implementation's mask function in ``AttentionMaskInterface``) and
set as the language model's implementation; keyword arguments of each call select the rollout kernels or eager
probabilities, and every other call runs the previous implementation.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mmlatent.kernels import ATTENTION_WITH_SCORES, attention_with_scores, row_attention_mass

ATTENTION_PREFIX = "mmlatent_"


@dataclass
class RolloutScores:
    """What the rollout attention needs besides q, k, v; passed to the model's forward as ``mmlatent_rollout``.

    key_valid: [B, N] bool over every key column (cache + this call), False at padding.
    image_index: [B, Ni] int64 key columns of each sample's image tokens, -1 = padding.
    scores: [B, Ni] float32, receives ``weight`` x the last query row's attention mass on each image token, per layer
        and head (weight = 1 / (layers x heads): the mean IVT-LR ranks by).
    """

    key_valid: torch.Tensor
    image_index: torch.Tensor
    scores: torch.Tensor
    weight: float


@dataclass
class EagerProbabilities:
    """Passed as ``mmlatent_eager``: this call's attention is eager and returns its probabilities [B, H, M, N]
    (what ``output_attentions`` collects), as IVT-LR's public code computes them. key_valid [B, N] bool; causal,
    bottom-right aligned."""

    key_valid: torch.Tensor


def eager_attention(module: nn.Module, query, key, value, additive_mask, scaling, dropout):
    """Plain attention, as transformers' eager path computes it: ([B, M, Hq, D], probabilities [B, Hq, M, N])."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if additive_mask is not None:
        weights = weights + additive_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _additive_mask(key_valid: torch.Tensor, rows: int, dtype) -> torch.Tensor:
    N = key_valid.shape[1]
    causal = torch.ones(rows, N, dtype=torch.bool, device=key_valid.device).tril(N - rows)
    allowed = causal[None, None] & key_valid[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device).masked_fill(~allowed,
                                                                                        torch.finfo(dtype).min)


def _fallback_attention(fallback: str, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """The implementation the model had before IVT-LR wrapped it, with the mask its own mask function built."""
    if fallback == "eager":
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[fallback](module, query, key, value, attention_mask, scaling=scaling,
                                             dropout=dropout, **kwargs)


def mmlatent_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                       *, fallback: str = "sdpa", mmlatent_rollout: Optional[RolloutScores] = None,
                       mmlatent_eager: Optional[EagerProbabilities] = None, **kwargs):
    """The language model's attention function once wrapped: query [B, Hq, M, D], key/value [B, Hkv, N, D] (the
    whole cache) -> ([B, M, Hq, D], probabilities or None). What it does is chosen by the call's keyword arguments,
    so a checkpointed layer replays the same choice in its backward:

    - ``mmlatent_rollout``: adds the last query row's image-token mass into the rollout's score buffer. Under
      no_grad on a GPU by :func:`mmlatent.kernels.attention_with_scores`, in the same pass as the attention (no
      attention matrix); when differentiable (the training prefill), or where that op would run its reference
      backend (CPU), the output comes from ``fallback`` and the mass from
      :func:`mmlatent.kernels.row_attention_mass` (one more read of K, for one row).
    - ``mmlatent_eager``: eager attention returning its probabilities (the reference's latent passes).
    - neither (the loss pass, decoding, the vision tower): ``fallback``, the model's previous implementation.
    """
    causal = getattr(module, "is_causal", True)
    if mmlatent_eager is not None and causal:
        mask = _additive_mask(mmlatent_eager.key_valid, query.shape[2], query.dtype)
        return eager_attention(module, query, key, value, mask, scaling, dropout)
    ctx = mmlatent_rollout
    if ctx is None or not causal:
        return _fallback_attention(fallback, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    # The fused op's reference backend is an oracle, not a fast CPU attention: torch's SDPA plus the one score
    # row measured 2.5x faster than it at M = N = 1050 on 2 cores (and it is forward-only, so a differentiable
    # call never asks for it).
    if differentiable or ATTENTION_WITH_SCORES.choose(device=query.device, dtype=query.dtype,
                                                      head_dim=query.shape[-1], out=ctx.scores) == "reference":
        out = _fallback_attention(fallback, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        with torch.no_grad():
            row_attention_mass(query[:, :, -1].detach(), key.detach(), ctx.image_index, ctx.scores,
                               key_valid=ctx.key_valid, scale=scaling, weight=ctx.weight)
        return out
    o, _ = attention_with_scores(query, key, value, causal=True, key_valid=ctx.key_valid,
                                 image_index=ctx.image_index, scores_out=ctx.scores, score_row=-1, scale=scaling,
                                 weight=ctx.weight)
    return o.transpose(1, 2), None


def attention_name(fallback: str) -> str:
    """Registers (once) mmlatent's attention function over ``fallback`` with ``fallback``'s mask function, and
    returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    name = ATTENTION_PREFIX + re.sub(r"\W", "_", fallback)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, functools.partial(mmlatent_attention, fallback=fallback))
        # the mask the fallback expects (without a registered mask function the masks would silently vanish)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[fallback])
    return name


_FAMILIES = {
    "Qwen2VLForConditionalGeneration": ("qwen", 32),
    "Qwen2_5_VLForConditionalGeneration": ("qwen", 32),
    "ChameleonForConditionalGeneration": ("chameleon", 64),
}


class VLMBackbone:
    """One interface over the supported vision-language models (a PEFT-wrapped model is unwrapped to its base,
    whose modules carry the adapters)."""

    def __init__(self, vlm: nn.Module):
        base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
        name = type(base).__name__
        if name not in _FAMILIES:
            raise TypeError(f"vlm: unsupported model class {name}; IVT-LR supports "
                            f"{', '.join(sorted(_FAMILIES))}")
        self.model = base
        self.family, self.default_k = _FAMILIES[name]
        self.config = base.config
        self.text_config = base.config.get_text_config()
        self.image_token_id = int(base.config.image_token_id)

    # ---------------------------------------------------------------------------------------------- modules
    @property
    def language_model(self) -> nn.Module:
        """Decoder taking inputs_embeds, attention_mask, position_ids, past_key_values -> last_hidden_state."""
        return self.model.model.language_model if self.family == "qwen" else self.model.model

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    # ----------------------------------------------------------------------------------------------- inputs
    def check_images(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                     image_grid_thw: Optional[torch.Tensor]) -> None:
        """Clear errors for image inputs that do not fit the placeholders of ``input_ids``."""
        n_tokens = int((input_ids == self.image_token_id).sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"pixel_values: required, input_ids hold {n_tokens} image tokens")
            return
        if self.family == "chameleon":
            per_image = self.tokens_per_chameleon_image()
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values: expected [images, 3, H, W], got {tuple(pixel_values.shape)}")
            if pixel_values.shape[0] * per_image != n_tokens:
                images = pixel_values.shape[0]
                raise ValueError(f"pixel_values: {images} images make {images * per_image} image tokens, but "
                                 f"input_ids hold {n_tokens}")
            return
        if image_grid_thw is None:
            raise ValueError("image_grid_thw: required with pixel_values for Qwen2-VL / Qwen2.5-VL")
        if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw: expected [images, 3] (t, h, w), got {tuple(image_grid_thw.shape)}")
        patches = int(image_grid_thw.prod(dim=1).sum())
        if pixel_values.shape[0] != patches:
            raise ValueError(f"pixel_values: expected {patches} rows (the sum of t*h*w over image_grid_thw), "
                             f"got {pixel_values.shape[0]}")
        merge = self.config.vision_config.spatial_merge_size
        if patches // merge ** 2 != n_tokens:
            raise ValueError(f"image_grid_thw: describes {patches // merge ** 2} image tokens, but input_ids hold "
                             f"{n_tokens}")

    def tokens_per_chameleon_image(self) -> int:
        vq = self.config.vq_config
        return (vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)) ** 2

    def input_embeddings(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                         image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, S, D] layer-0 inputs: token embeddings, image placeholders replaced by the image embeddings
        (vision-merger outputs for Qwen, embedded VQ tokens for Chameleon), in images' order."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        inner = self.model.model
        if self.family == "qwen":
            dtype = inner.visual.dtype if hasattr(inner.visual, "dtype") else embeds.dtype
            features = inner.get_image_features(pixel_values.to(dtype), image_grid_thw, return_dict=True)
            image = torch.cat(list(features.pooler_output), dim=0)
        else:
            features = inner.get_image_features(pixel_values.to(embeds.dtype), return_dict=True)
            image = features.pooler_output.reshape(-1, embeds.shape[-1])
        mask = (input_ids == self.image_token_id)[..., None].expand_as(embeds)
        return embeds.masked_scatter(mask, image.to(embeds.dtype))

    def model_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """The model's own positions of the original sequence: [3, B, S] M-RoPE for Qwen (its get_rope_index),
        [1, B, S] for Chameleon (arange over the padded row, as its forward builds them)."""
        B, S = input_ids.shape
        if self.family == "chameleon" or image_grid_thw is None:
            return torch.arange(S, device=input_ids.device).expand(1, B, S).clone()
        mm_types = (input_ids == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids=mm_types,
                                                       image_grid_thw=image_grid_thw,
                                                       attention_mask=attention_mask)
        return positions

    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """[R, B, M] positions -> what the language model takes: [3, B, M] for Qwen, [B, M] for Chameleon."""
        if self.family == "qwen":
            return positions.expand(3, -1, -1)
        return positions[0]

    # ------------------------------------------------------------------------------------------- attention
    def install_attention(self) -> str:
        """Routes the language model's attention through :func:`mmlatent_attention` (for good: per-call switching
        would break gradient checkpointing, whose backward recomputes layers with whatever is set then). Calls
        without mmlatent's keyword arguments still run the implementation the model had; the vision tower (or
        Chameleon's VQ-GAN) keeps its own."""
        current = self.text_config._attn_implementation
        if current.startswith(ATTENTION_PREFIX):
            return current
        name = attention_name(current)
        key = "text_config" if self.family == "qwen" else ""
        self.model.set_attn_implementation({key: name})
        return name


__all__ = ["VLMBackbone", "RolloutScores", "EagerProbabilities", "mmlatent_attention", "eager_attention",
           "attention_name", "ATTENTION_PREFIX"]
