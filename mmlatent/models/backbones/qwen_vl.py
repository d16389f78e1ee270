"""Qwen2-VL and Qwen2.5-VL: vision-merger outputs as image embeddings, M-RoPE positions, a ViT that may be eager."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import VLMBackbone, register_backbone

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

    from ..attention import AttentionLease
    from .base import ImageProcessor


def merged_tokens(patches: int, merge_size: int) -> int:
    """Image tokens the language model sees for ``patches`` vision patches: the merger joins merge_size^2."""
    return patches // merge_size ** 2


@register_backbone
class QwenVLBackbone(VLMBackbone):
    family = "qwen"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    default_k = 32
    has_mrope = True
    vision_attention_key = "vision_config"

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def text_key(self) -> str:
        return "text_config"

    def image_token_ids(self) -> Tuple[int, int, int]:
        config = self.config
        return config.image_token_id, config.vision_start_token_id, config.vision_end_token_id

    def first_image_vocabulary_id(self) -> int:
        """The lowest of the image placeholder, video placeholder and vision start/end ids."""
        config = self.config
        return min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                   config.vision_end_token_id)

    def tokens_per_image(self, image_hw: Sequence[int]) -> int:
        vision = self.config.vision_config
        return merged_tokens((image_hw[0] // vision.patch_size) * (image_hw[1] // vision.patch_size),
                             vision.spatial_merge_size)

    @classmethod
    def processed_image_tokens(cls, image_processor: "ImageProcessor",
                               processed: Mapping[str, torch.Tensor]) -> Optional[List[int]]:
        """From ``image_grid_thw``: t * h * w patches per image."""
        grid = processed.get("image_grid_thw")
        if grid is None:
            return None
        return [merged_tokens(t * h * w, image_processor.merge_size) for t, h, w in grid.tolist()]

    def image_processor(self) -> "BaseImageProcessor":
        """Pixels rescaled to [0, 1] and not normalised (the tiny models are trained from scratch on that scale);
        the PIL backend, since torchvision is not a dependency."""
        try:
            from transformers import Qwen2VLImageProcessorPil as Processor
        except ImportError:
            from transformers import Qwen2VLImageProcessor as Processor
        vision = self.config.vision_config
        side = vision.patch_size * vision.spatial_merge_size
        return Processor(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                         merge_size=vision.spatial_merge_size, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                         min_pixels=side * side, max_pixels=1024 * 1024)

    def random_pixel_values(self, image_hws: Sequence[Sequence[int]],
                            generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Patch rows [sum of h * w patches, 3 * temporal * patch^2] in [0, 1), and their grid [images, 3]."""
        vision = self.config.vision_config
        patch = vision.patch_size
        rows, grids = [], []
        for hw in image_hws:
            gh, gw = hw[0] // patch, hw[1] // patch
            grids.append([1, gh, gw])
            rows.append(torch.rand(gh * gw, 3 * vision.temporal_patch_size * patch * patch, generator=generator))
        return dict(pixel_values=torch.cat(rows), image_grid_thw=torch.tensor(grids))

    def _check_pixels(self, n_tokens: int, pixel_values: torch.Tensor,
                      image_grid_thw: Optional[torch.Tensor]) -> None:
        if image_grid_thw is None:
            raise ValueError("image_grid_thw: required with pixel_values for Qwen2-VL / Qwen2.5-VL")
        if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw: expected [images, 3] (t, h, w), got {tuple(image_grid_thw.shape)}")
        # host sync, one per call, before any work (the vision tower reads the grid on the host again for its
        # sequence lengths)
        patches = int(image_grid_thw.prod(dim=1).sum())
        if pixel_values.shape[0] != patches:
            raise ValueError(f"pixel_values: expected {patches} rows (the sum of t*h*w over image_grid_thw), "
                             f"got {pixel_values.shape[0]}")
        described = merged_tokens(patches, self.config.vision_config.spatial_merge_size)
        if described != n_tokens:
            raise ValueError(f"image_grid_thw: describes {described} image tokens, but input_ids hold {n_tokens}")

    def image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                         dtype: torch.dtype, lease: Optional["AttentionLease"]) -> torch.Tensor:
        visual = self.model.model.visual
        dtype = visual.dtype if hasattr(visual, "dtype") else dtype
        extra = {} if lease is None else {"mmlatent_lease": lease}
        features = self.model.model.get_image_features(pixel_values.to(dtype), image_grid_thw, return_dict=True,
                                                       **extra)
        return torch.cat(list(features.pooler_output), dim=0)

    def model_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """[3, B, S] M-RoPE positions (the model's get_rope_index); text-only inputs count like Chameleon's."""
        if image_grid_thw is None:
            return super().model_positions(input_ids, attention_mask, image_grid_thw)
        mm_types = (input_ids == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids=mm_types,
                                                       image_grid_thw=image_grid_thw,
                                                       attention_mask=attention_mask)
        return positions

    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.expand(3, -1, -1)


__all__ = ["QwenVLBackbone", "merged_tokens"]
