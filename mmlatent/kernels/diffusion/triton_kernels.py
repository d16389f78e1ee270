"""Triton kernels of the diffusion family, each one elementwise or one-row-per-program pass:

- ``_denoise_step``: one batched denoising step: classifier-free guidance, the x0 clamp, the affine update and the
  noise term, each row reading its own step's coefficients from the schedule's device table.
- ``_layer_norm_modulate_fwd`` / ``_bwd``: adaLN ``LayerNorm(x) * (1 + scale) + shift`` (no affine). One program
  per row holds the whole row in registers: the forward computes the statistics in float32 with two passes over
  registers (no E[x^2] - E[x]^2 cancellation), writes y once and keeps (mean, rstd) per row for the backward; the
  backward writes dx and dscale in one pass (dshift is dy itself). Rounding to the output dtype happens once, where
  the unfused torch expression rounds after each of its four ops.
- ``_diffusion_mse_rows``: per row, the target (a per-row combination of x0 and the noise, which covers epsilon,
  v, sample and flow-velocity targets) is formed in registers, the squared error summed, and the gradient of the
  loss over the prediction written in the same pass. Neither the target nor the difference is ever stored.

Same contracts as the functions of ``torch_impl.py``. Each kernel's compile-check cases follow it.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from ..compile_cases import CompileCase, pointers
from ..limits import MODULATION_MAX_WIDTH, next_power_of_2, triton_interpreting
from ..triton_numerics import round_to_bf16_grid

# ------------------------------------------------------------------------------------------------ denoising step

STEP_CONFIGS = {"c1024": dict(BLOCK_C=1024, num_warps=4)}
_INTERPRETER_BLOCK_C = 128
NUM_COEFFICIENTS = 6


# A sampling loop passes step = 0..S-1: unspecialised, those are one compiled kernel (Triton would otherwise compile
# separate variants for step == 1 and steps divisible by 16).
@triton.jit(do_not_specialize=["step_scalar"])
def _denoise_step(X, Out, Noise, Table, Steps, PhiloxState, C, R, stride_x, stride_o, stride_n, step_scalar,
                  cfg_scale, clip, PER_ROW_STEP: tl.constexpr, HAS_CFG: tl.constexpr, HAS_CLIP: tl.constexpr,
                  HAS_NOISE: tl.constexpr, HAS_PHILOX: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = cols < C
    if PER_ROW_STEP:
        step = tl.load(Steps + row).to(tl.int64)
    else:
        step = step_scalar
    coef = Table + step * 6
    cx = tl.load(coef)
    co = tl.load(coef + 1)
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0)
    out = tl.load(Out + row * stride_o + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_CFG:  # rows R.. are the unconditional outputs of rows 0..
        uncond = tl.load(Out + (row + R) * stride_o + cols, mask=inside, other=0.0).to(tl.float32)
        out = uncond + cfg_scale * (out - uncond)
    new = cx * x + co * out
    if HAS_CLIP:
        x0 = tl.load(coef + 2) * x + tl.load(coef + 3) * out
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
        new += tl.load(coef + 4) * x0
    if HAS_NOISE:
        new += tl.load(coef + 5) * tl.load(Noise + row * stride_n + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_PHILOX:  # element (row, col) of the draw at the stream's device-resident (seed, offset): csrc/philox.h
        position = tl.load(PhiloxState + 1) + row * C + cols.to(tl.int64)
        new += tl.load(coef + 5) * tl.randn(tl.load(PhiloxState), position)
    tl.store(X + row * stride_x + cols, new, mask=inside)


def denoise_step(x: torch.Tensor, model_out: torch.Tensor, table: torch.Tensor, steps: Union[int, torch.Tensor],
                 clip: Optional[float], noise: Optional[torch.Tensor], cfg_scale: Optional[float] = None,
                 philox_state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [R, C] float32 (unit stride along C) updated in place; table [S, 6] float32 on x's device; steps an
    int or an [R] int tensor; model_out [R, C] or [2R, C] with cfg_scale; noise [R, C] or None; philox_state
    int64 [2] (seed, offset) on x's device to draw the noise in the kernel, or None."""
    R, C = x.shape
    if R == 0 or C == 0:
        return x
    per_row = isinstance(steps, torch.Tensor)
    cfg = STEP_CONFIGS["c1024"]
    block = min(_INTERPRETER_BLOCK_C, next_power_of_2(C)) if triton_interpreting() else cfg["BLOCK_C"]
    grid = (R, triton.cdiv(C, block))
    _denoise_step[grid](
        x, model_out, noise if noise is not None else x, table, steps if per_row else table,
        philox_state if philox_state is not None else table, C, R, x.stride(0), model_out.stride(0),
        noise.stride(0) if noise is not None else 0, 0 if per_row else int(steps), float(cfg_scale or 0.0),
        float(clip or 0.0), PER_ROW_STEP=per_row, HAS_CFG=cfg_scale is not None, HAS_CLIP=clip is not None,
        HAS_NOISE=noise is not None, HAS_PHILOX=philox_state is not None, BLOCK_C=block, num_warps=cfg["num_warps"])
    return x


def _denoise_step_cases() -> Iterator[CompileCase]:
    cfg = STEP_CONFIGS["c1024"]
    for out_dtype, per_row, cfg_on, clip, noise, philox in (("bf16", True, True, True, True, False),
                                                            ("bf16", True, True, True, False, True),
                                                            ("fp32", False, False, False, False, False)):
        types = {"X": "*fp32", "Out": f"*{out_dtype}", "Noise": "*fp32", "Table": "*fp32", "Steps": "*i32",
                 "PhiloxState": "*i64", "cfg_scale": "fp32", "clip": "fp32"}
        label = ("ragged+cfg+clip+" + ("philox" if philox else "noise")) if per_row else "plain"
        yield CompileCase(f"denoise_step[c1024] out={out_dtype} {label}", _denoise_step, types,
                          dict(PER_ROW_STEP=per_row, HAS_CFG=cfg_on, HAS_CLIP=clip, HAS_NOISE=noise,
                               HAS_PHILOX=philox, BLOCK_C=cfg["BLOCK_C"]),
                          num_warps=cfg["num_warps"], aligned=pointers(types) + ("stride_x", "stride_o", "stride_n"))


# ------------------------------------------------------------------------------------------- adaLN modulation

# The row is one tile: the widest config is MODULATION_MAX_WIDTH (wider rows go to the torch backend).
# compile_check proves each compiles for sm_90a without spills, forward and backward.
MODULATION_CONFIGS = {"w1024": dict(BLOCK_W=1024, num_warps=4), "w4096": dict(BLOCK_W=4096, num_warps=8),
                      "w8192": dict(BLOCK_W=MODULATION_MAX_WIDTH, num_warps=16)}


@triton.jit
def _layer_norm_modulate_fwd(X, Shift, Scale, Y, Mean, Rstd, W, stride_x, stride_shift, stride_scale, stride_y, eps,
                             BLOCK_W: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    inside = cols < W
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / W
    centered = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / W + eps)
    shift = tl.load(Shift + row * stride_shift + cols, mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(Scale + row * stride_scale + cols, mask=inside, other=0.0).to(tl.float32)
    y = centered * rstd * (1.0 + scale) + shift
    if EMULATE_BF16_RTNE:
        y = round_to_bf16_grid(y)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_modulate_bwd(DY, X, Scale, Mean, Rstd, DX, DScale, W, stride_dy, stride_x, stride_scale, stride_dx,
                             stride_dscale, BLOCK_W: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    inside = cols < W
    dy = tl.load(DY + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(Scale + row * stride_scale + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.load(Rstd + row)
    x_hat = tl.where(inside, (x - tl.load(Mean + row)) * rstd, 0.0)
    d_scale = dy * x_hat
    d_x_hat = dy * (1.0 + scale)  # zero outside the row: dy is
    mean_d = tl.sum(d_x_hat, axis=0) / W
    mean_d_x_hat = tl.sum(d_x_hat * x_hat, axis=0) / W
    dx = (d_x_hat - mean_d - x_hat * mean_d_x_hat) * rstd
    if EMULATE_BF16_RTNE:
        d_scale = round_to_bf16_grid(d_scale)
        dx = round_to_bf16_grid(dx)
    tl.store(DScale + row * stride_dscale + cols, d_scale.to(DScale.dtype.element_ty), mask=inside)
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=inside)


def _launch_options(W: int, dtype: torch.dtype) -> dict:
    block = next_power_of_2(W)
    cfg = next(c for c in MODULATION_CONFIGS.values() if block <= c["BLOCK_W"])
    return dict(BLOCK_W=block, EMULATE_BF16_RTNE=triton_interpreting() and dtype == torch.bfloat16,
                num_warps=cfg["num_warps"])


def layer_norm_modulate_forward(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, shift, scale [N, W] of one dtype, unit stride along W, W <= MODULATION_MAX_WIDTH -> (y [N, W] in that
    dtype, mean [N] float32, rstd [N] float32)."""
    N, W = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean = torch.empty(N, device=x.device, dtype=torch.float32)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    if N and W:
        _layer_norm_modulate_fwd[(N,)](x, shift, scale, y, mean, rstd, W, x.stride(0), shift.stride(0),
                                       scale.stride(0), y.stride(0), float(eps), **_launch_options(W, x.dtype))
    return y, mean, rstd


def layer_norm_modulate_backward(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                                 rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_x [N, W] in x's dtype, grad_scale [N, W] in scale's dtype); grad_shift is grad_y."""
    N, W = x.shape
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_scale = torch.empty_like(scale, memory_format=torch.contiguous_format)
    if N and W:
        _layer_norm_modulate_bwd[(N,)](grad_y, x, scale, mean, rstd, grad_x, grad_scale, W, grad_y.stride(0),
                                       x.stride(0), scale.stride(0), grad_x.stride(0), grad_scale.stride(0),
                                       **_launch_options(W, x.dtype))
    return grad_x, grad_scale


def _modulation_cases() -> Iterator[CompileCase]:
    for cfg_name, cfg in MODULATION_CONFIGS.items():
        for dtype in ("bf16", "fp32") if cfg_name == "w1024" else ("bf16",):
            ptr = f"*{dtype}"
            forward = {"X": ptr, "Shift": ptr, "Scale": ptr, "Y": ptr, "Mean": "*fp32", "Rstd": "*fp32",
                       "eps": "fp32"}
            backward = {"DY": ptr, "X": ptr, "Scale": ptr, "Mean": "*fp32", "Rstd": "*fp32", "DX": ptr,
                        "DScale": ptr}
            for direction, kernel, types in (("fwd", _layer_norm_modulate_fwd, forward),
                                             ("bwd", _layer_norm_modulate_bwd, backward)):
                yield CompileCase(f"layer_norm_modulate_{direction}[{cfg_name}] {dtype}", kernel, types,
                                  dict(BLOCK_W=cfg["BLOCK_W"], EMULATE_BF16_RTNE=False),
                                  num_warps=cfg["num_warps"], aligned=pointers(types),
                                  aligned_prefixes=("stride",))


# --------------------------------------------------------------------------------------------- diffusion loss

MSE_CONFIGS = {"c4096": dict(BLOCK_C=4096, num_warps=8)}  # C=3584 (a 7B VLM's hidden size) is one tile


@triton.jit
def _diffusion_mse_rows(Pred, X0, Noise, GoalX0, GoalNoise, Coef, RowError, Grad, C, stride_p, stride_x, stride_n,
                        stride_g, WRITE_GRAD: tl.constexpr, BLOCK_C: tl.constexpr,
                        EMULATE_BF16_RTNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    gx = tl.load(GoalX0 + row)
    gn = tl.load(GoalNoise + row)
    grad_scale = 2.0 * tl.load(Coef + row) / C
    total = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        inside = cols < C
        pred = tl.load(Pred + row * stride_p + cols, mask=inside, other=0.0).to(tl.float32)
        x0 = tl.load(X0 + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        noise = tl.load(Noise + row * stride_n + cols, mask=inside, other=0.0).to(tl.float32)
        diff = pred - (gx * x0 + gn * noise)  # zero outside the row
        total += diff * diff
        if WRITE_GRAD:
            grad = grad_scale * diff
            if EMULATE_BF16_RTNE:
                grad = round_to_bf16_grid(grad)
            tl.store(Grad + row * stride_g + cols, grad.to(Grad.dtype.element_ty), mask=inside)
    tl.store(RowError + row, tl.sum(total, axis=0) / C)


def diffusion_mse_rows(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, goal_x0: torch.Tensor,
                       goal_noise: torch.Tensor, coef: torch.Tensor,
                       write_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """pred, x0, noise [R, C] with unit stride along C; goal_x0, goal_noise, coef [R] float32 ->
    (row errors [R] float32, d loss / d pred [R, C] or None). The gradient is stored in the wider of pred's and x0's
    dtypes: it also gives x0's gradient, which must not inherit a 16-bit prediction's rounding."""
    R, C = pred.shape
    row_error = torch.empty(R, device=pred.device, dtype=torch.float32)
    grad_dtype = torch.promote_types(pred.dtype, x0.dtype)
    grad = torch.empty(R, C, device=pred.device, dtype=grad_dtype) if write_grad else None
    if R == 0:
        return row_error, grad
    cfg = MSE_CONFIGS["c4096"]
    block = min(_INTERPRETER_BLOCK_C, next_power_of_2(C)) if triton_interpreting() else cfg["BLOCK_C"]
    _diffusion_mse_rows[(R,)](
        pred, x0, noise, goal_x0, goal_noise, coef, row_error, grad if write_grad else pred, C, pred.stride(0),
        x0.stride(0), noise.stride(0), grad.stride(0) if write_grad else 0, WRITE_GRAD=write_grad, BLOCK_C=block,
        EMULATE_BF16_RTNE=triton_interpreting() and grad_dtype == torch.bfloat16, num_warps=cfg["num_warps"])
    return row_error, grad


def _diffusion_mse_cases() -> Iterator[CompileCase]:
    cfg = MSE_CONFIGS["c4096"]
    for pred_dtype, data_dtype, write_grad in (("bf16", "fp32", True), ("bf16", "bf16", True),
                                               ("fp32", "fp32", False)):
        grad_dtype = "fp32" if "fp32" in (pred_dtype, data_dtype) else "bf16"
        types = {"Pred": f"*{pred_dtype}", "X0": f"*{data_dtype}", "Noise": f"*{data_dtype}", "GoalX0": "*fp32",
                 "GoalNoise": "*fp32", "Coef": "*fp32", "RowError": "*fp32", "Grad": f"*{grad_dtype}"}
        yield CompileCase(f"diffusion_mse[c4096] pred={pred_dtype} x0={data_dtype}{' +grad' if write_grad else ''}",
                          _diffusion_mse_rows, types,
                          dict(WRITE_GRAD=write_grad, BLOCK_C=cfg["BLOCK_C"], EMULATE_BF16_RTNE=False),
                          num_warps=cfg["num_warps"],
                          aligned=pointers(types) + ("C", "stride_p", "stride_x", "stride_n", "stride_g"))


COMPILE_CASES = tuple(_denoise_step_cases()) + tuple(_modulation_cases()) + tuple(_diffusion_mse_cases())
