"""A word-level tokenizer (Hugging Face ``tokenizers``) whose special ids line up with the tiny models of
:mod:`mmlatent.models.tiny`: 0 pad, 1 bos, 2 eos, 3 latent, 4/5 start/end of latent reasoning, 6 unknown, the
words, then the image pad, video pad, vision start and vision end tokens at the top of the vocabulary."""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Iterable, List, Optional

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

SPECIALS = ["<pad>", "<bos>", "<eos>", "<|latent|>", "<|start-latent|>", "<|end-latent|>", "<unk>"]
VISION = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
# a run folder's word tokenizer; not tokenizer.json, which is the Hugging Face tokenizer's file and what
# AutoTokenizer reads in a folder that is also a model folder (the first run format wrote tokenizer.json)
WORD_TOKENIZER_FILE = "word_tokenizer.json"
LEGACY_WORD_TOKENIZER_FILE = "tokenizer.json"


class WordTokenizer:
    """Lower-cased words and punctuation marks; ``encode`` gives ids, ``decode`` joins words with spaces. With
    ``cased``, the case is kept and ``decode`` writes punctuation as text does (no space before ``. , ; : ! ? )``
    or after ``(``), so a decoded answer reads "The answer is (A)." as the text it was trained on."""

    def __init__(self, words: Iterable[str], size: Optional[int] = None, cased: bool = False) -> None:
        if not isinstance(cased, bool):
            raise TypeError(f"cased: expected True or False, got {type(cased).__name__}")
        self.cased = cased
        words = [w for w in dict.fromkeys(words) if w not in SPECIALS + VISION]
        if size is not None:  # pad with unused tokens to a model's vocabulary size (e.g. Qwen2-VL-7B's 152064)
            if size < len(SPECIALS) + len(words) + len(VISION):
                raise ValueError(f"size: {size} is smaller than the {len(SPECIALS) + len(words) + len(VISION)} "
                                 f"tokens the words need")
            words = words + [f"<unused{i}>" for i in range(size - len(SPECIALS) - len(words) - len(VISION))]
        self.tokens: List[str] = SPECIALS + words + VISION
        vocab = {token: i for i, token in enumerate(self.tokens)}
        self._tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
        if not cased:
            self._tokenizer.normalizer = normalizers.Lowercase()
        # words, and every punctuation mark on its own ("]:{" is three tokens), as synthetic.vocabulary splits
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                                 pre_tokenizers.Punctuation(),
                                                                 pre_tokenizers.Digits(individual_digits=False)])
        self.pad_id, self.bos_id, self.eos_id, self.latent_id = 0, 1, 2, 3
        self.start_latent_id, self.end_latent_id, self.unk_id = 4, 5, 6
        size = len(self.tokens)
        self.image_id, self.video_id, self.vision_start_id, self.vision_end_id = size - 4, size - 3, size - 2, size - 1

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        hidden = set(range(7)) | {self.image_id, self.video_id, self.vision_start_id, self.vision_end_id}
        text = " ".join(self.tokens[i] for i in ids if not (skip_special and i in hidden) and 0 <= i < len(self))
        if self.cased:
            text = re.sub(r"\s+([.,;:!?)])", r"\1", re.sub(r"\(\s+", "(", text))
        return text

    def state(self) -> dict:
        """What :meth:`load` reads back: the words (without the fixed special and vision tokens) and the size."""
        words = [w for w in self.tokens[len(SPECIALS):-len(VISION)] if not w.startswith("<unused")]
        state = {"words": words, "size": len(self.tokens)}
        if self.cased:
            state["cased"] = True
        return state

    def save(self, path: str) -> None:
        """Writes :meth:`state` as JSON. In a checkpoint it is written into the folder that
        :mod:`mmlatent.train.checkpoint` fsyncs and swaps in whole, which makes it crash-safe."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.state(), f)

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":
        """Reads what :meth:`save` wrote; ValueError (naming the file) for anything else, e.g. a Hugging Face
        tokenizer.json."""
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if not is_word_tokenizer_state(saved):
            raise ValueError(f"{path}: not a word tokenizer (expected an object with a list of words)")
        return cls(saved["words"], size=saved.get("size"), cased=saved.get("cased", False))

    def to_hf(self) -> "PreTrainedTokenizerFast":
        """The same vocabulary as a ``transformers.PreTrainedTokenizerFast`` (special tokens marked, words decoded
        joined by spaces), for what needs a Hugging Face tokenizer, e.g. ``stop_strings`` in ``generate``."""
        from transformers import PreTrainedTokenizerFast
        named = {"<pad>": "pad_token", "<bos>": "bos_token", "<eos>": "eos_token", "<unk>": "unk_token"}
        # a copy: marking the special tokens changes how the tokenizers object splits text, and this one's must not
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(self._tokenizer.to_str()),
                                       **{key: token for token, key in named.items()},
                                       additional_special_tokens=[t for t in SPECIALS + VISION if t not in named])


def is_word_tokenizer_state(saved: Any) -> bool:
    """Whether ``saved`` (parsed JSON) is what :meth:`WordTokenizer.save` writes (and not, say, a Hugging Face
    tokenizer.json, which has ``model`` and ``added_tokens`` instead)."""
    return (isinstance(saved, dict) and isinstance(saved.get("words"), list)
            and all(isinstance(w, str) for w in saved["words"])
            and (saved.get("size") is None or (isinstance(saved["size"], int) and not isinstance(saved["size"], bool)))
            and isinstance(saved.get("cased", False), bool))


def is_word_tokenizer_file(path: str) -> bool:
    """Whether the JSON file at ``path`` holds a word tokenizer (False for unreadable or other JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            return is_word_tokenizer_state(json.load(f))
    except (OSError, ValueError, UnicodeDecodeError):
        return False


class HFTokenizer:
    """A Hugging Face tokenizer (a Qwen2-VL checkpoint's) behind the interface the collator uses; adds IVT-LR's
    ``<|latent|>``, ``<|start-latent|>`` and ``<|end-latent|>`` tokens when missing (resize the model's embeddings
    to ``len(tokenizer)`` then)."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", image_token: str = "<|image_pad|>",
                 vision_start: str = "<|vision_start|>", vision_end: str = "<|vision_end|>") -> None:
        missing = [t for t in ("<|latent|>", "<|start-latent|>", "<|end-latent|>")
                   if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        self.tokenizer = tokenizer
        ids = tokenizer.convert_tokens_to_ids
        self.latent_id, self.start_latent_id, self.end_latent_id = (ids("<|latent|>"), ids("<|start-latent|>"),
                                                                    ids("<|end-latent|>"))
        self.image_id, self.vision_start_id, self.vision_end_id = ids(image_token), ids(vision_start), ids(vision_end)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.bos_id = tokenizer.bos_token_id

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def to_hf(self) -> "PreTrainedTokenizerBase":
        """The Hugging Face tokenizer itself."""
        return self.tokenizer


__all__ = ["WordTokenizer", "HFTokenizer", "SPECIALS", "VISION", "WORD_TOKENIZER_FILE", "LEGACY_WORD_TOKENIZER_FILE",
           "is_word_tokenizer_file", "is_word_tokenizer_state"]
