"""Public attention ops: ``attention_with_scores`` and ``row_attention_mass`` (contracts in DESIGN.md)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, reference
from .dispatch import OpDispatch, reference_reason, triton_float_reason

_MAX_TRITON_HEAD_DIM = 256


def _triton_attention_reason(device, dtype, head_dim, out=None) -> Optional[str]:
    why = triton_float_reason(device, dtype)
    if why is not None:
        return why
    if head_dim > _MAX_TRITON_HEAD_DIM:
        return f"head dim {head_dim} is above the Triton kernels' limit of {_MAX_TRITON_HEAD_DIM}"
    if out is not None and out.shape[1] > 1 and out.stride(1) != 1:
        return "the scores buffer is not contiguous along Ni, and it is updated in place"
    return None


ROW_ATTENTION_MASS = OpDispatch("row_attention_mass", {
    "triton": _triton_attention_reason,
    "reference": reference_reason,
})
ATTENTION_WITH_SCORES = OpDispatch("attention_with_scores", {
    "triton": _triton_attention_reason,
    "reference": reference_reason,
})


def _check_kv(q, k, name_k: str = "k", v=None):
    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    if D == 0:  # the default scale D ** -0.5 and the kernels' dot products need a head dim
        raise ValueError(f"q: expected a head dim D >= 1, got shape {tuple(q.shape)}")
    checks.tensor(name_k, k, dims=4, device=q.device)
    checks.same_dtype(name_k, k, "q", q)
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{name_k}: expected shape [B, Hkv, N, D] with B = {B}, D = {D}, got {tuple(k.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"{name_k}: its {k.shape[1]} heads must divide the {Hq} query heads of q (GQA)")
    if v is not None:
        checks.tensor("v", v, dims=4, device=q.device)
        checks.same_dtype("v", v, "q", q)
        checks.shape("v", v, tuple(k.shape), "[B, Hkv, N, D] like k")


def _check_key_valid(key_valid, B: int, N: int, device):
    if key_valid is not None:
        checks.tensor("key_valid", key_valid, dims=2, dtypes=(torch.bool,), device=device)
        checks.shape("key_valid", key_valid, (B, N), "[B, N]")


def _check_scores(image_index, scores_out, B: int, device, out_name: str):
    checks.tensor("image_index", image_index, dims=2, dtypes=(torch.int64,), device=device)
    checks.shape("image_index", image_index, (B, None), "[B, Ni]")
    checks.tensor(out_name, scores_out, dims=2, dtypes=(torch.float32,), device=device)
    checks.shape(out_name, scores_out, (B, image_index.shape[1]), "[B, Ni] like image_index")


# ---------------------------------------------------------------------------------------------- row_attention_mass

def _row_attention_mass_impl(q, k, image_index, out, key_valid, scale: float, weight: float) -> None:
    used = checks.check_index_range("image_index", image_index, k.shape[2])
    # No image slot to fill (all padding, Ni = 0, B = 0; N = 0 keys admits padding only): nothing to launch.
    if not used or q.shape[1] == 0:
        return
    backend = ROW_ATTENTION_MASS.choose(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], out=out)
    with torch.no_grad():
        if backend == "triton":
            from .triton.attention import attention_forward
            attention_forward(q[:, :, None], k, None, causal=False,
                              key_valid=None if key_valid is None else key_valid.contiguous(),
                              image_index=image_index.contiguous(), scores_out=out, score_row=0, scale=scale,
                              weight=weight)
        else:
            reference.row_attention_mass(q, k, image_index, out, key_valid=key_valid, scale=scale, weight=weight)


@torch.library.custom_op("mmlatent::row_attention_mass", mutates_args=("out",))
def _row_attention_mass_op(q: torch.Tensor, k: torch.Tensor, image_index: torch.Tensor, out: torch.Tensor,
                           key_valid: Optional[torch.Tensor], scale: float, weight: float) -> None:
    _row_attention_mass_impl(q, k, image_index, out, key_valid, scale, weight)


@_row_attention_mass_op.register_fake
def _(q, k, image_index, out, key_valid, scale, weight) -> None:
    return None


def row_attention_mass(q: torch.Tensor, k: torch.Tensor, image_index: torch.Tensor, out: torch.Tensor, *,
                       key_valid: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                       weight: float = 1.0) -> torch.Tensor:
    """Adds the attention mass that one query row per batch item puts on each image token into ``out``.

    Args:
        q: [B, Hq, D] float16/bfloat16/float32/float64, one (post-RoPE) query row per batch item; D >= 1.
        k: [B, Hkv, N, D], same dtype; Hq % Hkv == 0 (GQA by index arithmetic, no repeated copies).
        image_index: [B, Ni] int64 key positions of the image tokens; -1 marks padding.
        out: [B, Ni] float32, accumulated in place; every element must have its own memory (an ``expand``-ed
            buffer raises ValueError before anything is written).
        key_valid: [B, N] bool, False for padding keys; None = all keys valid.
        scale: softmax scale, default D ** -0.5.
        weight: multiplies the added mass (e.g. 1 / num_layers to average over layers).

    Computes p = softmax over the valid keys of scale * q.k per head (in float32), and
    ``out[b, j] += weight * sum_h p[b, h, image_index[b, j]]``; padding entries stay untouched. With nothing to
    accumulate (Ni = 0, every entry padding, B = 0, or N = 0 keys, where only padding is allowed) no backend
    launches anything and ``out`` is unchanged. Meta tensors are accepted (shapes only; ``out`` is returned).

    Returns:
        ``out``.
    """
    checks.tensor("q", q, dims=3, dtypes=checks.FLOAT_DTYPES)
    _check_kv(q, k)
    B, N = q.shape[0], k.shape[2]
    _check_scores(image_index, out, B, q.device, "out")
    _check_key_valid(key_valid, B, N, q.device)
    checks.writable("out", out)
    scale = q.shape[-1] ** -0.5 if scale is None else checks.number("scale", scale, positive=True)
    weight = checks.number("weight", weight)
    if torch.compiler.is_compiling() or checks.on_meta(q):
        _row_attention_mass_op(q, k, image_index, out, key_valid, scale, weight)
    else:
        _row_attention_mass_impl(q, k, image_index, out, key_valid, scale, weight)
    return out


# ------------------------------------------------------------------------------------------- attention_with_scores

def _attention_with_scores_impl(q, k, v, causal: bool, key_valid, image_index, scores_out, score_row: int,
                                scale: float, weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if image_index is not None and not checks.check_index_range("image_index", image_index, k.shape[2]):
        image_index = scores_out = None  # no image slot to fill: attention only
    B, Hq, M, D = q.shape
    if B == 0 or Hq == 0 or M == 0:
        return torch.empty(B, Hq, M, D, dtype=q.dtype, device=q.device), \
            torch.empty(B, Hq, M, dtype=torch.float32, device=q.device)
    backend = ATTENTION_WITH_SCORES.choose(device=q.device, dtype=q.dtype, head_dim=D, out=scores_out)
    with torch.no_grad():
        if backend == "triton":
            from .triton.attention import attention_forward
            return attention_forward(q, k, v, causal=causal,
                                     key_valid=None if key_valid is None else key_valid.contiguous(),
                                     image_index=None if image_index is None else image_index.contiguous(),
                                     scores_out=scores_out, score_row=score_row, scale=scale, weight=weight)
        return reference.attention_with_scores(q, k, v, causal=causal, key_valid=key_valid, image_index=image_index,
                                               scores_out=scores_out, score_row=score_row, scale=scale,
                                               weight=weight)


@torch.library.custom_op("mmlatent::attention_with_scores", mutates_args=("scores_out",))
def _attention_with_scores_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                              key_valid: Optional[torch.Tensor], image_index: Optional[torch.Tensor],
                              scores_out: Optional[torch.Tensor], score_row: int, scale: float,
                              weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _attention_with_scores_impl(q, k, v, causal, key_valid, image_index, scores_out, score_row, scale, weight)


@_attention_with_scores_op.register_fake
def _(q, k, v, causal, key_valid, image_index, scores_out, score_row, scale, weight):
    B, Hq, M, D = q.shape
    return q.new_empty(B, Hq, M, D), q.new_empty(B, Hq, M, dtype=torch.float32)


def attention_with_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                          key_valid: Optional[torch.Tensor] = None, image_index: Optional[torch.Tensor] = None,
                          scores_out: Optional[torch.Tensor] = None, score_row: int = -1,
                          scale: Optional[float] = None, weight: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention that also accumulates one query row's attention mass on the image tokens, in the same pass.

    Args:
        q: [B, Hq, M, D] float16/bfloat16/float32/float64 (post-RoPE), D >= 1.
        k, v: [B, Hkv, N, D], same dtype, N >= M, Hq % Hkv == 0.
        causal: query row i sits at key position N - M + i (KV-cache convention, bottom-right aligned).
        key_valid: [B, N] bool, False for padding keys: they never contribute, whatever K and V hold there
            (NaN included).
        image_index: [B, Ni] int64 key positions of the image tokens (-1 = padding); given with ``scores_out``.
        scores_out: [B, Ni] float32; receives ``weight * sum_h p[b, h, score_row, image_index[b, j]]`` exactly as
            :func:`row_attention_mass` would compute it for that row (with the causal and padding masks). Every
            element must have its own memory (ValueError otherwise, before anything is written); untouched when
            every entry of ``image_index`` is padding.
        score_row: which query row's mass to accumulate, in [-M, M).
        scale: softmax scale, default D ** -0.5.

    Returns:
        (o [B, Hq, M, D] in q's dtype, lse [B, Hq, M] float32). A row with no valid key gives o = 0, lse = -inf.
        Forward only: raises ValueError if gradients are required. Meta tensors give meta outputs (shapes only).
    """
    checks.tensor("q", q, dims=4, dtypes=checks.FLOAT_DTYPES)
    _check_kv(q, k, "k", v)
    B, Hq, M, D = q.shape
    N = k.shape[2]
    if N < M:
        raise ValueError(f"k: expected at least as many keys as query rows (N >= M), got N = {N}, M = {M}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("attention_with_scores is forward-only, but q, k or v requires grad: run it under "
                         "torch.no_grad(), or use F.scaled_dot_product_attention for the differentiable pass")
    _check_key_valid(key_valid, B, N, q.device)
    if (image_index is None) != (scores_out is None):
        raise ValueError("image_index and scores_out: give both (to accumulate image-token mass) or neither")
    if scores_out is not None:
        _check_scores(image_index, scores_out, B, q.device, "scores_out")
        checks.writable("scores_out", scores_out)
    if isinstance(score_row, bool) or not isinstance(score_row, int):
        raise TypeError(f"score_row: expected an int, got {type(score_row).__name__}")
    if M > 0 and not -M <= score_row < M:
        raise ValueError(f"score_row: expected a row in [-{M}, {M}), got {score_row}")
    score_row = score_row % M if M > 0 else 0
    scale = D ** -0.5 if scale is None else checks.number("scale", scale, positive=True)
    weight = checks.number("weight", weight)
    if torch.compiler.is_compiling() or checks.on_meta(q):
        return _attention_with_scores_op(q, k, v, causal, key_valid, image_index, scores_out, score_row, scale,
                                         weight)
    return _attention_with_scores_impl(q, k, v, causal, key_valid, image_index, scores_out, score_row, scale, weight)
