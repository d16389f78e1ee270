"""Tiny random-weight vision-language models built from transformers' own config classes, and batches laid out
exactly as their processors lay them out. For tests, benchmarks and the demo: nothing is downloaded.

Token ids of the tiny vocabularies (all models): 0 pad, 1 bos, 2 eos, 3 the latent token (``LATENT_ID``), 4 and 5
start/end of latent reasoning; the image placeholder and vision start/end ids sit at the top of the vocabulary.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

import torch
from torch import nn

from .backbones import VLMBackbone

if TYPE_CHECKING:
    from transformers import (ChameleonForConditionalGeneration, PretrainedConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration)

_Model = TypeVar("_Model", bound=nn.Module)
Device = Optional[Union[str, torch.device]]
# one implementation for every sub-model, or transformers' per-sub-config dict ({"text_config": "sdpa", ...})
AttnImplementation = Union[str, Dict[str, str]]

PAD_ID, BOS_ID, EOS_ID, LATENT_ID = 0, 1, 2, 3
FIRST_TEXT_ID = 6


def _qwen_text_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
                      intermediate: int) -> Dict[str, Any]:
    head_dim = hidden // heads
    section = [head_dim // 8, head_dim // 8 * 3 // 2, 0]  # t, h, w halves of the rotary dims: sums to head_dim / 2
    section[2] = head_dim // 2 - section[0] - section[1]
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def _build(cls: Type[_Model], config: "PretrainedConfig", seed: int, device: Device, dtype: Optional[torch.dtype],
           attn_implementation: AttnImplementation) -> _Model:
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):  # initialised where it will run: an 8B model is built on the GPU in seconds
        return cls._from_config(config, attn_implementation=attn_implementation,
                                dtype=dtype or torch.float32).eval()


def tiny_qwen2_vl(vocab: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  intermediate: int = 128, vision_depth: int = 2, vision_dim: int = 32, vision_heads: int = 2,
                  mlp_ratio: float = 2, patch: int = 4, seed: int = 0, device: Device = None,
                  dtype: Optional[torch.dtype] = None,
                  attn_implementation: AttnImplementation = "sdpa") -> "Qwen2VLForConditionalGeneration":
    """A random-weight ``Qwen2VLForConditionalGeneration`` (image ids: vocab-4 image pad, vocab-3 video pad,
    vocab-2 vision start, vocab-1 vision end), loaded with ``attn_implementation`` (a str for every sub-model, or
    transformers' per-sub-config dict)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    vision = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=vision_heads,
                  mlp_ratio=mlp_ratio, in_channels=3, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=_qwen_text_config(vocab, hidden, layers, heads, kv_heads, intermediate),
                           vision_config=vision, **_vision_ids(vocab))
    return _build(Qwen2VLForConditionalGeneration, config, seed, device, dtype, attn_implementation)


def qwen2_vl_7b_shapes(seed: int = 0, device: Device = None, dtype: Optional[torch.dtype] = None,
                       attn_implementation: AttnImplementation = "sdpa") -> "Qwen2VLForConditionalGeneration":
    """Qwen2-VL-7B's shapes (language model: hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocabulary
    152064; vision: 32 layers of width 1280, 16 heads, patch 14) with random weights."""
    return tiny_qwen2_vl(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                         vision_depth=32, vision_dim=1280, vision_heads=16, mlp_ratio=4, patch=14, seed=seed,
                         device=device, dtype=dtype, attn_implementation=attn_implementation)


def tiny_qwen2_5_vl(vocab: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 128, vision_depth: int = 2, vision_dim: int = 32, patch: int = 4,
                    seed: int = 0, device: Device = None, dtype: Optional[torch.dtype] = None,
                    attn_implementation: AttnImplementation = "sdpa") -> "Qwen2_5_VLForConditionalGeneration":
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` (window attention in its vision tower), loaded with
    ``attn_implementation``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    vision = dict(depth=vision_depth, hidden_size=vision_dim, out_hidden_size=hidden, intermediate_size=2 * vision_dim,
                  num_heads=2, in_channels=3, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=4 * patch, fullatt_block_indexes=[vision_depth - 1])
    config = Qwen2_5_VLConfig(text_config=_qwen_text_config(vocab, hidden, layers, heads, kv_heads, intermediate),
                              vision_config=vision, **_vision_ids(vocab))
    return _build(Qwen2_5_VLForConditionalGeneration, config, seed, device, dtype, attn_implementation)


def _vision_ids(vocab: int) -> Dict[str, int]:
    return dict(image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
                vision_end_token_id=vocab - 1)


def tiny_chameleon(text_vocab: int = 200, codebook: int = 32, hidden: int = 64, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2, intermediate: int = 128, resolution: int = 32, seed: int = 0,
                   device: Device = None, dtype: Optional[torch.dtype] = None,
                   attn_implementation: AttnImplementation = "sdpa") -> "ChameleonForConditionalGeneration":
    """A random-weight ``ChameleonForConditionalGeneration`` with a small VQ-GAN, loaded with
    ``attn_implementation``: ``resolution / 4`` squared image tokens per image. Image token ids ``text_vocab + i``
    for codebook entry i; ``<image>`` placeholder, begin/end
    of image after them."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration
    vocabulary_map = {f"tok{i}": i for i in range(text_vocab)}
    for i in range(codebook):  # the BPE names Chameleon's tokenizer gives VQ codes: digits spelled as A-J
        vocabulary_map["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z"] = text_vocab + i
    image_id = text_vocab + codebook
    vocabulary_map.update({"<image>": image_id, "<racm3:break>": image_id + 1, "<eoss>": image_id + 2})
    vq = dict(embed_dim=8, num_embeddings=codebook, latent_channels=8, resolution=resolution, base_channels=32,
              channel_multiplier=[1, 2, 2], num_res_blocks=1, attn_resolutions=[])
    config = ChameleonConfig(vocab_size=image_id + 3, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             vq_config=vq, vocabulary_map=vocabulary_map, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                             pad_token_id=PAD_ID, max_position_embeddings=32768)
    return _build(ChameleonForConditionalGeneration, config, seed, device, dtype, attn_implementation)


def image_tokens_per_image(vlm: nn.Module, image_hw: Sequence[int]) -> int:
    """Image tokens the language model sees for one image of ``image_hw`` pixels (its backbone's count)."""
    return VLMBackbone(vlm).tokens_per_image(image_hw)


def synthetic_batch(vlm: nn.Module, *, images: Sequence[Sequence[Sequence[int]]], prompt_lengths: Sequence[int],
                    answer_lengths: Sequence[int], num_latents: Sequence[int], seed: int = 0,
                    latent_id: int = LATENT_ID, with_answer: bool = True) -> Dict[str, torch.Tensor]:
    """Random inputs for ``vlm`` in its processor's layout, left-padded, with latent tokens and labels.

    Sample b is: bos, its images (each wrapped in the model's vision start/end tokens, one placeholder per image
    token), ``prompt_lengths[b]`` random text tokens, ``num_latents[b]`` latent tokens, ``answer_lengths[b]``
    random answer tokens, eos. Labels are the answer and eos (-100 elsewhere, as IVT-LR's curriculum sets them).
    With ``with_answer=False`` the rows end at the latent tokens: a generation prompt.

    Args:
        images: per sample, a list of (height, width) pixel sizes (Qwen: multiples of 2 x patch; Chameleon: the
            VQ-GAN resolution).

    Returns:
        dict with input_ids, attention_mask, labels [B, S] and pixel_values (and image_grid_thw for Qwen).
    """
    g = torch.Generator().manual_seed(seed)
    backbone = VLMBackbone(vlm)
    text_ids_end = backbone.first_image_vocabulary_id()
    image_id, start_id, end_id = backbone.image_token_ids()
    rows: List[List[int]] = []
    label_rows: List[List[int]] = []
    pixels = []  # drawn image by image, between the samples' text, so every batch keeps its random values
    for b, sample_images in enumerate(images):
        ids = [BOS_ID]
        for hw in sample_images:
            ids += [start_id] + [image_id] * backbone.tokens_per_image(hw) + [end_id]
            pixels.append(backbone.random_pixel_values([hw], g))
        text = lambda n: torch.randint(FIRST_TEXT_ID, text_ids_end, (n,), generator=g).tolist()  # noqa: E731
        ids += text(prompt_lengths[b]) + [latent_id] * num_latents[b]
        answer = text(answer_lengths[b]) + [EOS_ID] if with_answer else []
        label_rows.append([-100] * len(ids) + answer)
        rows.append(ids + answer)
    S = max(map(len, rows))
    B = len(rows)
    input_ids = torch.full((B, S), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, label_rows)):
        input_ids[b, S - len(ids):] = torch.tensor(ids)
        attention_mask[b, S - len(ids):] = 1
        labels[b, S - len(ids):] = torch.tensor(lab)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                **{key: torch.cat([p[key] for p in pixels]) for key in pixels[0]})


__all__ = ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_chameleon", "qwen2_vl_7b_shapes", "synthetic_batch",
           "image_tokens_per_image",
           "LATENT_ID", "PAD_ID", "BOS_ID", "EOS_ID"]


def tiny_t5(vocab: int = 256, d_model: int = 64, layers: int = 2, heads: int = 4, d_ff: int = 128, seed: int = 0,
            device: Device = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A random-weight ``T5ForConditionalGeneration`` (encoder and decoder of ``layers`` blocks each, flan-T5's
    gated-GELU feed-forward, untied embeddings as in flan-T5; pad 0, eos 2, the decoder starting from pad)."""
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                      num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                      decoder_start_token_id=PAD_ID, dropout_rate=0.0)
    return _build(T5ForConditionalGeneration, config, seed, device, dtype, "sdpa")


def tiny_vae(block_out_channels: Sequence[int] = (32, 64), latent_channels: int = 4, layers_per_block: int = 1,
             seed: int = 0, device: Device = None) -> nn.Module:
    """A random-weight diffusers ``AutoencoderKL`` (downsampling 2 ** (len(block_out_channels) - 1); Stable
    Diffusion 1.x's is (128, 256, 512, 512), 8x)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                         latent_channels=latent_channels, norm_num_groups=min(32, block_out_channels[0]),
                         layers_per_block=layers_per_block).to(device or "cpu").eval()


def tiny_unet(cross_attention_dim: int = 64, block_out_channels: Sequence[int] = (32, 64), in_channels: int = 4,
              attention_head_dim: int = 8, layers_per_block: int = 1, seed: int = 0, device: Device = None
              ) -> nn.Module:
    """A random-weight diffusers ``UNet2DConditionModel`` with cross-attention in its first down and last up
    block and its mid block (Stable Diffusion 1.x's layout, shrunk: SD has widths (320, 640, 1280, 1280))."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    n = len(block_out_channels)
    down = ("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (n - 1)
    up = ("UpBlock2D",) * (n - 1) + ("CrossAttnUpBlock2D",)
    return UNet2DConditionModel(sample_size=16, in_channels=in_channels, out_channels=in_channels,
                                down_block_types=down, up_block_types=up, block_out_channels=tuple(block_out_channels),
                                layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=attention_head_dim,
                                norm_num_groups=min(32, block_out_channels[0])).to(device or "cpu").eval()
