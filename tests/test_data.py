"""mmlatent.data: the synthetic task, the tokenizer, the collator's layout, scoring, and the readers on fixture
files written in the real ScienceQA (official and parquet) and M3CoT layouts."""
import io
import json
import os

import numpy as np
import pytest
import torch

from mmlatent.data import (Record, VLMCollator, WordTokenizer, image_processor_for, lenient_correct,
                           strict_answer, synthetic)
from mmlatent.data.readers import read_m3cot, read_scienceqa
from mmlatent.models.tiny import tiny_qwen2_vl
from mmlatent.train.curriculum import Curriculum, stage_for_epoch


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer(synthetic.vocabulary())


def test_synthetic_is_deterministic_and_well_formed():
    a, b = synthetic.generate(50, seed=3), synthetic.generate(50, seed=3)
    assert [r.question for r in a] == [r.question for r in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [r.question for r in synthetic.generate(50, seed=4)] != [r.question for r in a]
    assert [r.question for r in synthetic.generate(50, seed=3, split="test")] != [r.question for r in a]
    for r in a:
        assert r.image.shape == (24, 24, 3) and r.image.dtype == np.uint8
        assert r.options == synthetic.COLOURS and r.options[r.answer] in r.rationale.split(". ")[-1]
        assert len(r.steps()) == r.meta["steps"] and r.meta["kind"] in synthetic.KINDS
    kinds = {r.meta["kind"] for r in synthetic.generate(200, seed=0)}
    assert kinds == set(synthetic.KINDS)
    with pytest.raises(ValueError, match="kinds"):
        synthetic.generate(3, kinds=["size"])


def test_tokenizer_ids_match_the_tiny_models(tokenizer, tmp_path):
    model = tiny_qwen2_vl(vocab=len(tokenizer))
    assert tokenizer.image_id == model.config.image_token_id
    assert tokenizer.vision_start_id == model.config.vision_start_token_id
    text = "[Question]:{What colour is the object?} Therefore, the answer is B"
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == "[ question ] : { what colour is the object ? } therefore , the answer is b"
    tokenizer.save(str(tmp_path / "tok.json"))
    assert WordTokenizer.load(str(tmp_path / "tok.json")).tokens == tokenizer.tokens


@pytest.mark.parametrize("mode,stage", [("no_cot", 0), ("cot", 0), ("ivtlr", 0), ("ivtlr", 2), ("ivtlr", 3)])
def test_collator_layout(tokenizer, mode, stage):
    model = tiny_qwen2_vl(vocab=len(tokenizer))
    records = synthetic.generate(3, seed=1, kinds=["relation"])
    batch = VLMCollator(tokenizer, image_processor_for(model), mode=mode, stage=stage)(records)
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6]] * 3  # 24 px at patch 4: 9 tokens after the 2x2 merge
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for b, record in enumerate(records):
        row = ids[b][mask[b].bool()].tolist()
        assert row[0] == tokenizer.bos_id and row.count(tokenizer.image_id) == 9 and row[-1] == tokenizer.eos_id
        assert row.count(tokenizer.latent_id) == (stage if mode == "ivtlr" else 0)
        target = labels[b][labels[b] != -100].tolist()
        text = tokenizer.decode(target)
        assert text.endswith(f"the answer is {record.answer_letter.lower()}")
        steps = record.steps(3)
        if mode == "no_cot":
            assert text == "therefore , the answer is " + record.answer_letter.lower()
        else:
            assert text.startswith(tokenizer.decode(tokenizer.encode(" ".join(steps[stage:])))[:5] or "therefore")
        if tokenizer.latent_id in row:  # no label up to and including the last latent token
            last = max(i for i, t in enumerate(ids[b].tolist()) if t == tokenizer.latent_id)
            assert bool((labels[b, :last + 1] == -100).all())
    assert bool((mask[:, -1] == 1).all())  # left padding
    prompt = VLMCollator(tokenizer, image_processor_for(model), mode=mode, stage=stage, prompt_only=True)(records)
    assert "labels" not in prompt
    if mode == "ivtlr" and stage:
        assert bool((prompt["input_ids"][:, -1] == tokenizer.latent_id).all())


def test_record_checks_steps_and_scoring():
    with pytest.raises(ValueError, match="record q7: options"):
        Record("q7", "?", [], 0, "", None)
    with pytest.raises(ValueError, match="record q8: answer: index 4"):
        Record("q8", "?", ["a", "b"], 4, "", None)
    r = Record("q", "?", ["a", "b"], 1, "One. Two. Three. Four", None)
    assert r.steps() == ["One.", "Two.", "Three.", "Four."] and r.steps(3) == ["One.", "Two.", "Three. Four."]
    assert strict_answer("the red one . therefore , the answer is b") == "B"
    assert strict_answer("answer : b") is None
    assert lenient_correct("Answer: A ... the answer is B", "A") and not lenient_correct("the answer is C", "A")
    assert [stage_for_epoch(e, 2, 3) for e in range(9)] == [0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_curriculum_is_the_one_place_that_tells_modes_apart():
    ivtlr = Curriculum("ivtlr", epochs_per_stage=2, max_latent_steps=3, reset_optimizer_per_stage=True)
    assert [ivtlr.stage(e) for e in range(9)] == [0, 0, 1, 1, 2, 2, 3, 3, 3] and ivtlr.final_stage(12) == 3
    assert [ivtlr.resets_optimizer(e, p) for e, p in [(0, None), (1, 0), (2, 1), (8, 7)]] == [False, False, True,
                                                                                                False]
    for mode in ("cot", "no_cot"):
        flat = Curriculum(mode, epochs_per_stage=1, reset_optimizer_per_stage=True)
        assert {flat.stage(e) for e in range(6)} == {0} and not flat.resets_optimizer(3, 2)
    with pytest.raises(ValueError, match="mode"):
        Curriculum("latent")
    with pytest.raises(ValueError, match="epochs_per_stage"):
        Curriculum("ivtlr", epochs_per_stage=0)


def test_collator_refuses_latent_steps_outside_ivtlr(tokenizer):
    with pytest.raises(ValueError, match="stage: mode 'cot' has no latent steps"):
        VLMCollator(tokenizer, None, mode="cot", stage=2)


# ------------------------------------------------------------------------------------------------------ readers

def _png(path, colour=(255, 0, 0)):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), colour, dtype=np.uint8)).save(path)


def _scienceqa_official(root, missing_image=False, bad_answer=False):
    problems = {
        "1": dict(question="Which is red?", choices=["apple", "sky"], answer=0, hint="Look.", image="image.png",
                  solution="Apples are red. The sky is blue.", subject="natural science", grade="grade1"),
        "2": dict(question="No image here", choices=["x", "y"], answer=1, hint="", image=None, solution=""),
        "3": dict(question="Which is blue?", choices=["apple", "sky"], answer=5 if bad_answer else 1, hint="",
                  image="image.png", solution="The sky is blue."),
    }
    with open(os.path.join(root, "problems.json"), "w") as f:
        json.dump(problems, f)
    with open(os.path.join(root, "pid_splits.json"), "w") as f:
        json.dump({"train": ["1", "2", "3"], "test": []}, f)
    _png(os.path.join(root, "images", "train", "1", "image.png"))
    if not missing_image:
        _png(os.path.join(root, "images", "train", "3", "image.png"), (0, 0, 255))


def test_scienceqa_official_layout(tmp_path):
    _scienceqa_official(str(tmp_path))
    records, skipped = read_scienceqa(str(tmp_path), "train")
    assert [r.id for r in records] == ["1", "3"] and skipped == []  # problem 2 has no image
    assert records[0].question == "Which is red? Context: Look." and records[0].answer_letter == "A"
    assert records[0].steps() == ["Apples are red.", "The sky is blue."]
    assert os.path.exists(records[1].image)


def test_scienceqa_bad_records(tmp_path):
    os.makedirs(tmp_path / "a")
    _scienceqa_official(str(tmp_path / "a"), missing_image=True)
    with pytest.raises(FileNotFoundError, match="record 3: image: no file"):
        read_scienceqa(str(tmp_path / "a"), "train")
    records, skipped = read_scienceqa(str(tmp_path / "a"), "train", skip_bad=True)
    assert [r.id for r in records] == ["1"] and skipped[0][0] == "3"
    os.makedirs(tmp_path / "b")
    _scienceqa_official(str(tmp_path / "b"), bad_answer=True)
    with pytest.raises(ValueError, match="record 3: answer: index 5"):
        read_scienceqa(str(tmp_path / "b"), "train")
    with pytest.raises(FileNotFoundError, match="neither problems.json"):
        read_scienceqa(str(tmp_path / "nothing"), "train")


def test_scienceqa_parquet_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(buffer, format="PNG")
    rows = [dict(image={"bytes": buffer.getvalue(), "path": None}, question="Q1", choices=["a", "b", "c"], answer=2,
                 hint="", solution="Because. Done.", subject="s"),
            dict(image=None, question="Q2", choices=["a"], answer=0, hint="", solution="", subject="s")]
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "data" / "test-00000-of-00001.parquet"))
    records, skipped = read_scienceqa(str(tmp_path), "test")
    assert len(records) == 1 and records[0].image.shape == (8, 8, 3) and records[0].answer_letter == "C"


def test_m3cot_jsonl_and_errors(tmp_path):
    _png(str(tmp_path / "images" / "a.png"))
    rows = [dict(id="m1", question="Q?", choices=["x", "y"], answer="B", rationale="R1. R2.", image="images/a.png",
                 split="train"),
            dict(id="m2", question="Q?", choices=[], answer="A", rationale="", image="images/a.png", split="train"),
            dict(id="m3", question="Q?", choices=["x"], answer="A", rationale="", image="images/none.png",
                 split="train")]
    path = tmp_path / "m3cot.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="record m2: options"):
        read_m3cot(str(path))
    records, skipped = read_m3cot(str(path), skip_bad=True)
    assert [r.id for r in records] == ["m1"] and records[0].answer == 1
    assert [s[0] for s in skipped] == ["m2", "m3"] and "no file" in skipped[1][1]
    (tmp_path / "m3cot.json").write_text(json.dumps(rows[:1]))
    assert read_m3cot(str(tmp_path / "m3cot.json"))[0][0].id == "m1"
    batch = VLMCollator(WordTokenizer(["x", "y", "q"]), image_processor_for(tiny_qwen2_vl()), mode="cot")(records)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] and torch.is_tensor(batch["labels"])


def test_chameleon_batches(tokenizer):
    from mmlatent.data.collate import vlm_image_token_ids
    from mmlatent.models import IVTLR, ivtlr_reference
    from mmlatent.models.tiny import tiny_chameleon
    model = tiny_chameleon()
    records = synthetic.generate(2, seed=5, kinds=["relation"])
    ids = vlm_image_token_ids(model)
    batch = VLMCollator(tokenizer, image_processor_for(model), mode="ivtlr", stage=2, image_token_ids=ids)(records)
    assert "image_grid_thw" not in batch and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert float(batch["pixel_values"].min()) >= -1 and float(batch["pixel_values"].max()) <= 1
    for row in batch["input_ids"].tolist():
        start = row.index(ids[1])
        assert row[start + 1:start + 65] == [ids[0]] * 64 and row[start + 65] == ids[2]
    ours = IVTLR(model, tokenizer.latent_id, k=2)(**batch)
    theirs = ivtlr_reference(model, tokenizer.latent_id, k=2)(**batch)
    assert [s.tolist() for s in ours.selected] == [s.tolist() for s in theirs.selected]
    assert abs(float(ours.loss) - float(theirs.loss)) <= 1e-5 * float(theirs.loss)
