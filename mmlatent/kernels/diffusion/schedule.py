"""Sampler schedules: :class:`SamplerSchedule`, the coefficient tables ``denoise_step_`` (op.py) steps through.

Every supported sampler step is affine in the state and the model output once the schedule is fixed:

    x0     = clamp(px * x + po * out)               (only when the sampler clips its x0 estimate)
    x_next = cx * x + co * out + c0 * x0 + sigma * noise

so a schedule is a table of six coefficients per step, computed once in float64 on the host (and copied once to
the device as float32): DDPM (``fixed_small`` / ``fixed_large`` variance), DDIM (any eta) and flow-matching Euler,
for epsilon, v and sample predictions (velocity for flow). A step is then one elementwise pass, and rows may sit at
different steps (ragged segments in one launch).

Flow-matching time shifts, as diffusers' ``FlowMatchEulerDiscreteScheduler``: a static ``shift`` s maps each sigma to
s * sigma / (1 + (s - 1) * sigma); dynamic shifting with ``mu`` maps it to e^mu / (e^mu + 1 / sigma - 1)
("exponential", the same function with s = e^mu) or mu / (mu + 1 / sigma - 1) ("linear"). The two paths differ in
the grid they shift: the static scheduler shifts its training sigmas at construction, so its inference grid runs
linearly between the *shifted* extremes [1, shift(1 / T)] and is then shifted again; dynamic shifting leaves the
construction sigmas alone, so its grid runs over [1, 1 / T] and is shifted once. Only the low end moves, so the
schedules agree at sigma = 1 and drift apart towards the last step (with e^mu = 3.16, T = 1000 and 10 steps the last
timestep is 9.89 under the static shift and 3.15 under dynamic shifting).
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import checks

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

KINDS = ("ddpm", "ddim", "flow_euler")
PREDICTIONS = {"ddpm": ("epsilon", "v_prediction", "sample"), "ddim": ("epsilon", "v_prediction", "sample"),
               "flow_euler": ("velocity",)}
COLUMNS = ("cx", "co", "px", "po", "c0", "sigma")
SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


def _int_in(name: str, value: object, low: int, high: Optional[int] = None, why: str = "") -> int:
    """``value`` as an int in [low, high] (high None: unbounded); errors name ``name`` and say ``why``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected an int {span}{why}, got {value}")
    return value


def _open_unit(name: str, value: object) -> float:
    value = checks.number(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}: expected a beta in (0, 1) (exclusive), got {value}")
    return value


def _clip_range(name: str, value: Union[None, bool, float]) -> Optional[float]:
    """diffusers' clip_sample switch or its range: None/False = no clamp, True = the default range 1.0."""
    if value is None or value is False:
        return None
    if value is True:
        return 1.0
    value = checks.number(name, value)
    if value <= 0:
        raise ValueError(f"{name}: expected None, a bool or a positive clamp range, got {value}")
    return value


def _check_alphas(name: str, alphas: Sequence[float]) -> None:
    """Every step's coefficients divide by sqrt(alpha_bar) and by 1 - alpha_bar: both must be nonzero in float64."""
    for t, a in enumerate(alphas):
        if not 0.0 < a < 1.0:
            raise ValueError(f"{name}: alphas_cumprod must lie in (0, 1) at every training step, but it is {a} at "
                             f"t = {t} (betas this close to 0 or 1 round it to an end in float64)")


SHIFT_RANGE = (1e-6, 1e6)
TIME_SHIFT_TYPES = ("exponential", "linear")
ETA_MAX = 1e6

def _betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> List[float]:
    T = num_train_timesteps  # >= 2: the linear schedules divide by T - 1
    if schedule == "linear":
        return [beta_start + (beta_end - beta_start) * i / (T - 1) for i in range(T)]
    if schedule == "scaled_linear":
        lo, hi = math.sqrt(beta_start), math.sqrt(beta_end)
        return [(lo + (hi - lo) * i / (T - 1)) ** 2 for i in range(T)]
    if schedule in ("squaredcos_cap_v2", "cosine"):
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    raise ValueError(f"beta_schedule: expected linear, scaled_linear or squaredcos_cap_v2, got {schedule!r}")


def _cumprod(betas: Sequence[float]) -> List[float]:
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return out


def _x0(prediction: str, a_t: float) -> Tuple[float, float]:
    """(px, po): x0 = px * x + po * out."""
    b_t = 1.0 - a_t
    if prediction == "epsilon":
        return 1.0 / math.sqrt(a_t), -math.sqrt(b_t) / math.sqrt(a_t)
    if prediction == "v_prediction":
        return math.sqrt(a_t), -math.sqrt(b_t)
    return 0.0, 1.0


def _eps(prediction: str, a_t: float) -> Tuple[float, float]:
    """(qx, qo): epsilon = qx * x + qo * out."""
    b_t = 1.0 - a_t
    if prediction == "epsilon":
        return 0.0, 1.0
    if prediction == "v_prediction":
        return math.sqrt(b_t), math.sqrt(a_t)
    return 1.0 / math.sqrt(b_t), -math.sqrt(a_t) / math.sqrt(b_t)


@dataclass
class SamplerSchedule:
    """Per-step coefficients of one sampler over ``num_steps`` steps.

    Attributes:
        kind: "ddpm", "ddim" or "flow_euler"; prediction: "epsilon", "v_prediction", "sample" or "velocity".
        timesteps: [S] the model's time input at each step, in sampling order (int64 training timesteps, or
            float32 flow times in [0, 1] x num_train_timesteps as diffusers passes them).
        table: [S, 6] float64 host table, columns ``COLUMNS``; ``clip``: x0 clamp range or None.
        alphas_cumprod: the discrete kinds' training alpha-bars (a list of T floats); num_train_timesteps: T. The
            builders set both (flow schedules: only T); a schedule constructed directly may leave them None.
    """

    kind: str
    prediction: str
    timesteps: torch.Tensor
    table: torch.Tensor
    clip: Optional[float] = None
    eta: float = 0.0
    alphas_cumprod: Optional[list] = field(default=None, repr=False)  # the training schedule (discrete kinds)
    num_train_timesteps: Optional[int] = None  # T of the training schedule; None when constructed directly
    _device_copies: Dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The builders produce valid tables; this guards direct construction and any numerical blow-up.
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.prediction not in PREDICTIONS[self.kind]:
            raise ValueError(f"prediction: {self.kind} takes {', '.join(PREDICTIONS[self.kind])}, "
                             f"got {self.prediction!r}")
        checks.tensor("table", self.table, dims=2, dtypes=(torch.float64,))
        if self.table.shape[0] < 1 or self.table.shape[1] != len(COLUMNS):
            raise ValueError(f"table: expected shape [S, {len(COLUMNS)}] with S >= 1 steps, got "
                             f"{tuple(self.table.shape)}")
        if not bool(torch.isfinite(self.table).all()):
            raise ValueError("table: every coefficient must be finite")
        checks.tensor("timesteps", self.timesteps, dims=1)
        checks.shape("timesteps", self.timesteps, (self.table.shape[0],), "[S] like table")
        self.clip = _clip_range("clip", self.clip)
        self.eta = checks.number("eta", self.eta)
        if not 0 <= self.eta <= ETA_MAX:
            raise ValueError(f"eta: expected a value in [0, {ETA_MAX:g}], got {self.eta:g}")
        if self.num_train_timesteps is not None:
            self.num_train_timesteps = _int_in("num_train_timesteps", self.num_train_timesteps, 2)

    @property
    def num_steps(self) -> int:
        return self.table.shape[0]

    @property
    def stochastic(self) -> bool:
        return bool((self.table[:, 5] != 0).any())

    def cache_key(self) -> tuple:
        """A hashable key equal for schedules that step identically (kind, prediction, clamp, table, timesteps):
        what a captured sampling loop may be reused for."""
        return (self.kind, self.prediction, self.clip, self.timesteps.dtype, self.table.numpy().tobytes(),
                self.timesteps.cpu().numpy().tobytes())

    def device_table(self, device: Union[str, torch.device]) -> torch.Tensor:
        """[S, 6] float32 on ``device``, copied once and cached (no host-to-device copy per step)."""
        return self._on_device("table", self.table, torch.float32, device)

    def device_timesteps(self, device: Union[str, torch.device]) -> torch.Tensor:
        """``timesteps`` on ``device`` (their dtype), copied once and cached."""
        return self._on_device("timesteps", self.timesteps, self.timesteps.dtype, device)

    def _on_device(self, name: str, value: torch.Tensor, dtype: torch.dtype,
                   device: Union[str, torch.device]) -> torch.Tensor:
        key = (name, str(torch.device(device)))
        if key not in self._device_copies:
            self._device_copies[key] = value.to(device=device, dtype=dtype)
        return self._device_copies[key]

    # --------------------------------------------------------------------------------------------- builders
    @classmethod
    def create(cls, kind: str, num_steps: int, prediction: str, *, num_train_timesteps: int = 1000,
               beta_schedule: str = "linear", beta_start: float = 0.0001, beta_end: float = 0.02,
               eta: float = 0.0, clip_sample: Union[None, bool, float] = None, timestep_spacing: str = "leading",
               steps_offset: int = 0, set_alpha_to_one: bool = True, variance_type: str = "fixed_small",
               shift: float = 1.0, mu: Optional[float] = None,
               time_shift_type: str = "exponential") -> "SamplerSchedule":
        """A schedule without diffusers, with diffusers' defaults (linear betas 1e-4..0.02 over 1000 steps,
        "leading" spacing; "trailing" and "linspace" too).

        flow_euler reproduces ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)`` (``mu`` None), or
        with ``mu`` the same scheduler configured with ``use_dynamic_shifting=True`` and ``time_shift_type`` after
        ``set_timesteps(num_steps, mu=mu)``: the same float32 timesteps and sigmas (diffusers' own float32 and
        float64 steps are followed, not only its formulas). ``mu`` is named as diffusers names it; Flux and SD3
        pipelines derive it from the image sequence length (:meth:`dynamic_shift_mu`).

        Every argument's domain is checked, whether or not ``kind`` uses it (ValueError / TypeError naming it):
        num_train_timesteps >= 2; 1 <= num_steps <= num_train_timesteps (any num_steps >= 1 for flow_euler);
        beta_start and beta_end in (0, 1); eta >= 0; clip_sample None, a bool (diffusers' switch, True = range
        1.0) or a positive range; steps_offset >= 0 and keeping "leading" steps below num_train_timesteps;
        shift > 0 (flow_euler's static time shift); mu only for flow_euler and only with shift = 1 (dynamic
        shifting replaces the static shift), e^mu ("exponential") or mu ("linear") in [1e-6, 1e6];
        time_shift_type "exponential" or "linear", and "linear" only with mu."""
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if prediction not in PREDICTIONS[kind]:
            raise ValueError(f"prediction: {kind} takes {', '.join(PREDICTIONS[kind])}, got {prediction!r}")
        T = _int_in("num_train_timesteps", num_train_timesteps, 2, why=" (a noise schedule needs two timesteps)")
        if kind == "flow_euler":  # continuous time: any number of steps
            num_steps = _int_in("num_steps", num_steps, 1)
        else:
            num_steps = _int_in("num_steps", num_steps, 1, T, why=" (num_train_timesteps)")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule: expected linear, scaled_linear or squaredcos_cap_v2, got "
                             f"{beta_schedule!r}")
        beta_start, beta_end = _open_unit("beta_start", beta_start), _open_unit("beta_end", beta_end)
        eta = checks.number("eta", eta)
        if not 0 <= eta <= ETA_MAX:
            raise ValueError(f"eta: expected a value in [0, {ETA_MAX:g}], got {eta:g} (1 is DDPM's variance; far "
                             f"beyond, the step's variance overflows)")
        clip = _clip_range("clip_sample", clip_sample)
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing: expected leading, trailing or linspace, got {timestep_spacing!r}")
        steps_offset = _int_in("steps_offset", steps_offset, 0)
        if kind != "flow_euler" and timestep_spacing == "leading":
            first = (num_steps - 1) * (T // num_steps) + steps_offset
            if first >= T:
                raise ValueError(f"steps_offset: {steps_offset} puts the first of {num_steps} leading steps at "
                                 f"t = {first}, past the last training timestep {T - 1}")
        if not isinstance(set_alpha_to_one, bool):
            raise TypeError(f"set_alpha_to_one: expected a bool, got {type(set_alpha_to_one).__name__}")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type: {variance_type!r} is not supported (fixed_small, fixed_large)")
        shift = checks.number("shift", shift, positive=True)
        if not SHIFT_RANGE[0] <= shift <= SHIFT_RANGE[1]:
            raise ValueError(f"shift: expected a value in [{SHIFT_RANGE[0]:g}, {SHIFT_RANGE[1]:g}], got {shift:g} "
                             f"(beyond, 1 + (shift - 1) * sigma rounds to 0 or every shifted sigma to an end)")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type: expected exponential or linear, got {time_shift_type!r}")
        if mu is not None:
            if kind != "flow_euler":
                raise ValueError(f"mu: dynamic time shifting is flow_euler's; {kind} takes no mu")
            if shift != 1.0:
                raise ValueError(f"mu: dynamic shifting replaces the static shift (as diffusers ignores its shift "
                                 f"under use_dynamic_shifting); pass shift=1 with mu, got shift={shift:g}")
            mu = _mu(mu, time_shift_type)
        elif time_shift_type != "exponential":
            raise ValueError("time_shift_type: only dynamic shifting (mu) uses it; pass mu with "
                             f"time_shift_type={time_shift_type!r}")
        if kind == "flow_euler":
            sigmas, timesteps = _flow_sigmas(T, num_steps, shift, mu, time_shift_type)
            return cls._flow(sigmas, T, timesteps=timesteps)
        if timestep_spacing == "leading":
            ratio = T // num_steps
            steps = [i * ratio + steps_offset for i in range(num_steps)][::-1]
        elif timestep_spacing == "trailing":
            ratio = T / num_steps
            steps = [int(round(T - i * ratio)) - 1 for i in range(num_steps)]
        else:
            steps = [int(round(T - 1 - i * (T - 1) / (num_steps - 1))) if num_steps > 1 else T - 1
                     for i in range(num_steps)]
        alphas = _cumprod(_betas(beta_schedule, T, beta_start, beta_end))
        _check_alphas("beta_start, beta_end", alphas)
        final = 1.0 if set_alpha_to_one else alphas[0]
        return cls._discrete(kind, prediction, steps, alphas, T, eta, clip, variance_type, final)

    @classmethod
    def from_diffusers(cls, scheduler: Union["DDPMScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler"],
                       num_inference_steps: int, *, eta: float = 0.0,
                       mu: Optional[float] = None) -> "SamplerSchedule":
        """The schedule a configured ``DDPMScheduler``, ``DDIMScheduler`` or ``FlowMatchEulerDiscreteScheduler``
        steps through with ``num_inference_steps`` (the scheduler itself is not modified). ``eta`` is DDIM's (a
        ``step()`` argument in diffusers, so not part of the scheduler). ``mu`` is what diffusers'
        ``set_timesteps(num_inference_steps, mu=mu)`` takes: required by a FlowMatchEulerDiscreteScheduler
        configured with ``use_dynamic_shifting=True`` (the timesteps and sigmas are then that call's, exactly) and
        refused by every other scheduler (it would be ignored).

        Checked before the scheduler is touched: num_inference_steps >= 1 (and <= num_train_timesteps for the
        discrete schedulers), eta >= 0; then the scheduler's configuration: num_train_timesteps >= 2, a positive
        flow shift, mu given exactly when dynamic shifting is on (e^mu, or mu for ``time_shift_type="linear"``,
        in [1e-6, 1e6]), alphas_cumprod in (0, 1)."""
        name = type(scheduler).__name__
        if name not in ("DDPMScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler"):
            raise TypeError(f"scheduler: expected DDPMScheduler, DDIMScheduler or FlowMatchEulerDiscreteScheduler, "
                            f"got {name}")
        config = scheduler.config
        T = config.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 2:
            raise ValueError(f"scheduler: num_train_timesteps must be an int >= 2, got {T!r}")
        if name == "FlowMatchEulerDiscreteScheduler":
            num_inference_steps = _int_in("num_inference_steps", num_inference_steps, 1)
        else:
            num_inference_steps = _int_in("num_inference_steps", num_inference_steps, 1, T,
                                          why=" (the scheduler's num_train_timesteps)")
        eta = checks.number("eta", eta)
        if not 0 <= eta <= ETA_MAX:
            raise ValueError(f"eta: expected a value in [0, {ETA_MAX:g}], got {eta:g} (1 is DDPM's variance; far "
                             f"beyond, the step's variance overflows)")
        if getattr(config, "thresholding", False):
            raise ValueError(f"scheduler: {name} with thresholding=True is not supported (dynamic thresholding)")
        dynamic = name == "FlowMatchEulerDiscreteScheduler" and bool(getattr(config, "use_dynamic_shifting", False))
        if mu is not None and not dynamic:
            why = ("its config has use_dynamic_shifting=False, so set_timesteps would ignore mu; configure "
                   "use_dynamic_shifting=True or drop mu" if name == "FlowMatchEulerDiscreteScheduler"
                   else "only a FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=True takes mu")
            raise ValueError(f"mu: {name} takes no mu ({why})")
        if dynamic:
            if mu is None:
                raise ValueError("mu: this FlowMatchEulerDiscreteScheduler has use_dynamic_shifting=True, which "
                                 "needs mu (what set_timesteps(num_inference_steps, mu=mu) takes; Flux and SD3 "
                                 "derive it from the image sequence length, see SamplerSchedule.dynamic_shift_mu)")
            mu = _mu(mu, getattr(config, "time_shift_type", "exponential"))
        if name == "FlowMatchEulerDiscreteScheduler":
            if getattr(config, "stochastic_sampling", False):
                raise ValueError("scheduler: FlowMatchEulerDiscreteScheduler with stochastic_sampling=True is not "
                                 "supported")
            shift = getattr(config, "shift", 1.0)
            if not dynamic and not (isinstance(shift, (int, float)) and 0 < shift < float("inf")):
                raise ValueError(f"scheduler: shift must be a positive number, got {shift!r}")
            local = copy.deepcopy(scheduler)
            if dynamic:
                local.set_timesteps(num_inference_steps, mu=mu)
            else:
                local.set_timesteps(num_inference_steps)
            sigmas = [float(s) for s in local.sigmas.double()]
            if not all(0.0 <= s <= 1.0 for s in sigmas):
                raise ValueError(f"scheduler: its sigmas must lie in [0, 1], got [{min(sigmas)}, {max(sigmas)}]")
            return cls._flow(sigmas, T, timesteps=local.timesteps.clone())
        kind = "ddpm" if name == "DDPMScheduler" else "ddim"
        if config.prediction_type not in PREDICTIONS[kind]:
            raise ValueError(f"scheduler: prediction_type {config.prediction_type!r} is not supported")
        clip = None
        if config.clip_sample:
            clip = _clip_range("scheduler.config.clip_sample_range", config.clip_sample_range)
        local = copy.deepcopy(scheduler)
        local.set_timesteps(num_inference_steps)
        alphas = [float(a) for a in local.alphas_cumprod.double()]
        _check_alphas("scheduler", alphas)
        final = float(getattr(local, "final_alpha_cumprod", torch.tensor(1.0)))
        variance = getattr(config, "variance_type", "fixed_small")
        return cls._discrete(kind, config.prediction_type, [int(t) for t in local.timesteps], alphas,
                             T, eta, clip, variance, final, ddim_ratio=T // num_inference_steps)

    @classmethod
    def _discrete(cls, kind, prediction, steps, alphas, T, eta, clip, variance_type, final_alpha, ddim_ratio=None):
        """Arguments arrive checked by the builders."""
        if kind == "ddpm" and variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type: {variance_type!r} is not supported (fixed_small, fixed_large)")
        ratio = ddim_ratio or T // len(steps)
        rows = []
        for i, t in enumerate(steps):
            a_t = alphas[t]
            px, po = _x0(prediction, a_t)
            if kind == "ddpm":
                prev = steps[i + 1] if i + 1 < len(steps) else -1
                a_p = alphas[prev] if prev >= 0 else 1.0
                cur_alpha, cur_beta = a_t / a_p, 1.0 - a_t / a_p
                c0 = math.sqrt(a_p) * cur_beta / (1.0 - a_t)
                cs = math.sqrt(cur_alpha) * (1.0 - a_p) / (1.0 - a_t)
                var = max((1.0 - a_p) / (1.0 - a_t) * cur_beta, 1e-20) if variance_type == "fixed_small" else cur_beta
                sigma = math.sqrt(var) if t > 0 else 0.0
                cx, co, x0_weight = (cs, 0.0, c0) if clip is not None else (cs + c0 * px, c0 * po, 0.0)
            else:
                prev = t - ratio
                a_p = alphas[prev] if prev >= 0 else final_alpha
                qx, qo = _eps(prediction, a_t)
                variance = (1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p)
                sigma = eta * math.sqrt(variance)
                direction = math.sqrt(max(1.0 - a_p - sigma ** 2, 0.0))
                A = math.sqrt(a_p)
                if clip is not None:
                    cx, co, x0_weight = direction * qx, direction * qo, A
                else:
                    cx, co, x0_weight = A * px + direction * qx, A * po + direction * qo, 0.0
            rows.append([cx, co, px, po, x0_weight, sigma])
        return cls(kind, prediction, torch.tensor(steps, dtype=torch.int64), torch.tensor(rows, dtype=torch.float64),
                   clip=None if clip is None else float(clip), eta=eta, alphas_cumprod=list(alphas),
                   num_train_timesteps=T)

    @classmethod
    def _flow(cls, sigmas: Sequence[float], T: int, timesteps: torch.Tensor) -> "SamplerSchedule":
        """sigmas: S + 1 floats (float32 values, the last 0), timesteps [S] float32, as diffusers holds them: the
        step's dt = sigma_next - sigma is then exact in float64 and rounds to diffusers' float32 difference."""
        rows = [[1.0, sigmas[i + 1] - sigmas[i], 0.0, 0.0, 0.0, 0.0] for i in range(len(sigmas) - 1)]
        return cls("flow_euler", "velocity", timesteps, torch.tensor(rows, dtype=torch.float64),
                   num_train_timesteps=T)

    @staticmethod
    def dynamic_shift_mu(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096,
                         base_shift: float = 0.5, max_shift: float = 1.15) -> float:
        """The ``mu`` Flux and SD3 pipelines pass to a dynamically shifting FlowMatchEulerDiscreteScheduler: linear
        in the sequence length, ``base_shift`` at ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len``
        (the scheduler config's base_shift, max_shift, base_image_seq_len, max_image_seq_len; these defaults are
        its defaults), as diffusers' ``calculate_shift``. Longer sequences get a larger shift (more steps spent
        at high noise)."""
        image_seq_len = _int_in("image_seq_len", image_seq_len, 1)
        base_seq_len = _int_in("base_seq_len", base_seq_len, 1)
        max_seq_len = _int_in("max_seq_len", max_seq_len, 1)
        if max_seq_len == base_seq_len:
            raise ValueError(f"max_seq_len: must differ from base_seq_len = {base_seq_len} (the line through them "
                             f"gives mu)")
        base_shift, max_shift = checks.number("base_shift", base_shift), checks.number("max_shift", max_shift)
        m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
        b = base_shift - m * base_seq_len
        return image_seq_len * m + b


def _mu(mu: float, time_shift_type: str) -> float:
    """mu checked for the time shift it feeds: e^mu (exponential) or mu (linear) in SHIFT_RANGE, so that no sigma
    rounds to an end or divides 0 by 0."""
    mu = checks.number("mu", mu)
    if time_shift_type == "linear":
        if not SHIFT_RANGE[0] <= mu <= SHIFT_RANGE[1]:
            raise ValueError(f"mu: the linear time shift needs mu in [{SHIFT_RANGE[0]:g}, {SHIFT_RANGE[1]:g}], "
                             f"got {mu:g}")
    elif not math.log(SHIFT_RANGE[0]) <= mu <= math.log(SHIFT_RANGE[1]):
        raise ValueError(f"mu: the exponential time shift needs e^mu in [{SHIFT_RANGE[0]:g}, {SHIFT_RANGE[1]:g}] "
                         f"(mu in [{math.log(SHIFT_RANGE[0]):.4g}, {math.log(SHIFT_RANGE[1]):.4g}]), got {mu:g}")
    return mu


def _flow_sigmas(T: int, num_steps: int, shift: float, mu: Optional[float],
                 time_shift_type: str) -> Tuple[List[float], torch.Tensor]:
    """FlowMatchEulerDiscreteScheduler's sigmas (S + 1 floats, float32 values, the last 0) and timesteps [S]
    float32 after ``set_timesteps(num_steps[, mu=mu])``, computed in the precisions diffusers uses, so that they
    agree bit for bit: the construction sigmas in float32 torch, the inference grid and its shift in float64 (numpy
    there, Python floats here: the same IEEE operations in the same order), one rounding to float32, and the
    timesteps as float32 sigma * T."""
    ends = torch.tensor([float(T), 1.0], dtype=torch.float32) / T  # the first and last training sigmas
    if mu is None:  # a static scheduler shifts its training sigmas at construction; a dynamic one does not
        ends = shift * ends / (1 + (shift - 1) * ends)
    start, stop = float(ends[0]) * T, float(ends[1]) * T
    if num_steps > 1:  # numpy.linspace: start + i * step, the last one exactly stop
        step = (stop - start) / (num_steps - 1)
        grid = [i * step + start for i in range(num_steps - 1)] + [stop]
    else:
        grid = [start]
    sigmas = [t / T for t in grid]
    if mu is None:
        sigmas = [shift * s / (1 + (shift - 1) * s) for s in sigmas]
    elif time_shift_type == "exponential":
        e = math.exp(mu)
        sigmas = [e / (e + (1 / s - 1) ** 1.0) for s in sigmas]
    else:
        sigmas = [mu / (mu + (1 / s - 1) ** 1.0) for s in sigmas]
    sigmas32 = torch.tensor(sigmas, dtype=torch.float64).to(torch.float32)
    return [float(s) for s in sigmas32] + [0.0], sigmas32 * T


__all__ = ["SamplerSchedule", "KINDS", "PREDICTIONS", "COLUMNS"]
