"""The record every reader produces, the prompt IVT-LR's public code builds from it, and answer scoring.

A record is one multiple-choice question about one image, with a step-by-step rationale:

    Record(id, question, options, answer, rationale, image)

``answer`` is the index of the correct option; ``rationale`` is text whose steps are separated by ". " (the
curriculum replaces the first s of them by latent tokens); ``image`` is an RGB uint8 array [H, W, 3] or a path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Union

import numpy as np

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Record:
    id: str
    question: str
    options: List[str]
    answer: int
    rationale: str
    image: Union[np.ndarray, str, None]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"record {self.id}: options: expected at least one option, got none")
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"record {self.id}: answer: index {self.answer} is outside the {len(self.options)} "
                             f"options")

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    def steps(self, max_steps: Optional[int] = None) -> List[str]:
        """The rationale split on ". " into steps (each ending with "."); with ``max_steps``, the steps after the
        first max_steps - 1 are merged into the last, so there are at most max_steps."""
        parts = [p.strip() for p in self.rationale.strip().split(". ") if p.strip()]
        parts = [p if p.endswith(".") else p + "." for p in parts]
        if max_steps is not None and len(parts) > max_steps:
            parts = parts[:max_steps - 1] + [" ".join(parts[max_steps - 1:])]
        return parts


def prompt_text(record: Record) -> str:
    """The user prompt as IVT-LR's public code formats it (``[Question]:{...}``, lettered options, ``Answer:``)."""
    options = "\n".join(f"{LETTERS[i]}.{{{option.strip()}}}" for i, option in enumerate(record.options))
    return f"[Question]:{{{record.question.strip()}}}\n[Options]:\n{options}\nAnswer:"


def answer_text(record: Record) -> str:
    """The target's last sentence, as the public code writes it."""
    return f"Therefore, the answer is {record.answer_letter}"


_ANSWER = re.compile(r"the\s+answer\s+is\s*[\n\s]*([A-Z])\b", re.IGNORECASE)
_LENIENT = re.compile(r"(?:the\s+answer\s+is|Answer:)\s*[\n\s]*([A-Z])", re.IGNORECASE | re.DOTALL)


def strict_answer(generated: str) -> Optional[str]:
    """The letter of the first "the answer is X" in the generated text, or None: the strict parse."""
    match = _ANSWER.search(generated)
    return match.group(1).upper() if match else None


def lenient_correct(full_text: str, gold_letter: str) -> bool:
    """IVT-LR's public scoring, labelled as such: correct when the gold letter is among ALL letters that follow
    "the answer is" or "Answer:" anywhere in the decoded prompt + output (several answers can count)."""
    return gold_letter.upper() in {m.group(1).upper() for m in _LENIENT.finditer(full_text)}


__all__ = ["Record", "prompt_text", "answer_text", "strict_answer", "lenient_correct", "LETTERS"]
