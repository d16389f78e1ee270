"""The torch backend of the diffusion family: the same one-pass formulas as the Triton kernels, in float32
(float64 for float64 inputs where the op keeps it), so that the registered ops run the same contract on either.
Arguments arrive validated by ``op.py``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------ denoising step

def guided_output(model_out: torch.Tensor, rows: int, cfg_scale: Optional[float]) -> torch.Tensor:
    """model_out [R, C], or with ``cfg_scale`` [2R, C] (conditional rows first): uncond + cfg_scale * (cond -
    uncond), float32."""
    if cfg_scale is None:
        return model_out.to(torch.float32)
    cond, uncond = model_out[:rows].to(torch.float32), model_out[rows:].to(torch.float32)
    return uncond + cfg_scale * (cond - uncond)


def denoise_step_(x: torch.Tensor, out: torch.Tensor, coefficients: torch.Tensor, clip: Optional[float],
                  noise: Optional[torch.Tensor]) -> torch.Tensor:
    """x [R, C] float32 <- cx * x + co * out + c0 * clamp(px * x + po * out) + sigma * noise, in place.

    coefficients: [R, 6] or [1, 6] float32 rows of a :class:`mmlatent.kernels.SamplerSchedule` table (columns cx,
    co, px, po, c0, sigma); out [R, C] float32 (guided); noise [R, C] or None (no noise term)."""
    cx, co, px, po, c0, sigma = (c[:, None] for c in coefficients.unbind(dim=1))
    new = cx * x + co * out
    if clip is not None:
        new += c0 * (px * x + po * out).clamp(-clip, clip)
    if noise is not None:
        new += sigma * noise.to(torch.float32)
    return x.copy_(new)


# ------------------------------------------------------------------------------------------- adaLN modulation

_WORD = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)


# elements per pass of philox_normal: its int64 temporaries stay a few MiB whatever R * C is
PHILOX_CHUNK = 1 << 18


def _philox_words(seed: torch.Tensor, position: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first two output words of Philox-4x32-10 on counters (position low, high, 0, 0), key (seed low, high)."""
    c0, c1 = position & _WORD, (position >> 32) & _WORD
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _WORD, (seed >> 32) & _WORD
    for _ in range(10):
        p0, p2 = _PHILOX_ROUND[0] * c0, _PHILOX_ROUND[1] * c2
        c0, c1, c2, c3 = ((p2 >> 32) & _WORD) ^ c1 ^ k0, p2 & _WORD, ((p0 >> 32) & _WORD) ^ c3 ^ k1, p0 & _WORD
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _WORD, (k1 + _PHILOX_KEY[1]) & _WORD
    return c0, c1


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """The word as an int32, folded onto [0, 2^31), scaled into [0, 1) (float32)."""
    signed = torch.where(word >= 1 << 31, word - (1 << 32), word)
    return torch.where(signed < 0, -signed - 1, signed).to(torch.float32) * 4.6566127342e-10


def philox_normal(state: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] float32 normals of a PhiloxNoise stream at its position: element (r, c) is Triton's
    ``tl.randn(seed, offset + r * cols + c)`` for (seed, offset) = ``state`` (int64 [2], read on its device with no
    host synchronisation), the arithmetic of csrc/philox.h. Unsigned 32-bit words live in int64: a product of two
    of them wraps modulo 2^64, and its high word is still ``(p >> 32) & 0xFFFFFFFF``. Drawn PHILOX_CHUNK elements
    at a time, so the temporaries do not grow with the draw."""
    out = torch.empty(rows * cols, dtype=torch.float32, device=state.device)
    for start in range(0, rows * cols, PHILOX_CHUNK):
        count = min(PHILOX_CHUNK, rows * cols - start)
        position = state[1] + start + torch.arange(count, dtype=torch.int64, device=state.device)
        c0, c1 = _philox_words(state[0], position)
        u1, theta = _uniform(c0).clamp_min_(1.0e-7), _uniform(c1) * 6.283185307179586
        out[start:start + count] = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)
    return out.view(rows, cols)


def layer_norm_modulate_forward(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, shift, scale [N, W] of one dtype -> (y [N, W] in that dtype, mean [N], rstd [N] in the math dtype):
    statistics from the centred values (no E[x^2] - E[x]^2 cancellation), one rounding of y."""
    dt = _math_dtype(x.dtype)
    xf = x.to(dt)
    mean = xf.mean(dim=1)
    centered = xf - mean[:, None]
    rstd = torch.rsqrt(centered.square().mean(dim=1) + eps)
    y = centered * rstd[:, None] * (1 + scale.to(dt)) + shift.to(dt)
    return y.to(x.dtype), mean, rstd


def layer_norm_modulate_backward(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                                 rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_x in x's dtype, grad_scale in scale's dtype); grad_shift is grad_y. With x_hat = (x - mean) * rstd and
    g = dy * (1 + scale): dx = (g - mean(g) - x_hat * mean(g * x_hat)) * rstd, dscale = dy * x_hat."""
    dt = _math_dtype(x.dtype)
    dy = grad_y.to(dt)
    x_hat = (x.to(dt) - mean.to(dt)[:, None]) * rstd.to(dt)[:, None]
    g = dy * (1 + scale.to(dt))
    dx = (g - g.mean(dim=1, keepdim=True) - x_hat * (g * x_hat).mean(dim=1, keepdim=True)) * rstd.to(dt)[:, None]
    return dx.to(x.dtype), (dy * x_hat).to(scale.dtype)


# ------------------------------------------------------------------------------------------------ diffusion loss

def diffusion_mse_rows(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, goal_x0: torch.Tensor,
                       goal_noise: torch.Tensor, coef: torch.Tensor,
                       write_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Row errors mean_c (pred - goal)^2 [R] float32 with goal = goal_x0[r] * x0 + goal_noise[r] * noise, and
    d(sum_r coef[r] * err[r]) / d pred = 2 coef[r] / C * (pred - goal) in the wider of pred's and x0's dtypes (it
    also gives x0's gradient), or None. pred, x0, noise: [R, C]; goal_x0, goal_noise, coef: [R] float32."""
    goal = goal_x0[:, None] * x0.to(torch.float32) + goal_noise[:, None] * noise.to(torch.float32)
    diff = pred.to(torch.float32) - goal
    row_error = diff.square().mean(dim=1)
    if not write_grad:
        return row_error, None
    grad = diff.mul_(2.0 * coef[:, None] / pred.shape[1])
    return row_error, grad.to(torch.promote_types(pred.dtype, x0.dtype))


__all__ = ["guided_output", "denoise_step_", "philox_normal", "layer_norm_modulate_forward",
           "layer_norm_modulate_backward", "diffusion_mse_rows"]
