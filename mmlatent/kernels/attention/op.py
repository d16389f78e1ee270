"""Public attention ops: ``attention_with_scores`` and ``row_attention_mass``.

Each public function validates and documents; a ``torch.library`` custom op (fake implementation registered, and
the autograd formula where the op is differentiable) wraps the computation, so eager calls, ``torch.compile`` and
meta tensors take one path; inside the op, dispatch chooses the backend once per call.

- ``mmlatent::attention_with_scores`` (mutates ``scores_out``, forward only): attention and the score row's
  image mass in one pass (Triton), or attention then the mass from the row's lse (torch).
- ``mmlatent::attention`` (functional, with ``mmlatent::attention_backward`` as its autograd formula): the
  differentiable attention, which calls needing gradients take; their mass then comes from
  ``mmlatent::row_attention_mass`` under no_grad.
- ``mmlatent::row_attention_mass`` (mutates ``out``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import checks
from ..dispatch import Reasons, triton_float_reasons, triton_or_torch
from ..limits import ATTENTION_MAX_HEAD_DIM
from . import torch_impl


def _triton_attention_reasons(device, dtype, head_dim, out=None, needs_grad=False) -> Reasons:
    reasons = triton_float_reasons(device, dtype)
    if head_dim > ATTENTION_MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} is above the Triton kernels' limit of {ATTENTION_MAX_HEAD_DIM}")
    if out is not None and out.shape[1] > 1 and out.stride(1) != 1:
        reasons.append("the scores buffer is not contiguous along Ni, and it is updated in place")
    if needs_grad:
        reasons.append("the Triton attention kernels are forward-only, and q, k or v requires grad")
    return reasons


ROW_ATTENTION_MASS = triton_or_torch("row_attention_mass", _triton_attention_reasons)
ATTENTION_WITH_SCORES = triton_or_torch("attention_with_scores", _triton_attention_reasons)


def _triton_kernels():
    from . import triton_kernels  # imports triton: only once a Triton backend was chosen
    return triton_kernels


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

@torch.library.custom_op("mmlatent::row_attention_mass", mutates_args=("out",))
def _row_attention_mass_op(q: torch.Tensor, k: torch.Tensor, image_index: torch.Tensor, out: torch.Tensor,
                           key_valid: Optional[torch.Tensor], scale: float, weight: float) -> None:
    used = checks.check_index_range("image_index", image_index, k.shape[2])
    # No image slot to fill (all padding, Ni = 0, B = 0; N = 0 keys admits padding only): nothing to launch.
    if not used or q.shape[1] == 0:
        return
    backend = ROW_ATTENTION_MASS.choose(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], out=out)
    if backend == "triton":
        _triton_kernels().attention_forward(
            q[:, :, None], k, None, causal=False, key_valid=None if key_valid is None else key_valid.contiguous(),
            image_index=image_index.contiguous(), scores_out=out, score_row=0, scale=scale, weight=weight)
    else:
        torch_impl.row_attention_mass(q, k, image_index, out, key_valid, scale, weight)


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

    Example::

        >>> q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 10, 16)
        >>> out = torch.zeros(1, 3)
        >>> row_attention_mass(q, k, torch.tensor([[2, 5, -1]]), out)  # out[0, 2] stays 0 (padding)
    """
    checks.tensor("q", q, dims=3, dtypes=checks.FLOAT_DTYPES)
    _check_kv(q, k)
    B, N = q.shape[0], k.shape[2]
    _check_scores(image_index, out, B, q.device, "out")
    _check_key_valid(key_valid, B, N, q.device)
    checks.writable("out", out)
    scale = q.shape[-1] ** -0.5 if scale is None else checks.number("scale", scale, positive=True)
    weight = checks.number("weight", weight)
    with torch.no_grad():  # a mass for selection, never differentiated
        _row_attention_mass_op(q, k, image_index, out, key_valid, scale, weight)
    return out


# ------------------------------------------------------------------------------ attention (differentiable)

def _empty_attention(q):
    B, Hq, M, D = q.shape
    return q.new_empty(B, Hq, M, D), q.new_empty(B, Hq, M, dtype=torch.float32)


@torch.library.custom_op("mmlatent::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_valid: Optional[torch.Tensor],
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if q.numel() == 0:
        return _empty_attention(q)
    # Only calls that need gradients come here: the check says so, and rejects the forward-only kernels.
    ATTENTION_WITH_SCORES.choose(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], needs_grad=True)
    return torch_impl.attention(q, k, v, causal, key_valid, scale)


@_attention_op.register_fake
def _(q, k, v, causal, key_valid, scale):
    return _empty_attention(q)


@torch.library.custom_op("mmlatent::attention_backward", mutates_args=())
def _attention_backward_op(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           o: torch.Tensor, lse: torch.Tensor, causal: bool, key_valid: Optional[torch.Tensor],
                           scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return torch_impl.attention_backward(grad_o, q, k, v, o, lse, causal, key_valid, scale)


@_attention_backward_op.register_fake
def _(grad_o, q, k, v, o, lse, causal, key_valid, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, causal, key_valid, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, o, lse, key_valid)


def _attention_backward(ctx, grad_o, _grad_lse):
    q, k, v, o, lse, key_valid = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_o.contiguous(), q, k, v, o, lse, ctx.causal, key_valid, ctx.scale)
    return dq, dk, dv, None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# ------------------------------------------------------------------------------------------- attention_with_scores

@torch.library.custom_op("mmlatent::attention_with_scores", mutates_args=("scores_out",))
def _attention_with_scores_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                              key_valid: Optional[torch.Tensor], image_index: Optional[torch.Tensor],
                              scores_out: Optional[torch.Tensor], score_row: int, scale: float,
                              weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if image_index is not None and not checks.check_index_range("image_index", image_index, k.shape[2]):
        image_index = scores_out = None  # no image slot to fill: attention only
    if q.numel() == 0:
        return _empty_attention(q)
    backend = ATTENTION_WITH_SCORES.choose(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], out=scores_out)
    if backend == "triton":
        return _triton_kernels().attention_forward(
            q, k, v, causal=causal, key_valid=None if key_valid is None else key_valid.contiguous(),
            image_index=None if image_index is None else image_index.contiguous(), scores_out=scores_out,
            score_row=score_row, scale=scale, weight=weight)
    return torch_impl.attention_with_scores(q, k, v, causal, key_valid, image_index, scores_out, score_row, scale,
                                            weight)


@_attention_with_scores_op.register_fake
def _(q, k, v, causal, key_valid, image_index, scores_out, score_row, scale, weight):
    return _empty_attention(q)


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
        Meta tensors give meta outputs (shapes only).

    Gradients: ``o`` is differentiable in q, k and v (``lse`` is not; the mass never is). Such calls run the
    torch backend, since the Triton kernels are forward-only (a pinned ``MMLATENT_BACKEND=triton`` raises
    BackendUnavailableError saying so); their backward recomputes each block's probabilities from the lse, as
    flash-attention does. So a model calls this op for every layer, with or without gradients, and the op
    decides once per call what runs.

    Backends: ``triton`` computes the attention and the mass in one pass (the score row's logits are written by
    the tiles that hold it). ``torch`` computes a chunked online-softmax attention (never [B, Hq, M, N]), then
    the mass from the score row's lse and the image keys. torch's SDPA plus ``row_attention_mass`` measured 2.5x
    faster than that chunked attention at M = N = 1050 on 2 cores, but SDPA returns no lse, and torch's CPU
    flash kernel, which does, gives an lse 6e-5 off a float64 oracle, beyond this op's 1e-5 contract. So a
    caller that needs only ``o`` on the CPU (a model's rollout layer) is faster with SDPA and
    :func:`row_attention_mass`; this op keeps the contract.

    Example::

        >>> q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
        >>> scores = torch.zeros(1, 2)
        >>> o, lse = attention_with_scores(q, k, v, image_index=torch.tensor([[0, 1]]), scores_out=scores)
        >>> o.shape, lse.shape
        (torch.Size([1, 4, 3, 16]), torch.Size([1, 4, 3]))
    """
    checks.tensor("q", q, dims=4, dtypes=checks.FLOAT_DTYPES)
    _check_kv(q, k, "k", v)
    B, Hq, M, D = q.shape
    N = k.shape[2]
    if N < M:
        raise ValueError(f"k: expected at least as many keys as query rows (N >= M), got N = {N}, M = {M}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
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
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return _attention_with_scores_op(q, k, v, causal, key_valid, image_index, scores_out, score_row, scale,
                                         weight)
    o, lse = _attention_op(q, k, v, causal, key_valid, scale)
    if scores_out is not None and M > 0:
        row = q[:, :, score_row].detach()
        with torch.no_grad():
            if causal:  # the score row sees keys up to N - M + score_row only
                visible = torch.arange(N, device=q.device) <= N - M + score_row
                row_valid = visible[None].expand(B, N) if key_valid is None else key_valid & visible
            else:
                row_valid = key_valid
            _row_attention_mass_op(row, k.detach(), image_index, scores_out, row_valid, scale, weight)
    return o, lse


__all__ = ["attention_with_scores", "row_attention_mass", "ATTENTION_WITH_SCORES", "ROW_ATTENTION_MASS"]
