"""The latent diffusion head of continuous-token methods (Modal-mixed CoT's visual sketches): an MLP with adaLN
conditioning that denoises [R, C] latents given a condition per row.

Layout (as MAR's head): timestep embedding (sinusoidal -> MLP) + condition projection = c; the input is projected to
``width``; each residual block applies LayerNorm (no affine) * (1 + scale) + shift (the fused
:func:`mmlatent.kernels.layer_norm_modulate`), an MLP, and adds the result scaled by a gate; a final adaLN layer
and a linear output. The modulation and output layers start at zero, so the initial prediction is zero. The
per-block modulation projections are one GEMM ([width, depth * 3 * width]).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from mmlatent.kernels import SamplerSchedule, checks, denoise_step_, diffusion_mse, layer_norm_modulate

_PREDICTIONS = {"v": "v_prediction", "epsilon": "epsilon", "sample": "sample"}
_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear", "scaled_linear": "scaled_linear"}
FREQUENCIES = 256
LAYER_NORM_EPS = 1e-6  # as MAR and DiT
# Masks and timesteps are real numbers: bool / integer / float; complex values have no order to sample or weight by.
_REAL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + checks.FLOAT_DTYPES
_TIME_DTYPES = _REAL_DTYPES[1:]


def timestep_embedding(t: torch.Tensor, dim: int = FREQUENCIES, max_period: float = 10000.0) -> torch.Tensor:
    """[R] timesteps (any real values) -> [R, dim] float32 sinusoidal features (cos, sin halves)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class LatentDiffusionHead(nn.Module):
    """Denoises [R, latent_dim] latents conditioned on [R, cond_dim] vectors.

    Args:
        latent_dim: C, the size of each latent row; cond_dim: the condition's size (the VLM's hidden size).
        width, depth: the MLP's width and number of residual blocks.
        prediction: "v", "epsilon" or "sample": what ``forward`` predicts and ``loss`` trains.
        schedule: the training noise schedule ("cosine", "linear", "scaled_linear") over num_train_timesteps.
    """

    def __init__(self, latent_dim: int, cond_dim: int, width: int = 1024, depth: int = 3, prediction: str = "v",
                 schedule: str = "cosine", num_train_timesteps: int = 1000):
        super().__init__()
        if prediction not in _PREDICTIONS:
            raise ValueError(f"prediction: expected one of {', '.join(_PREDICTIONS)}, got {prediction!r}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(_SCHEDULES)}, got {schedule!r}")
        for name, value in (("latent_dim", latent_dim), ("cond_dim", cond_dim), ("width", width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value}")
        self.latent_dim, self.cond_dim, self.width, self.depth = latent_dim, cond_dim, width, depth
        self.prediction, self.noise_schedule, self.num_train_timesteps = prediction, schedule, num_train_timesteps
        reference = SamplerSchedule.create("ddpm", 1, _PREDICTIONS[prediction], beta_schedule=_SCHEDULES[schedule],
                                           num_train_timesteps=num_train_timesteps)
        self.register_buffer("alphas_cumprod", torch.tensor(reference.alphas_cumprod, dtype=torch.float32),
                             persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(FREQUENCIES, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_proj = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(latent_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
                                    for _ in range(depth))
        self.modulation = nn.Linear(width, depth * 3 * width)  # every block's shift, scale, gate: one GEMM
        self.final_modulation = nn.Linear(width, 2 * width)
        self.output = nn.Linear(width, latent_dim)
        for layer in (self.modulation, self.final_modulation, self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._schedules: Dict[tuple, SamplerSchedule] = {}
        self._graphs: "OrderedDict[tuple, _SamplingGraph]" = OrderedDict()
        self._graph_pool = None

    # ------------------------------------------------------------------------------------------------ network
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t [R, C], t [R] training timesteps, cond [R, cond_dim] -> [R, C] prediction (of ``prediction``).
        x_t and cond have floating dtypes, t a real one (TypeError otherwise)."""
        checks.tensor("x_t", x_t, dtypes=checks.FLOAT_DTYPES)
        checks.tensor("t", t, dtypes=_TIME_DTYPES)
        checks.tensor("cond", cond, dtypes=checks.FLOAT_DTYPES)
        if x_t.dim() != 2 or x_t.shape[1] != self.latent_dim:
            raise ValueError(f"x_t: expected [R, {self.latent_dim}], got {tuple(x_t.shape)}")
        if cond.dim() != 2 or cond.shape != (x_t.shape[0], self.cond_dim):
            raise ValueError(f"cond: expected [{x_t.shape[0]}, {self.cond_dim}], got {tuple(cond.shape)}")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t: expected [{x_t.shape[0]}], got {tuple(t.shape)}")
        return self._run(x_t, self.time_embed(timestep_embedding(t).to(x_t.dtype)), self.cond_proj(cond))

    def _run(self, x_t, time_features, cond_features):
        c = F.silu(time_features + cond_features)
        h = self.input_proj(x_t)
        mods = self.modulation(c).chunk(3 * self.depth, dim=1)
        for i, block in enumerate(self.blocks):
            shift, scale, gate = mods[3 * i: 3 * i + 3]
            h = h + gate * block(layer_norm_modulate(h, shift, scale, eps=LAYER_NORM_EPS))
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        return self.output(layer_norm_modulate(h, shift, scale, eps=LAYER_NORM_EPS))

    # ---------------------------------------------------------------------------------------------- training
    def loss(self, target: torch.Tensor, cond: torch.Tensor, mask: Optional[torch.Tensor] = None,
             batch_mul: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noises ``target`` [R, C] at random timesteps and returns the (masked) mean squared error of the
        prediction against its target (:func:`mmlatent.kernels.diffusion_mse`: the target is formed in the loss
        kernel, which writes the prediction's gradient in the same pass). ``batch_mul`` draws that many timesteps
        per row; the condition [R, cond_dim] is projected once and the projection expanded, never the condition
        copied. mask [R] bool/integer/float selects rows (all rows masked: 0). target and cond have floating
        dtypes (TypeError otherwise, as a complex mask). Returns a float32 scalar."""
        checks.tensor("target", target, dtypes=checks.FLOAT_DTYPES)
        checks.tensor("cond", cond, dtypes=checks.FLOAT_DTYPES)
        if mask is not None:
            checks.tensor("mask", mask, dtypes=_REAL_DTYPES)
        if target.dim() != 2 or target.shape[1] != self.latent_dim:
            raise ValueError(f"target: expected [R, {self.latent_dim}], got {tuple(target.shape)}")
        R = target.shape[0]
        if cond.shape != (R, self.cond_dim):
            raise ValueError(f"cond: expected [{R}, {self.cond_dim}], got {tuple(cond.shape)}")
        if isinstance(batch_mul, bool) or not isinstance(batch_mul, int) or batch_mul < 1:
            raise ValueError(f"batch_mul: expected a positive int, got {batch_mul!r}")
        if mask is not None and mask.shape != (R,):
            raise ValueError(f"mask: expected [{R}], got {tuple(mask.shape)}")
        cond_features = self.cond_proj(cond).repeat(batch_mul, 1)
        x0 = target.repeat(batch_mul, 1)
        t = torch.randint(0, self.num_train_timesteps, (R * batch_mul,), generator=generator, device=target.device)
        noise = torch.randn(x0.shape, generator=generator, device=target.device, dtype=x0.dtype)
        a = self.alphas_cumprod[t]
        x_t = a.sqrt().to(x0.dtype)[:, None] * x0 + (1 - a).sqrt().to(x0.dtype)[:, None] * noise
        time_features = self.time_embed(timestep_embedding(t).to(x0.dtype))
        prediction = self._run(x_t, time_features, cond_features)
        weights = None if mask is None else mask.repeat(batch_mul)
        return diffusion_mse(prediction, x0, noise, a, _PREDICTIONS[self.prediction], weights=weights)

    # ---------------------------------------------------------------------------------------------- sampling
    def schedule(self, kind: str, num_steps: int) -> SamplerSchedule:
        """The SamplerSchedule ``sample`` uses: this head's training noise schedule and prediction, "ddim" or
        "ddpm" over ``num_steps`` steps (cached)."""
        key = (kind, num_steps)
        if key not in self._schedules:
            if kind not in ("ddim", "ddpm"):
                raise ValueError(f"sampler: expected 'ddim' or 'ddpm' (the head's schedule is discrete), got {kind!r}")
            self._schedules[key] = SamplerSchedule.create(
                kind, num_steps, _PREDICTIONS[self.prediction], beta_schedule=_SCHEDULES[self.noise_schedule],
                num_train_timesteps=self.num_train_timesteps, timestep_spacing="trailing")
        return self._schedules[key]

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int = 50, sampler: str = "ddim", cfg_scale: float = 1.0,
               temperature: float = 1.0, generator: Optional[torch.Generator] = None,
               cuda_graph: Optional[bool] = None) -> torch.Tensor:
        """[R, C] float32 samples for every row of ``cond`` [R, cond_dim] (all segments of a batch at once).

        Args:
            cond: [R, cond_dim] conditions (any float dtype; cast to the head's; integer, bool or complex
                conditions raise TypeError).
            steps, sampler: the schedule (:meth:`schedule`): "ddim" (deterministic, eta 0) or "ddpm", with
                1 <= steps <= num_train_timesteps.
            cfg_scale: classifier-free guidance; != 1 adds unconditional rows (a zero condition) and fuses
                ``uncond + cfg_scale * (cond - uncond)`` into the step.
            temperature: scales the initial noise.
            generator: draws the initial noise (and a DDPM sampler's noise), on cond's device.
            cuda_graph: capture the whole loop (condition projection, timestep features, every head forward and
                fused step) in one CUDA graph per power-of-two row-count bucket, and replay it; rows are padded to
                the bucket with zeros (rows never mix). Default: on for CUDA tensors. Graphs are cached per head
                (bucket, schedule, guidance, dtype, parameters; for DDPM also the generator object, so reseed one
                generator with ``manual_seed`` rather than creating one per call) and read the parameters in
                place, so in-place optimizer updates are seen; replacing a parameter tensor recaptures.

        The timestep features are computed once per call, never per step. Given the same generator state, the
        result does not depend on ``cuda_graph`` for the deterministic sampler (DDIM); with DDPM the graph draws
        its step noise for the padded bucket, so the two paths give different (equally distributed) samples.
        """
        checks.tensor("cond", cond, dtypes=checks.FLOAT_DTYPES)
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond: expected [R, {self.cond_dim}], got {tuple(cond.shape)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        if steps > self.num_train_timesteps:
            raise ValueError(f"steps: expected at most num_train_timesteps = {self.num_train_timesteps} (a discrete "
                             f"schedule), got {steps}")
        cfg_scale = checks.number("cfg_scale", cfg_scale)
        temperature = checks.number("temperature", temperature)
        if temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature}")
        if generator is not None and generator.device.type != cond.device.type:
            raise ValueError(f"generator: expected a generator on {cond.device.type} (cond's device), got one on "
                             f"{generator.device}")
        use_graph = cond.is_cuda if cuda_graph is None else bool(cuda_graph)
        if use_graph and not cond.is_cuda:
            raise ValueError(f"cuda_graph: True needs cond on a CUDA device, got {cond.device}")
        schedule = self.schedule(sampler, steps)
        guidance = cfg_scale if cfg_scale != 1.0 else None
        dtype = next(self.parameters()).dtype
        x = torch.randn(cond.shape[0], self.latent_dim, generator=generator, device=cond.device,
                        dtype=torch.float32)
        x.mul_(temperature)
        if use_graph and cond.shape[0]:
            return self._graphed(schedule, cond.shape[0], guidance, dtype, generator).run(x, cond)
        return self._sample_loop(x, cond.to(dtype), schedule, guidance, generator)

    def _sample_loop(self, x: torch.Tensor, cond: torch.Tensor, schedule: SamplerSchedule,
                     cfg_scale: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
        """Runs every step on x [R, C] float32 in place, conditioned on cond [R, cond_dim] (the head's dtype).
        Row-independent, with no host synchronisation: the body a CUDA graph captures."""
        dtype = cond.dtype
        time_features = self.time_embed(timestep_embedding(schedule.device_timesteps(x.device)).to(dtype))
        cond_features = self.cond_proj(cond)
        if cfg_scale is not None:  # the projection of a zero condition is the bias
            cond_features = torch.cat([cond_features, self.cond_proj.bias.expand_as(cond_features)])
        for i in range(schedule.num_steps):
            inputs = torch.cat([x, x]) if cfg_scale is not None else x
            features = time_features[i].expand(inputs.shape[0], -1)
            out = self._run(inputs.to(dtype), features, cond_features)
            denoise_step_(x, out, i, schedule, generator=generator, cfg_scale=cfg_scale)
        return x

    def _graphed(self, schedule, rows, cfg_scale, dtype, generator) -> "_SamplingGraph":
        bucket = max(MIN_GRAPH_BUCKET, 1 << (rows - 1).bit_length())
        parameters = tuple(p.data_ptr() for p in self.parameters())
        key = (bucket, schedule.kind, schedule.num_steps, cfg_scale, dtype, parameters,
               id(generator) if schedule.stochastic else None)
        graph = self._graphs.pop(key, None)
        if graph is None:
            if len(self._graphs) >= MAX_CACHED_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            device = next(self.parameters()).device
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = _SamplingGraph.capture(self, schedule, bucket, cfg_scale, dtype, device,
                                           generator if schedule.stochastic else None, self._graph_pool)
        self._graphs[key] = graph  # most recently used last
        return graph


MIN_GRAPH_BUCKET = 8
MAX_CACHED_GRAPHS = 8


class _SamplingGraph:
    """One captured sampling loop over static [bucket, C] state and [bucket, cond_dim] condition buffers."""

    def __init__(self, graph, x, cond, generator):
        self.graph, self.x, self.cond = graph, x, cond
        # Held so that its id, part of the cache key, cannot be reused by another generator while cached: the
        # graph draws from this generator's state, whatever generator a later call passes.
        self.generator = generator

    @classmethod
    def capture(cls, head, schedule, bucket, cfg_scale, dtype, device, generator, pool):
        x = torch.zeros(bucket, head.latent_dim, device=device, dtype=torch.float32)
        cond = torch.zeros(bucket, head.cond_dim, device=device, dtype=dtype)
        schedule.device_table(device)  # host-to-device copies cannot be captured: make them now
        schedule.device_timesteps(device)
        rng = generator if generator is not None else torch.cuda.default_generators[device.index or 0]
        rng_state = rng.get_state()  # warm-up and capture must not consume the caller's random stream
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compiles the Triton kernels and initialises cuBLAS outside the capture
            head._sample_loop(x.clone(), cond, schedule, cfg_scale, generator)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph, pool=pool):
            head._sample_loop(x, cond, schedule, cfg_scale, generator)
        rng.set_state(rng_state)
        return cls(graph, x, cond, generator)

    def run(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        self.x[:rows].copy_(x)
        self.x[rows:].zero_()
        self.cond[:rows].copy_(cond)
        self.cond[rows:].zero_()
        self.graph.replay()
        return self.x[:rows].clone()


__all__ = ["LatentDiffusionHead", "timestep_embedding"]
