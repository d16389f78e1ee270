"""Multi30K (multimodal translation) from a local copy of its repository layout, and corpus BLEU with sacrebleu
(an optional extra: ``pip install 'mmlatent[mt]'``).

Layout: ``data/task1/raw/{split}.{en,de,fr,cs}.gz`` (one sentence per line) line-aligned with
``data/task1/image_splits/{split}.txt`` (one Flickr30k file name per line); the images come from a separate
Flickr30k folder.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

LANGUAGES = ("en", "de", "fr", "cs")


@dataclass
class TranslationRecord:
    """One sentence pair with its image: ``id`` (``{split}:{line}``), ``source``, ``target``, ``image`` (the
    Flickr30k file's path, or its bare name when no image folder was given)."""

    id: str
    source: str
    target: str
    image: Optional[str]


def _lines(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable {'gzip ' if path.endswith('.gz') else ''}text file ({err})") \
            from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_multi30k(root: str, split: str, *, source: str = "en", target: str = "de",
                  image_root: Optional[str] = None) -> List[TranslationRecord]:
    """The ``split`` (train, val, test_2016_flickr, ...) of Multi30K task 1 under ``root`` (the repository's
    folder), ``source`` -> ``target`` (each of en, de, fr, cs). With ``image_root`` (the Flickr30k images), each
    image is checked to exist; a missing one names its line. Files of different lengths are refused, naming both
    and their line counts; an empty sentence names its file and line."""
    for name, language in (("source", source), ("target", target)):
        if language not in LANGUAGES:
            raise ValueError(f"{name}: expected one of {', '.join(LANGUAGES)}, got {language!r}")
    if source == target:
        raise ValueError(f"target: the same language as source ({source!r})")
    if not isinstance(split, str) or not split or os.sep in split:
        raise ValueError(f"split: expected a split name such as 'train' or 'test_2016_flickr', got {split!r}")
    raw = os.path.join(root, "data", "task1", "raw")
    paths = {"source": os.path.join(raw, f"{split}.{source}.gz"), "target": os.path.join(raw, f"{split}.{target}.gz"),
             "images": os.path.join(root, "data", "task1", "image_splits", f"{split}.txt")}
    for key, path in paths.items():  # the plain-text variant of a text file, when that is what is there
        if not os.path.isfile(path) and path.endswith(".gz") and os.path.isfile(path[:-3]):
            paths[key] = path[:-3]
    lines = {key: _lines(path) for key, path in paths.items()}
    counts = {key: len(value) for key, value in lines.items()}
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{paths[key]} has {count}" for key, count in counts.items())
        raise ValueError(f"split {split!r}: the files are not line-aligned ({detail} lines)")
    if image_root is not None and not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root: no folder at {image_root}")
    records = []
    for number, (src, tgt, image) in enumerate(zip(lines["source"], lines["target"], lines["images"]), 1):
        for key, text in (("source", src), ("target", tgt), ("images", image)):
            if not text.strip():
                raise ValueError(f"{paths[key]}:{number}: empty line")
        path = image.strip()
        if image_root is not None:
            path = os.path.join(image_root, path)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{paths['images']}:{number}: no image {path}")
        records.append(TranslationRecord(id=f"{split}:{number}", source=src.strip(), target=tgt.strip(), image=path))
    return records


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (its default 13a tokeniser, case-sensitive) of detokenised ``hypotheses`` against
    one reference each, as Multi30K results are reported."""
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("corpus_bleu needs sacrebleu, an optional extra: pip install 'mmlatent[mt]'") from None
    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses: expected one per reference ({len(references)}), got {len(hypotheses)}")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


__all__ = ["TranslationRecord", "read_multi30k", "corpus_bleu", "LANGUAGES"]
