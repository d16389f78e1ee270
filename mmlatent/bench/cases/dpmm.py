"""DPMM-CoT (:class:`mmlatent.models.DPMMCoT`): the training step and generation's feature part, each against what
a user writes from the transformers and diffusers modules without mmlatent, and the fusion gate on its own.

- "dpmm training step": ``DPMMCoT.forward`` on cached VAE latents (the fused gate, the decoder's loss without
  logits, T5's feed-forward activations and norms as lean fused ops: ``apply_fused_layers``, as a run applies them)
  + backward, against "naive step": an unpatched copy of the same model, the frozen VAE's encoder every step, the
  UNet with forward hooks, MM-CoT's fusion with its concatenated gate, ``t5(encoder_outputs=..., labels=...).loss``
  over the full [B, L, V] logits, the two losses summed, backward. Same weights, noise and timesteps: the same loss
  and gradients.
- "dpmm generation features": the features of 4 feature timesteps, batch 1, from one UNet call over every
  (image, timestep) pair (``DPMMCoT.timestep_features``) against one UNet call per timestep, averaged.
- "gated_mix": the fusion gate's forward and backward against the concatenation, ``nn.Linear``, sigmoid and mix.
- "geglu" / "rms_norm": the T5 layers ``apply_fused_layers`` replaces, forward and backward, against transformers'
  own modules (``gelu_new`` times the up projection; ``T5LayerNorm``).

Sizes: "tiny" (the smoke test), "default" (CPU, float32; the training step at "tiny-long": T5 d_model 256, 4 + 4
layers, vocabulary 32000, 512 input and 512 target tokens, batch 2, 64 x 64 images through a Stable Diffusion
1.x-shaped VAE (widths 128-256-512-512, 2 layers a block) and a UNet of widths (64, 128)), "gpu" (the paper's Base
shapes: T5-base, d_model 768, 12 + 12 layers, vocabulary 32128; SD-1.x's VAE and UNet at 256 x 256, bf16; built on
a CUDA device only).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Sequence, Tuple

import torch
from torch.nn import functional as F

from ..case import Case, Inputs, Make
from .inputs import cpu_generator

NAIVE_STEP = "naive step (VAE every step, concat gate, full logits)"
PER_TIMESTEP = "one UNet call per timestep"
UNFUSED_GATE = "concat + Linear + sigmoid + mix"
TRANSFORMERS_GEGLU = "transformers' gelu_new(gate) * up"
TRANSFORMERS_NORM = "transformers' T5LayerNorm"


def _parts(t5: Dict, vae: Dict, unet: Dict, device: torch.device, dtype: torch.dtype):
    from mmlatent.models import DPMMCoT, tiny
    if device.type != "cuda" and dtype != torch.float32:
        raise RuntimeError("the bf16 DPMM-CoT rows need a CUDA device")
    t5_model = tiny.tiny_t5(device=device, dtype=dtype, **t5).train()
    vae_model = tiny.tiny_vae(device=device, **vae).requires_grad_(False)
    unet_model = tiny.tiny_unet(cross_attention_dim=t5_model.config.d_model, device=device, **unet).train()
    model = DPMMCoT(t5_model, vae_model, unet_model)
    return model if dtype == torch.float32 else model.to(dtype)


def _step_inputs(t5: Dict, vae: Dict, unet: Dict, image: int, batch: int, source: int, target: int,
                 gpu: bool = False) -> Make:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        if gpu and device.type != "cuda":
            raise RuntimeError("the DPMM-CoT Base-shape rows need a CUDA device")
        from mmlatent.models import apply_fused_layers
        naive_model = _parts(t5, vae, unet, device, dtype)
        model = copy.deepcopy(naive_model)
        apply_fused_layers(model.t5)
        vocab = model.t5.config.vocab_size
        g = cpu_generator(3)
        ids = torch.randint(6, vocab, (batch, source), generator=g)
        labels = torch.randint(6, vocab, (batch, target), generator=g)
        pixels = torch.rand(batch, 3, image, image, generator=g) * 2 - 1
        with torch.no_grad():  # the cache a frozen-VAE run reads
            latents = model.image_latents(pixels.to(device=device, dtype=dtype))
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, 1000, (batch,), generator=g)
        to = dict(device=device)
        return dict(model=model, input_ids=ids.to(**to), attention_mask=torch.ones_like(ids).to(**to),
                    labels=labels.to(**to), pixel_values=pixels.to(device=device, dtype=dtype), latents=latents,
                    noise=noise.to(device=device, dtype=dtype), timesteps=timesteps.to(**to),
                    params=[p for p in model.parameters() if p.requires_grad], naive_model=naive_model,
                    naive_params=[p for p in naive_model.parameters() if p.requires_grad])
    return make


def _ours_step(a: Inputs) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    model = a["model"]
    model.zero_grad(set_to_none=True)
    out = model(a["input_ids"], a["attention_mask"], a["labels"], latents=a["latents"], noise=a["noise"],
                timesteps=a["timesteps"])
    out.loss.backward()
    return out.loss.detach(), [p.grad for p in a["params"]]


def _naive_step(a: Inputs) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    from transformers.modeling_outputs import BaseModelOutput

    from mmlatent.models.dpmm.model import sincos_positions
    model = a["naive_model"]
    model.zero_grad(set_to_none=True)
    t5, unet, fusion = model.t5, model.unet, model.fusion
    ids, mask = a["input_ids"], a["attention_mask"]
    states = t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        z0 = model.vae.encode(a["pixel_values"]).latent_dist.mean * model.latent_scale
    noisy = model.noise_scheduler.add_noise(z0, a["noise"], a["timesteps"])
    captured = {}
    handle = unet.mid_block.register_forward_hook(lambda _m, _a, out: captured.__setitem__("mid", out))
    try:
        pred = unet(noisy, a["timesteps"], encoder_hidden_states=states, encoder_attention_mask=mask).sample
    finally:
        handle.remove()
    diffusion = F.mse_loss(pred.float(), a["noise"].float())
    mid = captured["mid"]  # the map's tokens, each with its position code appended
    codes = sincos_positions(*mid.shape[2:], model.feature_positions, device=mid.device, dtype=mid.dtype)
    image = fusion.image_dense(torch.cat([mid.flatten(2).transpose(1, 2), codes.expand(mid.shape[0], -1, -1)], 2))
    attended, _ = fusion.mha_layer(states, image, image)
    gate = torch.sigmoid(fusion.gate_dense(torch.cat([states, attended], dim=-1)))
    fused = (1 - gate) * states + gate * attended
    text = t5(encoder_outputs=BaseModelOutput(last_hidden_state=fused), attention_mask=mask, labels=a["labels"]).loss
    loss = text.float() + model.diffusion_weight * diffusion
    loss.backward()
    return loss.detach(), [p.grad for p in a["naive_params"]]


def step_case(label: str, t5: Dict, vae: Dict, unet: Dict, image: int, batch: int, source: int, target: int,
              gpu: bool = False, repeats: int = 3) -> Case:
    return Case("dpmm training step", label, _step_inputs(t5, vae, unet, image, batch, source, target, gpu),
                _ours_step, {NAIVE_STEP: _naive_step}, repeats=repeats)


def _feature_inputs(t5: Dict, vae: Dict, unet: Dict, image: int, source: int, timesteps: Sequence[int],
                    gpu: bool = False) -> Make:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        if gpu and device.type != "cuda":
            raise RuntimeError("the DPMM-CoT Base-shape rows need a CUDA device")
        model = _parts(t5, vae, unet, device, dtype).eval()
        model.feature_timesteps = tuple(timesteps)
        g = cpu_generator(4)
        ids = torch.randint(6, model.t5.config.vocab_size, (1, source), generator=g).to(device)
        pixels = (torch.rand(1, 3, image, image, generator=g) * 2 - 1).to(device=device, dtype=dtype)
        with torch.no_grad():
            z0 = model.image_latents(pixels)
            conditions = model.conditions(model.encode(ids, torch.ones_like(ids)))
        return dict(model=model, z0=z0, conditions=conditions, mask=torch.ones_like(ids))
    return make


@torch.no_grad()
def _ours_features(a: Inputs) -> torch.Tensor:
    return a["model"].timestep_features(a["z0"], a["conditions"], a["mask"])


@torch.no_grad()
def _per_timestep(a: Inputs) -> torch.Tensor:
    model = a["model"]
    features = []
    for t in model.feature_timesteps:
        steps = torch.full((a["z0"].shape[0],), t, device=a["z0"].device)
        noisy = model.noise_scheduler.add_noise(a["z0"], torch.zeros_like(a["z0"]), steps)
        features.append(model.unet_features(noisy, steps, a["conditions"], a["mask"])[1])
    return torch.stack(features).mean(dim=0)


def feature_case(label: str, t5: Dict, vae: Dict, unet: Dict, image: int, source: int,
                 timesteps: Sequence[int] = (0, 250, 500, 750), gpu: bool = False) -> Case:
    return Case("dpmm generation features", label, _feature_inputs(t5, vae, unet, image, source, timesteps, gpu),
                _ours_features, {PER_TIMESTEP: _per_timestep})


def _gate_inputs(rows: int, d: int) -> Make:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = cpu_generator(5)
        tensors = [torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g),
                   torch.randn(d, 2 * d, generator=g) / (2 * d) ** 0.5, torch.zeros(d), torch.randn(rows, d,
                                                                                                  generator=g)]
        text, attended, weight, bias, grad = (t.to(device=device, dtype=dtype) for t in tensors)
        return dict(leaves=[t.requires_grad_() for t in (text, attended, weight, bias)], grad=grad)
    return make


def _ours_gate(a: Inputs) -> List[torch.Tensor]:
    from mmlatent.kernels import gated_mix
    leaves = a["leaves"]
    for t in leaves:
        t.grad = None
    gated_mix(*leaves).backward(a["grad"])
    return [t.grad for t in leaves]


def _unfused_gate(a: Inputs) -> List[torch.Tensor]:
    text, attended, weight, bias = leaves = a["leaves"]
    for t in leaves:
        t.grad = None
    gate = torch.sigmoid(F.linear(torch.cat([text, attended], dim=-1), weight, bias))
    ((1 - gate) * text + gate * attended).backward(a["grad"])
    return [t.grad for t in leaves]


def gate_case(rows: int, d: int) -> Case:
    return Case("gated_mix", f"N{rows} d{d} forward + backward", _gate_inputs(rows, d), _ours_gate,
                {UNFUSED_GATE: _unfused_gate}, flops=3 * 2 * rows * (2 * d) * d)


def _layer_inputs(rows: int, width: int, norm: bool) -> Make:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        from transformers.activations import NewGELUActivation
        from transformers.models.t5.modeling_t5 import T5LayerNorm
        g = cpu_generator(7)
        first, second, grad = (torch.randn(rows, width, generator=g).to(device=device, dtype=dtype)
                               for _ in range(3))
        if norm:
            module = T5LayerNorm(width).to(device=device, dtype=dtype)
            return dict(leaves=[first.requires_grad_(), module.weight], module=module, grad=grad)
        return dict(leaves=[first.requires_grad_(), second.requires_grad_()], module=NewGELUActivation(), grad=grad)
    return make


def _backward_grads(out: torch.Tensor, a: Inputs) -> List[torch.Tensor]:
    out.backward(a["grad"])
    return [t.grad for t in a["leaves"]]


def _clear(a: Inputs) -> List[torch.Tensor]:
    for t in a["leaves"]:
        t.grad = None
    return a["leaves"]


def _ours_geglu(a: Inputs) -> List[torch.Tensor]:
    from mmlatent.kernels import geglu
    return _backward_grads(geglu(*_clear(a)), a)


def _transformers_geglu(a: Inputs) -> List[torch.Tensor]:
    gate, up = _clear(a)
    return _backward_grads(a["module"](gate) * up, a)


def _ours_norm(a: Inputs) -> List[torch.Tensor]:
    from mmlatent.kernels import rms_norm
    x, weight = _clear(a)
    return _backward_grads(rms_norm(x, weight, eps=a["module"].variance_epsilon), a)


def _transformers_norm(a: Inputs) -> List[torch.Tensor]:
    x, _weight = _clear(a)
    return _backward_grads(a["module"](x), a)


def layer_cases(rows: int, d_model: int, d_ff: int) -> List[Case]:
    return [Case("geglu", f"N{rows} d_ff{d_ff} forward + backward", _layer_inputs(rows, d_ff, False), _ours_geglu,
                 {TRANSFORMERS_GEGLU: _transformers_geglu}),
            Case("rms_norm", f"N{rows} d{d_model} forward + backward", _layer_inputs(rows, d_model, True), _ours_norm,
                 {TRANSFORMERS_NORM: _transformers_norm})]


# Stable Diffusion 1.x's VAE and UNet widths, and T5-base's (flan-alpaca-base) shapes
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
SD_UNET = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "attention_head_dim": 8}
T5_BASE = {"vocab": 32128, "d_model": 768, "layers": 12, "heads": 12, "d_ff": 2048}
TINY_LONG = {"vocab": 32000, "d_model": 256, "layers": 4, "heads": 4, "d_ff": 1024}


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":
        t5 = {"vocab": 300, "d_model": 32, "layers": 1, "heads": 2, "d_ff": 64}
        vae, unet = {"block_out_channels": (32, 32)}, {"block_out_channels": (32, 32)}
        return [step_case("tiny T5 d32 L1 V300, 32 x 32 images", t5, vae, unet, 32, 2, 12, 8),
                feature_case("tiny, 4 timesteps", t5, vae, unet, 32, 12), gate_case(16, 32)] + layer_cases(16, 32, 64)
    if sizes == "gpu":
        label = "T5-base d768 L12+12 V32128, SD-1.x VAE + UNet, 256 x 256, bf16"
        return [step_case(label + ", batch 8, 512 / 512 tokens", T5_BASE, SD_VAE, SD_UNET, 256, 8, 512, 512,
                          gpu=True),
                feature_case(label + ", 4 timesteps, batch 1", T5_BASE, SD_VAE, SD_UNET, 256, 512, gpu=True),
                gate_case(8 * 512, 768)] + layer_cases(8 * 512, 768, 2048)
    unet = {"block_out_channels": (64, 128), "attention_head_dim": 8}
    label = "tiny-long: T5 d256 L4+4 V32000, SD-1.x-shaped VAE, UNet (64, 128), 64 x 64"
    return [step_case(label + ", batch 2, 512 / 512 tokens", TINY_LONG, SD_VAE, unet, 64, 2, 512, 512),
            feature_case(label + ", 4 timesteps, batch 1", TINY_LONG, SD_VAE, unet, 64, 512),
            gate_case(2 * 512, 256)] + layer_cases(2 * 512, 256, 1024)


__all__ = ["step_case", "feature_case", "gate_case", "layer_cases", "cases", "NAIVE_STEP", "PER_TIMESTEP",
           "UNFUSED_GATE", "TRANSFORMERS_GEGLU", "TRANSFORMERS_NORM"]
