"""Interleaved records (text with problem images in the question and reasoning images, "sketches", in the
reasoning) and the batches of Modal-mixed CoT (arXiv 2602.00574) built from them.

A record is

    InterleavedRecord(id, question, reasoning, answer, problem_images, reasoning_images, options, text_reasoning)

``question`` and ``reasoning`` are lists of text pieces and :class:`ImageRef` s, in order: the question may
reference only problem images, the reasoning only reasoning images, and every reasoning image is referenced at
least once (a reference may repeat; each repetition is one more sketch). Problem images the question does not
reference stand before the question, in index order, as IVT-LR's single image does. Zebra-CoT writes the
references into its text as ``<image_start>[problem_image_K]<image_end>`` and
``<image_start>[reasoning_image_K]<image_end>`` (K 1-based): :func:`parse_marked_text` splits such text.

:class:`ModalMixedCollator` lays a sample out as

    [bos] <unreferenced problem images> [Question]:{question pieces}\\n[Options]:\\nA.{...}...\\nAnswer: | target

where each problem image is ``<vision_start> <image_pad>*n <vision_end>`` (n: its merged token count) and the
prompt reads as :func:`mmlatent.data.records.prompt_text` writes it (a record with one text piece and one
unreferenced image gives exactly :class:`~mmlatent.data.collate.VLMCollator`'s prompt). The target depends on
the mode:

- ``"modal_mixed"``: the reasoning pieces in order, each text piece encoded on its own and each reasoning image
  as ``START <latent>*num_latents END``, then "Therefore, the answer is X" and eos;
- ``"cot"``: the text rationale (``text_reasoning``, or the reasoning's text pieces joined), the answer, eos;
- ``"no_cot"``: the answer and eos right after the prompt.

Labels are -100 on the prompt and on the latent placeholders; START, END, the text and eos are labelled.
"""
from __future__ import annotations

import re
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .records import LETTERS, Record

KINDS = ("problem", "reasoning")
MODES = ("modal_mixed", "cot", "no_cot")
# Zebra-CoT's marker; white space inside it is tolerated (the dataset's paper prints it with spaces)
MARKER = re.compile(r"<image_start>\s*\[(problem|reasoning)_image_(\d+)\]\s*<image_end>")


@dataclass(frozen=True)
class ImageRef:
    """A reference to ``problem_images[index]`` (kind "problem") or ``reasoning_images[index]`` ("reasoning")."""

    kind: str
    index: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected 'problem' or 'reasoning', got {self.kind!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"index: expected a non-negative int, got {self.index!r}")


Piece = Union[str, ImageRef]
Image = Union[np.ndarray, str]


class InterleavedRecordError(ValueError):
    """A record that does not hold together; ``record_id``, ``field`` and ``problem`` say where and what. Its
    message reads ``record <id>: <field>: <problem>``."""

    def __init__(self, record_id: str, field: str, problem: str) -> None:
        self.record_id, self.field, self.problem = record_id, field, problem
        super().__init__(f"record {record_id}: {field}: {problem}")

    def __reduce__(self) -> tuple:
        return type(self), (self.record_id, self.field, self.problem)


def parse_marked_text(text: str, kind: str) -> List[Piece]:
    """``text`` split on Zebra-CoT's image markers: text pieces (white space kept, empty ones dropped) and an
    :class:`ImageRef` of ``kind`` with the 0-based index (K - 1) for each ``<image_start>[<kind>_image_K]
    <image_end>``. A marker of the other kind, or K = 0, is a ValueError."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected 'problem' or 'reasoning', got {kind!r}")
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    pieces: List[Piece] = []
    position = 0
    for match in MARKER.finditer(text):
        if match.start() > position:
            pieces.append(text[position:match.start()])
        position = match.end()
        marked_kind, number = match.group(1), int(match.group(2))
        if marked_kind != kind:
            raise ValueError(f"the marker {match.group(0)!r} references a {marked_kind} image, but this text may "
                             f"reference only {kind} images")
        if number < 1:
            raise ValueError(f"the marker {match.group(0)!r} numbers its image from 0; Zebra-CoT numbers from 1")
        pieces.append(ImageRef(kind, number - 1))
    if position < len(text):
        pieces.append(text[position:])
    return pieces


def join_text(pieces: Sequence[Piece]) -> str:
    """The text pieces joined, images left out; a space is put between two pieces only where neither has white
    space at the join ("objects." + "The" -> "objects. The"; "below.\\n" + "\\nNext" is kept as it is)."""
    out = ""
    for piece in pieces:
        if not isinstance(piece, str) or not piece:
            continue
        if out and not out[-1].isspace() and not piece[0].isspace():
            out += " "
        out += piece
    return out


@dataclass
class InterleavedRecord:
    """One question with interleaved images; see the module's docstring. ``answer`` is what the model must write:
    a letter ("B") when ``options`` are given, else the answer's text. ``text_reasoning``: a text-only rationale
    for the text-CoT variant (None: the reasoning's text pieces, :func:`join_text`). Checked on construction and
    by :meth:`validate` (the collator calls it): an :class:`InterleavedRecordError` names the record and the field.
    """

    id: str
    question: List[Piece]
    reasoning: List[Piece]
    answer: str
    problem_images: List[Image]
    reasoning_images: List[Image]
    options: Optional[List[str]] = None
    text_reasoning: Optional[str] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def _error(self, field_name: str, problem: str) -> InterleavedRecordError:
        return InterleavedRecordError(str(self.id), field_name, problem)

    def validate(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InterleavedRecordError(repr(self.id), "id", f"expected a non-empty string, got {self.id!r}")
        for name in ("problem_images", "reasoning_images"):
            images = getattr(self, name)
            if not isinstance(images, list):
                raise self._error(name, f"expected a list of images, got {type(images).__name__}")
            for i, image in enumerate(images):
                problem = _image_problem(image)
                if problem:
                    raise self._error(f"{name}[{i}]", problem)
        used = set()
        for name, kind, images in (("question", "problem", self.problem_images),
                                   ("reasoning", "reasoning", self.reasoning_images)):
            pieces = getattr(self, name)
            if not isinstance(pieces, list):
                raise self._error(name, f"expected a list of text pieces and image references, got "
                                        f"{type(pieces).__name__}")
            for i, piece in enumerate(pieces):
                if isinstance(piece, str):
                    continue
                if not isinstance(piece, ImageRef):
                    raise self._error(name, f"piece {i}: expected a string or an ImageRef, got "
                                            f"{type(piece).__name__}")
                if piece.kind != kind:
                    raise self._error(name, f"piece {i} references {piece.kind} image {piece.index}, but the "
                                            f"{name} may reference only {kind} images")
                if piece.index >= len(images):
                    raise self._error(name, f"piece {i} references {kind} image {piece.index}, but the record has "
                                            f"{len(images)} {kind} image{'s' if len(images) != 1 else ''}")
                if kind == "reasoning":
                    used.add(piece.index)
        if not any(isinstance(p, ImageRef) or p.strip() for p in self.question):
            raise self._error("question", "expected text or an image, got none")
        unused = [i for i in range(len(self.reasoning_images)) if i not in used]
        if unused:
            raise self._error("reasoning_images", f"image{'s' if len(unused) > 1 else ''} "
                                                  f"{', '.join(map(str, unused))} not referenced by the reasoning")
        if self.options is not None:
            if not isinstance(self.options, list) or not all(isinstance(o, str) for o in self.options):
                raise self._error("options", f"expected a list of strings or None, got {self.options!r}")
            if not self.options:
                raise self._error("options", "expected at least one option (None: a question without options)")
            if len(self.options) > len(LETTERS):
                raise self._error("options", f"{len(self.options)} options, but only {len(LETTERS)} can be "
                                             f"lettered A-Z")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise self._error("answer", f"expected the answer's text, got {self.answer!r}")
        if self.options is not None:
            last = LETTERS[len(self.options) - 1]
            if len(self.answer) != 1 or self.answer not in LETTERS[:len(self.options)]:
                raise self._error("answer", f"expected a letter A-{last} for the {len(self.options)} options, got "
                                            f"{self.answer!r}")
        if self.text_reasoning is not None and not isinstance(self.text_reasoning, str):
            raise self._error("text_reasoning", f"expected a string or None, got {type(self.text_reasoning).__name__}")
        if not isinstance(self.meta, dict):
            raise self._error("meta", f"expected a dict, got {type(self.meta).__name__}")

    @property
    def rationale(self) -> str:
        """The text rationale: ``text_reasoning``, or the reasoning's text pieces joined."""
        return self.text_reasoning if self.text_reasoning is not None else join_text(self.reasoning)

    @property
    def sketch_refs(self) -> List[ImageRef]:
        """The reasoning's image references in order (one sketch each)."""
        return [p for p in self.reasoning if isinstance(p, ImageRef)]

    @classmethod
    def from_record(cls, record: Record) -> "InterleavedRecord":
        """A :class:`~mmlatent.data.records.Record` as an interleaved record: its image (if any) unreferenced,
        its rationale as the reasoning's one text piece and as ``text_reasoning``, no reasoning image."""
        return cls(id=record.id, question=[record.question], reasoning=[record.rationale] if record.rationale else [],
                   answer=record.answer_letter, problem_images=[] if record.image is None else [record.image],
                   reasoning_images=[], options=list(record.options), text_reasoning=record.rationale,
                   meta=dict(record.meta))


def _image_problem(image: object) -> Optional[str]:
    if isinstance(image, str):
        return None if image else "expected a path, got ''"
    if not isinstance(image, np.ndarray):
        return f"expected an RGB uint8 array [H, W, 3] or a path, got {type(image).__name__}"
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        return f"expected an RGB uint8 array [H, W, 3], got {image.dtype} {list(image.shape)}"
    return None


def prompt_pieces(record: InterleavedRecord) -> List[Piece]:
    """The prompt as text and problem-image references in order: the unreferenced problem images, then the
    question in IVT-LR's format (:func:`mmlatent.data.records.prompt_text`): ``[Question]:{...}``, the lettered
    options when there are any, ``\\nAnswer:``. The question's leading and trailing white space is dropped."""
    referenced = {p.index for p in record.question if isinstance(p, ImageRef)}
    out: List[Piece] = [ImageRef("problem", i) for i in range(len(record.problem_images)) if i not in referenced]
    question = list(record.question)
    while question and isinstance(question[0], str) and not question[0].strip():
        question.pop(0)
    while question and isinstance(question[-1], str) and not question[-1].strip():
        question.pop()
    if question and isinstance(question[0], str):
        question[0] = question[0].lstrip()
    if question and isinstance(question[-1], str):
        question[-1] = question[-1].rstrip()
    suffix = "}"
    if record.options is not None:
        options = "\n".join(f"{LETTERS[i]}.{{{option.strip()}}}" for i, option in enumerate(record.options))
        suffix += f"\n[Options]:\n{options}"
    suffix += "\nAnswer:"
    for piece in ["[Question]:{"] + question + [suffix]:
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        elif not isinstance(piece, str) or piece:
            out.append(piece)
    return out


def final_answer_text(record: InterleavedRecord) -> str:
    """The target's last sentence, as :func:`mmlatent.data.records.answer_text` writes it: "Therefore, the answer
    is X" (X the letter, or the answer's text for a question without options)."""
    return f"Therefore, the answer is {record.answer.strip()}"


def _resized(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    from PIL import Image as PILImage
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(PILImage.fromarray(image).resize((width, height), PILImage.BILINEAR))


@dataclass
class ModalMixedCollator:
    """Interleaved records (or plain :class:`~mmlatent.data.records.Record` s, converted with
    :meth:`InterleavedRecord.from_record`) -> a left-padded batch dict.

    Keys: ``input_ids``, ``attention_mask``, ``labels`` (not with ``prompt_only``); ``pixel_values`` and
    ``image_grid_thw`` (Qwen) of the problem images of all samples, in the order of their image blocks in the
    row-major batch (absent when the batch has none); in "modal_mixed" mode ``sketches_per_sample`` (LongTensor
    [B]) and, when the batch has a sketch, ``sketch_pixel_values`` and ``sketch_image_grid_thw``: the reasoning
    images processed by ``image_processor`` in the order of the START tokens (by sample, then by position in the
    sample; a repeated reference repeats its image). With ``prompt_only`` the rows end right after the prompt
    (generation prompts), and "modal_mixed" mode still returns the sketch keys (the held-out sketches, for
    measuring their reconstruction).

    Args:
        tokenizer: a :class:`~mmlatent.data.tokenizer.WordTokenizer` or
            :class:`~mmlatent.data.tokenizer.HFTokenizer` (``encode``, pad/bos/eos, image and latent ids).
        image_processor: the model's (:func:`mmlatent.data.collate.image_processor_for`).
        mode: "modal_mixed", "cot" or "no_cot".
        num_latents: latent placeholders per sketch (K).
        start_token_id, end_token_id, latent_token_id: the control and placeholder ids (default: the tokenizer's
            ``start_latent_id``, ``end_latent_id``, ``latent_id``).
        sketch_size: (height, width) that every reasoning image is resized to (PIL, bilinear) before processing,
            so that all sketches have one merged grid (448 x 448: 256 tokens for Qwen2-VL); None: as they are.
            Only "modal_mixed" mode has sketches.
        image_token_ids: (placeholder, start, end) ids when the model's differ from the tokenizer's (Chameleon).
    """

    tokenizer: Any
    image_processor: Any
    _: KW_ONLY
    mode: str = "modal_mixed"
    num_latents: int = 32
    start_token_id: Optional[int] = None
    end_token_id: Optional[int] = None
    latent_token_id: Optional[int] = None
    prompt_only: bool = False
    sketch_size: Optional[Tuple[int, int]] = None
    image_token_ids: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.num_latents, bool) or not isinstance(self.num_latents, int) or self.num_latents < 1:
            raise ValueError(f"num_latents: expected a positive int (latent tokens per sketch), got "
                             f"{self.num_latents!r}")
        if self.sketch_size is not None:
            size = tuple(self.sketch_size) if isinstance(self.sketch_size, (tuple, list)) else ()
            if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
                raise ValueError(f"sketch_size: expected (height, width) in pixels or None, got {self.sketch_size!r}")
            if self.mode != "modal_mixed":
                raise ValueError(f"sketch_size: mode {self.mode!r} has no sketches, got sketch_size "
                                 f"{self.sketch_size!r}")
            self.sketch_size = size
        for name, attribute in (("start_token_id", "start_latent_id"), ("end_token_id", "end_latent_id"),
                                ("latent_token_id", "latent_id")):
            if getattr(self, name) is None:
                value = getattr(self.tokenizer, attribute, None)
                if value is None:
                    raise ValueError(f"{name}: the tokenizer has no {attribute}; pass {name}")
                setattr(self, name, value)
        ids = (self.start_token_id, self.end_token_id, self.latent_token_id)
        if len(set(ids)) != 3:
            raise ValueError(f"start_token_id, end_token_id, latent_token_id: expected three different ids, got "
                             f"{ids}")

    def _records(self, records: Sequence[Union[InterleavedRecord, Record]]) -> List[InterleavedRecord]:
        out = []
        for record in records:
            if isinstance(record, Record):
                record = InterleavedRecord.from_record(record)
            elif not isinstance(record, InterleavedRecord):
                raise TypeError(f"records: expected InterleavedRecord or Record, got {type(record).__name__}")
            else:
                record.validate()  # a record may have been changed since it was built
            out.append(record)
        return out

    def sample(self, record: InterleavedRecord,
               image_tokens: Sequence[int]) -> Tuple[List[int], Optional[List[int]]]:
        """(ids, labels) of one sample; ``image_tokens``: the token count of each of its problem-image blocks in
        order (:meth:`problem_image_order`). Labels are None with ``prompt_only``."""
        t = self.tokenizer
        image_id, start_id, end_id = self.image_token_ids or (t.image_id, t.vision_start_id, t.vision_end_id)
        prompt = [] if t.bos_id is None else [t.bos_id]
        counts = iter(image_tokens)
        for piece in prompt_pieces(record):
            if isinstance(piece, ImageRef):
                prompt += [start_id] + [image_id] * next(counts) + [end_id]
            else:
                prompt += t.encode(piece)
        if self.prompt_only:
            return prompt, None
        ids: List[int] = []
        labels: List[int] = []
        if self.mode == "modal_mixed":
            for piece in record.reasoning:
                if isinstance(piece, ImageRef):
                    ids += [self.start_token_id] + [self.latent_token_id] * self.num_latents + [self.end_token_id]
                    labels += [self.start_token_id] + [-100] * self.num_latents + [self.end_token_id]
                elif piece:
                    encoded = t.encode(piece)
                    ids += encoded
                    labels += encoded
        elif self.mode == "cot" and record.rationale:
            encoded = t.encode(record.rationale)
            ids += encoded
            labels += encoded
        answer = t.encode(final_answer_text(record)) + [t.eos_id]
        return prompt + ids + answer, [-100] * len(prompt) + labels + answer

    @staticmethod
    def problem_image_order(record: InterleavedRecord) -> List[int]:
        """Indices into ``problem_images`` in the order of the sample's image blocks."""
        return [p.index for p in prompt_pieces(record) if isinstance(p, ImageRef)]

    def _process(self, images: List[np.ndarray]) -> Dict[str, torch.Tensor]:
        return self.image_processor(images=images, return_tensors="pt")

    def __call__(self, records: Sequence[Union[InterleavedRecord, Record]]) -> Dict[str, torch.Tensor]:
        from mmlatent.models.backbones import processed_image_tokens

        from .collate import left_pad, load_image
        records = self._records(records)
        if not records:
            raise ValueError("records: expected at least one record, got none")
        problem, owners = [], []
        for b, record in enumerate(records):
            for i in self.problem_image_order(record):
                problem.append(load_image(record.problem_images[i], record.id))
                owners.append(b)
        processed = self._process(problem) if problem else {}
        counts = processed_image_tokens(self.image_processor, processed) if problem else []
        per_sample: List[List[int]] = [[] for _ in records]
        for b, count in zip(owners, counts):
            per_sample[b].append(count)
        rows, label_rows = [], []
        for record, tokens in zip(records, per_sample):
            ids, labels = self.sample(record, tokens)
            rows.append(ids)
            label_rows.append(labels)
        input_ids, attention_mask, labels = left_pad(rows, label_rows, self.tokenizer.pad_id)
        batch: Dict[str, torch.Tensor] = dict(input_ids=input_ids, attention_mask=attention_mask)
        if not self.prompt_only:
            batch["labels"] = labels
        if problem:
            batch["pixel_values"] = processed["pixel_values"]
            if "image_grid_thw" in processed:
                batch["image_grid_thw"] = processed["image_grid_thw"]
        if self.mode == "modal_mixed":
            sketches = []
            for record in records:
                for ref in record.sketch_refs:
                    image = load_image(record.reasoning_images[ref.index], record.id)
                    sketches.append(image if self.sketch_size is None else _resized(image, self.sketch_size))
            batch["sketches_per_sample"] = torch.tensor([len(r.sketch_refs) for r in records], dtype=torch.long)
            if sketches:
                processed = self._process(sketches)
                batch["sketch_pixel_values"] = processed["pixel_values"]
                if "image_grid_thw" in processed:
                    batch["sketch_image_grid_thw"] = processed["image_grid_thw"]
        return batch


__all__ = ["ImageRef", "InterleavedRecord", "InterleavedRecordError", "ModalMixedCollator", "parse_marked_text",
           "join_text", "prompt_pieces", "final_answer_text", "MODES", "MARKER"]
