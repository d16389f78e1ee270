"""IVT-LR (Interleaved Vision-Text Latent Reasoning) on Hugging Face VLMs: :class:`IVTLR`, the fast wrapper, and
:func:`ivtlr_reference`, the method exactly as its public code computes it (the oracle and the baseline).

The method (DESIGN.md, "IVT-LR, as its public code does it"). Each ``latent_token_id`` in ``input_ids`` is one
latent reasoning step. Before latent step j the model has read everything up to that latent token; the attention
of the last row it read (softmax over all keys, mean over every layer and query head) ranks the sample's image
tokens not selected yet; the top k of them (their layer-0 input embeddings: vision-merger outputs, or Chameleon's
embedded VQ tokens) are inserted, in ascending image-token order, right before the latent token, and the latent
token's input embedding becomes the last row's final hidden state. Both are detached: only the last full pass over
the assembled sequence carries gradient.

Assembled layout. Sample b's assembled sequence is its input row (left padding included) with k embeddings
inserted before each of its n_b latent tokens; rows are left-padded to the longest (S + max_b n_b * k). "linear"
positions are the column index in that layout (IVT-LR's arange over the padded sequence, copied to the three
M-RoPE rows); "mrope" keeps the model's own 3-D positions of the original tokens, shifted by the insertions before
them, the inserted embeddings counting as text tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmlatent.kernels import select_topk_tokens

from .compat import cache_kwargs
from .backbones import VLMBackbone
from .hf import AttentionLease, EagerProbabilities, RolloutScores
from .lm_head import head_for

POSITION_MODES = ("linear", "mrope")


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


# ------------------------------------------------------------------------------------------------------ layout

class _Plan:
    """Where every token of every sample goes in the assembled layout (the definition both paths share)."""

    def __init__(self, input_ids, attention_mask, latent_id: int, image_id: int, k: int):
        B, S = input_ids.shape
        device = input_ids.device
        self.k = k
        is_latent = (input_ids == latent_id) & attention_mask.bool()
        is_image = (input_ids == image_id) & attention_mask.bool()
        self.latents = [row.nonzero().squeeze(1).tolist() for row in is_latent]
        self.images = [row.nonzero().squeeze(1).tolist() for row in is_image]
        counts = [len(c) for c in self.latents]
        self.num_steps = max(counts, default=0)
        for b in range(B):
            if self.num_steps and counts[b] == 0:
                raise ValueError(f"input_ids: sample {b} has no latent token (id {latent_id}) while the batch asks "
                                 f"for latent steps (sample {counts.index(self.num_steps)} has {self.num_steps})")
            if counts[b] and not self.images[b]:
                raise ValueError(f"input_ids: sample {b} has latent tokens but no image token (id {image_id}); "
                                 f"IVT-LR selects image tokens at every latent step")
            if counts[b] and self.images[b][-1] > self.latents[b][0]:
                raise ValueError(f"input_ids: sample {b} has image tokens after its first latent token; IVT-LR "
                                 f"selects among the image tokens that precede the latent steps")
            if len(self.images[b]) < counts[b] * k:
                raise ValueError(f"input_ids: sample {b} has {len(self.images[b])} image tokens, fewer than the "
                                 f"{counts[b] * k} its {counts[b]} latent steps select (k = {k} new tokens each)")
        self.counts = counts
        self.length = S + self.num_steps * k
        # embeddings inserted at or before each original column (each latent token is shifted by its own k)
        self.inserted_before = torch.cumsum(is_latent.long(), dim=1) * k  # [B, S]
        pad = torch.tensor([(self.num_steps - n) * k for n in counts], device=device)
        self.orig_to_asm = torch.arange(S, device=device)[None] + self.inserted_before + pad[:, None]  # [B, S]
        self.valid = torch.zeros(B, self.length, dtype=torch.bool, device=device)
        self.valid.scatter_(1, self.orig_to_asm, attention_mask.bool())
        self.inserted = torch.zeros(B, self.length, dtype=torch.bool, device=device)  # inserted or latent columns
        # step boundaries: sample b selects for latent j after reading columns [0, starts[b][j])
        self.starts = [[int(self.orig_to_asm[b, c]) - k for c in self.latents[b]] for b in range(B)]
        for b in range(B):
            for j, c in enumerate(self.latents[b]):
                latent_col = int(self.orig_to_asm[b, c])
                self.inserted[b, latent_col - k: latent_col + 1] = True
                self.valid[b, latent_col - k: latent_col] = True

    def image_columns(self, b: int) -> torch.Tensor:
        return self.orig_to_asm[b, self.images[b]]

    def latent_column(self, b: int, step: int) -> int:
        return self.starts[b][step] + self.k

    def positions(self, mode: str, backbone: VLMBackbone, input_ids, attention_mask, image_grid_thw):
        """[R, B, S_asm] positions (R = 1 for linear, 3 for mrope)."""
        B = input_ids.shape[0]
        if mode == "linear":
            return torch.arange(self.length, device=input_ids.device).expand(1, B, self.length).clone()
        original = backbone.model_positions(input_ids, attention_mask, image_grid_thw)  # [3, B, S]
        out = torch.ones(original.shape[0], B, self.length, dtype=original.dtype, device=original.device)
        out.scatter_(2, self.orig_to_asm[None].expand_as(original), original + self.inserted_before[None])
        for b in range(B):
            for j, c in enumerate(self.latents[b]):
                latent_col = int(self.orig_to_asm[b, c])
                first = int(out[0, b, latent_col]) - self.k
                out[:, b, latent_col - self.k: latent_col] = torch.arange(first, first + self.k, device=out.device)
        return out


def _left_pad(rows: List[torch.Tensor], length: int, fill=0) -> torch.Tensor:
    """Stacks rows [n_i, ...] into [B, length, ...], each right-aligned (padding at the front)."""
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        if r.shape[0]:
            out[i, length - r.shape[0]:] = r
    return out


def _assemble_with_grad(plan: _Plan, embeds: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """[B, S_asm, D]: the original tokens' embeddings (differentiable) at their columns, the detached inserted
    embeddings and latent states elsewhere (``filled``)."""
    B, S, D = embeds.shape
    placed = embeds.new_zeros(B, plan.length, D).scatter(1, plan.orig_to_asm[..., None].expand(B, S, D), embeds)
    return torch.where(plan.inserted[..., None], filled, placed)


def _assembled_labels(plan: _Plan, labels: torch.Tensor) -> torch.Tensor:
    out = labels.new_full((labels.shape[0], plan.length), -100)
    return out.scatter(1, plan.orig_to_asm, labels)


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


class _IVTLRBase(nn.Module):
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
        plan = _Plan(input_ids, attention_mask, self.latent_token_id, self.backbone.image_token_id, self.k)
        embeds = self.backbone.input_embeddings(input_ids, pixel_values, image_grid_thw, lease)
        positions = plan.positions(self.position_mode, self.backbone, input_ids, attention_mask, image_grid_thw)
        filled = embeds.detach().new_zeros(input_ids.shape[0], plan.length, embeds.shape[-1])
        filled.scatter_(1, plan.orig_to_asm[..., None].expand_as(embeds), embeds.detach())
        return plan, embeds, positions, filled

    def _image_bank(self, plan: _Plan, filled: torch.Tensor):
        """Each sample's image-token embeddings [B, Ni, D], their assembled columns [B, Ni] (-1 = padding)."""
        Ni = max(len(c) for c in plan.images)
        B, _, D = filled.shape
        columns = torch.full((B, Ni), -1, dtype=torch.long, device=filled.device)
        for b in range(B):
            columns[b, :len(plan.images[b])] = plan.image_columns(b)
        bank = torch.gather(filled, 1, columns.clamp(min=0)[..., None].expand(B, Ni, D))
        return bank, columns

    def _loss(self, plan: _Plan, hidden: torch.Tensor, labels, return_logits: bool):
        logits = self.backbone.lm_head(hidden) if return_logits else None
        loss = None
        if labels is not None:
            head = head_for(self.backbone.model)
            loss = head(hidden, _assembled_labels(plan, labels.long()), shift=True)
        return loss, logits

    def _final_pass(self, plan: _Plan, embeds, filled, positions):
        inputs = _assemble_with_grad(plan, embeds, filled)
        out = self._lm(self.backbone.language_model, inputs_embeds=inputs, attention_mask=plan.valid.long(),
                       position_ids=self.backbone.position_ids(positions), use_cache=False)
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


class _Rollout:
    """State of one latent rollout: the image bank, the selection so far, and the cache."""

    def __init__(self, plan: _Plan, filled: torch.Tensor, k: int, bank):
        self.plan, self.filled, self.k = plan, filled, k
        self.bank, self.bank_columns = bank
        self.image_valid = self.bank_columns >= 0
        self.exclude = torch.zeros_like(self.image_valid)
        self.image_index = torch.full_like(self.bank_columns, -1)  # cache columns of the image tokens
        self.scores = torch.zeros(self.bank_columns.shape, dtype=torch.float32, device=filled.device)
        self.selected: List[torch.Tensor] = []
        self.prefix = None
        self.cache = self.key_valid = self.read = None

    def select(self, step: int, hidden: torch.Tensor) -> None:
        """After reading up to latent ``step``: the k best unselected image tokens of every sample that has this
        step go before its latent token, whose input becomes the last row's hidden state (hidden [B, W, D])."""
        B = hidden.shape[0]
        active = [b for b in range(B) if self.plan.counts[b] > step]
        rows = torch.tensor(active, device=hidden.device)
        exclude = self.exclude.index_select(0, rows)
        idx, gathered = select_topk_tokens(self.scores.index_select(0, rows), self.k, exclude=exclude,
                                           valid=self.image_valid.index_select(0, rows),
                                           embeds=self.bank.index_select(0, rows))
        self.exclude[rows] = exclude
        step_selected = torch.full((B, self.k), -1, dtype=torch.long, device=hidden.device)
        step_selected[rows] = idx
        self.selected.append(step_selected)
        for i, b in enumerate(active):
            latent_col = self.plan.latent_column(b, step)
            self.filled[b, latent_col - self.k: latent_col] = gathered[i]
            self.filled[b, latent_col] = hidden[b, -1]


class IVTLR(_IVTLRBase):
    """A Hugging Face Qwen2-VL, Qwen2.5-VL or Chameleon model as an IVT-LR latent reasoner, fast.

    Args:
        vlm: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
            ``ChameleonForConditionalGeneration`` (or a PEFT model around one); loaded from a local checkpoint or
            built from a config.
        latent_token_id: the ``<|latent|>`` token id; each occurrence in ``input_ids`` is one latent step.
        k: image tokens selected per latent step; default 32 (Qwen) or 64 (Chameleon).
        position_mode: "linear" (IVT-LR's 1-D positions on the three M-RoPE rows) or "mrope" (the model's own).

    How it is fast. The prompt up to each sample's first latent token is read once, into a KV cache; every latent
    step then appends only its k image embeddings, its latent token (and any text before the next latent token),
    under no_grad. The rollout's attention (:func:`mmlatent.models.hf.rollout_attention`) adds the last row's
    image-token mass of every layer into one [B, Ni] buffer in the same pass
    (:func:`mmlatent.kernels.attention_with_scores`); one :func:`mmlatent.kernels.select_topk_tokens` per step
    picks the tokens. No attention matrix is ever built. In training, that first read is differentiable and its
    keys and values are kept: the teacher-forced pass then runs only over the rest of the assembled sequence
    (the inserted embeddings onward), and the loss comes from :func:`mmlatent.kernels.linear_cross_entropy` (no
    logits). Loss and gradients are those of one full pass. Samples may differ in where their images and latent
    tokens sit, in their number of image tokens and of latent steps.

    However the model was loaded. Every attention call the wrapper makes that needs no probabilities (the prefix
    read, the loss pass, decoding, the vision tower) runs on a fast implementation: the model's own when it was
    loaded with SDPA, flash-attn or flex attention, SDPA when it was loaded with eager (as IVT-LR's public code
    loads it, for its attention probabilities), see :func:`mmlatent.models.hf.fast_implementation`. The model's
    own calls (``vlm(...)``, ``vlm.generate``) keep the implementation it was loaded with.

    What wrapping changes, and how it is undone. The ``_attn_implementation`` of the language model's config (and
    of an eager vision tower's) becomes mmlatent's registered function over it (``"mmlatent_eager"``,
    ``"mmlatent_sdpa"``, ...), set on the model and not per call because gradient checkpointing recomputes layers
    in the backward with whatever is set then. :meth:`unwrap` restores the exact original values of every config
    at once and returns the model. A wrapper that is garbage-collected without ``unwrap`` restores them too, once
    no other mmlatent wrapper of the same model is alive and no autograd graph of its calls still waits for its
    backward (a checkpointed layer's recompute holds its call's keywords, and with them the wrapper's lease on the
    installation): ``IVTLR(model, latent_id)(**batch).loss.backward()`` with a temporary wrapper leaves the model
    as it was, and cannot switch the implementation between a forward and its recompute. Nothing is stored on the
    model; while wrapped, a wrapper reinstalls at each call if the user set another implementation meanwhile
    (which is then the one restored).
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                return_logits: bool = False) -> IVTLROutput:
        """Loss of the assembled sequence.

        Args:
            input_ids: [B, S] int64 with the processor's image placeholders and ``latent_token_id`` tokens;
                padding where ``attention_mask`` is 0 (left or right).
            attention_mask: [B, S] 0/1.
            labels: [B, S] int64, -100 where no loss (prompt, latent tokens); each labelled token is predicted from
                the position before it in the assembled sequence (inserted embeddings carry no label).
            pixel_values, image_grid_thw: as the model's processor returns them.
            return_logits: also return [B, S_asm, V] logits (materialised only then).

        Returns:
            :class:`IVTLROutput` (loss float32 scalar, mean over labelled tokens).
        """
        plan, embeds, positions, filled = self._prepare(input_ids, attention_mask, labels, pixel_values,
                                                        image_grid_thw)
        if plan.num_steps == 0:
            selected, hidden = [], self._final_pass(plan, embeds, filled, positions)
        else:
            # a checkpointed layer cannot keep a cache with its graph (its forward runs again in the backward), so
            # under gradient checkpointing the prompt is read twice: under no_grad for the rollout, then with grad
            share_prefix = not _checkpointing_layers(self.backbone.language_model)
            rollout = self._rollout(plan, embeds, filled, positions, differentiable_prefix=share_prefix)
            selected = rollout.selected
            hidden = (self._rest_of_sequence(plan, embeds, filled, positions, rollout) if share_prefix
                      else self._final_pass(plan, embeds, filled, positions))
        loss, logits = self._loss(plan, hidden, labels, return_logits)
        return IVTLROutput(loss=loss, logits=logits, selected=selected, inputs_embeds=filled)

    def _rollout(self, plan: _Plan, embeds: torch.Tensor, filled: torch.Tensor, positions: torch.Tensor,
                 differentiable_prefix: bool) -> _Rollout:
        """Reads each sample's prompt up to its first latent token (with grad when ``differentiable_prefix`` and
        grad is enabled), then runs the latent steps under no_grad; fills the inserted embeddings and latent
        states into ``filled``."""
        from transformers import DynamicCache
        B = filled.shape[0]
        lm = self.backbone.language_model
        state = _Rollout(plan, filled, self.k, self._image_bank(plan, filled))
        cache = DynamicCache(config=self.backbone.text_config)
        weight = 1.0 / (self.backbone.num_layers * self.backbone.num_heads)
        starts = [plan.starts[b][0] for b in range(B)]
        width = max(starts)
        # the image tokens sit in the first segment, right-aligned in its storage
        offset = width - torch.tensor(starts, device=filled.device)
        state.image_index = torch.where(state.image_valid, state.bank_columns + offset[:, None], -1)
        key_valid = torch.zeros(B, 0, dtype=torch.bool, device=filled.device)
        with _checkpointing_paused(lm):
            with torch.set_grad_enabled(torch.is_grad_enabled() and differentiable_prefix):
                source = _assemble_with_grad(plan, embeds, filled)
                prefix_hidden, key_valid = self._read(lm, cache, key_valid, source, plan, positions,
                                                      [slice(0, s) for s in starts], width,
                                                      (state.image_index, state.scores.zero_(), weight))
            state.prefix = (prefix_hidden, [(layer.keys, layer.values) for layer in cache.layers], key_valid, starts)
            with torch.no_grad():
                state.select(0, prefix_hidden.detach())
                read = starts
                for step in range(1, plan.num_steps):
                    active = [b for b in range(B) if plan.counts[b] > step]
                    ends = [plan.starts[b][step] if b in active else read[b] for b in range(B)]
                    hidden, key_valid = self._read(lm, cache, key_valid, filled, plan, positions,
                                                   [slice(r, e) for r, e in zip(read, ends)],
                                                   max(e - r for r, e in zip(read, ends)),
                                                   (state.image_index, state.scores.zero_(), weight))
                    state.select(step, hidden)
                    read = ends
        state.cache, state.key_valid, state.read = cache, key_valid, read
        return state

    def _rest_of_sequence(self, plan, embeds, filled, positions, rollout: _Rollout) -> torch.Tensor:
        """The teacher-forced pass over everything after the prompt's first read, on top of that read's keys and
        values; returns the assembled sequence's final hidden states [B, S_asm, D]."""
        from transformers import DynamicCache
        prefix_hidden, prefix_kv, prefix_valid, starts = rollout.prefix
        cache = DynamicCache(config=self.backbone.text_config)
        for layer, (keys, values) in enumerate(prefix_kv):
            cache.update(keys, values, layer)
        source = _assemble_with_grad(plan, embeds, filled)
        width = max(plan.length - s for s in starts)
        hidden, _ = self._read(self.backbone.language_model, cache, prefix_valid, source, plan, positions,
                               [slice(s, plan.length) for s in starts], width)
        prefix_width = prefix_hidden.shape[1]
        return torch.stack([torch.cat([prefix_hidden[b, prefix_width - s:], hidden[b, width - (plan.length - s):]])
                            for b, s in enumerate(starts)])

    def _read(self, lm, cache, key_valid, source, plan, positions, seg, width, scoring=None):
        """Appends one segment per sample (columns ``seg[b]`` of the layout taken from ``source`` [B, S_asm, D],
        left-padded to ``width``) to the cache; returns the segment's final hidden states [B, width, D] and
        key_valid extended by it. With ``scoring`` = (image_index, scores, weight), the rollout attention adds
        the last row's image-token mass into ``scores``."""
        embeds = _left_pad([source[b, s] for b, s in enumerate(seg)], width)
        valid = _left_pad([plan.valid[b, s] for b, s in enumerate(seg)], width, False)
        pos = _left_pad([positions[:, b, s].t() for b, s in enumerate(seg)], width, 1).permute(2, 0, 1)
        key_valid = torch.cat([key_valid, valid], dim=1)
        extra = {} if scoring is None else {"mmlatent_rollout": RolloutScores(key_valid, *scoring)}
        out = self._lm(lm, inputs_embeds=embeds, attention_mask=key_valid.long(),
                       position_ids=self.backbone.position_ids(pos), cache=cache, use_cache=True, **extra)
        return out.last_hidden_state, key_valid

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 eos_token_id=None) -> torch.Tensor:
        """Latent rollout over the (left-padded) prompt, then decoding with the KV cache.

        Returns:
            [B, T] int64 new tokens (T <= max_new_tokens: decoding stops when every row has produced EOS), the
            pad id after each row's EOS.
        """
        from transformers import DynamicCache
        self._check_generate(attention_mask, max_new_tokens, temperature)
        plan, embeds, positions, filled = self._prepare(input_ids, attention_mask, None, pixel_values,
                                                        image_grid_thw)
        B = filled.shape[0]
        if plan.num_steps:
            rollout = self._rollout(plan, embeds, filled, positions, differentiable_prefix=False)
            cache, key_valid, read = rollout.cache, rollout.key_valid, rollout.read
        else:
            cache = DynamicCache(config=self.backbone.text_config)
            key_valid, read = torch.zeros(B, 0, dtype=torch.bool, device=filled.device), [0] * B
        lm = self.backbone.language_model
        hidden, key_valid = self._read(lm, cache, key_valid, filled, plan, positions,
                                       [slice(r, plan.length) for r in read], max(plan.length - r for r in read))
        eos, pad = self._eos_and_pad(eos_token_id)
        return _decode(self, lm, cache, key_valid, positions, hidden[:, -1], max_new_tokens, do_sample,
                       temperature, eos.to(filled.device), pad)


def _checkpointing_layers(module: nn.Module) -> List[nn.Module]:
    """The layers transformers would checkpoint now (gradient checkpointing on, training mode)."""
    if not module.training:
        return []
    return [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]


class _checkpointing_paused:
    """Gradient checkpointing off for a no-grad rollout: it would only drop the KV cache there (transformers
    disables caching in checkpointed layers), and with no graph there is nothing to save."""

    def __init__(self, module: nn.Module):
        self.layers = _checkpointing_layers(module)

    def __enter__(self):
        for layer in self.layers:
            layer.gradient_checkpointing = False

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.gradient_checkpointing = True


def _decode(model: _IVTLRBase, lm, cache, key_valid, positions, last_hidden, max_new_tokens, do_sample,
            temperature, eos, pad, tokens: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """Greedy or sampled decoding with a KV cache, from the hidden state [B, D] of the last token fed (the
    prompt's, or the last of ``tokens`` already generated)."""
    B = last_hidden.shape[0]
    tokens = list(tokens or [])
    finished = torch.zeros(B, dtype=torch.bool, device=last_hidden.device)
    for token in tokens:
        finished |= torch.isin(token, eos)
    logits = model.backbone.lm_head(last_hidden)
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
        logits = model.backbone.lm_head(out.last_hidden_state[:, -1])
    return torch.stack(tokens, dim=1)


class IVTLRReference(_IVTLRBase):
    """IVT-LR as its public code computes it: each latent step recomputes the whole assembled prefix from token 0
    with eager attention and ``output_attentions`` (the [B, H, S, S] probabilities of every layer, of which one
    row is used) and with grad, then one pass over the assembled sequence; the logits of all passes go into one
    ``F.cross_entropy`` (the latent passes' labelled -100, so the loss and gradients are the final pass's, but
    the backward runs through every pass). Same arguments and outputs as :class:`IVTLR`; the oracle of the tests
    and the baseline of the benchmarks.

    The latent passes' attention is eager (it must return probabilities); the loss pass and the vision tower run
    with the model's own implementation (the public code loads the model with eager attention for everything:
    pass such a model to reproduce that). ``unwrap()`` and restoring on garbage collection as :class:`IVTLR`."""

    _fast_attention = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                return_logits: bool = False) -> IVTLROutput:
        plan, embeds, positions, filled = self._prepare(input_ids, attention_mask, labels, pixel_values,
                                                        image_grid_thw)
        selected, pass_logits = self._latent_passes(plan, filled, positions)
        hidden = self._final_pass(plan, embeds, filled, positions)
        logits = self.backbone.lm_head(hidden)
        loss = None
        if labels is not None:
            # as the public code: the logits of every pass go into one cross-entropy, the latent passes' labelled
            # -100; their gradient is zero, but autograd still runs the backward through every latent pass
            targets = _assembled_labels(plan, labels.long())
            flat_logits = torch.cat([p.flatten(0, 1) for p in pass_logits] + [logits[:, :-1].flatten(0, 1)])
            flat_targets = torch.cat([targets.new_full((p.shape[0] * p.shape[1],), -100) for p in pass_logits]
                                     + [targets[:, 1:].flatten()])
            loss = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=-100)
        return IVTLROutput(loss=loss, logits=logits if return_logits else None, selected=selected,
                           inputs_embeds=filled)

    def _latent_passes(self, plan: _Plan, filled: torch.Tensor, positions: torch.Tensor):
        """One pass from token 0 per latent step, with grad as in the public code (which has no no_grad there).
        Returns (selected, each pass's logits [B_active, width, V])."""
        B = filled.shape[0]
        chosen = [torch.zeros(len(plan.images[b]), dtype=torch.bool, device=filled.device) for b in range(B)]
        selected, pass_logits = [], []
        for step in range(plan.num_steps):
            active = [b for b in range(B) if plan.counts[b] > step]
            ends = [plan.starts[b][step] for b in active]
            width = max(ends)
            key_valid = _left_pad([plan.valid[b, :e] for b, e in zip(active, ends)], width, False)
            out = self._lm(
                self.backbone.language_model,
                inputs_embeds=_left_pad([filled[b, :e] for b, e in zip(active, ends)], width),
                attention_mask=key_valid.long(),
                position_ids=self.backbone.position_ids(
                    _left_pad([positions[:, b, :e].t() for b, e in zip(active, ends)], width, 1).permute(2, 0, 1)),
                output_attentions=True, use_cache=False, mmlatent_eager=EagerProbabilities(key_valid))
            pass_logits.append(self.backbone.lm_head(out.last_hidden_state))
            # mean over all layers and all query heads of the last row's attention probabilities
            last_row = torch.stack([a[:, :, -1].float() for a in out.attentions]).mean(dim=(0, 2))  # [B_act, width]
            step_selected = torch.full((B, self.k), -1, dtype=torch.long, device=filled.device)
            for i, (b, end) in enumerate(zip(active, ends)):
                columns = plan.image_columns(b) + (width - end)
                scores = last_row[i, columns].masked_fill(chosen[b], float("-inf"))
                top = scores.topk(self.k).indices.sort().values
                chosen[b][top] = True
                step_selected[b] = top
                latent_col = plan.latent_column(b, step)
                filled[b, latent_col - self.k: latent_col] = filled[b, plan.image_columns(b)[top]]
                filled[b, latent_col] = out.last_hidden_state[i, -1].detach()
            selected.append(step_selected)
        return selected, pass_logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 eos_token_id=None) -> torch.Tensor:
        """As the public code's generate: the latent passes and the full pass of its forward give the first token;
        its decoding loop then reads the assembled prompt and that token again without a cache, and continues with
        the cache."""
        from transformers import DynamicCache
        self._check_generate(attention_mask, max_new_tokens, temperature)
        plan, _, positions, filled = self._prepare(input_ids, attention_mask, None, pixel_values, image_grid_thw)
        lm = self.backbone.language_model
        eos, pad = self._eos_and_pad(eos_token_id)
        eos = eos.to(filled.device)
        self._latent_passes(plan, filled, positions)
        out = self._lm(lm, inputs_embeds=filled, attention_mask=plan.valid.long(),
                       position_ids=self.backbone.position_ids(positions), use_cache=False)
        first = self._pick(self.backbone.lm_head(out.last_hidden_state[:, -1]), do_sample, temperature)
        if max_new_tokens == 1 or bool(torch.isin(first, eos).all()):
            return first[:, None]
        # the public code's decoding loop starts without a cache: it reads the assembled prompt and the first
        # token again, and caches from there
        cache = DynamicCache(config=self.backbone.text_config)
        key_valid = torch.cat([plan.valid, torch.ones_like(plan.valid[:, :1])], dim=1)
        out = self._lm(lm, inputs_embeds=torch.cat([filled, self.backbone.embed_tokens(first[:, None])], dim=1),
                       attention_mask=key_valid.long(),
                       position_ids=self.backbone.position_ids(
                           torch.cat([positions, self._decode_positions(positions, 0)], dim=2)),
                       cache=cache, use_cache=True)
        return _decode(self, lm, cache, key_valid, positions, out.last_hidden_state[:, -1], max_new_tokens,
                       do_sample, temperature, eos, pad, tokens=[first])


def ivtlr_reference(vlm: nn.Module, latent_token_id: int, *, k: Optional[int] = None,
                    position_mode: str = "linear") -> IVTLRReference:
    """IVT-LR exactly as its public code computes it (see :class:`IVTLRReference`), around the same ``vlm``."""
    return IVTLRReference(vlm, latent_token_id, k=k, position_mode=position_mode)


__all__ = ["IVTLR", "IVTLROutput", "IVTLRReference", "ivtlr_reference", "POSITION_MODES"]
