"""Modal-mixed CoT (arXiv 2602.00574): a Qwen2-VL / Qwen2.5-VL that interleaves text with latent visual sketches in
its own vision space, generated one latent at a time by a diffusion head conditioned on its hidden state.

A sketch is ``START, latent * K, END`` in the token sequence. During training each placeholder's input embedding
is its target latent (teacher forcing): the VLM's own vision-merger output of the intermediate reasoning image,
average-pooled from the merged (h, w) grid to ``pool_grid`` (K = rows * cols latents, raster order). The final
hidden state right before a placeholder conditions the head's diffusion loss for that latent (MAR's per-token
head, the conditions' gradients reaching the VLM: the joint objective); text is trained with next-token
cross-entropy computed without the [T, V] logits. docs/design.md, "Modal-mixed CoT", says what is taken from the
paper and what is inferred.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from ...kernels import checks
from ..backbones import VLMBackbone
from ..diffusion_head import LatentDiffusionHead, ScheduleSpec
from ..lm_head import LinearCrossEntropyHead, head_for
from .layout import SketchLayout, SketchTokens, check_token_ids, sketch_layout

if TYPE_CHECKING:
    from .generation import ModalMixedGeneration

SUPPORTED_FAMILIES = ("qwen",)


@dataclass
class ModalMixedOutput:
    """What :meth:`ModalMixedCoT.forward` returns (float32 scalars; tensors on the model's device).

    Attributes:
        loss: ``text_loss + diffusion_weight * latent_loss``.
        text_loss: mean next-token cross-entropy over the labelled positions.
        latent_loss: the head's diffusion loss on (targets, conditions).
        conditions: [N_seg * K, D] final hidden states right before each placeholder (the head's dtype).
        targets: [N_seg * K, D] ``latent_targets.reshape(-1, D)`` (the head's dtype).
    """

    loss: torch.Tensor
    text_loss: torch.Tensor
    latent_loss: torch.Tensor
    conditions: torch.Tensor
    targets: torch.Tensor


def mrope_positions(vlm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    image_grid_thw: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """([3, B, S] positions, [B, 1] deltas) from the model's ``get_rope_index``: image tokens typed 1, everything
    else (text, sketch controls and placeholders) 0. Computed for text-only batches too, where transformers' own
    forward falls back to an arange that ignores left padding: here a padded row has the positions it has alone."""
    backbone = VLMBackbone(vlm)
    mm_types = (input_ids == backbone.image_token_id).int()
    return backbone.model.model.get_rope_index(input_ids, mm_token_type_ids=mm_types, image_grid_thw=image_grid_thw,
                                               attention_mask=attention_mask)


class ModalMixedCoT(nn.Module):
    """A VLM that writes text and, between START and END control tokens, K latent sketch embeddings.

    Args:
        vlm: a ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration`` (or a PEFT model of
            one; its adapters train through this module).
        head: a :class:`~mmlatent.models.LatentDiffusionHead` with ``latent_dim == cond_dim == D``, the language
            model's hidden size (the vision merger outputs D too).
        start_token_id, end_token_id, latent_token_id: the sketch's control tokens and its placeholder: three
            different text ids of the vocabulary, none an image id.
        num_latents: K, latents per sketch; must equal ``pool_grid[0] * pool_grid[1]``.
        pool_grid: (rows, cols) the merged image grid is average-pooled to (``adaptive_avg_pool2d``).
        diffusion_weight: lambda of ``loss = text_loss + lambda * latent_loss`` (>= 0).
        batch_mul: noise draws per latent in the diffusion loss (MAR's diffusion_batch_mul).
        detach_conditions: stop the diffusion loss's gradient at the conditions (the head trains alone; the
            VLM learns from the text loss only). Default False: the joint objective.

    Tensors: ids int64, the VLM in any float dtype; conditions and targets are cast to the head's dtype.
    """

    def __init__(self, vlm: nn.Module, head: LatentDiffusionHead, *, start_token_id: int, end_token_id: int,
                 latent_token_id: int, num_latents: int = 32, pool_grid: Sequence[int] = (4, 8),
                 diffusion_weight: float = 1.0, batch_mul: int = 4, detach_conditions: bool = False) -> None:
        super().__init__()
        backbone = VLMBackbone(vlm)
        if backbone.family not in SUPPORTED_FAMILIES:
            raise TypeError(f"vlm: Modal-mixed CoT reads the vision merger's output of Qwen2-VL / Qwen2.5-VL; got "
                            f"{type(backbone.model).__name__}")
        if not isinstance(head, LatentDiffusionHead):
            raise TypeError(f"head: expected a LatentDiffusionHead, got {type(head).__name__}")
        hidden = backbone.text_config.hidden_size
        if head.latent_dim != hidden or head.cond_dim != hidden:
            raise ValueError(f"head: expected latent_dim == cond_dim == {hidden} (the language model's hidden size), "
                             f"got latent_dim={head.latent_dim}, cond_dim={head.cond_dim}")
        if isinstance(num_latents, bool) or not isinstance(num_latents, int) or num_latents < 1:
            raise ValueError(f"num_latents: expected a positive int, got {num_latents!r}")
        if (not isinstance(pool_grid, (tuple, list)) or len(pool_grid) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pool_grid)):
            raise ValueError(f"pool_grid: expected (rows, cols) positive ints, got {pool_grid!r}")
        if pool_grid[0] * pool_grid[1] != num_latents:
            raise ValueError(f"pool_grid: {tuple(pool_grid)} pools to {pool_grid[0] * pool_grid[1]} latents, but "
                             f"num_latents={num_latents}")
        diffusion_weight = checks.number("diffusion_weight", diffusion_weight)
        if diffusion_weight < 0:
            raise ValueError(f"diffusion_weight: expected >= 0, got {diffusion_weight}")
        if isinstance(batch_mul, bool) or not isinstance(batch_mul, int) or batch_mul < 1:
            raise ValueError(f"batch_mul: expected a positive int, got {batch_mul!r}")
        if not isinstance(detach_conditions, bool):
            raise TypeError(f"detach_conditions: expected a bool, got {type(detach_conditions).__name__}")
        tokens = SketchTokens(start_token_id, end_token_id, latent_token_id, num_latents)
        config = backbone.config
        check_token_ids(tokens, (config.image_token_id, config.video_token_id, config.vision_start_token_id,
                                 config.vision_end_token_id), backbone.text_config.vocab_size)
        self.vlm = vlm
        self.head = head
        self.tokens = tokens
        self.start_token_id, self.end_token_id, self.latent_token_id = start_token_id, end_token_id, latent_token_id
        self.num_latents = num_latents
        self.pool_grid = (int(pool_grid[0]), int(pool_grid[1]))
        self.diffusion_weight = diffusion_weight
        self.batch_mul = batch_mul
        self.detach_conditions = detach_conditions
        self.hidden_size = hidden
        # ids text generation never writes: the placeholder (a latent comes from the head), END (it follows the
        # K-th latent by rule; as text it would close no sketch) and the ids that announce image features (an
        # image token without its pixels would break every later forward)
        self.unwritable_token_ids = tuple(sorted({latent_token_id, end_token_id, config.image_token_id,
                                                  config.video_token_id}))

    # ----------------------------------------------------------------------------------------------- pieces
    @property
    def backbone(self) -> VLMBackbone:
        return VLMBackbone(self.vlm)

    def text_head(self) -> LinearCrossEntropyHead:
        """The loss head over the VLM's current output layer, built once per output layer (a resized or replaced
        ``lm_head`` gets a new one). Not a submodule: its parameters are the VLM's own."""
        lm_head = self.backbone.lm_head
        cached = self.__dict__.get("_text_head")
        if cached is None or cached.weight is not lm_head.weight:
            cached = head_for(self.vlm)
            self.__dict__["_text_head"] = cached
        return cached

    @torch.no_grad()
    def encode_targets(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """[n_images, K, D] float32 sketch targets of the reasoning images: for each image the VLM's own
        ``get_image_features(...).pooler_output`` (the merger output, merged tokens in raster order over the
        (h, w) merged grid), reshaped to [h, w, D], average-pooled to ``pool_grid`` with ``adaptive_avg_pool2d``
        (in float32) and flattened in raster order. Images of different sizes pool from their own grids.

        pixel_values: [sum of t*h*w patches, C * temporal * patch^2] as the image processor returns them;
        image_grid_thw: [n_images, 3] int (t, h, w) with t = 1 (a sketch is one image)."""
        backbone = self.backbone
        checks.tensor("pixel_values", pixel_values, dtypes=checks.FLOAT_DTYPES)
        if not torch.is_tensor(image_grid_thw) or image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw: expected [n_images, 3] (t, h, w), got "
                             f"{tuple(image_grid_thw.shape) if torch.is_tensor(image_grid_thw) else image_grid_thw}")
        grids = image_grid_thw.tolist()  # host sync: the vision tower reads the grid on the host too
        merge = backbone.config.vision_config.spatial_merge_size
        for i, (t, h, w) in enumerate(grids):
            if t != 1:
                raise ValueError(f"image_grid_thw: image {i} has t={t} temporal patches; a sketch target is one image "
                                 f"(t = 1)")
            if h % merge or w % merge:
                raise ValueError(f"image_grid_thw: image {i} has a {h} x {w} patch grid, not divisible by the "
                                 f"merge size {merge}")
        patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != patches:
            raise ValueError(f"pixel_values: expected {patches} rows (the sum of t*h*w over image_grid_thw), got "
                             f"{pixel_values.shape[0]}")
        if not grids:
            return torch.zeros(0, self.num_latents, self.hidden_size, device=pixel_values.device)
        visual = backbone.vision_tower
        features = backbone.model.model.get_image_features(pixel_values.to(visual.dtype), image_grid_thw,
                                                           return_dict=True).pooler_output
        pooled = []
        for feature, (_, h, w) in zip(features, grids):
            grid = feature.float().view(h // merge, w // merge, -1).permute(2, 0, 1)
            pooled.append(F.adaptive_avg_pool2d(grid, self.pool_grid).flatten(1).transpose(0, 1))
        return torch.stack(pooled)

    def sketch_layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SketchLayout:
        """Every placeholder's (row, position), checked (see :func:`.layout.sketch_layout`)."""
        return sketch_layout(input_ids, attention_mask, self.tokens)

    # ---------------------------------------------------------------------------------------------- training
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                latent_targets: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> ModalMixedOutput:
        """The joint SFT loss of one batch, teacher-forced.

        Args:
            input_ids: [B, S] int64, left- or right-padded; each sketch ``START, latent_token_id * K, END``.
            attention_mask: [B, S] (1 real, 0 padding).
            labels: [B, S] int64 aligned with input_ids (transformers' convention: position i is scored on
                labels[i + 1]); -100 on the placeholders (and wherever no loss is wanted); START and END labelled.
            latent_targets: [N_seg, K, D] float, one row per sketch of the batch, ordered by sample, then by
                position in the sample (what :meth:`encode_targets` returns for the reasoning images in order).
            pixel_values, image_grid_thw: the prompt images, through the VLM's normal path.
            generator: the diffusion loss's times and noise (a given generator state reproduces it exactly).

        Each placeholder's input embedding is its target latent. Conditions are the final-layer hidden states
        (after the final norm) at the position right before each placeholder: START's for latent 0, latent
        j-1's for latent j. ``latent_loss = head.loss(targets, conditions, batch_mul=batch_mul,
        generator=generator)``. ValueError naming the argument for a bad layout, targets of the wrong count or
        width, or labels on placeholders."""
        checks.tensor("input_ids", input_ids, dtypes=(torch.int64, torch.int32))
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, S], got {tuple(input_ids.shape)}")
        for name, value in (("attention_mask", attention_mask), ("labels", labels)):
            if not torch.is_tensor(value) or value.shape != input_ids.shape:
                raise ValueError(f"{name}: expected a tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                                 f"{tuple(value.shape) if torch.is_tensor(value) else type(value).__name__}")
        checks.tensor("latent_targets", latent_targets, dtypes=checks.FLOAT_DTYPES)
        layout = self.sketch_layout(input_ids, attention_mask)
        K, D = self.num_latents, self.hidden_size
        if latent_targets.dim() != 3 or latent_targets.shape[1:] != (K, D):
            raise ValueError(f"latent_targets: expected [N_seg, {K}, {D}] (num_latents, hidden size), got "
                             f"{tuple(latent_targets.shape)}")
        if latent_targets.shape[0] != layout.num_segments:
            raise ValueError(f"latent_targets: {latent_targets.shape[0]} sketches given, but input_ids hold "
                             f"{layout.num_segments} (per sample: {layout.per_sample})")
        if layout.num_segments and bool((labels[layout.rows, layout.cols] != -100).any()):
            raise ValueError("labels: expected -100 on every latent placeholder (a latent is trained by the "
                             "diffusion loss, not by cross-entropy)")
        targets = latent_targets.reshape(-1, D)
        hidden = self._hidden(input_ids, attention_mask, layout, targets, pixel_values, image_grid_thw)
        text_loss = self.text_head()(hidden, labels, shift=True)
        conditions = hidden[layout.rows, layout.cols - 1]
        if self.detach_conditions:
            conditions = conditions.detach()
        dtype = next(self.head.parameters()).dtype
        conditions, targets = conditions.to(dtype), targets.to(dtype)
        if layout.num_segments:
            latent_loss = self.head.loss(targets, conditions, batch_mul=self.batch_mul, generator=generator)
        else:  # a batch without sketches: no diffusion term, and no draw from the generator
            latent_loss = text_loss.new_zeros(())
        loss = text_loss + self.diffusion_weight * latent_loss
        return ModalMixedOutput(loss=loss, text_loss=text_loss, latent_loss=latent_loss, conditions=conditions,
                                targets=targets)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: SketchLayout,
                latents: torch.Tensor, pixel_values: Optional[torch.Tensor],
                image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        backbone = self.backbone
        backbone.check_images(input_ids, pixel_values, image_grid_thw)
        embeds = backbone.input_embeddings(input_ids, pixel_values, image_grid_thw)
        if layout.num_segments:
            embeds = embeds.index_put((layout.rows, layout.cols), latents.to(embeds.dtype))
        positions, _ = mrope_positions(self.vlm, input_ids, attention_mask, image_grid_thw)
        return backbone.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                       use_cache=False).last_hidden_state

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, latents: torch.Tensor,
                      pixel_values: Optional[torch.Tensor] = None,
                      image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, S, D] final-layer hidden states (after the final norm) of sequences whose sketches are given:
        ``latents`` [N_seg, K, D] in placeholder order (sample, then position) become the placeholders' input
        embeddings, the prompt images go through the VLM's normal path, positions are M-RoPE's with the sketch
        tokens as text. The forward :meth:`forward` and a policy's log-probabilities (GRPO) share; the layout is
        checked as in :meth:`forward`."""
        checks.tensor("input_ids", input_ids, dtypes=(torch.int64, torch.int32))
        if input_ids.dim() != 2 or not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids, attention_mask: expected two [B, S] tensors, got "
                             f"{tuple(input_ids.shape)} and "
                             f"{tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else attention_mask!r}")
        checks.tensor("latents", latents, dtypes=checks.FLOAT_DTYPES)
        layout = self.sketch_layout(input_ids, attention_mask)
        K, D = self.num_latents, self.hidden_size
        if latents.dim() != 3 or latents.shape[1:] != (K, D) or latents.shape[0] != layout.num_segments:
            raise ValueError(f"latents: expected [{layout.num_segments}, {K}, {D}] (the sketches input_ids hold, "
                             f"num_latents, hidden size), got {tuple(latents.shape)}")
        return self._hidden(input_ids, attention_mask, layout, latents.reshape(-1, D), pixel_values, image_grid_thw)

    # -------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 64, steps: int = 50, schedule: ScheduleSpec = "ddim",
                 temperature: float = 1.0, cfg_scale: float = 1.0, do_sample: bool = False,
                 generator: Optional[torch.Generator] = None,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                 pad_token_id: Optional[int] = None, latent_override: Optional[str] = None,
                 text_temperature: float = 1.0) -> "ModalMixedGeneration":
        """Batched, KV-cached generation of text and sketches; see :func:`.generation.generate`."""
        from .generation import generate
        return generate(self, input_ids, attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                        max_new_tokens=max_new_tokens, steps=steps, schedule=schedule, temperature=temperature,
                        cfg_scale=cfg_scale, do_sample=do_sample, generator=generator, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, latent_override=latent_override,
                        text_temperature=text_temperature)

    def extra_repr(self) -> str:
        return (f"num_latents={self.num_latents}, pool_grid={self.pool_grid}, start={self.start_token_id}, "
                f"end={self.end_token_id}, latent={self.latent_token_id}, diffusion_weight={self.diffusion_weight}, "
                f"batch_mul={self.batch_mul}, detach_conditions={self.detach_conditions}")


__all__ = ["ModalMixedCoT", "ModalMixedOutput", "mrope_positions"]
