"""Data for latent reasoners: the record format, the embedded synthetic task, a word-level tokenizer and the batch
collator (ScienceQA and M3CoT readers follow)."""
from .collate import MODES, VLMCollator, image_processor_for
from .records import Record, answer_text, lenient_correct, prompt_text, strict_answer
from .tokenizer import WordTokenizer

__all__ = ["Record", "prompt_text", "answer_text", "strict_answer", "lenient_correct", "WordTokenizer", "VLMCollator",
           "image_processor_for", "MODES"]
