"""Public op of the fusion family: ``gated_mix``, the gate of MM-CoT's gated cross-attention fusion.

``(1 - g) * text + g * attended`` with ``g = sigmoid(cat[text, attended] @ weight.T + bias)``, computed as two
GEMMs summed into one logits buffer (no [N, 2d] concatenation), then one elementwise pass (sigmoid and mix) forward
and one backward. A ``torch.library`` custom op (fake implementation and autograd formula registered) wraps it;
dispatch chooses between the Triton kernels (``triton_kernels.py``) and the torch implementation
(``torch_impl.py``) for the elementwise passes, the GEMMs are torch's either way.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import checks
from ..dispatch import triton_float_reasons, triton_or_torch
from . import torch_impl

GATED_MIX = triton_or_torch("gated_mix", triton_float_reasons)


def _kernels(device: torch.device, dtype: torch.dtype):
    if GATED_MIX.choose(device=device, dtype=dtype) == "triton":
        from . import triton_kernels  # imports triton: only once a Triton backend was chosen
        return triton_kernels
    return torch_impl


def _gate_logits(text: torch.Tensor, attended: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    d = text.shape[1]
    logits = (torch.mm(text, weight[:, :d].t()) if bias is None
              else torch.addmm(bias, text, weight[:, :d].t()))
    return logits.addmm_(attended, weight[:, d:].t())


@torch.library.custom_op("mmlatent::gated_mix", mutates_args=())
def _gated_mix_op(text: torch.Tensor, attended: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    logits = _gate_logits(text, attended, weight, bias)
    return _kernels(text.device, text.dtype).gated_mix_forward(text, attended, logits), logits


@_gated_mix_op.register_fake
def _(text, attended, weight, bias):
    return torch.empty_like(text), torch.empty_like(text)


@torch.library.custom_op("mmlatent::gated_mix_backward", mutates_args=())
def _gated_mix_backward_op(grad_out: torch.Tensor, text: torch.Tensor, attended: torch.Tensor, logits: torch.Tensor,
                           weight: torch.Tensor, with_bias: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_text, grad_attended, grad_logits = _kernels(text.device, text.dtype).gated_mix_backward(
        grad_out.contiguous(), text, attended, logits)
    d = text.shape[1]
    grad_text.addmm_(grad_logits, weight[:, :d])
    grad_attended.addmm_(grad_logits, weight[:, d:])
    grad_weight = torch.empty_like(weight)
    torch.mm(grad_logits.t(), text, out=grad_weight[:, :d])
    torch.mm(grad_logits.t(), attended, out=grad_weight[:, d:])
    grad_bias = (grad_logits.sum(0, dtype=torch.float64 if text.dtype == torch.float64 else torch.float32)
                 .to(weight.dtype) if with_bias else weight.new_empty(0))
    return grad_text, grad_attended, grad_weight, grad_bias


@_gated_mix_backward_op.register_fake
def _(grad_out, text, attended, logits, weight, with_bias):
    return (torch.empty_like(text), torch.empty_like(text), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if with_bias else 0))


def _setup(ctx, inputs, output):
    text, attended, weight, bias = inputs
    ctx.save_for_backward(text, attended, output[1], weight)
    ctx.with_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_logits):
    text, attended, logits, weight = ctx.saved_tensors
    grad_text, grad_attended, grad_weight, grad_bias = _gated_mix_backward_op(grad_out, text, attended, logits,
                                                                              weight, ctx.with_bias)
    return grad_text, grad_attended, grad_weight, grad_bias if ctx.with_bias else None


_gated_mix_op.register_autograd(_backward, setup_context=_setup)


def gated_mix(text: torch.Tensor, attended: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MM-CoT's fusion gate: ``(1 - g) * text + g * attended``, ``g = sigmoid(cat[text, attended] @ weight.T +
    bias)``.

    Args:
        text: [..., d] float16/bfloat16/float32/float64 states (the encoder's, after its final norm).
        attended: [..., d] the image features the text attended to, text's shape, dtype and device.
        weight: [d, 2d] the gate's ``nn.Linear(2 d, d)`` weight (columns :d read text, d: attended), text's dtype.
        bias: [d] or None.

    Returns:
        [..., d] in text's dtype. The gate logits are two GEMMs summed into one buffer (the [N, 2d] concatenation
        is never built); sigmoid and mix are one elementwise pass in float32 (float64 for float64 inputs),
        rounded once. The backward saves only the logits [N, d] besides the inputs, recomputes the gate, and
        writes the three direct gradients in one elementwise pass before the GEMMs of the weight's share.

    Backends: ``triton`` (the elementwise passes; float64 refused) and ``torch``; either way the op is
    ``mmlatent::gated_mix`` with its registered backward, so torch.compile traces it.

    Example::

        >>> text, attended = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        >>> gated_mix(text, attended, torch.randn(8, 16), torch.zeros(8)).shape
        torch.Size([2, 5, 8])
    """
    checks.tensor("text", text, dtypes=checks.FLOAT_DTYPES)
    if text.dim() < 1 or text.shape[-1] == 0:
        raise ValueError(f"text: expected [..., d] with d > 0, got {tuple(text.shape)}")
    d = text.shape[-1]
    checks.tensor("attended", attended, device=text.device)
    checks.same_dtype("attended", attended, "text", text)
    if attended.shape != text.shape:
        raise ValueError(f"attended: expected text's shape {tuple(text.shape)}, got {tuple(attended.shape)}")
    checks.tensor("weight", weight, dims=2, device=text.device)
    checks.same_dtype("weight", weight, "text", text)
    checks.shape("weight", weight, (d, 2 * d), "[d, 2d]: the gate's nn.Linear(2 d, d) weight")
    if bias is not None:
        checks.tensor("bias", bias, dims=1, device=text.device)
        checks.same_dtype("bias", bias, "text", text)
        checks.shape("bias", bias, (d,), "[d]")
    leading = text.shape[:-1]
    rows = math.prod(leading)
    out, _logits = _gated_mix_op(text.reshape(rows, d).contiguous(), attended.reshape(rows, d).contiguous(),
                                 weight, bias)
    return out.view(*leading, d)


__all__ = ["gated_mix", "GATED_MIX"]
