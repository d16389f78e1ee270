"""Public op of the activations family: ``geglu``, the gated GELU ``gelu(gate) * up`` of a gated feed-forward
layer (T5 v1.1 / flan-T5's ``gated-gelu``, Gemma's GeGLU).

Written as transformers writes it (``act(wi_0(x)) * wi_1(x)`` with ``gelu_new``'s five elementwise ops) autograd
keeps four [N, d_ff] temporaries of the activation and its output besides the two projections; this op keeps only
the two projections and recomputes the activation in its backward, one elementwise pass each way. A
``torch.library`` custom op (fake implementation and autograd formula registered) wraps it; dispatch chooses
between the Triton kernels (``triton_kernels.py``) and the torch implementation (``torch_impl.py``).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import checks
from ..dispatch import triton_float_reasons, triton_or_torch
from . import torch_impl

GEGLU = triton_or_torch("geglu", triton_float_reasons)
APPROXIMATIONS = ("tanh", "none")


def _kernels(device: torch.device, dtype: torch.dtype):
    if GEGLU.choose(device=device, dtype=dtype) == "triton":
        from . import triton_kernels  # imports triton: only once a Triton backend was chosen
        return triton_kernels
    return torch_impl


@torch.library.custom_op("mmlatent::geglu", mutates_args=())
def _geglu_op(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return _kernels(gate.device, gate.dtype).geglu_forward(gate, up, approximate)


@_geglu_op.register_fake
def _(gate, up, approximate):
    return torch.empty_like(gate)


@torch.library.custom_op("mmlatent::geglu_backward", mutates_args=())
def _geglu_backward_op(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, approximate: str
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels(gate.device, gate.dtype).geglu_backward(grad_out.contiguous(), gate, up, approximate)


@_geglu_backward_op.register_fake
def _(grad_out, gate, up, approximate):
    return torch.empty_like(gate), torch.empty_like(gate)


def _setup(ctx, inputs, output):
    gate, up, approximate = inputs
    ctx.save_for_backward(gate, up)
    ctx.approximate = approximate


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = _geglu_backward_op(grad_out, gate, up, ctx.approximate)
    return grad_gate, grad_up, None


_geglu_op.register_autograd(_backward, setup_context=_setup)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate) * up``, the gated GELU of a gated feed-forward layer.

    Args:
        gate: [...] float16/bfloat16/float32/float64, the gate projection (T5's ``wi_0(x)``).
        up: [...] the up projection (T5's ``wi_1(x)``), gate's shape, dtype and device.
        approximate: "tanh" (``gelu_new`` / ``gelu_pytorch_tanh``, T5's and Gemma's) or "none" (erf GELU), as in
            ``torch.nn.functional.gelu``.

    Returns:
        [...] in gate's dtype, computed in float32 (float64 for float64 inputs) and rounded once. For the backward
        only ``gate`` and ``up`` are kept; the GELU and its derivative are recomputed in one elementwise pass that
        writes both gradients.

    Backends: ``triton`` (float64 refused) and ``torch``; either way the op is ``mmlatent::geglu`` with its
    registered backward, so torch.compile traces it.

    Example::

        >>> geglu(torch.randn(2, 5, 16), torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """
    checks.tensor("gate", gate, dtypes=checks.FLOAT_DTYPES)
    checks.tensor("up", up, device=gate.device)
    checks.same_dtype("up", up, "gate", gate)
    if up.shape != gate.shape:
        raise ValueError(f"up: expected gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate: expected one of {', '.join(APPROXIMATIONS)}, got {approximate!r}")
    return _geglu_op(gate.contiguous(), up.contiguous(), approximate)


__all__ = ["geglu", "GEGLU"]
