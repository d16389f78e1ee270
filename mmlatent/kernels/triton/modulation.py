"""Triton kernels of the adaLN modulation ``LayerNorm(x) * (1 + scale) + shift`` (no affine), forward and backward.

One program per row holds the whole row in registers: the forward computes the statistics in float32 with two
passes over registers (no E[x^2] - E[x]^2 cancellation), writes y once and keeps (mean, rstd) per row for the
backward; the backward writes dx and dscale in one pass (dshift is dy itself). Rounding to the output dtype
happens once, where the unfused torch expression rounds after each of its four ops.

Same contract as :func:`mmlatent.kernels.reference.layer_norm_modulate`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpreting
from .numerics import round_to_bf16_grid

# The row is one tile: the widest config bounds the width the kernel takes (wider rows go to the reference).
# compile_check proves each compiles for sm_90a without spills, forward and backward (a 16384 tile spills in the
# backward even at 32 warps, so 8192 is the limit).
MODULATION_CONFIGS = {"w1024": dict(BLOCK_W=1024, num_warps=4), "w4096": dict(BLOCK_W=4096, num_warps=8),
                      "w8192": dict(BLOCK_W=8192, num_warps=16)}
MAX_WIDTH = max(cfg["BLOCK_W"] for cfg in MODULATION_CONFIGS.values())


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


def _launch_options(W: int, dtype: torch.dtype):
    block = triton.next_power_of_2(W)
    cfg = next(c for c in MODULATION_CONFIGS.values() if block <= c["BLOCK_W"])
    return dict(BLOCK_W=block, EMULATE_BF16_RTNE=triton_interpreting() and dtype == torch.bfloat16,
                num_warps=cfg["num_warps"])


def layer_norm_modulate_forward(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    """x, shift, scale [N, W] of one dtype, unit stride along W, W <= MAX_WIDTH -> (y [N, W] in that dtype,
    mean [N] float32, rstd [N] float32)."""
    N, W = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean = torch.empty(N, device=x.device, dtype=torch.float32)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    if N and W:
        _layer_norm_modulate_fwd[(N,)](x, shift, scale, y, mean, rstd, W, x.stride(0), shift.stride(0),
                                       scale.stride(0), y.stride(0), float(eps), **_launch_options(W, x.dtype))
    return y, mean, rstd


def layer_norm_modulate_backward(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                                 rstd: torch.Tensor):
    """-> (grad_x [N, W] in x's dtype, grad_scale [N, W] in scale's dtype); grad_shift is grad_y."""
    N, W = x.shape
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_scale = torch.empty_like(scale, memory_format=torch.contiguous_format)
    if N and W:
        _layer_norm_modulate_bwd[(N,)](grad_y, x, scale, mean, rstd, grad_x, grad_scale, W, grad_y.stride(0),
                                       x.stride(0), scale.stride(0), grad_x.stride(0), grad_scale.stride(0),
                                       **_launch_options(W, x.dtype))
    return grad_x, grad_scale
