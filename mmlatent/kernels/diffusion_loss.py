"""The diffusion training loss, ``diffusion_mse``: the (row-weighted) mean squared error between a denoiser's
prediction and its target, with the target (epsilon, v, sample or flow velocity) formed from x0, the noise and each
row's alpha-bar on the fly. Unfused, torch stores the target, the difference and its square ([R, C] float32 each)
and walks them again in the backward; fused, one pass reads pred, x0 and noise and writes the row errors and the
gradient over pred (the scalar-loss trick of the linear losses: the gradient is known in the forward pass).

Backends: ``triton`` (registered as ``mmlatent::diffusion_mse`` with an autograd formula and a fake
implementation) and ``reference`` (the torch expression, differentiated by autograd).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks
from .dispatch import OpDispatch, reference_reason, triton_float_reason

TARGETS = ("epsilon", "v_prediction", "sample", "velocity")
# Row weights are real: masks (bool, integer) or floats; a complex weight has no order, so no meaningful mean.
WEIGHT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + checks.FLOAT_DTYPES


DIFFUSION_MSE = OpDispatch("diffusion_mse", {"triton": triton_float_reason, "reference": reference_reason})


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("mmlatent::diffusion_mse", mutates_args=())
def _mse_op(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, goal_x0: torch.Tensor,
            goal_noise: torch.Tensor, coef: torch.Tensor, write_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    from .triton.diffusion_loss import diffusion_mse_rows
    row_error, grad = diffusion_mse_rows(_unit_stride(pred), _unit_stride(x0), _unit_stride(noise), goal_x0,
                                         goal_noise, coef, write_grad)
    return (coef * row_error).sum(), grad if grad is not None else pred.new_empty(0)


@_mse_op.register_fake
def _(pred, x0, noise, goal_x0, goal_noise, coef, write_grad):
    grad_dtype = torch.promote_types(pred.dtype, x0.dtype)
    grad = pred.new_empty(pred.shape, dtype=grad_dtype) if write_grad else pred.new_empty(0)
    return pred.new_empty((), dtype=torch.float32), grad


def _mse_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], inputs[3])
    ctx.pred_dtype, ctx.x0_dtype = inputs[0].dtype, inputs[1].dtype


def _mse_backward(ctx, grad_loss, _grad_of_grad):
    grad_pred, goal_x0 = ctx.saved_tensors  # written by the forward: it ran with write_grad
    g = grad_pred.to(torch.float32) * grad_loss.to(torch.float32)
    grad_x0 = (-goal_x0[:, None] * g).to(ctx.x0_dtype) if ctx.needs_input_grad[1] else None
    return g.to(ctx.pred_dtype), grad_x0, None, None, None, None, None


_mse_op.register_autograd(_mse_backward, setup_context=_mse_setup)


def target_coefficients(prediction: str, alphas_cumprod: torch.Tensor):
    """[R] float32 (a, b) with target = a * x0 + b * noise for ``prediction`` at each row's alpha-bar."""
    if prediction == "velocity":  # flow matching: x_t = (1 - t) x0 + t noise, target noise - x0
        ones = torch.ones_like(alphas_cumprod, dtype=torch.float32)
        return -ones, ones
    a = alphas_cumprod.to(torch.float32)
    if prediction == "epsilon":
        return torch.zeros_like(a), torch.ones_like(a)
    if prediction == "sample":
        return torch.ones_like(a), torch.zeros_like(a)
    return -(1 - a).sqrt(), a.sqrt()  # v = sqrt(a) noise - sqrt(1 - a) x0


def diffusion_mse(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                  prediction: str, *, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error of a denoiser's prediction against its training target, averaged over rows.

    Args:
        pred: [R, C] the prediction (any float dtype; differentiable).
        x0: [R, C] the clean samples (differentiable through the target: v and sample targets depend on it).
        noise: [R, C] the noise that was added.
        alphas_cumprod: [R] each row's alpha-bar at its timestep (for "velocity", any [R] tensor: unused).
        prediction: the target: "epsilon" (noise), "v_prediction" (sqrt(a) noise - sqrt(1 - a) x0), "sample" (x0)
            or "velocity" (noise - x0, flow matching).
        weights: [R] row weights: float, or bool / integer masks (complex: TypeError); the loss is
            sum(w * err) / max(sum(w), 1), so all-masked gives 0. None: the plain mean over rows.

    Returns:
        A float32 scalar (0 for R = 0). Errors are float32 whatever the input dtypes. Meta tensors give a meta
        scalar.
    """
    if prediction not in TARGETS:
        raise ValueError(f"prediction: expected one of {', '.join(TARGETS)}, got {prediction!r}")
    checks.tensor("pred", pred, dims=2, dtypes=checks.FLOAT_DTYPES)
    R, C = pred.shape
    if C == 0:
        raise ValueError("pred: expected at least one column, got shape " + str(tuple(pred.shape)))
    for name, value in (("x0", x0), ("noise", noise)):
        checks.tensor(name, value, dims=2, dtypes=checks.FLOAT_DTYPES, device=pred.device)
        checks.shape(name, value, (R, C), "[R, C] like pred")
    checks.tensor("alphas_cumprod", alphas_cumprod, dims=1, dtypes=checks.FLOAT_DTYPES, device=pred.device)
    checks.shape("alphas_cumprod", alphas_cumprod, (R,), "[R]")
    goal_x0, goal_noise = target_coefficients(prediction, alphas_cumprod)
    if weights is None:
        coef = torch.full((R,), 1.0 / max(R, 1), device=pred.device, dtype=torch.float32)
    else:
        checks.tensor("weights", weights, dims=1, dtypes=WEIGHT_DTYPES, device=pred.device)
        checks.shape("weights", weights, (R,), "[R]")
        w = weights.to(torch.float32)
        coef = w / w.sum().clamp_min(1.0)
    wants_grad = torch.is_grad_enabled() and (pred.requires_grad or x0.requires_grad)
    dtype = torch.promote_types(pred.dtype, x0.dtype)
    # Meta tensors take the op's fake implementation, whichever backend is asked for.
    if not pred.is_meta and DIFFUSION_MSE.choose(device=pred.device, dtype=dtype) == "reference":
        from . import reference
        return reference.diffusion_mse(pred, x0, noise, goal_x0, goal_noise, coef)
    loss, _grad = _mse_op(pred, x0, noise, goal_x0, goal_noise, coef, wants_grad)
    return loss


__all__ = ["diffusion_mse", "DIFFUSION_MSE", "TARGETS", "target_coefficients"]
