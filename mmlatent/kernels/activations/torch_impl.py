"""The torch backend of the activations family: the gated GELU forward and its backward in float32 (float64 for
float64 inputs), through aten's own ``gelu`` and ``gelu_backward``, the same formulas as the Triton kernels.
Arguments arrive validated by ``op.py``."""
from __future__ import annotations

from typing import Tuple

import torch
from torch.nn import functional as F


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def geglu_forward(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    """[N]: gelu(gate) * up, rounded once to gate's dtype."""
    dtype = _math_dtype(gate.dtype)
    return (F.gelu(gate.to(dtype), approximate=approximate) * up.to(dtype)).to(gate.dtype)


def geglu_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, approximate: str
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) in gate's dtype: dout * up * gelu'(gate) and dout * gelu(gate), gelu recomputed."""
    dtype = _math_dtype(gate.dtype)
    g, dout = gate.to(dtype), grad_out.to(dtype)
    grad_gate = torch.ops.aten.gelu_backward(dout * up.to(dtype), g, approximate=approximate)
    grad_up = dout * F.gelu(g, approximate=approximate)
    return grad_gate.to(gate.dtype), grad_up.to(gate.dtype)
