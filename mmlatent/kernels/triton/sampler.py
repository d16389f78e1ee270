"""Triton kernel of one batched denoising step: classifier-free guidance, the x0 clamp, the affine update and the
noise term in one elementwise pass, each row reading its own step's coefficients from the schedule's device table.

Same contract as :func:`mmlatent.kernels.reference.denoise_step_` (plus the guidance of the public op)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpreting

STEP_CONFIGS = {"c1024": dict(BLOCK_C=1024, num_warps=4)}
_INTERPRETER_BLOCK_C = 128
NUM_COEFFICIENTS = 6


# A sampling loop passes step = 0..S-1: unspecialised, those are one compiled kernel (Triton would otherwise compile
# separate variants for step == 1 and steps divisible by 16).
@triton.jit(do_not_specialize=["step_scalar"])
def _denoise_step(X, Out, Noise, Table, Steps, C, R, stride_x, stride_o, stride_n, step_scalar, cfg_scale, clip,
                  PER_ROW_STEP: tl.constexpr, HAS_CFG: tl.constexpr, HAS_CLIP: tl.constexpr,
                  HAS_NOISE: tl.constexpr, BLOCK_C: tl.constexpr):
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
    tl.store(X + row * stride_x + cols, new, mask=inside)


def denoise_step(x: torch.Tensor, model_out: torch.Tensor, table: torch.Tensor, steps, clip, noise,
                 cfg_scale=None) -> torch.Tensor:
    """x [R, C] float32 (unit stride along C) updated in place; table [S, 6] float32 on x's device; steps an
    int or an [R] int tensor; model_out [R, C] or [2R, C] with cfg_scale; noise [R, C] or None."""
    R, C = x.shape
    if R == 0 or C == 0:
        return x
    per_row = isinstance(steps, torch.Tensor)
    cfg = STEP_CONFIGS["c1024"]
    block = min(_INTERPRETER_BLOCK_C, triton.next_power_of_2(C)) if triton_interpreting() else cfg["BLOCK_C"]
    grid = (R, triton.cdiv(C, block))
    _denoise_step[grid](
        x, model_out, noise if noise is not None else x, table, steps if per_row else table,
        C, R, x.stride(0), model_out.stride(0), noise.stride(0) if noise is not None else 0,
        0 if per_row else int(steps), float(cfg_scale or 0.0), float(clip or 0.0),
        PER_ROW_STEP=per_row, HAS_CFG=cfg_scale is not None, HAS_CLIP=clip is not None,
        HAS_NOISE=noise is not None, BLOCK_C=block, num_warps=cfg["num_warps"])
    return x
