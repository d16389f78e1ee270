"""``model(**inputs, labels=labels).loss`` without the [B, L, V] logits, on one Hugging Face model instance.

:func:`apply_fused_loss` gives one model object (not its class, not transformers' module globals) a ``forward``
of its own. Without labels that forward is the model's own, untouched: generation, ``logits`` and every output
field are what they were. With labels it runs the model's own forward with ``labels=None`` and ``logits_to_keep``
an empty index, so the output layer projects no position at all and every field but the loss and the logits
comes from the model's own code (caches, rope deltas, image outputs); the last hidden state, taken from the
backbone by a forward hook, goes through :func:`mmlatent.kernels.linear_cross_entropy` with the labels shifted
as transformers shifts them, the model's soft-capping and the ids its forward suppresses (:func:`head_for`).
``logits`` is then None. Nothing is added to the module tree, so ``state_dict``, ``save_pretrained`` and
``from_pretrained`` see the model as it was; :func:`unpatch` removes the forward and the hook.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Optional

import torch
from torch import nn

from .lm_head import LinearCrossEntropyHead, head_for, next_token_labels
from .unwrap import unwrap_peft

_STATE = "_mmlatent_fused_loss"
# the keywords transformers' ForCausalLMLoss takes besides the logits; the model passes them to its loss only
_LOSS_KEYWORDS = ("num_items_in_batch", "ignore_index", "shift_labels")


class _FusedLoss:
    """What one patched model holds: its own forward (bound to it), the options, and the hook that captures the
    backbone's last hidden state during a call with labels."""

    def __init__(self, model: nn.Module, chunk_rows: Optional[int]):
        # the forward in use: the class's, bound to this instance, or one an instance already had (accelerate's
        # device-placement hooks put theirs there), which unpatching gives back
        self.original_forward = model.forward
        self.instance_forward = model.__dict__.get("forward")
        self.signature = inspect.signature(self.original_forward)
        self.chunk_rows = chunk_rows
        self.captured: Optional[torch.Tensor] = None
        self.capturing = False
        model.base_model.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.capturing:
            self.captured = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def head(self, model: nn.Module, ignore_index: int) -> LinearCrossEntropyHead:
        return head_for(model, ignore_index=ignore_index, chunk_rows=self.chunk_rows)


def _fused_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The patched model's forward (bound to the instance): the model's own without labels; with labels, the loss
    from the hidden states and ``logits=None``."""
    state: _FusedLoss = self.__dict__[_STATE]
    bound = state.signature.bind_partial(*args, **kwargs)  # unknown keywords fail here as in the model's forward
    arguments = dict(bound.arguments)
    extra = arguments.pop(next((n for n, p in state.signature.parameters.items()
                                if p.kind is inspect.Parameter.VAR_KEYWORD), "kwargs"), {})
    arguments.update(extra)
    labels = arguments.pop("labels", None)
    if labels is None:  # as in the model's own forward, shift_labels alone computes no loss
        return state.original_forward(*args, **kwargs)
    if arguments.get("logits_to_keep") not in (None, 0):
        raise ValueError("logits_to_keep: with labels, apply_fused_loss computes the loss over every position and "
                         "returns no logits; leave logits_to_keep unset")
    loss_options = {name: arguments.pop(name) for name in _LOSS_KEYWORDS if name in arguments}
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    arguments.pop("logits_to_keep", None)
    reference = next((v for v in arguments.values() if torch.is_tensor(v)), labels)
    keep_none = torch.zeros(0, dtype=torch.long, device=reference.device)
    state.capturing, state.captured = True, None
    try:
        output = state.original_forward(**arguments, labels=None, logits_to_keep=keep_none, return_dict=True)
        hidden = state.captured
    finally:
        state.capturing, state.captured = False, None
    if hidden is None:
        raise RuntimeError(f"model: {type(self).__name__}'s forward did not call its base_model "
                           f"({type(self.base_model).__name__}), so apply_fused_loss found no hidden states")
    ignore_index = loss_options.get("ignore_index", -100)
    if loss_options.get("shift_labels") is not None:
        targets = loss_options["shift_labels"]
    else:
        targets = next_token_labels(labels, ignore_index)
    loss = state.head(self, ignore_index)(hidden, targets.to(hidden.device),
                                          num_items_in_batch=loss_options.get("num_items_in_batch"))
    fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    output = type(output)(**dict(fields, loss=loss, logits=None))
    return output if return_dict else output.to_tuple()


def apply_fused_loss(model: nn.Module, *, chunk_rows: Optional[int] = None) -> nn.Module:
    """Patches ``model`` (this one instance) so that ``model(**inputs, labels=labels).loss`` never builds the
    [B, L, V] logits; returns ``model``.

    Args:
        model: a transformers causal LM (``*ForCausalLM``) or VLM (``*ForConditionalGeneration``: Qwen2-VL,
            Qwen2.5-VL, Chameleon) whose forward takes ``logits_to_keep``, or a PEFT model around one (the base
            model is patched; the adapters run and train as before).
        chunk_rows: rows of the [rows, V] logits block the loss computes at once (None: the op's default).

    With labels (and optionally transformers' ``shift_labels``, which then replace the shifted labels, as in the
    model's loss) the output's ``loss`` is a float32 scalar equal to the
    model's own loss (the same shift, ``ignore_index``, ``num_items_in_batch`` normalisation, soft-capping and
    suppressed ids) and its ``logits`` is None; every other field is the model's own. ``logits_to_keep`` with
    labels raises ValueError. Without labels nothing changes (``generate`` included). Works under gradient
    checkpointing (the loss reads the hidden state after the checkpointed layers) and ``torch.compile``.

    Applying again replaces the options. ``resize_token_embeddings`` and ``set_output_embeddings`` keep the
    patch (the head is looked up at each call). :func:`unpatch` undoes it.

    Example::

        model = apply_fused_loss(AutoModelForCausalLM.from_pretrained(path))
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    """
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows: expected a positive int or None, got {chunk_rows!r}")
    base = unwrap_peft(model)
    if _STATE in base.__dict__:
        base.__dict__[_STATE].chunk_rows = chunk_rows
        return model
    forward = getattr(type(base), "forward", None)
    if forward is None or "logits_to_keep" not in inspect.signature(forward).parameters:
        raise TypeError(f"model: {type(base).__name__}.forward takes no logits_to_keep, so its output layer cannot "
                        f"be skipped; apply_fused_loss supports transformers causal LMs and VLMs that take it")
    backbone = getattr(base, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is base:
        raise TypeError(f"model: {type(base).__name__} has no backbone (base_model) whose hidden states the loss "
                        f"could read")
    head_for(base)  # an output layer the loss can use, checked before anything changes
    base.__dict__[_STATE] = state = _FusedLoss(base, chunk_rows)
    # generate() and Trainer inspect the forward's parameters: they must see the model's own
    base.forward = _SignedForward(types.MethodType(_fused_forward, base), state.signature)
    return model


class _SignedForward:
    """The bound patched forward, presenting the model's own signature to ``inspect`` (generate's keyword check,
    Trainer's ``num_items_in_batch`` detection, PEFT)."""

    def __init__(self, forward: types.MethodType, signature: inspect.Signature):
        self._forward = forward
        self.__signature__ = signature
        self.__doc__ = forward.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)

    @property
    def __self__(self) -> nn.Module:
        return self._forward.__self__


def is_fused_loss_applied(model: nn.Module) -> bool:
    """Whether :func:`apply_fused_loss` patched ``model`` (or the base of a PEFT ``model``)."""
    return _STATE in unwrap_peft(model).__dict__


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes :func:`apply_fused_loss` on ``model`` (or a PEFT model around it): the class's forward again, the
    hook removed; returns ``model``. A model that is not patched raises ValueError."""
    base = unwrap_peft(model)
    state = base.__dict__.pop(_STATE, None)
    if state is None:
        raise ValueError(f"model: {type(base).__name__} is not patched by apply_fused_loss")
    hooks = base.base_model._forward_hooks
    # found by owner rather than by handle, so a deep copy of a patched model unpatches its own hook
    for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is state]:
        del hooks[key]
    if state.instance_forward is None:
        base.__dict__.pop("forward", None)
    else:
        base.forward = state.instance_forward
    return model


__all__ = ["apply_fused_loss", "unpatch", "is_fused_loss_applied"]
