"""Data for latent reasoners: the record format, the embedded synthetic task, a word-level tokenizer and the batch
collator (ScienceQA and M3CoT readers follow); interleaved records, their Zebra-CoT reader and the Modal-mixed CoT
collator."""
from .collate import MODES, VLMCollator, image_processor_for
from .interleaved import ImageRef, InterleavedRecord, InterleavedRecordError, ModalMixedCollator, parse_marked_text
from .records import Record, answer_text, lenient_correct, prompt_text, strict_answer
from .tokenizer import WordTokenizer

__all__ = ["Record", "prompt_text", "answer_text", "strict_answer", "lenient_correct", "WordTokenizer", "VLMCollator",
           "image_processor_for", "MODES", "ImageRef", "InterleavedRecord", "InterleavedRecordError",
           "ModalMixedCollator", "parse_marked_text"]
