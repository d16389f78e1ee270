"""IVT-LR at stage 3 (LATENT_STEPS latent steps) against ``ivtlr_reference (public code)``: IVT-LR as its public
code computes it, on a twin of the model loaded with eager attention (as that code loads it). The mmlatent side
wraps a model loaded with SDPA, except in the rows named "eager-loaded model", where it wraps the public code's
own setup. Training rows return the gradients of the trainable parameters; inference rows generate 32 tokens."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

import torch
from torch import nn

from ..case import Call, Case, Inputs, Make

if TYPE_CHECKING:
    from transformers import Qwen2VLForConditionalGeneration

# build(device=, dtype=, attn_implementation=) -> a Qwen2-VL model
Build = Callable[..., "Qwen2VLForConditionalGeneration"]

LATENT_STEPS = 3
NEW_TOKENS = 32
REFERENCE = "ivtlr_reference (public code)"
# IVTLR's two places to take the rollout's image-token masses from (its selection argument)
ROLLOUT_SELECTIONS = ("in_attention", "deferred")
# the LoRA rows adapt every projection of the language model, as IVT-LR's public training does
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _with_adapters(model: nn.Module, lora_rank: Optional[int], checkpointing: bool) -> nn.Module:
    if lora_rank:
        import peft
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=LORA_TARGETS))
    if checkpointing:  # as IVT-LR's public training runs
        from mmlatent.models import enable_activation_checkpointing
        enable_activation_checkpointing(model, use_reentrant=False)
        model.train()
    return model


def _ivtlr_inputs(build: Build, images: Sequence[Sequence[Sequence[int]]], prompt_lengths: Sequence[int],
                  answer_lengths: Sequence[int], k: int, lora_rank: Optional[int], prompt_only: bool,
                  checkpointing: bool, attn_implementation: str) -> Make:
    """batch: a synthetic batch (labels dropped for inference); models: {"mmlatent", "reference"} the two copies
    of the same weights; mmlatent: IVTLR around the first; reference: ivtlr_reference around the second."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        from mmlatent.models import IVTLR, ivtlr_reference
        from mmlatent.models.tiny import LATENT_ID, synthetic_batch
        model = build(device=device, dtype=dtype, attn_implementation=attn_implementation)
        for name, p in model.named_parameters():  # vision tower and embeddings frozen, as IVT-LR trains
            p.requires_grad_(lora_rank is None and "language_model.layers" in name)
        batch = synthetic_batch(model, images=images, prompt_lengths=prompt_lengths, answer_lengths=answer_lengths,
                                num_latents=[LATENT_STEPS] * len(images), with_answer=not prompt_only)
        batch = {key: value.to(device) for key, value in batch.items()}
        if prompt_only:
            del batch["labels"]
        # the public code loads the model with eager attention for everything: its twin gets the same weights
        twin = copy.deepcopy(model)
        twin.set_attn_implementation("eager")
        models = {which: _with_adapters(m, lora_rank, checkpointing)
                  for which, m in (("mmlatent", model), ("reference", twin))}
        wrappers = {f"selection={s}": IVTLR(models["mmlatent"], LATENT_ID, k=k, selection=s)
                    for s in ROLLOUT_SELECTIONS}
        return dict(batch=batch, models=models, mmlatent=IVTLR(models["mmlatent"], LATENT_ID, k=k),
                    reference=ivtlr_reference(models["reference"], LATENT_ID, k=k), **wrappers)
    return make


def _ivtlr_train_step(which: str) -> Call:
    def step(a: Inputs) -> object:
        loss = a[which](**a["batch"]).loss
        return torch.autograd.grad(loss, [p for p in a["models"][which].parameters() if p.requires_grad])
    return step


def _ivtlr_generate(which: str) -> Call:
    def generate(a: Inputs) -> object:
        return a[which].generate(**a["batch"], max_new_tokens=NEW_TOKENS, eos_token_id=-1)  # never stops early
    return generate


def ivtlr_case(kind: str, build: Build, shape: str, images: Sequence[Sequence[Sequence[int]]],
               prompt_lengths: Sequence[int], answer_lengths: Sequence[int], k: int = 32,
               lora_rank: Optional[int] = None, repeats: Optional[int] = None, checkpointing: bool = False,
               attn_implementation: str = "sdpa") -> Case:
    """IVT-LR at stage 3 against ivtlr_reference: a training step (``kind`` "train": forward + backward, gradients
    returned) or inference (``kind`` "inference": 3 latent steps, then 32 new tokens).

    Args:
        build: ``build(device=, dtype=, attn_implementation=)`` -> a Qwen2-VL model.
        shape: the model's label in the table.
        images, prompt_lengths, answer_lengths: per sample, as ``mmlatent.models.tiny.synthetic_batch`` takes them.
        k: image tokens selected per latent step.
        lora_rank: LoRA adapters of this rank on the language model (None: its layers trained in full).
        repeats: timed runs for this case instead of ``--repeats``.
        checkpointing: activation checkpointing, as IVT-LR's public training runs.
        attn_implementation: what the model mmlatent wraps is loaded with ("eager": as IVT-LR's public code loads
            it); the reference always runs a twin loaded with eager.
    """
    if kind not in ("train", "inference"):
        raise ValueError(f"kind: expected 'train' or 'inference', got {kind!r}")
    train = kind == "train"
    make = _ivtlr_inputs(build, images, prompt_lengths, answer_lengths, k, lora_rank, prompt_only=not train,
                         checkpointing=checkpointing, attn_implementation=attn_implementation)
    step = _ivtlr_train_step if train else _ivtlr_generate
    label = f"{shape} B{len(images)} k{k} {LATENT_STEPS} latent steps" + (f" LoRA r{lora_rank}" if lora_rank else "")
    op = "ivtlr inference (+32 tokens)"
    if train:
        op = "ivtlr training step" + (", grad checkpointing" if checkpointing else "")
    if attn_implementation != "sdpa":
        op += f", {attn_implementation}-loaded model"
    baselines = {REFERENCE: step("reference")}
    if not train:  # where the rollout takes its masses from, both ways in the same run: one of them is auto's
        baselines.update({f"IVTLR selection={which}": step(f"selection={which}") for which in ROLLOUT_SELECTIONS})
    return Case(op, label, make, step("mmlatent"), baselines, repeats=repeats)


def _cpu_ivtlr_model(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                     attn_implementation: str = "sdpa") -> "Qwen2VLForConditionalGeneration":
    from mmlatent.models.tiny import tiny_qwen2_vl
    return tiny_qwen2_vl(vocab=8192, hidden=256, layers=4, heads=8, kv_heads=2, intermediate=1024, vision_dim=64,
                         device=device, dtype=dtype, attn_implementation=attn_implementation)


def _gpu_ivtlr_model(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                     attn_implementation: str = "sdpa") -> "Qwen2VLForConditionalGeneration":
    from mmlatent.models.tiny import qwen2_vl_7b_shapes
    return qwen2_vl_7b_shapes(device=device, dtype=dtype, attn_implementation=attn_implementation)


def _tiny_ivtlr_model(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                      attn_implementation: str = "sdpa") -> "Qwen2VLForConditionalGeneration":
    from mmlatent.models.tiny import tiny_qwen2_vl
    return tiny_qwen2_vl(device=device, dtype=dtype, attn_implementation=attn_implementation)


def cases(sizes: str) -> List[Case]:
    if sizes == "gpu":  # Qwen2-VL-7B shapes, 1000 image tokens per sample (560 x 1400 pixels at patch 14)
        args = (_gpu_ivtlr_model, "Qwen2-VL-7B shapes", [[(560, 1400)]] * 2, [60, 90], [30, 20])
        return [ivtlr_case("train", *args, lora_rank=64, repeats=5, checkpointing=True),
                ivtlr_case("train", *args, lora_rank=64, repeats=5), ivtlr_case("inference", *args, repeats=5)]
    if sizes == "tiny":
        args = (_tiny_ivtlr_model, "tiny Qwen2-VL", [[(16, 32)]] * 2, [3, 5], [4, 2])
        return [ivtlr_case("train", *args, k=2, checkpointing=True), ivtlr_case("train", *args, k=2),
                ivtlr_case("inference", *args, k=2)]
    # hidden 256, 4 layers, 8 heads, 2 KV heads, 1000 image tokens per sample (160 x 400 pixels at patch 4)
    args = (_cpu_ivtlr_model, "Qwen2-VL h256 L4 H8 KV2 V8192", [[(160, 400)]] * 2, [60, 90], [30, 20])
    # the eager-loaded row: the model as IVT-LR's public code loads it, wrapped as it is
    return [ivtlr_case("train", *args, checkpointing=True), ivtlr_case("train", *args),
            ivtlr_case("train", *args, attn_implementation="eager"), ivtlr_case("inference", *args)]
