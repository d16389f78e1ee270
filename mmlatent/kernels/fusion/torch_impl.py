"""The torch backend of the fusion family: the gate's elementwise pass (sigmoid and mix, forward and backward) in
float32 (float64 for float64 inputs), the same formulas as the Triton kernels. Arguments arrive validated by
``op.py``."""
from __future__ import annotations

from typing import Tuple

import torch


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gated_mix_forward(text: torch.Tensor, attended: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """[N, d]: text + sigmoid(gate_logits) * (attended - text), rounded once to text's dtype."""
    dtype = _math_dtype(text.dtype)
    h = text.to(dtype)
    out = attended.to(dtype) - h
    out.mul_(torch.sigmoid(gate_logits.to(dtype))).add_(h)
    return out.to(text.dtype)


def gated_mix_backward(grad_out: torch.Tensor, text: torch.Tensor, attended: torch.Tensor,
                       gate_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d text, d attended, d gate_logits) [N, d] each in text's dtype, the direct terms only (the gate GEMM's
    share goes through the logits): dout * (1 - g), dout * g, dout * (attended - text) * g * (1 - g)."""
    dtype = _math_dtype(text.dtype)
    g = torch.sigmoid(gate_logits.to(dtype))
    dout = grad_out.to(dtype)
    grad_attended = dout * g
    grad_text = dout - grad_attended
    grad_logits = grad_attended * (1 - g) * (attended.to(dtype) - text.to(dtype))
    return grad_text.to(text.dtype), grad_attended.to(text.dtype), grad_logits.to(text.dtype)
