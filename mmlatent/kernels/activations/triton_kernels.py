"""Triton kernels of the activations family: the gated GELU, one program per block of elements.

- ``_geglu_fwd``: out = gelu(a) * b, GELU exact (erf) or tanh-approximated, in float32 registers.
- ``_geglu_bwd``: from dout, a and b, da = dout b gelu'(a) and db = dout gelu(a) in one pass; the GELU is
  recomputed, nothing else was stored.

tanh(u) is written 2 sigmoid(2u) - 1 (Triton has no tanh of its own; the error is an ulp of the result's scale).
Same contracts as the functions of ``torch_impl.py``. Each kernel's compile-check cases follow it.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
import triton
import triton.language as tl

from ..compile_cases import CompileCase, pointers
from ..limits import triton_interpreting
from ..triton_numerics import round_to_bf16_grid

GEGLU_CONFIGS = {"b1024": dict(BLOCK=1024, num_warps=4)}
_INTERPRETER_BLOCK = 4096  # few, large programs: the interpreter pays per program
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_CUBIC = tl.constexpr(0.044715)
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_and_derivative(a, TANH: tl.constexpr):
    if TANH:
        inner = _SQRT_2_OVER_PI * (a + _TANH_CUBIC * a * a * a)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        gelu = 0.5 * a * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * a * a)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(a * _SQRT_HALF))
        gelu = a * cdf
        slope = cdf + a * _INV_SQRT_2PI * tl.exp(-0.5 * a * a)
    return gelu, slope


@triton.jit
def _geglu_fwd(A, B, Out, n, BLOCK: tl.constexpr, TANH: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    a = tl.load(A + offsets, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(B + offsets, mask=inside, other=0.0).to(tl.float32)
    gelu, _slope = _gelu_and_derivative(a, TANH)
    out = gelu * b
    if EMULATE_BF16_RTNE:
        out = round_to_bf16_grid(out)
    tl.store(Out + offsets, out.to(Out.dtype.element_ty), mask=inside)


@triton.jit
def _geglu_bwd(DOut, A, B, DA, DB, n, BLOCK: tl.constexpr, TANH: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    dout = tl.load(DOut + offsets, mask=inside, other=0.0).to(tl.float32)
    a = tl.load(A + offsets, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(B + offsets, mask=inside, other=0.0).to(tl.float32)
    gelu, slope = _gelu_and_derivative(a, TANH)
    da = dout * b * slope
    db = dout * gelu
    if EMULATE_BF16_RTNE:
        da, db = round_to_bf16_grid(da), round_to_bf16_grid(db)
    tl.store(DA + offsets, da.to(DA.dtype.element_ty), mask=inside)
    tl.store(DB + offsets, db.to(DB.dtype.element_ty), mask=inside)


def _launch(n: int, dtype: torch.dtype, approximate: str) -> Tuple[Tuple[int], dict]:
    cfg = GEGLU_CONFIGS["b1024"]
    block = _INTERPRETER_BLOCK if triton_interpreting() else cfg["BLOCK"]
    return (triton.cdiv(n, block),), dict(BLOCK=block, TANH=approximate == "tanh",
                                          EMULATE_BF16_RTNE=triton_interpreting() and dtype == torch.bfloat16,
                                          num_warps=cfg["num_warps"])


def geglu_forward(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    """gate, up contiguous, one shape and float dtype; returns gelu(gate) * up."""
    out = torch.empty_like(gate)
    if gate.numel():
        grid, meta = _launch(gate.numel(), gate.dtype, approximate)
        _geglu_fwd[grid](gate, up, out, gate.numel(), **meta)
    return out


def geglu_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, approximate: str
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """All contiguous, gate's shape and dtype; returns (d gate, d up)."""
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(gate)
    if gate.numel():
        grid, meta = _launch(gate.numel(), gate.dtype, approximate)
        _geglu_bwd[grid](grad_out, gate, up, grad_gate, grad_up, gate.numel(), **meta)
    return grad_gate, grad_up


def _geglu_cases() -> Iterator[CompileCase]:
    cfg = GEGLU_CONFIGS["b1024"]
    for dtype in ("bf16", "fp32"):
        for tanh in (True, False):
            kind = "tanh" if tanh else "erf"
            constexprs = dict(BLOCK=cfg["BLOCK"], TANH=tanh, EMULATE_BF16_RTNE=False)
            forward = {"A": f"*{dtype}", "B": f"*{dtype}", "Out": f"*{dtype}"}
            yield CompileCase(f"geglu_fwd[b1024 {kind}] {dtype}", _geglu_fwd, forward, constexprs,
                              num_warps=cfg["num_warps"], aligned=pointers(forward) + ("n",))
            backward = {k: f"*{dtype}" for k in ("DOut", "A", "B", "DA", "DB")}
            yield CompileCase(f"geglu_bwd[b1024 {kind}] {dtype}", _geglu_bwd, backward, constexprs,
                              num_warps=cfg["num_warps"], aligned=pointers(backward) + ("n",))


COMPILE_CASES = tuple(_geglu_cases())
