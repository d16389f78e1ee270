"""Hugging Face vision-language models as IVT-LR backbones, and the attention function of the latent rollout.

:class:`VLMBackbone` gives one interface over the supported families (Qwen2-VL, Qwen2.5-VL, Chameleon): their
language model, their image embeddings (vision-merger outputs, or Chameleon's embedded VQ tokens), their
positions and their output head. Nothing in transformers is patched: :func:`mmlatent_attention` is registered
with ``AttentionInterface`` (with the previous implementation's mask function in ``AttentionMaskInterface``) and
set as the language model's implementation (and the vision tower's, where that one is eager); keyword arguments of
each call select the rollout kernels, eager probabilities or the fast implementation, and every call without them
(the user's own) runs the previous implementation. :meth:`VLMBackbone.install_attention` records what the model had
and :meth:`VLMBackbone.restore_attention` puts it back.
"""
from __future__ import annotations

import functools
import re
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from mmlatent.kernels import attention_with_scores, row_attention_mass

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


class AttentionLease:
    """Passed as ``mmlatent_lease`` with every call a wrapper makes into the model (language model and vision tower).

    It says whether calls that need no attention probabilities may run :func:`fast_implementation` of the model's
    own (``fast``: True for :class:`~mmlatent.models.IVTLR`, False for the reference, which computes as the public
    code does). It also keeps mmlatent's attention installed: the installation is undone only once no lease is
    alive, and a checkpointed layer's recompute closure holds its call's keywords, so an autograd graph waiting
    for its backward keeps the implementation its forward ran with (switching it in between would make the
    recompute save different tensors)."""

    __slots__ = ("fast", "__weakref__")

    def __init__(self, fast: bool):
        self.fast = bool(fast)


def fast_implementation(implementation: Optional[str]) -> str:
    """The implementation that calls needing no probabilities run on a model loaded with ``implementation``.

    Eager attention builds the [B, H, M, N] probabilities in memory; SDPA gives the same output without them, and
    takes the 4-D additive mask that eager's mask function builds (on CUDA torch then runs its memory-efficient
    kernel). Every other implementation (SDPA, flash-attn, flex) is kept: it is already fast, and its mask is
    the one its own mask function built. (flash-attn is not substituted for eager: it needs the 2-D padding mask
    of its own mask function, while the model builds eager's.)"""
    return "sdpa" if implementation in (None, "eager") else implementation


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
                       *, fallback: str = "sdpa", mmlatent_lease: Optional[AttentionLease] = None,
                       mmlatent_rollout: Optional[RolloutScores] = None,
                       mmlatent_eager: Optional[EagerProbabilities] = None, **kwargs):
    """The attention function of a wrapped model's language model (and of its vision tower where that one is
    eager): query [B, Hq, M, D], key/value [B, Hkv, N, D] (the whole cache) -> ([B, M, Hq, D], probabilities or
    None). ``fallback`` is the implementation the model was loaded with. What a call does is chosen by its keyword
    arguments, so a checkpointed layer replays the same choice in its backward:

    - ``mmlatent_rollout``: adds the last query row's image-token mass into the rollout's score buffer. Under
      no_grad by :func:`mmlatent.kernels.attention_with_scores` (``return_lse=False``), which decides once what
      runs: on a GPU the attention and the mass in one pass, on a CPU SDPA and the row's mass. When
      differentiable (the training prefill) the output comes from the call's implementation (below) and the mass
      from :func:`mmlatent.kernels.row_attention_mass` (one more read of K, for one row).
    - ``mmlatent_eager``: eager attention returning its probabilities (the reference's latent passes).
    - neither (the loss pass, decoding, the vision tower): the call's implementation, which is
      :func:`fast_implementation` of ``fallback`` when ``mmlatent_lease.fast`` (IVTLR's calls: SDPA on an
      eager-loaded model), else ``fallback`` itself (the reference's calls, and every call the user makes).
    """
    implementation = fast_implementation(fallback) if mmlatent_lease is not None and mmlatent_lease.fast \
        else fallback
    causal = getattr(module, "is_causal", True)
    if mmlatent_eager is not None and causal:
        mask = _additive_mask(mmlatent_eager.key_valid, query.shape[2], query.dtype)
        return eager_attention(module, query, key, value, mask, scaling, dropout)
    ctx = mmlatent_rollout
    if ctx is None or not causal:
        return _fallback_attention(implementation, module, query, key, value, attention_mask, scaling, dropout,
                                   **kwargs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        out = _fallback_attention(implementation, module, query, key, value, attention_mask, scaling, dropout,
                                  **kwargs)
        with torch.no_grad():
            row_attention_mass(query[:, :, -1].detach(), key.detach(), ctx.image_index, ctx.scores,
                               key_valid=ctx.key_valid, scale=scaling, weight=ctx.weight)
        return out
    o, _ = attention_with_scores(query, key, value, causal=True, key_valid=ctx.key_valid,
                                 image_index=ctx.image_index, scores_out=ctx.scores, score_row=-1, scale=scaling,
                                 weight=ctx.weight, return_lse=False)
    return o.transpose(1, 2), None


# registered name -> the implementation it wraps (names are sanitised, so the map is what inverts them)
_REGISTERED: Dict[str, str] = {}


def attention_name(fallback: Optional[str]) -> str:
    """Registers (once) mmlatent's attention function over ``fallback`` with ``fallback``'s mask function, and
    returns its name. ``None`` (a config never dispatched) is what transformers runs for it: eager."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    fallback = "eager" if fallback is None else fallback
    name = ATTENTION_PREFIX + re.sub(r"\W", "_", fallback)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, functools.partial(mmlatent_attention, fallback=fallback))
        # the mask the fallback expects (without a registered mask function the masks would silently vanish)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[fallback])
    _REGISTERED[name] = fallback
    return name


def wrapped_implementation(name: Optional[str]) -> Optional[str]:
    """The implementation a registered mmlatent name wraps; ``name`` itself when it is not one of mmlatent's."""
    return _REGISTERED.get(name, name)


@dataclass
class _Installation:
    """What one model had before mmlatent's attention was installed on it: (config, its ``_attn_implementation``
    then) for every config of the model, and the leases that keep the installation."""

    originals: List[Tuple[object, Optional[str]]]
    leases: "weakref.WeakSet[AttentionLease]"


# keyed by the model itself (weakly): nothing is stored on the user's model
_INSTALLATIONS: "weakref.WeakKeyDictionary[nn.Module, _Installation]" = weakref.WeakKeyDictionary()


def _release(model_ref: "weakref.ref[nn.Module]") -> None:
    """A lease died: once none is left, the model gets its own attention back."""
    model = model_ref()
    record = None if model is None else _INSTALLATIONS.get(model)
    if record is not None and not any(True for _ in record.leases):
        _restore(model, record)


def _restore(model: nn.Module, record: _Installation) -> None:
    # a config whose value is no longer mmlatent's was set by the user since: theirs stays
    for config, original in record.originals:
        if config._attn_implementation_internal in _REGISTERED:
            config._attn_implementation_internal = original
    _INSTALLATIONS.pop(model, None)


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
        """Decoder taking inputs_embeds, attention_mask, position_ids and a KV cache -> last_hidden_state."""
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

    @property
    def text_key(self) -> str:
        """The language model's sub-config key for ``set_attn_implementation`` ("" for Chameleon: its own)."""
        return "text_config" if self.family == "qwen" else ""

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
                         image_grid_thw: Optional[torch.Tensor],
                         lease: Optional[AttentionLease] = None) -> torch.Tensor:
        """[B, S, D] layer-0 inputs: token embeddings, image placeholders replaced by the image embeddings
        (vision-merger outputs for Qwen, embedded VQ tokens for Chameleon), in images' order. ``lease`` goes with
        the vision tower's attention calls (Chameleon's VQ-GAN has no attention function to choose)."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        inner = self.model.model
        if self.family == "qwen":
            dtype = inner.visual.dtype if hasattr(inner.visual, "dtype") else embeds.dtype
            extra = {} if lease is None else {"mmlatent_lease": lease}
            features = inner.get_image_features(pixel_values.to(dtype), image_grid_thw, return_dict=True, **extra)
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
    def attention_configs(self) -> List[object]:
        """Every config of the model that carries an attention implementation, once each: its own, its
        sub-configs at any depth, and those of its sub-models."""
        from transformers import PreTrainedModel
        found, queue = {}, [self.config]
        queue += [m.config for m in self.model.modules() if isinstance(m, PreTrainedModel)]
        while queue:
            config = queue.pop(0)
            if id(config) in found:
                continue
            found[id(config)] = config
            queue += [getattr(config, key) for key in getattr(config, "sub_configs", {})
                      if getattr(config, key, None) is not None]
        return list(found.values())

    def _wanted_attention(self) -> Dict[str, str]:
        """sub-config key -> the mmlatent implementation it needs: the language model's always (the rollout's
        keywords), the vision tower's where a faster implementation than its own exists."""
        wanted = {self.text_key: attention_name(wrapped_implementation(self.text_config._attn_implementation))}
        if self.family == "qwen":
            vision = wrapped_implementation(self.config.vision_config._attn_implementation)
            if fast_implementation(vision) != vision:
                wanted["vision_config"] = attention_name(vision)
        return wanted

    def _current_attention(self, key: str) -> Optional[str]:
        return (getattr(self.config, key) if key else self.config)._attn_implementation

    def install_attention(self, lease: AttentionLease) -> Dict[str, str]:
        """Routes the language model's attention (and an eager vision tower's) through :func:`mmlatent_attention`,
        kept as long as ``lease`` (or another lease on the same model) is alive; returns what was set.

        Set on the model rather than per call: gradient checkpointing's backward recomputes layers with whatever
        is set then. Calls without mmlatent's keyword arguments still run the implementation the model was loaded
        with. Called before every wrapper call: it reinstalls after :meth:`restore_attention` or after the user
        set another implementation (whose value is then the one restored)."""
        wanted = self._wanted_attention()
        record = _INSTALLATIONS.get(self.model)
        if record is None or any(self._current_attention(k) != name for k, name in wanted.items()):
            originals = [(config, wrapped_implementation(config._attn_implementation_internal))
                         for config in self.attention_configs()]
            if record is not None:  # values the user set since the first installation win
                before = {id(config): value for config, value in record.originals}
                originals = [(config, before.get(id(config), value)
                              if config._attn_implementation_internal in _REGISTERED else value)
                             for config, value in originals]
                record.originals = originals
            else:
                record = _INSTALLATIONS[self.model] = _Installation(originals, weakref.WeakSet())
            self.model.set_attn_implementation(wanted)
        if lease not in record.leases:
            record.leases.add(lease)
            weakref.finalize(lease, _release, weakref.ref(self.model)).atexit = False
        return wanted

    def restore_attention(self) -> None:
        """Gives the model back the ``_attn_implementation`` of every config as it was before mmlatent's was
        installed (a config the user changed since keeps the user's value). Live wrappers reinstall at their
        next call."""
        record = _INSTALLATIONS.get(self.model)
        if record is not None:
            _restore(self.model, record)


__all__ = ["VLMBackbone", "RolloutScores", "EagerProbabilities", "AttentionLease", "mmlatent_attention",
           "eager_attention", "fast_implementation", "attention_name", "wrapped_implementation", "ATTENTION_PREFIX"]
