"""Language-model heads that give the loss (or token log-probabilities) straight from hidden states.

:class:`LinearCrossEntropyHead` wraps an existing ``lm_head`` (an ``nn.Linear``; its parameters are shared, not
copied) and computes the cross-entropy through :func:`mmlatent.kernels.linear_cross_entropy`, so the [tokens,
vocab] logits are never materialised. :func:`causal_lm_loss` does the same for a whole Hugging Face causal LM (or
vision-language model): the backbone's last hidden state, then the head's loss with the labels shifted exactly as
transformers shifts them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mmlatent.kernels import linear_cross_entropy, linear_log_probs

from .unwrap import unwrap_peft


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets as transformers' ``ForCausalLMLoss`` builds them: position i is scored on labels[i + 1];
    the last position of every row gets ``ignore_index``. labels [..., L] int -> [..., L] int."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


SUPPRESSED_LOGIT = -1e30


def _check_token_ids(ids: Optional[Sequence[int]], vocab: int) -> Optional[Tuple[int, ...]]:
    if ids is None:
        return None
    try:
        ids = tuple(sorted({int(i) for i in ids}))
    except (TypeError, ValueError):
        raise TypeError(f"suppressed_token_ids: expected a sequence of ints, got {ids!r}") from None
    if ids and not (0 <= ids[0] and ids[-1] < vocab):
        raise ValueError(f"suppressed_token_ids: expected ids in [0, {vocab}) (the vocabulary), got "
                         f"{ids[0]}..{ids[-1]}")
    return ids or None


class LinearCrossEntropyHead(nn.Module):
    """Drop-in for a model's ``lm_head`` that can return the loss without the logits.

    Args:
        lm_head: the model's ``nn.Linear(hidden, vocab)`` (or another LinearCrossEntropyHead); its weight (and bias)
            are registered here as they are, not copied, so tied embeddings, LoRA-frozen heads and optimizers see
            the same parameters, and the module's state dict has the ``nn.Linear``'s keys (``weight``, ``bias``):
            installed as ``model.lm_head`` it saves and loads as ``lm_head.weight``, like the layer it replaced.
        ignore_index, label_smoothing, logit_softcap, chunk_rows: as in
            :func:`mmlatent.kernels.linear_cross_entropy`.
        suppressed_token_ids: vocabulary ids whose logits the model sets to the dtype's minimum before its loss
            (Chameleon's image codes); the loss excludes them from the softmax the same way.

    ``head(hidden)`` returns the logits exactly as the wrapped ``lm_head`` would (no soft-capping or suppression:
    a model applies those after its ``lm_head``, so the module can replace ``model.lm_head`` without changing the
    model's outputs); ``head(hidden, labels)`` returns the loss instead, with them.
    """

    def __init__(self, lm_head: nn.Module, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                 logit_softcap: Optional[float] = None, chunk_rows: Optional[int] = None,
                 suppressed_token_ids: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if not isinstance(lm_head, (nn.Linear, LinearCrossEntropyHead)):
            raise TypeError(f"lm_head: expected an nn.Linear, got {type(lm_head).__name__}")
        self.in_features, self.out_features = lm_head.weight.shape[1], lm_head.weight.shape[0]
        self.weight = lm_head.weight
        if lm_head.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = lm_head.bias
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.logit_softcap = logit_softcap
        self.chunk_rows = chunk_rows
        self.suppressed_token_ids = _check_token_ids(suppressed_token_ids, self.out_features)
        if self.suppressed_token_ids is not None and logit_softcap is not None:
            raise ValueError("suppressed_token_ids: not with logit_softcap (a capped logit cannot be suppressed by "
                             "an additive bias); no supported model has both")

    def _loss_bias(self) -> Optional[torch.Tensor]:
        """The output bias plus the suppression (the dtype's minimum at the suppressed ids), [V] or None."""
        if self.suppressed_token_ids is None:
            return self.bias
        mask = torch.zeros(self.out_features, dtype=self.weight.dtype, device=self.weight.device)
        # not the dtype's minimum, as the model writes it: the loss kernels add logits up over the vocabulary, and
        # V of those overflow to -inf (then 0 * -inf). Any value this low gives exp() = 0 all the same.
        mask[list(self.suppressed_token_ids)] = max(torch.finfo(self.weight.dtype).min, SUPPRESSED_LOGIT)
        return mask if self.bias is None else self.bias + mask

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
            logits [..., V] in hidden's dtype (no labels; the raw output layer), else the float32 loss.
        """
        if labels is None:
            return nn.functional.linear(hidden, self.weight, self.bias)
        if hidden.shape[:-1] != labels.shape:
            raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
                             f"got {tuple(labels.shape)}")
        if shift:
            labels = next_token_labels(labels, self.ignore_index)
        if num_items_in_batch is not None:
            if reduction != "mean":
                raise ValueError("num_items_in_batch: replaces the 'mean' reduction; leave reduction='mean'")
            reduction = "sum"
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight, labels.reshape(-1),
                                    bias=self._loss_bias(), ignore_index=self.ignore_index, reduction=reduction,
                                    label_smoothing=self.label_smoothing, logit_softcap=self.logit_softcap,
                                    chunk_rows=self.chunk_rows)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            return loss / num_items_in_batch
        return loss.view(labels.shape) if reduction == "none" else loss

    def log_probs(self, hidden: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """log p(tokens) [...] float32 under softmax(logits / temperature), from hidden [..., H] and tokens [...]
        int64, without the logits (GRPO and other policy-gradient losses). Suppressed ids get probability 0; the
        softcap is not applied here."""
        if self.logit_softcap is not None:
            raise ValueError("log_probs: logit_softcap is set, and linear_log_probs has no soft-capping; build the "
                             "head without it for policy-gradient log-probabilities")
        if hidden.shape[:-1] != tokens.shape:
            raise ValueError(f"tokens: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
                             f"got {tuple(tokens.shape)}")
        logp = linear_log_probs(hidden.reshape(-1, hidden.shape[-1]), self.weight, tokens.reshape(-1),
                                bias=self._loss_bias(), temperature=temperature, chunk_rows=self.chunk_rows)
        return logp.view(tokens.shape)

    def extra_repr(self) -> str:
        suppressed = 0 if self.suppressed_token_ids is None else len(self.suppressed_token_ids)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"logit_softcap={self.logit_softcap}, chunk_rows={self.chunk_rows}, suppressed_ids={suppressed}")


@dataclass
class CausalLMLoss:
    """What :func:`causal_lm_loss` returns: the loss and the backbone's outputs (hidden states, cache, ...)."""

    loss: torch.Tensor
    hidden_states: torch.Tensor
    backbone_outputs: Any


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _suppressed_token_ids(model: nn.Module) -> Optional[List[int]]:
    """The ids the model's forward suppresses, when it is one of the families mmlatent knows (else None)."""
    from .backbones import VLMBackbone
    from .backbones.base import supported_model_classes
    if type(model).__name__ not in supported_model_classes():
        return None
    return VLMBackbone(model).suppressed_token_ids()


def head_for(model: nn.Module, *, ignore_index: int = -100, chunk_rows: Optional[int] = None,
             also_suppressed: Sequence[int] = ()) -> LinearCrossEntropyHead:
    """A :class:`LinearCrossEntropyHead` over ``model.get_output_embeddings()`` (``model`` a transformers causal LM
    or VLM, or a PEFT model around one) that computes the loss the model's own forward computes: with its final
    logit soft-capping (``config.final_logit_softcapping``, as in Gemma 2) and the ids its forward suppresses
    (Chameleon's image codes), plus ``also_suppressed`` (ids a generation never writes, such as a VLM's image
    placeholder)."""
    model = unwrap_peft(model)
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, (nn.Linear, LinearCrossEntropyHead)):
        raise TypeError(f"model: expected get_output_embeddings() to be an nn.Linear, got {type(lm_head).__name__}")
    text_config = _text_config(model.config)
    scale = getattr(text_config, "logit_scale", None)
    if scale not in (None, 1, 1.0):
        raise ValueError(f"model: its logits are scaled by config.logit_scale = {scale}, which this head does not "
                         f"apply")
    suppressed = _suppressed_token_ids(model)
    if also_suppressed:
        suppressed = sorted(set(suppressed or ()) | {int(i) for i in also_suppressed})
    return LinearCrossEntropyHead(lm_head, ignore_index=ignore_index, chunk_rows=chunk_rows,
                                  logit_softcap=getattr(text_config, "final_logit_softcapping", None),
                                  suppressed_token_ids=suppressed)


def causal_lm_loss(model: nn.Module, labels: Optional[torch.Tensor] = None, *,
                   num_items_in_batch: Optional[Union[int, torch.Tensor]] = None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None, chunk_rows: Optional[int] = None,
                   **model_inputs: Any) -> CausalLMLoss:
    """The loss ``model(**model_inputs, labels=labels).loss`` of a Hugging Face causal LM or VLM, without logits.

    Runs the backbone (``model.base_model``: the decoder of a ``*ForCausalLM``, or the vision + language model of
    a ``*ForConditionalGeneration``) for its last hidden state [B, L, H], then the cross-entropy of the output
    embeddings (:func:`head_for`) against ``labels`` [B, L] shifted as transformers' ``ForCausalLMLoss`` shifts
    them (or against ``shift_labels`` [B, L], already shifted). ``num_items_in_batch`` switches to transformers'
    summed loss divided by that count (gradient accumulation). Extra keyword arguments go to the backbone
    (input_ids, attention_mask, pixel_values, image_grid_thw, ...). A PEFT model is unwrapped to its base, whose
    modules carry the adapters: they run, and receive their gradients, as under the wrapper.
    """
    model = unwrap_peft(model)
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise TypeError(f"model: expected a transformers causal LM with a backbone (its base_model), got "
                        f"{type(model).__name__}")
    if (labels is None) == (shift_labels is None):
        raise ValueError("labels and shift_labels: give exactly one")
    outputs = backbone(**model_inputs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    head = head_for(model, ignore_index=ignore_index, chunk_rows=chunk_rows)
    targets = shift_labels if shift_labels is not None else next_token_labels(labels, ignore_index)
    loss = head(hidden, targets.to(hidden.device), num_items_in_batch=num_items_in_batch)
    return CausalLMLoss(loss=loss, hidden_states=hidden, backbone_outputs=outputs)


__all__ = ["LinearCrossEntropyHead", "CausalLMLoss", "causal_lm_loss", "head_for", "next_token_labels"]
