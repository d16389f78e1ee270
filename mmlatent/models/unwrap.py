"""The model under a PEFT wrapper, found in one place: every mmlatent entry point that takes a Hugging Face model
takes a PEFT model around one too, and works on the base model whose modules carry the adapters."""
from __future__ import annotations

from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (or a tuner such as ``LoraModel``), else ``model``.

    The adapters stay where they are: they live in the base model's modules, so calling the returned model runs
    them and their gradients flow as under the wrapper."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):
        return get_base_model()
    inner = getattr(model, "model", None)
    # a bare tuner (peft.LoraModel and friends) holds the transformers model as .model and has no get_base_model
    if type(model).__module__.startswith("peft.") and isinstance(inner, nn.Module):
        return inner
    return model


__all__ = ["unwrap_peft"]
