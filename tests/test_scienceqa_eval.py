"""ScienceQA as MM-CoT evaluates it (the two-stage prompts, its answer pattern with and without its random
fallback, the official breakdown on fixture records built to hit every category, the rationale scores against
hand-computed values) and Multi30K (the reader on fixture files, corpus BLEU through sacrebleu)."""
import gzip
import json
import math
import os
import random
import sys

import numpy as np
import pytest

from mmlatent.data import Record, corpus_bleu, rationale_scores, read_multi30k, scienceqa_breakdown
from mmlatent.data import scienceqa as sqa
from mmlatent.data.readers import read_scienceqa


def record(rid, subject, grade, hint="", image=None, answer=0):
    return Record(id=rid, question=f"q{rid}", options=["yes", "no", "maybe"], answer=answer, rationale="r",
                  image=image, meta=dict(subject=subject, grade=grade, hint=hint, image=image, question=f"q{rid}",
                                         solution=f"Because {rid}."))


# every category: natural / social / language science, text context, image, neither, grades on both sides
RECORDS = [record("1", "natural science", "grade2", hint="A hint.", image="image.png"),
           record("2", "natural science", "grade8"),
           record("3", "social science", "grade5", image="image.png"),
           record("4", "language science", "grade11", hint="Read this."),
           record("5", "social science", "grade12")]
CORRECT = [True, False, True, True, False]


def test_the_breakdown_counts_each_category_as_mm_cot_does():
    out = scienceqa_breakdown(RECORDS, CORRECT)
    assert list(out) == list(sqa.BREAKDOWN_KEYS)
    expected = {"NAT": 50.0, "SOC": 50.0, "LAN": 100.0, "TXT": 100.0, "IMG": 100.0, "NO": 0.0,
                "G1-6": 100.0, "G7-12": 100 / 3, "Avg": 60.0}
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key


def test_a_category_without_records_is_absent():
    out = scienceqa_breakdown(RECORDS[:1], [True])
    assert set(out) == {"NAT", "TXT", "IMG", "G1-6", "Avg"}
    with pytest.raises(ValueError, match="correct: expected one bool per record \\(1\\), got 2"):
        scienceqa_breakdown(RECORDS[:1], [True, False])
    with pytest.raises(TypeError, match="correct\\[0\\]: expected a bool"):
        scienceqa_breakdown(RECORDS[:1], [1])


def _png(path):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)


def test_read_scienceqa_carries_what_the_breakdown_and_prompts_read(tmp_path):
    problems = {
        "1": dict(question="Which is red?", choices=["apple", "sky"], answer=0, hint="Look.", image="image.png",
                  solution="Apples are red.", subject="natural science", grade="grade1"),
        "2": dict(question="Which word rhymes?", choices=["cat", "dog"], answer=1, hint="", image=None,
                  solution="", subject="language science", grade="grade9")}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"]}))
    _png(str(tmp_path / "images" / "test" / "1" / "image.png"))
    records, _ = read_scienceqa(str(tmp_path), "test", with_imageless=True)
    assert [r.id for r in records] == ["1", "2"] and records[1].image is None
    assert records[0].meta == dict(subject="natural science", grade="grade1", hint="Look.", image="image.png",
                                   question="Which is red?", solution="Apples are red.")
    assert scienceqa_breakdown(records, [True, False]) == {"NAT": 100.0, "LAN": 0.0, "TXT": 100.0, "IMG": 100.0,
                                                          "NO": 0.0, "G1-6": 100.0, "G7-12": 0.0, "Avg": 50.0}
    assert [r.id for r in read_scienceqa(str(tmp_path), "test")[0]] == ["1"]  # by default, images only
    assert sqa.rationale_prompt(records[0]) == ("Question: Which is red?\nContext: Look.\nOptions: (A) apple "
                                                "(B) sky\nSolution:")
    assert sqa.rationale_prompt(records[1]).startswith("Question: Which word rhymes?\nContext: N/A\n")
    assert sqa.rationale_target(records[0]) == "Apples are red."
    assert sqa.answer_prompt(records[0], " Apples are red. ") == ("Question: Which is red?\nContext: Look.\n"
                                                                 "Options: (A) apple (B) sky\nApples are red.\n"
                                                                 "Answer:")
    assert sqa.answer_target(records[1]) == "The answer is (B)."


def test_answers_parse_with_mm_cots_pattern_and_its_random_fallback():
    r = RECORDS[0]  # gold A
    assert sqa.parse_answer("so The answer is (A).") == "A"
    assert sqa.parse_answer("The answer is (A). The answer is (B).") is None  # not exactly one match
    assert sqa.parse_answer("the answer is A") is None
    assert sqa.answer_correct("The answer is (A).", r) and not sqa.answer_correct("no idea", r)
    rng = random.Random(0)
    draws = [sqa.answer_correct("no idea", r, random_fallback=rng) for _ in range(300)]
    assert 0.2 < sum(draws) / 300 < 0.47  # one of three options at random


def test_bleu_and_rouge_l_equal_hand_computed_values():
    ref, hyp = "the cat is on the mat.", "the cat is on mat"
    assert sqa.mmcot_tokens(ref) == ["the", "cat", "is", "on", "the", "mat"]
    bp = math.exp(1 - 6 / 5)
    assert sqa.sentence_bleu(ref, hyp, 1) == pytest.approx(bp)  # 5 of 5 unigrams match
    p = [1.0, 3 / 4, 2 / 3, 1 / 2]  # "on mat" is no reference bigram, and so on up
    assert sqa.sentence_bleu(ref, hyp, 4) == pytest.approx(bp * math.exp(sum(map(math.log, p)) / 4))
    assert sqa.sentence_bleu(ref, "dog", 4) == 0.0
    lcs = 5
    assert sqa.rouge_l(ref, hyp) == pytest.approx(2 * (lcs / 5) * (lcs / 6) / (lcs / 5 + lcs / 6))
    scores = rationale_scores([hyp, "anything"], [ref, " "])
    assert scores["n"] == 1 and scores["bleu1"] == pytest.approx(100 * bp)


# -------------------------------------------------------------------------------------------------- Multi30K

def _multi30k(root, split="val", en=("A dog runs.", "Two men talk."), de=("Ein Hund rennt.", "Zwei Männer reden."),
              images=("1.jpg", "2.jpg")):
    raw = root / "data" / "task1" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for lang, lines in (("en", en), ("de", de)):
        with gzip.open(raw / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    splits = root / "data" / "task1" / "image_splits"
    splits.mkdir(parents=True, exist_ok=True)
    (splits / f"{split}.txt").write_text("\n".join(images) + "\n")


def test_multi30k_reads_line_aligned_files_with_their_images(tmp_path):
    _multi30k(tmp_path)
    flickr = tmp_path / "flickr30k"
    for name in ("1.jpg", "2.jpg"):
        _png(str(flickr / name))
    records = read_multi30k(str(tmp_path), "val", image_root=str(flickr))
    assert [(r.id, r.source, r.target) for r in records] == [("val:1", "A dog runs.", "Ein Hund rennt."),
                                                            ("val:2", "Two men talk.", "Zwei Männer reden.")]
    assert records[1].image == str(flickr / "2.jpg")
    assert read_multi30k(str(tmp_path), "val", source="de", target="en")[0].target == "A dog runs."


def test_multi30k_bad_files_name_the_file_and_line(tmp_path):
    _multi30k(tmp_path / "a", de=("Ein Hund rennt.",))
    with pytest.raises(ValueError, match="not line-aligned .*val.de.gz has 1"):
        read_multi30k(str(tmp_path / "a"), "val")
    _multi30k(tmp_path / "b", en=("A dog runs.", " "))
    with pytest.raises(ValueError, match="val.en.gz:2: empty line"):
        read_multi30k(str(tmp_path / "b"), "val")
    _multi30k(tmp_path / "c")
    (tmp_path / "flickr").mkdir()
    with pytest.raises(FileNotFoundError, match="val.txt:1: no image"):
        read_multi30k(str(tmp_path / "c"), "val", image_root=str(tmp_path / "flickr"))
    with pytest.raises(FileNotFoundError, match="no file at .*test_2016_flickr.en"):
        read_multi30k(str(tmp_path / "c"), "test_2016_flickr")
    with pytest.raises(ValueError, match="target: expected one of en, de, fr, cs"):
        read_multi30k(str(tmp_path / "c"), "val", target="it")


def test_corpus_bleu_is_sacrebleus(monkeypatch):
    import sacrebleu
    hyps, refs = ["Ein Hund rennt schnell.", "Zwei Männer reden."], ["Ein Hund rennt.", "Zwei Männer reden."]
    assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # as on a machine without the extra
    with pytest.raises(ImportError, match="pip install 'mmlatent\\[mt\\]'"):
        corpus_bleu(hyps, refs)
