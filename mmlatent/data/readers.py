"""Readers of real data into :class:`mmlatent.data.records.Record`s.

- ScienceQA, official layout: ``problems.json`` (pid -> question, choices, answer, hint, image, solution,
  lecture, ...), ``pid_splits.json`` (split -> pids) and ``images/<split>/<pid>/<image>``;
- ScienceQA, Hugging Face parquet layout: ``data/<split>-*.parquet`` with an ``image`` column of encoded bytes
  (``{"bytes": ..., "path": ...}`` structs or plain binary);
- M3CoT: a ``.json`` file holding one list of records, or a ``.jsonl`` file with one record per line (another
  extension is read as JSONL unless its text starts with ``[``); records have id, question, choices, answer,
  context, rationale, split and an image path (``image`` or ``image_path``, relative to the file's folder);
- Zebra-CoT (:func:`read_zebra_cot`): parquet files of interleaved text-and-image reasoning, read into
  :class:`mmlatent.data.interleaved.InterleavedRecord` s (its own rules are in its docstring).

For ScienceQA and M3CoT, only problems with an image are read (IVT-LR reasons over image tokens): a record
whose image is null is left out without a report. Every other record is validated in full before it becomes a
``Record``:

- it is a JSON object (a parquet row always is), and for ScienceQA's official layout its pid, listed in
  ``pid_splits.json``, is a key of ``problems.json``;
- ``question`` is a non-blank string; ``hint`` / ``context``, ``solution``, ``lecture`` and ``rationale`` are
  strings or null; ``choices`` is a list of 1 to 26 strings; the image field is present;
- ``answer`` is an int index into the choices (a bool is not an int), or one upper-case letter within them
  (``"B"``); M3CoT also takes the exact text of one choice. Nothing is coerced: ``1.7``, ``"1"``, ``"b"`` and
  ``" B"`` are errors, as is an answer whose letter and text name different choices;
- the image decodes with PIL (read in full at read time, so a broken file fails here rather than in the
  collator); an M3CoT ``id`` is a string or int, unique among the records read (without one, the record's id
  is ``"line N"`` in JSONL and its position in a JSON list).

A bad record raises :class:`RecordError` (a ``ValueError``; :class:`MissingImageError` is also a
``FileNotFoundError``) whose message reads ``<file>: [line N: ]record <id>: <field>: <what is wrong>``. With
``skip_bad=True`` each bad record, including a malformed JSONL line or a record that is not an object, is
left out and reported in the returned ``skipped`` list as ``(record id, message)``. Problems with a whole file
raise even with ``skip_bad``: a missing file (``FileNotFoundError``), or a ``ValueError`` naming the file for
text that is not UTF-8, malformed JSON in a ``.json`` file, a top level that is not the expected list or object,
or an unreadable parquet file. Meta fields (subject, grade, domain, topic) are passed through unchecked.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple, Type

import numpy as np

from .records import LETTERS, Record

if TYPE_CHECKING:
    from .interleaved import InterleavedRecord


class RecordError(ValueError):
    """A record that cannot be read.

    Attributes: ``path`` (the file), ``record_id`` (the record's id, or ``"line N"`` for a JSONL line without
    one), ``field`` (the field at fault, None for the record as a whole), ``line`` (the JSONL line number, else
    None) and ``problem`` (what is wrong).
    """

    def __init__(self, path: str, record_id: str, field: Optional[str], problem: str,
                 line: Optional[int] = None) -> None:
        self.path, self.record_id, self.field, self.problem, self.line = path, record_id, field, problem, line
        parts = [path]
        if line is not None:
            parts.append(f"line {line}")
        if record_id != f"line {line}":
            parts.append(f"record {record_id}")
        if field:
            parts.append(field)
        super().__init__(": ".join(parts + [problem]))

    def __reduce__(self) -> tuple:  # exceptions pickle through their args, and ours are not the message alone
        return type(self), (self.path, self.record_id, self.field, self.problem, self.line)


class MissingImageError(RecordError, FileNotFoundError):
    """A record whose image file is not on disk."""


def _kind(value: object) -> str:
    """A value and its type for a message: ``1.7 (float)``, ``'abc' (str)``, ``null``."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


_MISSING = object()


class _Fields:
    """One raw record and where it came from; each accessor returns a field in its accepted form or raises a
    :class:`RecordError` naming the file, the record and the field."""

    def __init__(self, row: object, path: str, record_id: str, line: Optional[int] = None) -> None:
        self.path, self.record_id, self.line = path, record_id, line
        if not isinstance(row, dict):
            raise self.error(None, f"expected an object, got {_kind(row)}")
        self.row = row

    def error(self, field: Optional[str], problem: str, kind: Type[RecordError] = RecordError) -> RecordError:
        return kind(self.path, self.record_id, field, problem, line=self.line)

    def required(self, field: str) -> Any:
        value = self.row.get(field, _MISSING)
        if value is _MISSING:
            raise self.error(field, "missing")
        return value

    def text(self, field: str) -> str:
        """A required string with more than white space."""
        value = self.required(field)
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {_kind(value)}")
        if not value.strip():
            raise self.error(field, f"expected text, got {value!r}")
        return value

    def optional_text(self, field: str) -> str:
        """A string, or "" when the field is null or absent."""
        value = self.row.get(field)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.error(field, f"expected a string or null, got {_kind(value)}")
        return value

    def choices(self, field: str = "choices") -> List[str]:
        value = self.required(field)
        if not isinstance(value, list):
            raise self.error(field, f"expected a list of strings, got {_kind(value)}")
        if not value:
            # "options" is the Record's name for them, and what earlier messages said
            raise self.error("options", f"the {field} list is empty; expected at least one option")
        for i, choice in enumerate(value):
            if not isinstance(choice, str):
                raise self.error(field, f"expected a list of strings, got {_kind(choice)} at position {i}")
        if len(value) > len(LETTERS):
            raise self.error(field, f"{len(value)} choices, but only {len(LETTERS)} can be lettered A-Z")
        return list(value)

    def answer(self, choices: List[str], *, by_text: bool, field: str = "answer") -> int:
        """The index of the answer: an int index, one upper-case letter within the choices, or (``by_text``) the
        exact text of one choice."""
        value = self.required(field)
        n, last = len(choices), LETTERS[len(choices) - 1]
        forms = f"an int index 0-{n - 1}, a letter A-{last}" + (" or the text of one choice" if by_text else "")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error(field, f"expected {forms}, got {_kind(value)}")
        if isinstance(value, int):
            if not 0 <= value < n:
                raise self.error(field, f"index {value} is outside the {n} options")
            return value
        matches = [i for i, choice in enumerate(choices) if choice == value] if by_text else []
        if len(matches) > 1:
            raise self.error(field, f"{value!r} is the text of choices {matches}, which is ambiguous")
        if len(value) == 1 and value in LETTERS:
            index = LETTERS.index(value)
            if matches and matches[0] != index and index < n:
                raise self.error(field, f"{value!r} is letter {value} (choice {index}) but also the text of choice "
                                        f"{matches[0]}, which is ambiguous")
            if index < n:
                return index
            if not matches:
                raise self.error(field, f"letter {value} is outside the {n} options (A-{last})")
        if matches:
            return matches[0]
        if by_text:
            raise self.error(field, f"{value!r} is neither a letter A-{last} nor the text of a choice "
                                    f"({', '.join(map(repr, choices))})")
        raise self.error(field, f"expected {forms}, got {_kind(value)}")

    def image_name(self, *fields: str) -> Tuple[Optional[str], Optional[str]]:
        """(field, path) of the first of ``fields`` that is not null; (None, None) when all are null. One of them
        must be present: a record that says nothing about its image is more likely broken than text-only."""
        if not any(f in self.row for f in fields):
            raise self.error(fields[0], "missing (null marks a problem without an image)")
        for field in fields:
            value = self.row.get(field)
            if value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                raise self.error(field, f"expected a file path or null, got {_kind(value)}")
            return field, value
        return None, None

    def check_image_file(self, field: str, path: str) -> None:
        from PIL import Image
        if not os.path.isfile(path):
            raise self.error(field, f"no file at {path}", kind=MissingImageError)
        try:
            # verify() checks the structure (PNG chunk checksums) without decoding; load() then decodes the
            # pixels, which is the only way to find a truncated JPEG. verify() leaves the image unusable.
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                im.load()
        except Exception as err:  # PIL reports a broken image through many types (OSError, SyntaxError, ...)
            raise self.error(field, f"cannot decode {path} ({_image_fault(err)})") from None

    def decode_image(self, field: str, data: bytes) -> np.ndarray:
        from PIL import Image
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as err:  # as in check_image_file
            raise self.error(field, f"cannot decode {len(data)} image bytes ({_image_fault(err)})") from None


def _image_fault(err: Exception) -> str:
    from PIL import UnidentifiedImageError
    if isinstance(err, UnidentifiedImageError):  # its message names a file object, not the file
        return "not an image format PIL recognises"
    return f"{type(err).__name__}: {err}"


def _read_text(path: str) -> str:
    """A file's text as UTF-8 (a leading byte order mark is dropped)."""
    with open(path, "rb") as f:  # FileNotFoundError already names the file
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _read_json(path: str, container: type, what: str) -> Any:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (ValueError, RecursionError) as err:  # nesting deeper than the parser's stack, a 5000-digit number
        raise ValueError(f"{path}: JSON this reader cannot take ({type(err).__name__}: {err})") from None
    if not isinstance(value, container):
        raise ValueError(f"{path}: expected {what} at the top level, got {type(value).__name__}")
    return value


def _question(question: str, hint: str) -> str:
    hint = hint.strip()
    return f"{question.strip()} Context: {hint}" if hint else question.strip()


def _collect(build: Callable[[], Optional[Record]], skip_bad: bool, skipped: list, records: list) -> None:
    """Appends build()'s record (None: not read, e.g. no image); a RecordError raises, or with skip_bad is
    reported in ``skipped`` as (its record id, its message)."""
    try:
        record = build()
    except RecordError as err:
        if not skip_bad:
            raise
        skipped.append((err.record_id, str(err)))
        return
    if record is not None:
        records.append(record)


def _check_skip_bad(skip_bad: object) -> None:
    if not isinstance(skip_bad, bool):
        raise TypeError(f"skip_bad: expected True or False, got {_kind(skip_bad)}")


def read_scienceqa(root: str, split: str, *, skip_bad: bool = False,
                   with_imageless: bool = False) -> Tuple[List[Record], list]:
    """(records, skipped) of one split of ScienceQA in its official layout (``problems.json`` in ``root``) or the
    Hugging Face parquet layout (``root/data/<split>-*.parquet``). ``answer`` is an int index or a letter;
    ``skipped`` lists (record id, message) of the bad records left out with ``skip_bad=True``. The questions
    without an image are left out unless ``with_imageless`` (then their ``image`` is None). Each record's
    ``meta`` holds ``subject``, ``grade``, ``hint``, ``image`` (the file name, or None), ``question`` (without the
    hint) and ``solution``: what MM-CoT's prompts and its official breakdown
    (:func:`mmlatent.data.scienceqa_breakdown`) read."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root: expected a folder path, got {_kind(root)}")
    if not isinstance(split, str):
        raise TypeError(f"split: expected a split name, got {_kind(split)}")
    _check_skip_bad(skip_bad)
    if not isinstance(with_imageless, bool):
        raise TypeError(f"with_imageless: expected True or False, got {_kind(with_imageless)}")
    root = os.fspath(root)
    if os.path.exists(os.path.join(root, "problems.json")):
        return _scienceqa_official(root, split, skip_bad, with_imageless)
    if glob.glob(os.path.join(root, "data", f"{split}-*.parquet")):
        return _scienceqa_parquet(root, split, skip_bad, with_imageless)
    raise FileNotFoundError(f"root: {root} has neither problems.json (official layout) nor "
                            f"data/{split}-*.parquet (Hugging Face layout)")


def _scienceqa_record(fields: _Fields, record_id: str, image, image_name: Optional[str]) -> Record:
    question = fields.text("question")
    hint = fields.optional_text("hint")
    choices = fields.choices()
    answer = fields.answer(choices, by_text=False)
    solution = fields.optional_text("solution")
    rationale = solution or fields.optional_text("lecture")
    row = fields.row
    meta = {"subject": row.get("subject"), "grade": row.get("grade"), "hint": hint.strip(), "image": image_name,
            "question": question.strip(), "solution": solution.strip()}
    return Record(id=record_id, question=_question(question, hint), options=choices, answer=answer,
                  rationale=rationale, image=image, meta=meta)


def _scienceqa_official(root: str, split: str, skip_bad: bool, with_imageless: bool) -> Tuple[List[Record], list]:
    problems_path, splits_path = os.path.join(root, "problems.json"), os.path.join(root, "pid_splits.json")
    problems = _read_json(problems_path, dict, "an object of pid -> problem")
    splits = _read_json(splits_path, dict, "an object of split -> pids")
    if split not in splits:
        raise ValueError(f"split: {split!r} is not in {splits_path} ({', '.join(map(str, splits))})")
    pids = splits[split]
    if not isinstance(pids, list):
        raise ValueError(f"{splits_path}: split {split!r}: expected a list of pids, got {_kind(pids)}")
    records, skipped, seen = [], [], set()
    for position, pid in enumerate(pids):
        def build(pid=pid, position=position):
            if isinstance(pid, bool) or not isinstance(pid, (str, int)):
                raise RecordError(splits_path, f"{split}[{position}]", None,
                                  f"expected a pid (string or int), got {_kind(pid)}")
            key = str(pid)
            if key not in problems:
                raise RecordError(problems_path, key, None,
                                  f"not in problems.json, though pid_splits.json lists it under {split!r}")
            if key in seen:
                raise RecordError(splits_path, key, None, f"listed more than once under {split!r}")
            fields = _Fields(problems[key], problems_path, key)
            field, image = fields.image_name("image")
            if image is None and not with_imageless:
                return None
            path = os.path.join(root, "images", split, key, image) if image is not None else None
            record = _scienceqa_record(fields, key, path, image)
            if path is not None:
                fields.check_image_file(field, path)
            seen.add(key)
            return record
        _collect(build, skip_bad, skipped, records)
    return records, skipped


def _parquet_rows(path: str) -> list:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading the parquet layout needs pyarrow (pip install mmlatent[data])") from None
    try:
        return pq.read_table(path).to_pylist()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: a string column is not UTF-8 ({err.reason})") from None
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None


def _scienceqa_parquet(root: str, split: str, skip_bad: bool, with_imageless: bool) -> Tuple[List[Record], list]:
    records, skipped = [], []
    for path in sorted(glob.glob(os.path.join(root, "data", f"{split}-*.parquet"))):
        for i, row in enumerate(_parquet_rows(path)):
            record_id = f"{os.path.basename(path)}:{i}"

            def build(row=row, record_id=record_id, path=path):
                fields = _Fields(row, path, record_id)
                image = fields.required("image")
                if isinstance(image, dict):
                    data = image.get("bytes")
                    if data is None and image.get("path") is None:  # how the datasets library writes "no image"
                        data = None
                    elif data is None:
                        raise fields.error("image", f"no bytes embedded (path {image.get('path')!r})")
                    name = image.get("path") or "image"
                else:
                    data, name = image, "image"
                if data is None:
                    return _scienceqa_record(fields, record_id, None, None) if with_imageless else None
                if not isinstance(data, bytes):
                    raise fields.error("image", f"expected encoded image bytes, a {{bytes, path}} struct or null, "
                                                f"got {_kind(data)}")
                record = _scienceqa_record(fields, record_id, None, name)
                record.image = fields.decode_image("image", data)
                return record
            _collect(build, skip_bad, skipped, records)
    return records, skipped


def _m3cot_rows(path: str) -> List[Tuple[str, Optional[int], object]]:
    """(fallback id, JSONL line number or None, parsed row or the RecordError of a malformed line) per record."""
    text = _read_text(path)
    extension = os.path.splitext(path)[1].lower()
    if extension == ".json" or (extension != ".jsonl" and text.lstrip().startswith("[")):
        rows = _read_json(path, list, "a list of records (for one record per line, name the file .jsonl)")
        return [(str(i), None, row) for i, row in enumerate(rows)]
    out = []
    # split("\n"), not splitlines(): U+2028 and friends may appear unescaped inside a JSON string
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            row = RecordError(path, f"line {number}", None, f"malformed JSON at column {err.colno}: {err.msg}",
                              line=number)
        except (ValueError, RecursionError) as err:  # nesting deeper than the parser's stack, huge numbers
            row = RecordError(path, f"line {number}", None, f"JSON this reader cannot take "
                              f"({type(err).__name__}: {err})", line=number)
        out.append((f"line {number}", number, row))
    return out


def read_m3cot(path: str, *, split: Optional[str] = None, skip_bad: bool = False) -> Tuple[List[Record], list]:
    """(records, skipped) from an M3CoT ``.json`` (a list of records) or ``.jsonl`` file; ``split`` keeps the
    records whose ``split`` field matches (or that have none). ``answer`` is an int index, a letter or the
    exact text of one choice; ``skipped`` lists (record id, message) of the bad records left out with
    ``skip_bad=True``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {_kind(path)}")
    if split is not None and not isinstance(split, str):
        raise TypeError(f"split: expected a split name or None, got {_kind(split)}")
    _check_skip_bad(skip_bad)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    records, skipped, seen = [], [], {}
    for fallback_id, line, row in _m3cot_rows(path):
        def build(fallback_id=fallback_id, line=line, row=row):
            if isinstance(row, RecordError):
                raise row
            fields = _Fields(row, path, fallback_id, line)
            raw_id = row.get("id")
            if raw_id is not None:
                if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
                    raise fields.error("id", f"expected a string or int, got {_kind(raw_id)}")
                fields.record_id = str(raw_id)
            if split is not None:
                row_split = row.get("split", split)
                if not isinstance(row_split, str):
                    raise fields.error("split", f"expected a string, got {_kind(row_split)}")
                if row_split != split:
                    return None
            field, image = fields.image_name("image", "image_path")
            if image is None:
                return None
            if fields.record_id in seen:
                raise fields.error("id", f"the same id as the record at {seen[fields.record_id]}")
            question = fields.text("question")
            context = fields.optional_text("context")
            choices = fields.choices()
            answer = fields.answer(choices, by_text=True)
            rationale = fields.optional_text("rationale")
            image_path = image if os.path.isabs(image) else os.path.join(folder, image)
            fields.check_image_file(field, image_path)
            record = Record(id=fields.record_id, question=_question(question, context), options=choices,
                            answer=answer, rationale=rationale, image=image_path,
                            meta={"domain": row.get("domain"), "topic": row.get("topic")})
            seen[record.id] = f"line {line}" if line is not None else f"position {fallback_id}"
            return record
        _collect(build, skip_bad, skipped, records)
    return records, skipped


# --------------------------------------------------------------------------------------------------- Zebra-CoT

ZEBRA_TEXT_COLUMNS = ("Question", "Text Reasoning Trace", "Final Answer")
_ZEBRA_IMAGE_COLUMN = re.compile(r"(problem|reasoning)_image_(\d+)")


def _zebra_files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.parquet")))
        if not files:
            raise FileNotFoundError(f"path: {path} is a folder without *.parquet files")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no file or folder at {path}")
    return [path]


def _parquet_batches(path: str, batch_rows: int = 64):
    """(column names, an iterator of row lists): the file read a few rows at a time, so that its encoded images
    and their decoded arrays are not all held at once; problems with the file raise a ValueError naming it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading the parquet layout needs pyarrow (pip install mmlatent[data])") from None
    errors = (pa.ArrowException, OSError)
    try:
        parquet = pq.ParquetFile(path)
        names = list(parquet.schema_arrow.names)
    except errors as err:
        raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None

    def rows():
        try:
            for batch in parquet.iter_batches(batch_size=batch_rows):
                yield batch.to_pylist()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: a string column is not UTF-8 ({err.reason})") from None
        except errors as err:
            raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    return names, rows()


def _null_image(value: object) -> bool:
    return value is None or (isinstance(value, dict) and value.get("bytes") is None and value.get("path") is None)


def _zebra_image(fields: _Fields, column: str, columns: set, role: str) -> Optional[np.ndarray]:
    """The decoded image of ``column``; None when it is null (``role`` None) or a RecordError when the text
    references it (``role``: the referencing field) and it is null or not a column of the file."""
    if column not in columns:
        raise fields.error(column, f"referenced by {role}, but the file has no such column")
    value = fields.row.get(column)
    if _null_image(value):  # a {bytes: null, path: null} struct is how the datasets library writes "no image"
        value = None
    elif isinstance(value, dict):
        if value.get("bytes") is None:
            raise fields.error(column, f"no bytes embedded (path {value.get('path')!r})")
        value = value["bytes"]
    if value is None:
        if role is not None:
            raise fields.error(column, f"referenced by {role}, but null")
        return None
    if not isinstance(value, bytes):
        raise fields.error(column, f"expected encoded image bytes, a {{bytes, path}} struct or null, got "
                                   f"{_kind(value)}")
    return fields.decode_image(column, value)


def _zebra_marked(fields: _Fields, name: str, kind: str) -> list:
    from .interleaved import parse_marked_text
    try:
        return parse_marked_text(fields.text(name), kind)
    except RecordError:
        raise
    except ValueError as err:
        raise fields.error(name, str(err)) from None


def _zebra_record(fields: _Fields, columns: set, path: str, row_index: int) -> "InterleavedRecord":
    from .interleaved import ImageRef, InterleavedRecord, InterleavedRecordError
    question = _zebra_marked(fields, "Question", "problem")
    trace = _zebra_marked(fields, "Text Reasoning Trace", "reasoning")
    answer = fields.text("Final Answer").strip()
    referenced = {("problem", p.index + 1) for p in question if isinstance(p, ImageRef)}
    referenced |= {("reasoning", p.index + 1) for p in trace if isinstance(p, ImageRef)}
    numbered = sorted((m.group(1), int(m.group(2))) for m in map(_ZEBRA_IMAGE_COLUMN.fullmatch, columns) if m)
    images = {"problem": {}, "reasoning": {}}
    for kind, number in sorted(set(numbered) | referenced):
        role = None if (kind, number) not in referenced else \
            ("the Question" if kind == "problem" else "the Text Reasoning Trace")
        if kind == "reasoning" and role is None:
            continue  # an unreferenced reasoning image has no place in the reasoning; it is left out
        image = _zebra_image(fields, f"{kind}_image_{number}", columns, role)
        if image is not None:
            images[kind][number] = image
    # ImageRef indices are positions among the images kept (in column order), not column numbers
    position = {kind: {number: i for i, number in enumerate(sorted(found))} for kind, found in images.items()}

    def renumbered(pieces):
        return [ImageRef(p.kind, position[p.kind][p.index + 1]) if isinstance(p, ImageRef) else p for p in pieces]
    unreferenced = [number for kind, number in numbered if kind == "reasoning" and (kind, number) not in referenced
                    and not _null_image(fields.row.get(f"reasoning_image_{number}"))]
    meta = {"file": os.path.basename(path), "row": row_index,
            "problem_image_columns": [f"problem_image_{n}" for n in sorted(images["problem"])],
            "reasoning_image_columns": [f"reasoning_image_{n}" for n in sorted(images["reasoning"])]}
    if unreferenced:
        meta["unreferenced_reasoning_image_columns"] = [f"reasoning_image_{n}" for n in unreferenced]
    try:
        return InterleavedRecord(
            id=fields.record_id, question=renumbered(question), reasoning=renumbered(trace), answer=answer,
            problem_images=[images["problem"][n] for n in sorted(images["problem"])],
            reasoning_images=[images["reasoning"][n] for n in sorted(images["reasoning"])], meta=meta)
    except InterleavedRecordError as err:  # what the checks above should have caught
        raise fields.error(err.field, err.problem) from None


def read_zebra_cot(path: str, *, skip_bad: bool = False) -> Tuple[List["InterleavedRecord"], list]:
    """(records, skipped) of Zebra-CoT's parquet layout: ``path`` is a parquet file or a folder whose
    ``*.parquet`` files are read in sorted order. Each row becomes an
    :class:`~mmlatent.data.interleaved.InterleavedRecord` (no options; ``answer`` is the stripped Final Answer).

    Columns: ``Question``, ``Text Reasoning Trace`` and ``Final Answer`` (required: non-blank strings), and any
    number of ``problem_image_N`` / ``reasoning_image_M`` columns (``{bytes, path}`` structs, plain bytes, or null;
    a file has as many as its widest row needs). The question and the trace reference images by
    ``<image_start>[problem_image_K]<image_end>`` / ``<image_start>[reasoning_image_K]<image_end>``; the
    ``ImageRef`` indices count the images kept, in column order. Every non-null problem image is kept (an
    unreferenced one stands before the question); a reasoning image is kept when the trace references it (an
    unreferenced, non-null one is left out and named in ``meta["unreferenced_reasoning_image_columns"]``). Images
    are decoded at read time to RGB uint8 arrays. The record id is the ``id`` column's value if the file has one,
    else ``"<file stem>:<row index>"``.

    Bad rows raise :class:`RecordError` (``<file>: record <id>: <field>: <problem>``), or with ``skip_bad=True`` are
    left out and listed in ``skipped`` as (id, message): a required text missing, blank or not a string, a marker
    whose image column is missing or null, a marker of the wrong kind (a reasoning image in the question, a
    problem image in the trace), an image that does not decode, a bad or repeated id. Whole-file problems raise
    even with ``skip_bad``: no file or no parquet file in the folder (FileNotFoundError), an unreadable parquet
    file, or a required column missing (ValueError naming the file)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a parquet file or a folder of them, got {_kind(path)}")
    _check_skip_bad(skip_bad)
    records, skipped, seen = [], [], {}
    for file in _zebra_files(os.fspath(path)):
        names, batches = _parquet_batches(file)
        missing = [c for c in ZEBRA_TEXT_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{file}: missing column{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(repr, missing))} (Zebra-CoT's layout has "
                             f"{', '.join(map(repr, ZEBRA_TEXT_COLUMNS))})")
        columns, stem, index = set(names), os.path.splitext(os.path.basename(file))[0], 0
        for rows in batches:
            for row in rows:
                def build(row=row, index=index, file=file):
                    fields = _Fields(row, file, f"{stem}:{index}")
                    if "id" in columns:
                        raw_id = row.get("id")
                        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
                            raise fields.error("id", f"expected a string or int, got {_kind(raw_id)}")
                        fields.record_id = str(raw_id)
                    if fields.record_id in seen:
                        raise fields.error("id", f"the same id as the record at {seen[fields.record_id]}")
                    record = _zebra_record(fields, columns, file, index)
                    seen[record.id] = f"{os.path.basename(file)} row {index}"
                    return record
                _collect(build, skip_bad, skipped, records)
                index += 1
    return records, skipped


__all__ = ["read_scienceqa", "read_m3cot", "read_zebra_cot", "RecordError", "MissingImageError"]


def load(kind: str, spec: dict) -> Tuple[List[Record], List[Record]]:
    """(train records, eval records) for a config's ``data: {kind: spec}`` entry: scienceqa ``{root, train_split
    (default train), eval_split (default test), skip_bad}`` or m3cot ``{train, eval, skip_bad}``; skipped records
    are printed."""
    if not isinstance(spec, dict):
        raise ValueError(f"data.{kind}: expected a mapping of options, got {_kind(spec)}")
    skip_bad = spec.get("skip_bad", False)
    if not isinstance(skip_bad, bool):
        raise ValueError(f"data.{kind}.skip_bad: expected true or false, got {_kind(skip_bad)}")
    required = {"scienceqa": ("root",), "m3cot": ("train", "eval")}.get(kind)
    if required is None:
        raise ValueError(f"data: expected synthetic, scienceqa or m3cot, got {kind!r}")
    for key in required:
        if key not in spec:
            raise ValueError(f"data.{kind}.{key}: missing")
    if kind == "scienceqa":
        train, skipped_train = read_scienceqa(spec["root"], spec.get("train_split", "train"), skip_bad=skip_bad)
        evaluation, skipped_eval = read_scienceqa(spec["root"], spec.get("eval_split", "test"), skip_bad=skip_bad)
    else:
        train, skipped_train = read_m3cot(spec["train"], skip_bad=skip_bad)
        evaluation, skipped_eval = read_m3cot(spec["eval"], skip_bad=skip_bad)
    for record_id, why in skipped_train + skipped_eval:
        print(f"skipped record {record_id}: {why}", flush=True)
    return train, evaluation
