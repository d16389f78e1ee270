"""The attention function of the latent rollout, and its installation on a Hugging Face model.

The model families themselves are in :mod:`mmlatent.models.backbones`. Nothing in transformers is patched:
:func:`mmlatent_attention` is registered with ``AttentionInterface`` (with the previous implementation's mask
function in ``AttentionMaskInterface``) and set as the language model's implementation (and the vision tower's,
where that one is eager); keyword arguments of each call select the rollout kernels, eager probabilities or the
fast implementation, and every call without them (the user's own) runs the previous implementation.
:func:`install_attention` records what the model had and :func:`restore_attention` puts it back.
"""
from __future__ import annotations

import functools
import re
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from torch import nn

from mmlatent.kernels import attention_with_scores, row_attention_mass

if TYPE_CHECKING:  # the backbones import this module when they install attention
    from .backbones import VLMBackbone

ATTENTION_PREFIX = "mmlatent_"


@dataclass
class RolloutScores:
    """What the rollout attention needs besides q, k, v; passed to the model's forward as ``mmlatent_rollout``.

    key_valid: [B, N] bool over every key column (cache + this call), False at padding.
    image_index: [B, Ni] int64 key columns of each sample's image tokens, -1 = padding.
    scores: [B, Ni] float32, receives ``weight`` x the last query row's attention mass on each image token, per layer
        and head (weight = 1 / (layers x heads): the mean IVT-LR ranks by).
    deferred: None, or a list that each layer's call appends (last query row [B, Hq, D], whole key cache
        [B, Hkv, N, D], scale) to instead of adding its mass: the caller then computes every layer's mass and the
        selection in one :func:`mmlatent.kernels.select_image_tokens`.
    """

    key_valid: torch.Tensor
    image_index: torch.Tensor
    scores: torch.Tensor
    weight: float
    deferred: Optional[List[Tuple[torch.Tensor, torch.Tensor, Optional[float]]]] = None


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

    def __init__(self, fast: bool) -> None:
        self.fast = bool(fast)


def fast_implementation(implementation: Optional[str]) -> str:
    """The implementation that calls needing no probabilities run on a model loaded with ``implementation``.

    Eager attention builds the [B, H, M, N] probabilities in memory; SDPA gives the same output without them, and
    takes the 4-D additive mask that eager's mask function builds (on CUDA torch then runs its memory-efficient
    kernel). Every other implementation (SDPA, flash-attn, flex) is kept: it is already fast, and its mask is
    the one its own mask function built. (flash-attn is not substituted for eager: it needs the 2-D padding mask
    of its own mask function, while the model builds eager's.)"""
    return "sdpa" if implementation in (None, "eager") else implementation


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    additive_mask: Optional[torch.Tensor], scaling: Optional[float],
                    dropout: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain attention, as transformers' eager path computes it: ([B, M, Hq, D], probabilities [B, Hq, M, N])."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if additive_mask is not None:
        weights = weights + additive_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _additive_mask(key_valid: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    N = key_valid.shape[1]
    causal = torch.ones(rows, N, dtype=torch.bool, device=key_valid.device).tril(N - rows)
    allowed = causal[None, None] & key_valid[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device).masked_fill(~allowed,
                                                                                        torch.finfo(dtype).min)


def _fallback_attention(fallback: str, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: Optional[torch.Tensor], scaling: Optional[float],
                        dropout: float, **kwargs: object) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
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
                       mmlatent_eager: Optional[EagerProbabilities] = None,
                       **kwargs: object) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The attention function of a wrapped model's language model (and of its vision tower where that one is
    eager): query [B, Hq, M, D], key/value [B, Hkv, N, D] (the whole cache) -> ([B, M, Hq, D], probabilities or
    None). ``fallback`` is the implementation the model was loaded with. What a call does is chosen by its keyword
    arguments, so a checkpointed layer replays the same choice in its backward:

    - ``mmlatent_rollout``: adds the last query row's image-token mass into the rollout's score buffer. Under
      no_grad by :func:`mmlatent.kernels.attention_with_scores` (``return_lse=False``), which decides once what
      runs: on a GPU the attention and the mass in one pass, on a CPU SDPA and the row's mass. When
      differentiable (the training prefill) the output comes from the call's implementation (below) and the mass
      from :func:`mmlatent.kernels.row_attention_mass` (one more read of K, for one row). With its ``deferred``
      list, the same attention runs without the mass, and the last query row and the key cache are handed over.
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
    if ctx.deferred is not None:
        # a copy of the row: a view would keep the whole [B, Hq, M, D] query alive until the selection
        ctx.deferred.append((query[:, :, -1].detach().clone(), key.detach(), scaling))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        out = _fallback_attention(implementation, module, query, key, value, attention_mask, scaling, dropout,
                                  **kwargs)
        if ctx.deferred is None:
            with torch.no_grad():
                row_attention_mass(query[:, :, -1].detach(), key.detach(), ctx.image_index, ctx.scores,
                                   key_valid=ctx.key_valid, scale=scaling, weight=ctx.weight)
        return out
    scoring = {} if ctx.deferred is not None else dict(image_index=ctx.image_index, scores_out=ctx.scores,
                                                       score_row=-1, weight=ctx.weight)
    o, _ = attention_with_scores(query, key, value, causal=True, key_valid=ctx.key_valid, scale=scaling,
                                 return_lse=False, **scoring)
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


def _wanted_attention(backbone: "VLMBackbone") -> Dict[str, str]:
    """sub-config key -> the mmlatent implementation it needs: the language model's always (the rollout's
    keywords), the vision tower's where a faster implementation than its own exists."""
    wanted = {backbone.text_key: attention_name(wrapped_implementation(backbone.text_config._attn_implementation))}
    key = backbone.vision_attention_key
    if key is not None:
        vision = wrapped_implementation(getattr(backbone.config, key)._attn_implementation)
        if fast_implementation(vision) != vision:
            wanted[key] = attention_name(vision)
    return wanted


def _current_attention(backbone: "VLMBackbone", key: str) -> Optional[str]:
    return (getattr(backbone.config, key) if key else backbone.config)._attn_implementation


def install_attention(backbone: "VLMBackbone", lease: AttentionLease) -> Dict[str, str]:
    """Routes the language model's attention (and an eager vision tower's) through :func:`mmlatent_attention`,
    kept as long as ``lease`` (or another lease on the same model) is alive; returns what was set.

    Set on the model rather than per call: gradient checkpointing's backward recomputes layers with whatever
    is set then. Calls without mmlatent's keyword arguments still run the implementation the model was loaded
    with. Called before every wrapper call: it reinstalls after :func:`restore_attention` or after the user
    set another implementation (whose value is then the one restored)."""
    model = backbone.model
    wanted = _wanted_attention(backbone)
    record = _INSTALLATIONS.get(model)
    if record is None or any(_current_attention(backbone, k) != name for k, name in wanted.items()):
        originals = [(config, wrapped_implementation(config._attn_implementation_internal))
                     for config in backbone.attention_configs()]
        if record is not None:  # values the user set since the first installation win
            before = {id(config): value for config, value in record.originals}
            originals = [(config, before.get(id(config), value)
                          if config._attn_implementation_internal in _REGISTERED else value)
                         for config, value in originals]
            record.originals = originals
        else:
            record = _INSTALLATIONS[model] = _Installation(originals, weakref.WeakSet())
        model.set_attn_implementation(wanted)
    if lease not in record.leases:
        record.leases.add(lease)
        weakref.finalize(lease, _release, weakref.ref(model)).atexit = False
    return wanted


def restore_attention(model: nn.Module) -> None:
    """Gives the model back the ``_attn_implementation`` of every config as it was before mmlatent's was
    installed (a config the user changed since keeps the user's value). Live wrappers reinstall at their next
    call."""
    record = _INSTALLATIONS.get(model)
    if record is not None:
        _restore(model, record)


__all__ = ["RolloutScores", "EagerProbabilities", "AttentionLease", "mmlatent_attention",
           "eager_attention", "fast_implementation", "attention_name", "wrapped_implementation", "install_attention",
           "restore_attention", "ATTENTION_PREFIX"]
