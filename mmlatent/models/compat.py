"""The transformers API that changed name within the supported versions, decided in one place.

- The KV cache argument of a model's forward: ``past_key_values`` until transformers renamed it ``cache`` (5.24
  accepts both and warns on the old name; 5.40 removes it). :func:`cache_kwargs` passes the name the installed
  forward declares.
- Activation checkpointing: ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`` became
  ``activation_checkpointing_enable(activation_checkpointing_kwargs=...)`` (the old name warns and goes in v6).
  :func:`enable_activation_checkpointing` calls the one the model has.

Each choice is made by looking at what the installed transformers offers (a signature, a method), not at its
version number, so a backport or a pre-release does not mislead it.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict

from torch import nn

CACHE_KEYWORDS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _cache_keyword_of(forward: Callable[..., Any]) -> str:
    # inspect.signature follows __wrapped__ through transformers' decorators (deprecate_kwarg, output capturing),
    # so it sees the parameters of the forward as written
    parameters = inspect.signature(forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise TypeError(f"model: its forward ({getattr(forward, '__qualname__', forward)}) takes none of "
                    f"{', '.join(CACHE_KEYWORDS)}; mmlatent cannot pass it a KV cache")


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes its KV cache: "cache" or "past_key_values" (decided once
    per model class)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return _cache_keyword_of(type(model).forward)


def cache_kwargs(model: nn.Module, cache: Any) -> Dict[str, Any]:
    """``{keyword: cache}`` for ``model(**inputs, **cache_kwargs(model, cache))``, under the name its forward takes."""
    return {cache_keyword(model): cache}


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turns on activation (gradient) checkpointing of every checkpointable layer of ``model`` (a transformers
    model, or a PEFT model around one) with ``torch.utils.checkpoint``'s ``use_reentrant`` as given (False: the
    non-reentrant variant, which supports keyword inputs and frozen inputs).

    Calls ``activation_checkpointing_enable`` where the installed transformers has it, else the older
    ``gradient_checkpointing_enable``.
    """
    if not isinstance(use_reentrant, bool):
        raise TypeError(f"use_reentrant: expected a bool, got {type(use_reentrant).__name__}")
    options = {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=options)
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if callable(enable):
        enable(gradient_checkpointing_kwargs=options)
        return
    raise ValueError(f"model: {type(model).__name__} has neither activation_checkpointing_enable() nor "
                     f"gradient_checkpointing_enable(); it does not support activation checkpointing")


__all__ = ["cache_keyword", "cache_kwargs", "enable_activation_checkpointing", "CACHE_KEYWORDS"]
