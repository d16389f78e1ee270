"""Public attention ops: ``attention_with_scores`` and ``row_attention_mass``.

Each public function validates and documents; a ``torch.library`` custom op (fake implementation registered)
wraps the computation, so eager calls, ``torch.compile`` and meta tensors take one path; inside the op, dispatch
chooses the backend once per call. Both ops are forward-only: they produce a selection signal, never a gradient.

- ``mmlatent::attention_with_scores`` (mutates ``scores_out``): attention and the score row's image mass in one
  pass (Triton), or attention then the mass from the row's lse (torch).
- ``mmlatent::row_attention_mass`` (mutates ``out``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import checks
from ..dispatch import OpDispatch, Reasons, native_op_reasons, torch_reasons, triton_float_reasons, triton_or_torch
from ..limits import ATTENTION_MAX_HEAD_DIM, cuda_row_mass_limits
from . import torch_impl


def _triton_attention_reasons(device, dtype, head_dim, out=None, group=1) -> Reasons:
    reasons = triton_float_reasons(device, dtype)
    if head_dim > ATTENTION_MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} is above the Triton kernels' limit of {ATTENTION_MAX_HEAD_DIM}")
    if out is not None and out.shape[1] > 1 and out.stride(1) != 1:
        reasons.append("the scores buffer is not contiguous along Ni, and it is updated in place")
    return reasons


def _native_row_mass_reasons(device, dtype, head_dim, out=None, group=1) -> Reasons:
    reasons = native_op_reasons(device, "row_attention_mass_native")
    if device.type == "cuda" and not reasons:
        if dtype == torch.float64:
            reasons.append("the CUDA row mass reads float32 / float16 / bfloat16 (float64: native CPU op or torch)")
        try:
            max_group, max_head_dim = cuda_row_mass_limits()
        except AttributeError:
            reasons.append("mmlatent._C predates its sources (rebuild it: pip install -e .)")
        else:
            if head_dim > max_head_dim or group > max_group:
                reasons.append(f"the CUDA row mass takes head dims up to {max_head_dim} and up to {max_group} query "
                               f"heads per KV head, got {head_dim} and {group}")
        if out is not None and out.shape[1] > 1 and out.stride(1) != 1:
            reasons.append("the scores buffer is not contiguous along Ni, and it is updated in place")
    return reasons


# auto on CPU: native first, 2.57x faster than the torch backend at B2 Hq16 Hkv4 N4096 D64 Ni1024 (0.960 against
# 2.468 ms, benches/results/cpu-2core/kernels-row-attention-mass.md)
# On CUDA Triton first: 0.34-0.51 ms against the CUDA kernel's 0.93-1.41 ms at B1 Hq28 Hkv4 D128 Ni1024, N 2048 to
# 65536 on an H200 (benches/results/nvidia-h200/kernels-row-attention-mass.md, the kernel's earlier layout).
ROW_ATTENTION_MASS = OpDispatch("row_attention_mass", {"native": _native_row_mass_reasons,
                                                       "triton": _triton_attention_reasons, "torch": torch_reasons},
                                device_auto_order={"cuda": ("triton", "native", "torch")})
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
    backend = ROW_ATTENTION_MASS.choose(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], out=out,
                                        group=q.shape[1] // k.shape[1])
    if backend == "native":
        torch.ops.mmlatent.row_attention_mass_native(q, k, image_index, out, key_valid, scale, weight)
    elif backend == "triton":
        _triton_kernels().attention_forward(
            q[:, :, None], k, None, causal=False, key_valid=None if key_valid is None else key_valid.contiguous(),
            image_index=image_index.contiguous(), scores_out=out, score_row=0, scale=scale, weight=weight)
    else:
        torch_impl.row_attention_mass(q, k, image_index, out, key_valid, scale, weight)


@_row_attention_mass_op.register_fake
def _(q, k, image_index, out, key_valid, scale, weight) -> None:
    return None


def register_native_fake() -> None:
    """Fake (meta) implementation of the C++ op, once mmlatent._C has registered it."""
    if hasattr(torch.ops.mmlatent, "row_attention_mass_native"):
        torch.library.register_fake("mmlatent::row_attention_mass_native", lambda *args: None)


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


def _empty_attention(q, return_lse: bool = True):
    B, Hq, M, D = q.shape
    return q.new_empty(B, Hq, M, D), q.new_empty((B, Hq, M) if return_lse else (0,), dtype=torch.float32)


# ------------------------------------------------------------------------------------------- attention_with_scores

@torch.library.custom_op("mmlatent::attention_with_scores", mutates_args=("scores_out",))
def _attention_with_scores_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                              key_valid: Optional[torch.Tensor], image_index: Optional[torch.Tensor],
                              scores_out: Optional[torch.Tensor], score_row: int, scale: float,
                              weight: float, return_lse: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Without ``return_lse`` the second output is an empty [0] tensor (a custom op returns no None)."""
    if image_index is not None and not checks.check_index_range("image_index", image_index, k.shape[2]):
        image_index = scores_out = None  # no image slot to fill: attention only
    if q.numel() == 0:
        return _empty_attention(q, return_lse)
    backend = ATTENTION_WITH_SCORES.choose(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], out=scores_out)
    if backend == "triton":
        o, lse = _triton_kernels().attention_forward(
            q, k, v, causal=causal, key_valid=None if key_valid is None else key_valid.contiguous(),
            image_index=None if image_index is None else image_index.contiguous(), scores_out=scores_out,
            score_row=score_row, scale=scale, weight=weight)
    elif return_lse:
        o, lse = torch_impl.attention_with_scores(q, k, v, causal, key_valid, image_index, scores_out, score_row,
                                                  scale, weight)
    else:
        o, lse = torch_impl.attention_output_with_scores(q, k, v, causal, key_valid, image_index, scores_out,
                                                         score_row, scale, weight), None
    # the fake kernel promises a contiguous o, and a compiled graph reads it with those strides: SDPA's CPU path
    # returns it in [B, M, H, D] memory order
    return o.contiguous(), (lse if return_lse else q.new_empty(0, dtype=torch.float32))


@_attention_with_scores_op.register_fake
def _(q, k, v, causal, key_valid, image_index, scores_out, score_row, scale, weight, return_lse=True):
    return _empty_attention(q, return_lse)


def attention_with_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                          key_valid: Optional[torch.Tensor] = None, image_index: Optional[torch.Tensor] = None,
                          scores_out: Optional[torch.Tensor] = None, score_row: int = -1,
                          scale: Optional[float] = None, weight: float = 1.0,
                          return_lse: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
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
        return_lse: False when the caller needs only ``o`` (a model's attention layer); lse is then None, and the
            torch backend may take a faster path (below).

    Returns:
        (o [B, Hq, M, D] in q's dtype, lse [B, Hq, M] float32 or None). A row with no valid key gives o = 0,
        lse = -inf. Meta tensors give meta outputs (shapes only).

    Forward only: with gradients enabled and q, k or v requiring grad it raises ValueError (the mass is a
    selection signal; a differentiable pass uses the model's own attention and :func:`row_attention_mass`).

    Backends, chosen once per call: ``triton`` computes the attention and the mass in one pass (the score row's
    logits are written by the tiles that hold it). ``torch`` never builds [B, Hq, M, N]: with ``return_lse`` it
    runs a chunked online-softmax attention and takes the mass from the score row's lse and the image keys;
    without it, torch's SDPA gives ``o`` and :func:`row_attention_mass` the score row's mass (measured 2.4x faster
    than the chunked attention at B 2, Hq 8, M = N = 1110, D 32 on 2 cores). The lse is not taken from torch's
    CPU flash kernel, which returns one: it was measured 6e-5 off a float64 oracle, beyond this op's 1e-5
    contract.

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
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    o, lse = _attention_with_scores_op(q, k, v, causal, key_valid, image_index, scores_out, score_row, scale,
                                       weight, return_lse)
    return o, (lse if return_lse else None)


__all__ = ["attention_with_scores", "row_attention_mass", "ATTENTION_WITH_SCORES", "ROW_ATTENTION_MASS"]
