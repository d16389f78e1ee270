"""Triton kernels of the norms family: T5's RMS norm, one program per tile of rows, each row whole in registers.

- ``_rms_norm_fwd``: y = x rstd w with rstd = 1 / sqrt(mean(x^2) + eps) in float32; writes y once and keeps rstd
  per row for the backward.
- ``_rms_norm_bwd``: from dy, x, w and rstd, dx = rstd (g - x^ mean(g x^)) with g = dy w and x^ = x rstd, and the
  tile's share of dw = sum dy x^ summed over its rows into one float32 row of a [programs, W] buffer the caller
  sums (no [N, W] product is stored).

Same contracts as the functions of ``torch_impl.py``. Each kernel's compile-check cases follow it.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
import triton
import triton.language as tl

from ..compile_cases import CompileCase, pointers
from ..limits import NORM_MAX_WIDTH, next_power_of_2, triton_interpreting
from ..triton_numerics import round_to_bf16_grid

_TILE = 8192  # values a program holds: rows of one tile times the row's power-of-two width
_INTERPRETER_TILE = 65536  # few, large programs: the interpreter pays per program


@triton.jit
def _rms_norm_fwd(X, Wt, Y, Rstd, N, W, eps, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
                  EMULATE_BF16_RTNE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    inside = (rows[:, None] < N) & (cols[None, :] < W)
    offsets = rows[:, None] * W + cols[None, :]
    x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(Wt + cols, mask=cols < W, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / W + eps)
    y = x * rstd[:, None] * w[None, :]
    if EMULATE_BF16_RTNE:
        y = round_to_bf16_grid(y)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(Rstd + rows, rstd, mask=rows < N)


@triton.jit
def _rms_norm_bwd(DY, X, Wt, Rstd, DX, DWPartial, N, W, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
                  EMULATE_BF16_RTNE: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    inside = (rows[:, None] < N) & (cols[None, :] < W)
    offsets = rows[:, None] * W + cols[None, :]
    dy = tl.load(DY + offsets, mask=inside, other=0.0).to(tl.float32)
    x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(Wt + cols, mask=cols < W, other=0.0).to(tl.float32)
    rstd = tl.load(Rstd + rows, mask=rows < N, other=0.0)
    normed = x * rstd[:, None]
    g = dy * w[None, :]
    dx = rstd[:, None] * (g - normed * (tl.sum(g * normed, axis=1) / W)[:, None])
    if EMULATE_BF16_RTNE:
        dx = round_to_bf16_grid(dx)
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=inside)
    tl.store(DWPartial + tile * W + cols, tl.sum(dy * normed, axis=0), mask=cols < W)


def _warps(block_r: int, block_w: int) -> int:
    # one 8192-wide float32 row needs 16 warps: at 8 the forward spills on sm_90a
    return 16 if block_w >= 8192 else 8 if block_r * block_w >= 4096 else 4


def _launch(rows: int, width: int, dtype: torch.dtype) -> Tuple[Tuple[int], dict]:
    block_w = next_power_of_2(width)
    tile = _INTERPRETER_TILE if triton_interpreting() else _TILE
    block_r = max(1, min(tile // block_w, next_power_of_2(rows)))
    return (triton.cdiv(rows, block_r),), dict(BLOCK_R=block_r, BLOCK_W=block_w,
                                               EMULATE_BF16_RTNE=triton_interpreting() and dtype == torch.bfloat16,
                                               num_warps=_warps(block_r, block_w))


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [N, W] contiguous, weight [W] of x's dtype, W <= NORM_MAX_WIDTH -> (y [N, W], rstd [N] float32)."""
    rows, width = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if x.numel():
        grid, meta = _launch(rows, width, x.dtype)
        _rms_norm_fwd[grid](x, weight, y, rstd, rows, width, eps, **meta)
    return y, rstd


def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """All contiguous as in ``rms_norm_forward``; returns (d x [N, W], d weight [W] in weight's dtype)."""
    rows, width = x.shape
    grad_x = torch.empty_like(x)
    if not x.numel():
        return grad_x, torch.zeros_like(weight)
    grid, meta = _launch(rows, width, x.dtype)
    partial = torch.empty(grid[0], width, device=x.device, dtype=torch.float32)
    _rms_norm_bwd[grid](grad_y, x, weight, rstd, grad_x, partial, rows, width, **meta)
    return grad_x, partial.sum(0).to(weight.dtype)


def _rms_norm_cases() -> Iterator[CompileCase]:
    for dtype in ("bf16", "fp32"):
        for block_w in (1024, NORM_MAX_WIDTH):  # T5-base's row, and the widest one tile holds
            meta = dict(BLOCK_R=max(1, _TILE // block_w), BLOCK_W=block_w, EMULATE_BF16_RTNE=False)
            warps = _warps(meta["BLOCK_R"], block_w)
            forward = {"X": f"*{dtype}", "Wt": f"*{dtype}", "Y": f"*{dtype}", "Rstd": "*fp32", "eps": "fp32"}
            yield CompileCase(f"rms_norm_fwd[w{block_w}] {dtype}", _rms_norm_fwd, forward, meta, num_warps=warps,
                              aligned=pointers(forward) + ("W",))
            backward = {"DY": f"*{dtype}", "X": f"*{dtype}", "Wt": f"*{dtype}", "Rstd": "*fp32", "DX": f"*{dtype}",
                        "DWPartial": "*fp32"}
            yield CompileCase(f"rms_norm_bwd[w{block_w}] {dtype}", _rms_norm_bwd, backward, meta, num_warps=warps,
                              aligned=pointers(backward) + ("W",))


COMPILE_CASES = tuple(_rms_norm_cases())
