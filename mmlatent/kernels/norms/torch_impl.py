"""The torch backend of the norms family: the RMS norm forward and backward in float32 (float64 for float64
inputs), the same formulas as the Triton kernels. Arguments arrive validated by ``op.py``."""
from __future__ import annotations

from typing import Tuple

import torch


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [N, W], weight [W] -> (y [N, W] in x's dtype, rstd [N] in the math dtype)."""
    dtype = _math_dtype(x.dtype)
    xf = x.to(dtype)
    rstd = torch.rsqrt(xf.square().mean(1) + eps)
    y = (xf * rstd[:, None]).mul_(weight.to(dtype))
    return y.to(x.dtype), rstd


def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d x [N, W] in x's dtype, d weight [W] in weight's dtype): with x^ = x rstd and g = dy w,
    dx = rstd (g - x^ mean(g x^)), dw = sum over rows of dy x^."""
    dtype = _math_dtype(x.dtype)
    normed = x.to(dtype) * rstd[:, None]
    dy = grad_y.to(dtype)
    grad_weight = (dy * normed).sum(0)
    g = dy * weight.to(dtype)
    grad_x = g.sub_(normed * (g * normed).mean(1, keepdim=True)).mul_(rstd[:, None])
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)
