"""Triton kernels of the fusion family: the gate's elementwise pass, one program per block of elements.

- ``_gated_mix_fwd``: out = h + sigmoid(z) * (a - h), where z = [h, a] @ W.T + b are the gate's logits (two GEMMs
  summed by the caller, no concatenated copy); the gate itself is never stored.
- ``_gated_mix_bwd``: from dout, h, a and z, the three direct gradients dh = dout (1 - g), da = dout g and
  dz = dout (a - h) g (1 - g) in one pass; the gate is recomputed from z in registers.

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

MIX_CONFIGS = {"b1024": dict(BLOCK=1024, num_warps=4)}
_INTERPRETER_BLOCK = 4096  # few, large programs: the interpreter pays per program


@triton.jit
def _gated_mix_fwd(H, A, Z, Out, n, BLOCK: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    h = tl.load(H + offsets, mask=inside, other=0.0).to(tl.float32)
    a = tl.load(A + offsets, mask=inside, other=0.0).to(tl.float32)
    z = tl.load(Z + offsets, mask=inside, other=0.0).to(tl.float32)
    out = h + tl.sigmoid(z) * (a - h)
    if EMULATE_BF16_RTNE:
        out = round_to_bf16_grid(out)
    tl.store(Out + offsets, out.to(Out.dtype.element_ty), mask=inside)


@triton.jit
def _gated_mix_bwd(DOut, H, A, Z, DH, DA, DZ, n, BLOCK: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    dout = tl.load(DOut + offsets, mask=inside, other=0.0).to(tl.float32)
    h = tl.load(H + offsets, mask=inside, other=0.0).to(tl.float32)
    a = tl.load(A + offsets, mask=inside, other=0.0).to(tl.float32)
    g = tl.sigmoid(tl.load(Z + offsets, mask=inside, other=0.0).to(tl.float32))
    da = dout * g
    dh = dout - da
    dz = da * (1.0 - g) * (a - h)
    if EMULATE_BF16_RTNE:
        da, dh, dz = round_to_bf16_grid(da), round_to_bf16_grid(dh), round_to_bf16_grid(dz)
    tl.store(DH + offsets, dh.to(DH.dtype.element_ty), mask=inside)
    tl.store(DA + offsets, da.to(DA.dtype.element_ty), mask=inside)
    tl.store(DZ + offsets, dz.to(DZ.dtype.element_ty), mask=inside)


def _launch(n: int, dtype: torch.dtype) -> Tuple[Tuple[int], dict]:
    cfg = MIX_CONFIGS["b1024"]
    block = _INTERPRETER_BLOCK if triton_interpreting() else cfg["BLOCK"]
    return (triton.cdiv(n, block),), dict(BLOCK=block, EMULATE_BF16_RTNE=triton_interpreting() and
                                          dtype == torch.bfloat16, num_warps=cfg["num_warps"])


def gated_mix_forward(text: torch.Tensor, attended: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """text, attended, gate_logits contiguous [N, d] of one float dtype; returns out [N, d]."""
    out = torch.empty_like(text)
    if text.numel():
        grid, meta = _launch(text.numel(), text.dtype)
        _gated_mix_fwd[grid](text, attended, gate_logits, out, text.numel(), **meta)
    return out


def gated_mix_backward(grad_out: torch.Tensor, text: torch.Tensor, attended: torch.Tensor,
                       gate_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All contiguous [N, d] of text's dtype; returns (d text, d attended, d gate_logits), the direct terms."""
    grads = tuple(torch.empty_like(text) for _ in range(3))
    if text.numel():
        grid, meta = _launch(text.numel(), text.dtype)
        _gated_mix_bwd[grid](grad_out, text, attended, gate_logits, *grads, text.numel(), **meta)
    return grads


def _gated_mix_cases() -> Iterator[CompileCase]:
    cfg = MIX_CONFIGS["b1024"]
    for dtype in ("bf16", "fp32"):
        forward = {"H": f"*{dtype}", "A": f"*{dtype}", "Z": f"*{dtype}", "Out": f"*{dtype}"}
        yield CompileCase(f"gated_mix_fwd[b1024] {dtype}", _gated_mix_fwd, forward,
                          dict(BLOCK=cfg["BLOCK"], EMULATE_BF16_RTNE=False), num_warps=cfg["num_warps"],
                          aligned=pointers(forward) + ("n",))
        backward = {k: f"*{dtype}" for k in ("DOut", "H", "A", "Z", "DH", "DA", "DZ")}
        yield CompileCase(f"gated_mix_bwd[b1024] {dtype}", _gated_mix_bwd, backward,
                          dict(BLOCK=cfg["BLOCK"], EMULATE_BF16_RTNE=False), num_warps=cfg["num_warps"],
                          aligned=pointers(backward) + ("n",))


COMPILE_CASES = tuple(_gated_mix_cases())
