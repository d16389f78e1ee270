"""ScienceQA as MM-CoT evaluates it: the two-stage prompts (rationale, then answer), its answer pattern with and
without its random fallback, its official breakdown by subject, context and grade, and the rationale scores
(ROUGE-L, BLEU-1 / BLEU-4 on MM-CoT's tokenisation).

Records are :class:`~mmlatent.data.Record` s as :func:`~mmlatent.data.readers.read_scienceqa` returns them, with
``meta`` holding ``subject``, ``grade``, ``hint``, ``image``, ``question`` and ``solution``.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from typing import Dict, List, Optional, Sequence

from .records import LETTERS, Record

# amazon-science/mm-cot, main.py: exactly one match, else the answer counts as failed
ANSWER_PATTERN = re.compile(r"The answer is \(([A-Z])\)")
BREAKDOWN_KEYS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}
STAGES = ("rationale", "answer")


def _meta(record: Record, key: str, default: str = "") -> str:
    value = record.meta.get(key)
    return default if value is None else str(value)


def _question_and_context(record: Record) -> str:
    question = _meta(record, "question") or record.question
    context = _meta(record, "hint").strip() or "N/A"  # MM-CoT's empty context
    options = " ".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(record.options))
    return f"Question: {question}\nContext: {context}\nOptions: {options}\n"


def rationale_prompt(record: Record) -> str:
    """Stage 1's input, MM-CoT's QCM-E: ``Question: ...\\nContext: {hint or N/A}\\nOptions: (A) ... (B) ...\\n
    Solution:``."""
    return _question_and_context(record) + "Solution:"


def rationale_target(record: Record) -> str:
    """Stage 1's target: the record's solution (its rationale when the record has no ``solution`` meta)."""
    return _meta(record, "solution") or record.rationale


def answer_prompt(record: Record, rationale: str) -> str:
    """Stage 2's input, MM-CoT's QCMG-A: the question, context and options, the rationale (gold in training,
    stage 1's generated one in evaluation), ``Answer:``."""
    if not isinstance(rationale, str):
        raise TypeError(f"rationale: expected a string for record {record.id}, got {type(rationale).__name__}")
    return _question_and_context(record) + f"{rationale.strip()}\nAnswer:"


def answer_target(record: Record) -> str:
    """Stage 2's target: ``The answer is (X).``"""
    return f"The answer is ({record.answer_letter})."


def parse_answer(text: str) -> Optional[str]:
    """The letter of MM-CoT's pattern ``The answer is \\(([A-Z])\\)`` when the text holds exactly one match,
    else None (MM-CoT counts that as failed)."""
    found = ANSWER_PATTERN.findall(text)
    return found[0] if len(found) == 1 else None


def answer_correct(text: str, record: Record, *, random_fallback: Optional[random.Random] = None) -> bool:
    """Whether ``text`` answers ``record``: strictly (an unparsable answer is wrong), or with ``random_fallback``
    (a ``random.Random``) MM-CoT's rule, a random option in place of an unparsable answer."""
    letter = parse_answer(text)
    if letter is None and random_fallback is not None:
        letter = LETTERS[random_fallback.randrange(len(record.options))]
    return letter == record.answer_letter


def scienceqa_breakdown(records: Sequence[Record], correct: Sequence[bool]) -> Dict[str, float]:
    """MM-CoT's official ScienceQA breakdown (utils_evaluate.py), in percent.

    NAT / SOC / LAN by ``meta['subject']`` (natural / social / language science), TXT: a non-empty hint, IMG: an
    image, NO: neither, G1-6 / G7-12 by ``meta['grade']`` (``grade1`` ... ``grade12``), Avg: every record. A
    category with no record is absent.
    """
    records, correct = list(records), list(correct)
    if len(records) != len(correct):
        raise ValueError(f"correct: expected one bool per record ({len(records)}), got {len(correct)}")
    for i, value in enumerate(correct):
        if not isinstance(value, bool):
            raise TypeError(f"correct[{i}]: expected a bool, got {type(value).__name__}")
    groups = breakdown_groups(records)
    return {key: 100.0 * sum(correct[i] for i in rows) / len(rows) for key, rows in groups.items()}


def breakdown_groups(records: Sequence[Record]) -> Dict[str, List[int]]:
    """{category: the indices of its records} of :func:`scienceqa_breakdown`'s categories, in its key order; a
    category without records absent."""
    groups: Dict[str, List[int]] = {key: [] for key in BREAKDOWN_KEYS}
    for i, record in enumerate(records):
        if not isinstance(record, Record):
            raise TypeError(f"records: expected Record s, got {type(record).__name__}")
        subject = _meta(record, "subject")
        for key, name in SUBJECTS.items():
            if subject == name:
                groups[key].append(i)
        has_text = bool(_meta(record, "hint").strip())
        has_image = record.image is not None or bool(record.meta.get("image"))
        if has_text:
            groups["TXT"].append(i)
        if has_image:
            groups["IMG"].append(i)
        if not has_text and not has_image:
            groups["NO"].append(i)
        grade = re.fullmatch(r"grade(\d+)", _meta(record, "grade"))
        if grade and 1 <= int(grade.group(1)) <= 6:
            groups["G1-6"].append(i)
        elif grade and 7 <= int(grade.group(1)) <= 12:
            groups["G7-12"].append(i)
        groups["Avg"].append(i)
    return {key: rows for key, rows in groups.items() if rows}


# --------------------------------------------------------------------------------------------- rationale scores

def mmcot_tokens(text: str) -> List[str]:
    """MM-CoT's BLEU tokenisation (evaluations.py): split on whitespace and periods, empty pieces dropped."""
    return [t for t in re.split(r"\s|\.", text) if t]


def sentence_bleu(reference: str, hypothesis: str, order: int = 4) -> float:
    """BLEU of one hypothesis against one reference on :func:`mmcot_tokens`, uniform weights over 1..``order``
    grams, no smoothing (nltk's ``sentence_bleu`` as MM-CoT calls it: 0 when an order has no match), in [0, 1]."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"order: expected 1, 2, 3 or 4, got {order!r}")
    ref, hyp = mmcot_tokens(reference), mmcot_tokens(hypothesis)
    if not hyp or not ref:
        return 0.0
    log_precision = 0.0
    for n in range(1, order + 1):
        hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        matches = sum(min(count, ref_grams[gram]) for gram, count in hyp_grams.items())
        total = sum(hyp_grams.values())
        if matches == 0 or total == 0:
            return 0.0
        log_precision += math.log(matches / total) / order
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision)


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F1 in [0, 1]: the longest common subsequence of the lower-cased alphanumeric words (the sentence-
    level variant; the ``rouge`` package MM-CoT calls unions the LCS over sentences, which can read a little
    higher on multi-sentence text)."""
    ref = re.findall(r"[a-z0-9]+", reference.lower())
    hyp = re.findall(r"[a-z0-9]+", hypothesis.lower())
    if not ref or not hyp:
        return 0.0
    previous = [0] * (len(hyp) + 1)
    for r in ref:
        current = [0]
        for j, h in enumerate(hyp):
            current.append(previous[j] + 1 if r == h else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rationale_scores(hypotheses: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Mean ROUGE-L, BLEU-1 and BLEU-4 (percent) of generated rationales against the gold ones; like MM-CoT,
    pairs with an empty reference are skipped (``n`` counts the rest)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses: expected one per reference ({len(references)}), got {len(hypotheses)}")
    pairs = [(h, r) for h, r in zip(hypotheses, references) if r.strip()]
    if not pairs:
        return {"rouge_l": 0.0, "bleu1": 0.0, "bleu4": 0.0, "n": 0}
    mean = lambda values: 100.0 * sum(values) / len(values)  # noqa: E731
    return {"rouge_l": mean([rouge_l(r, h) for h, r in pairs]),
            "bleu1": mean([sentence_bleu(r, h, 1) for h, r in pairs]),
            "bleu4": mean([sentence_bleu(r, h, 4) for h, r in pairs]), "n": len(pairs)}


__all__ = ["rationale_prompt", "rationale_target", "answer_prompt", "answer_target", "parse_answer",
           "answer_correct", "scienceqa_breakdown", "breakdown_groups", "mmcot_tokens", "sentence_bleu", "rouge_l", "rationale_scores",
           "ANSWER_PATTERN", "BREAKDOWN_KEYS", "STAGES"]
