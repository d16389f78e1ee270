"""The torch backend of one row chunk of a linear-softmax loss: softmax math in float32 (float64 for float64
inputs), the gradient built in place over the chunk's logits."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .chunks import SoftmaxLossSpec


# A float32 logit this far below its row's maximum has a softmax share under e^-60 = 9e-27: it is set to exactly 0
# (its exp to -inf's), which moves a row's sum by under V * 9e-27, far below float32's resolution. Left as it
# is, its exp is a subnormal number, on which the CPU's exp, and the GEMMs of the gradient that read it, take a
# slow path: 14x and 20x slower at a random output layer's logit spread.
_FLOAT32_SHARE_FLOOR = -60.0


def _exp_shifted(s: torch.Tensor) -> torch.Tensor:
    """exp, in place, of logits already shifted by their row's maximum or log-sum-exp (float32 shares below
    e^-60 exactly 0; float64 as it is)."""
    if s.dtype == torch.float32:
        torch.nn.functional.threshold_(s, _FLOAT32_SHARE_FLOOR, float("-inf"))
    return s.exp_()


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_loss_chunk(logits: torch.Tensor, targets: torch.Tensor, spec: SoftmaxLossSpec, *,
                       lse: Optional[torch.Tensor] = None, coef: Optional[torch.Tensor] = None
                       ) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """One row chunk of a linear-softmax loss; overwrites ``logits``.

    Args:
        logits: [C, V] the chunk's z, any float dtype; its memory is reused for the softmax and the gradient.
        targets: [C] int64 in [0, V).
        lse: [C] float32 from an earlier pass (the backward of a per-row loss): skips the values.
        coef: [C] or [1] float32, the gradient each row's value is multiplied by; None: no gradient.

    Returns:
        (values [C] float32 or None when ``lse`` was given, lse [C] float32,
        d(coef * value)/dz [C, V] in logits' dtype or None).
    """
    V = logits.shape[1]
    z = logits.to(_math_dtype(logits.dtype))  # the same memory when logits are already float32
    tanh = None
    if spec.softcap is not None:
        tanh = z.div_(spec.softcap).tanh_()
        s = tanh * spec.softcap  # a second buffer: the derivative needs tanh
    else:
        s = z.div_(spec.temperature) if spec.temperature != 1.0 else z
    values = None
    if lse is None:
        s_y = s.gather(1, targets[:, None]).squeeze(1)
        smoothed = spec.kind == "ce" and spec.label_smoothing > 0
        mean_s = s.mean(dim=1) if smoothed else None
        m = s.amax(dim=1)
        p = _exp_shifted(s.sub_(m[:, None]))
        sum_exp = p.sum(dim=1)
        lse = m + sum_exp.log()
        p.div_(sum_exp[:, None])
        if spec.kind == "ce":
            values = lse - (1.0 - spec.label_smoothing) * s_y
            if smoothed:
                values = values - spec.label_smoothing * mean_s
        else:
            values = s_y - lse
        values, lse = values.to(torch.float32), lse.to(torch.float32)
    else:
        p = _exp_shifted(s.sub_(lse.to(s.dtype)[:, None]))
    if coef is None:
        return values, lse, None
    grad = p  # d value / d s, built in place from the softmax
    one_hot = torch.ones(targets.shape[0], 1, dtype=grad.dtype, device=grad.device)
    if spec.kind == "ce":
        if spec.label_smoothing > 0:
            grad.sub_(spec.label_smoothing / V)
        grad.scatter_add_(1, targets[:, None], one_hot.mul_(-(1.0 - spec.label_smoothing)))
    else:
        grad.neg_().scatter_add_(1, targets[:, None], one_hot)
    grad.mul_(coef.to(grad.dtype)[:, None])
    if tanh is not None:
        grad.mul_(tanh.square_().neg_().add_(1.0))  # ds/dz = 1 - tanh^2
    elif spec.temperature != 1.0:
        grad.div_(spec.temperature)
    return values, lse, grad.to(logits.dtype)


__all__ = ["softmax_loss_chunk"]
