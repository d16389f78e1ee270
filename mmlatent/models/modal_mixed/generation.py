"""Batched, KV-cached generation of Modal-mixed CoT: text and sketches in one decode loop.

Every sample advances one position per step, in one forward of the language model over the whole batch,
whether it writes text or sketches. A sample whose last token was START (or that is inside a sketch) draws its
next latent from the head, conditioned on its current last hidden state; every sketching sample's latent of the
step is drawn in one ``head.sample`` call over the ragged set of sketching rows. The latent is the next input
embedding; after K latents END follows and text resumes. Sync points: one host read of the step's B new ids
(which rows start a sketch or finish), nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import torch

from ...kernels import checks
from ..compat import cache_kwargs
from ..diffusion_head import ScheduleSpec
from .model import mrope_positions

if TYPE_CHECKING:
    from .model import ModalMixedCoT

# what generate(latent_override=...) feeds back instead of each generated latent: the dummy-latent ablation
LATENT_OVERRIDES = (None, "zeros", "noise")


@dataclass
class ModalMixedGeneration:
    """What :meth:`ModalMixedCoT.generate` returns.

    Attributes:
        sequences: [B, L_new] int64 new ids: text tokens, START, ``latent_token_id`` at every latent, END; a
            sample that finished (an eos id) is padded with ``pad_token_id``.
        latents: one float32 tensor [n_seg_b, K, D] per sample: the latents fed back, sketch by sketch (a sketch
            cut short by ``max_new_tokens`` is left out).
        log_probs: [B, L_new] float32: each text token's log-probability under the distribution it was chosen
            from (softmax of the logits / ``text_temperature``, the placeholder id excluded), 0 elsewhere: what a
            policy-gradient rollout stores.
        sampled: [B, L_new] bool: the positions the text distribution chose (text tokens, START, eos); False on
            latents, the forced END and the padding after a row finished.
        lengths: [B] int64: positions each row wrote before it finished (eos included).
    """

    sequences: torch.Tensor
    latents: List[torch.Tensor]
    log_probs: Optional[torch.Tensor] = None
    sampled: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None


def special_ids(model: "ModalMixedCoT", eos_token_id: Optional[Union[int, Sequence[int]]],
                pad_token_id: Optional[int]) -> Tuple[Tuple[int, ...], int]:
    """(eos ids, pad id): as given, else the VLM's generation config (then its text config); pad falls back to the
    first eos id, as transformers' generate does."""
    vlm = model.backbone.model
    generation = getattr(vlm, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(generation, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.backbone.text_config, "eos_token_id", None)
    eos = () if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
    vocab = model.backbone.text_config.vocab_size
    for value in eos:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise ValueError(f"eos_token_id: expected ids in [0, {vocab}), got {eos_token_id!r}")
    if pad_token_id is None:
        pad_token_id = getattr(generation, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id: expected an id in [0, {vocab}), got {pad_token_id!r}")
    return eos, pad_token_id


def check_generate_inputs(model: "ModalMixedCoT", input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          max_new_tokens: int, do_sample: bool, latent_override: Optional[str]) -> None:
    """The checks ``generate`` and the reference loop share (ValueError / TypeError naming the argument)."""
    checks.tensor("input_ids", input_ids, dtypes=(torch.int64, torch.int32))
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected [B, S] with S >= 1, got {tuple(input_ids.shape)}")
    if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else attention_mask!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample: expected a bool, got {type(do_sample).__name__}")
    if latent_override not in LATENT_OVERRIDES:
        raise ValueError(f"latent_override: expected one of {LATENT_OVERRIDES}, got {latent_override!r}")
    if bool(((input_ids == model.latent_token_id) & attention_mask.bool()).any()):
        raise ValueError(f"input_ids: a prompt holds no latent placeholder (id {model.latent_token_id}); the "
                         f"sketches are generated")
    if not bool(attention_mask[:, -1].bool().all()):
        raise ValueError("attention_mask: generation prompts are left-padded (every row's last position is real)")


def override_latents(latents: torch.Tensor, override: Optional[str],
                     generator: Optional[torch.Generator]) -> torch.Tensor:
    """The dummy-latent ablation: zeros, or Gaussian noise scaled to each latent's own L2 norm."""
    if override is None:
        return latents
    if override == "zeros":
        return torch.zeros_like(latents)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return noise * (latents.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def next_tokens(logits: torch.Tensor, unwritable_token_ids: Sequence[int], do_sample: bool,
                generator: Optional[torch.Generator], text_temperature: float = 1.0
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """([n] ids, [n] float32 log-probs) from [n, V] logits: the argmax, or a draw from softmax(logits /
    ``text_temperature``), and each id's log-probability under that softmax; ``unwritable_token_ids`` (the
    placeholder, END, the image and video ids: :attr:`ModalMixedCoT.unwritable_token_ids`) are never written as text
    (their probability is 0)."""
    logits = logits.float() / text_temperature
    logits[:, list(unwritable_token_ids)] = float("-inf")
    log_probs = torch.log_softmax(logits, dim=-1)
    if not do_sample:
        ids = logits.argmax(dim=-1)
    else:
        ids = torch.multinomial(log_probs.exp(), 1, generator=generator)[:, 0]
    return ids, log_probs.gather(1, ids[:, None])[:, 0]


@torch.no_grad()
def generate(model: "ModalMixedCoT", input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
             max_new_tokens: int = 64, steps: int = 50, schedule: ScheduleSpec = "ddim", temperature: float = 1.0,
             cfg_scale: float = 1.0, do_sample: bool = False, generator: Optional[torch.Generator] = None,
             eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
             latent_override: Optional[str] = None, text_temperature: float = 1.0) -> ModalMixedGeneration:
    """Text and sketches for a left-padded batch of prompts.

    Args:
        input_ids, attention_mask: [B, S] left-padded prompts (no placeholders; a prompt may end with START).
        pixel_values, image_grid_thw: the prompt images.
        max_new_tokens: positions to generate (text, controls and latents all count).
        steps, schedule: the head's sampler, as :meth:`LatentDiffusionHead.sample` takes them.
        temperature: scales the head's initial noise (0: x_T = 0). cfg_scale: the head's guidance.
        do_sample: draw text tokens from softmax(logits) (else argmax).
        generator: the head's noise and the text draws, on the model's device.
        eos_token_id, pad_token_id: default to the VLM's generation config.
        latent_override: None, or "zeros" / "noise" (of each latent's norm) fed back instead of the generated
            latents: the dummy-latent ablation. ``latents`` then holds what was fed.
        text_temperature: divides the text logits before the draw (and the stored log-probs); the argmax is the
            same at any temperature.

    A row never writes ``latent_token_id``, END, the image or the video id as text; a row that has finished keeps a
    place in the batch (its positions are padding) until every row has finished or ``max_new_tokens`` positions
    are written.
    """
    from transformers import DynamicCache

    check_generate_inputs(model, input_ids, attention_mask, max_new_tokens, do_sample, latent_override)
    text_temperature = checks.number("text_temperature", text_temperature, positive=True)
    eos, pad = special_ids(model, eos_token_id, pad_token_id)
    resolved = model.head.schedule(schedule, steps)  # checked and converted once, not per latent
    backbone = model.backbone
    lm = backbone.language_model
    tokens, K = model.tokens, model.num_latents
    B = input_ids.shape[0]
    device = input_ids.device

    backbone.check_images(input_ids, pixel_values, image_grid_thw)
    embeds = backbone.input_embeddings(input_ids, pixel_values, image_grid_thw)
    positions, _ = mrope_positions(model.vlm, input_ids, attention_mask, image_grid_thw)
    next_position = positions.amax(dim=(0, 2)) + 1  # [B]: each row's positions continue from its own last one
    cache = DynamicCache(config=backbone.text_config)
    mask = attention_mask.to(torch.long)
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                **cache_kwargs(lm, cache)).last_hidden_state[:, -1]

    # host-side state: which rows write text, which sketch (and how far), which have finished
    sketched = [0 if t == tokens.start else None for t in input_ids[:, -1].tolist()]
    finished = [False] * B
    segments: List[List[torch.Tensor]] = [[] for _ in range(B)]
    current: List[List[torch.Tensor]] = [[] for _ in range(B)]
    written, scores, chosen = [], [], []
    lengths = [0] * B
    for step in range(max_new_tokens):
        text_rows = [b for b in range(B) if not finished[b] and sketched[b] is None]
        latent_rows = [b for b in range(B) if sketched[b] is not None and sketched[b] < K]
        end_rows = [b for b in range(B) if sketched[b] == K]
        ids = torch.full((B,), pad, dtype=torch.long, device=device)
        log_probs = torch.zeros(B, device=device)
        if text_rows:
            rows = torch.tensor(text_rows, device=device)
            ids[rows], log_probs[rows] = next_tokens(backbone.logits(hidden[rows]), model.unwritable_token_ids, do_sample,
                                                     generator, text_temperature)
        if end_rows:
            ids[torch.tensor(end_rows, device=device)] = tokens.end
        latents = None
        if latent_rows:
            rows = torch.tensor(latent_rows, device=device)
            ids[rows] = tokens.latent
            drawn = model.head.sample(hidden[rows], schedule=resolved, cfg_scale=cfg_scale,
                                      temperature=temperature, generator=generator)
            latents = override_latents(drawn, latent_override, generator)
        written.append(ids)
        scores.append(log_probs)
        chosen.append([not finished[b] and sketched[b] is None for b in range(B)])
        for b in range(B):
            lengths[b] += not finished[b]
        host = ids.tolist()  # the step's one host sync
        for b in text_rows:
            if host[b] == tokens.start:
                sketched[b] = 0
            elif host[b] in eos:
                finished[b] = True
        for i, b in enumerate(latent_rows):
            current[b].append(latents[i])
            sketched[b] += 1
            if sketched[b] == K:
                segments[b].append(torch.stack(current[b]))
                current[b] = []
        for b in end_rows:
            sketched[b] = None
        if all(finished) or step == max_new_tokens - 1:
            break
        step_embeds = backbone.embed_tokens(ids[:, None])
        if latents is not None:
            step_embeds[torch.tensor(latent_rows, device=device), 0] = latents.to(step_embeds.dtype)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        hidden = lm(inputs_embeds=step_embeds, attention_mask=mask,
                    position_ids=next_position.view(1, B, 1).expand(3, B, 1), use_cache=True,
                    **cache_kwargs(lm, cache)).last_hidden_state[:, -1]
        next_position = next_position + 1
    D = model.hidden_size
    return ModalMixedGeneration(
        sequences=torch.stack(written, dim=1),
        latents=[torch.stack(s) if s else torch.zeros(0, K, D, device=device) for s in segments],
        log_probs=torch.stack(scores, dim=1), sampled=torch.tensor(chosen, device=device).T.contiguous(),
        lengths=torch.tensor(lengths, dtype=torch.long, device=device))


__all__ = ["generate", "ModalMixedGeneration", "LATENT_OVERRIDES", "special_ids", "check_generate_inputs",
           "override_latents", "next_tokens"]
