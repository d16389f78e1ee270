"""adaLN modulation, ``layer_norm_modulate``: LayerNorm without affine, then ``* (1 + scale) + shift``, the
conditioning of every block of a diffusion head (DiT, MAR). Unfused it is four elementwise passes over [N, W] in
the forward and more in the backward, each rounding to the activation dtype; fused it is one pass each way with
float32 arithmetic throughout.

Backends: ``triton`` (one program per row, forward and backward, registered as ``mmlatent::layer_norm_modulate``
with an autograd formula and a fake implementation, so torch.compile traces it) and ``reference`` (the torch
expression, differentiated by autograd).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import checks
from .dispatch import OpDispatch, reference_reason, triton_float_reason


def _triton_modulate_reason(device, dtype, width) -> Optional[str]:
    why = triton_float_reason(device, dtype)
    if why is None:
        from .triton.modulation import MAX_WIDTH
        if width > MAX_WIDTH:
            return f"rows of {width} values exceed the kernel's one-tile limit of {MAX_WIDTH}"
    return why


LAYER_NORM_MODULATE = OpDispatch("layer_norm_modulate", {"triton": _triton_modulate_reason,
                                                         "reference": reference_reason})


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("mmlatent::layer_norm_modulate", mutates_args=())
def _modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton.modulation import layer_norm_modulate_forward
    return layer_norm_modulate_forward(_rows(x), _rows(shift), _rows(scale), eps)


@_modulate_op.register_fake
def _(x, shift, scale, eps):
    stats = x.new_empty(x.shape[0], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("mmlatent::layer_norm_modulate_backward", mutates_args=())
def _modulate_backward_op(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    from .triton.modulation import layer_norm_modulate_backward
    return layer_norm_modulate_backward(_rows(grad_y), _rows(x), _rows(scale), mean, rstd)


@_modulate_backward_op.register_fake
def _(grad_y, x, scale, mean, rstd):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(scale, memory_format=torch.contiguous_format))


def _modulate_setup(ctx, inputs, output):
    x, _shift, scale, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _modulate_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    grad_x, grad_scale = _modulate_backward_op(grad_y, x, scale, mean, rstd)
    return grad_x, grad_y, grad_scale, None


_modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *,
                        eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` over the last dimension, LayerNorm without affine parameters.

    Args:
        x: [..., W] float16/bfloat16/float32/float64 activations.
        shift, scale: the shape and dtype of x; any strides along the leading dimensions (they are usually
            column slices of one modulation GEMM's output), unit stride along W for the kernel's fast path.
        eps: added to the variance.

    Returns:
        [..., W] in x's dtype. Statistics and arithmetic are float32 (float64 for float64 inputs); the fused
        kernel rounds once, so its error is at most the unfused torch expression's. Empty inputs (no rows, or
        W = 0) give an empty result without a kernel launch; meta tensors give a meta result.
    """
    checks.tensor("x", x, dtypes=checks.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension [..., W], got a scalar")
    for name, value in (("shift", shift), ("scale", scale)):
        checks.tensor(name, value, device=x.device)
        checks.same_dtype(name, value, "x", x)
        if value.shape != x.shape:
            raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}, got {tuple(value.shape)} "
                             f"(broadcast it explicitly with .expand if that is meant)")
    eps = checks.number("eps", eps, positive=True)
    width = x.shape[-1]
    # Meta tensors take the op's fake implementation, whichever backend is asked for.
    if not x.is_meta and LAYER_NORM_MODULATE.choose(device=x.device, dtype=x.dtype, width=width) == "reference":
        from . import reference
        return reference.layer_norm_modulate(x, shift, scale, eps)
    leading = x.shape[:-1]
    rows = math.prod(leading)  # not -1: with W = 0 (or no rows) the row count cannot be inferred
    y, _mean, _rstd = _modulate_op(x.reshape(rows, width), shift.reshape(rows, width), scale.reshape(rows, width),
                                   eps)
    return y.view(*leading, width)


__all__ = ["layer_norm_modulate", "LAYER_NORM_MODULATE"]
