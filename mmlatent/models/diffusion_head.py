"""The latent diffusion head of continuous-token methods (Modal-mixed CoT's visual sketches): an MLP with adaLN
conditioning that denoises [R, C] latents given a condition per row, trained either as discrete diffusion (DDPM
noise schedules, epsilon / v / sample prediction) or with flow matching (rectified flow, velocity prediction).

Layout (as MAR's head): timestep embedding (sinusoidal -> MLP) + condition projection = c; the input is projected to
``width``; each residual block applies LayerNorm (no affine) * (1 + scale) + shift (the fused
:func:`mmlatent.kernels.layer_norm_modulate`), an MLP, and adds the result scaled by a gate; a final adaLN layer
and a linear output. The modulation and output layers start at zero, so the initial prediction is zero. The
per-block modulation projections are one GEMM ([width, depth * 3 * width]).

Flow matching follows diffusers' FlowMatchEulerDiscreteScheduler (sigma = 1 is noise): x_t = (1 - t) x0 + t noise,
the head predicts the velocity dx_t/dt = noise - x0 and sees the time as t * num_train_timesteps, and sampling
integrates from t = 1 to 0 with Euler steps x <- x + (t_next - t) * v, which is that scheduler's ``step``.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from mmlatent.kernels import SamplerSchedule, checks, denoise_step_, diffusion_mse, layer_norm_modulate

if TYPE_CHECKING:
    import diffusers

# The head's prediction names -> SamplerSchedule / diffusion_mse's. "v" is DDPM's v-parameterisation
# (sqrt(a) noise - sqrt(1 - a) x0); "velocity" is flow matching's noise - x0: different targets, kept apart by name.
_PREDICTIONS = {"v": "v_prediction", "epsilon": "epsilon", "sample": "sample", "velocity": "velocity"}
_DISCRETE_PREDICTIONS = ("v", "epsilon", "sample")
FLOW = "flow"
_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear", "scaled_linear": "scaled_linear", FLOW: None}
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
# sample(schedule=...) strings -> SamplerSchedule kinds. "flow" is the constructor's name for flow matching;
# "euler" and "flow_euler" (the SamplerSchedule kind) name the same sampler.
_SAMPLERS = {"ddim": "ddim", "ddpm": "ddpm", FLOW: "flow_euler", "euler": "flow_euler", "flow_euler": "flow_euler"}
_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler")
DEFAULT_STEPS = 50
# Discrete alpha-bars agree with diffusers' float32 tables to ~1e-5 relative; other noise schedules differ by O(1).
ALPHAS_RTOL = 1e-3
MAX_CACHED_SCHEDULES = 64
FREQUENCIES = 256
LAYER_NORM_EPS = 1e-6  # as MAR and DiT
# Masks and timesteps are real numbers: bool / integer / float; complex values have no order to sample or weight by.
_REAL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + checks.FLOAT_DTYPES
_TIME_DTYPES = _REAL_DTYPES[1:]

# what sample(schedule=) takes: None, a name, a SamplerSchedule, or a configured DDPM / DDIM / FlowMatchEuler scheduler
ScheduleSpec = Union[None, str, SamplerSchedule, "diffusers.SchedulerMixin"]


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
        prediction: what ``forward`` predicts and ``loss`` trains. With a discrete schedule: "v" (DDPM's
            v-parameterisation sqrt(a) noise - sqrt(1 - a) x0; the default), "epsilon" or "sample". With
            ``schedule="flow"``: "velocity" (noise - x0; the default and the only choice). None: the schedule's
            default. "velocity" with a discrete schedule, or "v" with "flow", is a ValueError: the two are
            different targets.
        schedule: the training process: a discrete noise schedule over num_train_timesteps ("cosine" =
            diffusers' squaredcos_cap_v2, the default; "linear" or "scaled_linear" with diffusers' default betas
            1e-4..0.02), or "flow": flow matching, x_t = (1 - t) x0 + t noise for t in [0, 1] (diffusers'
            FlowMatchEuler convention: t = sigma = 1 is pure noise).
        num_train_timesteps: T. Discrete schedules: the training timesteps 0..T-1. Flow: the scale of the time
            the network sees, t * T (as diffusers passes sigma * T), so a
            ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)`` drives the head unchanged.
        timestep_sampling: how ``loss`` draws each row's time. "uniform": t uniform in {0..T-1} (discrete) or
            [0, 1) (flow). "logit_normal" (flow only): t = sigmoid(logit_mean + logit_std * z), z ~ N(0, 1), as
            SD3. None: "logit_normal" for flow, "uniform" for discrete schedules. The flow default follows SD3
            (Esser et al., 2024), whose comparison of rectified-flow timestep samplers ranked logit-normal(0, 1)
            first: the velocity is nearly determined near either end (near t = 1 it tends to noise - E[x0],
            near t = 0 the state is the sample) and hardest to learn in the middle, where logit-normal puts its
            mass; the loss itself stays unweighted.
        logit_mean, logit_std: the logit-normal's location and scale (finite; std > 0). Only
            ``timestep_sampling="logit_normal"`` uses them: other values with another sampling are a ValueError.

    Attributes: ``prediction``, ``noise_schedule`` (the ``schedule`` argument), ``num_train_timesteps``,
    ``timestep_sampling``, ``logit_mean``, ``logit_std``, ``flow_matching`` (bool) and, for discrete schedules,
    the non-persistent float32 buffer ``alphas_cumprod`` [T] (None for flow).
    """

    def __init__(self, latent_dim: int, cond_dim: int, width: int = 1024, depth: int = 3,
                 prediction: Optional[str] = None, schedule: str = "cosine", num_train_timesteps: int = 1000, *,
                 timestep_sampling: Optional[str] = None, logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        super().__init__()
        if not isinstance(schedule, str) or schedule not in _SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(_SCHEDULES)}, got {schedule!r}")
        flow = schedule == FLOW
        if prediction is None:
            prediction = "velocity" if flow else "v"
        if not isinstance(prediction, str) or prediction not in _PREDICTIONS:
            raise ValueError(f"prediction: expected one of {', '.join(_PREDICTIONS)}, got {prediction!r}")
        if flow and prediction != "velocity":
            raise ValueError(f"prediction: schedule='flow' trains the velocity noise - x0 (prediction='velocity'), "
                             f"got {prediction!r}" + (" ('v' is DDPM's v-parameterisation, a discrete-schedule "
                                                      "target)" if prediction == "v" else ""))
        if not flow and prediction == "velocity":
            raise ValueError(f"prediction: 'velocity' is flow matching's target and needs schedule='flow'; with the "
                             f"discrete schedule {schedule!r} use 'v' (DDPM's v-parameterisation), 'epsilon' or "
                             f"'sample'")
        for name, value in (("latent_dim", latent_dim), ("cond_dim", cond_dim), ("width", width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value}")
        if timestep_sampling is None:
            timestep_sampling = "logit_normal" if flow else "uniform"
        if not isinstance(timestep_sampling, str) or timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling: expected one of {', '.join(TIMESTEP_SAMPLINGS)} (or None: the "
                             f"schedule's default), got {timestep_sampling!r}")
        if not flow and timestep_sampling != "uniform":
            raise ValueError(f"timestep_sampling: {timestep_sampling!r} draws continuous flow times "
                             f"(schedule='flow'); the discrete schedule {schedule!r} draws its timesteps 'uniform'")
        logit_mean = checks.number("logit_mean", logit_mean)
        logit_std = checks.number("logit_std", logit_std, positive=True)
        if timestep_sampling != "logit_normal":
            for name, value, default in (("logit_mean", logit_mean, 0.0), ("logit_std", logit_std, 1.0)):
                if value != default:
                    raise ValueError(f"{name}: only timestep_sampling='logit_normal' uses it, but sampling is "
                                     f"{timestep_sampling!r}; got {name}={value:g}")
        self.latent_dim, self.cond_dim, self.width, self.depth = latent_dim, cond_dim, width, depth
        self.prediction, self.noise_schedule, self.num_train_timesteps = prediction, schedule, num_train_timesteps
        self.flow_matching = flow
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std
        if flow:  # validates num_train_timesteps as the discrete path does
            SamplerSchedule.create("flow_euler", 1, "velocity", num_train_timesteps=num_train_timesteps)
            self._train_alphas = None
            self.register_buffer("alphas_cumprod", None, persistent=False)
        else:
            reference = SamplerSchedule.create("ddpm", 1, _PREDICTIONS[prediction],
                                               beta_schedule=_SCHEDULES[schedule],
                                               num_train_timesteps=num_train_timesteps)
            self._train_alphas = reference.alphas_cumprod  # float64: what a sampler's schedule is checked against
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
        self._schedules: "OrderedDict[tuple, SamplerSchedule]" = OrderedDict()
        self._graphs: "OrderedDict[tuple, _SamplingGraph]" = OrderedDict()
        self._graph_pool = None

    # ------------------------------------------------------------------------------------------------ network
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t [R, C], t [R] timesteps, cond [R, cond_dim] -> [R, C] prediction (of ``prediction``), in the
        parameters' dtype. t: discrete training timesteps in [0, T) or, for a flow head, flow times scaled to
        [0, T] (t * num_train_timesteps, the timesteps diffusers' flow scheduler passes). x_t and cond have
        floating dtypes, t a real one (TypeError otherwise)."""
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

    def _run(self, x_t: torch.Tensor, time_features: torch.Tensor, cond_features: torch.Tensor) -> torch.Tensor:
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
        """Noises ``target`` [R, C] at random times and returns the (masked) mean squared error of the prediction
        against its target (:func:`mmlatent.kernels.diffusion_mse`: the target is formed in the loss kernel, which
        writes the prediction's gradient in the same pass). Returns a float32 scalar.

        Discrete schedules: t uniform in {0..T-1}, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, target per
        ``prediction``. Flow: t in [0, 1) drawn by ``timestep_sampling``, x_t = (1 - t) x0 + t noise (in target's
        dtype), the network sees t * num_train_timesteps, target noise - x0 (the flow-matching loss
        mean_r mean_c (v - (noise - x0))^2, unweighted).

        Random draws, all from ``generator`` on target's device, in this order: the [R * batch_mul] times
        (discrete: ``torch.randint(0, T)``; uniform flow: ``torch.rand``; logit-normal: ``torch.randn``, then
        sigmoid(logit_mean + logit_std * z), float32), then the noise ``torch.randn`` [R * batch_mul, C] in
        target's dtype; so a reference can redraw them.

        ``batch_mul`` draws that many times per row; the condition [R, cond_dim] is projected once and the
        projection expanded, never the condition copied. mask [R] bool/integer/float selects rows (all rows
        masked: 0). target and cond have floating dtypes (TypeError otherwise, as a complex mask)."""
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
        rows, device = R * batch_mul, target.device
        if self.flow_matching:
            if self.timestep_sampling == "uniform":
                t = torch.rand(rows, generator=generator, device=device)
            else:
                t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(rows, generator=generator,
                                                                                 device=device))
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            s = t.to(x0.dtype)[:, None]
            x_t = (1 - s) * x0 + s * noise
            time, alphas = t * self.num_train_timesteps, t  # diffusion_mse reads no alpha-bar for "velocity"
        else:
            t = torch.randint(0, self.num_train_timesteps, (rows,), generator=generator, device=device)
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            a = self.alphas_cumprod[t]
            x_t = a.sqrt().to(x0.dtype)[:, None] * x0 + (1 - a).sqrt().to(x0.dtype)[:, None] * noise
            time, alphas = t, a
        time_features = self.time_embed(timestep_embedding(time).to(x0.dtype))
        prediction = self._run(x_t, time_features, cond_features)
        weights = None if mask is None else mask.repeat(batch_mul)
        return diffusion_mse(prediction, x0, noise, alphas, _PREDICTIONS[self.prediction], weights=weights)

    # ---------------------------------------------------------------------------------------------- sampling
    def schedule(self, schedule: ScheduleSpec = None, steps: Optional[int] = None, *, eta: float = 0.0,
                 mu: Optional[float] = None) -> SamplerSchedule:
        """The SamplerSchedule ``sample`` steps through, checked against this head's training.

        ``schedule``, ``steps``, ``eta`` and ``mu`` are :meth:`sample`'s. A string or a diffusers scheduler is
        converted once per (schedule, steps, eta, mu) and cached; a SamplerSchedule is checked and returned
        as is. ValueError naming ``schedule`` when it does not fit the head (see :meth:`sample`)."""
        if isinstance(schedule, SamplerSchedule):
            if steps is not None and self._steps(steps, schedule.kind) != schedule.num_steps:
                raise ValueError(f"steps: {steps} differs from the SamplerSchedule's {schedule.num_steps} steps "
                                 f"(leave steps None: a SamplerSchedule has its own)")
            if checks.number("eta", eta) != 0.0 or mu is not None:
                raise ValueError(f"{'eta' if eta != 0.0 else 'mu'}: a SamplerSchedule has its eta and time shift "
                                 f"built in (SamplerSchedule.create(..., eta=, mu=)); pass none with one")
            self._check_fits(schedule, "the SamplerSchedule")
            return schedule
        if schedule is None:
            schedule = FLOW if self.flow_matching else "ddim"
        if isinstance(schedule, str):
            kind = _SAMPLERS.get(schedule)
            if kind is None:
                raise ValueError(f"schedule: expected 'ddim', 'ddpm', 'flow' ('euler', 'flow_euler'), a "
                                 f"SamplerSchedule or a DDPM / DDIM / FlowMatchEulerDiscrete scheduler, got "
                                 f"{schedule!r}")
            self._check_family(kind == "flow_euler", repr(schedule))
            steps, eta = self._steps(steps, kind), self._eta(eta, kind)
            if mu is not None and kind != "flow_euler":
                raise ValueError(f"mu: only flow sampling takes mu (dynamic time shifting), not {schedule!r}")
            key = (kind, steps, eta, mu)
            if key not in self._schedules:
                options = dict(mu=mu) if kind == "flow_euler" else dict(
                    beta_schedule=_SCHEDULES[self.noise_schedule], timestep_spacing="trailing", eta=eta)
                made = SamplerSchedule.create(kind, steps, _PREDICTIONS[self.prediction],
                                              num_train_timesteps=self.num_train_timesteps, **options)
                self._remember(key, made)
            self._schedules.move_to_end(key)
            return self._schedules[key]
        name = type(schedule).__name__
        if name not in _SCHEDULERS:
            raise TypeError(f"schedule: expected a str, a SamplerSchedule or one of {', '.join(_SCHEDULERS)}, got "
                            f"{name}")
        flow = name == "FlowMatchEulerDiscreteScheduler"
        self._check_family(flow, f"a {name}")
        config = schedule.config
        if config.num_train_timesteps != self.num_train_timesteps:
            raise ValueError(f"schedule: the {name}'s num_train_timesteps = {config.num_train_timesteps!r} is not "
                             f"this head's {self.num_train_timesteps} ({self._what_t()})")
        if not flow and config.prediction_type != _PREDICTIONS[self.prediction]:
            raise ValueError(f"schedule: the {name}'s prediction_type {config.prediction_type!r} is not what this "
                             f"head predicts; configure it with prediction_type={_PREDICTIONS[self.prediction]!r} "
                             f"(the head's prediction={self.prediction!r})")
        if flow and getattr(config, "invert_sigmas", False):
            raise ValueError(f"schedule: a {name} with invert_sigmas=True runs from data (sigma 0) to noise; "
                             f"sampling starts from noise")
        kind = "flow_euler" if flow else ("ddpm" if name == "DDPMScheduler" else "ddim")
        steps, eta = self._steps(steps, kind), self._eta(eta, kind)
        key = (name, tuple(sorted((k, repr(v)) for k, v in config.items())), steps, eta, mu)
        if key not in self._schedules:
            try:
                made = SamplerSchedule.from_diffusers(schedule, steps, eta=eta, mu=mu)
            except (ValueError, TypeError) as error:  # its errors name "scheduler": here the argument is schedule
                message = str(error)
                if message.startswith("scheduler"):
                    raise type(error)("schedule" + message[len("scheduler"):]) from None
                raise
            described = f"the {name}" if flow else (
                f"the {name} (beta_schedule={config.beta_schedule!r}, beta_start={config.beta_start!r}, "
                f"beta_end={config.beta_end!r})")
            self._check_fits(made, described)
            self._remember(key, made)
        self._schedules.move_to_end(key)
        return self._schedules[key]

    def diffusers_scheduler(self, schedule: Optional[str] = None) -> "diffusers.SchedulerMixin":
        """A new diffusers scheduler configured as ``sample(schedule=schedule)`` samples: for "ddim" / "ddpm" a
        ``DDIMScheduler`` / ``DDPMScheduler`` with this head's num_train_timesteps, beta schedule and
        prediction type, "trailing" spacing, no clipping and final alpha-bar 1; for "flow" a
        ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)``. A ``step()`` loop over the head with it is
        the transparent sampler that :meth:`sample` is checked against (and the baseline it is measured
        against). ``schedule`` None: the head's default sampler."""
        from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
        if schedule is None:
            schedule = FLOW if self.flow_matching else "ddim"
        kind = _SAMPLERS.get(schedule) if isinstance(schedule, str) else None
        if kind is None:
            raise ValueError(f"schedule: expected one of {', '.join(_SAMPLERS)}, got {schedule!r}")
        self._check_family(kind == "flow_euler", repr(schedule))
        if kind == "flow_euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps)
        cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
        options = dict(set_alpha_to_one=True) if kind == "ddim" else {}
        return cls(num_train_timesteps=self.num_train_timesteps, beta_schedule=_SCHEDULES[self.noise_schedule],
                   prediction_type=_PREDICTIONS[self.prediction], clip_sample=False, timestep_spacing="trailing",
                   **options)

    def _remember(self, key: tuple, schedule: SamplerSchedule) -> None:
        if len(self._schedules) >= MAX_CACHED_SCHEDULES:
            self._schedules.popitem(last=False)
        self._schedules[key] = schedule

    def _what_t(self) -> str:
        return "the scale of its flow time input" if self.flow_matching else "the timesteps it was trained on"

    def _check_family(self, flow: bool, what: str) -> None:
        if flow and not self.flow_matching:
            raise ValueError(f"schedule: {what} is a flow-matching sampler, but this head is trained as discrete "
                             f"diffusion (schedule={self.noise_schedule!r}, prediction={self.prediction!r}); pass "
                             f"'ddim', 'ddpm', a DDIMScheduler / DDPMScheduler or a ddim / ddpm SamplerSchedule")
        if not flow and self.flow_matching:
            raise ValueError(f"schedule: {what} is a discrete diffusion sampler, but this head is trained with flow "
                             f"matching (schedule='flow', prediction='velocity'); pass 'flow', a "
                             f"FlowMatchEulerDiscreteScheduler or a flow_euler SamplerSchedule")

    def _check_fits(self, schedule: SamplerSchedule, what: str) -> None:
        """A schedule's family, prediction, T and (discrete) noise schedule must be the head's training ones."""
        self._check_family(schedule.kind == "flow_euler", what)
        T = schedule.num_train_timesteps
        if T is not None and T != self.num_train_timesteps:
            raise ValueError(f"schedule: {what} has num_train_timesteps = {T}, this head {self.num_train_timesteps} "
                             f"({self._what_t()})")
        if self.flow_matching:
            return
        if schedule.prediction != _PREDICTIONS[self.prediction]:
            raise ValueError(f"schedule: {what} steps a {schedule.prediction!r} prediction, but this head predicts "
                             f"{_PREDICTIONS[self.prediction]!r} (prediction={self.prediction!r})")
        alphas = schedule.alphas_cumprod
        if alphas is None:  # a directly constructed table: nothing to compare
            return
        if len(alphas) != self.num_train_timesteps:
            raise ValueError(f"schedule: {what} has {len(alphas)} training alpha-bars, this head "
                             f"num_train_timesteps = {self.num_train_timesteps}")
        worst = max(abs(a - b) / b for a, b in zip(alphas, self._train_alphas))
        if worst > ALPHAS_RTOL:
            raise ValueError(f"schedule: {what} has another noise schedule than this head's "
                             f"{self.noise_schedule!r} (beta_schedule={_SCHEDULES[self.noise_schedule]!r}, betas "
                             f"1e-4..0.02 over {self.num_train_timesteps} steps): alphas_cumprod differ by up to "
                             f"{worst:.3g} relative")

    def _steps(self, steps: Optional[int], kind: str) -> int:
        if steps is None:
            return DEFAULT_STEPS
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        if kind != "flow_euler" and steps > self.num_train_timesteps:
            raise ValueError(f"steps: expected at most num_train_timesteps = {self.num_train_timesteps} (a discrete "
                             f"schedule), got {steps}")
        return int(steps)

    @staticmethod
    def _eta(eta: float, kind: str) -> float:
        eta = checks.number("eta", eta)
        if eta != 0.0 and kind != "ddim":
            raise ValueError(f"eta: only DDIM takes eta (DDPM's variance is fixed, flow Euler steps are "
                             f"deterministic), got eta={eta:g} with {kind}")
        return eta

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: Optional[int] = None, schedule: ScheduleSpec = None,
               cfg_scale: float = 1.0, temperature: float = 1.0, generator: Optional[torch.Generator] = None,
               cuda_graph: Optional[bool] = None, *, eta: float = 0.0, mu: Optional[float] = None,
               sampler: Optional[str] = None) -> torch.Tensor:
        """[R, C] float32 samples for every row of ``cond`` [R, cond_dim] (all segments of a batch at once).

        Args:
            cond: [R, cond_dim] conditions (any float dtype; cast to the head's; integer, bool or complex
                conditions raise TypeError).
            steps: the number of steps, >= 1 (<= num_train_timesteps for discrete samplers); None: 50, or a
                SamplerSchedule's own count (another count is a ValueError).
            schedule: the sampler; None: "ddim" for a discrete head, "flow" for a flow head.

                - "ddim" (deterministic unless ``eta`` > 0) or "ddpm" (discrete heads): this head's noise
                  schedule and prediction with "trailing" timestep spacing, t_i = round(T - i * T / steps) - 1
                  (the first step at T - 1), final alpha-bar 1, no x0 clipping: what
                  ``DDIMScheduler`` / ``DDPMScheduler(num_train_timesteps=T, beta_schedule=..., prediction_type=...,
                  clip_sample=False, timestep_spacing="trailing")`` step through.
                - "flow" (also "euler", "flow_euler"; flow heads): Euler steps over sigmas linear from 1 to 1 / T,
                  then 0, as ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)``; with ``mu`` dynamically
                  shifted as that scheduler with ``use_dynamic_shifting=True`` and ``set_timesteps(steps, mu=mu)``.
                - a configured ``DDPMScheduler``, ``DDIMScheduler`` or ``FlowMatchEulerDiscreteScheduler``
                  (diffusers; not modified), converted with ``SamplerSchedule.from_diffusers(scheduler, steps,
                  eta=eta, mu=mu)``: its sampling choices are taken as configured (timestep spacing, steps_offset,
                  clip_sample, set_alpha_to_one, variance_type; the flow shift, dynamic shifting, shift_terminal,
                  Karras / exponential / beta sigmas).
                - a :class:`SamplerSchedule`, used as built.

                What the head was trained with must match, else ValueError naming ``schedule``: the family
                (discrete vs flow), num_train_timesteps, a discrete scheduler's prediction_type (equal to the
                head's; DDIM's "v_prediction" for prediction="v") and its alphas_cumprod (the head's noise
                schedule within 1e-3 relative: another beta_schedule, other betas or rescale_betas_zero_snr are
                refused). Unsupported scheduler options (thresholding, stochastic_sampling, learned variances,
                invert_sigmas) are refused too.
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
            eta: DDIM's eta ("ddim" or a DDIMScheduler; 0 otherwise).
            mu: dynamic time shifting for flow sampling ("flow", and required by a FlowMatchEulerDiscreteScheduler
                with use_dynamic_shifting=True); ``SamplerSchedule.dynamic_shift_mu`` gives Flux's and SD3's.
            sampler: the deprecated name of ``schedule`` (a DeprecationWarning; passing both is a TypeError).

        The timestep features are computed once per call, never per step. Given the same generator state, the
        result does not depend on ``cuda_graph`` for the deterministic samplers (DDIM with eta 0, flow Euler);
        with DDPM the graph draws its step noise for the padded bucket, so the two paths give different (equally
        distributed) samples. Eagerly, a DDPM sample equals a loop over the diffusers scheduler's ``step`` with
        the same generator (the initial noise, then one draw per stochastic step, from the same stream).
        """
        if sampler is not None:
            # stacklevel 3: past torch.no_grad's wrapper, at the caller
            warnings.warn("LatentDiffusionHead.sample: sampler= is deprecated, pass schedule= (it takes the same "
                          "strings, a SamplerSchedule or a diffusers scheduler)", DeprecationWarning, stacklevel=3)
            if schedule is not None:
                raise TypeError("sampler: the deprecated name of schedule; pass schedule only")
            schedule = sampler
        checks.tensor("cond", cond, dtypes=checks.FLOAT_DTYPES)
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond: expected [R, {self.cond_dim}], got {tuple(cond.shape)}")
        resolved = self.schedule(schedule, steps, eta=eta, mu=mu)
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
        guidance = cfg_scale if cfg_scale != 1.0 else None
        dtype = next(self.parameters()).dtype
        x = torch.randn(cond.shape[0], self.latent_dim, generator=generator, device=cond.device,
                        dtype=torch.float32)
        x.mul_(temperature)
        if use_graph and cond.shape[0]:
            return self._graphed(resolved, cond.shape[0], guidance, dtype, generator).run(x, cond)
        return self._sample_loop(x, cond.to(dtype), resolved, guidance, generator)

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

    def _graphed(self, schedule: SamplerSchedule, rows: int, cfg_scale: Optional[float], dtype: torch.dtype,
                 generator: Optional[torch.Generator]) -> "_SamplingGraph":
        bucket = max(MIN_GRAPH_BUCKET, 1 << (rows - 1).bit_length())
        parameters = tuple(p.data_ptr() for p in self.parameters())
        # by content, not identity: equal schedules share a graph, different ones (another eta, mu or scheduler
        # configuration with the same step count) never replay each other's captured table
        key = (bucket, schedule.cache_key(), cfg_scale, dtype, parameters,
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

    def __init__(self, graph: "torch.cuda.CUDAGraph", x: torch.Tensor, cond: torch.Tensor,
                 generator: Optional[torch.Generator], schedule: SamplerSchedule) -> None:
        self.graph, self.x, self.cond = graph, x, cond
        # The graph reads the schedule's cached device table and timesteps: a schedule the caller built must live
        # as long as the graph does.
        self.schedule = schedule
        # Held so that its id, part of the cache key, cannot be reused by another generator while cached: the
        # graph draws from this generator's state, whatever generator a later call passes.
        self.generator = generator

    @classmethod
    def capture(cls, head: LatentDiffusionHead, schedule: SamplerSchedule, bucket: int, cfg_scale: Optional[float],
                dtype: torch.dtype, device: torch.device, generator: Optional[torch.Generator],
                pool: tuple) -> "_SamplingGraph":
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
        return cls(graph, x, cond, generator, schedule)

    def run(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        self.x[:rows].copy_(x)
        self.x[rows:].zero_()
        self.cond[:rows].copy_(cond)
        self.cond[rows:].zero_()
        self.graph.replay()
        return self.x[:rows].clone()


__all__ = ["LatentDiffusionHead", "timestep_embedding"]
