"""The embedded default task: procedurally generated visual reasoning questions, deterministic by seed.

Each image is a 3 x 3 grid of 8-pixel cells on a black background, holding 1 to 4 coloured squares (distinct
colours; pixel values in [0, 1] once the processor rescales them: a [-1, 1] scaling kept a tiny model at chance).
At Qwen2-VL's patch 4 and 2 x 2 merge, each cell is exactly one image token, so selecting k image tokens is
selecting k cells. Question kinds (the number of rationale steps in brackets):

- ``colour`` (2): the colour of the only object;
- ``position`` (2): the colour of the object in a named cell;
- ``relation`` (3): the colour of the object right of / left of / above / below the object of a given colour;
- ``chain`` (3): the colour of the object next to the object next to a given one.

The options are the four colours in a fixed order (A red, B green, C blue, D yellow): with shuffled letters a tiny
model learned nothing in 300 s on 2 cores. Every record carries its rationale, one sentence per step.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .records import Record

GRID, CELL = 3, 8
IMAGE_SIZE = GRID * CELL
COLOURS = ["red", "green", "blue", "yellow"]
RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (230, 220, 40)}
KINDS = ("colour", "position", "relation", "chain")
DIRECTIONS = {"right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}
ROW_NAMES = ["top", "middle", "bottom"]
COL_NAMES = ["left", "centre", "right"]


def _cell_name(r: int, c: int) -> str:
    return f"the {ROW_NAMES[r]} {COL_NAMES[c]} cell"


def render(objects: Dict[tuple, str]) -> np.ndarray:
    """[24, 24, 3] uint8: black background, each object a 6 x 6 square inside its 8 x 8 cell."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for (r, c), colour in objects.items():
        image[r * CELL + 1:(r + 1) * CELL - 1, c * CELL + 1:(c + 1) * CELL - 1] = RGB[colour]
    return image


def _place(rng: np.random.Generator, n: int) -> Dict[tuple, str]:
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    chosen = rng.choice(len(cells), size=n, replace=False)
    colours = rng.permutation(len(COLOURS))[:n]
    return {cells[i]: COLOURS[j] for i, j in zip(chosen, colours)}


def _neighbour(objects: Dict[tuple, str], cell: Tuple[int, int], direction: str) -> Optional[Tuple[int, int]]:
    dr, dc = DIRECTIONS[direction]
    target = (cell[0] + dr, cell[1] + dc)
    return target if target in objects else None


def _question(rng: np.random.Generator,
              kind: str) -> Optional[Tuple[Dict[tuple, str], str, List[str], str]]:
    """(objects, question, rationale steps, answer colour) or None when this draw has no valid question."""
    if kind == "colour":
        objects = _place(rng, 1)
        (cell, colour), = objects.items()
        return objects, "What colour is the object?", [
            f"There is one object, in {_cell_name(*cell)}.", f"It is {colour}."], colour
    objects = _place(rng, int(rng.integers(2, 5)))
    cells = list(objects)
    if kind == "position":
        cell = cells[int(rng.integers(len(cells)))]
        return objects, f"What colour is the object in {_cell_name(*cell)}?", [
            f"Look at {_cell_name(*cell)}.", f"The object there is {objects[cell]}."], objects[cell]
    pairs = [(cell, d, _neighbour(objects, cell, d)) for cell in cells for d in DIRECTIONS]
    pairs = [(cell, d, n) for cell, d, n in pairs if n is not None]
    if kind == "relation":
        if not pairs:
            return None
        cell, direction, target = pairs[int(rng.integers(len(pairs)))]
        anchor = objects[cell]
        return objects, f"What colour is the object {direction} the {anchor} object?", [
            f"The {anchor} object is in {_cell_name(*cell)}.",
            f"The object {direction} it is in {_cell_name(*target)}.", f"That object is {objects[target]}."], \
            objects[target]
    chains = [(cell, d1, mid, d2, _neighbour(objects, mid, d2)) for cell, d1, mid in pairs for d2 in DIRECTIONS]
    chains = [c for c in chains if c[4] is not None and c[4] != c[0]]
    if not chains:
        return None
    cell, d1, mid, d2, target = chains[int(rng.integers(len(chains)))]
    anchor = objects[cell]
    return objects, f"What colour is the object {d2} the object {d1} the {anchor} object?", [
        f"The {anchor} object is in {_cell_name(*cell)}.", f"The object {d1} it is {objects[mid]}.",
        f"The object {d2} the {objects[mid]} object is {objects[target]}."], objects[target]


def generate(n: int, *, seed: int = 0, kinds: Sequence[str] = KINDS, weights: Optional[Sequence[float]] = None,
             split: str = "train") -> List[Record]:
    """``n`` records, deterministic for (seed, split, kinds, weights). ``kinds`` are drawn with ``weights``
    (uniform by default); each record's ``meta`` holds its kind and the number of reasoning steps."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kinds: unknown kind {kind!r}; expected some of {', '.join(KINDS)}")
    if n < 0:
        raise ValueError(f"n: expected a non-negative count, got {n}")
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "test": 2}.get(split, 3)])
    probabilities = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
    records = []
    while len(records) < n:
        kind = kinds[int(rng.choice(len(kinds), p=probabilities))]
        drawn = _question(rng, kind)
        if drawn is None:
            continue
        objects, question, steps, colour = drawn
        records.append(Record(id=f"{split}-{seed}-{len(records)}", question=question, options=list(COLOURS),
                              answer=COLOURS.index(colour), rationale=" ".join(steps), image=render(objects),
                              meta={"kind": kind, "steps": len(steps)}))
    return records


def vocabulary() -> List[str]:
    """Every word the task's prompts, rationales and answers use (lower case), for the word-level tokenizer."""
    from .records import answer_text, prompt_text
    words = set()
    rng_records = generate(400, seed=12345, split="vocabulary")
    for record in rng_records:
        for text in (prompt_text(record), record.rationale, answer_text(record)):
            words.update(_words(text))
    for name in ROW_NAMES + COL_NAMES + COLOURS + list(DIRECTIONS) + list("abcd"):
        words.update(_words(name))
    return sorted(words)


def _words(text: str) -> List[str]:
    import re
    return re.findall(r"\w+|[^\w\s]", text.lower())


__all__ = ["generate", "render", "vocabulary", "KINDS", "COLOURS", "IMAGE_SIZE"]
