"""What the fast wrapper and the public-code reference share: arguments, the layout of one call, its final pass,
its loss, decoding, and the attention installation that wrapping makes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from ..backbones import VLMBackbone
from ..compat import cache_kwargs
from ..attention import AttentionLease
from ..lm_head import LinearCrossEntropyHead, head_for
from .layout import POSITION_MODES, LayoutPlan, PreparedInputs, assemble_with_grad, assembled_labels


@dataclass
class IVTLROutput:
    """loss: scalar float32 mean cross-entropy over the labelled tokens (None without labels).
    logits: [B, S_asm, V] over the assembled sequence, only when asked.
    selected: one [B, k] int64 tensor per latent step: indices into each sample's image tokens (in their order in
        input_ids), ascending; -1 rows for samples with fewer latent steps.
    inputs_embeds: [B, S_asm, D] the assembled layer-0 inputs (detached)."""

    loss: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    selected: List[torch.Tensor] = field(default_factory=list)
    inputs_embeds: Optional[torch.Tensor] = None


def _check_inputs(backbone: VLMBackbone, input_ids, attention_mask, labels, pixel_values, image_grid_thw):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                                    torch.int32):
        raise ValueError(f"input_ids: expected a [B, S] integer tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, got "
                         f"{getattr(attention_mask, 'shape', None)}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
        raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} like input_ids, got "
                         f"{getattr(labels, 'shape', None)}")
    backbone.check_images(input_ids, pixel_values, image_grid_thw)


def _resolve_k(backbone: VLMBackbone, k: Optional[int]) -> int:
    k = backbone.default_k if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    return k


class IVTLRBase(nn.Module):
    # whether the calls that need no attention probabilities run a fast implementation (IVTLR) or the model's own
    # (the reference, as the public code runs them)
    _fast_attention = True

    def __init__(self, vlm: nn.Module, latent_token_id: int, *, k: Optional[int] = None,
                 position_mode: str = "linear"):
        super().__init__()
        self.vlm = vlm
        self.backbone = VLMBackbone(vlm)
        self.latent_token_id = int(latent_token_id)
        self.k = _resolve_k(self.backbone, k)
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode: expected 'linear' or 'mrope', got {position_mode!r}")
        if position_mode == "mrope" and not self.backbone.has_mrope:
            raise ValueError("position_mode: 'mrope' needs an M-RoPE model (Qwen2-VL, Qwen2.5-VL); Chameleon's "
                             "positions are 1-D, use 'linear'")
        self.position_mode = position_mode
        self._lease: Optional[AttentionLease] = AttentionLease(fast=self._fast_attention)
        self.backbone.install_attention(self._lease)  # last: a rejected argument leaves the model untouched

    def unwrap(self) -> nn.Module:
        """Gives the model back the attention implementation of every config as it had it before wrapping (the
        exact ``_attn_implementation`` values), now, and returns it (the object passed as ``vlm``). The wrapper
        is unusable afterwards; other wrappers of the same model reinstall theirs at their next call."""
        if self._lease is not None:
            self.backbone.restore_attention()
            self._lease = None
        return self.vlm

    def _attention_lease(self) -> AttentionLease:
        """This wrapper's lease, with mmlatent's attention (re)installed on the model (after another wrapper's
        unwrap, or the user's set_attn_implementation)."""
        if self._lease is None:
            raise RuntimeError(f"{type(self).__name__}: unwrap() was called; wrap the model again to use it")
        self.backbone.install_attention(self._lease)
        return self._lease

    def _lm(self, lm, *, cache=None, **inputs):
        """One call of the language model with this wrapper's lease (and the KV cache under the keyword the
        installed transformers takes)."""
        extra = {} if cache is None else cache_kwargs(lm, cache)
        return lm(**inputs, **extra, mmlatent_lease=self._lease)

    def _prepare(self, input_ids, attention_mask, labels, pixel_values, image_grid_thw):
        lease = self._attention_lease()
        _check_inputs(self.backbone, input_ids, attention_mask, labels, pixel_values, image_grid_thw)
        input_ids = input_ids.long()
        plan = LayoutPlan(input_ids, attention_mask, self.latent_token_id, self.backbone.image_token_id, self.k)
        embeds = self.backbone.input_embeddings(input_ids, pixel_values, image_grid_thw, lease)
        positions = plan.positions(self.position_mode, self.backbone, input_ids, attention_mask, image_grid_thw)
        filled = embeds.detach().new_zeros(input_ids.shape[0], plan.length, embeds.shape[-1])
        filled.scatter_(1, plan.orig_to_asm[..., None].expand_as(embeds), embeds.detach())
        return PreparedInputs(plan, embeds, positions, filled)

    def _image_bank(self, plan: LayoutPlan, filled: torch.Tensor):
        """Each sample's image-token embeddings [B, Ni, D], their assembled columns [B, Ni] (-1 = padding)."""
        Ni = max(len(c) for c in plan.images)
        B, _, D = filled.shape
        columns = torch.full((B, Ni), -1, dtype=torch.long, device=filled.device)
        for b in range(B):
            columns[b, :len(plan.images[b])] = plan.image_columns(b)
        bank = torch.gather(filled, 1, columns.clamp(min=0)[..., None].expand(B, Ni, D))
        return bank, columns

    def _loss(self, plan: LayoutPlan, hidden: torch.Tensor, labels, return_logits: bool):
        logits = self.backbone.logits(hidden) if return_logits else None
        loss = None
        if labels is not None:
            loss = self._loss_head()(hidden, assembled_labels(plan, labels.long()), shift=True)
        return loss, logits

    def _loss_head(self) -> LinearCrossEntropyHead:
        """The memory-lean loss head over the model's output layer, built once (and again only if the model's
        output layer was replaced since, e.g. by ``resize_token_embeddings``). Kept out of the module tree: it
        shares the model's weight and must not appear twice in a state dict."""
        lm_head = self.backbone.lm_head
        cached = self.__dict__.get("_head")
        if cached is None or cached[0] is not lm_head:
            self.__dict__["_head"] = cached = (lm_head, head_for(self.backbone.model))
        return cached[1]

    def _final_pass(self, inputs: PreparedInputs):
        out = self._lm(self.backbone.language_model, inputs_embeds=assemble_with_grad(inputs),
                       attention_mask=inputs.plan.valid.long(),
                       position_ids=self.backbone.position_ids(inputs.positions), use_cache=False)
        return out.last_hidden_state

    def _eos_and_pad(self, eos_token_id):
        text = self.backbone.text_config
        generation_config = getattr(self.backbone.model, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else (
            getattr(generation_config, "eos_token_id", None) or text.eos_token_id)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        pad = text.pad_token_id if text.pad_token_id is not None else (eos[0] if eos else 0)
        return torch.tensor(eos, dtype=torch.long), int(pad)

    def _decode_positions(self, positions: torch.Tensor, step: int) -> torch.Tensor:
        """[R, B, 1] position of the step-th new token: the layout continues (linear), or each sample's largest
        position + 1 (mrope, as the model's rope_deltas do)."""
        if self.position_mode == "linear":
            return torch.full_like(positions[:, :, :1], positions.shape[2] + step)
        return positions.amax(dim=(0, 2), keepdim=True).expand(positions.shape[0], -1, 1) + 1 + step

    def _pick(self, logits: torch.Tensor, do_sample: bool, temperature: float) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1).squeeze(1)

    def _check_generate(self, attention_mask, max_new_tokens, temperature):
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("attention_mask: generation needs left-padded prompts (the last column of every row "
                             "a real token)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")


def checkpointing_layers(module: nn.Module) -> List[nn.Module]:
    """The layers transformers would checkpoint now (gradient checkpointing on, training mode)."""
    if not module.training:
        return []
    return [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]


class checkpointing_paused:
    """Gradient checkpointing off for a no-grad rollout: it would only drop the KV cache there (transformers
    disables caching in checkpointed layers), and with no graph there is nothing to save."""

    def __init__(self, module: nn.Module):
        self.layers = checkpointing_layers(module)

    def __enter__(self):
        for layer in self.layers:
            layer.gradient_checkpointing = False

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.gradient_checkpointing = True


def decode(model: IVTLRBase, lm, cache, key_valid, positions, last_hidden, max_new_tokens, do_sample,
            temperature, eos, pad, tokens: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """Greedy or sampled decoding with a KV cache, from the hidden state [B, D] of the last token fed (the
    prompt's, or the last of ``tokens`` already generated)."""
    B = last_hidden.shape[0]
    tokens = list(tokens or [])
    finished = torch.zeros(B, dtype=torch.bool, device=last_hidden.device)
    for token in tokens:
        finished |= torch.isin(token, eos)
    logits = model.backbone.logits(last_hidden)
    for step in range(len(tokens), max_new_tokens):
        token = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long),
                            model._pick(logits, do_sample, temperature))
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        key_valid = torch.cat([key_valid, torch.ones(B, 1, dtype=torch.bool, device=key_valid.device)], dim=1)
        out = model._lm(lm, inputs_embeds=model.backbone.embed_tokens(token[:, None]),
                        attention_mask=key_valid.long(),
                        position_ids=model.backbone.position_ids(model._decode_positions(positions, step)),
                        cache=cache, use_cache=True)
        logits = model.backbone.logits(out.last_hidden_state[:, -1])
    return torch.stack(tokens, dim=1)


__all__ = ["IVTLROutput", "IVTLRBase", "decode", "checkpointing_layers", "checkpointing_paused"]
