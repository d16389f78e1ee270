"""Chameleon: images are VQ-GAN tokens, embedded as text tokens are; one position row; no vision attention."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .base import VLMBackbone, register_backbone

if TYPE_CHECKING:
    from ..attention import AttentionLease
    from .base import ImageProcessor


class ChameleonImages:
    """Chameleon's image inputs: each image resized to the VQ-GAN's resolution and scaled to [-1, 1] (as its
    processor does); every image becomes ``tokens_per_image`` placeholders."""

    def __init__(self, resolution: int, tokens_per_image: int) -> None:
        self.resolution, self.tokens_per_image = resolution, tokens_per_image

    def __call__(self, images: Sequence[np.ndarray], return_tensors: str = "pt") -> Dict[str, torch.Tensor]:
        from PIL import Image
        out = []
        for image in images:
            resized = Image.fromarray(image).convert("RGB").resize((self.resolution, self.resolution),
                                                                   Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        return {"pixel_values": torch.stack(out)}


@register_backbone
class ChameleonBackbone(VLMBackbone):
    family = "chameleon"
    model_classes = ("ChameleonForConditionalGeneration",)
    default_k = 64

    @property
    def language_model(self) -> nn.Module:
        return self.model.model

    @property
    def vision_tower(self) -> nn.Module:
        """The VQ-GAN (its codes are discrete: no gradient reaches it through the language model)."""
        return self.model.model.vqmodel

    @property
    def text_key(self) -> str:
        return ""

    def image_token_ids(self) -> Tuple[int, int, int]:
        """<image>, <racm3:break> and <eoss>."""
        names = self.config.vocabulary_map
        return names["<image>"], names["<racm3:break>"], names["<eoss>"]

    def suppressed_token_ids(self) -> List[int]:
        """The VQ codes (not <image>, <racm3:break> or <eoss>): Chameleon's forward never lets text predict them."""
        return list(self.model.model.vocabulary_mapping.image_tokens)

    def first_image_vocabulary_id(self) -> int:
        """The first VQ code's id (its tokenizer names the codes IMGIMG...Z)."""
        return min(v for k, v in self.config.vocabulary_map.items() if k.startswith("IMGIMG"))

    def collator_image_token_ids(self) -> Tuple[int, int, int]:
        return self.image_token_ids()

    def tokens_per_image(self, image_hw: Sequence[int] = ()) -> int:
        """Every image is resized to the VQ-GAN's resolution: (resolution / 2^(levels - 1))^2 tokens."""
        vq = self.config.vq_config
        return (vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)) ** 2

    def image_processor(self) -> ChameleonImages:
        return ChameleonImages(self.config.vq_config.resolution, self.tokens_per_image())

    @classmethod
    def processed_image_tokens(cls, image_processor: "ImageProcessor",
                               processed: Mapping[str, torch.Tensor]) -> Optional[List[int]]:
        if not isinstance(image_processor, ChameleonImages):
            return None
        return [image_processor.tokens_per_image] * len(processed["pixel_values"])

    def random_pixel_values(self, image_hws: Sequence[Sequence[int]],
                            generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """[images, 3, H, W] in [-1, 1) (all images one size: the VQ-GAN's resolution)."""
        images = [torch.rand(3, hw[0], hw[1], generator=generator) * 2 - 1 for hw in image_hws]
        return dict(pixel_values=torch.stack(images))

    def _check_pixels(self, n_tokens: int, pixel_values: torch.Tensor,
                      image_grid_thw: Optional[torch.Tensor]) -> None:
        per_image = self.tokens_per_image()
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values: expected [images, 3, H, W], got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] * per_image != n_tokens:
            images = pixel_values.shape[0]
            raise ValueError(f"pixel_values: {images} images make {images * per_image} image tokens, but "
                             f"input_ids hold {n_tokens}")

    def image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                         dtype: torch.dtype, lease: Optional["AttentionLease"]) -> torch.Tensor:
        # the VQ-GAN has no attention function to choose, so the lease has nothing to go with
        features = self.model.model.get_image_features(pixel_values.to(dtype), return_dict=True)
        return features.pooler_output.reshape(-1, self.text_config.hidden_size)


__all__ = ["ChameleonBackbone", "ChameleonImages"]
