"""The data side of Modal-mixed CoT: interleaved records, the Zebra-CoT reader (on parquet files written by pyarrow in
Zebra-CoT's layout, with PNGs encoded by PIL), the collator's layout token by token, and the synthetic kinds whose
reasoning passes through an intermediate state (their answers recomputed here from the pixels of the initial image).
"""
import hashlib
import io
import json
import os
import re

import numpy as np
import pytest
import torch

from mmlatent.data import VLMCollator, WordTokenizer, image_processor_for, synthetic
from mmlatent.data.interleaved import (ImageRef, InterleavedRecord, InterleavedRecordError, ModalMixedCollator,
                                       join_text, parse_marked_text)
from mmlatent.data.readers import RecordError, read_zebra_cot
from mmlatent.models.tiny import tiny_qwen2_vl

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

START, END, LATENT = 4, 5, 3  # WordTokenizer's start/end of latent reasoning and latent ids


@pytest.fixture(scope="module")
def tokenizer():
    extra = ["which", "way", "draw", "then", "done", "first", "them", "look"]  # the fixtures' other words
    return WordTokenizer(synthetic.interleaved_vocabulary() + extra)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return image_processor_for(tiny_qwen2_vl(vocab=len(tokenizer)))


def _solid(colour, size=24):
    return np.full((size, size, 3), colour, dtype=np.uint8)


def _png(colour, size=8):
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(_solid(colour, size)).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- Zebra-CoT reader

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _image(colour):
    return {"bytes": _png(colour), "path": None}


def _write_zebra(path, rows, problem=2, reasoning=2, types=None, extra=()):
    """rows: dicts of the three text columns and any image columns (missing ones are null); types: a column's type
    other than string."""
    types = types or {}
    fields = [(name, types.get(name, pa.string())) for name in ("Question", "Text Reasoning Trace", "Final Answer")]
    fields += [(f"problem_image_{i}", IMAGE) for i in range(1, problem + 1)]
    fields += [(f"reasoning_image_{i}", IMAGE) for i in range(1, reasoning + 1)]
    fields += list(extra)
    schema = pa.schema(fields)
    table = pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


GOOD = [
    {"Question": "Which way? <image_start>[problem_image_1]<image_end> Look.",
     "Text Reasoning Trace": "THOUGHT 1: Draw it.\n<image_start>[reasoning_image_1]<image_end>\nTHOUGHT 2: Then "
                             "<image_start>[reasoning_image_2]<image_end> done.",
     "Final Answer": " Left ", "problem_image_1": _image((255, 0, 0)), "problem_image_2": _image((0, 255, 0)),
     "reasoning_image_1": _image((0, 0, 255)), "reasoning_image_2": _image((9, 9, 9))},
    {"Question": "Which way?", "Text Reasoning Trace": "First <image_start>[reasoning_image_2]<image_end>",
     "Final Answer": "Up", "problem_image_1": _image((1, 2, 3)), "reasoning_image_2": _image((4, 5, 6)),
     "reasoning_image_1": {"bytes": None, "path": None}},
]


def test_zebra_cot_layout(tmp_path):
    path = str(tmp_path / "zebra-00000.parquet")
    _write_zebra(path, GOOD)
    records, skipped = read_zebra_cot(path)
    assert skipped == [] and [r.id for r in records] == ["zebra-00000:0", "zebra-00000:1"]
    first, second = records
    assert first.question == ["Which way? ", ImageRef("problem", 0), " Look."]
    assert first.reasoning == ["THOUGHT 1: Draw it.\n", ImageRef("reasoning", 0), "\nTHOUGHT 2: Then ",
                               ImageRef("reasoning", 1), " done."]
    assert first.answer == "Left" and first.options is None and first.text_reasoning is None
    # both problem images are kept (the second, unreferenced, stands before the question), decoded to RGB uint8
    assert [tuple(im[0, 0]) for im in first.problem_images] == [(255, 0, 0), (0, 255, 0)]
    assert [tuple(im[0, 0]) for im in first.reasoning_images] == [(0, 0, 255), (9, 9, 9)]
    assert all(im.dtype == np.uint8 and im.shape == (8, 8, 3) for im in first.problem_images)
    assert first.meta["reasoning_image_columns"] == ["reasoning_image_1", "reasoning_image_2"]
    # the null reasoning_image_1 is not kept: reasoning_image_2 is the record's reasoning image 0
    assert second.reasoning == ["First ", ImageRef("reasoning", 0)]
    assert [tuple(im[0, 0]) for im in second.reasoning_images] == [(4, 5, 6)]
    assert second.rationale == "First "


def test_zebra_cot_folder_ids_and_unreferenced_images(tmp_path):
    _write_zebra(str(tmp_path / "b.parquet"), GOOD[:1])
    _write_zebra(str(tmp_path / "a.parquet"), GOOD[1:])
    _write_zebra(str(tmp_path / "c.parquet"), [dict(GOOD[1], id="q-7")], extra=[("id", pa.string())])
    records, _ = read_zebra_cot(str(tmp_path))
    assert [r.id for r in records] == ["a:0", "b:0", "q-7"]  # sorted file order; the id column when present
    unreferenced = dict(GOOD[0], **{"Text Reasoning Trace": "No sketch <image_start>[reasoning_image_2]<image_end>"})
    _write_zebra(str(tmp_path / "d" / "d.parquet"), [unreferenced])
    record, = read_zebra_cot(str(tmp_path / "d" / "d.parquet"))[0]
    assert len(record.reasoning_images) == 1 and tuple(record.reasoning_images[0][0, 0]) == (9, 9, 9)
    assert record.meta["unreferenced_reasoning_image_columns"] == ["reasoning_image_1"]


BAD_ROWS = [
    ("reasoning-column-missing", {"Text Reasoning Trace": "See <image_start>[reasoning_image_3]<image_end>"},
     "reasoning_image_3", "the file has no such column"),
    ("reasoning-image-null", {"reasoning_image_2": None}, "reasoning_image_2", "referenced by the Text Reasoning "
                                                                               "Trace, but null"),
    ("problem-image-null", {"problem_image_1": None}, "problem_image_1", "referenced by the Question, but null"),
    ("problem-column-missing", {"Question": "Q <image_start>[problem_image_5]<image_end>"}, "problem_image_5",
     "no such column"),
    ("image-not-decoding", {"reasoning_image_1": {"bytes": b"not a png", "path": None}}, "reasoning_image_1",
     "cannot decode"),
    ("problem-image-truncated", {"problem_image_2": {"bytes": _png((1, 1, 1))[:30], "path": None}},
     "problem_image_2", "cannot decode"),
    ("question-blank", {"Question": "   "}, "Question", "expected text"),
    ("question-null", {"Question": None}, "Question", "expected a string"),
    ("answer-blank", {"Final Answer": "\n"}, "Final Answer", "expected text"),
    ("answer-null", {"Final Answer": None}, "Final Answer", "expected a string"),
    ("reasoning-marker-in-question", {"Question": "Q <image_start>[reasoning_image_1]<image_end>"}, "Question",
     "may reference only problem images"),
    ("problem-marker-in-trace", {"Text Reasoning Trace": "T <image_start>[problem_image_1]<image_end>"},
     "Text Reasoning Trace", "may reference only reasoning images"),
    ("marker-numbered-from-0", {"Text Reasoning Trace": "T <image_start>[reasoning_image_0]<image_end>"},
     "Text Reasoning Trace", "numbers its image from 0"),
]


@pytest.mark.parametrize("changes,field,problem", [pytest.param(c, f, p, id=n) for n, c, f, p in BAD_ROWS])
def test_zebra_cot_bad_rows_are_reported_or_skipped(tmp_path, changes, field, problem):
    # the bad row is row 1 of three in one file
    rows = [GOOD[0], dict(GOOD[0], **changes), GOOD[1]]
    path = str(tmp_path / "train-00000.parquet")
    _write_zebra(path, rows)
    with pytest.raises(RecordError) as info:
        read_zebra_cot(path)
    message = str(info.value)
    assert info.value.record_id == "train-00000:1" and info.value.field == field
    assert message.startswith(f"{path}: record train-00000:1: {field}: ") and problem in message
    records, skipped = read_zebra_cot(path, skip_bad=True)
    assert [r.id for r in records] == ["train-00000:0", "train-00000:2"]
    assert skipped == [("train-00000:1", message)]


def test_zebra_cot_non_string_trace_and_bad_ids(tmp_path):
    # a trace column of ints in a file of its own (a parquet column has one type), next to a good file
    _write_zebra(str(tmp_path / "a.parquet"), GOOD[:1])
    _write_zebra(str(tmp_path / "b.parquet"), [dict(GOOD[1], **{"Text Reasoning Trace": 7})],
                 types={"Text Reasoning Trace": pa.int64()})
    with pytest.raises(RecordError, match=r"b\.parquet: record b:0: Text Reasoning Trace: expected a string, got 7 "
                                          r"\(int\)"):
        read_zebra_cot(str(tmp_path))
    records, skipped = read_zebra_cot(str(tmp_path), skip_bad=True)
    assert [r.id for r in records] == ["a:0"] and [s[0] for s in skipped] == ["b:0"]
    _write_zebra(str(tmp_path / "q" / "q.parquet"), [dict(GOOD[1], Question=8)], types={"Question": pa.int64()})
    with pytest.raises(RecordError, match=r"record q:0: Question: expected a string, got 8 \(int\)"):
        read_zebra_cot(str(tmp_path / "q"))
    ids = [dict(GOOD[1], id="x"), dict(GOOD[1], id="x"), dict(GOOD[1], id=None)]
    _write_zebra(str(tmp_path / "i" / "i.parquet"), ids, extra=[("id", pa.string())])
    records, skipped = read_zebra_cot(str(tmp_path / "i" / "i.parquet"), skip_bad=True)
    assert [r.id for r in records] == ["x"] and [s[0] for s in skipped] == ["x", "i:2"]
    assert "the same id as the record at i.parquet row 0" in skipped[0][1] and "id: expected" in skipped[1][1]


@pytest.mark.parametrize("skip_bad", [False, True])
def test_zebra_cot_file_faults_raise_even_with_skip_bad(tmp_path, skip_bad):
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        read_zebra_cot(str(tmp_path / "none.parquet"), skip_bad=skip_bad)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="without \\*.parquet files"):
        read_zebra_cot(str(tmp_path / "empty"), skip_bad=skip_bad)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="broken.parquet: not a readable parquet file"):
        read_zebra_cot(str(tmp_path / "broken.parquet"), skip_bad=skip_bad)
    table = pa.Table.from_pylist([{"Question": "Q", "Text Reasoning Trace": "T"}])
    pq.write_table(table, str(tmp_path / "short.parquet"))
    with pytest.raises(ValueError, match="short.parquet: missing column 'Final Answer'"):
        read_zebra_cot(str(tmp_path / "short.parquet"), skip_bad=skip_bad)
    with pytest.raises(TypeError, match="skip_bad"):
        read_zebra_cot(str(tmp_path / "short.parquet"), skip_bad="yes")


# ------------------------------------------------------------------------------------------ interleaved records

def _record(**changes):
    fields = dict(id="r1", question=["What is it?"], reasoning=["Swap them.", ImageRef("reasoning", 0), "It is red."],
                  answer="A", problem_images=[_solid((200, 0, 0))], reasoning_images=[_solid((0, 0, 200))],
                  options=["red", "blue"], text_reasoning="Swap them. The red one is left. It is red.")
    fields.update(changes)
    return InterleavedRecord(**fields)


def test_parse_marked_text_and_join():
    text = "<image_start>[reasoning_image_2]<image_end>Then <image_start> [reasoning_image_1] <image_end>."
    assert parse_marked_text(text, "reasoning") == [ImageRef("reasoning", 1), "Then ", ImageRef("reasoning", 0), "."]
    assert parse_marked_text("no markers", "problem") == ["no markers"]
    with pytest.raises(ValueError, match="may reference only problem images"):
        parse_marked_text(text, "problem")
    assert join_text(["Swap.", ImageRef("reasoning", 0), "It is red."]) == "Swap. It is red."
    assert join_text(["Look below.\n", ImageRef("reasoning", 0), "\nNext."]) == "Look below.\n\nNext."


@pytest.mark.parametrize("changes,message", [
    (dict(reasoning=["x", ImageRef("reasoning", 1)]), "record r1: reasoning: piece 1 references reasoning image 1, "
                                                      "but the record has 1 reasoning image"),
    (dict(question=[ImageRef("problem", 3), "?"]), "record r1: question: piece 0 references problem image 3"),
    (dict(question=["?", ImageRef("reasoning", 0)]), "record r1: question: piece 1 references reasoning image 0, but "
                                                     "the question may reference only problem images"),
    (dict(reasoning=["x", ImageRef("problem", 0)]), "record r1: reasoning: piece 1 references problem image 0"),
    (dict(reasoning=["no sketch"]), "record r1: reasoning_images: image 0 not referenced by the reasoning"),
    (dict(answer="C"), "record r1: answer: expected a letter A-B for the 2 options, got 'C'"),
    (dict(answer="red"), "record r1: answer: expected a letter A-B"),
    (dict(answer=" ", options=None), "record r1: answer: expected the answer's text"),
    (dict(options=[]), "record r1: options: expected at least one option"),
    (dict(question=["  "]), "record r1: question: expected text or an image"),
    (dict(problem_images=[np.zeros((4, 4), np.uint8)]), "record r1: problem_images\\[0\\]: expected an RGB uint8"),
    (dict(reasoning_images=[np.zeros((4, 4, 3), np.float32)]), "record r1: reasoning_images\\[0\\]: expected an RGB"),
    (dict(reasoning=["x", 5]), "record r1: reasoning: piece 1: expected a string or an ImageRef, got int"),
])
def test_interleaved_record_checks(changes, message):
    with pytest.raises(InterleavedRecordError, match=message):
        _record(**changes)


def test_image_ref_checks():
    with pytest.raises(ValueError, match="kind: expected 'problem' or 'reasoning'"):
        ImageRef("sketch", 0)
    with pytest.raises(ValueError, match="index"):
        ImageRef("problem", -1)
    assert _record(answer="Up", options=None).answer == "Up"


# ------------------------------------------------------------------------------------------------------ collator

def _prompt(tokenizer, record_question, options=("red", "blue")):
    text = f"[Question]:{{{record_question}}}"
    if options:
        text += "\n[Options]:\n" + "\n".join(f"{'ABCD'[i]}.{{{o}}}" for i, o in enumerate(options))
    return tokenizer.encode(text + "\nAnswer:")


def _block(tokenizer, n=9):
    return [tokenizer.vision_start_id] + [tokenizer.image_id] * n + [tokenizer.vision_end_id]


def test_modal_mixed_layout_token_by_token(tokenizer, processor):
    record = _record()
    batch = ModalMixedCollator(tokenizer, processor, num_latents=3)([record])
    prompt = [tokenizer.bos_id] + _block(tokenizer) + _prompt(tokenizer, "What is it?")
    target = tokenizer.encode("Swap them.") + [START] + [LATENT] * 3 + [END] + tokenizer.encode("It is red.")
    target += tokenizer.encode("Therefore, the answer is A") + [tokenizer.eos_id]
    assert batch["input_ids"][0].tolist() == prompt + target
    labels = [-100] * len(prompt) + [t if t != LATENT else -100 for t in target]
    assert batch["labels"][0].tolist() == labels
    assert tokenizer.unk_id not in prompt + target
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6]] and batch["sketch_image_grid_thw"].tolist() == [[1, 6, 6]]
    assert batch["sketches_per_sample"].tolist() == [1] and batch["sketches_per_sample"].dtype == torch.long
    assert torch.equal(batch["sketch_pixel_values"], processor(images=[record.reasoning_images[0]],
                                                               return_tensors="pt")["pixel_values"])


def test_problem_images_inside_and_before_the_question(tokenizer, processor):
    red, green = _solid((200, 0, 0)), _solid((0, 200, 0), 32)
    record = _record(question=["What is", ImageRef("problem", 1), "it?"], problem_images=[red, green])
    batch = ModalMixedCollator(tokenizer, processor, mode="no_cot")([record])
    # image 0 is not referenced: it stands before the question; image 1 (32 px: 16 tokens) sits in the braces
    expected = [tokenizer.bos_id] + _block(tokenizer) + tokenizer.encode("[Question]:{What is") + \
        _block(tokenizer, 16) + tokenizer.encode("it?}\n[Options]:\nA.{red}\nB.{blue}\nAnswer:") + \
        tokenizer.encode("Therefore, the answer is A") + [tokenizer.eos_id]
    assert batch["input_ids"][0].tolist() == expected
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6], [1, 8, 8]]  # in the order of the blocks
    assert "sketch_pixel_values" not in batch and "sketches_per_sample" not in batch


def test_batch_of_sketches_in_start_token_order(tokenizer, processor):
    records = synthetic.generate_interleaved(40, seed=2)
    by_kind = {r.meta["kind"]: r for r in records}
    chosen = [by_kind["double_swap"], by_kind["colour"], by_kind["swap"], by_kind["move"]]
    K = 5
    batch = ModalMixedCollator(tokenizer, processor, num_latents=K)(chosen)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert batch["sketches_per_sample"].tolist() == [2, 0, 1, 1]
    assert bool((mask[:, -1] == 1).all())  # left padding
    for b in range(len(chosen)):
        row = ids[b].tolist()
        pad = int((mask[b] == 0).sum())
        assert row[:pad] == [tokenizer.pad_id] * pad and bool((labels[b, :pad] == -100).all())
        starts = [i for i, t in enumerate(row) if t == START]
        assert len(starts) == len(chosen[b].sketch_refs) == row.count(END)
        for s in starts:  # K placeholders between START and END, unlabelled; START and END labelled
            assert row[s + 1:s + 1 + K] == [LATENT] * K and row[s + 1 + K] == END
            assert bool((labels[b, s + 1:s + 1 + K] == -100).all())
            assert labels[b, s] == START and labels[b, s + 1 + K] == END
        assert row.count(LATENT) == K * len(starts) and row.count(tokenizer.image_id) == 9
    order = [r.reasoning_images[ref.index] for r in chosen for ref in r.sketch_refs]
    assert torch.equal(batch["sketch_pixel_values"], processor(images=order, return_tensors="pt")["pixel_values"])
    assert batch["sketch_image_grid_thw"].tolist() == [[1, 6, 6]] * 4
    problems = processor(images=[r.problem_images[0] for r in chosen], return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], problems)


def test_sketch_size_resizes_with_pil_bilinear(tokenizer, processor):
    from PIL import Image
    record = synthetic.generate_interleaved(1, seed=0, kinds=["swap"])[0]
    batch = ModalMixedCollator(tokenizer, processor, num_latents=2, sketch_size=(48, 40))([record])
    assert batch["sketch_image_grid_thw"].tolist() == [[1, 12, 10]] and batch["image_grid_thw"].tolist() == [[1, 6, 6]]
    resized = np.asarray(Image.fromarray(record.reasoning_images[0]).resize((40, 48), Image.BILINEAR))
    assert torch.equal(batch["sketch_pixel_values"], processor(images=[resized], return_tensors="pt")["pixel_values"])


def test_prompt_only_keeps_the_held_out_sketches(tokenizer, processor):
    records = synthetic.generate_interleaved(3, seed=0, kinds=["swap", "double_swap"])
    full = ModalMixedCollator(tokenizer, processor, num_latents=2)(records)
    prompt = ModalMixedCollator(tokenizer, processor, num_latents=2, prompt_only=True)(records)
    assert "labels" not in prompt
    answer_suffix = tokenizer.encode("\nAnswer:")
    for b in range(len(records)):
        row = prompt["input_ids"][b][prompt["attention_mask"][b].bool()].tolist()
        assert row[-len(answer_suffix):] == answer_suffix and START not in row
        full_row = full["input_ids"][b][full["attention_mask"][b].bool()].tolist()
        assert full_row[:len(row)] == row
    for key in ("sketch_pixel_values", "sketch_image_grid_thw", "sketches_per_sample", "pixel_values"):
        assert torch.equal(prompt[key], full[key])
    cot = ModalMixedCollator(tokenizer, processor, mode="cot", prompt_only=True)(records)
    assert "sketch_pixel_values" not in cot and torch.equal(cot["input_ids"], prompt["input_ids"])


def test_cot_and_no_cot_targets(tokenizer, processor):
    record = synthetic.generate_interleaved(1, seed=0, kinds=["move"])[0]
    for mode, text in [("cot", record.text_reasoning + " Therefore, the answer is " + record.answer),
                       ("no_cot", "Therefore, the answer is " + record.answer)]:
        batch = ModalMixedCollator(tokenizer, processor, mode=mode)([record])
        target = batch["labels"][0][batch["labels"][0] != -100].tolist()
        assert target == tokenizer.encode(text) + [tokenizer.eos_id]
        assert START not in batch["input_ids"][0].tolist() and "sketch_pixel_values" not in batch
    no_text = _record(text_reasoning=None)
    batch = ModalMixedCollator(tokenizer, processor, mode="cot")([no_text])
    target = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert target == tokenizer.encode("Swap them. It is red. Therefore, the answer is A") + [tokenizer.eos_id]


@pytest.mark.parametrize("mode", ["cot", "no_cot"])
def test_text_only_records_batch_as_vlm_collator_does(tokenizer, processor, mode):
    plain = synthetic.generate(4, seed=7)
    interleaved = synthetic.generate_interleaved(4, seed=7, kinds=synthetic.KINDS)
    assert [r.question[0] for r in interleaved] == [r.question for r in plain]
    ours = ModalMixedCollator(tokenizer, processor, mode=mode)(interleaved)
    theirs = VLMCollator(tokenizer, processor, mode=mode)(plain)
    converted = ModalMixedCollator(tokenizer, processor, mode=mode)(plain)  # Records are converted
    for key in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"):
        assert torch.equal(ours[key], theirs[key]) and torch.equal(converted[key], theirs[key]), key
    mixed = ModalMixedCollator(tokenizer, processor)(interleaved)  # text-only: modal_mixed is cot
    assert mode != "cot" or torch.equal(mixed["input_ids"], theirs["input_ids"])


def test_collator_errors_name_the_record(tokenizer, processor):
    with pytest.raises(ValueError, match="num_latents: expected a positive int"):
        ModalMixedCollator(tokenizer, processor, num_latents=0)
    with pytest.raises(ValueError, match="mode: expected one of modal_mixed, cot, no_cot"):
        ModalMixedCollator(tokenizer, processor, mode="ivtlr")
    with pytest.raises(ValueError, match="sketch_size: mode 'cot' has no sketches"):
        ModalMixedCollator(tokenizer, processor, mode="cot", sketch_size=(448, 448))
    with pytest.raises(ValueError, match="sketch_size: expected"):
        ModalMixedCollator(tokenizer, processor, sketch_size=(448,))
    with pytest.raises(ValueError, match="three different ids"):
        ModalMixedCollator(tokenizer, processor, end_token_id=START)
    collate = ModalMixedCollator(tokenizer, processor)
    record = _record(id="zebra:3")
    record.reasoning.append(ImageRef("reasoning", 4))  # changed after it was built
    with pytest.raises(InterleavedRecordError, match="record zebra:3: reasoning: piece 3 references reasoning "
                                                     "image 4"):
        collate([_record(id="ok"), record])
    record = _record(id="zebra:4")
    record.answer = "D"
    with pytest.raises(InterleavedRecordError, match="record zebra:4: answer: expected a letter A-B"):
        collate([record])
    record = _record(id="zebra:5", problem_images=[str("/nonexistent/image.png")])
    with pytest.raises(FileNotFoundError, match="record zebra:5: image: no file"):
        collate([record])


def test_zebra_records_batch(tmp_path, tokenizer, processor):
    path = str(tmp_path / "z.parquet")
    _write_zebra(path, GOOD)
    records, _ = read_zebra_cot(path)
    batch = ModalMixedCollator(tokenizer, processor, num_latents=4, sketch_size=(24, 24))(records)
    assert batch["sketches_per_sample"].tolist() == [2, 1]
    assert batch["sketch_image_grid_thw"].tolist() == [[1, 6, 6]] * 3
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2]] * 3  # 8 px images: one merged token each
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    first_image = row.index(tokenizer.vision_start_id)
    assert first_image == 1 and row[first_image + 3:].index(tokenizer.vision_start_id) > 0  # before and inside
    # a free-form answer: "Therefore, the answer is Left"
    assert row[-2] == tokenizer.encode("left")[0] and row[-1] == tokenizer.eos_id


# ----------------------------------------------------------------------------------------------------- synthetic

def _hash(records):
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.id, r.question, r.options, r.answer, r.rationale, r.meta]).encode())
        digest.update(r.image.tobytes())
    return digest.hexdigest()


def test_existing_kinds_and_vocabulary_are_unchanged():
    """Values computed before the intermediate kinds were added: the shipped checkpoints and their runs depend on
    generate() and vocabulary()."""
    assert _hash(synthetic.generate(50, seed=0)) == "2910849580855dfeafede5af464c7aafc1f53349ca9801611d449ad44dc9d20e"
    assert _hash(synthetic.generate(50, seed=3, split="test", kinds=["relation", "chain"], weights=[1, 2])) == \
        "34fbaad4bd9c3e661248c2ce731bcb00a283f93a6e1d40539e3e5d5efd465213"
    vocabulary = synthetic.vocabulary()
    assert hashlib.sha256(json.dumps(vocabulary).encode()).hexdigest() == \
        "fdf5622dae3e865c7cd0ee642f4a1726121a87f4821d484ecadcaa74ab8e7c03" and len(vocabulary) == 42
    extended = synthetic.interleaved_vocabulary()
    assert extended[:42] == vocabulary and len(set(extended)) == len(extended) > 42
    base, new = WordTokenizer(vocabulary), WordTokenizer(extended)
    assert base.tokens[:-4] == new.tokens[:len(base.tokens) - 4]  # the old words keep their ids


def test_interleaved_is_deterministic_and_in_vocabulary():
    a = synthetic.generate_interleaved(60, seed=3)
    b = synthetic.generate_interleaved(60, seed=3)
    assert [(r.id, r.question, r.reasoning, r.answer, r.text_reasoning) for r in a] == \
        [(r.id, r.question, r.reasoning, r.answer, r.text_reasoning) for r in b]
    assert all(np.array_equal(x, y) for p, q in zip(a, b) for x, y in zip(p.reasoning_images, q.reasoning_images))
    assert [r.question for r in synthetic.generate_interleaved(60, seed=4)] != [r.question for r in a]
    assert [r.question for r in synthetic.generate_interleaved(60, seed=3, split="test")] != [r.question for r in a]
    weighted = synthetic.generate_interleaved(60, seed=3, weights=[5, 1, 1, 1, 1, 1, 1])
    assert [r.question for r in weighted] != [r.question for r in a]
    assert {r.meta["kind"] for r in a} == set(synthetic.INTERMEDIATE_KINDS + synthetic.KINDS)
    tokenizer = WordTokenizer(synthetic.interleaved_vocabulary())
    for r in a:
        texts = [p for p in r.question + r.reasoning if isinstance(p, str)] + [r.text_reasoning]
        assert all(tokenizer.unk_id not in tokenizer.encode(t) for t in texts), r.id
        sentences = r.text_reasoning.split(". ")
        assert r.text_reasoning.endswith(".") and len(sentences) == r.meta["steps"]
        assert len(r.reasoning_images) == r.meta["sketches"] == len(r.sketch_refs)
        assert r.options == ["red", "green", "blue", "yellow"] and r.answer in "ABCD"
    with pytest.raises(ValueError, match="unknown kind 'rotate'"):
        synthetic.generate_interleaved(2, kinds=["rotate"])


# independent of synthetic's helpers: the grid read back from the pixels, the question parsed from its words
COLOUR_RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (230, 220, 40)}
ROWS, COLS = ["top", "middle", "bottom"], ["left", "centre", "right"]
STEP = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0),
        "left of": (0, -1), "right of": (0, 1)}


def _grid(image):
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    grid = {}
    for r in range(3):
        for c in range(3):
            pixel = tuple(int(v) for v in image[r * 8 + 4, c * 8 + 4])
            assert image[r * 8, c * 8].tolist() == [0, 0, 0]  # the black border of each cell
            if pixel != (0, 0, 0):
                grid[(r, c)] = next(name for name, rgb in COLOUR_RGB.items() if rgb == pixel)
    return grid


def _draw(grid):
    image = np.zeros((24, 24, 3), np.uint8)
    for (r, c), colour in grid.items():
        image[r * 8 + 1:r * 8 + 7, c * 8 + 1:c * 8 + 7] = COLOUR_RGB[colour]
    return image


def _cell(words):
    row, col = words.split()
    return ROWS.index(row), COLS.index(col)


def _at(grid, colour):
    return next(cell for cell, c in grid.items() if c == colour)


def test_intermediate_answers_follow_from_the_initial_image():
    records = synthetic.generate_interleaved(150, seed=11, kinds=synthetic.INTERMEDIATE_KINDS)
    for record in records:
        question, = record.question
        grid = _grid(record.problem_images[0])
        states, kind = [], record.meta["kind"]
        operations, query = question.rsplit(". ", 1)
        if kind in ("swap", "double_swap"):
            swaps = re.findall(r"wap the (\w+) and the (\w+) objects", operations)
            assert len(swaps) == (1 if kind == "swap" else 2) and (kind == "swap" or set(swaps[0]) != set(swaps[1]))
            for a, b in swaps:
                grid = dict(grid)
                cell_a, cell_b = _at(grid, a), _at(grid, b)
                grid[cell_a], grid[cell_b] = b, a
                states.append(grid)
            cell = _cell(re.fullmatch(r"What colour is the object in the (\w+ \w+) cell now\?", query).group(1))
            answer = grid[cell]
        else:
            colour, direction = re.fullmatch(r"Move the (\w+) object one cell (\w+)", operations).groups()
            (r, c), (dr, dc) = _at(grid, colour), STEP[direction]
            assert 0 <= r + dr < 3 and 0 <= c + dc < 3 and (r + dr, c + dc) not in grid  # a valid move
            before = grid
            grid = {cell: col for cell, col in grid.items() if col != colour}
            grid[(r + dr, c + dc)] = colour
            states.append(grid)
            relation, anchor = re.fullmatch(r"What colour is the object (right of|left of|above|below) the (\w+) "
                                            r"object now\?", query).groups()
            ar, ac = _at(grid, anchor)
            target = (ar + STEP[relation][0], ac + STEP[relation][1])
            answer = grid[target]  # KeyError: a question without an answer
            assert colour in (anchor, answer)  # the relation involves the moved object...
            old = _at(before, anchor)
            old_target = (old[0] + STEP[relation][0], old[1] + STEP[relation][1])
            assert before.get(old_target) != answer  # ...so it did not hold before the move
        assert record.answer == "ABCD"[["red", "green", "blue", "yellow"].index(answer)], record.id
        assert len(record.reasoning_images) == len(states)
        for image, state in zip(record.reasoning_images, states):
            assert _grid(image) == state and np.array_equal(image, _draw(state))
            assert np.array_equal(image, synthetic.render(state))
        # the sketch carries the state: the modal-mixed text names no cell before the last sketch, while the text
        # rationale names every object's cell after each operation
        last = max(i for i, p in enumerate(record.reasoning) if isinstance(p, ImageRef))
        assert not any(row in p for p in record.reasoning[:last] if isinstance(p, str) for row in ROWS)
        assert record.reasoning[last + 1:] == [record.text_reasoning.split(". ")[-1]]
        for state in states:
            for cell, colour in state.items():
                assert f"The {colour} object is in the {ROWS[cell[0]]} {COLS[cell[1]]} cell." in \
                    record.text_reasoning
        assert record.text_reasoning.endswith(f" is {answer}.")
