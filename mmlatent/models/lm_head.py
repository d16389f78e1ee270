"""Language-model heads that give the loss (or token log-probabilities) straight from hidden states.

:class:`LinearCrossEntropyHead` wraps an existing ``lm_head`` (an ``nn.Linear``; its parameters are shared, not
copied) and computes the cross-entropy through :func:`mmlatent.kernels.linear_cross_entropy`, so the [tokens,
vocab] logits are never materialised. :func:`causal_lm_loss` does the same for a whole Hugging Face causal LM (or
vision-language model): the backbone's last hidden state, then the head's loss with the labels shifted exactly as
transformers shifts them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from mmlatent.kernels import linear_cross_entropy, linear_log_probs


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets as transformers' ``ForCausalLMLoss`` builds them: position i is scored on labels[i + 1];
    the last position of every row gets ``ignore_index``. labels [..., L] int -> [..., L] int."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


class LinearCrossEntropyHead(nn.Module):
    """Drop-in for a model's ``lm_head`` that can return the loss without the logits.

    Args:
        lm_head: the model's ``nn.Linear(hidden, vocab)``; its weight (and bias) are used in place, so tied
            embeddings, LoRA-frozen heads and optimizers see the same parameters.
        ignore_index, label_smoothing, logit_softcap, chunk_rows: as in
            :func:`mmlatent.kernels.linear_cross_entropy`.

    ``head(hidden)`` returns the logits exactly as the wrapped ``lm_head`` would (so the module can replace
    ``model.lm_head`` without changing the model's outputs); ``head(hidden, labels)`` returns the loss instead.
    """

    def __init__(self, lm_head: nn.Linear, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                 logit_softcap: Optional[float] = None, chunk_rows: Optional[int] = None):
        super().__init__()
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"lm_head: expected an nn.Linear, got {type(lm_head).__name__}")
        self.lm_head = lm_head
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.logit_softcap = logit_softcap
        self.chunk_rows = chunk_rows

    @property
    def weight(self) -> torch.Tensor:
        return self.lm_head.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.lm_head.bias

    def forward(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None, *, shift: bool = False,
                reduction: str = "mean", num_items_in_batch: Optional[Union[int, torch.Tensor]] = None
                ) -> torch.Tensor:
        """Logits, or the loss when ``labels`` are given.

        Args:
            hidden: [..., H] hidden states (any float dtype the head accepts).
            labels: [...] int64 targets aligned with ``hidden`` (ignore_index to skip), or None for logits.
            shift: the labels are the input ids (transformers' convention): score position i on labels[i + 1].
            reduction: "mean" over non-ignored tokens, "sum", or "none" (float32 [...], 0 at ignored tokens).
            num_items_in_batch: transformers' gradient-accumulation normaliser: the summed loss divided by it.

        Returns:
            logits [..., V] (no labels; softcapped as the model would, when ``logit_softcap`` is set), else the
            float32 loss.
        """
        if labels is None:
            logits = self.lm_head(hidden)
            if self.logit_softcap is not None:
                logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
            return logits
        if hidden.shape[:-1] != labels.shape:
            raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
                             f"got {tuple(labels.shape)}")
        if shift:
            labels = next_token_labels(labels, self.ignore_index)
        if num_items_in_batch is not None:
            if reduction != "mean":
                raise ValueError("num_items_in_batch: replaces the 'mean' reduction; leave reduction='mean'")
            reduction = "sum"
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, labels.reshape(-1),
                                    bias=self.lm_head.bias, ignore_index=self.ignore_index, reduction=reduction,
                                    label_smoothing=self.label_smoothing, logit_softcap=self.logit_softcap,
                                    chunk_rows=self.chunk_rows)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            return loss / num_items_in_batch
        return loss.view(labels.shape) if reduction == "none" else loss

    def log_probs(self, hidden: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """log p(tokens) [...] float32 under softmax(logits / temperature), from hidden [..., H] and tokens [...]
        int64, without the logits (GRPO and other policy-gradient losses). The softcap is not applied here."""
        if self.logit_softcap is not None:
            raise ValueError("log_probs: logit_softcap is set, and linear_log_probs has no soft-capping; build the "
                             "head without it for policy-gradient log-probabilities")
        if hidden.shape[:-1] != tokens.shape:
            raise ValueError(f"tokens: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
                             f"got {tuple(tokens.shape)}")
        logp = linear_log_probs(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, tokens.reshape(-1),
                                bias=self.lm_head.bias, temperature=temperature, chunk_rows=self.chunk_rows)
        return logp.view(tokens.shape)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"logit_softcap={self.logit_softcap}, chunk_rows={self.chunk_rows}")


@dataclass
class CausalLMLoss:
    """What :func:`causal_lm_loss` returns: the loss and the backbone's outputs (hidden states, cache, ...)."""

    loss: torch.Tensor
    hidden_states: torch.Tensor
    backbone_outputs: Any


def _text_config(config):
    return getattr(config, "text_config", None) or config


def head_for(model: nn.Module, *, ignore_index: int = -100, chunk_rows: Optional[int] = None
             ) -> LinearCrossEntropyHead:
    """A :class:`LinearCrossEntropyHead` over ``model.get_output_embeddings()``, with the model's final logit
    soft-capping (``config.final_logit_softcapping``, as in Gemma 2) when it has one."""
    lm_head = model.get_output_embeddings()
    if isinstance(lm_head, LinearCrossEntropyHead):
        return lm_head
    if not isinstance(lm_head, nn.Linear):
        raise TypeError(f"model: expected get_output_embeddings() to be an nn.Linear, got {type(lm_head).__name__}")
    text_config = _text_config(model.config)
    scale = getattr(text_config, "logit_scale", None)
    if scale not in (None, 1, 1.0):
        raise ValueError(f"model: its logits are scaled by config.logit_scale = {scale}, which this head does not "
                         f"apply")
    return LinearCrossEntropyHead(lm_head, ignore_index=ignore_index, chunk_rows=chunk_rows,
                                  logit_softcap=getattr(text_config, "final_logit_softcapping", None))


def causal_lm_loss(model: nn.Module, labels: Optional[torch.Tensor] = None, *,
                   num_items_in_batch: Optional[Union[int, torch.Tensor]] = None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None, chunk_rows: Optional[int] = None,
                   **model_inputs) -> CausalLMLoss:
    """The loss ``model(**model_inputs, labels=labels).loss`` of a Hugging Face causal LM or VLM, without logits.

    Runs the backbone (``model.model``: the decoder of a ``*ForCausalLM``, or the vision + language model of a
    ``*ForConditionalGeneration``) for its last hidden state [B, L, H], then the cross-entropy of the output
    embeddings against ``labels`` [B, L] shifted as transformers' ``ForCausalLMLoss`` shifts them (or against
    ``shift_labels`` [B, L], already shifted). ``num_items_in_batch`` switches to transformers' summed loss
    divided by that count (gradient accumulation). Extra keyword arguments go to the backbone (input_ids,
    attention_mask, pixel_values, image_grid_thw, ...).
    """
    backbone = getattr(model, "model", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"model: expected a transformers model with a .model backbone, got {type(model).__name__}")
    if (labels is None) == (shift_labels is None):
        raise ValueError("labels and shift_labels: give exactly one")
    outputs = backbone(**model_inputs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    head = head_for(model, ignore_index=ignore_index, chunk_rows=chunk_rows)
    targets = shift_labels if shift_labels is not None else next_token_labels(labels, ignore_index)
    loss = head(hidden, targets.to(hidden.device), num_items_in_batch=num_items_in_batch)
    return CausalLMLoss(loss=loss, hidden_states=hidden, backbone_outputs=outputs)
