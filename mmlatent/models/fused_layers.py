"""T5's feed-forward activation and layer norms as lean fused ops, on one model instance.

:func:`apply_fused_layers` gives each gated feed-forward block (``T5DenseGatedActDense`` with a GELU) and each
RMS norm (``T5LayerNorm``) of one model object a ``forward`` of its own that calls
:func:`mmlatent.kernels.geglu` and :func:`mmlatent.kernels.rms_norm`: the same values (the norm's float32 forward
bit for bit, the GELU to rounding), with autograd keeping the two projections instead of the activation's four
temporaries, and each norm's input and one statistic per row instead of three copies of the row. With gradients
disabled (``no_grad``: evaluation, ``generate``) the modules' own forwards run, so generation is transformers' to
the bit. Nothing is added to the module tree: ``state_dict``, ``save_pretrained`` and PEFT adapters (on ``wi_0``,
``wi_1``, ``wo``) see the model as it was; :func:`remove_fused_layers` gives the modules their own forwards back.

What it saves is measured in the DPMM-CoT training-step benchmark (docs/benchmarks.md).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from mmlatent.kernels import geglu, rms_norm

from .unwrap import unwrap_peft

_MARK = "_mmlatent_fused_layer"
# transformers' GELU modules by the approximation they compute (ACT2FN's "gelu_new", "gelu_pytorch_tanh", "gelu")
_GELU_APPROXIMATION = {"NewGELUActivation": "tanh", "GELUTanh": "tanh", "PytorchGELUTanh": "tanh",
                       "GELUActivation": "none"}


def _gated_feed_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    gate, up = self.wi_0(hidden_states), self.wi_1(hidden_states)
    if up.dtype != gate.dtype:  # a LoRA or quantised projection may return its own dtype
        up = up.to(gate.dtype)
    hidden = self.dropout(geglu(gate, up, approximate=self.__dict__[_MARK]))
    weight = self.wo.weight
    if isinstance(weight, torch.Tensor) and hidden.dtype != weight.dtype and weight.dtype != torch.int8:
        hidden = hidden.to(weight.dtype)  # as T5 does for its float32 ``wo`` (``_keep_in_fp32_modules``)
    return self.wo(hidden)


def _rms_norm(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype or not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)  # mixed dtypes round as T5LayerNorm rounds them
    return rms_norm(hidden_states, self.weight, eps=self.variance_epsilon)


def _gelu_approximation(module: nn.Module):
    act = getattr(module, "act", None)
    name = type(act).__name__
    if name == "GELUActivation" and getattr(act, "act", None) is not nn.functional.gelu:
        return None  # transformers' Python erf GELU for old torch versions: not the op's formula to the bit
    return _GELU_APPROXIMATION.get(name)


def apply_fused_layers(model: nn.Module) -> nn.Module:
    """Patches the gated GELU feed-forward blocks and RMS norms of ``model`` (this one instance; a PEFT model's
    base) to run as :func:`~mmlatent.kernels.geglu` and :func:`~mmlatent.kernels.rms_norm`; returns ``model``.

    Args:
        model: a transformers T5-family model (``T5ForConditionalGeneration``, its encoder, flan-T5, mT5) or a PEFT
            model around one. Feed-forward blocks whose activation is not a GELU are left as they are.

    Raises:
        TypeError: the model has neither a gated GELU feed-forward block nor a T5 RMS norm.

    Applying twice changes nothing. Example::

        t5 = apply_fused_layers(T5ForConditionalGeneration.from_pretrained(path))
    """
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense, T5LayerNorm
    patched = 0
    for module in unwrap_peft(model).modules():
        if _MARK in module.__dict__:
            patched += 1
        elif isinstance(module, T5DenseGatedActDense) and _gelu_approximation(module) is not None:
            module.__dict__[_MARK] = _gelu_approximation(module)
            module.forward = types.MethodType(_gated_feed_forward, module)
            patched += 1
        elif isinstance(module, T5LayerNorm):
            module.__dict__[_MARK] = "rms"
            module.forward = types.MethodType(_rms_norm, module)
            patched += 1
    if not patched:
        raise TypeError(f"model: {type(unwrap_peft(model)).__name__} has no T5 gated GELU feed-forward block and no "
                        f"T5LayerNorm for apply_fused_layers to fuse")
    return model


def fused_layer_count(model: nn.Module) -> int:
    """How many modules of ``model`` :func:`apply_fused_layers` patched."""
    return sum(_MARK in m.__dict__ for m in unwrap_peft(model).modules())


def remove_fused_layers(model: nn.Module) -> nn.Module:
    """Gives every module :func:`apply_fused_layers` patched its own forward back; returns ``model``."""
    for module in unwrap_peft(model).modules():
        if module.__dict__.pop(_MARK, None) is not None:
            module.__dict__.pop("forward", None)
    return model


__all__ = ["apply_fused_layers", "fused_layer_count", "remove_fused_layers"]
