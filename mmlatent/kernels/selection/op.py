"""Public selection op: ``select_topk_tokens``.

The public function validates and documents; the ``mmlatent::select_topk_tokens`` custom op (fake implementation
registered; no autograd: indices and bit copies have no gradient) wraps the computation; inside it dispatch
chooses once among the C++/CUDA op of ``mmlatent._C``, the Triton kernel and the torch implementation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import checks
from ..dispatch import OpDispatch, Reasons, native_reasons, torch_reasons, triton_reasons
from ..limits import SELECTION_TRITON_MAX_TOKENS, cuda_select_max_tokens
from . import torch_impl


def _contiguous_exclude_reasons(exclude) -> Reasons:
    if exclude is not None and not exclude.is_contiguous():
        return ["exclude is not contiguous, and it is updated in place"]
    return []


def _native_reasons(scores, exclude, embeds, **_) -> Reasons:
    reasons = native_reasons(scores.device) + _contiguous_exclude_reasons(exclude)
    if scores.device.type == "cuda":
        if scores.dtype == torch.float64:
            reasons.append("the CUDA op ranks float32/float16/bfloat16 scores (float64: native CPU op or torch)")
        if not reasons:  # the extension imports: ask it for the cap it was compiled with
            try:
                cap = cuda_select_max_tokens()
            except AttributeError:
                reasons.append("mmlatent._C predates its sources (rebuild it: pip install -e .)")
            else:
                if scores.shape[1] > cap:
                    reasons.append(f"the CUDA op ranks at most {cap} tokens per row, got Ni = {scores.shape[1]}")
        if embeds is not None and (embeds.shape[2] * embeds.element_size()) % 2:
            reasons.append("the CUDA op gathers rows of an even number of bytes")
    return reasons


def _triton_reasons(scores, exclude, embeds, **_) -> Reasons:
    reasons = triton_reasons(scores.device) + _contiguous_exclude_reasons(exclude)
    if scores.dtype == torch.float64:
        reasons.append("float64 scores would be ranked after rounding to float32 (native CPU op and torch are "
                       "exact)")
    if scores.shape[1] > SELECTION_TRITON_MAX_TOKENS:
        reasons.append(f"one Triton program ranks at most {SELECTION_TRITON_MAX_TOKENS} tokens, got "
                       f"Ni = {scores.shape[1]}")
    return reasons


SELECT_TOPK_TOKENS = OpDispatch("select_topk_tokens", {
    "native": _native_reasons,
    "triton": _triton_reasons,
    "torch": torch_reasons,
})


@torch.library.custom_op("mmlatent::select_topk_tokens", mutates_args=("exclude",))
def _select_topk_tokens_op(scores: torch.Tensor, k: int, exclude: Optional[torch.Tensor],
                           valid: Optional[torch.Tensor], embeds: Optional[torch.Tensor],
                           by_position: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    backend = SELECT_TOPK_TOKENS.choose(scores=scores, exclude=exclude, embeds=embeds)
    if backend == "native":
        return torch.ops.mmlatent.select_topk_tokens_native(scores, k, exclude, valid, embeds, not by_position)
    if backend == "triton":
        from .triton_kernels import select_topk  # imports triton: only once that backend was chosen
        torch_impl.eligible_tokens(scores, exclude, valid, k)  # raises before anything is modified
        return select_topk(scores.contiguous(), k, exclude=exclude,
                           valid=None if valid is None else valid.contiguous(),
                           embeds=None if embeds is None else embeds.contiguous(), by_position=by_position)
    idx, gathered = torch_impl.select_topk_tokens(scores, k, exclude, valid, embeds, by_position)
    if gathered is None:
        gathered = scores.new_empty(scores.shape[0], k, 0)
    return idx, gathered


@_select_topk_tokens_op.register_fake
def _(scores, k, exclude, valid, embeds, by_position):
    B = scores.shape[0]
    idx = scores.new_empty(B, k, dtype=torch.int64)
    if embeds is None:
        return idx, scores.new_empty(B, k, 0)
    return idx, embeds.new_empty(B, k, embeds.shape[2])


def _native_fake(scores, k, exclude, valid, embeds, order_by_score):
    return _(scores, k, exclude, valid, embeds, not order_by_score)


def register_native_fake() -> None:
    """Fake (meta) implementation of the C++ op, once mmlatent._C has registered it."""
    if hasattr(torch.ops.mmlatent, "select_topk_tokens_native"):
        torch.library.register_fake("mmlatent::select_topk_tokens_native", _native_fake)


# Gathers are bit copies: embeds of a dtype that some backend cannot load or gather (complex numbers in Triton,
# float8 and unsigned 16/32/64-bit integers in torch.gather on the CPU) travel as integers of the same width.
_GATHERED_AS_IS = checks.FLOAT_DTYPES + (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_gatherable(embeds: torch.Tensor) -> torch.Tensor:
    if embeds.dtype in _GATHERED_AS_IS:
        return embeds
    if embeds.is_complex():  # (real, imag) pairs: complex128 has no 16-byte integer
        return torch.view_as_real(embeds).flatten(2)
    if embeds.element_size() not in _SAME_WIDTH_INT:
        raise TypeError(f"embeds: dtype {embeds.dtype} has no gather (elements of {embeds.element_size()} bytes)")
    return embeds.view(_SAME_WIDTH_INT[embeds.element_size()])


def _restore_dtype(gathered: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if gathered.dtype == dtype:
        return gathered
    if dtype.is_complex:
        return torch.view_as_complex(gathered.unflatten(2, (-1, 2)))
    return gathered.view(dtype)


def select_topk_tokens(scores: torch.Tensor, k: int, *, exclude: Optional[torch.Tensor] = None,
                       valid: Optional[torch.Tensor] = None, embeds: Optional[torch.Tensor] = None,
                       order: str = "position") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Selects, per row, the k eligible tokens with the highest score, marks them excluded and gathers them.

    Args:
        scores: [B, Ni] float (any float dtype).
        k: tokens to select per row, 1 <= k <= Ni.
        exclude: [B, Ni] bool, updated in place: selected entries become True. Excluded tokens are ineligible.
        valid: [B, Ni] bool, False at padding. Eligible = valid and not excluded.
        embeds: [B, Ni, Dm] optional, any dtype (complex and float8 too); the selected rows are gathered.
        order: "position" (indices ascending, spatial order kept) or "score" (best first).

    Ranking: higher score first, ties to the lower index, NaN ranks below every number. A row with fewer than k
    eligible tokens raises ValueError naming the row, and nothing is modified; so does an ``exclude`` whose
    elements share memory (an ``expand``-ed mask). Meta tensors give meta outputs (shapes only).

    Returns:
        (idx [B, k] int64 indices into the Ni axis, gathered [B, k, Dm] in embeds' dtype, or None).

    Example::

        >>> exclude = torch.zeros(1, 4, dtype=torch.bool)
        >>> select_topk_tokens(torch.tensor([[0.1, 0.9, 0.5, 0.9]]), 2, exclude=exclude)[0]
        tensor([[1, 3]])
    """
    checks.tensor("scores", scores, dims=2, dtypes=checks.FLOAT_DTYPES)
    B, Ni = scores.shape
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= Ni:
        raise ValueError(f"k: expected 1 <= k <= Ni = {Ni}, got {k}")
    for name, mask in (("exclude", exclude), ("valid", valid)):
        if mask is not None:
            checks.tensor(name, mask, dims=2, dtypes=(torch.bool,), device=scores.device)
            checks.shape(name, mask, (B, Ni), "[B, Ni] like scores")
    if exclude is not None:
        checks.writable("exclude", exclude)
    if embeds is not None:
        checks.tensor("embeds", embeds, dims=3, device=scores.device)
        checks.shape("embeds", embeds, (B, Ni, None), "[B, Ni, Dm]")
    if order not in ("position", "score"):
        raise ValueError(f"order: expected 'position' or 'score', got {order!r}")
    by_position = order == "position"
    bits = None if embeds is None else _as_gatherable(embeds)
    idx, gathered = _select_topk_tokens_op(scores, k, exclude, valid, bits, by_position)
    return idx, (_restore_dtype(gathered, embeds.dtype) if embeds is not None else None)


__all__ = ["select_topk_tokens", "register_native_fake", "SELECT_TOPK_TOKENS"]
