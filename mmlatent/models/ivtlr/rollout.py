"""IVT-LR, fast: the latent rollout over a KV cache under no_grad, fused attention mass and top-k selection, one
teacher-forced pass over what the prompt's first read did not cover, the memory-lean loss."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch

from mmlatent.kernels import select_image_tokens, select_topk_tokens

from ..attention import RolloutScores
from .base import IVTLRBase, IVTLROutput, checkpointing_layers, checkpointing_paused
from .layout import PreparedInputs, assemble_with_grad, left_pad

if TYPE_CHECKING:
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList


SELECTIONS = ("auto", "in_attention", "deferred")
# Where selection="auto" takes each latent step's image-token mass from the KV cache after the step's read, every
# layer at once with select_image_tokens, instead of adding it up inside each layer's attention call: on CPU, where
# the attention call itself runs SDPA and then the row mass per layer, the one call is 1.39x the per-layer row mass
# plus the selection over 28 layers at N2048 (8.40 against 11.70 ms, benches/results/cpu-2core/
# kernels-select-image-tokens.md). On a GPU the mass comes out of the attention pass itself (Triton), so it stays.
DEFERRED_SELECTION_DEVICES = ("cpu",)


def defers_selection(selection: str, device: torch.device) -> bool:
    """Whether a rollout on ``device`` takes its masses with select_image_tokens after each step's read."""
    return selection == "deferred" or (selection == "auto" and device.type in DEFERRED_SELECTION_DEVICES)


class _Rollout:
    """State of one latent rollout: the image bank, the selection so far, and the cache."""

    def __init__(self, inputs: PreparedInputs, bank, deferred: bool):
        self.plan, self.filled, self.k = inputs.plan, inputs.filled, inputs.plan.k
        self.bank, self.bank_columns = bank
        self.image_valid = self.bank_columns >= 0
        self.exclude = torch.zeros_like(self.image_valid)
        self.image_index = torch.full_like(self.bank_columns, -1)  # cache columns of the image tokens
        self.scores = torch.zeros(self.bank_columns.shape, dtype=torch.float32, device=self.filled.device)
        self.selected: List[torch.Tensor] = []
        self.prefix = None
        self.cache = self.key_valid = self.read = None
        # each layer's (last query row, key cache, scale) of the step just read, when the selection is deferred
        self.deferred: Optional[list] = [] if deferred else None
        self.weight = 0.0
        self.key_valid_now: Optional[torch.Tensor] = None  # key_valid after the step just read

    def scoring(self, weight: float) -> Tuple[torch.Tensor, torch.Tensor, float, Optional[list]]:
        """RolloutScores' fields (after key_valid) for the next read: its attention calls add their mass into
        ``scores``, or hand their rows over."""
        self.weight = weight
        if self.deferred is not None:
            self.deferred.clear()
        return self.image_index, self.scores.zero_(), weight, self.deferred

    def _ranked(self, rows: torch.Tensor, exclude: torch.Tensor):
        valid, bank = self.image_valid.index_select(0, rows), self.bank.index_select(0, rows)
        if self.deferred is None:
            return select_topk_tokens(self.scores.index_select(0, rows), self.k, exclude=exclude, valid=valid,
                                      embeds=bank)
        everyone = rows.numel() == self.filled.shape[0]  # then no row of any layer's cache is copied
        q = [layer_q if everyone else layer_q.index_select(0, rows) for layer_q, _, _ in self.deferred]
        k = [layer_k if everyone else layer_k.index_select(0, rows) for _, layer_k, _ in self.deferred]
        key_valid = self.key_valid_now if everyone else self.key_valid_now.index_select(0, rows)
        scale = self.deferred[0][2]
        idx, gathered = select_image_tokens(q, k, self.image_index.index_select(0, rows), self.k,
                                            key_valid=key_valid, exclude=exclude, valid=valid, embeds=bank,
                                            scale=scale, layer_weights=[self.weight] * len(q))
        self.deferred.clear()  # the caches of this step: not kept past the selection
        return idx, gathered

    def select(self, step: int, hidden: torch.Tensor) -> None:
        """After reading up to latent ``step``: the k best unselected image tokens of every sample that has this
        step go before its latent token, whose input becomes the last row's hidden state (hidden [B, W, D])."""
        B = hidden.shape[0]
        active = [b for b in range(B) if self.plan.counts[b] > step]
        rows = self.plan.active_rows[step]  # planned with the layout: no host-to-device copy per step
        exclude = self.exclude.index_select(0, rows)
        idx, gathered = self._ranked(rows, exclude)
        self.exclude[rows] = exclude
        step_selected = torch.full((B, self.k), -1, dtype=torch.long, device=hidden.device)
        step_selected[rows] = idx
        self.selected.append(step_selected)
        for i, b in enumerate(active):
            latent_col = self.plan.latent_column(b, step)
            self.filled[b, latent_col - self.k: latent_col] = gathered[i]
            self.filled[b, latent_col] = hidden[b, -1]


class IVTLR(IVTLRBase):
    """A Hugging Face Qwen2-VL, Qwen2.5-VL or Chameleon model as an IVT-LR latent reasoner, fast.

    Args:
        vlm: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
            ``ChameleonForConditionalGeneration`` (or a PEFT model around one); loaded from a local checkpoint or
            built from a config.
        latent_token_id: the ``<|latent|>`` token id; each occurrence in ``input_ids`` is one latent step.
        k: image tokens selected per latent step; default 32 (Qwen) or 64 (Chameleon).
        position_mode: "linear" (IVT-LR's 1-D positions on the three M-RoPE rows) or "mrope" (the model's own).
        selection: where each latent step's image-token mass comes from: "in_attention" (every layer's attention
            call adds it up in the same pass), "deferred" (one select_image_tokens over every layer's cache after
            the step's read) or "auto" (deferred on CPU, in attention on a GPU: ``DEFERRED_SELECTION_DEVICES``).
            The same tokens either way.

    How it is fast. The prompt up to each sample's first latent token is read once, into a KV cache; every latent
    step then appends only its k image embeddings, its latent token (and any text before the next latent token),
    under no_grad. On a GPU the rollout's attention (:func:`mmlatent.models.attention.mmlatent_attention`) adds the
    last row's image-token mass of every layer into one [B, Ni] buffer in the same pass
    (:func:`mmlatent.kernels.attention_with_scores`), and one :func:`mmlatent.kernels.select_topk_tokens` per step
    picks the tokens; on CPU one :func:`mmlatent.kernels.select_image_tokens` per step takes every layer's mass
    from the cache and picks them (``selection``). No attention matrix is ever built. In
    training, that first read is differentiable and its keys and values are kept: the teacher-forced pass then
    runs only over the rest of the assembled sequence (the inserted embeddings onward), and the loss comes from
    :func:`mmlatent.kernels.linear_cross_entropy` (no logits). Loss and gradients are those of one full
    pass. Samples may differ in where their images and latent tokens sit, in their number of image tokens and of
    latent steps.

    However the model was loaded. Every attention call the wrapper makes that needs no probabilities (the prefix
    read, the loss pass, decoding, the vision tower) runs on a fast implementation: the model's own when it was
    loaded with SDPA, flash-attn or flex attention, SDPA when it was loaded with eager (as IVT-LR's public code
    loads it, for its attention probabilities), see :func:`mmlatent.models.attention.fast_implementation`. The model's
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

    def __init__(self, vlm: torch.nn.Module, latent_token_id: int, *, k: Optional[int] = None,
                 position_mode: str = "linear", selection: str = "auto") -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {', '.join(map(repr, SELECTIONS))}, got {selection!r}")
        super().__init__(vlm, latent_token_id, k=k, position_mode=position_mode)  # checked first: untouched
        self.selection = selection

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
        inputs = self._prepare(input_ids, attention_mask, labels, pixel_values, image_grid_thw)
        if inputs.plan.num_steps == 0:
            selected, hidden = [], self._final_pass(inputs)
        else:
            # a checkpointed layer cannot keep a cache with its graph (its forward runs again in the backward), so
            # under gradient checkpointing the prompt is read twice: under no_grad for the rollout, then with grad
            share_prefix = not checkpointing_layers(self.backbone.language_model)
            rollout = self._rollout(inputs, differentiable_prefix=share_prefix)
            selected = rollout.selected
            hidden = self._rest_of_sequence(inputs, rollout) if share_prefix else self._final_pass(inputs)
        loss, logits = self._loss(inputs.plan, hidden, labels, return_logits)
        return IVTLROutput(loss=loss, logits=logits, selected=selected, inputs_embeds=inputs.filled)

    def _rollout(self, inputs: PreparedInputs, differentiable_prefix: bool) -> _Rollout:
        """Reads each sample's prompt up to its first latent token (with grad when ``differentiable_prefix`` and
        grad is enabled), then runs the latent steps under no_grad; fills the inserted embeddings and latent
        states into ``filled``."""
        from transformers import DynamicCache
        plan, filled, positions = inputs.plan, inputs.filled, inputs.positions
        B = filled.shape[0]
        lm = self.backbone.language_model
        state = _Rollout(inputs, self._image_bank(plan, filled), defers_selection(self.selection, filled.device))
        cache = DynamicCache(config=self.backbone.text_config)
        weight = 1.0 / (self.backbone.num_layers * self.backbone.num_heads)
        starts = [plan.starts[b][0] for b in range(B)]
        width = max(starts)
        # the image tokens sit in the first segment, right-aligned in its storage
        offset = width - torch.tensor(starts, device=filled.device)
        state.image_index = torch.where(state.image_valid, state.bank_columns + offset[:, None], -1)
        key_valid = torch.zeros(B, 0, dtype=torch.bool, device=filled.device)
        with checkpointing_paused(lm):
            with torch.set_grad_enabled(torch.is_grad_enabled() and differentiable_prefix):
                source = assemble_with_grad(inputs)
                prefix_hidden, key_valid = self._read(lm, cache, key_valid, source, plan, positions,
                                                      [slice(0, s) for s in starts], width, state.scoring(weight))
            state.prefix = (prefix_hidden, [(layer.keys, layer.values) for layer in cache.layers], key_valid, starts)
            with torch.no_grad():
                state.key_valid_now = key_valid
                state.select(0, prefix_hidden.detach())
                read = starts
                for step in range(1, plan.num_steps):
                    active = [b for b in range(B) if plan.counts[b] > step]
                    ends = [plan.starts[b][step] if b in active else read[b] for b in range(B)]
                    hidden, key_valid = self._read(lm, cache, key_valid, filled, plan, positions,
                                                   [slice(r, e) for r, e in zip(read, ends)],
                                                   max(e - r for r, e in zip(read, ends)), state.scoring(weight))
                    state.key_valid_now = key_valid
                    state.select(step, hidden)
                    read = ends
        state.cache, state.key_valid, state.read = cache, key_valid, read
        return state

    def _rest_of_sequence(self, inputs: PreparedInputs, rollout: _Rollout) -> torch.Tensor:
        """The teacher-forced pass over everything after the prompt's first read, on top of that read's keys and
        values; returns the assembled sequence's final hidden states [B, S_asm, D]."""
        from transformers import DynamicCache
        plan = inputs.plan
        prefix_hidden, prefix_kv, prefix_valid, starts = rollout.prefix
        cache = DynamicCache(config=self.backbone.text_config)
        for layer, (keys, values) in enumerate(prefix_kv):
            cache.update(keys, values, layer)
        source = assemble_with_grad(inputs)
        width = max(plan.length - s for s in starts)
        hidden, _ = self._read(self.backbone.language_model, cache, prefix_valid, source, plan, inputs.positions,
                               [slice(s, plan.length) for s in starts], width)
        prefix_width = prefix_hidden.shape[1]
        return torch.stack([torch.cat([prefix_hidden[b, prefix_width - s:], hidden[b, width - (plan.length - s):]])
                            for b, s in enumerate(starts)])

    def _read(self, lm, cache, key_valid, source, plan, positions, seg, width, scoring=None):
        """Appends one segment per sample (columns ``seg[b]`` of the layout taken from ``source`` [B, S_asm, D],
        left-padded to ``width``) to the cache; returns the segment's final hidden states [B, width, D] and
        key_valid extended by it. With ``scoring`` = (image_index, scores, weight, deferred), the
        rollout attention adds the last row's image-token mass into ``scores``, or appends its rows to ``deferred``
        (:class:`mmlatent.models.attention.RolloutScores`)."""
        embeds = left_pad([source[b, s] for b, s in enumerate(seg)], width)
        valid = left_pad([plan.valid[b, s] for b, s in enumerate(seg)], width, False)
        pos = left_pad([positions[:, b, s].t() for b, s in enumerate(seg)], width, 1).permute(2, 0, 1)
        key_valid = torch.cat([key_valid, valid], dim=1)
        extra = {} if scoring is None else {"mmlatent_rollout": RolloutScores(key_valid, *scoring)}
        out = self._lm(lm, inputs_embeds=embeds, attention_mask=key_valid.long(),
                       position_ids=self.backbone.position_ids(pos), cache=cache, use_cache=True, **extra)
        return out.last_hidden_state, key_valid

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                 generation_config: Optional[GenerationConfig] = None, *,
                 logits_processor: Optional[LogitsProcessorList] = None,
                 stopping_criteria: Optional[StoppingCriteriaList] = None, tokenizer: Optional[Any] = None,
                 **options: Any) -> torch.Tensor:
        """Latent rollout over the (left-padded) prompt, then decoding with the KV cache, with Hugging Face
        ``generate``'s options and semantics (:mod:`mmlatent.models.ivtlr.generation`).

        Args:
            input_ids: [B, S] int64, left-padded, with the image placeholders and latent tokens.
            attention_mask: [B, S] 0/1, the last column 1 in every row.
            pixel_values, image_grid_thw: as the model's processor returns them.
            generation_config: a ``transformers.GenerationConfig``; merged as transformers merges it (its unset
                values from the model's ``generation_config``, then transformers' defaults: greedy, 20 new tokens).
            logits_processor, stopping_criteria: a ``LogitsProcessorList`` / ``StoppingCriteriaList`` added to
                the ones built from the config (one of the same type replaces the built one), as in transformers.
            tokenizer: the tokenizer ``stop_strings`` are matched with (a transformers tokenizer, or an mmlatent
                ``WordTokenizer`` / ``HFTokenizer``).
            **options: GenerationConfig options over everything else: max_new_tokens, max_length, min_new_tokens,
                min_length, max_time, stop_strings, do_sample, temperature, top_k, top_p, min_p, typical_p,
                epsilon_cutoff, eta_cutoff, repetition_penalty, no_repeat_ngram_size, bad_words_ids,
                suppress_tokens, begin_suppress_tokens, remove_invalid_values, renormalize_logits, eos_token_id (an
                int or a list), pad_token_id. An unknown keyword is a TypeError naming it; beam search, assisted
                decoding and the other modes are refused with a ValueError naming the option.

        Returns:
            [B, T] int64 new tokens (T <= max_new_tokens: decoding stops when every row has stopped), the pad id
            after each row's end.
        """
        from transformers import DynamicCache
        inputs, history, decoding = self._start_generation(input_ids, attention_mask, pixel_values, image_grid_thw,
                                                           generation_config, options, tokenizer, logits_processor,
                                                           stopping_criteria)
        plan, positions, filled = inputs.plan, inputs.positions, inputs.filled
        B = filled.shape[0]
        if plan.num_steps:
            rollout = self._rollout(inputs, differentiable_prefix=False)
            cache, key_valid, read = rollout.cache, rollout.key_valid, rollout.read
        else:
            cache = DynamicCache(config=self.backbone.text_config)
            key_valid, read = torch.zeros(B, 0, dtype=torch.bool, device=filled.device), [0] * B
        lm = self.backbone.language_model
        hidden, key_valid = self._read(lm, cache, key_valid, filled, plan, positions,
                                       [slice(r, plan.length) for r in read], max(plan.length - r for r in read))
        return decoding.run(history, self.backbone.logits(hidden[:, -1]),
                            self._cached_feed(lm, cache, key_valid, positions))


__all__ = ["IVTLR"]
