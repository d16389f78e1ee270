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

Kinds whose reasoning passes through an intermediate visual state (:data:`INTERMEDIATE_KINDS`, drawn only by
:func:`generate_interleaved`, which gives :class:`mmlatent.data.interleaved.InterleavedRecord` s):

- ``swap``: "Swap the red and the blue objects. What colour is the object in the top left cell now?" (any
  occupied cell: after the swap it is still occupied);
- ``move``: "Move the green object one cell down. What colour is the object above the red object now?" (the
  move stays inside the grid onto an empty cell, and the relation asked about involves the moved object, so it
  holds only after the move);
- ``double_swap``: two swaps of different pairs, then a cell, as ``swap`` (two intermediate states).

Each operation's result is a reasoning image, ``render`` of the grid after it (the same 24 x 24 layout, one merged
image token per cell). The modal-mixed reasoning restates each operation in words, then shows its sketch, and only
then names the answer ("Swap the red and the blue objects." <sketch> "The object in the top left cell is blue."):
the resulting positions are in the sketch alone. The text rationale (``text_reasoning``, the text-CoT variant)
says the same state in words instead: after each operation one sentence per object, in raster order ("The blue
object is in the top left cell."). The question and the initial image determine the answer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .records import LETTERS, Record

if TYPE_CHECKING:
    from .interleaved import InterleavedRecord

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


# ------------------------------------------------------------------------------ kinds with an intermediate state

INTERMEDIATE_KINDS = ("swap", "move", "double_swap")
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


def _swapped(objects: Dict[tuple, str], a: str, b: str) -> Dict[tuple, str]:
    where = {colour: cell for cell, colour in objects.items()}
    out = dict(objects)
    out[where[a]], out[where[b]] = b, a
    return out


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _state_sentences(objects: Dict[tuple, str]) -> List[str]:
    return [f"The {objects[cell]} object is in {_cell_name(*cell)}." for cell in sorted(objects)]


def _swap_pair(rng: np.random.Generator, objects: Dict[tuple, str],
               exclude: Optional[frozenset] = None) -> Optional[Tuple[str, str]]:
    colours = [objects[cell] for cell in sorted(objects)]
    pairs = [(a, b) for i, a in enumerate(colours) for b in colours[i + 1:] if frozenset((a, b)) != exclude]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    return (a, b) if rng.integers(2) else (b, a)


def _intermediate(rng: np.random.Generator, kind: str) -> Optional[tuple]:
    """(initial objects, question, modal-mixed reasoning with None where each sketch goes, sketch states, text
    rationale sentences, answer colour) or None when this draw has no valid question."""
    if kind in ("swap", "double_swap"):
        objects = _place(rng, int(rng.integers(2 if kind == "swap" else 3, 5)))
        states, operations, current, previous = [], [], objects, None
        for _ in range(1 if kind == "swap" else 2):
            pair = _swap_pair(rng, current, previous)
            if pair is None:
                return None
            current = _swapped(current, *pair)
            states.append(current)
            operations.append(f"swap the {pair[0]} and the {pair[1]} objects")
            previous = frozenset(pair)
        cells = sorted(current)
        cell = cells[int(rng.integers(len(cells)))]
        answer = current[cell]
        question = f"{_sentence(', then '.join(operations))}. What colour is the object in {_cell_name(*cell)} now?"
        final = f"The object in {_cell_name(*cell)} is {answer}."
    elif kind == "move":
        objects = _place(rng, int(rng.integers(2, 5)))
        moves = [(cell, name, (cell[0] + dr, cell[1] + dc)) for cell in sorted(objects)
                 for name, (dr, dc) in MOVES.items()]
        moves = [(cell, name, to) for cell, name, to in moves
                 if 0 <= to[0] < GRID and 0 <= to[1] < GRID and to not in objects]
        if not moves:
            return None
        cell, name, to = moves[int(rng.integers(len(moves)))]
        current = {c: colour for c, colour in objects.items() if c != cell}
        current[to] = objects[cell]
        # relations of the new state that involve the moved object: the move decides each of them
        pairs = [(anchor, d, _neighbour(current, anchor, d)) for anchor in sorted(current) for d in DIRECTIONS]
        pairs = [(anchor, d, target) for anchor, d, target in pairs if target is not None and to in (anchor, target)]
        if not pairs:
            return None
        anchor, direction, target = pairs[int(rng.integers(len(pairs)))]
        states, operations = [current], [f"move the {objects[cell]} object one cell {name}"]
        answer = current[target]
        question = (f"{_sentence(operations[0])}. What colour is the object {direction} the {current[anchor]} "
                    f"object now?")
        final = f"The object {direction} the {current[anchor]} object is {answer}."
    else:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(INTERMEDIATE_KINDS)}")
    reasoning, text = [], []
    for operation, state in zip(operations, states):
        reasoning += [_sentence(operation) + ".", None]
        text += [_sentence(operation) + "."] + _state_sentences(state)
    return objects, question, reasoning + [final], states, text + [final], answer


def generate_interleaved(n: int, *, seed: int = 0, kinds: Sequence[str] = INTERMEDIATE_KINDS + KINDS,
                         weights: Optional[Sequence[float]] = None,
                         split: str = "train") -> List["InterleavedRecord"]:
    """``n`` :class:`~mmlatent.data.interleaved.InterleavedRecord` s, deterministic for (seed, split, kinds,
    weights); ``kinds`` are drawn with ``weights`` (uniform by default). A record of an intermediate kind has one
    problem image (the initial grid) and one reasoning image per operation; one of the other kinds has its
    rationale as the reasoning's only (text) piece and no reasoning image. ``meta`` holds ``kind``, ``steps``
    (sentences of the text rationale) and ``sketches``. With only the kinds of :data:`KINDS`, the records ask the
    questions :func:`generate` asks for the same arguments."""
    from .interleaved import ImageRef, InterleavedRecord
    known = INTERMEDIATE_KINDS + KINDS
    for kind in kinds:
        if kind not in known:
            raise ValueError(f"kinds: unknown kind {kind!r}; expected some of {', '.join(known)}")
    if n < 0:
        raise ValueError(f"n: expected a non-negative count, got {n}")
    # generate()'s stream and loop, so that the kinds of KINDS draw what generate() draws
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "test": 2}.get(split, 3)])
    probabilities = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
    records = []
    while len(records) < n:
        kind = kinds[int(rng.choice(len(kinds), p=probabilities))]
        record_id = f"{split}-{seed}-{len(records)}"
        if kind in KINDS:
            drawn = _question(rng, kind)
            if drawn is None:
                continue
            objects, question, steps, colour = drawn
            rationale = " ".join(steps)
            records.append(InterleavedRecord(
                id=record_id, question=[question], reasoning=[rationale], answer=LETTERS[COLOURS.index(colour)],
                problem_images=[render(objects)], reasoning_images=[], options=list(COLOURS),
                text_reasoning=rationale, meta={"kind": kind, "steps": len(steps), "sketches": 0}))
            continue
        drawn = _intermediate(rng, kind)
        if drawn is None:
            continue
        objects, question, pieces, states, text, colour = drawn
        sketches = iter(range(len(states)))
        reasoning = [ImageRef("reasoning", next(sketches)) if piece is None else piece for piece in pieces]
        records.append(InterleavedRecord(
            id=record_id, question=[question], reasoning=reasoning, answer=LETTERS[COLOURS.index(colour)],
            problem_images=[render(objects)], reasoning_images=[render(state) for state in states],
            options=list(COLOURS), text_reasoning=" ".join(text),
            meta={"kind": kind, "steps": len(text), "sketches": len(states)}))
    return records


def interleaved_vocabulary() -> List[str]:
    """:func:`vocabulary` followed by the words that only the intermediate kinds use (sorted): the words keep
    the ids that :func:`vocabulary` gives them. ``vocabulary()`` itself is unchanged, as the runs built from it
    (and their checkpoints' tokenizers) need."""
    from .interleaved import final_answer_text, prompt_pieces
    base = vocabulary()
    words = set()
    for record in generate_interleaved(400, seed=12345, kinds=INTERMEDIATE_KINDS, split="vocabulary"):
        text = [p for p in prompt_pieces(record) + record.reasoning if isinstance(p, str)] + [record.text_reasoning]
        for piece in text + [final_answer_text(record)]:
            words.update(_words(piece))
    for name in list(MOVES) + ["then", "swap", "move", "now", "objects", "and"]:
        words.update(_words(name))
    return base + sorted(words - set(base))


# ------------------------------------------------------------------------------ ScienceQA-shaped records (DPMM-CoT)

CONTEXTS = ("image", "text", "none")
# which ScienceQA subject each context stands for in the official breakdown: a fixed labelling (the synthetic
# task has no subjects), so that every column of the breakdown is filled
CONTEXT_SUBJECTS = {"image": "natural science", "text": "social science", "none": "language science"}


def generate_scienceqa(n: int, *, seed: int = 0, split: str = "train", kinds: Sequence[str] = KINDS,
                       contexts: Sequence[str] = CONTEXTS, weights: Optional[Sequence[float]] = None) -> List[Record]:
    """``n`` :func:`generate` questions shaped as ScienceQA's, for MM-CoT's two stages and its breakdown: each
    record's context is drawn from ``contexts`` (uniform, or by ``weights``):

    - ``image``: the grid as the image, no hint (IMG);
    - ``text``: no image, the grid described in the hint, one sentence per object (TXT; an image-less question
      whose features are zeros);
    - ``none``: no image and no hint, the description opening the question itself (NO).

    ``meta`` holds ScienceQA's fields: ``subject`` (by context, :data:`CONTEXT_SUBJECTS`), ``grade`` (``grade2``
    for the two-step kinds, ``grade8`` for the three-step ones), ``hint``, ``image`` (``"image.png"`` or None),
    ``question``, ``solution`` (the rationale), and ``kind`` and ``context``. Deterministic for its arguments."""
    for context in contexts:
        if context not in CONTEXTS:
            raise ValueError(f"contexts: unknown context {context!r}; expected some of {', '.join(CONTEXTS)}")
    if not contexts:
        raise ValueError("contexts: expected at least one context")
    if weights is not None and (len(weights) != len(contexts) or not sum(weights) > 0):
        raise ValueError(f"weights: expected {len(contexts)} non-negative numbers with a positive sum, got {weights!r}")
    base = generate(n, seed=seed, kinds=kinds, split=f"scienceqa-{split}")
    rng = np.random.default_rng([seed, 7, {"train": 0, "val": 1, "test": 2}.get(split, 3)])
    probabilities = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
    out = []
    for i, record in enumerate(base):
        context = contexts[int(rng.choice(len(contexts), p=probabilities))]
        objects = _objects_of(record.image)
        description = " ".join(_state_sentences(objects))
        question = record.question if context != "none" else f"{description} {record.question}"
        hint = description if context == "text" else ""
        image = record.image if context == "image" else None
        meta = dict(record.meta, subject=CONTEXT_SUBJECTS[context], grade="grade2" if record.meta["steps"] == 2
                    else "grade8", hint=hint, image="image.png" if image is not None else None, question=question,
                    solution=record.rationale, context=context)
        out.append(Record(id=f"{split}-{seed}-{i}", question=f"{question} Context: {hint}" if hint else question,
                          options=record.options, answer=record.answer, rationale=record.rationale, image=image,
                          meta=meta))
    return out


def _objects_of(image: np.ndarray) -> Dict[tuple, str]:
    """The grid a :func:`render` image shows: {cell: colour}."""
    colours = {rgb: name for name, rgb in RGB.items()}
    objects = {}
    for r in range(GRID):
        for c in range(GRID):
            pixel = tuple(int(v) for v in image[r * CELL + CELL // 2, c * CELL + CELL // 2])
            if pixel in colours:
                objects[(r, c)] = colours[pixel]
    return objects


def scienceqa_vocabulary() -> List[str]:
    """Every word (case kept) of :func:`generate_scienceqa`'s records under MM-CoT's two prompts and targets,
    for a cased :class:`~mmlatent.data.WordTokenizer`."""
    import re

    from .scienceqa import answer_prompt, answer_target, rationale_prompt
    words = set()
    for record in generate_scienceqa(600, seed=12345, split="vocabulary"):
        for text in (answer_prompt(record, record.rationale), rationale_prompt(record), answer_target(record)):
            words.update(re.findall(r"\w+|[^\w\s]", text))
    for name in ROW_NAMES + COL_NAMES + COLOURS + list(DIRECTIONS) + list(LETTERS[:4]):
        for word in re.findall(r"\w+|[^\w\s]", name):
            words.update({word, word.capitalize()})
    return sorted(words)


__all__ = ["generate", "generate_interleaved", "generate_scienceqa", "render", "vocabulary", "interleaved_vocabulary",
           "scienceqa_vocabulary", "KINDS", "INTERMEDIATE_KINDS", "CONTEXTS", "CONTEXT_SUBJECTS", "COLOURS",
           "IMAGE_SIZE", "MOVES"]
