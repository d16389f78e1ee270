"""GRPO for latent reasoners without the [B, L, V] logits: group-relative advantages, the clipped policy loss of
TRL's ``GRPOTrainer`` (every loss type and importance-sampling level it shares with PPO-style clipping), and the
policy's per-token log-probabilities of a completion from one forward, through ``linear_log_probs``.

The formulas are TRL's (``trl/trainer/grpo_trainer.py``, ``_generate_and_score_completions`` for the advantages
and ``_compute_loss`` for the loss; compared against TRL 1.13.0 in ``tests/test_grpo.py``), written for one
process and one accumulation window; docs/design.md, "GRPO", says how micro-batches and the loop use them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from mmlatent.kernels import checks

from .distributed import World
from .loop import EpochBatches

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # TRL's: A = (r - mean) / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages, [N] float32, as TRL's GRPOTrainer computes them.

    Args:
        rewards: [N] finite rewards, N = prompts x ``group_size``, each prompt's completions contiguous.
        group_size: G, completions per prompt (must divide N).
        scale: ``"group"`` divides ``r - mean_group(r)`` by (the group's std + 1e-4), ``"batch"`` by (the whole
            batch's std + 1e-4), ``"none"`` does not divide (Dr. GRPO). The std is torch's unbiased one; a group
            (or batch) of one has std 0, as in TRL.
    """
    checks.tensor("rewards", rewards, dtypes=checks.FLOAT_DTYPES)
    if rewards.dim() != 1 or rewards.shape[0] == 0:
        raise ValueError(f"rewards: expected a non-empty [N] tensor, got {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    n = rewards.shape[0]
    if n % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the {n} rewards (prompts x group_size, each "
                         f"prompt's completions contiguous)")
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards: expected finite values (a NaN or infinite reward has no advantage)")
    r = rewards.float()
    grouped = r.view(-1, group_size)
    advantages = r - grouped.mean(dim=1).repeat_interleave(group_size)
    if scale == "none":
        return advantages
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(r)
    else:
        std = r.std().expand_as(r) if n > 1 else torch.zeros_like(r)
    return advantages / (std + STD_EPS)


@dataclass
class GRPOLossOutput:
    """What :func:`grpo_loss` returns.

    Attributes:
        loss: scalar float32, differentiable in ``logp``.
        clip_ratio: scalar float32, no gradient: the fraction of masked tokens (sequences, at the sequence level)
            whose importance weight was clipped in the direction that matters (below 1 - epsilon_low with a
            negative advantage, or above 1 + epsilon_high with a positive one): TRL's ``clip_ratio/region_mean``.
        kl: scalar float32 masked mean of the k3 estimator (no gradient), or None without ``ref_logp``.
    """

    loss: torch.Tensor
    clip_ratio: torch.Tensor
    kl: Optional[torch.Tensor]


def _check_like(name: str, value: Optional[torch.Tensor], shape: torch.Size) -> None:
    if value is None:
        return
    checks.tensor(name, value, dtypes=checks.FLOAT_DTYPES)
    if value.shape != shape:
        raise ValueError(f"{name}: expected logp's shape {tuple(shape)}, got {tuple(value.shape)}")


def grpo_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              old_logp: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None, beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: Optional[float] = None, loss_type: str = "dapo",
              importance_sampling_level: str = "token", max_completion_length: Optional[int] = None,
              num_items_in_batch: Optional[Union[int, torch.Tensor]] = None) -> GRPOLossOutput:
    """TRL GRPOTrainer's clipped policy loss of one micro-batch.

    Args:
        logp: [N, L] per-token log-probs of the completion tokens under the current policy (float32; the
            gradient flows through it).
        advantages: [N] (:func:`group_advantages`), one per completion.
        mask: [N, L] bool, True on the completion's text tokens (the tokens that carry a log-prob).
        old_logp: [N, L] the log-probs the rollout was scored with (None: ``logp.detach()``, one iteration per
            rollout, so every weight is 1).
        ref_logp: [N, L] the reference policy's; needed when ``beta > 0``.
        beta: weight of the k3 KL estimator ``exp(ref - logp) - (ref - logp) - 1``, added per token.
        epsilon_low, epsilon_high: the weight is clipped to [1 - epsilon_low, 1 + epsilon_high]
            (``epsilon_high=None``: epsilon_low).
        loss_type: the reduction. ``"grpo"``: each sequence's mean over its tokens, then the mean over sequences;
            ``"bnpo"``: the mean over the micro-batch's tokens; ``"dr_grpo"``: the sum over tokens divided by N x
            ``max_completion_length`` (None: L); ``"dapo"``: the sum divided by ``num_items_in_batch``, the
            active tokens of the whole accumulated batch (None: ``mask.sum()``).
        importance_sampling_level: ``"token"`` (one weight per token) or ``"sequence"`` (GSPO: the exponential
            of the mean log-ratio over the sequence's mask).

    Over several micro-batches of one optimizer step, TRL divides the grpo, bnpo and dr_grpo losses by the
    number of micro-batches; dapo's ``num_items_in_batch`` already spans them. Masked positions of the inputs may
    hold anything: they are replaced by 0 before any exponential, and get no gradient.
    """
    checks.tensor("logp", logp, dtypes=checks.FLOAT_DTYPES)
    if logp.dim() != 2:
        raise ValueError(f"logp: expected [N, L], got {tuple(logp.shape)}")
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.shape != logp.shape:
        raise ValueError(f"mask: expected a bool tensor of logp's shape {tuple(logp.shape)}, got "
                         f"{(mask.dtype, tuple(mask.shape)) if torch.is_tensor(mask) else type(mask).__name__}")
    checks.tensor("advantages", advantages, dtypes=checks.FLOAT_DTYPES)
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages: expected [{logp.shape[0]}] (one per completion), got "
                         f"{tuple(advantages.shape)}")
    _check_like("old_logp", old_logp, logp.shape)
    _check_like("ref_logp", ref_logp, logp.shape)
    beta = checks.number("beta", beta)
    if beta < 0:
        raise ValueError(f"beta: expected >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("ref_logp: needed with beta > 0 (the KL term is against the reference policy)")
    epsilon_low = checks.number("epsilon_low", epsilon_low)
    epsilon_high = epsilon_low if epsilon_high is None else checks.number("epsilon_high", epsilon_high)
    if not 0 <= epsilon_low < 1:
        raise ValueError(f"epsilon_low: expected 0 <= epsilon_low < 1, got {epsilon_low}")
    if epsilon_high < 0:
        raise ValueError(f"epsilon_high: expected >= 0, got {epsilon_high}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level: expected one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, got "
                         f"{importance_sampling_level!r}")
    if max_completion_length is not None and (isinstance(max_completion_length, bool)
                                              or not isinstance(max_completion_length, int)
                                              or max_completion_length < 1):
        raise ValueError(f"max_completion_length: expected a positive int, got {max_completion_length!r}")

    weights = mask.to(logp.dtype)
    zero = logp.new_zeros(())
    logp = torch.where(mask, logp, zero)
    old = logp.detach() if old_logp is None else torch.where(mask, old_logp.to(logp.dtype), zero)
    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_weight = log_ratio
    else:
        log_weight = ((log_ratio * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_weight)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = None
    if ref_logp is not None:
        ref = torch.where(mask, ref_logp.to(logp.dtype), zero)
        per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
        if beta > 0:
            per_token = per_token + beta * per_token_kl
        kl = ((per_token_kl * weights).sum() / weights.sum().clamp(min=1.0)).detach().float()
    n, length = logp.shape
    if loss_type == "grpo":
        loss = ((per_token * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * weights).sum() / weights.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * weights).sum() / (n * (max_completion_length or length))
    else:
        items = weights.sum() if num_items_in_batch is None else num_items_in_batch
        if not torch.is_tensor(items):
            if isinstance(items, bool) or not isinstance(items, (int, float)) or items <= 0:
                raise ValueError(f"num_items_in_batch: expected a positive count, got {num_items_in_batch!r}")
            items = torch.tensor(float(items), device=logp.device)
        loss = (per_token * weights).sum() / items.to(logp.device, logp.dtype).clamp(min=1.0)
    with torch.no_grad():
        clipped = (((coef_1 < 1 - epsilon_low) & (adv < 0)) | ((coef_1 > 1 + epsilon_high) & (adv > 0))).to(logp.dtype)
        if importance_sampling_level == "sequence":
            clip_ratio = clipped.sum() / n
        else:
            clip_ratio = (clipped * weights).sum() / weights.sum().clamp(min=1.0)
    return GRPOLossOutput(loss=loss.float(), clip_ratio=clip_ratio.float(), kl=kl)


# ------------------------------------------------------------------------------------------ log-probabilities

def completion_log_probs(model: nn.Module, batch: Dict[str, Any], *, temperature: float = 1.0
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The policy's per-token log-probs of the completions, from one forward over prompt + completion.

    Args:
        model: a :class:`~mmlatent.models.ModalMixedCoT`, or a transformers causal LM / VLM (Qwen2-VL,
            Qwen2.5-VL, ...) or a PEFT model of one, as a plain policy.
        batch: ``input_ids`` [N, S + L] (prompts left-padded to S, completions right-padded to L),
            ``attention_mask`` [N, S + L], ``completion_mask`` [N, L] bool (True on the completion tokens that
            carry a log-prob: the sampled text tokens), the prompt images (``pixel_values``, ``image_grid_thw``)
            and, for a Modal-mixed model, ``latents`` [N_seg, K, D]: the rollout's sketches in the order of their
            placeholders (row by row), fed back verbatim as the placeholders' input embeddings. Optional
            ``group_size`` G: every G consecutive rows share one prompt (a GRPO group; checked), so the prompt
            runs once per group and its keys and values are shared by the group's completions
            (:func:`shared_prompt_hidden`).
        temperature: the logits are divided by it, as the rollout sampled them.

    Returns:
        (logp [N, L] float32, 0 where the mask is False; mask [N, L] bool, ``completion_mask``). Only the masked
        rows' log-probs are computed, through :func:`~mmlatent.kernels.linear_log_probs` (never the [N, L, V]
        logits); they are differentiable in the model's parameters. A Modal-mixed model's text distribution
        excludes its ``unwritable_token_ids`` (the placeholder, END, image and video ids), as its generation does;
        a plain VLM's excludes its image and video ids (:func:`plain_unwritable_token_ids`), as :func:`plain_rollout`
        does.
    """
    from mmlatent.models import ModalMixedCoT
    from mmlatent.models.lm_head import LinearCrossEntropyHead, head_for
    for key in ("input_ids", "attention_mask", "completion_mask"):
        if key not in batch:
            raise ValueError(f"batch: missing {key!r} (expected input_ids, attention_mask, completion_mask)")
    input_ids, attention_mask, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    checks.tensor("batch['input_ids']", input_ids, dtypes=(torch.int64, torch.int32))
    if input_ids.dim() != 2:
        raise ValueError(f"batch['input_ids']: expected [N, S + L], got {tuple(input_ids.shape)}")
    if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"batch['attention_mask']: expected input_ids' shape {tuple(input_ids.shape)}")
    if (not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.dim() != 2
            or mask.shape[0] != input_ids.shape[0] or not 0 < mask.shape[1] < input_ids.shape[1]):
        raise ValueError(f"batch['completion_mask']: expected a bool [N, L] with N = {input_ids.shape[0]} and "
                         f"0 < L < {input_ids.shape[1]} (the completion's length), got "
                         f"{(mask.dtype, tuple(mask.shape)) if torch.is_tensor(mask) else type(mask).__name__}")
    temperature = checks.number("temperature", temperature, positive=True)
    length = mask.shape[1]
    completion = input_ids[:, -length:]
    if bool((mask & ~attention_mask[:, -length:].bool()).any()):
        raise ValueError("batch['completion_mask']: True on a padding position of the completion")
    group_size = _prompt_group_size(batch, length)
    if isinstance(model, ModalMixedCoT):
        if bool((mask & (completion == model.latent_token_id)).any()):
            raise ValueError("batch['completion_mask']: True on a latent placeholder (a sketch carries no "
                             "log-prob)")
        latents = batch.get("latents")
        if latents is None:
            raise ValueError("batch: missing 'latents' (a Modal-mixed completion's sketches, replayed at its "
                             "placeholders)")
        if group_size and _prompt_sharing_applies(model.vlm):
            before = shared_prompt_hidden(model, batch, length, group_size)
        else:
            hidden = model.hidden_states(input_ids, attention_mask, latents=latents,
                                         pixel_values=batch.get("pixel_values"),
                                         image_grid_thw=batch.get("image_grid_thw"))
            before = hidden[:, -length - 1:-1]  # position i scores token i + 1
        base = model.text_head()
        suppressed = sorted(set(base.suppressed_token_ids or ()) | set(model.unwritable_token_ids))
        head = LinearCrossEntropyHead(model.backbone.lm_head, suppressed_token_ids=suppressed)
    else:
        if group_size and _prompt_sharing_applies(model):
            before = shared_prompt_hidden(model, batch, length, group_size)
        else:
            extra = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if batch.get(k) is not None}
            before = _backbone_hidden(model, input_ids, attention_mask, extra)[:, -length - 1:-1]
        head = head_for(model, also_suppressed=plain_unwritable_token_ids(model))
    rows = before[mask]
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=before.device)
    if rows.shape[0]:
        logp = logp.index_put((mask.nonzero(as_tuple=True)), head.log_probs(rows, completion[mask],
                                                                              temperature=temperature))
    return logp, mask


def rollout_batch(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generation: Any, *,
                  pad_token_id: int, pixel_values: Optional[torch.Tensor] = None,
                  image_grid_thw: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """The batch :func:`completion_log_probs` reads, from left-padded prompts [N, S] and what
    :meth:`~mmlatent.models.ModalMixedCoT.generate` returned for them (``sequences``, ``latents``,
    ``log_probs``, ``sampled``, ``lengths``).

    A completion keeps the positions its row wrote before finishing (eos included); a sketch that
    ``max_new_tokens`` cut short is dropped from its START on (its latents were never returned, and the
    sketch cannot be replayed without them), so its START's log-prob leaves the mask too. ``completion_mask``
    marks the sampled text tokens (text, START, eos), never the latents, the forced END or the padding.
    Returns ``input_ids``, ``attention_mask``, ``completion_mask``, ``latents`` [N_seg, K, D], ``old_logp`` [N, L]
    (the rollout's own log-probs, 0 off the mask) and the prompt images."""
    from mmlatent.models import ModalMixedCoT
    sequences, lengths = generation.sequences, generation.lengths
    if lengths is None or generation.sampled is None or generation.log_probs is None:
        raise ValueError("generation: expected the log_probs, sampled and lengths a rollout records")
    if prompt_ids.shape[0] != sequences.shape[0] or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids, prompt_mask: expected [{sequences.shape[0]}, S] (one prompt per "
                         f"completion), got {tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}")
    n, length = sequences.shape
    keep = torch.arange(length, device=sequences.device)[None] < lengths[:, None]
    replayed = []
    if isinstance(model, ModalMixedCoT):
        tokens, K = model.tokens, model.num_latents
        for b, row in enumerate(sequences.tolist()):  # host: the cut of an unfinished sketch
            end = int(lengths[b])
            opened = [i for i, t in enumerate(row[:end]) if t == tokens.start]
            if opened and (opened[-1] + K + 1 >= end or row[opened[-1] + K + 1] != tokens.end):
                keep[b, opened[-1]:] = False  # its K latents may all be there, but END is not
                opened.pop()
            replayed.append(generation.latents[b][:len(opened)])
    completion = torch.where(keep, sequences, torch.full_like(sequences, pad_token_id))
    mask = generation.sampled & keep
    batch = dict(input_ids=torch.cat([prompt_ids, completion], dim=1),
                 attention_mask=torch.cat([prompt_mask.to(torch.long), keep.to(torch.long)], dim=1),
                 completion_mask=mask, old_logp=torch.where(mask, generation.log_probs.float(),
                                                            torch.zeros((), device=sequences.device)))
    if isinstance(model, ModalMixedCoT):
        batch["latents"] = torch.cat(replayed).float()
    if pixel_values is not None:
        batch.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    return batch


@torch.no_grad()
def plain_rollout(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                  eos_token_id: int, pad_token_id: int, temperature: float = 1.0,
                  generator: Optional[torch.Generator] = None, pixel_values: Optional[torch.Tensor] = None,
                  image_grid_thw: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """A plain policy's rollout: transformers' own ``generate`` samples the completions of left-padded prompts
    [N, S] from softmax(logits / ``temperature``) over the vocabulary but :func:`plain_unwritable_token_ids` (a
    fresh generation config: no top-k, top-p or repetition penalty from the checkpoint's
    ``generation_config.json``, so the distribution sampled is the one :func:`completion_log_probs` scores), then
    one forward scores them for ``old_logp``.

    ``generator`` seeds the draw (transformers samples from the global generator, which is forked and seeded from
    it, so a saved generator state replays the rollout). Returns the batch :func:`rollout_batch` returns
    (``old_logp`` from the forward, no ``latents``) plus ``lengths`` [N] (the positions each row wrote, eos
    included)."""
    from transformers import GenerationConfig
    temperature = checks.number("temperature", temperature, positive=True)
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask: expected prompt_ids' shape {tuple(prompt_ids.shape)}, got "
                         f"{tuple(prompt_mask.shape)}")
    device = prompt_ids.device
    seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device if generator else "cpu"))
    unwritable = plain_unwritable_token_ids(model)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              suppress_tokens=list(unwritable) or None)
    images = {k: v for k, v in (("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw)) if v is not None}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                   **images, **_multimodal_types(model, prompt_ids, images))
    completion = sequences[:, prompt_ids.shape[1]:]
    length = completion.shape[1]
    is_eos = completion == eos_token_id
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, torch.full_like(is_eos[:, 0], length,
                                                                                               dtype=torch.long))
    keep = torch.arange(length, device=device)[None] < lengths[:, None]
    completion = torch.where(keep, completion, torch.full_like(completion, pad_token_id))
    batch = dict(input_ids=torch.cat([prompt_ids, completion], dim=1),
                 attention_mask=torch.cat([prompt_mask.to(torch.long), keep.to(torch.long)], dim=1),
                 completion_mask=keep, **images)
    batch["old_logp"], _ = completion_log_probs(model, batch, temperature=temperature)
    batch["lengths"] = lengths
    return batch


def _prompt_group_size(batch: Dict[str, Any], length: int) -> Optional[int]:
    """``batch['group_size']`` checked: an int G > 1 dividing N whose groups of rows share their prompt (ids and
    mask); None without one (or G = 1)."""
    G = batch.get("group_size")
    if G is None or G == 1:
        return None
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    N = input_ids.shape[0]
    if isinstance(G, bool) or not isinstance(G, int) or G < 1 or N % G:
        raise ValueError(f"batch['group_size']: expected a positive int dividing the {N} rows, got {G!r}")
    S = input_ids.shape[1] - length
    ids = input_ids[:, :S].reshape(N // G, G, S)
    masks = attention_mask[:, :S].reshape(N // G, G, S)
    differs = (ids != ids[:, :1]).any(dim=(1, 2)) | (masks != masks[:, :1]).any(dim=(1, 2))
    if bool(differs.any()):  # one host read: a wrong group size would pair completions with other prompts
        group = int(differs.nonzero()[0, 0])
        raise ValueError(f"batch['group_size']: rows {group * G}..{group * G + G - 1} (group {group}) do not share "
                         f"one prompt")
    return G


def _prompt_sharing_applies(vlm: nn.Module) -> bool:
    """Whether :func:`shared_prompt_hidden` can run ``vlm``: a model family mmlatent knows (its language model
    takes a KV cache and input embeddings) whose layers are not under activation checkpointing (transformers turns
    the cache off there; the full forward is taken)."""
    from mmlatent.models.backbones.base import supported_model_classes
    from mmlatent.models.unwrap import unwrap_peft
    base = unwrap_peft(vlm)
    if type(base).__name__ not in supported_model_classes():
        return False
    return not any(getattr(m, "gradient_checkpointing", False) for m in base.modules())


def _leader_images(backbone: Any, prompt_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                   image_grid_thw: Optional[torch.Tensor], G: int
                   ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The images of every G-th row (each group's first), from the images of all rows in row order: Qwen-VL's
    patch rows by their grids; other families' images one [3, H, W] each."""
    if pixel_values is None:
        return None, None
    rows = prompt_ids.shape[0]
    per_row = (prompt_ids == backbone.image_token_id).sum(dim=1).tolist()  # host: the images' row bookkeeping
    if image_grid_thw is None:  # one image per fixed token count
        per_image = backbone.tokens_per_image(pixel_values.shape[-2:])
        counts = [n // per_image for n in per_row]
        starts = np.cumsum([0] + counts)
        keep = [i for r in range(0, rows, G) for i in range(starts[r], starts[r] + counts[r])]
        return pixel_values[keep], None
    merge = backbone.config.vision_config.spatial_merge_size
    patches = image_grid_thw.prod(dim=1).tolist()
    tokens = [p // merge ** 2 for p in patches]
    image, patch, images, patch_rows = 0, 0, [], []
    for r in range(rows):
        left = per_row[r]
        while left > 0:
            if r % G == 0:
                images.append(image)
                patch_rows.append((patch, patch + patches[image]))
            left -= tokens[image]
            patch += patches[image]
            image += 1
    index = torch.cat([torch.arange(a, b) for a, b in patch_rows]).to(pixel_values.device)
    return pixel_values.index_select(0, index), image_grid_thw[images]


def shared_prompt_hidden(model: nn.Module, batch: Dict[str, Any], length: int, group_size: int) -> torch.Tensor:
    """The hidden states [N, L, D] that score the L completion tokens (position i scores token i + 1), with each
    group's prompt run once: the prompt forward of the N / G distinct prompts fills a KV cache (with gradients),
    the cache is repeated G times along the batch, and the completions run on it with the positions the full
    sequence has. Equal to the full forward's to rounding; a prompt of S tokens costs N / G instead of N rows of
    layer activations and compute. ``model``: a :class:`~mmlatent.models.ModalMixedCoT` (its sketches replayed
    at their placeholders) or a VLM of a family :class:`~mmlatent.models.VLMBackbone` knows."""
    from transformers import DynamicCache

    from mmlatent.models import ModalMixedCoT, VLMBackbone
    from mmlatent.models.compat import cache_kwargs
    from mmlatent.models.modal_mixed.model import mrope_positions
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    G, S = group_size, input_ids.shape[1] - length
    modal_mixed = isinstance(model, ModalMixedCoT)
    vlm = model.vlm if modal_mixed else model
    backbone = VLMBackbone(vlm)
    pixel_values, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    if modal_mixed:
        positions, _ = mrope_positions(vlm, input_ids, attention_mask, grid)
    else:  # the positions the model's own forward gives the whole sequence
        positions = backbone.position_ids(backbone.model_positions(input_ids, attention_mask, grid))
    prompt_ids = input_ids[::G, :S]
    leader_pixels, leader_grid = _leader_images(backbone, input_ids[:, :S], pixel_values, grid, G)
    backbone.check_images(prompt_ids, leader_pixels, leader_grid)
    prompt_embeds = backbone.input_embeddings(prompt_ids, leader_pixels, leader_grid)
    lm = backbone.language_model
    cache = DynamicCache(config=backbone.text_config)
    mask = attention_mask.to(torch.long)
    last_prompt = lm(inputs_embeds=prompt_embeds, attention_mask=mask[::G, :S], position_ids=positions[..., ::G, :S],
                     use_cache=True, **cache_kwargs(lm, cache)).last_hidden_state[:, -1:]
    cache.batch_repeat_interleave(G)
    completion_embeds = backbone.embed_tokens(input_ids[:, S:])
    if modal_mixed:
        layout = model.sketch_layout(input_ids, attention_mask)
        latents = batch["latents"]
        expected = (layout.num_segments, model.num_latents, model.hidden_size)
        if not torch.is_tensor(latents) or tuple(latents.shape) != expected:
            raise ValueError(f"latents: expected [{', '.join(map(str, expected))}] (the sketches input_ids hold, "
                             f"num_latents, hidden size), got "
                             f"{tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}")
        if layout.num_segments:
            if bool((layout.cols < S).any()):
                raise ValueError("batch['input_ids']: a sketch placeholder inside the prompt; a shared prompt holds "
                                 "none")
            completion_embeds = completion_embeds.index_put(
                (layout.rows, layout.cols - S), latents.reshape(-1, model.hidden_size).to(completion_embeds.dtype))
    first = last_prompt.repeat_interleave(G, dim=0)
    if length == 1:  # the prompt's last position scores the only completion token
        return first
    completion = lm(inputs_embeds=completion_embeds[:, :-1], attention_mask=mask[:, :-1],
                    position_ids=positions[..., :, S:-1], use_cache=True, **cache_kwargs(lm, cache)).last_hidden_state
    return torch.cat([first, completion], dim=1)


def plain_unwritable_token_ids(model: nn.Module) -> Tuple[int, ...]:
    """The ids a plain VLM policy never writes: its image and video placeholders (one written as text would ask
    the forward for an image feature that does not exist); none for a text-only model."""
    from mmlatent.models.unwrap import unwrap_peft
    config = unwrap_peft(model).config
    return tuple(sorted({int(i) for i in (getattr(config, "image_token_id", None),
                                          getattr(config, "video_token_id", None)) if i is not None}))


def _multimodal_types(model: nn.Module, input_ids: torch.Tensor, images: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """``mm_token_type_ids`` (0 text, 1 image, 2 video) of a Qwen-VL input with images, which its M-RoPE positions
    need (the processor would return it); nothing for a model without image tokens or an input without images."""
    from mmlatent.models.unwrap import unwrap_peft
    config = unwrap_peft(model).config
    image_id = getattr(config, "image_token_id", None)
    if image_id is None or "image_grid_thw" not in images:
        return {}
    types = (input_ids == image_id).int()
    video_id = getattr(config, "video_token_id", None)
    if video_id is not None:
        types = types + 2 * (input_ids == video_id).int()
    return {"mm_token_type_ids": types}


def _backbone_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     extra: Dict[str, Any]) -> torch.Tensor:
    """The last hidden state [N, S, H] (after the final norm) of a transformers model's backbone."""
    from mmlatent.models.unwrap import unwrap_peft
    inner = unwrap_peft(model)
    backbone = getattr(inner, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is inner:
        raise TypeError(f"model: expected a ModalMixedCoT or a transformers causal LM / VLM with a backbone, got "
                        f"{type(model).__name__}")
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, **extra,
                       **_multimodal_types(model, input_ids, extra))
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]




# ---------------------------------------------------------------------------------------------- the GRPO run
# ``mmlatent train`` with ``method: grpo``: RL on the text of a finished Modal-mixed SFT run (its final/ folder).

METHOD = "grpo"
POLICIES = ("modal_mixed", "plain")
REWARDS: Dict[str, Any] = {}


def register_reward(name: str, fn: Any) -> None:
    """Makes ``reward: name`` in a GRPO config call ``fn(completions: List[str], records: list) -> List[float]``
    (one reward per completion; the records are the questions, repeated once per completion)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable fn(completions, records), got {type(fn).__name__}")
    REWARDS[name] = fn


def strict_answer_reward(completions: List[str], records: list) -> List[float]:
    """1 for a completion whose first "the answer is X" is the gold answer (the evaluation's strict parse), else
    0."""
    from .modal_mixed import answer_correct
    return [1.0 if answer_correct(text, record) else 0.0 for text, record in zip(completions, records)]


def format_reward(completions: List[str], records: list) -> List[float]:
    """1 for a completion the strict parse can read an answer from (right or wrong), else 0."""
    from .modal_mixed import answer_given
    return [1.0 if answer_given(text, record) else 0.0 for text, record in zip(completions, records)]


register_reward("strict_answer", strict_answer_reward)
register_reward("format", format_reward)


@dataclass
class GRPOConfig:
    """One GRPO run (YAML keys are these fields; ``train`` holds :class:`~mmlatent.train.TrainConfig` fields
    but ``grad_accum``, which is the rollout's micro-batch count).

    ``init_from``: a finished Modal-mixed run's ``final/`` folder (its model, tokenizer, data and sampler are the
    defaults here). ``policy``: ``modal_mixed`` (the model writes text and sketches; the sketches are replayed in
    the loss) or ``plain`` (its VLM alone, a transformers model rolled out by its own ``generate``: text only);
    by default ``modal_mixed`` for a Modal-mixed SFT run and ``plain`` for its text-CoT and no-CoT variants.
    Each optimizer step's rollout draws ``prompts_per_step`` training questions and ``group_size`` completions of
    each (text drawn at ``text_temperature``, the sketches by the head from noise scaled by
    ``latent_temperature``), in micro-batches of ``micro_batch_size`` completions (whole groups);
    ``num_iterations`` optimizer steps reuse one rollout. ``reward`` names a registered reward
    (:func:`register_reward`), plus ``format_weight`` times the format reward. The loss keywords are
    :func:`grpo_loss`'s; ``scale_rewards`` is :func:`group_advantages`' ``scale``. ``lora``: LoRA adapters added
    for RL (then the reference policy of ``beta > 0`` is the model with its adapters disabled; without them a
    frozen copy of the VLM)."""

    name: str = "grpo"
    method: str = METHOD
    init_from: str = ""
    policy: Optional[str] = None
    group_size: int = 8
    prompts_per_step: int = 4
    micro_batch_size: int = 16
    num_iterations: int = 1
    max_new_tokens: Optional[int] = None
    text_temperature: float = 1.0
    latent_temperature: float = 1.0
    sampler: Optional[Dict] = None
    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None
    importance_sampling_level: str = "token"
    scale_rewards: str = "group"
    reward: str = "strict_answer"
    format_weight: float = 0.0
    lora: Optional[Dict] = None
    eval_samples: int = 64
    train: Dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .ivtlr import _check_lora
        from .loop import check_int
        from .methods import check_train_options
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        if self.method != METHOD:
            raise ValueError(f"method: expected {METHOD!r} for a GRPO run, got {self.method!r}")
        if not isinstance(self.init_from, str) or not self.init_from:
            raise ValueError("init_from: expected the final/ folder of a finished Modal-mixed run (the SFT "
                             "checkpoint), got none")
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)} or null (from the SFT run's mode), got "
                             f"{self.policy!r}")
        for key in ("group_size", "prompts_per_step", "micro_batch_size", "num_iterations", "eval_samples"):
            check_int(key, getattr(self, key))
        if self.max_new_tokens is not None:
            check_int("max_new_tokens", self.max_new_tokens)
        if self.group_size < 2:
            raise ValueError(f"group_size: expected >= 2 (advantages compare a question's completions), got "
                             f"{self.group_size}")
        if self.micro_batch_size % self.group_size:
            raise ValueError(f"micro_batch_size: {self.micro_batch_size} is not a multiple of group_size "
                             f"({self.group_size}); a micro-batch holds whole groups")
        if (self.prompts_per_step * self.group_size) % self.micro_batch_size:
            raise ValueError(f"micro_batch_size: {self.micro_batch_size} does not divide the "
                             f"{self.prompts_per_step * self.group_size} completions of a step")
        for key in ("text_temperature", "latent_temperature"):
            value = checks.number(key, getattr(self, key))
            if value <= 0 and key == "text_temperature" or value < 0:
                raise ValueError(f"{key}: expected {'> 0' if key == 'text_temperature' else '>= 0'}, got {value}")
        if self.sampler is not None and (not isinstance(self.sampler, dict)
                                         or set(self.sampler) - {"steps", "schedule", "cfg_scale"}):
            raise ValueError(f"sampler: expected a mapping of steps, schedule, cfg_scale, got {self.sampler!r}")
        if self.scale_rewards not in SCALES:
            raise ValueError(f"scale_rewards: expected one of {', '.join(SCALES)}, got {self.scale_rewards!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward: expected a registered reward ({', '.join(sorted(REWARDS))}), got "
                             f"{self.reward!r}")
        checks.number("format_weight", self.format_weight)
        if self.lora is not None:
            _check_lora(self.lora)
        # the loss keywords, checked once by the loss itself on a one-token input
        one = torch.zeros(1, 1)
        grpo_loss(one, torch.zeros(1), torch.ones(1, 1, dtype=torch.bool), ref_logp=one, beta=self.beta,
                  epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                  importance_sampling_level=self.importance_sampling_level)
        check_train_options(self.train)
        if "grad_accum" in self.train:
            raise ValueError("train.grad_accum: set by the rollout (its completions / micro_batch_size); use "
                             "micro_batch_size and prompts_per_step")
        save_every = self.train.get("save_every", 0)
        if save_every % self.num_iterations:
            raise ValueError(f"train.save_every: {save_every} is not a multiple of num_iterations "
                             f"({self.num_iterations}); a checkpoint is written between rollouts")

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @classmethod
    def load(cls, path: str) -> "GRPOConfig":
        from .methods import from_mapping, read_yaml
        return from_mapping(cls, read_yaml(path), path)


# what run.json keeps of each step (the rollout's and the loss's numbers; the Trainer's are in train_loss)
STEP_LOG_KEYS = ("step", "loss", "reward", "reward_std", "zero_std_groups", "kl", "clip_ratio", "completion_length",
                 "sketches", "rollout_seconds", "tokens_per_s", "peak_memory_bytes")
RUN_CONFIG = GRPOConfig  # the config class of this method's runs (mmlatent.train.methods)


class Rollouts(EpochBatches):
    """The stream of micro-batches the Trainer reads for a GRPO run: at the first micro-batch of a step it draws
    ``prompts_per_step`` questions, samples every completion (eval mode, no_grad), scores and packs them; the
    next ``num_iterations`` optimizer steps read the same micro-batches. Its state (the question order's
    position and the sampling generator) is part of every checkpoint, so a resumed run rolls out the same
    completions."""

    def __init__(self, config: GRPOConfig, sft: Any, model: Any, tokenizer: Any, image_processor: Any, records: list,
                 reference: Optional[Any] = None) -> None:
        from .modal_mixed import collator
        super().__init__(records, config.prompts_per_step, lambda chosen, epoch: chosen,
                         seed=config.train.get("seed", 0))
        self.config, self.sft, self.model, self.tokenizer = config, sft, model, tokenizer
        # what writes the completions and scores them: the Modal-mixed model, or its VLM as a plain policy
        self.policy = model if config.policy == "modal_mixed" else model.vlm
        self.reference = reference
        self.make = collator(sft, tokenizer, image_processor, prompt_only=True)
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(config.train.get("seed", 0) + 1)
        self.pending: List[Dict[str, Any]] = []
        self.current: List[Dict[str, Any]] = []
        self.passes_left = 0
        self.rollout_epoch = 0
        self.last: Dict[str, float] = {}
        self.losses: List[GRPOLossOutput] = []
        self.world = World()
        # how a rollout reaches the whole model: the Trainer's with_full_model, which under FSDP2 gathers it
        self.with_model: Callable[[Callable[[nn.Module], Any]], Any] = lambda fn: fn(self.model)

    def shard(self, rank: int, world_size: int) -> None:
        """A data-parallel rank's stream: its share of each step's prompts (every group of G completions stays
        on the rank that rolls it out) and a sampling generator of its own."""
        EpochBatches.shard(self, rank, world_size)
        self.world = World(rank, world_size, rank)
        self.generator.manual_seed(self.config.train.get("seed", 0) + 1 + rank * 2 ** 32)

    def __next__(self) -> Tuple[int, Dict[str, Any]]:
        if not self.pending:
            if self.passes_left == 0:
                self.rollout_epoch, chosen = EpochBatches.__next__(self)
                with torch.no_grad():
                    self.current = self.with_model(lambda _model: self._roll(chosen))
                self.passes_left = self.config.num_iterations
            self.passes_left -= 1
            reuse = self.passes_left < self.config.num_iterations - 1
            self.pending = [dict(b, reuse=reuse) for b in self.current]
        return self.rollout_epoch, self.pending.pop(0)

    def state_dict(self) -> dict:
        if self.pending or self.passes_left:
            raise RuntimeError("a GRPO checkpoint is written between rollouts (train.save_every is a multiple of "
                               "num_iterations)")
        return dict(EpochBatches.state_dict(self), generator=self.generator.get_state().tolist())

    def load_state_dict(self, state: dict) -> None:
        EpochBatches.load_state_dict(self, state)
        if "generator" in state:
            self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.pending, self.current, self.passes_left = [], [], 0

    # ---------------------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def _roll(self, chosen: list) -> List[Dict[str, Any]]:
        c, sft = self.config, self.sft
        sampler = dict(sft.sampler, **(c.sampler or {}))
        G = c.group_size
        was_training = self.model.training
        self.model.eval()
        batches, rewards_all, lengths, sketches = [], [], [], []
        per_micro = c.micro_batch_size // G
        t0 = time.perf_counter()
        try:
            for start in range(0, len(chosen), per_micro):
                records = [r for r in chosen[start:start + per_micro] for _ in range(G)]
                prompts = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in self.make(records).items()}
                if self.policy is not self.model:
                    batch = plain_rollout(
                        self.policy, prompts["input_ids"], prompts["attention_mask"],
                        max_new_tokens=c.max_new_tokens or sft.max_new_tokens, temperature=c.text_temperature,
                        generator=self.generator, eos_token_id=self.tokenizer.eos_id,
                        pad_token_id=self.tokenizer.pad_id, pixel_values=prompts.get("pixel_values"),
                        image_grid_thw=prompts.get("image_grid_thw"))
                    row_lengths = batch.pop("lengths").tolist()
                    completions = batch["input_ids"][:, prompts["input_ids"].shape[1]:].tolist()
                    texts = [self.tokenizer.decode(row[:n]) for row, n in zip(completions, row_lengths)]
                    rewards = _rewards(c, texts, records)
                    sketches += [0] * len(records)
                else:
                    batch, rewards, row_lengths = self._roll_modal_mixed(prompts, records, sampler)
                    sketches += [len(x) for x in batch.pop("sketches")]
                batch["advantages"] = group_advantages(rewards, G, scale=c.scale_rewards).to(self.device)
                batch["group_size"] = G  # each group's prompt runs once in the loss's forward
                if c.beta > 0:
                    batch["ref_logp"] = _reference_log_probs(self, batch)
                batches.append(batch)
                rewards_all.append(rewards)
                lengths += row_lengths
        finally:
            self.model.train(was_training)
        # read once here, on the host, with the rollout's other host reads: the tokens/s count and dapo's
        # normaliser (the accumulated batch's active tokens) need no sync in the training step
        for b in batches:
            b["tokens"] = int(b["completion_mask"].sum())
        rewards = torch.cat(rewards_all).double()
        zero_std = int((rewards.view(-1, G).std(dim=1) == 0).sum())
        # dapo's normaliser and the logged statistics span every rank's completions (one all-reduce per rollout)
        from .distributed import all_reduce_sum
        items, total, squares, completions, zero_std, written, sketched = all_reduce_sum(
            [sum(b["tokens"] for b in batches), float(rewards.sum()), float((rewards ** 2).sum()), len(rewards),
             zero_std, sum(lengths), sum(sketches)], self.world, self.device,
            "the all-reduce of a rollout's completion tokens and rewards",
            float(self.config.train.get("dist_timeout_s", 600.0)))
        for b in batches:
            b["num_items_in_batch"] = int(items)
        mean = total / completions
        variance = max(0.0, squares - completions * mean ** 2) / max(1.0, completions - 1)  # unbiased, as torch.std
        self.last = dict(reward=mean, reward_std=variance ** 0.5, zero_std_groups=zero_std / (completions / G),
                         completion_length=written / completions, sketches=sketched / completions,
                         rollout_seconds=time.perf_counter() - t0)
        return batches

    def _roll_modal_mixed(self, prompts: Dict[str, Any], records: list, sampler: Dict[str, Any]
                          ) -> Tuple[Dict[str, Any], torch.Tensor, List[int]]:
        """One micro-batch written by the Modal-mixed model: (its batch, with ``sketches`` the per-row latents to
        count; the rewards; the positions each row wrote)."""
        c = self.config
        gen = self.model.generate(
            prompts["input_ids"], prompts["attention_mask"], pixel_values=prompts.get("pixel_values"),
            image_grid_thw=prompts.get("image_grid_thw"), max_new_tokens=c.max_new_tokens or self.sft.max_new_tokens,
            steps=sampler.get("steps", 20), schedule=sampler.get("schedule", "ddim"),
            cfg_scale=float(sampler.get("cfg_scale", 1.0)), temperature=c.latent_temperature, do_sample=True,
            text_temperature=c.text_temperature, generator=self.generator,
            eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.pad_id)
        rows, row_lengths = gen.sequences.tolist(), gen.lengths.tolist()
        texts = [self.tokenizer.decode(row[:n]) for row, n in zip(rows, row_lengths)]
        rewards = _rewards(c, texts, records)
        batch = rollout_batch(self.model, prompts["input_ids"], prompts["attention_mask"], gen,
                              pad_token_id=self.tokenizer.pad_id, pixel_values=prompts.get("pixel_values"),
                              image_grid_thw=prompts.get("image_grid_thw"))
        return dict(batch, sketches=gen.latents), rewards, row_lengths


def _rewards(config: GRPOConfig, texts: List[str], records: list) -> torch.Tensor:
    """The rewards of one micro-batch's completions, checked: one finite number per completion."""
    out = []
    for name, weight in ((config.reward, 1.0), ("format", config.format_weight)):
        if not weight:
            continue
        values = REWARDS[name](texts, records)
        if not isinstance(values, (list, tuple)) or len(values) != len(texts):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"reward: {name!r} returned {got} rewards for {len(texts)} completions; expected one "
                             f"per completion")
        out.append(weight * torch.tensor([float(v) for v in values]))
    return torch.stack(out).sum(dim=0)


def _reference_log_probs(rollouts: Rollouts, batch: Dict[str, Any]) -> torch.Tensor:
    """The reference policy's log-probs of a rollout: the same model with its LoRA adapters disabled (no second
    copy), or the frozen copy made at the start of a full fine-tune."""
    c = rollouts.config
    if rollouts.reference is not None:
        logp, _ = completion_log_probs(rollouts.reference, batch, temperature=c.text_temperature)
        return logp
    with rollouts.model.vlm.disable_adapter():
        logp, _ = completion_log_probs(rollouts.policy, batch, temperature=c.text_temperature)
    return logp


def train(config: GRPOConfig, device: Optional[Union[str, torch.device]] = None, resume: Optional[str] = None,
          progress: bool = True, until: Optional[int] = None, allow_config_change: bool = False) -> dict:
    """GRPO from ``config.init_from`` on the Trainer: the diffusion head and the vision tower frozen (the sketches
    give reward but no gradient), the VLM's other parameters (or the added LoRA adapters) optimised on
    :func:`grpo_loss` over each rollout's micro-batches. A finished run writes ``<output_dir>/final``, a
    Modal-mixed run folder (``mmlatent eval`` reads it as such; run.json keeps this config and the per-step
    log), and ``<output_dir>/reward.png``; one stopped by ``until`` writes ``checkpoint-<step>``."""
    from dataclasses import asdict, replace

    from . import modal_mixed as mm
    from .ivtlr import seed_everything
    from .loop import TrainConfig, Trainer
    from .methods import prepare_trainable
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if mm.run_method(config.init_from) != mm.METHOD:
        raise ValueError(f"init_from: {config.init_from} is not a Modal-mixed run; the GRPO loop starts from a "
                         f"Modal-mixed SFT checkpoint")
    seed_everything(config.train.get("seed", 0))
    model, tokenizer, sft, image_processor = mm.load_run(config.init_from, device=device)
    if config.policy is None:
        config = replace(config, policy="modal_mixed" if sft.mode == mm.METHOD else "plain")
    elif config.policy == "modal_mixed" and sft.mode != mm.METHOD:
        raise ValueError(f"policy: modal_mixed needs a Modal-mixed SFT run; {config.init_from} is its {sft.mode} "
                         f"variant, whose head never learned to sketch (use policy: plain)")
    _, records, eval_records = mm.build_data(sft)
    model.head.requires_grad_(False)
    model.vlm.requires_grad_(True)
    model.vlm = prepare_trainable(model.vlm, freeze_vision=True, lora=config.lora)
    reference = None
    if config.beta > 0 and not config.lora:
        import copy
        reference = copy.deepcopy(model if config.policy == "modal_mixed" else model.vlm)
        reference.requires_grad_(False).eval()
    rollouts = Rollouts(config, sft, model, tokenizer, image_processor, records, reference)
    from .distributed import current_world
    world = current_world()
    if config.completions_per_step % (config.micro_batch_size * world.size):
        raise ValueError(f"micro_batch_size: {config.completions_per_step} completions a step cannot be shared by "
                         f"{world.size} ranks in micro-batches of {config.micro_batch_size} (each rank rolls out "
                         f"whole groups in whole micro-batches)")
    # the global batch is the one-process run's: each rank accumulates its share of the micro-batches
    options = dict(config.train, grad_accum=config.completions_per_step // (config.micro_batch_size * world.size))
    options.setdefault("max_steps", 100)
    train_config = TrainConfig(**options)
    train_config.progress = progress and train_config.progress
    max_length = config.max_new_tokens or sft.max_new_tokens

    def loss_fn(m, micro):
        logp, mask = completion_log_probs(rollouts.policy, micro, temperature=config.text_temperature)
        out = grpo_loss(logp, micro["advantages"], mask, old_logp=micro["old_logp"] if micro["reuse"] else None,
                        ref_logp=micro.get("ref_logp"), beta=config.beta, epsilon_low=config.epsilon_low,
                        epsilon_high=config.epsilon_high, loss_type=config.loss_type,
                        importance_sampling_level=config.importance_sampling_level,
                        max_completion_length=max_length, num_items_in_batch=micro["num_items_in_batch"])
        rollouts.losses.append(out)
        # the Trainer divides each micro-batch's loss by grad_accum, as TRL does for grpo / bnpo / dr_grpo; dapo's
        # num_items_in_batch already spans the accumulated batch of every rank, whose gradients DDP averages
        return out.loss * train_config.grad_accum * world.size if config.loss_type == "dapo" else out.loss

    def step_log():
        losses, rollouts.losses = rollouts.losses, []
        record = dict(rollouts.last, clip_ratio=float(torch.stack([o.clip_ratio for o in losses]).mean()))
        if losses and losses[0].kl is not None:
            record["kl"] = float(torch.stack([o.kl for o in losses]).mean())
        return record

    def eval_fn(_model):
        metrics = mm.evaluate(model, tokenizer, image_processor, sft, eval_records[:config.eval_samples],
                              ablation=False, world=trainer.world)
        return {k: metrics[k] for k in ("accuracy", "accuracy_stderr", "n")}

    run_config = dict(asdict(config), train=asdict(train_config))
    # every rank's micro-batches hold as many completions: weighing them by samples keeps each rank's loss as it is
    trainer = Trainer(model, loss_fn, rollouts, train_config, describe=config.name, eval_fn=eval_fn,
                      run_config=run_config, count_tokens=lambda b: b["tokens"],
                      step_log=step_log)
    rollouts.with_model = trainer.with_full_model
    if resume:
        trainer.resume(resume, allow_config_change=allow_config_change)
    elif train_config.eval_every:
        trainer.evaluate()  # step 0: the SFT policy, the curve's starting point
    t0 = time.perf_counter()
    history = trainer.fit(until=until)
    seconds = time.perf_counter() - t0
    steps = history["train"]
    result = dict(name=config.name, method=METHOD, mode=sft.mode, train_seconds=seconds, device=str(device),
                  peak_memory_bytes=max((r["peak_memory_bytes"] for r in steps), default=0),
                  median_step_seconds=float(np.median([r["seconds"] for r in steps])) if steps else None,
                  completed=trainer.finished, steps=trainer.step, history=history, grpo=asdict(config),
                  step_log=[{k: r[k] for k in STEP_LOG_KEYS if k in r} for r in steps])
    if train_config.output_dir:
        from .methods import finish_run
        os.makedirs(train_config.output_dir, exist_ok=True)
        # a Modal-mixed folder of the SFT run's config under this run's name (the name changes no weight)
        result["checkpoint"] = finish_run(trainer, train_config.output_dir, lambda trained: mm.save_run(
            os.path.join(train_config.output_dir, "final"), trained, tokenizer, replace(sft, name=config.name),
            result, image_processor=image_processor))
        if trainer.finished and trainer.world.main:
            plot_rewards(history, os.path.join(train_config.output_dir, "reward.png"), config.name)
    return dict(result, model=model, tokenizer=tokenizer, image_processor=image_processor, eval_records=eval_records,
                sft_config=sft)


def evaluate_result(result: dict, config: GRPOConfig, progress: bool = False, world: Optional[World] = None) -> dict:
    """The Modal-mixed evaluation (:func:`mmlatent.train.modal_mixed.evaluate`) of the trained policy on the SFT
    run's held-out records (shared out over a data-parallel ``world``)."""
    from . import modal_mixed as mm
    metrics = mm.evaluate(result["model"], result["tokenizer"], result["image_processor"], result["sft_config"],
                          result["eval_records"], progress=progress, world=world)
    return dict(metrics, name=config.name)


def summary_lines(metrics: dict, train_seconds: Optional[float] = None) -> List[str]:
    from . import modal_mixed as mm
    return mm.summary_lines(metrics, train_seconds)


def plot_rewards(history: dict, path: str, title: str) -> None:
    """The reward curve (each step's rollout mean, and its 20-step moving average) and the periodic held-out
    accuracy with its standard error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in history["train"]]
    mean = np.array([r.get("reward", np.nan) for r in history["train"]])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, mean, lw=0.6, alpha=0.5, label="rollout reward (step mean)")
    window = min(20, len(mean))
    if window:
        smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=2, label=f"rollout reward ({window}-step average)")
    evals = history.get("eval", [])
    if evals:
        ax.errorbar([e["step"] for e in evals], [e["accuracy"] for e in evals],
                    yerr=[e["accuracy_stderr"] for e in evals], fmt="o-", label="held-out accuracy")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward / accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["group_advantages", "grpo_loss", "GRPOLossOutput", "completion_log_probs", "rollout_batch",
           "plain_rollout", "plain_unwritable_token_ids", "shared_prompt_hidden", "SCALES", "LOSS_TYPES",
           "IMPORTANCE_SAMPLING_LEVELS", "POLICIES", "GRPOConfig", "RUN_CONFIG", "Rollouts", "train",
           "evaluate_result", "summary_lines", "plot_rewards", "register_reward", "strict_answer_reward",
           "format_reward", "REWARDS", "METHOD"]
