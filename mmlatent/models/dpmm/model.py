"""DPMM-CoT (arXiv 2312.08762) on transformers' T5 and diffusers' VAE and UNet, with no class of theirs subclassed:
the image's VAE latents are noised and denoised by a UNet whose cross-attention reads the (projected) T5 encoder
states; the UNet's block outputs in that same pass, flattened to tokens, are the image features that
:class:`~mmlatent.models.GatedFusion` fuses into the encoder states; the T5 decoder reads the fused states.
docs/design.md, "DPMM-CoT", says which choices are the paper's and which are inferred.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from mmlatent.kernels import checks, diffusion_mse, linear_cross_entropy

from ..unwrap import unwrap_peft
from .fusion import GatedFusion

BLOCK_NAME = re.compile(r"^(mid|down\.\d+|up\.\d+)$")
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample"}


def sincos_positions(height: int, width: int, channels: int, *, device: Any = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[height * width, channels] fixed 2-D sine-cosine codes (MAE's): the first half codes the row, the second
    the column, each as sin and cos at ``channels / 4`` frequencies 1 / 10000 ** (k / (channels / 4))."""
    if channels % 4:
        raise ValueError(f"channels: expected a multiple of 4, got {channels}")
    quarter = channels // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        angles = axis[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).to(device=device, dtype=dtype)


def with_positions(feature_map: torch.Tensor, channels: int) -> torch.Tensor:
    """[n, C, h, w] feature maps as [n, h * w, C + channels] tokens: each map position's C values, then its
    :func:`sincos_positions` code (``channels`` 0: the plain tokens)."""
    n, _, h, w = feature_map.shape
    tokens = feature_map.flatten(2).transpose(1, 2)
    if not channels:
        return tokens
    codes = sincos_positions(h, w, channels, device=feature_map.device, dtype=feature_map.dtype)
    return torch.cat([tokens, codes.expand(n, -1, -1)], dim=2)


def t5_text_loss(t5: nn.Module, encoder_states: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """``t5(encoder_outputs=encoder_states, attention_mask=..., labels=labels).loss`` (mean over the labels that
    are not -100) without the [B, L, V] logits: the decoder's last hidden state (scaled as T5 scales it before a
    tied output layer) into :func:`~mmlatent.kernels.linear_cross_entropy`."""
    t5 = unwrap_peft(t5)
    config = t5.config
    hidden = t5.decoder(input_ids=t5._shift_right(labels), encoder_hidden_states=encoder_states,
                        encoder_attention_mask=attention_mask).last_hidden_state
    if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings):
        hidden = hidden * (config.d_model ** -0.5)
    head = t5.get_output_embeddings()
    return linear_cross_entropy(hidden.flatten(0, 1), head.weight, labels.flatten().long(),
                                bias=getattr(head, "bias", None))


def t5_generate(t5: nn.Module, encoder_states: torch.Tensor, attention_mask: torch.Tensor,
                generation_kwargs: Dict[str, Any]) -> torch.Tensor:
    """T5's own ``generate`` from given encoder states (``encoder_outputs``); returns the decoder's ids."""
    from transformers.modeling_outputs import BaseModelOutput
    return t5.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                       attention_mask=attention_mask, **generation_kwargs)


@dataclass
class DPMMOutput:
    """``loss = text_loss + diffusion_weight * diffusion_loss`` (float32 scalars); ``diffusion_loss`` is 0 for a
    batch without images."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    diffusion_loss: torch.Tensor


def sd_noise_scheduler(num_train_timesteps: int = 1000) -> Any:
    """Stable Diffusion 1.x's training schedule: DDPM, scaled-linear betas from 0.00085 to 0.012, epsilon
    prediction."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon")


class DPMMCoT(nn.Module):
    """T5 reasoning over image features learned by a text-conditioned diffusion UNet.

    Args:
        t5: a ``T5ForConditionalGeneration`` (or a PEFT model of one).
        vae: a diffusers ``AutoencoderKL`` (images [B, 3, H, W] in [-1, 1] to latents [B, C, h, w]).
        unet: a diffusers ``UNet2DConditionModel`` on the VAE's latents, cross-attending to the T5 encoder states.
        feature_blocks: the UNet blocks whose outputs are the image features, each ``"mid"``, ``"down.<i>"`` or
            ``"up.<i>"``; all of one channel width (their tokens are concatenated).
        feature_timesteps: the timesteps of generation's feature passes (their features are averaged).
        diffusion_weight: the noise-prediction loss's weight against the text loss.
        latent_scale: the VAE latents' scale (Stable Diffusion's 0.18215).
        cross_attention_proj: maps the encoder states [B, T, d_model] to the UNet's ``cross_attention_dim``; None:
            none when the widths agree, else a new ``nn.Linear(d_model, cross_attention_dim)``.
        feature_positions: channels of a fixed 2-D sine-cosine code of each token's (row, column) in its feature
            map, concatenated to the features (:func:`with_positions`; 0: none). A flattened UNet map has no
            position of its own, where the ViT / DETR features MM-CoT fuses carry their position embeddings.
        noise_scheduler: a diffusers scheduler with ``add_noise`` and ``alphas_cumprod`` (None: Stable Diffusion
            1.x's, :func:`sd_noise_scheduler`); its ``prediction_type`` is the UNet's target.
    """

    def __init__(self, t5: nn.Module, vae: nn.Module, unet: nn.Module, *, feature_blocks: Sequence[str] = ("mid",),
                 feature_timesteps: Sequence[int] = (0,), diffusion_weight: float = 1.0,
                 latent_scale: float = 0.18215, cross_attention_proj: Optional[nn.Module] = None,
                 noise_scheduler: Any = None, feature_positions: int = 16) -> None:
        super().__init__()
        self.t5, self.vae, self.unet = t5, vae, unet
        self.noise_scheduler = noise_scheduler if noise_scheduler is not None else sd_noise_scheduler()
        prediction = self.noise_scheduler.config.prediction_type
        if prediction not in PREDICTIONS:
            raise ValueError(f"noise_scheduler: prediction_type {prediction!r} is not one of {', '.join(PREDICTIONS)}")
        self.prediction = PREDICTIONS[prediction]
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        config = unwrap_peft(t5).config
        self.d_model = int(config.d_model)
        if isinstance(feature_blocks, str) or not feature_blocks:
            raise ValueError(f"feature_blocks: expected a non-empty list of block names, got {feature_blocks!r}")
        self.feature_blocks = tuple(feature_blocks)
        widths = {self._block(name)[1] for name in self.feature_blocks}
        if len(widths) != 1:
            raise ValueError(f"feature_blocks: {list(self.feature_blocks)} have different channel widths "
                             f"{sorted(widths)}; their tokens are concatenated, so they need one")
        if isinstance(feature_positions, bool) or not isinstance(feature_positions, int) or feature_positions < 0 \
                or feature_positions % 4:
            raise ValueError(f"feature_positions: expected a multiple of 4 >= 0, got {feature_positions!r}")
        self.feature_positions = feature_positions
        self.feature_dim = widths.pop() + feature_positions
        if isinstance(feature_timesteps, (str, int)) or not feature_timesteps:
            raise ValueError(f"feature_timesteps: expected a non-empty list of timesteps, got {feature_timesteps!r}")
        for t in feature_timesteps:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.num_train_timesteps:
                raise ValueError(f"feature_timesteps: expected ints in [0, {self.num_train_timesteps}), got {t!r}")
        self.feature_timesteps = tuple(int(t) for t in feature_timesteps)
        self.diffusion_weight = checks.number("diffusion_weight", diffusion_weight)
        if self.diffusion_weight < 0:
            raise ValueError(f"diffusion_weight: expected >= 0, got {diffusion_weight}")
        self.latent_scale = checks.number("latent_scale", latent_scale, positive=True)
        cross_dim = unet.config.cross_attention_dim
        if cross_attention_proj is None and cross_dim != self.d_model:
            cross_attention_proj = nn.Linear(self.d_model, cross_dim)
        self.cross_attention_proj = cross_attention_proj
        self.fusion = GatedFusion(self.d_model, self.feature_dim)

    # ------------------------------------------------------------------------------------------------ pieces
    def _block(self, name: str) -> Tuple[nn.Module, int]:
        """(the UNet block, its output channels) of a feature block name."""
        if not isinstance(name, str) or not BLOCK_NAME.match(name):
            raise ValueError(f"feature_blocks: {name!r} is not 'mid', 'down.<i>' or 'up.<i>'")
        widths = list(self.unet.config.block_out_channels)
        if name == "mid":
            return self.unet.mid_block, widths[-1]
        kind, index = name.split(".")
        blocks = self.unet.down_blocks if kind == "down" else self.unet.up_blocks
        if int(index) >= len(blocks):
            raise ValueError(f"feature_blocks: {name!r}, but the UNet has {len(blocks)} {kind} blocks")
        return blocks[int(index)], (widths if kind == "down" else widths[::-1])[int(index)]

    @contextlib.contextmanager
    def _captured_features(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Forward hooks on the feature blocks for one UNet call: {name: [n, tokens, C]} (a down block returns
        (hidden, residuals); its hidden is the feature)."""
        captured: Dict[str, torch.Tensor] = {}
        handles = []
        for name in self.feature_blocks:
            def hook(_module, _args, output, name=name):
                hidden = output[0] if isinstance(output, tuple) else output
                captured[name] = with_positions(hidden, self.feature_positions)
            handles.append(self._block(name)[0].register_forward_hook(hook))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, d_model] the T5 encoder's states (after its final norm)."""
        return unwrap_peft(self.t5).get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def conditions(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """The UNet's cross-attention input: the encoder states, projected when the widths differ."""
        states = encoder_states.to(self.unet.dtype)
        return states if self.cross_attention_proj is None else self.cross_attention_proj(states)

    def image_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, C, h, w] scaled latents: the VAE posterior's mean times ``latent_scale`` (the mean, so a cached
        latent, :func:`cache_latents`, equals the live encoder's)."""
        posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return posterior.mean * self.latent_scale

    def unet_features(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor,
                      condition_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One UNet call: (its prediction [n, C, h, w], the feature tokens [n, N, feature_dim])."""
        with self._captured_features() as captured:
            pred = self.unet(noisy, timesteps, encoder_hidden_states=conditions,
                             encoder_attention_mask=condition_mask).sample
        return pred, torch.cat([captured[name] for name in self.feature_blocks], dim=1)

    # ------------------------------------------------------------------------------------------------ inputs
    def _image_rows(self, batch: int, device: torch.device, pixel_values: Optional[torch.Tensor],
                    has_image: Optional[torch.Tensor], latents: Optional[torch.Tensor]
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(rows [n] int64 of the samples with an image, their scaled latents [n, C, h, w] or None)."""
        if pixel_values is not None and latents is not None:
            raise ValueError("pixel_values, latents: give one (latents are the VAE's, already scaled), not both")
        source = latents if latents is not None else pixel_values
        if has_image is None:
            has_image = torch.full((batch,), source is not None, dtype=torch.bool, device=device)
        checks.tensor("has_image", has_image, dims=1, dtypes=(torch.bool,), device=device)
        checks.shape("has_image", has_image, (batch,), "[B] bool")
        rows = has_image.nonzero().flatten()
        if rows.numel() == 0:
            return rows, None
        if source is None:
            raise ValueError(f"has_image: True for {rows.numel()} samples, but neither pixel_values nor latents "
                             f"were given")
        if latents is not None:
            checks.tensor("latents", latents, dims=4, dtypes=checks.FLOAT_DTYPES, device=device)
            channels = self.unet.config.in_channels
            if latents.shape[0] != batch or latents.shape[1] != channels:
                raise ValueError(f"latents: expected [B = {batch}, C = {channels}, h, w] (the UNet's in_channels), "
                                 f"got {tuple(latents.shape)}")
            return rows, latents.index_select(0, rows).to(self.unet.dtype)
        checks.tensor("pixel_values", pixel_values, dims=4, dtypes=checks.FLOAT_DTYPES, device=device)
        if pixel_values.shape[0] != batch or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values: expected [B = {batch}, 3, H, W] in [-1, 1], got "
                             f"{tuple(pixel_values.shape)}")
        return rows, self.image_latents(pixel_values.index_select(0, rows)).to(self.unet.dtype)

    def _scatter(self, batch: int, rows: torch.Tensor, features: Optional[torch.Tensor], like: torch.Tensor
                 ) -> torch.Tensor:
        """[B, N, feature_dim] features in the encoder's dtype: the image rows' own, zeros for the others (as
        MM-CoT and DPMM-CoT give image-less questions); [B, 1, feature_dim] zeros for a batch without images."""
        if features is None:
            return like.new_zeros(batch, 1, self.feature_dim)
        out = like.new_zeros(batch, features.shape[1], self.feature_dim)
        return out.index_copy(0, rows, features.to(like.dtype))

    # ------------------------------------------------------------------------------------------------ training
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                pixel_values: Optional[torch.Tensor] = None, has_image: Optional[torch.Tensor] = None,
                latents: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                timesteps: Optional[torch.Tensor] = None) -> DPMMOutput:
        """The joint loss of one batch.

        Args:
            input_ids, attention_mask: [B, T] the encoder's input.
            labels: [B, L] int64 the decoder's targets, -100 on padding (no loss there).
            pixel_values: [B, 3, H, W] in [-1, 1], or ``latents`` [B, C, h, w] already scaled (cached); rows
                without an image may hold anything.
            has_image: [B] bool (None: every row has one when pixel_values or latents are given, else none).
            noise: [B, C, h, w] and ``timesteps`` [B] int64: the diffusion draw (None: drawn; only the image rows
                are read).

        Returns:
            :class:`DPMMOutput`. Image rows: z_t = ``add_noise(z0, noise, t)``, the UNet's prediction against its
            target (the noise, for epsilon prediction) is the diffusion loss (mean over the image rows), and the
            feature blocks' outputs in the same pass are their features; the other rows get zero features. The
            text loss is the decoder's cross-entropy (mean over the non -100 labels) on the fused encoder states,
            through :func:`~mmlatent.kernels.linear_cross_entropy` (no [B, L, V] logits).
        """
        checks.tensor("input_ids", input_ids, dims=2, dtypes=(torch.int64, torch.int32))
        B = input_ids.shape[0]
        device = input_ids.device
        checks.tensor("labels", labels, dims=2, dtypes=(torch.int64, torch.int32), device=device)
        if labels.shape[0] != B:
            raise ValueError(f"labels: expected [B = {B}, L], got {tuple(labels.shape)}")
        states = self.encode(input_ids, attention_mask)
        rows, z0 = self._image_rows(B, device, pixel_values, has_image, latents)
        diffusion_loss = torch.zeros((), device=device, dtype=torch.float32)
        features = None
        if z0 is not None:
            noise, timesteps = self._draw(z0, rows, noise, timesteps)
            noisy = self.noise_scheduler.add_noise(z0, noise, timesteps)
            pred, features = self.unet_features(noisy, timesteps, self.conditions(states.index_select(0, rows)),
                                                attention_mask.index_select(0, rows))
            alphas = self.noise_scheduler.alphas_cumprod.to(device)[timesteps]
            diffusion_loss = diffusion_mse(pred.flatten(1), z0.flatten(1), noise.flatten(1), alphas,
                                           self.prediction)
        fused = self.fusion(states, self._scatter(B, rows, features, states))
        text_loss = self.text_loss(fused, attention_mask, labels)
        return DPMMOutput(loss=text_loss + self.diffusion_weight * diffusion_loss, text_loss=text_loss,
                          diffusion_loss=diffusion_loss)

    def _draw(self, z0: torch.Tensor, rows: torch.Tensor, noise: Optional[torch.Tensor],
              timesteps: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if noise is None:
            noise = torch.randn_like(z0)
        else:
            checks.tensor("noise", noise, dims=4, dtypes=checks.FLOAT_DTYPES, device=z0.device)
            expected = (-1,) + tuple(z0.shape[1:])
            if noise.shape[1:] != z0.shape[1:]:
                raise ValueError(f"noise: expected [B, {', '.join(map(str, expected[1:]))}] like the latents, got "
                                 f"{tuple(noise.shape)}")
            noise = noise.index_select(0, rows).to(z0.dtype)
        if timesteps is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (z0.shape[0],), device=z0.device)
        else:
            checks.tensor("timesteps", timesteps, dims=1, dtypes=(torch.int64, torch.int32), device=z0.device)
            timesteps = timesteps.index_select(0, rows).long()
            if bool(((timesteps < 0) | (timesteps >= self.num_train_timesteps)).any()):
                raise ValueError(f"timesteps: expected values in [0, {self.num_train_timesteps})")
        return noise, timesteps

    def text_loss(self, fused: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The T5 decoder's mean cross-entropy on ``labels`` (-100 ignored) reading the fused encoder states,
        without the [B, L, V] logits (:func:`t5_text_loss`)."""
        return t5_text_loss(self.t5, fused, attention_mask, labels)

    # ------------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def fused_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     pixel_values: Optional[torch.Tensor] = None, has_image: Optional[torch.Tensor] = None,
                     latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, T, d_model] the encoder states fused with the features of one UNet call over every
        (image, feature timestep) pair, averaged over the timesteps. The latents are noised without noise
        (``sqrt(alpha_bar_t) z0``: the features are a deterministic function of the image)."""
        B = input_ids.shape[0]
        states = self.encode(input_ids, attention_mask)
        rows, z0 = self._image_rows(B, input_ids.device, pixel_values, has_image, latents)
        features = None
        if z0 is not None:
            features = self.timestep_features(z0, self.conditions(states.index_select(0, rows)),
                                              attention_mask.index_select(0, rows))
        return self.fusion(states, self._scatter(B, rows, features, states))

    def timestep_features(self, z0: torch.Tensor, conditions: torch.Tensor, condition_mask: torch.Tensor
                          ) -> torch.Tensor:
        """[n, N, feature_dim]: each image's features averaged over ``feature_timesteps``, from ONE UNet call
        over every (image, timestep) pair (image-major), the latents noised without noise."""
        S = len(self.feature_timesteps)
        timesteps = torch.tensor(self.feature_timesteps, device=z0.device).repeat(z0.shape[0])
        repeated = z0.repeat_interleave(S, dim=0)
        noisy = self.noise_scheduler.add_noise(repeated, torch.zeros_like(repeated), timesteps)
        _, tokens = self.unet_features(noisy, timesteps, conditions.repeat_interleave(S, dim=0),
                                       condition_mask.repeat_interleave(S, dim=0))
        return tokens.view(z0.shape[0], S, *tokens.shape[1:]).mean(dim=1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 pixel_values: Optional[torch.Tensor] = None, has_image: Optional[torch.Tensor] = None,
                 latents: Optional[torch.Tensor] = None, **generation_kwargs: Any) -> torch.Tensor:
        """T5's ``generate`` on :meth:`fused_states` (features fused once, before decoding); ``generation_kwargs``
        are ``generate``'s own (max_new_tokens, num_beams, ...). Returns the decoder's ids [B, L]."""
        fused = self.fused_states(input_ids, attention_mask, pixel_values=pixel_values, has_image=has_image,
                                  latents=latents)
        return t5_generate(self.t5, fused, attention_mask, generation_kwargs)

    def extra_repr(self) -> str:
        return (f"feature_blocks={list(self.feature_blocks)}, feature_timesteps={list(self.feature_timesteps)}, "
                f"feature_dim={self.feature_dim}, feature_positions={self.feature_positions}, "
                f"diffusion_weight={self.diffusion_weight}, "
                f"latent_scale={self.latent_scale}, prediction={self.prediction}")


class FusedT5(nn.Module):
    """T5 with MM-CoT's fusion of FIXED image features (its ``T5ForMultimodalGeneration``: the features given,
    not learned), or with ``feature_dim=None`` plain T5: DPMM-CoT's two controls.

    Args:
        t5: a ``T5ForConditionalGeneration`` (or a PEFT model of one).
        feature_dim: the features' width (a :class:`GatedFusion` fuses them after the encoder), or None (text
            only).
    """

    def __init__(self, t5: nn.Module, feature_dim: Optional[int] = None) -> None:
        super().__init__()
        self.t5 = t5
        self.d_model = int(unwrap_peft(t5).config.d_model)
        self.feature_dim = feature_dim
        self.fusion = GatedFusion(self.d_model, feature_dim) if feature_dim is not None else None

    def fused_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, T, d_model]: the encoder's states, fused with ``features`` [B, N, feature_dim] when the model has a
        fusion (zeros for image-less samples are the caller's, as MM-CoT gives them)."""
        states = unwrap_peft(self.t5).get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        states = states.last_hidden_state
        if self.fusion is None:
            if features is not None:
                raise ValueError("features: this model is text-only (feature_dim None)")
            return states
        if features is None:
            raise ValueError(f"features: required, [B, N, {self.feature_dim}] (zeros for a sample without image)")
        return self.fusion(states, features.to(states.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                features: Optional[torch.Tensor] = None) -> DPMMOutput:
        """:class:`DPMMOutput` with ``diffusion_loss`` 0: the decoder's cross-entropy without logits."""
        text_loss = t5_text_loss(self.t5, self.fused_states(input_ids, attention_mask, features), attention_mask,
                                 labels)
        return DPMMOutput(loss=text_loss, text_loss=text_loss, diffusion_loss=torch.zeros_like(text_loss))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 features: Optional[torch.Tensor] = None, **generation_kwargs: Any) -> torch.Tensor:
        """T5's ``generate`` on :meth:`fused_states`; ``generation_kwargs`` are ``generate``'s own."""
        return t5_generate(self.t5, self.fused_states(input_ids, attention_mask, features), attention_mask,
                           generation_kwargs)

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}"


def latent_tokens(latents: torch.Tensor, positions: int = 0) -> torch.Tensor:
    """[B, C, h, w] VAE latents as [B, h * w, C + positions] feature tokens (MM-CoT-style fixed features; with
    ``positions``, each token's :func:`sincos_positions` code appended, as :class:`DPMMCoT` appends it)."""
    return with_positions(latents, positions)


__all__ = ["DPMMCoT", "DPMMOutput", "FusedT5", "sd_noise_scheduler", "t5_text_loss", "t5_generate",
           "latent_tokens", "with_positions", "sincos_positions"]
