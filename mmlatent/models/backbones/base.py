"""The interface every model family implements, and the registry that picks a family's class for a model.

A backbone owns what differs between model families: the language model and its sub-config, the image embeddings
(the layer-0 inputs that replace the image placeholders), positions, image token ids, image tokens per image, the
image processor, the vision tower's attention config and the default k of IVT-LR. IVT-LR, the collator, the tiny
builders and the trainer ask the backbone and never a model's type (docs/design.md, "Layout").

Adding a family: one module in this package with a subclass registered by :func:`register_backbone`, imported in
``backbones/__init__.py``; a tiny builder in :mod:`mmlatent.models.tiny` (and its config kind in
:mod:`mmlatent.train.ivtlr`) makes it testable and trainable without a download.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ..unwrap import unwrap_peft

if TYPE_CHECKING:  # hints only: attention imports the backbones, chameleon imports this module
    from transformers import BaseImageProcessor

    from ..attention import AttentionLease
    from .chameleon import ChameleonImages

    # what a family's image_processor() returns: a transformers image processor, or Chameleon's resizer
    ImageProcessor = Union[BaseImageProcessor, ChameleonImages]

# HF model class name -> the backbone class of its family
_FAMILIES: Dict[str, Type["VLMBackbone"]] = {}


def register_backbone(cls: Type["VLMBackbone"]) -> Type["VLMBackbone"]:
    """Class decorator: ``cls`` serves every Hugging Face class named in ``cls.model_classes``."""
    for name in cls.model_classes:
        _FAMILIES[name] = cls
    return cls


def supported_model_classes() -> List[str]:
    return sorted(_FAMILIES)


def processed_image_tokens(image_processor: "ImageProcessor", processed: Mapping[str, torch.Tensor]) -> List[int]:
    """Image tokens of each image in ``processed`` (what ``image_processor`` returned for a list of images), as
    the family whose processor it is counts them."""
    for family in dict.fromkeys(_FAMILIES.values()):
        counts = family.processed_image_tokens(image_processor, processed)
        if counts is not None:
            return counts
    raise TypeError(f"image_processor: {type(image_processor).__name__} is the processor of no supported family "
                    f"({', '.join(supported_model_classes())})")


class VLMBackbone:
    """One interface over the supported vision-language models. ``VLMBackbone(vlm)`` returns the instance of the
    model's family class (a PEFT-wrapped model is unwrapped to its base).

    Class attributes of a family: ``family`` (its short name), ``model_classes`` (the Hugging Face classes it
    serves), ``default_k`` (IVT-LR's image tokens per latent step), ``has_mrope`` (3-D positions that IVT-LR's
    "mrope" mode keeps) and ``vision_attention_key`` (the sub-config of a vision tower whose attention mmlatent
    may route, or None).
    """

    family: str = ""
    model_classes: Tuple[str, ...] = ()
    default_k: int = 0
    has_mrope: bool = False
    vision_attention_key: Optional[str] = None

    def __new__(cls, vlm: nn.Module) -> "VLMBackbone":
        if cls is VLMBackbone:
            name = type(unwrap_peft(vlm)).__name__
            if name not in _FAMILIES:
                raise TypeError(f"vlm: unsupported model class {name}; IVT-LR supports "
                                f"{', '.join(supported_model_classes())}")
            cls = _FAMILIES[name]
        return super().__new__(cls)

    def __init__(self, vlm: nn.Module) -> None:
        base = unwrap_peft(vlm)
        self.model = base
        self.config = base.config
        self.text_config = base.config.get_text_config()
        self.image_token_id = int(base.config.image_token_id)

    # ------------------------------------------------------------------------------------------- modules
    @property
    def language_model(self) -> nn.Module:
        """Decoder taking inputs_embeds, attention_mask, position_ids and a KV cache -> last_hidden_state."""
        raise NotImplementedError

    @property
    def text_key(self) -> str:
        """The language model's sub-config key for ``set_attn_implementation`` ("" when it is the model's own)."""
        raise NotImplementedError

    @property
    def language_model_name(self) -> str:
        """The language model's module name in the model (what LoRA's target pattern starts with)."""
        return next(name for name, module in self.model.named_modules() if module is self.language_model)

    @property
    def vision_tower(self) -> nn.Module:
        """The module that turns pixels into image embeddings or image tokens (what ``freeze_vision`` freezes)."""
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def suppressed_token_ids(self) -> Optional[List[int]]:
        """Vocabulary ids whose logits the model's own forward sets to the dtype's minimum (ids it never predicts,
        such as Chameleon's image codes), or None. Losses and decoding over the hidden states apply the same."""
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., V] logits from hidden [..., D] as the model's forward computes them: the output layer, then the
        family's suppressed ids at the logits dtype's minimum."""
        logits = self.lm_head(hidden)
        suppressed = self.suppressed_token_ids()
        if suppressed:
            logits[..., suppressed] = torch.finfo(logits.dtype).min
        return logits

    # -------------------------------------------------------------------------------------------- images
    def image_token_ids(self) -> Tuple[int, int, int]:
        """(placeholder, start, end) ids of the model's image tokens."""
        raise NotImplementedError

    def first_image_vocabulary_id(self) -> int:
        """The lowest id the vocabulary reserves for images: every id below it is a text token."""
        raise NotImplementedError

    def collator_image_token_ids(self) -> Optional[Tuple[int, int, int]]:
        """The ids the collator must write where they differ from a tokenizer's own layout, else None."""
        return None

    def tokens_per_image(self, image_hw: Sequence[int]) -> int:
        """Image tokens the language model sees for one image of ``image_hw`` (height, width) pixels."""
        raise NotImplementedError

    def image_processor(self) -> "ImageProcessor":
        """The image processor the model expects, built from its config (nothing downloaded)."""
        raise NotImplementedError

    @classmethod
    def processed_image_tokens(cls, image_processor: "ImageProcessor",
                               processed: Mapping[str, torch.Tensor]) -> Optional[List[int]]:
        """Image tokens of each image ``image_processor`` turned into ``processed``, or None when that processor
        is not one of this family's."""
        raise NotImplementedError

    def random_pixel_values(self, image_hws: Sequence[Sequence[int]],
                            generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Random images of the given (height, width) sizes as the model takes them: ``pixel_values`` (and
        ``image_grid_thw`` where the family has one), for tests and benchmarks."""
        raise NotImplementedError

    def check_images(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                     image_grid_thw: Optional[torch.Tensor]) -> None:
        """Clear errors for image inputs that do not fit the placeholders of ``input_ids``."""
        # host sync, one per call: a mismatch must raise before the vision tower or any pass runs
        n_tokens = int((input_ids == self.image_token_id).sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"pixel_values: required, input_ids hold {n_tokens} image tokens")
            return
        self._check_pixels(n_tokens, pixel_values, image_grid_thw)

    def _check_pixels(self, n_tokens: int, pixel_values: torch.Tensor,
                      image_grid_thw: Optional[torch.Tensor]) -> None:
        raise NotImplementedError

    def image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                         dtype: torch.dtype, lease: Optional["AttentionLease"]) -> torch.Tensor:
        """[image tokens, D] layer-0 inputs of every image token, in the images' order."""
        raise NotImplementedError

    def input_embeddings(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                         image_grid_thw: Optional[torch.Tensor],
                         lease: Optional["AttentionLease"] = None) -> torch.Tensor:
        """[B, S, D] layer-0 inputs: token embeddings, the image placeholders replaced by the image embeddings.
        ``lease`` (an :class:`~mmlatent.models.attention.AttentionLease`) goes with the vision tower's attention
        calls."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        image = self.image_embeddings(pixel_values, image_grid_thw, embeds.dtype, lease)
        mask = (input_ids == self.image_token_id)[..., None].expand_as(embeds)
        return embeds.masked_scatter(mask, image.to(embeds.dtype))

    # ------------------------------------------------------------------------------------------ positions
    def model_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """The model's own positions of the original sequence, [R, B, S] (R = 3 for M-RoPE, else 1)."""
        B, S = input_ids.shape
        return torch.arange(S, device=input_ids.device).expand(1, B, S).clone()

    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """[R, B, M] positions -> what the language model takes."""
        return positions[0]

    # ------------------------------------------------------------------------------------------ attention
    def attention_configs(self) -> List[object]:
        """Every config of the model that carries an attention implementation, once each: its own, its
        sub-configs at any depth, and those of its sub-models."""
        from transformers import PreTrainedModel
        found, queue = {}, [self.config]
        queue += [m.config for m in self.model.modules() if isinstance(m, PreTrainedModel)]
        while queue:
            config = queue.pop(0)
            if id(config) in found:
                continue
            found[id(config)] = config
            queue += [getattr(config, key) for key in getattr(config, "sub_configs", {})
                      if getattr(config, key, None) is not None]
        return list(found.values())

    def install_attention(self, lease: "AttentionLease") -> Dict[str, str]:
        """See :func:`mmlatent.models.attention.install_attention`."""
        from .. import attention
        return attention.install_attention(self, lease)

    def restore_attention(self) -> None:
        """See :func:`mmlatent.models.attention.restore_attention`."""
        from .. import attention
        attention.restore_attention(self.model)


__all__ = ["VLMBackbone", "register_backbone", "supported_model_classes", "processed_image_tokens"]
