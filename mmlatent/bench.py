"""Micro-benchmarks of the fused ops against their baselines, measured in the same run.

    python -m mmlatent.bench [--sizes default|tiny|gpu] [--out DIR] [--repeats N]

Every row is one op at one shape, timed as the median of ``--repeats`` runs after a warm-up, with its peak memory,
next to its baseline at the same shape. Baselines:

- ``eager+output_attentions``: what IVT-LR's public code does: the full [B, H, M, N] probability matrix (as
  transformers' eager attention returns it with output_attentions), then the score row's image-token mass;
- ``sdpa``: torch's scaled_dot_product_attention, the same attention with no scores;
- ``torch row``: one query row's softmax over all keys by plain torch, then a gather;
- ``torch topk``: masked_fill + torch.topk + sort + gather + scatter (index_put) of the exclusion mask;
- ``logits+F.cross_entropy``: the naive loss as transformers computes it: full logits, upcast to float32, then
  F.cross_entropy (or log_softmax + gather for log-probs), forward + backward;
- ``liger``: Liger-Kernel's fused linear cross-entropy, when liger-kernel is installed;
- ``ivtlr_reference (public code)``: IVT-LR as its public code computes it, on a twin of the model loaded with eager
  attention (as that code loads it). The mmlatent side wraps a model loaded with SDPA, except in the rows named
  "eager-loaded model", where it wraps the public code's own setup.

Loss rows run forward + backward and return the gradients (torch.autograd.grad), so their peak memory includes
the gradients themselves; "frozen head" rows are the LoRA case (no weight gradient).

Peak memory: on CUDA, the allocator's peak above the inputs; on CPU, the process's peak resident memory above its
level before the call, measured in a fresh subprocess per row (with glibc's mmap threshold fixed so freed blocks
return to the system). On a GPU the table adds TFLOP/s or GB/s against the device's measured ceiling.
Writes kernels.json, kernels.md and kernels.png into DIR (default benches/results/<device>/).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from mmlatent.kernels import (attention_with_scores, diffusion_mse, layer_norm_modulate, linear_cross_entropy,
                              linear_log_probs, row_attention_mass, select_topk_tokens)

# Measured ceilings (DESIGN.md): dense bf16 matmul, and HBM bandwidth by device.
BF16_TFLOPS_CEILING = 790.0
HBM_TBPS = {"h100": 3.0, "h200": 4.3}


# --------------------------------------------------------------------------------------------------------- cases

def attention_flops(batch, q_heads, rows, keys, head_dim, causal, with_values=True) -> float:
    """2 FLOPs per multiply-add of QK^T (and PV) over the visible (query, key) pairs; causal is bottom-right."""
    visible = rows * keys - rows * (rows - 1) // 2 if causal else rows * keys
    return 2.0 * batch * q_heads * visible * head_dim * (2 if with_values else 1)


# A baseline named "floor: ..." is a lower bound measured in the same run, not a competitor: the table says how
# close mmlatent comes to it.
FLOOR_PREFIX = "floor: "


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[torch.device, torch.dtype], dict]
    ours: Callable[[dict], object]
    baselines: Dict[str, Callable[[dict], object]]
    flops: float = 0.0
    bytes_moved: float = 0.0
    repeats: Optional[int] = None  # fewer timed runs for whole-model rows


def _attention_inputs(B, Hq, Hkv, M, N, D, Ni):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        t = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        image_index = torch.stack([torch.randperm(N, generator=g)[:Ni].sort().values for _ in range(B)]).to(device)
        return dict(q=t(B, Hq, M, D), k=t(B, Hkv, N, D), v=t(B, Hkv, N, D), image_index=image_index,
                    scores=torch.zeros(B, Ni, device=device), causal=M > 1)
    return make


def _eager_with_scores(a):
    """transformers' eager attention with output_attentions, then the last row's image-token mass."""
    q, k, v = a["q"], a["k"], a["v"]
    G = q.shape[1] // k.shape[1]
    M, N = q.shape[2], k.shape[2]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    w = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if a["causal"]:
        mask = torch.ones(M, N, dtype=torch.bool, device=q.device).tril(N - M)
        w = w.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = probs @ vv
    row = probs[:, :, -1].float().sum(1)
    a["scores"] += torch.gather(row, 1, a["image_index"])
    return out, probs


def _sdpa(a):
    q, k, v = a["q"], a["k"], a["v"]
    M, N = q.shape[2], k.shape[2]
    mask = None
    if a["causal"] and M < N:
        mask = torch.ones(M, N, dtype=torch.bool, device=q.device).tril(N - M)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a["causal"] and M == N,
                                          enable_gqa=True)


def _ours_attention(a):
    with torch.no_grad():
        return attention_with_scores(a["q"], a["k"], a["v"], causal=a["causal"], image_index=a["image_index"],
                                     scores_out=a["scores"])


def attention_case(B, Hq, Hkv, M, N, D, Ni, with_eager=True):
    baselines = {"sdpa": _sdpa}
    if with_eager:
        baselines = {"eager+output_attentions": _eager_with_scores, **baselines}
    return Case("attention_with_scores", f"B{B} Hq{Hq} Hkv{Hkv} M{M} N{N} D{D} Ni{Ni}",
                _attention_inputs(B, Hq, Hkv, M, N, D, Ni), _ours_attention, baselines,
                flops=attention_flops(B, Hq, M, N, D, causal=M > 1))


def _torch_row(a):
    q, k = a["q"][:, :, 0], a["k"]
    G = q.shape[1] // k.shape[1]
    s = torch.einsum("bhd,bhnd->bhn", q.float(), k.repeat_interleave(G, 1).float()) * q.shape[-1] ** -0.5
    p = torch.softmax(s, dim=-1).sum(1)
    a["scores"] += torch.gather(p, 1, a["image_index"])


def row_mass_case(B, Hq, Hkv, N, D, Ni):
    make = _attention_inputs(B, Hq, Hkv, 1, N, D, Ni)
    element = 2  # bf16/fp16 keys on the GPU; K dominates the traffic
    return Case("row_attention_mass", f"B{B} Hq{Hq} Hkv{Hkv} N{N} D{D} Ni{Ni}", make,
                lambda a: row_attention_mass(a["q"][:, :, 0], a["k"], a["image_index"], a["scores"]),
                {"torch row": _torch_row}, bytes_moved=B * Hkv * N * D * element)


def _select_inputs(B, Ni, k, Dm):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        valid = torch.ones(B, Ni, dtype=torch.bool)
        valid[:, : Ni // 16] = False
        return dict(scores=torch.rand(B, Ni, generator=g).to(device), k=k, valid=valid.to(device),
                    exclude=(torch.rand(B, Ni, generator=g) < 0.1).to(device),
                    embeds=torch.randn(B, Ni, Dm, generator=g).to(device=device, dtype=dtype))
    return make


def _torch_topk(a):
    eligible = a["valid"] & ~a["exclude"]
    masked = a["scores"].masked_fill(~eligible, float("-inf"))
    idx = torch.topk(masked, a["k"], dim=1).indices.sort(dim=1).values
    gathered = torch.gather(a["embeds"], 1, idx[:, :, None].expand(-1, -1, a["embeds"].shape[2]))
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
    a["exclude"].index_put_((rows, idx), torch.ones((), dtype=torch.bool, device=idx.device))
    return idx, gathered


def _ours_select(a):
    return select_topk_tokens(a["scores"], a["k"], exclude=a["exclude"], valid=a["valid"], embeds=a["embeds"])


def select_case(B, Ni, k, Dm):
    return Case("select_topk_tokens", f"B{B} Ni{Ni} k{k} Dm{Dm}", _select_inputs(B, Ni, k, Dm), _ours_select,
                {"torch topk": _torch_topk})


def _loss_inputs(T, H, V, trainable_head):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(T, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
        weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device=device, dtype=dtype)
        labels = torch.randint(0, V, (T,), generator=g).to(device)
        return dict(hidden=hidden, weight=weight.requires_grad_(trainable_head), labels=labels,
                    upstream=torch.randn(T, generator=g).to(device))
    return make


def _grads(a, loss):
    params = [a["hidden"]] + ([a["weight"]] if a["weight"].requires_grad else [])
    return torch.autograd.grad(loss, params)


def _naive_cross_entropy(a):
    logits = (a["hidden"] @ a["weight"].T).float()  # transformers' ForCausalLMLoss upcasts the logits
    return _grads(a, F.cross_entropy(logits, a["labels"]))


def _liger_cross_entropy(a):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return _grads(a, liger_fused_linear_cross_entropy(a["hidden"], a["weight"], a["labels"]))


def _liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # not installed (it needs a CUDA torch), or broken
        return False
    return torch.cuda.is_available()


def cross_entropy_case(T, H, V, trainable_head=True):
    baselines = {"logits+F.cross_entropy": _naive_cross_entropy}
    if _liger_available():
        baselines["liger"] = _liger_cross_entropy
    head = "trainable head" if trainable_head else "frozen head"
    gemms = 3 if trainable_head else 2  # logits, grad_hidden (, grad_weight)
    return Case("linear_cross_entropy", f"T{T} H{H} V{V} {head}", _loss_inputs(T, H, V, trainable_head),
                lambda a: _grads(a, linear_cross_entropy(a["hidden"], a["weight"], a["labels"])), baselines,
                flops=2.0 * gemms * T * H * V)


def _naive_log_probs(a):
    logp = torch.log_softmax((a["hidden"] @ a["weight"].T).float(), -1).gather(1, a["labels"][:, None]).squeeze(1)
    return _grads(a, (logp * a["upstream"]).sum())


def log_probs_case(T, H, V, trainable_head=False):
    head = "trainable head" if trainable_head else "frozen head"
    return Case("linear_log_probs", f"T{T} H{H} V{V} {head}", _loss_inputs(T, H, V, trainable_head),
                lambda a: _grads(a, (linear_log_probs(a["hidden"], a["weight"], a["labels"]) * a["upstream"]).sum()),
                {"logits+log_softmax": _naive_log_probs}, flops=2.0 * (3 if trainable_head else 2) * T * H * V)


# ---------------------------------------------------------------------------------------------------------- IVT-LR

LATENT_STEPS = 3


def _ivtlr_inputs(build, images, prompt_lengths, answer_lengths, k, lora_rank, prompt_only, checkpointing,
                  attn_implementation):
    def make(device, dtype):
        import copy

        from mmlatent.models import IVTLR, enable_activation_checkpointing, ivtlr_reference
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
        models = {}
        for which, m in (("mmlatent", model), ("reference", twin)):
            if lora_rank:
                import peft
                torch.manual_seed(0)
                m = peft.get_peft_model(m, peft.LoraConfig(
                    r=lora_rank, lora_alpha=16, lora_dropout=0.0,
                    target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
            if checkpointing:  # as IVT-LR's public training runs
                enable_activation_checkpointing(m, use_reentrant=False)
                m.train()
            models[which] = m
        return dict(batch=batch, models=models, mmlatent=IVTLR(models["mmlatent"], LATENT_ID, k=k),
                    reference=ivtlr_reference(models["reference"], LATENT_ID, k=k))
    return make


def _ivtlr_train_step(which):
    def step(a):
        loss = a[which](**a["batch"]).loss
        return torch.autograd.grad(loss, [p for p in a["models"][which].parameters() if p.requires_grad])
    return step


def _ivtlr_generate(which):
    def generate(a):
        return a[which].generate(**a["batch"], max_new_tokens=32, eos_token_id=-1)  # never stops early
    return generate


def ivtlr_case(kind, build, shape, images, prompt_lengths, answer_lengths, k=32, lora_rank=None, repeats=None,
               checkpointing=False, attn_implementation="sdpa"):
    """IVT-LR at stage 3 against ivtlr_reference: a training step (forward + backward, gradients returned) or
    inference (3 latent steps, then 32 new tokens). ``attn_implementation``: what the model mmlatent wraps is
    loaded with ("eager": as IVT-LR's public code loads it); the reference always runs a twin loaded with eager."""
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
    return Case(op, label, make, step("mmlatent"), {"ivtlr_reference (public code)": step("reference")},
                repeats=repeats)


def _cpu_ivtlr_model(device=None, dtype=None, attn_implementation="sdpa"):
    from mmlatent.models.tiny import tiny_qwen2_vl
    return tiny_qwen2_vl(vocab=8192, hidden=256, layers=4, heads=8, kv_heads=2, intermediate=1024, vision_dim=64,
                         device=device, dtype=dtype, attn_implementation=attn_implementation)


def _gpu_ivtlr_model(device=None, dtype=None, attn_implementation="sdpa"):
    from mmlatent.models.tiny import qwen2_vl_7b_shapes
    return qwen2_vl_7b_shapes(device=device, dtype=dtype, attn_implementation=attn_implementation)


def ivtlr_cases(sizes: str) -> List[Case]:
    if sizes == "gpu":  # Qwen2-VL-7B shapes, 1000 image tokens per sample (560 x 1400 pixels at patch 14)
        args = (_gpu_ivtlr_model, "Qwen2-VL-7B shapes", [[(560, 1400)]] * 2, [60, 90], [30, 20])
        return [ivtlr_case("train", *args, lora_rank=64, repeats=5, checkpointing=True),
                ivtlr_case("train", *args, lora_rank=64, repeats=5), ivtlr_case("inference", *args, repeats=5)]
    if sizes == "tiny":
        from mmlatent.models.tiny import tiny_qwen2_vl
        args = (tiny_qwen2_vl, "tiny Qwen2-VL", [[(16, 32)]] * 2, [3, 5], [4, 2])
        return [ivtlr_case("train", *args, k=2, checkpointing=True), ivtlr_case("train", *args, k=2),
                ivtlr_case("inference", *args, k=2)]
    # hidden 256, 4 layers, 8 heads, 2 KV heads, 1000 image tokens per sample (160 x 400 pixels at patch 4)
    args = (_cpu_ivtlr_model, "Qwen2-VL h256 L4 H8 KV2 V8192", [[(160, 400)]] * 2, [60, 90], [30, 20])
    # the eager-loaded row: the model as IVT-LR's public code loads it, wrapped as it is
    return [ivtlr_case("train", *args, checkpointing=True), ivtlr_case("train", *args),
            ivtlr_case("train", *args, attn_implementation="eager"), ivtlr_case("inference", *args)]


# ------------------------------------------------------------------------------------------------ diffusion head

def _diffusion_inputs(segments, rows, C, width, depth, steps):
    def make(device, dtype):
        from mmlatent.models import LatentDiffusionHead
        torch.manual_seed(0)
        head = LatentDiffusionHead(C, C, width=width, depth=depth).to(device=device, dtype=dtype).eval()
        g = torch.Generator(device="cpu").manual_seed(0)
        cond = torch.randn(segments * rows, C, generator=g).to(device=device, dtype=dtype)
        x_t = torch.randn(segments * rows, C, generator=g).to(device=device, dtype=dtype)
        t = torch.full((segments * rows,), 500, device=device)
        return dict(head=head, cond=cond, segments=segments, steps=steps, x_t=x_t, t=t)
    return make


def _head_sample(a):
    return a["head"].sample(a["cond"], steps=a["steps"], generator=None)


def _head_sample_eager(a):
    return a["head"].sample(a["cond"], steps=a["steps"], generator=None, cuda_graph=False)


def _head_forward_floor(a):
    """The floor of any sampler: the head's own forward at the whole batch, once per step, nothing else."""
    with torch.no_grad():
        for _ in range(a["steps"]):
            out = a["head"](a["x_t"], a["t"], a["cond"])
    return out


def _diffusers_loop_per_segment(a):
    """What a user writes: a DDIM scheduler's step() loop over the head, one segment at a time."""
    from diffusers import DDIMScheduler
    head, steps = a["head"], a["steps"]
    scheduler = DDIMScheduler(num_train_timesteps=head.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")
    outs = []
    with torch.no_grad():
        for cond in a["cond"].chunk(a["segments"]):
            scheduler.set_timesteps(steps)
            x = torch.randn(cond.shape[0], head.latent_dim, device=cond.device, dtype=cond.dtype)
            for t in scheduler.timesteps:
                x = scheduler.step(head(x, t.expand(cond.shape[0]).to(cond.device), cond), t, x).prev_sample
            outs.append(x)
    return torch.cat(outs)


def _modulate_inputs(N, W):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        t = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        return dict(x=t(N, W).requires_grad_(), mods=t(N, 3 * W).requires_grad_(), dy=t(N, W))
    return make


def _modulate_fwd_bwd(fn):
    def call(a):
        shift, scale, _gate = a["mods"].chunk(3, dim=1)
        return torch.autograd.grad(fn(a["x"], shift, scale), (a["x"], a["mods"]), a["dy"])
    return call


def modulate_case(N, W):
    """adaLN forward + backward: the fused op against the torch expression (what the head ran before)."""
    from mmlatent.kernels import reference
    unfused = _modulate_fwd_bwd(lambda x, shift, scale: reference.layer_norm_modulate(x, shift, scale, 1e-6))
    element = 2  # bf16 activations on the GPU
    # forward reads x, shift, scale and writes y; backward reads dy, x, scale and writes dx, dscale (dshift is dy)
    return Case("layer_norm_modulate", f"N{N} W{W} fwd+bwd", _modulate_inputs(N, W),
                _modulate_fwd_bwd(layer_norm_modulate), {"torch LayerNorm * (1 + scale) + shift": unfused},
                bytes_moved=9.0 * N * W * element)


def _mse_inputs(R, C):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        t = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        return dict(pred=t(R, C).requires_grad_(), x0=t(R, C), noise=t(R, C),
                    alphas=torch.rand(R, generator=g).to(device))
    return make


def _mse_fwd_bwd(fused):
    def call(a):
        if fused:
            loss = diffusion_mse(a["pred"], a["x0"], a["noise"], a["alphas"], "v_prediction")
        else:
            from mmlatent.kernels import reference
            from mmlatent.kernels.diffusion_loss import target_coefficients
            goal_x0, goal_noise = target_coefficients("v_prediction", a["alphas"])
            coef = torch.full_like(a["alphas"], 1.0 / a["alphas"].shape[0])
            loss = reference.diffusion_mse(a["pred"], a["x0"], a["noise"], goal_x0, goal_noise, coef)
        return torch.autograd.grad(loss, a["pred"])
    return call


def diffusion_mse_case(R, C):
    """The head's loss on its prediction, forward + backward, against the torch expression."""
    element = 2  # bf16 on the GPU
    # forward reads pred, x0, noise and writes the gradient; backward reads it and writes pred's gradient
    return Case("diffusion_mse", f"R{R} C{C} v-target fwd+bwd", _mse_inputs(R, C), _mse_fwd_bwd(True),
                {"torch target + MSE": _mse_fwd_bwd(False)}, bytes_moved=6.0 * R * C * element)


def diffusion_case(segments, rows, C, width, depth=3, steps=50, with_eager=False):
    """``with_eager`` adds head.sample without its CUDA graph (on a GPU: what the graph saves)."""
    baselines = {"diffusers DDIM loop per segment": _diffusers_loop_per_segment}
    if with_eager:
        baselines["mmlatent without CUDA graph"] = _head_sample_eager
    baselines[f"{FLOOR_PREFIX}{steps} x head forward"] = _head_forward_floor
    return Case("diffusion head sample", f"{segments} segments x {rows} rows C{C} width{width} depth{depth} "
                f"{steps} DDIM steps", _diffusion_inputs(segments, rows, C, width, depth, steps), _head_sample,
                baselines)


def cases_for(sizes: str) -> List[Case]:
    if sizes == "tiny":  # the smoke test: every op and baseline, seconds on a CPU
        return [attention_case(1, 4, 2, 64, 64, 32, 16), attention_case(1, 4, 2, 1, 128, 32, 16),
                row_mass_case(1, 4, 2, 128, 32, 16), select_case(2, 64, 8, 16),
                cross_entropy_case(64, 32, 500), log_probs_case(64, 32, 500), log_probs_case(64, 32, 500, True),
                *ivtlr_cases("tiny"), modulate_case(8, 64), diffusion_mse_case(8, 64),
                diffusion_case(2, 4, 16, 16, steps=5)]
    if sizes == "gpu":
        out = []
        for M in (1, 33, 512):
            for N in (512, 2048, 8192, 16384):
                out.append(attention_case(1, 28, 4, M, N, 128, min(N, 1024), with_eager=N <= 8192))
        out += [row_mass_case(1, 28, 4, N, 128, min(N, 1024)) for N in (2048, 8192, 16384, 65536)]
        out += [select_case(2, ni, k, 3584) for ni in (256, 1024, 4096) for k in (32, 64)]
        for T in (1024, 8192, 32768):  # Qwen2-7B's head: H 3584, V 152064
            out += [cross_entropy_case(T, 3584, 152064, True), cross_entropy_case(T, 3584, 152064, False)]
        out += [log_probs_case(T, 3584, 152064, trainable) for T in (1024, 8192) for trainable in (False, True)]
        out += [modulate_case(N, 1024) for N in (256, 4096, 65536)]  # the head's width; 65536 rows: HBM-bound
        out += [diffusion_mse_case(R, 3584) for R in (1024, 16384)]  # 32-row sketches x batch x batch_mul
        out += [diffusion_case(8, 32, 3584, 1024, with_eager=True)]
        out += [diffusion_case(1, R, 3584, 1024, with_eager=True) for R in (32, 256, 2048)]
        return out + ivtlr_cases("gpu")
    # default (CPU, what `make demo` runs): the CPU target first
    return [attention_case(1, 16, 4, 4096, 4096, 64, 1024), attention_case(1, 16, 4, 1, 4096, 64, 1024),
            row_mass_case(2, 16, 4, 4096, 64, 1024),
            select_case(2, 1024, 32, 1024), select_case(2, 4096, 64, 1024),
            cross_entropy_case(2048, 256, 32000, True), cross_entropy_case(2048, 256, 32000, False),
            log_probs_case(2048, 256, 32000), log_probs_case(2048, 256, 32000, trainable_head=True),
            *ivtlr_cases("default"), diffusion_case(8, 32, 512, 256)]


# --------------------------------------------------------------------------------------------------- measurement

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, args, device, repeats: int) -> List[float]:
    fn(args)  # warm-up: compilation, caches
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_memory_here(fn, args, device) -> int:
    """Bytes of peak memory the call adds above what is allocated before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(args)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn(args)
    return max(0, _status_kib("VmHWM") - base) * 1024


def peak_memory_cpu_subprocess(sizes: str, index: int, impl: str, dtype: str) -> Optional[int]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "mmlatent.bench", "--sizes", sizes, "--memory-probe", f"{index}:{impl}",
           "--dtype", dtype]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        print(run.stderr[-2000:], file=sys.stderr)
        return None
    return int(run.stdout.strip().splitlines()[-1])


def _impl(case: Case, name: str):
    return case.ours if name == "mmlatent" else case.baselines[name]


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key in ("h200", "h100", "a100", "l40s"):
            if key in name:
                return f"nvidia-{key}"
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"cpu-{os.cpu_count()}core"


def _measure(case: Case, index: int, name: str, sizes: str, device, dtype, dtype_name: str, repeats: int,
             memory: bool) -> dict:
    repeats = case.repeats or repeats
    args = case.make(device, dtype)
    times = time_call(_impl(case, name), args, device, repeats)
    del args
    if not memory:
        peak = None
    elif device.type == "cuda":
        peak = peak_memory_here(_impl(case, name), case.make(device, dtype), device)
    else:
        peak = peak_memory_cpu_subprocess(sizes, index, name, dtype_name)
    median = statistics.median(times)
    row = dict(median_s=median, min_s=min(times), max_s=max(times), repeats=repeats, peak_bytes=peak)
    if name == "mmlatent" and device.type == "cuda":
        if case.flops:
            row["tflops"] = case.flops / median / 1e12
            row["fraction_of_bf16_ceiling"] = row["tflops"] / BF16_TFLOPS_CEILING
        if case.bytes_moved:
            row["gbps"] = case.bytes_moved / median / 1e9
            hbm = HBM_TBPS.get(device_label(device).replace("nvidia-", ""))
            if hbm:
                row["fraction_of_hbm"] = row["gbps"] / (hbm * 1e3)
    return row


def run(sizes: str, repeats: int, dtype_name: str, memory: bool = True, command: str = "",
        ops: Optional[str] = None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype_name)
    rows = []
    cases = cases_for(sizes)
    if ops and not any(case.op.startswith(ops) for case in cases):
        raise ValueError(f"--ops: no benchmark row's op starts with {ops!r}; the ops are "
                         f"{', '.join(sorted({case.op for case in cases}))}")
    for index, case in enumerate(cases):
        if ops and not case.op.startswith(ops):
            continue
        impls = ["mmlatent", *case.baselines]
        for name in impls:
            row = dict(op=case.op, shape=case.shape, impl=name, device=device_label(device), dtype=dtype_name)
            try:
                row.update(_measure(case, index, name, sizes, device, dtype, dtype_name, repeats, memory))
            except torch.OutOfMemoryError:  # the naive baselines of the largest shapes do not fit: say so
                row.update(median_s=None, peak_bytes=None, error="out of memory")
            if row["median_s"] is None and device.type == "cuda":  # after the except block freed its traceback
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(row)
            timing = "out of memory" if row["median_s"] is None else f"{row['median_s'] * 1e3:10.3f} ms"
            peak = row["peak_bytes"]
            print(f"  {case.op:22s} {case.shape:38s} {name:24s} {timing} "
                  f"{'' if peak is None else f'{peak / 2**20:10.1f} MiB'}", flush=True)
        ours = rows[-len(impls)]
        for row in rows[-len(impls) + 1:]:
            if row["median_s"] is not None and ours["median_s"] is not None:
                row["speedup_of_mmlatent"] = row["median_s"] / ours["median_s"]
            if row["peak_bytes"] and ours["peak_bytes"] is not None:
                row["memory_ratio_of_mmlatent"] = ours["peak_bytes"] / row["peak_bytes"]
            if row["impl"].startswith(FLOOR_PREFIX) and "speedup_of_mmlatent" in row:
                row["mmlatent_over_floor"] = 1.0 / row["speedup_of_mmlatent"]
    return dict(device=device_label(device), torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), cpus=os.cpu_count(), sizes=sizes, dtype=dtype_name, repeats=repeats,
                command=command, rows=rows)


def markdown(result: dict) -> str:
    lines = [f"Device `{result['device']}`, torch {result['torch']}, dtype {result['dtype']}, "
             f"median of {result['repeats']} runs; command: `{result['command']}`", "",
             "| op | shape | impl | median ms | peak MiB | mmlatent speed-up | mmlatent memory ratio | HW |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        speed = f"{r['speedup_of_mmlatent']:.2f}x" if "speedup_of_mmlatent" in r else ""
        mem = f"{r['memory_ratio_of_mmlatent']:.3f}" if "memory_ratio_of_mmlatent" in r else ""
        hw = ""
        if "tflops" in r:
            hw = f"{r['tflops']:.0f} TFLOP/s ({100 * r['fraction_of_bf16_ceiling']:.0f}%)"
        if "gbps" in r:
            hw = f"{r['gbps']:.0f} GB/s" + (f" ({100 * r['fraction_of_hbm']:.0f}% HBM)" if "fraction_of_hbm" in r else "")
        if "mmlatent_over_floor" in r:
            hw = f"mmlatent = {r['mmlatent_over_floor']:.2f}x this floor"
        median = "out of memory" if r["median_s"] is None else f"{r['median_s'] * 1e3:.3f}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {median} | {peak} | {speed} | "
                     f"{mem} | {hw} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "speedup_of_mmlatent" in r]
    labels = [f"{r['op']}\n{r['shape']}\nvs {r['impl']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.55 * len(rows) + 2), sharey=True)
    axes[0].barh(labels, [r["speedup_of_mmlatent"] for r in rows], color="tab:blue")
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("speed-up of mmlatent (baseline time / ours), log scale")
    axes[1].barh(labels, [r.get("memory_ratio_of_mmlatent", float("nan")) for r in rows], color="tab:green")
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("peak memory of mmlatent / baseline, log scale")
    for ax in axes:
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"mmlatent kernels on {result['device']} ({result['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DTYPES = ("float32", "bfloat16", "float16")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options, shared by ``python -m mmlatent.bench`` and ``mmlatent bench``."""
    parser.add_argument("--sizes", choices=["default", "tiny", "gpu"], default=None,
                        help="shape set: default (CPU), gpu (real sizes), tiny (smoke test)")
    parser.add_argument("--repeats", type=_positive_int, default=None, help="timed runs per row (median reported)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="input dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--out", default=None, help="output folder (default benches/results/<device>/)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--ops", help="only rows whose op starts with this (results go to kernels-<ops>.*)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        description="mmlatent micro-benchmarks (ratios against same-run baselines)"))
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    sizes = args.sizes or ("gpu" if gpu else "default")
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.memory_probe:  # child process of peak_memory_cpu_subprocess
        index, impl = args.memory_probe.split(":", 1)
        case = cases_for(sizes)[int(index)]
        device = torch.device("cpu")
        _impl(case, impl)(case.make(device, getattr(torch, dtype)))  # warm-up: lazy initialisation is not the op's
        inputs = case.make(device, getattr(torch, dtype))
        print(peak_memory_here(_impl(case, impl), inputs, device))
        return 0
    repeats = args.repeats or (20 if gpu else 5)
    print(f"mmlatent.bench: sizes={sizes} dtype={dtype} repeats={repeats}", flush=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m mmlatent.bench", *argv])
    result = run(sizes, repeats, dtype, memory=not args.no_memory, command=command, ops=args.ops)
    out = args.out or os.path.join("benches", "results", result["device"])
    os.makedirs(out, exist_ok=True)
    stem = "kernels" if sizes != "tiny" else "kernels-tiny"
    if args.ops:
        stem += "-" + re.sub(r"[^a-z0-9]+", "-", args.ops.lower()).strip("-")
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(table)
    plot(result, os.path.join(out, f"{stem}.png"))
    print()
    print(table)
    print(f"wrote {out}/{stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
