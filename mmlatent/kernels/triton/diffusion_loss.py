"""Triton kernel of the diffusion training loss: per row, the target (a per-row combination of x0 and the noise,
which covers epsilon, v, sample and flow-velocity targets) is formed in registers, the squared error summed, and
the gradient of the loss over the prediction written in the same pass. Neither the target nor the difference is
ever stored.

Same contract as :func:`mmlatent.kernels.reference.diffusion_mse` (plus the gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpreting
from .numerics import round_to_bf16_grid

MSE_CONFIGS = {"c4096": dict(BLOCK_C=4096, num_warps=8)}  # C=3584 (a 7B VLM's hidden size) is one tile
_INTERPRETER_BLOCK_C = 128


@triton.jit
def _diffusion_mse_rows(Pred, X0, Noise, GoalX0, GoalNoise, Coef, RowError, Grad, C, stride_p, stride_x, stride_n,
                        stride_g, WRITE_GRAD: tl.constexpr, BLOCK_C: tl.constexpr,
                        EMULATE_BF16_RTNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    gx = tl.load(GoalX0 + row)
    gn = tl.load(GoalNoise + row)
    grad_scale = 2.0 * tl.load(Coef + row) / C
    total = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        inside = cols < C
        pred = tl.load(Pred + row * stride_p + cols, mask=inside, other=0.0).to(tl.float32)
        x0 = tl.load(X0 + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        noise = tl.load(Noise + row * stride_n + cols, mask=inside, other=0.0).to(tl.float32)
        diff = pred - (gx * x0 + gn * noise)  # zero outside the row
        total += diff * diff
        if WRITE_GRAD:
            grad = grad_scale * diff
            if EMULATE_BF16_RTNE:
                grad = round_to_bf16_grid(grad)
            tl.store(Grad + row * stride_g + cols, grad.to(Grad.dtype.element_ty), mask=inside)
    tl.store(RowError + row, tl.sum(total, axis=0) / C)


def diffusion_mse_rows(pred, x0, noise, goal_x0, goal_noise, coef, write_grad: bool):
    """pred, x0, noise [R, C] with unit stride along C; goal_x0, goal_noise, coef [R] float32 ->
    (row errors [R] float32, d loss / d pred [R, C] or None). The gradient is stored in the wider of pred's and x0's
    dtypes: it also gives x0's gradient, which must not inherit a 16-bit prediction's rounding."""
    R, C = pred.shape
    row_error = torch.empty(R, device=pred.device, dtype=torch.float32)
    grad_dtype = torch.promote_types(pred.dtype, x0.dtype)
    grad = torch.empty(R, C, device=pred.device, dtype=grad_dtype) if write_grad else None
    if R == 0:
        return row_error, grad
    cfg = MSE_CONFIGS["c4096"]
    block = min(_INTERPRETER_BLOCK_C, triton.next_power_of_2(C)) if triton_interpreting() else cfg["BLOCK_C"]
    _diffusion_mse_rows[(R,)](
        pred, x0, noise, goal_x0, goal_noise, coef, row_error, grad if write_grad else pred, C, pred.stride(0),
        x0.stride(0), noise.stride(0), grad.stride(0) if write_grad else 0, WRITE_GRAD=write_grad, BLOCK_C=block,
        EMULATE_BF16_RTNE=triton_interpreting() and grad_dtype == torch.bfloat16, num_warps=cfg["num_warps"])
    return row_error, grad
