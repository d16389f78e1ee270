"""Lean training: one loop for every method (loop.py); docs/api.md shows it training a plain causal LM."""
from .loop import EpochBatches, TrainConfig, Trainer, batch_tokens, warmup_cosine

__all__ = ["Trainer", "TrainConfig", "EpochBatches", "batch_tokens", "warmup_cosine"]
