"""Data for latent reasoners: the record format, the embedded synthetic task, a word-level tokenizer and the batch
collator (ScienceQA and M3CoT readers follow); interleaved records, their Zebra-CoT reader and the Modal-mixed CoT
collator; ScienceQA's two-stage prompts and official breakdown (scienceqa.py); Multi30K and corpus BLEU
(multi30k.py)."""
from .collate import MODES, VLMCollator, image_processor_for
from .interleaved import ImageRef, InterleavedRecord, InterleavedRecordError, ModalMixedCollator, parse_marked_text
from .multi30k import TranslationRecord, corpus_bleu, read_multi30k
from .records import Record, answer_text, lenient_correct, prompt_text, strict_answer
from .scienceqa import rationale_scores, scienceqa_breakdown
from .tokenizer import WordTokenizer

__all__ = ["Record", "prompt_text", "answer_text", "strict_answer", "lenient_correct", "WordTokenizer", "VLMCollator",
           "image_processor_for", "MODES", "ImageRef", "InterleavedRecord", "InterleavedRecordError",
           "ModalMixedCollator", "parse_marked_text", "scienceqa_breakdown", "rationale_scores", "read_multi30k",
           "corpus_bleu", "TranslationRecord"]
