"""GRPO's loss + backward on a Qwen2.5-VL policy: :func:`mmlatent.train.grpo.completion_log_probs` (the backbone's
hidden states, then ``linear_log_probs`` over the completion tokens only) and :func:`grpo_loss`, against the step
TRL's GRPOTrainer takes: the model's forward with ``logits_to_keep`` (the [N, L + 1, V] logits of the completion
positions), the logits divided by the temperature, TRL's ``selective_log_softmax`` (its own function when TRL is
installed, else the same gather of a float32 log-softmax), then the same loss. Each group's G rows share one
prompt, as a rollout's do: mmlatent's side runs it once per group (``group_size``), TRL's runs every row in full. Both sides backpropagate into the
policy; the rollout (generation) is not part of the row. Sizes: "tiny" (the smoke test), "default" (CPU,
float32: hidden 256, 4 layers, vocabulary 32000; 2 prompts x G = 8 completions of 256 tokens after a ~300-token
prompt with one image), "gpu" (Qwen2.5-VL-7B shapes, bf16, LoRA r = 64, G = 8, 1024 completion tokens; built on a
CUDA device only); the CPU set has the step with and without activation checkpointing (TRL's GRPO default)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..case import Case, Inputs, Make
from .inputs import cpu_generator
from .modal_mixed import Build, _cpu_model, _gpu_model, _tiny_model, _to, _trainable, prompt_batch

NAIVE = "TRL-style step (logits + selective_log_softmax)"
TEMPERATURE = 0.9


def _inputs(build: Build, image_hw: Sequence[int], prompt_length: int, prompts: int, group: int, length: int,
            lora_rank: Optional[int], checkpointing: bool) -> Make:
    """model: the policy (trainable as ``_trainable`` sets), batch: prompt + completion ids, masks and the prompt
    images, advantages [N], items: the active tokens, params: the trainable parameters."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        vlm = _trainable(build(device=device, dtype=dtype), lora_rank).train()
        if checkpointing:  # both sides run the same model, so both recompute its layers in the backward
            from mmlatent.models.compat import enable_activation_checkpointing
            enable_activation_checkpointing(vlm, use_reentrant=False)
        vocab = vlm.get_output_embeddings().weight.shape[0]
        n = prompts * group
        # each group's G rows share one prompt, as a rollout's do; TRL's step runs every row in full
        one = prompt_batch(vlm, image_hw=image_hw, prompt_lengths=[prompt_length] * prompts)
        pixels = one["pixel_values"].view(prompts, -1, *one["pixel_values"].shape[1:])
        prompt = dict(input_ids=one["input_ids"].repeat_interleave(group, 0),
                      attention_mask=one["attention_mask"].repeat_interleave(group, 0),
                      pixel_values=pixels.repeat_interleave(group, 0).flatten(0, 1),
                      image_grid_thw=one["image_grid_thw"].repeat_interleave(group, 0))
        g = cpu_generator(2)
        completion = torch.randint(6, vocab - 4, (n, length), generator=g)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
        keep = torch.arange(length)[None] < lengths[:, None]
        completion = torch.where(keep, completion, torch.zeros_like(completion))
        batch = dict(input_ids=torch.cat([prompt["input_ids"], completion], 1),
                     attention_mask=torch.cat([prompt["attention_mask"], keep.long()], 1), completion_mask=keep,
                     pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])
        batch = dict(_to(batch, device, dtype), group_size=group)
        advantages = torch.randn(n, generator=g).to(device)
        return dict(model=vlm, batch=batch, advantages=advantages, items=int(keep.sum()),
                    params=[p for p in vlm.parameters() if p.requires_grad])
    return make


def _loss(logp: torch.Tensor, a: Inputs) -> torch.Tensor:
    from mmlatent.train.grpo import grpo_loss
    return grpo_loss(logp, a["advantages"], a["batch"]["completion_mask"], loss_type="dapo",
                     num_items_in_batch=a["items"]).loss


def _ours(a: Inputs) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    from mmlatent.train.grpo import completion_log_probs
    model = a["model"]
    model.zero_grad(set_to_none=True)
    logp, _ = completion_log_probs(model, a["batch"], temperature=TEMPERATURE)
    loss = _loss(logp, a)
    loss.backward()
    return loss.detach(), [p.grad for p in a["params"]]


def _selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:  # what it computes for float32 logits: the gathered logit minus each row's logsumexp
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, index[..., None])[..., 0]
    return selective_log_softmax(logits, index)


def _naive(a: Inputs) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """TRL's _get_per_token_logps_and_entropies for one batch: logits of the completion positions (plus the one
    before them), the last dropped, divided by the temperature, then selective_log_softmax; the placeholder ids
    a plain policy never writes are set to -inf first, in place, so both sides score one distribution."""
    from mmlatent.train.grpo import plain_unwritable_token_ids
    model, batch = a["model"], a["batch"]
    model.zero_grad(set_to_none=True)
    length = batch["completion_mask"].shape[1]
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                   image_grid_thw=batch["image_grid_thw"], logits_to_keep=length + 1,
                   mm_token_type_ids=(ids == model.config.image_token_id).int()).logits
    logits = logits[:, :-1, :] / TEMPERATURE
    # the same distribution as the policy's: its image and video placeholders never written (in place: no copy)
    logits[..., list(plain_unwritable_token_ids(model))] = float("-inf")
    logp = _selective_log_softmax(logits, ids[:, -length:])
    loss = _loss(logp, a)
    loss.backward()
    return loss.detach(), [p.grad for p in a["params"]]


def loss_case(build: Build, shape: str, image_hw: Sequence[int], prompt_length: int, prompts: int, group: int,
              length: int, lora_rank: Optional[int] = None, checkpointing: bool = False,
              repeats: Optional[int] = None) -> Case:
    """``checkpointing``: the policy's layers under activation checkpointing, as TRL's GRPOConfig sets by default
    (``gradient_checkpointing=True``)."""
    label = (f"{shape} {prompts} prompts x G{group}, {length} completion tokens after ~{prompt_length} prompt "
             f"tokens + 1 image" + (f", LoRA r{lora_rank}" if lora_rank else "")
             + (", grad checkpointing" if checkpointing else ""))
    return Case("grpo loss + backward", label,
                _inputs(build, image_hw, prompt_length, prompts, group, length, lora_rank, checkpointing), _ours,
                {NAIVE: _naive}, repeats=repeats)


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":
        return [loss_case(_tiny_model, "tiny Qwen2.5-VL h32 L2 V500", (32, 32), 8, 2, 2, 12, checkpointing=True)]
    if sizes == "gpu":
        return [loss_case(_gpu_model, "Qwen2.5-VL-7B shapes bf16", (448, 448), 44, 1, 8, 1024, lora_rank=64,
                          checkpointing=True, repeats=5)]
    # 64 image tokens (64 x 64 pixels at patch 4, merge 2) + ~240 text tokens: a ~300-token prompt
    shape = "Qwen2.5-VL h256 L4 H4 KV2 V32000"
    return [loss_case(_cpu_model, shape, (64, 64), 240, 2, 8, 256, repeats=3),
            loss_case(_cpu_model, shape, (64, 64), 240, 2, 8, 256, checkpointing=True, repeats=3)]


__all__ = ["loss_case", "cases", "NAIVE"]
