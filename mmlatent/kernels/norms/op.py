"""Public op of the norms family: ``rms_norm``, the RMS layer norm of T5 (``T5LayerNorm``: no mean subtracted,
no bias, the statistic in float32).

Written as transformers writes it, autograd keeps the input, its float32 copy's square, the normalised row and
the statistic; this op keeps the input and one float32 ``rstd`` per row, and its backward writes dx and dw in one
pass over the rows. A ``torch.library`` custom op (fake implementation and autograd formula registered) wraps it;
dispatch chooses between the Triton kernels (``triton_kernels.py``) and the torch implementation
(``torch_impl.py``).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .. import checks
from ..dispatch import triton_or_torch, triton_row_reasons
from ..limits import NORM_MAX_WIDTH
from . import torch_impl


RMS_NORM = triton_or_torch("rms_norm", triton_row_reasons(NORM_MAX_WIDTH))


def _kernels(x: torch.Tensor):
    if RMS_NORM.choose(device=x.device, dtype=x.dtype, width=x.shape[1]) == "triton":
        from . import triton_kernels  # imports triton: only once a Triton backend was chosen
        return triton_kernels
    return torch_impl


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("mmlatent::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels(x).rms_norm_forward(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=_stat_dtype(x.dtype))


@torch.library.custom_op("mmlatent::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels(x).rms_norm_backward(grad_y.contiguous(), x, weight, rstd)


@_rms_norm_backward_op.register_fake
def _(grad_y, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = _rms_norm_backward_op(grad_y, x, weight, rstd)
    return grad_x, grad_weight, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """T5's RMS layer norm over the last dimension: ``weight * x / sqrt(mean(x ** 2) + eps)``.

    Args:
        x: [..., W] float16/bfloat16/float32/float64.
        weight: [W] the norm's scale, x's dtype and device.
        eps: added to the mean square (T5's ``layer_norm_epsilon``, 1e-6).

    Returns:
        [..., W] in x's dtype, computed in float32 (float64 for float64 inputs) and rounded once. For the
        backward only x and a float32 statistic per row are kept; dx and dweight come from one pass.

    Backends: ``triton`` (float64 and rows wider than ``NORM_MAX_WIDTH`` refused) and ``torch``; either way the op
    is ``mmlatent::rms_norm`` with its registered backward, so torch.compile traces it.

    Example::

        >>> rms_norm(torch.randn(2, 5, 16), torch.ones(16)).shape
        torch.Size([2, 5, 16])
    """
    checks.tensor("x", x, dtypes=checks.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected [..., W] with W > 0, got {tuple(x.shape)}")
    width = x.shape[-1]
    checks.tensor("weight", weight, dims=1, device=x.device)
    checks.same_dtype("weight", weight, "x", x)
    checks.shape("weight", weight, (width,), "[W]: the norm's scale")
    eps = checks.number("eps", eps, positive=True)
    leading = x.shape[:-1]
    rows = math.prod(leading)  # not -1: with no rows the count cannot be inferred
    y, _rstd = _rms_norm_op(x.reshape(rows, width).contiguous(), weight.contiguous(), eps)
    return y.view(*leading, width)


__all__ = ["rms_norm", "RMS_NORM"]
