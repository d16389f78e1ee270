"""The readers on broken data: every bad record is reported by file, record id and field (and JSONL line), or with
skip_bad left out and listed in ``skipped`` while the good records are still read; problems with a whole file
raise even with skip_bad. Real files in tmp_path: PNGs written by PIL, parquet by pyarrow, JSON and JSONL."""
import io
import json
import os
import pickle

import numpy as np
import pytest

from mmlatent.data.readers import MissingImageError, RecordError, load, read_m3cot, read_scienceqa

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

DELETE = object()  # a change that removes the field
NO_FILE = object()  # the bad record's image file is not written


def _encoded(fmt="PNG", size=16, colour=(255, 0, 0)):
    from PIL import Image
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8) if fmt == "JPEG" else \
        np.full((size, size, 3), colour, dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = _encoded()
BROKEN_IMAGES = {
    "not-an-image": b"this is not an image at all",
    "truncated-png": PNG[:len(PNG) // 2],
    "png-bad-checksum": PNG[:40] + bytes([PNG[40] ^ 0xFF]) + PNG[41:],
    "truncated-jpeg": _encoded("JPEG", 64)[:-300],  # passes Image.verify(); only decoding finds it
}


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _row(i):
    """A good record in logical fields (hint and rationale are renamed per dataset)."""
    return dict(question=f"Which is red? ({i})", choices=["apple", "sky"], answer=0, hint="Look.",
                rationale="Apples are red. The sky is blue.")


def _changed(row, changes):
    if not isinstance(changes, dict):  # the whole record replaced by a non-object
        return changes
    row = dict(row)
    for key, value in changes.items():
        if value is DELETE:
            row.pop(key, None)
        else:
            row[key] = value
    return row


# Each layout writes records 1 (good), 2 (bad: the changes applied) and 3 (good), the bad record's image being
# `image` (bytes, or NO_FILE), and returns (read(skip_bad), bad record id, file its message names, JSONL line or
# None, good record ids).

def _official(root, changes, image=PNG):
    rename = {"rationale": "solution"}
    problems, pids = {}, ["1", "2", "3"]
    for i in (1, 2, 3):
        row = dict(_row(i), image="image.png")
        if i == 2:
            row = _changed(row, changes)
        problems[str(i)] = {rename.get(k, k): v for k, v in row.items()} if isinstance(row, dict) else row
        data = image if i == 2 else PNG
        if data is not NO_FILE:
            _write(os.path.join(root, "images", "train", str(i), "image.png"), data)
    _write(os.path.join(root, "problems.json"), json.dumps(problems).encode())
    _write(os.path.join(root, "pid_splits.json"), json.dumps({"train": pids, "test": []}).encode())
    return (lambda skip_bad: read_scienceqa(root, "train", skip_bad=skip_bad)), "2", "problems.json", None, \
        ["1", "3"]


def _parquet(root, changes, image=PNG):
    # The bad row gets a file of its own: a parquet column has one type, and the good rows must keep theirs.
    def table(rows):
        return pa.Table.from_pylist([{("solution" if k == "rationale" else k): v for k, v in r.items()}
                                     for r in rows])
    good = [dict(_row(i), image={"bytes": PNG, "path": None}) for i in (1, 3)]
    bad = _changed(dict(_row(2), image={"bytes": image, "path": None}), changes)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    pq.write_table(table(good), os.path.join(root, "data", "train-00000-of-00002.parquet"))
    pq.write_table(table([bad]), os.path.join(root, "data", "train-00001-of-00002.parquet"))
    return (lambda skip_bad: read_scienceqa(root, "train", skip_bad=skip_bad)), "train-00001-of-00002.parquet:0", \
        "train-00001-of-00002.parquet", None, ["train-00000-of-00002.parquet:0", "train-00000-of-00002.parquet:1"]


def _m3cot_rows(root, changes, image):
    rows = []
    for i in (1, 2, 3):
        row = dict(_row(i), id=f"m{i}", image=f"images/{i}.png", split="train")
        row["context"] = row.pop("hint")
        if i == 2:
            row = _changed(row, {("context" if k == "hint" else k): v for k, v in changes.items()}
                           if isinstance(changes, dict) else changes)
        data = image if i == 2 else PNG
        if data is not NO_FILE:
            _write(os.path.join(root, "images", f"{i}.png"), data)
        rows.append(row)
    return rows


def _m3cot_json(root, changes, image=PNG):
    path = os.path.join(root, "m3cot.json")
    _write(path, json.dumps(_m3cot_rows(root, changes, image)).encode())
    bad_id = "m2" if isinstance(changes, dict) else "1"  # a non-object has no id: its position in the list
    return (lambda skip_bad: read_m3cot(path, skip_bad=skip_bad)), bad_id, "m3cot.json", None, ["m1", "m3"]


def _m3cot_jsonl(root, changes, image=PNG):
    path = os.path.join(root, "m3cot.jsonl")
    rows = _m3cot_rows(root, changes, image)
    # a blank line, so that the bad record's line (3) is not its position (2)
    _write(path, "\n".join([json.dumps(rows[0]), "", json.dumps(rows[1], ensure_ascii=False),
                            json.dumps(rows[2])]).encode())
    bad_id = "m2" if isinstance(changes, dict) else "line 3"
    return (lambda skip_bad: read_m3cot(path, skip_bad=skip_bad)), bad_id, "m3cot.jsonl", 3, ["m1", "m3"]


LAYOUTS = {"official": _official, "parquet": _parquet, "m3cot-json": _m3cot_json, "m3cot-jsonl": _m3cot_jsonl}

# (name, changes to the bad record, the field its message names); "hint" and "rationale" are the logical names
FIELD_FAULTS = [
    ("question-int", {"question": 5}, "question"),
    ("question-null", {"question": None}, "question"),
    ("question-list", {"question": ["Which?"]}, "question"),
    ("question-blank", {"question": "   "}, "question"),
    ("question-missing", {"question": DELETE}, "question"),
    ("answer-null", {"answer": None}, "answer"),
    ("answer-lower-case-letter", {"answer": "b"}, "answer"),
    ("answer-padded-letter", {"answer": " B"}, "answer"),
    ("answer-float", {"answer": 1.7}, "answer"),
    ("answer-whole-float", {"answer": 1.0}, "answer"),
    ("answer-bool", {"answer": True}, "answer"),
    ("answer-list", {"answer": [1]}, "answer"),
    ("answer-numeric-string", {"answer": "1"}, "answer"),
    ("answer-index-past-the-choices", {"answer": 2}, "answer"),
    ("answer-negative-index", {"answer": -1}, "answer"),
    ("answer-letter-past-the-choices", {"answer": "C"}, "answer"),
    ("answer-text-not-a-choice", {"answer": "banana"}, "answer"),
    ("answer-missing", {"answer": DELETE}, "answer"),
    ("choices-string", {"choices": "abc"}, "choices"),
    ("choices-non-strings", {"choices": [1, 2]}, "choices"),
    ("choices-with-null", {"choices": ["apple", None]}, "choices"),
    ("choices-null", {"choices": None}, "choices"),
    ("choices-empty", {"choices": []}, "options"),  # the Record's name for them; the message names both
    ("choices-missing", {"choices": DELETE}, "choices"),
    ("choices-more-than-26", {"choices": [f"c{i}" for i in range(27)]}, "choices"),
    ("image-int", {"image": 7}, "image"),
    ("image-missing", {"image": DELETE}, "image"),
    ("hint-int", {"hint": 3}, "hint"),
    ("rationale-list", {"rationale": ["step"]}, "rationale"),
]
FILE_FIELD = {"official": {"rationale": "solution"}, "parquet": {"rationale": "solution"},
              "m3cot-json": {"hint": "context"}, "m3cot-jsonl": {"hint": "context"}}


def _cases():
    for layout in LAYOUTS:
        for name, changes, field in FIELD_FAULTS:
            yield pytest.param(layout, changes, PNG, FILE_FIELD[layout].get(field, field), id=f"{layout}-{name}")
        for name, data in BROKEN_IMAGES.items():
            yield pytest.param(layout, {}, data, "image", id=f"{layout}-image-{name}")
        if layout != "parquet":  # a parquet row is always an object
            yield pytest.param(layout, "not a record", PNG, None, id=f"{layout}-record-is-a-string")
            yield pytest.param(layout, [1, 2], PNG, None, id=f"{layout}-record-is-a-list")
            yield pytest.param(layout, {"image": ""}, PNG, "image", id=f"{layout}-image-empty-string")
            yield pytest.param(layout, {}, NO_FILE, "image", id=f"{layout}-image-file-missing")
    yield pytest.param("parquet", {"image": {"bytes": None, "path": "elsewhere.png"}}, PNG, "image",
                       id="parquet-image-path-without-bytes")
    yield pytest.param("parquet", {"image": "image.png"}, PNG, "image", id="parquet-image-string")


def _check_reported(read, bad_id, file_name, line, good_ids, field):
    """(a) without skip_bad: a ValueError naming the file, the record (and line) and the field; (b) with it: the
    good records, and the bad one in skipped with the same message."""
    with pytest.raises(ValueError) as info:
        read(False)
    err, message = info.value, str(info.value)
    assert isinstance(err, RecordError) and err.record_id == bad_id
    assert file_name in message and err.path.endswith(file_name)
    if bad_id.startswith("line "):
        assert message.count(bad_id) == 1
    else:
        assert f"record {bad_id}: " in message
    if line is not None:
        assert f"{file_name}: line {line}: " in message and err.line == line
    if field is not None:
        assert f": {field}" in message
    records, skipped = read(True)
    assert [r.id for r in records] == good_ids
    assert skipped == [(bad_id, message)]
    return err


@pytest.mark.parametrize("layout,changes,image,field", list(_cases()))
def test_bad_record_is_reported_or_skipped(tmp_path, layout, changes, image, field):
    read, bad_id, file_name, line, good_ids = LAYOUTS[layout](str(tmp_path), changes, image)
    err = _check_reported(read, bad_id, file_name, line, good_ids, field)
    if image is NO_FILE:
        assert isinstance(err, MissingImageError) and isinstance(err, FileNotFoundError)
        assert "no file at" in str(err)
    elif image is not PNG:
        assert "cannot decode" in str(err)


def test_messages_say_what_is_wrong(tmp_path):
    def message(layout, changes, root):
        os.makedirs(tmp_path / root)
        with pytest.raises(ValueError) as info:
            LAYOUTS[layout](str(tmp_path / root), changes)[0](False)
        return str(info.value)
    assert message("official", {"answer": 1.7}, "a").endswith(
        "problems.json: record 2: answer: expected an int index 0-1, a letter A-B, got 1.7 (float)")
    assert message("m3cot-jsonl", {"choices": "abc"}, "b").endswith(
        "m3cot.jsonl: line 3: record m2: choices: expected a list of strings, got 'abc' (str)")
    assert message("m3cot-json", {"answer": "banana"}, "c").endswith(
        "record m2: answer: 'banana' is neither a letter A-B nor the text of a choice ('apple', 'sky')")
    assert message("official", {"choices": []}, "e").endswith(
        "record 2: options: the choices list is empty; expected at least one option")
    assert message("parquet", {"answer": True}, "d").endswith("answer: expected an int index 0-1, a letter A-B, "
                                                              "got True (bool)")


# ---------------------------------------------------------------------------------------- per-reader record faults

def test_scienceqa_pid_faults_in_pid_splits(tmp_path):
    def rewrite(pids):
        with open(tmp_path / "pid_splits.json", "w") as f:
            json.dump({"train": pids}, f)
    _official(str(tmp_path), {})
    read = lambda skip_bad: read_scienceqa(str(tmp_path), "train", skip_bad=skip_bad)  # noqa: E731
    rewrite(["1", "77", "3"])  # 77: listed, but not a problem
    _check_reported(read, "77", "problems.json", None, ["1", "3"], None)
    assert "pid_splits.json lists it under 'train'" in read(True)[1][0][1]
    rewrite(["1", "3", "1"])
    _check_reported(read, "1", "pid_splits.json", None, ["1", "3"], None)
    rewrite(["1", 2.5, "3"])
    err = _check_reported(read, "train[1]", "pid_splits.json", None, ["1", "3"], None)
    assert "2.5 (float)" in str(err)
    rewrite([1, 3])  # int pids name the same problems as their strings
    assert [r.id for r in read(False)[0]] == ["1", "3"]


def test_jsonl_malformed_lines_are_reported_by_line(tmp_path):
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    good = dict(id="g", question="Q?", choices=["x", "y"], answer="A", image="a.png")
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([json.dumps(good), '{"id": "h", "question": ', "", "  ",
                               json.dumps(dict(good, id="k"))]) + "\n")
    read = lambda skip_bad: read_m3cot(str(path), skip_bad=skip_bad)  # noqa: E731
    err = _check_reported(read, "line 2", "m.jsonl", 2, ["g", "k"], None)
    assert "malformed JSON" in str(err) and err.field is None


def test_m3cot_id_faults(tmp_path):
    read, *_ = _m3cot_jsonl(str(tmp_path), {"id": ["m2"]})
    err = _check_reported(read, "line 3", "m3cot.jsonl", 3, ["m1", "m3"], "id")
    assert "['m2'] (list)" in str(err)
    os.makedirs(tmp_path / "dup")
    read, *_ = _m3cot_jsonl(str(tmp_path / "dup"), {"id": "m1"})
    err = _check_reported(read, "m1", "m3cot.jsonl", 3, ["m1", "m3"], "id")
    assert "the same id as the record at line 1" in str(err)
    os.makedirs(tmp_path / "none")
    read, *_ = _m3cot_jsonl(str(tmp_path / "none"), {"id": DELETE})
    assert [r.id for r in read(False)[0]] == ["m1", "line 3", "m3"]  # no id: its line names it


@pytest.mark.parametrize("choices,answer,expected", [
    (["apple", "sky"], 1, 1), (["apple", "sky"], "B", 1), (["apple", "sky"], "sky", 1),
    (["A", "B"], "B", 1),  # letter and text agree
    (["C", "D"], "C", 0),  # no letter C among two choices, so the text
    (["B", "A"], "A", None), (["x", "x"], "x", None),  # ambiguous
])
def test_m3cot_answer_forms(tmp_path, choices, answer, expected):
    read, *_ = _m3cot_json(str(tmp_path), {"choices": choices, "answer": answer})
    if expected is None:
        with pytest.raises(RecordError, match="record m2: answer: .*ambiguous"):
            read(False)
    else:
        assert read(False)[0][1].answer == expected


@pytest.mark.parametrize("layout", ["official", "parquet"])
def test_scienceqa_answer_forms(tmp_path, layout):
    read, *_ = LAYOUTS[layout](str(tmp_path), {"answer": "B"})
    assert [r.answer for r in read(False)[0]] == ([0, 1, 0] if layout == "official" else [0, 0, 1])
    with pytest.raises(RecordError, match="answer: expected an int index 0-1, a letter A-B, got 'sky'"):
        LAYOUTS[layout](str(tmp_path / "b"), {"answer": "sky"})[0](False)  # letters only, not choice text


def test_records_without_an_image_are_left_out_unreported(tmp_path):
    for layout, changes in [("official", {"image": None}), ("parquet", {"image": None}),
                            ("parquet", {"image": {"bytes": None, "path": None}}), ("m3cot-jsonl", {"image": None})]:
        root = tmp_path / f"{layout}-{len(os.listdir(tmp_path))}"
        os.makedirs(root)
        # the rest of the record may be broken: it is not read
        read, _, _, _, good_ids = LAYOUTS[layout](str(root), dict(changes, answer=1.7))
        records, skipped = read(False)
        assert [r.id for r in records] == good_ids and skipped == []


def test_m3cot_image_path_split_and_text(tmp_path):
    read, *_ = _m3cot_jsonl(str(tmp_path), {"image": DELETE, "image_path": "images/2.png", "split": "test",
                                            "question": "Qué es\u2028esto?"})
    records, _ = read(False)
    assert [r.id for r in records] == ["m1", "m2", "m3"] and records[1].image.endswith("2.png")
    assert records[1].question.startswith("Qué es\u2028esto?")  # U+2028 inside a string is not a line break
    test, _ = read_m3cot(str(tmp_path / "m3cot.jsonl"), split="test")
    assert [r.id for r in test] == ["m2"]
    os.makedirs(tmp_path / "b")
    _m3cot_jsonl(str(tmp_path / "b"), {"split": "test", "answer": 1.7})
    assert [r.id for r in read_m3cot(str(tmp_path / "b" / "m3cot.jsonl"), split="train")[0]] == ["m1", "m3"]


def test_images_are_decoded_at_read_time(tmp_path):
    _official(str(tmp_path), {})
    records, _ = read_scienceqa(str(tmp_path), "train")
    assert all(os.path.exists(r.image) for r in records)
    os.makedirs(tmp_path / "p")
    records, _ = _parquet(str(tmp_path / "p"), {})[0](False)
    assert records[0].image.shape == (16, 16, 3) and records[0].image.dtype == np.uint8


def test_record_error_pickles():
    err = RecordError("m.jsonl", "m2", "answer", "got 1.7 (float)", line=3)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "m.jsonl: line 3: record m2: answer: got 1.7 (float)"
    assert (again.path, again.record_id, again.field, again.line) == ("m.jsonl", "m2", "answer", 3)
    missing = pickle.loads(pickle.dumps(MissingImageError("p.json", "4", "image", "no file at x")))
    assert isinstance(missing, FileNotFoundError) and str(missing) == "p.json: record 4: image: no file at x"


# ---------------------------------------------------------------------------------------------- file-level faults

NOT_UTF8 = b'{"1": {"question": "caf\xe9"}}'


@pytest.mark.parametrize("skip_bad", [False, True])
@pytest.mark.parametrize("file_name,content,match", [
    ("problems.json", NOT_UTF8, "problems.json: not UTF-8"),
    ("pid_splits.json", NOT_UTF8, "pid_splits.json: not UTF-8"),
    ("problems.json", b'{"1": {"question": ', "problems.json: malformed JSON at line 1"),
    ("problems.json", b'[{"question": "Q"}]', "problems.json: expected an object of pid -> problem at the top "
                                               "level, got list"),
    ("pid_splits.json", b'["1", "3"]', "pid_splits.json: expected an object of split -> pids"),
    ("pid_splits.json", b'{"train": "1,3"}', "pid_splits.json: split 'train': expected a list of pids"),
    ("pid_splits.json", b'{"test": []}', "split: 'train' is not in .*pid_splits.json"),
])
def test_scienceqa_file_faults_raise_even_with_skip_bad(tmp_path, skip_bad, file_name, content, match):
    _official(str(tmp_path), {})
    _write(str(tmp_path / file_name), content)
    with pytest.raises(ValueError, match=match):
        read_scienceqa(str(tmp_path), "train", skip_bad=skip_bad)


def test_scienceqa_missing_and_corrupt_files(tmp_path):
    _official(str(tmp_path / "a"), {})
    os.remove(tmp_path / "a" / "pid_splits.json")
    with pytest.raises(FileNotFoundError, match="pid_splits.json"):
        read_scienceqa(str(tmp_path / "a"), "train", skip_bad=True)
    _parquet(str(tmp_path / "b"), {})
    _write(str(tmp_path / "b" / "data" / "train-00001-of-00002.parquet"), b"PAR1 not really")
    with pytest.raises(ValueError, match="train-00001-of-00002.parquet: not a readable parquet file"):
        read_scienceqa(str(tmp_path / "b"), "train", skip_bad=True)


@pytest.mark.parametrize("skip_bad", [False, True])
@pytest.mark.parametrize("file_name,content,match", [
    ("m.jsonl", b'{"id": "m1", "question": "caf\xe9"}\n', "m.jsonl: not UTF-8"),
    ("m.json", b'{"id": "m1", "question": "Q"}', "m.json: expected a list of records .* got dict"),
    ("m.json", b'"just a string"', "m.json: expected a list of records .* got str"),
    ("m.json", b'[{"id": "m1"}, {"id": ', "m.json: malformed JSON at line 1"),
    ("m.txt", b'[{"id": "m1"}, ', "m.txt: malformed JSON"),  # another extension, sniffed as a JSON list
])
def test_m3cot_file_faults_raise_even_with_skip_bad(tmp_path, skip_bad, file_name, content, match):
    _write(str(tmp_path / file_name), content)
    with pytest.raises(ValueError, match=match):
        read_m3cot(str(tmp_path / file_name), skip_bad=skip_bad)


def test_utf8_with_byte_order_mark_is_read(tmp_path):
    read, *_ = _m3cot_json(str(tmp_path), {})
    path = tmp_path / "m3cot.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r.id for r in read(False)[0]] == ["m1", "m2", "m3"]


def test_load_checks_its_spec(tmp_path):
    with pytest.raises(ValueError, match="data.m3cot.eval: missing"):
        load("m3cot", {"train": "t.jsonl"})
    with pytest.raises(ValueError, match="data.scienceqa.skip_bad: expected true or false, got 'yes'"):
        load("scienceqa", {"root": str(tmp_path), "skip_bad": "yes"})
    with pytest.raises(ValueError, match="expected synthetic, scienceqa or m3cot"):
        load("vqa", {})


def test_json_the_parser_cannot_take_is_a_bad_line_or_a_bad_file(tmp_path):
    """Nesting deeper than the parser's stack and integers beyond Python's digit limit."""
    deep = "[" * 100000 + "]" * 100000
    for i, line in enumerate([deep, "1" * 5000]):
        path = tmp_path / f"m{i}.jsonl"
        path.write_text(line + "\n")
        records, skipped = read_m3cot(str(path), skip_bad=True)
        assert records == [] and skipped[0][0] == "line 1" and "cannot take" in skipped[0][1]
        with pytest.raises(ValueError, match=r"line 1.*cannot take"):
            read_m3cot(str(path))
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(ValueError, match=r"deep\.json: JSON this reader cannot take"):
        read_m3cot(str(tmp_path / "deep.json"), skip_bad=True)
