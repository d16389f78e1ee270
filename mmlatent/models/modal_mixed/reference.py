"""The transparent Modal-mixed CoT generation: one sample at a time, the whole sequence recomputed without a cache
at every step by the VLM's own forward, and every latent sampled by a diffusers scheduler's ``step()`` loop over
the head. What :meth:`ModalMixedCoT.generate` is checked against, and the generation benchmark's baseline."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import torch

from ...kernels import checks
from ..diffusion_head import ScheduleSpec
from .generation import (ModalMixedGeneration, check_generate_inputs, next_tokens, override_latents,
                         special_ids)

if TYPE_CHECKING:
    import diffusers

    from .model import ModalMixedCoT


def _scheduler(model: "ModalMixedCoT", schedule: ScheduleSpec) -> "diffusers.SchedulerMixin":
    """A diffusers scheduler for ``schedule``: the head's own configuration for a name, a copy of a given one."""
    if schedule is None or isinstance(schedule, str):
        return model.head.diffusers_scheduler(schedule)
    if hasattr(schedule, "step") and hasattr(schedule, "set_timesteps"):
        model.head.schedule(schedule)  # the same fit checks as generate
        return copy.deepcopy(schedule)
    raise TypeError(f"schedule: the reference loop steps a diffusers scheduler; give a name or a configured "
                    f"scheduler, got {type(schedule).__name__}")


def diffusers_sample(model: "ModalMixedCoT", cond: torch.Tensor, scheduler: "diffusers.SchedulerMixin", steps: int,
                     temperature: float, cfg_scale: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[1, D] float32: one latent from the condition [1, D] by ``scheduler.step()`` over the head."""
    head = model.head
    dtype = next(head.parameters()).dtype
    scheduler.set_timesteps(steps)
    x = torch.randn(1, head.latent_dim, generator=generator, device=cond.device, dtype=torch.float32) * temperature
    cond = cond.to(dtype)
    for t in scheduler.timesteps:
        time = t.reshape(1).to(cond.device)
        out = head(x.to(dtype), time, cond).float()
        if cfg_scale != 1.0:  # the unconditional branch is the head at a zero condition
            uncond = head(x.to(dtype), time, torch.zeros_like(cond)).float()
            out = uncond + cfg_scale * (out - uncond)
        stochastic = {"generator": generator} if type(scheduler).__name__ == "DDPMScheduler" else {}
        x = scheduler.step(out, t, x, **stochastic).prev_sample
    return x


def _images_per_sample(model: "ModalMixedCoT", input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                       image_grid_thw: Optional[torch.Tensor]) -> List[Tuple[Optional[torch.Tensor],
                                                                             Optional[torch.Tensor]]]:
    """Each sample's own (pixel_values, image_grid_thw), cut from the batch's by its image-token count."""
    B = input_ids.shape[0]
    if pixel_values is None:
        return [(None, None)] * B
    merge = model.backbone.config.vision_config.spatial_merge_size
    grids = image_grid_thw.tolist()
    counts = (input_ids == model.backbone.image_token_id).sum(dim=1).tolist()
    out, image, row = [], 0, 0
    for b in range(B):
        first_image, first_row, tokens = image, row, 0
        while tokens < counts[b]:
            t, h, w = grids[image]
            tokens += t * h * w // merge ** 2
            row += t * h * w
            image += 1
        out.append((pixel_values[first_row:row], image_grid_thw[first_image:image]) if image > first_image
                   else (None, None))
    return out


@torch.no_grad()
def modal_mixed_reference_generate(model: "ModalMixedCoT", input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                   *, pixel_values: Optional[torch.Tensor] = None,
                                   image_grid_thw: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
                                   steps: int = 50, schedule: ScheduleSpec = "ddim", temperature: float = 1.0,
                                   cfg_scale: float = 1.0, do_sample: bool = False,
                                   generator: Optional[torch.Generator] = None,
                                   eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                                   pad_token_id: Optional[int] = None,
                                   latent_override: Optional[str] = None,
                                   text_temperature: float = 1.0) -> ModalMixedGeneration:
    """:meth:`ModalMixedCoT.generate`'s result, computed the plain way (same keywords).

    Per sample, with its padding removed: at every step the VLM's own forward (``vlm.model(input_ids=...,
    inputs_embeds=..., pixel_values=..., image_grid_thw=..., mm_token_type_ids=...)``, no cache; its images go
    through its normal path and transformers computes the M-RoPE positions) runs on the prompt plus everything
    generated, with each generated latent as its placeholder's input embedding. The last hidden state gives the
    next text token (the output layer, argmax or a softmax draw) or conditions the next latent, sampled by a
    diffusers scheduler (``LatentDiffusionHead.diffusers_scheduler`` for a name, or a copy of the scheduler
    given) stepping over the head. With ``do_sample=False``, DDIM (eta 0) and ``temperature=0`` it equals
    ``generate`` (ids exactly, latents within float tolerance); with randomness the draws come in another
    order, so the two agree in distribution only. A ``SamplerSchedule`` is refused (TypeError): it has no
    diffusers ``step``."""
    check_generate_inputs(model, input_ids, attention_mask, max_new_tokens, do_sample, latent_override)
    text_temperature = checks.number("text_temperature", text_temperature, positive=True)
    eos, pad = special_ids(model, eos_token_id, pad_token_id)
    scheduler = _scheduler(model, schedule)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    backbone = model.backbone
    backbone.check_images(input_ids, pixel_values, image_grid_thw)
    tokens, K, D = model.tokens, model.num_latents, model.hidden_size
    device = input_ids.device
    sequences, all_latents, all_scores, all_sampled = [], [], [], []
    for b, (pixels, grid) in enumerate(_images_per_sample(model, input_ids, pixel_values, image_grid_thw)):
        prompt = input_ids[b][attention_mask[b].bool()]
        generated: List[int] = []
        scores: List[float] = []  # each position's text log-prob (0 where the head or the rule wrote it)
        sampled: List[bool] = []
        fed: List[torch.Tensor] = []  # the latents, in placeholder order
        sketched = 0 if int(prompt[-1]) == tokens.start else None
        for _ in range(max_new_tokens):
            ids = torch.cat([prompt, torch.tensor(generated, dtype=prompt.dtype, device=device)])[None]
            embeds = backbone.embed_tokens(ids)
            if fed:
                embeds[ids == tokens.latent] = torch.cat(fed).to(embeds.dtype)
            types = (ids == backbone.image_token_id).int()
            hidden = backbone.model.model(input_ids=ids, inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                          pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types,
                                          use_cache=False).last_hidden_state[:, -1]
            if sketched is not None and sketched < K:
                latent = diffusers_sample(model, hidden, scheduler, steps, temperature, cfg_scale, generator)
                fed.append(override_latents(latent, latent_override, generator))
                generated.append(tokens.latent)
                scores.append(0.0)
                sampled.append(False)
                sketched += 1
            elif sketched == K:
                generated.append(tokens.end)
                scores.append(0.0)
                sampled.append(False)
                sketched = None
            else:
                ids, log_probs = next_tokens(backbone.logits(hidden), model.unwritable_token_ids, do_sample, generator,
                                             text_temperature)
                token = int(ids[0])
                generated.append(token)
                scores.append(float(log_probs[0]))
                sampled.append(True)
                if token == tokens.start:
                    sketched = 0
                elif token in eos:
                    break
        complete = len(fed) // K * K
        sequences.append(generated)
        all_scores.append(scores)
        all_sampled.append(sampled)
        all_latents.append(torch.cat(fed[:complete]).view(-1, K, D) if complete
                           else torch.zeros(0, K, D, device=device))
    width = max(map(len, sequences))
    out = torch.full((len(sequences), width), pad, dtype=torch.long, device=device)
    log_probs = torch.zeros(len(sequences), width, device=device)
    chosen = torch.zeros(len(sequences), width, dtype=torch.bool, device=device)
    for b, row in enumerate(sequences):
        out[b, :len(row)] = torch.tensor(row, dtype=torch.long, device=device)
        log_probs[b, :len(row)] = torch.tensor(all_scores[b], device=device)
        chosen[b, :len(row)] = torch.tensor(all_sampled[b], dtype=torch.bool, device=device)
    return ModalMixedGeneration(sequences=out, latents=all_latents, log_probs=log_probs, sampled=chosen,
                                lengths=torch.tensor([len(r) for r in sequences], dtype=torch.long, device=device))


__all__ = ["modal_mixed_reference_generate", "diffusers_sample"]
