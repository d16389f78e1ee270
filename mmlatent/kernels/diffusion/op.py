"""Public ops of the diffusion family: ``denoise_step_`` (one sampler step for every row), ``layer_norm_modulate``
(adaLN) and ``diffusion_mse`` (the denoiser's training loss).

Each public function validates and documents; a ``torch.library`` custom op (fake implementation registered, and
the autograd formula where the op is differentiable) wraps the computation; inside it dispatch chooses once
between the Triton kernels (``triton_kernels.py``) and the torch implementation (``torch_impl.py``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .. import checks
from ..dispatch import (OpDispatch, Reasons, native_op_reasons, torch_reasons, triton_float_reasons, triton_or_torch,
                        triton_reasons, triton_row_reasons)
from ..limits import MODULATION_MAX_WIDTH
from . import torch_impl
from .schedule import SamplerSchedule

TARGETS = ("epsilon", "v_prediction", "sample", "velocity")
# Row weights are real: masks (bool, integer) or floats; a complex weight has no order, so no meaningful mean.
WEIGHT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + checks.FLOAT_DTYPES


def _triton_step_reasons(x, model_out, noise, **_) -> Reasons:
    reasons = triton_reasons(x.device)
    if x.stride(1) != 1 or model_out.stride(1) != 1 or (noise is not None and noise.stride(1) != 1):
        reasons.append("x, model_out and noise need unit stride along C")
    if model_out.dtype == torch.float64:
        reasons.append("float64 model outputs are read exactly only by the torch backend")
    return reasons


def _native_step_reasons(x, **_) -> Reasons:
    reasons = native_op_reasons(x.device, "denoise_step_native")
    if x.shape[1] > 1 and x.stride(1) != 1:
        reasons.append("x needs unit stride along C, and it is updated in place")
    return reasons


# auto on CPU: native first, 9.8x faster than the torch backend at R4096 C512 with CFG, noise and ragged steps
# (1.66 against 16.3 ms, benches/results/cpu-2core/kernels-denoise-step.md; across runs the torch backend's
# temporaries cost it 3.8 to 19.5 ms, so never less than 2.7x). On CUDA Triton first: 0.404 against the CUDA kernel's
# 0.455 ms at R16384 C3584 on an H200, where a step costs most (at R256 the CUDA kernel led, 0.166 against 0.209 ms;
# benches/results/nvidia-h200/kernels-denoise-step.md).
DENOISE_STEP = OpDispatch("denoise_step_", {"native": _native_step_reasons, "triton": _triton_step_reasons,
                                            "torch": torch_reasons},
                          device_auto_order={"cuda": ("triton", "native", "torch")})
LAYER_NORM_MODULATE = triton_or_torch("layer_norm_modulate", triton_row_reasons(MODULATION_MAX_WIDTH))
DIFFUSION_MSE = triton_or_torch("diffusion_mse", triton_float_reasons)


def _triton_kernels():
    from . import triton_kernels  # imports triton: only once a Triton backend was chosen
    return triton_kernels


# ------------------------------------------------------------------------------------------------ denoising step

class PhiloxNoise:
    """A stream of Gaussian noise that the ``denoise_step_`` kernels draw themselves, from a device-resident
    (seed, offset) pair: no [R, C] noise tensor is written and read back, and a CUDA graph that captured a step
    draws fresh noise at every replay, because each step advances the offset on the device.

    Element (r, c) of a step's draw is Triton's ``tl.randn(seed, offset + r * C + c)`` (Philox-4x32, 10 rounds,
    Box-Muller), the same numbers on every backend up to the rounding of log / cos (csrc/philox.h; the torch
    backend computes them with ``torch_impl.philox_normal``); the offset then advances by R * C.

    Args:
        seed: a non-negative int below 2 ** 63.
        device: where the state lives: the device of the ``x`` it will update.

    Example::

        >>> noise = PhiloxNoise(0)
        >>> schedule = SamplerSchedule.create("ddpm", 10, "epsilon")
        >>> x = torch.randn(4, 8)
        >>> _ = denoise_step_(x, torch.zeros(4, 8), 0, schedule, noise=noise)
        >>> noise.offset
        32
    """

    def __init__(self, seed: int, device: Union[str, torch.device, None] = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
            raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
        self.state = torch.tensor([seed, 0], dtype=torch.int64, device=device)

    @property
    def seed(self) -> int:
        return int(self.state[0])

    @property
    def offset(self) -> int:
        """The stream position of the next draw (a host synchronisation)."""
        return int(self.state[1])

    def advance_(self, count: int) -> None:
        """Moves the stream past ``count`` draws, on the device (no host synchronisation; captured in a graph)."""
        self.state[1:].add_(count)

    def __repr__(self) -> str:
        return f"PhiloxNoise(state on {self.state.device})"


@torch.library.custom_op("mmlatent::denoise_step_", mutates_args=("x",))
def _denoise_step_op(x: torch.Tensor, model_out: torch.Tensor, table: torch.Tensor, step: int,
                     steps: Optional[torch.Tensor], clip: Optional[float], noise: Optional[torch.Tensor],
                     cfg_scale: Optional[float], philox_state: Optional[torch.Tensor] = None) -> None:
    """``steps`` [R] (each row's step) or None (every row at ``step``); at most one of ``noise`` and
    ``philox_state`` (a PhiloxNoise's state, read only: the caller advances it); the public function checked all."""
    backend = DENOISE_STEP.choose(x=x, model_out=model_out, noise=noise)
    if backend == "native":
        torch.ops.mmlatent.denoise_step_native(x, model_out, table, step, steps, clip, noise, cfg_scale,
                                               philox_state)
        return
    if backend == "triton":
        _triton_kernels().denoise_step(x, model_out, table, step if steps is None else steps, clip, noise,
                                       cfg_scale, philox_state)
        return
    if philox_state is not None:
        noise = torch_impl.philox_normal(philox_state, *x.shape)
    out = torch_impl.guided_output(model_out, x.shape[0], cfg_scale)
    coefficients = table[step:step + 1] if steps is None else table.index_select(0, steps.long())
    torch_impl.denoise_step_(x, out, coefficients, clip, noise)


@_denoise_step_op.register_fake
def _(x, model_out, table, step, steps, clip, noise, cfg_scale, philox_state=None) -> None:
    return None


def register_native_fake() -> None:
    """Fake (meta) implementation of the C++ op, once mmlatent._C has registered it."""
    if hasattr(torch.ops.mmlatent, "denoise_step_native"):
        torch.library.register_fake("mmlatent::denoise_step_native", lambda *args: None)


def denoise_step_(x: torch.Tensor, model_out: torch.Tensor, step: Union[int, torch.Tensor],
                  schedule: SamplerSchedule, *, noise: Union[torch.Tensor, PhiloxNoise, None] = None,
                  generator: Optional[torch.Generator] = None,
                  cfg_scale: Optional[float] = None) -> torch.Tensor:
    """One sampler step for every row, in place.

    Args:
        x: [R, C] float32 state, updated in place; every element must have its own memory (an ``expand``-ed
            state raises ValueError before anything is written). R = 0 or C = 0 is a no-op, as are meta tensors.
        model_out: [R, C] (any float dtype), or [2R, C] with ``cfg_scale``: conditional rows first, then the
            unconditional ones; the guided output is uncond + cfg_scale * (cond - uncond).
        step: an int, or an [R] int32/int64 tensor (each row at its own step: ragged segments in one call), in
            [0, schedule.num_steps), indexing the schedule in sampling order.
        schedule: a :class:`SamplerSchedule`.
        noise: [R, C] explicit noise for stochastic steps; else drawn with ``torch.randn(generator=generator)`` on
            x's device, with no host synchronisation. On CUDA, PyTorch's Philox generator keeps its seed and offset
            in device tensors while a CUDA graph is captured, so a captured step draws fresh noise at every replay
            (a non-default generator must be registered with ``CUDAGraph.register_generator_state``, as
            ``LatentDiffusionHead.sample`` does). A :class:`PhiloxNoise` instead has the kernel draw the noise
            itself from the stream's device-resident seed and offset (then advanced by R * C), so no noise tensor
            is written or read; ``generator`` must then be None.

    Returns:
        ``x``. Given the same model outputs and noise, a trajectory equals the diffusers scheduler's ``step()``
        loop (tested within 1e-5 relative).

    Example::

        >>> schedule = SamplerSchedule.create("ddim", 10, "epsilon")
        >>> x = torch.randn(4, 8)
        >>> for step in range(schedule.num_steps):
        ...     denoise_step_(x, torch.zeros(4, 8), step, schedule)  # a model's output in place of zeros
    """
    if not isinstance(schedule, SamplerSchedule):
        raise TypeError(f"schedule: expected a SamplerSchedule, got {type(schedule).__name__}")
    checks.tensor("x", x, dims=2, dtypes=(torch.float32,))
    checks.writable("x", x)
    R, C = x.shape
    checks.tensor("model_out", model_out, dims=2, dtypes=checks.FLOAT_DTYPES, device=x.device)
    if cfg_scale is None:
        checks.shape("model_out", model_out, (R, C), "[R, C] like x")
    else:
        cfg_scale = checks.number("cfg_scale", cfg_scale)
        if tuple(model_out.shape) != (2 * R, C):
            raise ValueError(f"model_out: with cfg_scale, expected [2R, C] = [{2 * R}, {C}] (conditional rows, then "
                             f"unconditional rows), got {tuple(model_out.shape)}")
    S = schedule.num_steps
    table = schedule.device_table(x.device)
    if isinstance(step, torch.Tensor):
        checks.tensor("step", step, dims=1, dtypes=(torch.int32, torch.int64), device=x.device)
        checks.shape("step", step, (R,), "[R]")
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and not torch.compiler.is_compiling() and not x.is_meta and R:
            lo, hi = (int(v) for v in torch.aminmax(step))
            if lo < 0 or hi >= S:
                raise ValueError(f"step: entries must be in [0, {S}), found values in [{lo}, {hi}]")
        stochastic = schedule.stochastic
    else:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step: expected an int in [0, {S}) or an [R] int tensor, got {type(step).__name__}")
        if not 0 <= step < S:
            raise ValueError(f"step: expected an int in [0, {S}) or an [R] tensor, got {step!r}")
        stochastic = bool(schedule.table[step, 5] != 0)
    stream = noise if isinstance(noise, PhiloxNoise) else None
    if stream is not None:
        if generator is not None:
            raise ValueError("generator: a PhiloxNoise stream draws its own noise; pass one or the other")
        if stream.state.device != x.device:
            raise ValueError(f"noise: the PhiloxNoise state is on {stream.state.device}, x on {x.device}; create "
                             f"it with PhiloxNoise(seed, device=x.device)")
        noise = None
    elif noise is not None:
        checks.tensor("noise", noise, dims=2, dtypes=checks.FLOAT_DTYPES, device=x.device)
        checks.shape("noise", noise, (R, C), "[R, C] like x")
    if x.is_meta or R == 0 or C == 0:  # shapes only, or nothing to update: no kernel, no noise drawn
        return x
    if noise is None and stream is None and stochastic:  # on x's device: capturable in a CUDA graph
        noise = torch.randn(R, C, generator=generator, device=x.device, dtype=torch.float32)
    noise = noise if stochastic else None
    philox_state = stream.state if stream is not None and stochastic else None
    steps = step if isinstance(step, torch.Tensor) else None
    _denoise_step_op(x, model_out, table, 0 if steps is not None else step, steps, schedule.clip, noise, cfg_scale,
                     philox_state)
    if philox_state is not None:
        stream.advance_(R * C)
    return x


# ------------------------------------------------------------------------------------------- adaLN modulation

def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("mmlatent::layer_norm_modulate", mutates_args=())
def _modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if LAYER_NORM_MODULATE.choose(device=x.device, dtype=x.dtype, width=x.shape[1]) == "triton":
        return _triton_kernels().layer_norm_modulate_forward(_rows(x), _rows(shift), _rows(scale), eps)
    return torch_impl.layer_norm_modulate_forward(x, shift, scale, eps)


@_modulate_op.register_fake
def _(x, shift, scale, eps):
    stats = x.new_empty(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("mmlatent::layer_norm_modulate_backward", mutates_args=())
def _modulate_backward_op(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if LAYER_NORM_MODULATE.choose(device=x.device, dtype=x.dtype, width=x.shape[1]) == "triton":
        return _triton_kernels().layer_norm_modulate_backward(_rows(grad_y), _rows(x), _rows(scale), mean, rstd)
    return torch_impl.layer_norm_modulate_backward(grad_y, x, scale, mean, rstd)


@_modulate_backward_op.register_fake
def _(grad_y, x, scale, mean, rstd):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(scale, memory_format=torch.contiguous_format))


def _modulate_setup(ctx, inputs, output):
    x, _shift, scale, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _modulate_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    grad_x, grad_scale = _modulate_backward_op(grad_y, x, scale, mean, rstd)
    return grad_x, grad_y, grad_scale, None


_modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *,
                        eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` over the last dimension, LayerNorm without affine parameters.

    Args:
        x: [..., W] float16/bfloat16/float32/float64 activations.
        shift, scale: the shape and dtype of x; any strides along the leading dimensions (they are usually
            column slices of one modulation GEMM's output), unit stride along W for the kernel's fast path.
        eps: added to the variance.

    Returns:
        [..., W] in x's dtype. Statistics and arithmetic are float32 (float64 for float64 inputs); the fused
        kernel rounds once, so its error is at most the unfused torch expression's. Empty inputs (no rows, or
        W = 0) give an empty result without a kernel launch; meta tensors give a meta result.

    Backends: ``triton`` (one program per row, forward and backward) and ``torch`` (the same formulas in torch);
    either way the op is ``mmlatent::layer_norm_modulate`` with its registered backward, so torch.compile traces
    it. Rows wider than the kernel's one tile run on the torch backend.

    Example::

        >>> x, shift, scale = torch.randn(2, 5, 64), torch.zeros(2, 5, 64), torch.zeros(2, 5, 64)
        >>> layer_norm_modulate(x, shift, scale).shape
        torch.Size([2, 5, 64])
    """
    checks.tensor("x", x, dtypes=checks.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension [..., W], got a scalar")
    for name, value in (("shift", shift), ("scale", scale)):
        checks.tensor(name, value, device=x.device)
        checks.same_dtype(name, value, "x", x)
        if value.shape != x.shape:
            raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}, got {tuple(value.shape)} "
                             f"(broadcast it explicitly with .expand if that is meant)")
    eps = checks.number("eps", eps, positive=True)
    width = x.shape[-1]
    leading = x.shape[:-1]
    rows = math.prod(leading)  # not -1: with W = 0 (or no rows) the row count cannot be inferred
    y, _mean, _rstd = _modulate_op(x.reshape(rows, width), shift.reshape(rows, width), scale.reshape(rows, width),
                                   eps)
    return y.view(*leading, width)


# ------------------------------------------------------------------------------------------------ diffusion loss

def target_coefficients(prediction: str, alphas_cumprod: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[R] float32 (a, b) with target = a * x0 + b * noise for ``prediction`` at each row's alpha-bar."""
    if prediction == "velocity":  # flow matching: x_t = (1 - t) x0 + t noise, target noise - x0
        ones = torch.ones_like(alphas_cumprod, dtype=torch.float32)
        return -ones, ones
    a = alphas_cumprod.to(torch.float32)
    if prediction == "epsilon":
        return torch.zeros_like(a), torch.ones_like(a)
    if prediction == "sample":
        return torch.ones_like(a), torch.zeros_like(a)
    return -(1 - a).sqrt(), a.sqrt()  # v = sqrt(a) noise - sqrt(1 - a) x0


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("mmlatent::diffusion_mse", mutates_args=())
def _mse_op(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, goal_x0: torch.Tensor,
            goal_noise: torch.Tensor, coef: torch.Tensor, write_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(pred.dtype, x0.dtype)
    if DIFFUSION_MSE.choose(device=pred.device, dtype=dtype) == "triton":
        row_error, grad = _triton_kernels().diffusion_mse_rows(_unit_stride(pred), _unit_stride(x0),
                                                               _unit_stride(noise), goal_x0, goal_noise, coef,
                                                               write_grad)
    else:
        row_error, grad = torch_impl.diffusion_mse_rows(pred, x0, noise, goal_x0, goal_noise, coef, write_grad)
    return (coef * row_error).sum(), grad if grad is not None else pred.new_empty(0)


@_mse_op.register_fake
def _(pred, x0, noise, goal_x0, goal_noise, coef, write_grad):
    grad_dtype = torch.promote_types(pred.dtype, x0.dtype)
    grad = pred.new_empty(pred.shape, dtype=grad_dtype) if write_grad else pred.new_empty(0)
    return pred.new_empty((), dtype=torch.float32), grad


def _mse_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], inputs[3])
    ctx.pred_dtype, ctx.x0_dtype = inputs[0].dtype, inputs[1].dtype


def _mse_backward(ctx, grad_loss, _grad_of_grad):
    grad_pred, goal_x0 = ctx.saved_tensors  # written by the forward: it ran with write_grad
    g = grad_pred.to(torch.float32) * grad_loss.to(torch.float32)
    grad_x0 = (-goal_x0[:, None] * g).to(ctx.x0_dtype) if ctx.needs_input_grad[1] else None
    return g.to(ctx.pred_dtype), grad_x0, None, None, None, None, None


_mse_op.register_autograd(_mse_backward, setup_context=_mse_setup)


def diffusion_mse(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                  prediction: str, *, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error of a denoiser's prediction against its training target, averaged over rows.

    Args:
        pred: [R, C] the prediction (any float dtype; differentiable).
        x0: [R, C] the clean samples (differentiable through the target: v and sample targets depend on it).
        noise: [R, C] the noise that was added.
        alphas_cumprod: [R] each row's alpha-bar at its timestep (for "velocity", any [R] tensor: unused).
        prediction: the target: "epsilon" (noise), "v_prediction" (sqrt(a) noise - sqrt(1 - a) x0), "sample" (x0)
            or "velocity" (noise - x0, flow matching).
        weights: [R] row weights: float, or bool / integer masks (complex: TypeError); the loss is
            sum(w * err) / max(sum(w), 1), so all-masked gives 0. None: the plain mean over rows.

    Returns:
        A float32 scalar (0 for R = 0). Errors are float32 whatever the input dtypes. Meta tensors give a meta
        scalar.

    Backends: ``triton`` (one pass per row: target in registers, row error and gradient written together) and
    ``torch`` (the same formulas in torch); either way ``mmlatent::diffusion_mse`` computes the gradient over
    ``pred`` in the forward pass when one is needed, and its backward only scales it.

    Example::

        >>> pred, x0, noise = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
        >>> diffusion_mse(pred, x0, noise, torch.full((3,), 0.5), "epsilon")  # a float32 scalar
    """
    if prediction not in TARGETS:
        raise ValueError(f"prediction: expected one of {', '.join(TARGETS)}, got {prediction!r}")
    checks.tensor("pred", pred, dims=2, dtypes=checks.FLOAT_DTYPES)
    R, C = pred.shape
    if C == 0:
        raise ValueError("pred: expected at least one column, got shape " + str(tuple(pred.shape)))
    for name, value in (("x0", x0), ("noise", noise)):
        checks.tensor(name, value, dims=2, dtypes=checks.FLOAT_DTYPES, device=pred.device)
        checks.shape(name, value, (R, C), "[R, C] like pred")
    checks.tensor("alphas_cumprod", alphas_cumprod, dims=1, dtypes=checks.FLOAT_DTYPES, device=pred.device)
    checks.shape("alphas_cumprod", alphas_cumprod, (R,), "[R]")
    goal_x0, goal_noise = target_coefficients(prediction, alphas_cumprod)
    if weights is None:
        coef = torch.full((R,), 1.0 / max(R, 1), device=pred.device, dtype=torch.float32)
    else:
        checks.tensor("weights", weights, dims=1, dtypes=WEIGHT_DTYPES, device=pred.device)
        checks.shape("weights", weights, (R,), "[R]")
        w = weights.to(torch.float32)
        coef = w / w.sum().clamp_min(1.0)
    wants_grad = torch.is_grad_enabled() and (pred.requires_grad or x0.requires_grad)
    loss, _grad = _mse_op(pred, x0, noise, goal_x0, goal_noise, coef, wants_grad)
    return loss


__all__ = ["denoise_step_", "PhiloxNoise", "layer_norm_modulate", "diffusion_mse", "target_coefficients", "TARGETS",
           "DENOISE_STEP", "LAYER_NORM_MODULATE", "DIFFUSION_MSE"]
