"""Lean training: one loop for every method (loop.py)."""
from .loop import EpochBatches, TrainConfig, Trainer, warmup_cosine

__all__ = ["Trainer", "TrainConfig", "EpochBatches", "warmup_cosine"]
