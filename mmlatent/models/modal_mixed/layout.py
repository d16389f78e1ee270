"""Where the sketches of a Modal-mixed batch are: every ``START, latent * K, END`` segment, checked on the host.

A sketch is the control token START, then ``num_latents`` placeholders (``latent_token_id``), then END. The
placeholders are text tokens for the M-RoPE position computation (``mm_token_type_ids`` 0), so positions continue
one-dimensionally through a sketch, as through any text (docs/design.md, "Modal-mixed CoT").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch


@dataclass(frozen=True)
class SketchTokens:
    """The control-token ids of a sketch and its length."""

    start: int
    end: int
    latent: int
    num_latents: int


@dataclass
class SketchLayout:
    """Placeholders of a batch in row-major order (sample, then position), which is the order of
    ``latent_targets.reshape(-1, D)``.

    Attributes:
        rows, cols: int64 [N_seg * K] batch row and position of every placeholder.
        per_sample: the number of sketches in each sample, [B] list.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    per_sample: List[int]

    @property
    def num_segments(self) -> int:
        return sum(self.per_sample)


def _runs_after(row: np.ndarray, start: int, latent: int) -> int:
    """The number of consecutive ``latent`` ids right after position ``start``."""
    n = 0
    while start + 1 + n < row.shape[0] and row[start + 1 + n] == latent:
        n += 1
    return n


def sketch_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: SketchTokens) -> SketchLayout:
    """Finds and checks every sketch of ``input_ids`` [B, S] (padded positions, attention_mask 0, are ignored).

    ValueError naming ``input_ids`` (with the row and position) for: a sketch with another number of placeholders
    than ``num_latents``, a START without its END right after the placeholders, a placeholder outside a sketch,
    and an END that closes no sketch. One host synchronisation (the ids are read once)."""
    ids = input_ids.detach().cpu().numpy()
    valid = attention_mask.detach().cpu().numpy().astype(bool)
    K = tokens.num_latents
    rows: List[int] = []
    cols: List[int] = []
    per_sample: List[int] = []
    for b in range(ids.shape[0]):
        row = np.where(valid[b], ids[b], -1)
        covered_latents, closing_ends = set(), set()
        count = 0
        for p in np.flatnonzero(row == tokens.start).tolist():
            n = _runs_after(row, p, tokens.latent)
            if n != K:
                raise ValueError(f"input_ids: the sketch at row {b}, position {p} (START, id {tokens.start}) has {n} "
                                 f"latent placeholders (id {tokens.latent}), expected num_latents={K}")
            end = p + K + 1
            if end >= row.shape[0] or row[end] != tokens.end:
                raise ValueError(f"input_ids: the sketch at row {b}, position {p} has no END (id {tokens.end}) right "
                                 f"after its {K} placeholders (START without END)")
            covered_latents.update(range(p + 1, end))
            closing_ends.add(end)
            rows += [b] * K
            cols += range(p + 1, end)
            count += 1
        stray = sorted(set(np.flatnonzero(row == tokens.latent).tolist()) - covered_latents)
        if stray:
            raise ValueError(f"input_ids: latent placeholder (id {tokens.latent}) at row {b}, position {stray[0]} "
                             f"is outside a START ... END sketch")
        unopened = sorted(set(np.flatnonzero(row == tokens.end).tolist()) - closing_ends)
        if unopened:
            raise ValueError(f"input_ids: END (id {tokens.end}) at row {b}, position {unopened[0]} closes no sketch")
        per_sample.append(count)
    device = input_ids.device
    return SketchLayout(torch.tensor(rows, dtype=torch.long, device=device),
                        torch.tensor(cols, dtype=torch.long, device=device), per_sample)


def check_token_ids(tokens: SketchTokens, image_token_ids: Tuple[int, ...], vocab_size: int) -> None:
    """ValueError naming the argument: ids outside the vocabulary, equal to each other or to an image id."""
    named = {"start_token_id": tokens.start, "end_token_id": tokens.end, "latent_token_id": tokens.latent}
    for name, value in named.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int token id, got {type(value).__name__}")
        if not 0 <= value < vocab_size:
            raise ValueError(f"{name}: {value} is outside the vocabulary [0, {vocab_size})")
        if value in image_token_ids:
            raise ValueError(f"{name}: {value} is one of the model's image token ids {sorted(image_token_ids)}; "
                             f"a sketch token must be a text token (M-RoPE types it 0)")
    if len(set(named.values())) != 3:
        raise ValueError(f"start_token_id, end_token_id, latent_token_id: expected three different ids, got "
                         f"{tokens.start}, {tokens.end}, {tokens.latent}")


__all__ = ["SketchTokens", "SketchLayout", "sketch_layout", "check_token_ids"]
