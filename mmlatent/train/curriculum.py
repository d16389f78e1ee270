"""The IVT-LR curriculum: which stage an epoch trains, how many latent steps a stage puts in a prompt, and where
the optimizer is reset (docs/design.md, "IVT-LR: the method as its public code computes it").

The one place that knows the modes apart: ``ivtlr`` advances one stage every ``epochs_per_stage`` epochs up to
``max_latent_steps``; ``cot`` (the full rationale) and ``no_cot`` (the answer only) stay at stage 0 and put no
latent token in a prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mmlatent.data.collate import MODES


def stage_for_epoch(epoch: int, epochs_per_stage: int, max_stage: int) -> int:
    """IVT-LR's schedule: stage = epoch // epochs_per_stage, capped at the last stage."""
    return min(epoch // epochs_per_stage, max_stage)


@dataclass(frozen=True)
class Curriculum:
    """mode: "no_cot" | "cot" | "ivtlr"; epochs_per_stage >= 1; max_latent_steps >= 0; reset_optimizer_per_stage:
    a fresh optimizer at each stage boundary (the public code's option)."""

    mode: str
    epochs_per_stage: int = 1
    max_latent_steps: int = 3
    reset_optimizer_per_stage: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage: expected >= 1, got {self.epochs_per_stage}")
        if self.max_latent_steps < 0:
            raise ValueError(f"max_latent_steps: expected >= 0, got {self.max_latent_steps}")

    def stage(self, epoch: int) -> int:
        """The stage epoch ``epoch`` (0-based) trains: the number of latent steps in its prompts."""
        if self.mode != "ivtlr":
            return 0
        return stage_for_epoch(epoch, self.epochs_per_stage, self.max_latent_steps)

    def final_stage(self, epochs: int) -> int:
        """The stage of a run's last epoch: what it is evaluated at."""
        return self.stage(epochs - 1)

    def resets_optimizer(self, epoch: int, previous_epoch: Optional[int]) -> bool:
        """Whether the optimizer starts afresh before epoch ``epoch`` (never at the start of a run)."""
        return (self.reset_optimizer_per_stage and previous_epoch is not None
                and self.stage(epoch) != self.stage(previous_epoch))


__all__ = ["Curriculum", "stage_for_epoch"]
