"""IVT-LR exactly as its public code computes it: the oracle of the tests and the baseline of the benchmarks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import EagerProbabilities
from .base import IVTLRBase, IVTLROutput
from .layout import PreparedInputs, assembled_labels, left_pad

if TYPE_CHECKING:
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList


class IVTLRReference(IVTLRBase):
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
        inputs = self._prepare(input_ids, attention_mask, labels, pixel_values, image_grid_thw)
        plan = inputs.plan
        selected, pass_logits = self._latent_passes(inputs)
        hidden = self._final_pass(inputs)
        logits = self.backbone.logits(hidden)
        loss = None
        if labels is not None:
            # as the public code: the logits of every pass go into one cross-entropy, the latent passes' labelled
            # -100; their gradient is zero, but autograd still runs the backward through every latent pass
            targets = assembled_labels(plan, labels.long())
            flat_logits = torch.cat([p.flatten(0, 1) for p in pass_logits] + [logits[:, :-1].flatten(0, 1)])
            flat_targets = torch.cat([targets.new_full((p.shape[0] * p.shape[1],), -100) for p in pass_logits]
                                     + [targets[:, 1:].flatten()])
            loss = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=-100)
        return IVTLROutput(loss=loss, logits=logits if return_logits else None, selected=selected,
                           inputs_embeds=inputs.filled)

    def _latent_passes(self, inputs: PreparedInputs):
        """One pass from token 0 per latent step, with grad as in the public code (which has no no_grad there).
        Returns (selected, each pass's logits [B_active, width, V])."""
        plan, filled, positions = inputs.plan, inputs.filled, inputs.positions
        B = filled.shape[0]
        chosen = [torch.zeros(len(plan.images[b]), dtype=torch.bool, device=filled.device) for b in range(B)]
        selected, pass_logits = [], []
        for step in range(plan.num_steps):
            active = [b for b in range(B) if plan.counts[b] > step]
            ends = [plan.starts[b][step] for b in active]
            width = max(ends)
            key_valid = left_pad([plan.valid[b, :e] for b, e in zip(active, ends)], width, False)
            out = self._lm(
                self.backbone.language_model,
                inputs_embeds=left_pad([filled[b, :e] for b, e in zip(active, ends)], width),
                attention_mask=key_valid.long(),
                position_ids=self.backbone.position_ids(
                    left_pad([positions[:, b, :e].t() for b, e in zip(active, ends)], width, 1).permute(2, 0, 1)),
                output_attentions=True, use_cache=False, mmlatent_eager=EagerProbabilities(key_valid))
            pass_logits.append(self.backbone.logits(out.last_hidden_state))
            # mean over all layers and all query heads of the last row's attention probabilities
            last_row = torch.stack([a[:, :, -1].float() for a in out.attentions]).mean(dim=(0, 2))  # [B_act, width]
            step_selected = torch.full((B, plan.k), -1, dtype=torch.long, device=filled.device)
            for i, (b, end) in enumerate(zip(active, ends)):
                columns = plan.image_columns(b) + (width - end)
                scores = last_row[i, columns].masked_fill(chosen[b], float("-inf"))
                top = scores.topk(plan.k).indices.sort().values
                chosen[b][top] = True
                step_selected[b] = top
                latent_col = plan.latent_column(b, step)
                filled[b, latent_col - plan.k: latent_col] = filled[b, plan.image_columns(b)[top]]
                filled[b, latent_col] = out.last_hidden_state[i, -1].detach()
            selected.append(step_selected)
        return selected, pass_logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                 generation_config: Optional[GenerationConfig] = None, *,
                 logits_processor: Optional[LogitsProcessorList] = None,
                 stopping_criteria: Optional[StoppingCriteriaList] = None, tokenizer: Optional[Any] = None,
                 **options: Any) -> torch.Tensor:
        """As the public code's generate: the latent passes and the full pass of its forward give the first token;
        its decoding loop then reads the assembled prompt and that token again without a cache, and continues with
        the cache. Same arguments, options and result as :meth:`IVTLR.generate`."""
        from transformers import DynamicCache
        inputs, history, decoding = self._start_generation(input_ids, attention_mask, pixel_values, image_grid_thw,
                                                           generation_config, options, tokenizer, logits_processor,
                                                           stopping_criteria)
        plan, positions, filled = inputs.plan, inputs.positions, inputs.filled
        lm = self.backbone.language_model
        self._latent_passes(inputs)
        out = self._lm(lm, inputs_embeds=filled, attention_mask=plan.valid.long(),
                       position_ids=self.backbone.position_ids(positions), use_cache=False)
        cached = {}

        def feed(token: torch.Tensor, step: int) -> torch.Tensor:
            if step:
                return cached["feed"](token, step)
            # the public code's decoding loop starts without a cache: it reads the assembled prompt and the first
            # token again, and caches from there
            cache = DynamicCache(config=self.backbone.text_config)
            key_valid = torch.cat([plan.valid, torch.ones_like(plan.valid[:, :1])], dim=1)
            again = self._lm(lm, inputs_embeds=torch.cat([filled, self.backbone.embed_tokens(token[:, None])], dim=1),
                             attention_mask=key_valid.long(),
                             position_ids=self.backbone.position_ids(
                                 torch.cat([positions, self._decode_positions(positions, 0)], dim=2)),
                             cache=cache, use_cache=True)
            cached["feed"] = self._cached_feed(lm, cache, key_valid, positions)
            return self.backbone.logits(again.last_hidden_state[:, -1])

        return decoding.run(history, self.backbone.logits(out.last_hidden_state[:, -1]), feed)


def ivtlr_reference(vlm: nn.Module, latent_token_id: int, *, k: Optional[int] = None,
                    position_mode: str = "linear") -> IVTLRReference:
    """IVT-LR exactly as its public code computes it (see :class:`IVTLRReference`), around the same ``vlm``."""
    return IVTLRReference(vlm, latent_token_id, k=k, position_mode=position_mode)


__all__ = ["IVTLRReference", "ivtlr_reference"]
