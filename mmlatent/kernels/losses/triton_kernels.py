"""Triton kernel of one row chunk of a linear-softmax loss (cross-entropy or log-probabilities).

The logits of a chunk come from a cuBLAS GEMM (hidden @ weight.T + bias) in the inputs' dtype. One program per
row then streams its logits twice: an online log-sum-exp in float32 (with the target logit and, for label
smoothing, the sum of logits), and, when a gradient is wanted, the gradient written over the logits in place,
in their dtype, ready for the two gradient GEMMs. The chunk never needs a second [C, V] buffer.

Same contract as :func:`mmlatent.kernels.losses.torch_impl.softmax_loss_chunk`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..compile_cases import CompileCase, pointers
from .chunks import SoftmaxLossSpec
from ..limits import next_power_of_2, triton_interpreting
from ..triton_numerics import round_to_bf16_grid

# One config: a row is a stream, so the only choice is the tile width (16 fp32 values per thread at 8 warps).
# compile_check proves it compiles for sm_90a without spills in every dtype and mode.
LOSS_CONFIGS = {"v4096": dict(BLOCK_V=4096, num_warps=8)}
_INTERPRETER_BLOCK_V = 1024  # the interpreter's cost grows with the tile; small tiles keep CPU tests fast

KIND_CE, KIND_LOGP = 0, 1


@triton.jit
def _scaled_logits(z, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both tails (exp overflows to inf, or underflows to 0), and
        # available under the interpreter, unlike libdevice.tanh.
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    else:
        s = z * inv_temperature
    return s


@triton.jit
def _softmax_loss_rows(Logits, Targets, Coef, Values, LSE,
                       V, stride_row, stride_coef, label_smoothing, softcap, inv_temperature,
                       KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_VALUES: tl.constexpr,
                       WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    y = tl.load(Targets + row)
    offs = tl.arange(0, BLOCK_V)
    if COMPUTE_VALUES:
        # per-lane online softmax; lanes merge once at the end
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_V], tl.float32)
        s_sum = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            inside = cols < V
            z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            s = _scaled_logits(z, softcap, inv_temperature, HAS_SOFTCAP)
            s_sum += tl.where(inside, s, 0.0)
            s = tl.where(inside, s, float("-inf"))
            m_new = tl.maximum(m, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp(m - m_safe) + tl.exp(s - m_safe)
            m = m_new
        m_row = tl.max(m, axis=0)
        lse = m_row + tl.log(tl.sum(l * tl.exp(m - m_row), axis=0))
        s_y = _scaled_logits(tl.load(base + y).to(tl.float32), softcap, inv_temperature, HAS_SOFTCAP)
        if KIND == 0:
            value = lse - (1.0 - label_smoothing) * s_y - label_smoothing * tl.sum(s_sum, axis=0) / V
        else:
            value = s_y - lse
        tl.store(Values + row, value)
        tl.store(LSE + row, lse)
    else:
        lse = tl.load(LSE + row)
    if WRITE_GRAD:
        coef = tl.load(Coef + row * stride_coef)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            inside = cols < V
            z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            s = _scaled_logits(z, softcap, inv_temperature, HAS_SOFTCAP)
            p = tl.exp(s - lse)
            if KIND == 0:
                g = p - label_smoothing / V - tl.where(cols == y, 1.0 - label_smoothing, 0.0)
            else:
                g = tl.where(cols == y, 1.0, 0.0) - p
            g = g * coef
            if HAS_SOFTCAP:
                t = s / softcap
                g = g * (1.0 - t * t)
            else:
                g = g * inv_temperature
            if EMULATE_BF16_RTNE:
                g = round_to_bf16_grid(g)
            tl.store(base + cols, g.to(Logits.dtype.element_ty), mask=inside)


def softmax_loss_chunk(logits: torch.Tensor, targets: torch.Tensor, spec: SoftmaxLossSpec, *,
                       lse: Optional[torch.Tensor] = None, coef: Optional[torch.Tensor] = None
                       ) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Triton twin of :func:`mmlatent.kernels.losses.torch_impl.softmax_loss_chunk` (same arguments and results); the
    gradient is written over ``logits``, which must be row-contiguous."""
    C, V = logits.shape
    if C == 0:
        empty = logits.new_empty(0, dtype=torch.float32)
        return (empty if lse is None else None), (empty if lse is None else lse), (logits if coef is not None else None)
    compute_values = lse is None
    write_grad = coef is not None
    values = torch.empty(C, dtype=torch.float32, device=logits.device) if compute_values else None
    lse_buf = torch.empty(C, dtype=torch.float32, device=logits.device) if compute_values else lse.contiguous()
    coef_buf = coef.to(torch.float32).contiguous() if write_grad else lse_buf
    stride_coef = 0 if (not write_grad or coef_buf.shape[0] == 1) else 1
    cfg = LOSS_CONFIGS["v4096"]
    block_v = cfg["BLOCK_V"]
    if triton_interpreting():
        block_v = min(_INTERPRETER_BLOCK_V, next_power_of_2(V))
    _softmax_loss_rows[(C,)](
        logits, targets.contiguous(), coef_buf, values if compute_values else lse_buf, lse_buf,
        V, logits.stride(0), stride_coef, float(spec.label_smoothing),
        float(spec.softcap) if spec.softcap is not None else 1.0, 1.0 / spec.temperature,
        KIND=KIND_CE if spec.kind == "ce" else KIND_LOGP, HAS_SOFTCAP=spec.softcap is not None,
        COMPUTE_VALUES=compute_values, WRITE_GRAD=write_grad, BLOCK_V=block_v,
        EMULATE_BF16_RTNE=triton_interpreting() and logits.dtype == torch.bfloat16, num_warps=cfg["num_warps"])
    return values, lse_buf, (logits if write_grad else None)


def _loss_case(dtype: str, kind: int, softcap: bool, compute_values: bool, write_grad: bool) -> CompileCase:
    cfg = LOSS_CONFIGS["v4096"]
    types = {"Logits": f"*{dtype}", "Targets": "*i64", "Coef": "*fp32", "Values": "*fp32", "LSE": "*fp32",
             "label_smoothing": "fp32", "softcap": "fp32", "inv_temperature": "fp32"}
    what = ("ce" if kind == KIND_CE else "logp") + ("+softcap" if softcap else "")
    passes = "+".join(p for p, on in (("values", compute_values), ("grad", write_grad)) if on)
    return CompileCase(f"softmax_loss_rows[v4096] {dtype} {what} {passes}", _softmax_loss_rows, types,
                       dict(KIND=kind, HAS_SOFTCAP=softcap, COMPUTE_VALUES=compute_values, WRITE_GRAD=write_grad,
                            BLOCK_V=cfg["BLOCK_V"], EMULATE_BF16_RTNE=False),
                       num_warps=cfg["num_warps"], aligned=pointers(types) + ("stride_row",))


COMPILE_CASES = tuple(_loss_case(dtype, KIND_CE, False, True, True) for dtype in ("bf16", "fp16", "fp32")) + (
    _loss_case("bf16", KIND_CE, True, True, True),
    _loss_case("bf16", KIND_CE, False, True, False),  # evaluation, or reduction="none" forward
    _loss_case("bf16", KIND_LOGP, False, True, False),  # linear_log_probs forward
    _loss_case("bf16", KIND_LOGP, False, False, True),  # its recomputing backward
)
