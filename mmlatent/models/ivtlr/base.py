"""What the fast wrapper and the public-code reference share: arguments, the layout of one call, its final pass,
its loss, decoding (:mod:`.generation`), saving and loading (:mod:`.saving`), and the attention installation that
wrapping makes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from ..backbones import VLMBackbone
from ..compat import cache_kwargs
from ..attention import AttentionLease
from ..lm_head import LinearCrossEntropyHead, head_for
from . import generation, saving
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
                 position_mode: str = "linear") -> None:
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

    # ---------------------------------------------------------------------------------------------- generation
    def _start_generation(self, input_ids, attention_mask, pixel_values, image_grid_thw, generation_config,
                          options, tokenizer, logits_processor, stopping_criteria):
        """Checks and merges the options (before any model call), prepares the inputs; returns (inputs, the
        assembled prompt's ids [B, S_asm], the :class:`~.generation.DecodingPlan`)."""
        # host sync, once per generate call: right padding must be refused before any model call
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[1] \
                and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("attention_mask: generation needs left-padded prompts (the last column of every row "
                             "a real token)")
        model_config = getattr(self.backbone.model, "generation_config", None)
        config, default_length = generation.resolve(model_config, generation_config, options)
        inputs = self._prepare(input_ids, attention_mask, None, pixel_values, image_grid_thw)
        _, pad = generation.special_tokens(config)
        history = generation.assembled_ids(inputs.plan, input_ids.long(), self.backbone.image_token_id, pad)
        decoding = generation.plan(config, default_length, history, inputs.plan.valid, tokenizer=tokenizer,
                                   logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                                   max_position_embeddings=getattr(self.backbone.config, "max_position_embeddings",
                                                                   None))
        return inputs, history, decoding

    def _decode_positions(self, positions: torch.Tensor, step: int) -> torch.Tensor:
        """[R, B, 1] position of the step-th new token: the layout continues (linear), or each sample's largest
        position + 1 (mrope, as the model's rope_deltas do)."""
        if self.position_mode == "linear":
            return torch.full_like(positions[:, :, :1], positions.shape[2] + step)
        return positions.amax(dim=(0, 2), keepdim=True).expand(positions.shape[0], -1, 1) + 1 + step

    def _cached_feed(self, lm, cache, key_valid: torch.Tensor,
                     positions: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """``feed(token [B], step)``: appends the step-th new token to ``cache`` and returns the next logits
        [B, V]; ``key_valid`` [B, cached length] bool marks the cache's real columns."""
        state = {"key_valid": key_valid}

        def feed(token: torch.Tensor, step: int) -> torch.Tensor:
            valid = state["key_valid"]
            state["key_valid"] = valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
            out = self._lm(lm, inputs_embeds=self.backbone.embed_tokens(token[:, None]), attention_mask=valid.long(),
                           position_ids=self.backbone.position_ids(self._decode_positions(positions, step)),
                           cache=cache, use_cache=True)
            return self.backbone.logits(out.last_hidden_state[:, -1])
        return feed

    @torch.no_grad()
    def assembled_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         pixel_values: Optional[torch.Tensor] = None,
                         image_grid_thw: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The prompt after its latent steps, as ``vlm.generate`` takes it.

        Returns:
            input_ids: [B, S_asm] int64, the ids :meth:`generate`'s logits processors see: the image token id at
                the inserted embeddings; in the layout's padding the pad id of the model's generation config, else
                its first EOS id, else 0.
            inputs_embeds: [B, S_asm, D] the assembled layer-0 inputs.
            attention_mask: [B, S_asm] int64.
            position_ids: the model's layout of the positions ([3, B, S_asm] for Qwen, [B, S_asm] else).

        ``vlm.generate(**wrapper.assembled_prompt(...), **options)`` decodes what ``generate(..., **options)``
        decodes."""
        out = self(input_ids, attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        plan = LayoutPlan(input_ids.long(), attention_mask, self.latent_token_id, self.backbone.image_token_id,
                          self.k)
        positions = plan.positions(self.position_mode, self.backbone, input_ids.long(), attention_mask,
                                   image_grid_thw)
        model_config = getattr(self.backbone.model, "generation_config", None)
        pad = None if model_config is None else generation.special_tokens(model_config)[1]
        return {"input_ids": generation.assembled_ids(plan, input_ids.long(), self.backbone.image_token_id, pad),
                "inputs_embeds": out.inputs_embeds, "attention_mask": plan.valid.long(),
                "position_ids": self.backbone.position_ids(positions)}

    # ------------------------------------------------------------------------------------------ saving, loading
    def save_pretrained(self, directory: str, *, save_base: Optional[bool] = None,
                        save_embedding_layers: Union[bool, str] = "auto") -> str:
        """Writes the wrapped model as a standard folder and the wrapper's settings (``ivtlr_config.json``), crash
        safely and verified (:func:`mmlatent.train.checkpoint.write_checkpoint`); returns ``directory``.

        A full model is written by its ``save_pretrained`` (config.json, model.safetensors, generation_config.json,
        the model's own key names); a PEFT model by PEFT's (adapter_config.json, adapter_model.safetensors), with
        the base model in ``directory/base`` when it has no checkpoint on disk, and the embedding matrices in the
        adapter file when the vocabulary outgrew the base checkpoint's (see :mod:`mmlatent.models.ivtlr.saving`;
        ``save_base`` and ``save_embedding_layers`` override those defaults). ``directory`` is replaced whole: it
        must be new, empty or an mmlatent checkpoint (ValueError otherwise)."""
        from mmlatent.train.checkpoint import write_checkpoint
        saving.check_replaceable(directory)
        return write_checkpoint(directory, {}, fill=lambda folder: saving.write_pretrained(
            self.vlm, folder, latent_token_id=self.latent_token_id, k=self.k, position_mode=self.position_mode,
            save_base=save_base, save_embedding_layers=save_embedding_layers))

    @classmethod
    def from_pretrained(cls, directory: str, model: Optional[nn.Module] = None, *,
                        base_model: Optional[nn.Module] = None, device: Optional[Union[str, torch.device]] = None,
                        dtype: Optional[torch.dtype] = None, attn_implementation: Optional[str] = None,
                        is_trainable: bool = False) -> "IVTLRBase":
        """The wrapper saved by :meth:`save_pretrained` (or a training run's ``final`` folder), verified against
        its manifest first: a missing or corrupt file raises :class:`~mmlatent.train.checkpoint.CheckpointError`
        naming it.

        Args:
            directory: the folder.
            model: a model that already holds the folder's weights (e.g. loaded with your own device map); only
                the IVT-LR settings are read from the folder then.
            base_model: for an adapter folder, the model it adapts (an ``nn.Module``, changed in place as
                ``PeftModel.from_pretrained`` changes it, or a local model folder); default: the folder's
                ``base/``, else ``adapter_config.json``'s ``base_model_name_or_path`` when it is a local folder.
                Its embeddings are resized to the saved vocabulary first when rows were added.
            device, dtype, attn_implementation: where and how the model is loaded (default: the CPU, the saved
                dtype, transformers' default attention).
            is_trainable: load PEFT adapters trainable (``PeftModel.from_pretrained``'s flag).
        """
        vlm, settings = saving.load_pretrained(directory, model, base_model=base_model, device=device, dtype=dtype,
                                               attn_implementation=attn_implementation, is_trainable=is_trainable)
        return cls(vlm, settings["latent_token_id"], k=settings["k"], position_mode=settings["position_mode"])


def checkpointing_layers(module: nn.Module) -> List[nn.Module]:
    """The layers transformers would checkpoint now (gradient checkpointing on, training mode)."""
    if not module.training:
        return []
    return [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]


class checkpointing_paused:
    """Gradient checkpointing off for a no-grad rollout: it would only drop the KV cache there (transformers
    disables caching in checkpointed layers), and with no graph there is nothing to save."""

    def __init__(self, module: nn.Module) -> None:
        self.layers = checkpointing_layers(module)

    def __enter__(self) -> None:
        for layer in self.layers:
            layer.gradient_checkpointing = False

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            layer.gradient_checkpointing = True


__all__ = ["IVTLROutput", "IVTLRBase", "checkpointing_layers", "checkpointing_paused"]
