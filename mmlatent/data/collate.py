"""Batches for IVT-LR training and evaluation (Qwen2-VL, Qwen2.5-VL, Chameleon), laid out as IVT-LR's public
code lays them out.

A sample is ``bos, <vision_start> <image>*n <vision_end>, prompt, <latent>*s, rationale steps s.., answer, eos``
(the public code: question + s latent tokens + the remaining steps + "Therefore, the answer is X" + eos), with
labels -100 on everything up to the last latent token. Batches are left-padded. Modes:

- ``"no_cot"``: the answer right after the prompt (no rationale);
- ``"cot"``: the whole rationale, then the answer (IVT-LR's stage 0);
- ``"ivtlr"``: stage s replaces the first s rationale steps by s latent tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from mmlatent.models.backbones import VLMBackbone, processed_image_tokens

from .records import Record, answer_text, prompt_text

if TYPE_CHECKING:
    from mmlatent.models.backbones.base import ImageProcessor

MODES = ("no_cot", "cot", "ivtlr")


def vlm_image_token_ids(vlm: nn.Module) -> Tuple[int, int, int]:
    """(placeholder, start, end) ids of a model's image tokens (its backbone's: Qwen's image pad and vision
    start/end, Chameleon's <image>, <racm3:break> and <eoss>)."""
    return VLMBackbone(vlm).image_token_ids()


def image_processor_for(vlm: nn.Module) -> "ImageProcessor":
    """The image processor a model expects, built from its config by its backbone (no download): for Qwen2-VL /
    Qwen2.5-VL pixels rescaled to [0, 1], not normalised; for Chameleon its VQ-GAN resolution in [-1, 1]."""
    return VLMBackbone(vlm).image_processor()


def load_image(image: Union[np.ndarray, str], record_id: str) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, str):
        from PIL import Image
        try:
            with Image.open(image) as im:
                return np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"record {record_id}: image: no file at {image}") from None
    raise ValueError(f"record {record_id}: image: expected an RGB array or a path, got {type(image).__name__}")


@dataclass
class VLMCollator:
    """Records -> a left-padded batch dict (input_ids, attention_mask, labels, pixel_values, image_grid_thw).

    Args:
        tokenizer: a :class:`mmlatent.data.tokenizer.WordTokenizer` (or anything with ``encode`` and the
            pad/bos/eos/latent/image/vision_start/vision_end ids).
        image_processor: the model's image processor (see :func:`image_processor_for`); each image's token
            count is its family's (:func:`mmlatent.models.backbones.processed_image_tokens`).
        mode: "no_cot" (answer only), "cot" (rationale, then answer) or "ivtlr"; stage: the number of latent
            steps (the curriculum's stage, :mod:`mmlatent.train.curriculum`; only "ivtlr" has any);
            max_latent_steps: the rationale is cut into at most this many steps.
        prompt_only: stop after the latent tokens (generation prompts); labels are then omitted.
        image_token_ids: (placeholder, start, end) ids when the model's differ from the tokenizer's (Chameleon:
            :func:`vlm_image_token_ids`).
    """

    tokenizer: object
    image_processor: object
    mode: str = "ivtlr"
    stage: int = 0
    max_latent_steps: int = 3
    prompt_only: bool = False
    image_token_ids: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.stage < 0 or self.stage > self.max_latent_steps:
            raise ValueError(f"stage: expected 0..{self.max_latent_steps}, got {self.stage}")
        if self.stage and self.mode != "ivtlr":
            raise ValueError(f"stage: mode {self.mode!r} has no latent steps, got stage {self.stage}")

    def sample(self, record: Record, image_tokens: int) -> Tuple[List[int], Optional[List[int]]]:
        t = self.tokenizer
        image_id, start_id, end_id = self.image_token_ids or (t.image_id, t.vision_start_id, t.vision_end_id)
        prompt = [] if t.bos_id is None else [t.bos_id]  # Qwen2's tokenizer has no bos token
        prompt += [start_id] + [image_id] * image_tokens + [end_id]
        prompt += t.encode(prompt_text(record))
        steps = record.steps(self.max_latent_steps)
        latents = self.stage
        prompt += [t.latent_id] * latents
        if self.prompt_only:
            return prompt, None
        target: List[int] = []
        if self.mode != "no_cot":
            for step in steps[latents:]:
                target += t.encode(step)
        target += t.encode(answer_text(record)) + [t.eos_id]
        return prompt + target, [-100] * len(prompt) + target

    def __call__(self, records: Sequence[Record]) -> Dict[str, torch.Tensor]:
        images = [load_image(r.image, r.id) for r in records]
        processed = self.image_processor(images=images, return_tensors="pt")
        counts = processed_image_tokens(self.image_processor, processed)
        rows, label_rows = [], []
        for record, count in zip(records, counts):
            ids, labels = self.sample(record, count)
            rows.append(ids)
            label_rows.append(labels)
        input_ids, attention_mask, labels = left_pad(rows, label_rows, self.tokenizer.pad_id)
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=processed["pixel_values"])
        if "image_grid_thw" in processed:
            batch["image_grid_thw"] = processed["image_grid_thw"]
        if not self.prompt_only:
            batch["labels"] = labels
        return batch


def left_pad(rows: Sequence[List[int]], label_rows: Sequence[Optional[List[int]]], pad_id: int
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``labels``, each [B, max length] int64, from token rows
    and their label rows (None: all -100, a prompt-only row). Generation appends on the right, so every row's
    last token sits in the last column."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, label_rows)):
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        attention_mask[b, width - len(ids):] = 1
        if lab is not None:
            labels[b, width - len(ids):] = torch.tensor(lab)
    return input_ids, attention_mask, labels


__all__ = ["VLMCollator", "image_processor_for", "vlm_image_token_ids", "load_image", "left_pad",
           "MODES"]
