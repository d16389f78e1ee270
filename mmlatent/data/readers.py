"""Readers of real data into :class:`mmlatent.data.records.Record`s.

- ScienceQA, official layout: ``problems.json`` (pid -> question, choices, answer index, hint, image, solution,
  ...), ``pid_splits.json`` (split -> pids) and ``images/<split>/<pid>/image.png``;
- ScienceQA, Hugging Face parquet layout: ``data/<split>-*.parquet`` with an ``image`` column of encoded bytes;
- M3CoT: JSON (a list) or JSONL records with id, question, choices, answer (letter or index), rationale and an
  image path (relative to the file's folder).

Only problems with an image are read (IVT-LR reasons over image tokens). A bad record (a listed image that is
missing, no options, an answer outside the options) raises an error naming its id, or, with ``skip_bad=True``,
is skipped and reported in the returned ``skipped`` list.
"""
from __future__ import annotations

import glob
import io
import json
import os
from typing import List, Optional, Tuple

import numpy as np

from .records import LETTERS, Record


def _question(question: str, hint: Optional[str]) -> str:
    hint = (hint or "").strip()
    return f"{question.strip()} Context: {hint}" if hint else question.strip()


def _make(record_id, build, skip_bad: bool, skipped: list) -> Optional[Record]:
    try:
        return build()
    except (ValueError, FileNotFoundError, KeyError) as err:
        if not skip_bad:
            raise
        skipped.append((record_id, str(err)))
        return None


def read_scienceqa(root: str, split: str, *, skip_bad: bool = False) -> Tuple[List[Record], list]:
    """(records, skipped) of one split of ScienceQA in its official layout or the Hugging Face parquet layout."""
    if os.path.exists(os.path.join(root, "problems.json")):
        return _scienceqa_official(root, split, skip_bad)
    if glob.glob(os.path.join(root, "data", f"{split}-*.parquet")):
        return _scienceqa_parquet(root, split, skip_bad)
    raise FileNotFoundError(f"root: {root} has neither problems.json (official layout) nor "
                            f"data/{split}-*.parquet (Hugging Face layout)")


def _scienceqa_official(root, split, skip_bad):
    with open(os.path.join(root, "problems.json")) as f:
        problems = json.load(f)
    with open(os.path.join(root, "pid_splits.json")) as f:
        splits = json.load(f)
    if split not in splits:
        raise ValueError(f"split: {split!r} is not in pid_splits.json ({', '.join(splits)})")
    records, skipped = [], []
    for pid in splits[split]:
        problem = problems[str(pid)]
        if not problem.get("image"):
            continue

        def build(pid=pid, problem=problem):
            path = os.path.join(root, "images", split, str(pid), problem["image"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"record {pid}: image: no file at {path}")
            return Record(id=str(pid), question=_question(problem["question"], problem.get("hint")),
                          options=list(problem.get("choices") or []), answer=int(problem["answer"]),
                          rationale=problem.get("solution") or problem.get("lecture") or "", image=path,
                          meta={"subject": problem.get("subject"), "grade": problem.get("grade")})
        record = _make(pid, build, skip_bad, skipped)
        if record is not None:
            records.append(record)
    return records, skipped


def _scienceqa_parquet(root, split, skip_bad):
    import pyarrow.parquet as pq
    records, skipped = [], []
    for path in sorted(glob.glob(os.path.join(root, "data", f"{split}-*.parquet"))):
        table = pq.read_table(path).to_pylist()
        for i, row in enumerate(table):
            image = row.get("image")
            if not image or not image.get("bytes"):
                continue
            record_id = f"{os.path.basename(path)}:{i}"

            def build(row=row, record_id=record_id, image=image):
                return Record(id=record_id, question=_question(row["question"], row.get("hint")),
                              options=list(row.get("choices") or []), answer=int(row["answer"]),
                              rationale=row.get("solution") or row.get("lecture") or "",
                              image=_decode(image["bytes"], record_id), meta={"subject": row.get("subject")})
            record = _make(record_id, build, skip_bad, skipped)
            if record is not None:
                records.append(record)
    return records, skipped


def _decode(data: bytes, record_id: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as err:  # a corrupt image is a bad record
        raise ValueError(f"record {record_id}: image: cannot decode ({err})") from None


def read_m3cot(path: str, *, split: Optional[str] = None, skip_bad: bool = False) -> Tuple[List[Record], list]:
    """(records, skipped) from an M3CoT JSON or JSONL file; ``split`` keeps the records whose ``split`` field
    matches."""
    with open(path) as f:
        text = f.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                  if line.strip()]
    folder = os.path.dirname(os.path.abspath(path))
    records, skipped = [], []
    for i, row in enumerate(rows):
        if split is not None and row.get("split", split) != split:
            continue
        record_id = str(row.get("id", i))
        image = row.get("image") or row.get("image_path")
        if not image:
            continue

        def build(row=row, record_id=record_id, image=image):
            choices = list(row.get("choices") or [])
            answer = row.get("answer")
            if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
                answer = LETTERS.index(answer.strip().upper())
            elif isinstance(answer, str) and answer in choices:
                answer = choices.index(answer)
            image_path = image if os.path.isabs(image) else os.path.join(folder, image)
            if not os.path.exists(image_path):
                raise FileNotFoundError(f"record {record_id}: image: no file at {image_path}")
            return Record(id=record_id, question=_question(row["question"], row.get("context")), options=choices,
                          answer=int(answer), rationale=row.get("rationale") or "", image=image_path,
                          meta={"domain": row.get("domain"), "topic": row.get("topic")})
        record = _make(record_id, build, skip_bad, skipped)
        if record is not None:
            records.append(record)
    return records, skipped


__all__ = ["read_scienceqa", "read_m3cot"]


def load(kind: str, spec: dict) -> Tuple[List[Record], List[Record]]:
    """(train records, eval records) for a config's ``data: {kind: spec}`` entry (scienceqa or m3cot)."""
    skip_bad = bool(spec.get("skip_bad", False))
    if kind == "scienceqa":
        train, skipped_train = read_scienceqa(spec["root"], spec.get("train_split", "train"), skip_bad=skip_bad)
        evaluation, skipped_eval = read_scienceqa(spec["root"], spec.get("eval_split", "test"), skip_bad=skip_bad)
    elif kind == "m3cot":
        train, skipped_train = read_m3cot(spec["train"], skip_bad=skip_bad)
        evaluation, skipped_eval = read_m3cot(spec["eval"], skip_bad=skip_bad)
    else:
        raise ValueError(f"data: expected synthetic, scienceqa or m3cot, got {kind!r}")
    for record_id, why in skipped_train + skipped_eval:
        print(f"skipped record {record_id}: {why}", flush=True)
    return train, evaluation
