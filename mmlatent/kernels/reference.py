"""Pure-torch reference of every op: the test oracle, and the path CPU users run.

Memory-lean by construction: attention streams over key blocks with an online softmax (and over query chunks),
so no [B, H, M, N] or [B, H, N, N] tensor is ever built; the image-token mass of a score row is computed from the
row's log-sum-exp and the image keys only. Linear-softmax losses walk row chunks of the logits and never build
[T, V]. Math is float32 (float64 for float64 inputs). Arguments arrive
validated by the public wrappers in :mod:`mmlatent.kernels`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.nn import functional as F

QUERY_CHUNK = 256
KEY_BLOCK = 512
IMAGE_CHUNK = 1024


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _key_mask(key_valid: Optional[torch.Tensor], n0: int, n1: int, row_limit: Optional[torch.Tensor]):
    """Allowed keys of block [n0, n1): [B or 1, 1, 1, rows or 1, n1-n0] bool, or None when all are allowed.

    ``row_limit`` [rows] holds the last key position each query row may see (causal), or None.
    """
    mask = None
    if key_valid is not None:
        mask = key_valid[:, n0:n1][:, None, None, None, :]
    if row_limit is not None:
        cols = torch.arange(n0, n1, device=row_limit.device)
        causal = (cols[None, :] <= row_limit[:, None])[None, None, None]
        mask = causal if mask is None else mask & causal
    return mask


def _online_softmax_block(s, mask, m_i, l_i):
    """One key block of the online softmax; returns (p, alpha, m_new). Fully masked rows keep m = -inf, p = 0."""
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m_new = torch.maximum(m_i, s.amax(dim=-1))
    m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[..., None])
    alpha = torch.exp(m_i - m_safe)
    l_i.mul_(alpha).add_(p.sum(dim=-1))
    return p, alpha, m_new


def _finish_lse(m_i, l_i):
    return torch.where(l_i > 0, m_i + torch.log(l_i), torch.full_like(m_i, float("-inf")))


def _accumulate_row_mass(q_row, k, image_index, out, lse_row, key_valid, key_limit: Optional[int], scale, weight):
    """out[b, j] += weight * sum_h exp(scale * q_row[b,h] . k[b, h_kv, image_index[b,j]] - lse_row[b,h]).

    q_row [B, Hq, D]; lse_row [B, Hq] (natural log); key_limit: last visible key position (causal) or None.
    Reads only the image keys, in chunks of IMAGE_CHUNK slots; padding slots (-1) stay untouched.
    """
    B, Hq, D = q_row.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dt = _math_dtype(q_row.dtype)
    qg = (q_row.to(dt) * scale).view(B, Hkv, G, D)
    lse = lse_row.to(dt).view(B, Hkv, G, 1)
    for j0 in range(0, image_index.shape[1], IMAGE_CHUNK):
        idx = image_index[:, j0:j0 + IMAGE_CHUNK]
        pad = idx < 0
        safe = idx.clamp(min=0)
        keys = torch.gather(k, 2, safe[:, None, :, None].expand(B, Hkv, safe.shape[1], D)).to(dt)
        s = torch.einsum("bhgd,bhnd->bhgn", qg, keys)
        p = torch.where(torch.isneginf(lse), torch.zeros_like(s), torch.exp(s - lse))
        visible = ~pad
        if key_valid is not None:
            visible = visible & torch.gather(key_valid, 1, safe)
        if key_limit is not None:
            visible = visible & (idx <= key_limit)
        # where, not a product: a padding key's logit may be NaN (NaN K), and 0 * NaN is NaN
        mass = torch.where(visible[:, None, None, :], p, 0.0).sum(dim=(1, 2)).to(torch.float32)
        chunk = out[:, j0:j0 + IMAGE_CHUNK]
        chunk.copy_(torch.where(pad, chunk, chunk + weight * mass))


def attention_with_scores(q, k, v, *, causal: bool = True, key_valid=None, image_index=None, scores_out=None,
                          score_row: int = -1, scale: Optional[float] = None,
                          weight: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Streaming attention; see :func:`mmlatent.kernels.attention_with_scores` for the contract.

    Peak extra memory: one [B, Hq, QUERY_CHUNK, KEY_BLOCK] block of scores, never [B, Hq, M, N].
    """
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    dt = _math_dtype(q.dtype)
    o = torch.empty(B, Hq, M, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device)
    qg = q.reshape(B, Hkv, G, M, D)
    for m0 in range(0, M, QUERY_CHUNK):
        m1 = min(M, m0 + QUERY_CHUNK)
        qc = qg[:, :, :, m0:m1].to(dt) * scale
        row_limit = (torch.arange(m0, m1, device=q.device) + (N - M)) if causal else None
        hi = min(N, N - M + m1) if causal else N
        m_i = torch.full((B, Hkv, G, m1 - m0), float("-inf"), dtype=dt, device=q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros(B, Hkv, G, m1 - m0, D, dtype=dt, device=q.device)
        for n0 in range(0, hi, KEY_BLOCK):
            n1 = min(hi, n0 + KEY_BLOCK)
            s = torch.einsum("bhgmd,bhnd->bhgmn", qc, k[:, :, n0:n1].to(dt))
            p, alpha, m_i = _online_softmax_block(s, _key_mask(key_valid, n0, n1, row_limit), m_i, l_i)
            vb = v[:, :, n0:n1].to(dt)
            if key_valid is not None:  # p is 0 at padding keys, but 0 * NaN is NaN: their V must not reach acc
                vb = vb.masked_fill(~key_valid[:, None, n0:n1, None], 0.0)
            acc.mul_(alpha[..., None]).add_(torch.einsum("bhgmn,bhnd->bhgmd", p, vb))
        out_c = torch.where(l_i[..., None] > 0, acc / l_i.clamp_min(torch.finfo(dt).tiny)[..., None], 0.0)
        o.view(B, Hkv, G, M, D)[:, :, :, m0:m1] = out_c.to(q.dtype)
        lse.view(B, Hkv, G, M)[:, :, :, m0:m1] = _finish_lse(m_i, l_i).to(torch.float32)
    if scores_out is not None:
        r = score_row % M
        _accumulate_row_mass(q[:, :, r], k, image_index, scores_out, lse[:, :, r], key_valid,
                             (N - M + r) if causal else None, scale, weight)
    return o, lse


def row_lse(q, k, *, key_valid=None, scale: float) -> torch.Tensor:
    """Log-sum-exp [B, Hq] (float32 or float64) of one query row per batch item over all (valid) keys."""
    B, Hq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    dt = _math_dtype(q.dtype)
    qg = q.to(dt).view(B, Hkv, Hq // Hkv, 1, D) * scale
    m_i = torch.full((B, Hkv, Hq // Hkv, 1), float("-inf"), dtype=dt, device=q.device)
    l_i = torch.zeros_like(m_i)
    for n0 in range(0, N, KEY_BLOCK):
        n1 = min(N, n0 + KEY_BLOCK)
        s = torch.einsum("bhgmd,bhnd->bhgmn", qg, k[:, :, n0:n1].to(dt))
        _, _, m_i = _online_softmax_block(s, _key_mask(key_valid, n0, n1, None), m_i, l_i)
    return _finish_lse(m_i, l_i).view(B, Hq)


def row_attention_mass(q, k, image_index, out, *, key_valid=None, scale: Optional[float] = None,
                       weight: float = 1.0) -> torch.Tensor:
    """See :func:`mmlatent.kernels.row_attention_mass`. Two streaming reads: all keys (lse), then image keys."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lse = row_lse(q, k, key_valid=key_valid, scale=scale)
    _accumulate_row_mass(q, k, image_index, out, lse, key_valid, None, scale, weight)
    return out


def rank_eligible(scores, eligible) -> torch.Tensor:
    """Permutation [B, Ni] of each row, best first: eligible before ineligible, then higher score first, NaN below
    every number, ties to the lower index. Exact in every float dtype (two stable sorts, no value packing)."""
    filled = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    by_score = torch.sort(filled, dim=1, descending=True, stable=True).indices
    rank_class = eligible.to(torch.int8) * 2 + (eligible & ~torch.isnan(scores)).to(torch.int8)
    by_class = torch.sort(torch.gather(rank_class, 1, by_score), dim=1, descending=True, stable=True).indices
    return torch.gather(by_score, 1, by_class)


def eligible_tokens(scores, exclude, valid, k: int) -> torch.Tensor:
    """valid & ~exclude [B, Ni] bool; ValueError naming the first row with fewer than k eligible tokens."""
    B, Ni = scores.shape
    eligible = torch.ones(B, Ni, dtype=torch.bool, device=scores.device) if valid is None else valid.clone()
    if exclude is not None:
        eligible &= ~exclude
    counts = eligible.sum(dim=1)
    short = counts < k
    if bool(short.any()):
        row = int(short.nonzero()[0, 0])
        raise ValueError(f"select_topk_tokens: row {row} has {int(counts[row])} eligible tokens (valid and not "
                         f"excluded), fewer than k = {k}")
    return eligible


def select_topk_tokens(scores, k: int, *, exclude=None, valid=None, embeds=None,
                       order: str = "position") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """See :func:`mmlatent.kernels.select_topk_tokens`. Checks every row before modifying anything."""
    B, Ni = scores.shape
    eligible = eligible_tokens(scores, exclude, valid, k)
    idx = rank_eligible(scores, eligible)[:, :k]
    if order == "position":
        idx = idx.sort(dim=1).values
    if exclude is not None:
        exclude.scatter_(1, idx, True)
    gathered = None
    if embeds is not None:
        gathered = torch.gather(embeds, 1, idx[:, :, None].expand(B, k, embeds.shape[2]))
    return idx, gathered





# ------------------------------------------------------------------------------------------------- linear losses
#
# A linear-softmax loss reads logits z = hidden @ weight.T + bias [T, V] one row chunk at a time: the chunk's logits,
# softmax and gradient live in one [chunk_rows, V] buffer that is overwritten in place and freed before the next
# chunk, so the extra memory is O(chunk_rows * V), never O(T * V).

@dataclass(frozen=True)
class SoftmaxLossSpec:
    """What one row of a linear-softmax loss computes from its logits z (row of hidden @ weight.T + bias).

    s = softcap * tanh(z / softcap) when ``softcap`` is set, else z / temperature; lse = logsumexp_j s_j;
    ``kind`` "ce": value = lse - (1 - label_smoothing) * s_y - label_smoothing * mean_j s_j (PyTorch's
    label-smoothed cross-entropy); ``kind`` "logp": value = s_y - lse (the log-probability of token y).
    """

    kind: str
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    temperature: float = 1.0


def softmax_loss_chunk(logits: torch.Tensor, targets: torch.Tensor, spec: SoftmaxLossSpec, *,
                       lse: Optional[torch.Tensor] = None, coef: Optional[torch.Tensor] = None):
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
        p = s.sub_(m[:, None]).exp_()
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
        p = s.sub_(lse.to(s.dtype)[:, None]).exp_()
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


def linear_softmax_loss(hidden, weight, bias, targets, spec: SoftmaxLossSpec, chunk_rows: int, *,
                        lse: Optional[torch.Tensor] = None, coef: Optional[torch.Tensor] = None,
                        needs=(False, False, False), chunk_fn=softmax_loss_chunk):
    """Walks ``hidden`` in chunks of ``chunk_rows`` rows: logits by one GEMM, then ``chunk_fn`` (this module's
    :func:`softmax_loss_chunk` or a Triton kernel with the same contract), then the chunk's gradient GEMMs.

    Args:
        hidden: [T, H]; weight: [V, H]; bias: [V] or None (all one dtype); targets: [T] int64 in [0, V).
        lse: [T] float32 from the forward pass (recompute mode, for per-row upstream gradients), or None.
        coef: [T] or [1] float32 multiplier of each row's gradient; None: no gradients.
        needs: which of (hidden, weight, bias) receive gradients (with ``coef``).

    Returns:
        (values [T] float32 or None, lse [T] float32, grad_hidden, grad_weight, grad_bias): each gradient in its
        input's dtype, or None when not needed. With 16-bit weights and more than one chunk, grad_weight
        accumulates in a float32 buffer (4 * V * H bytes) and is rounded once at the end.
    """
    T = hidden.shape[0]
    want_h, want_w, want_b = (bool(n) and coef is not None for n in needs)
    values = torch.empty(T, dtype=torch.float32, device=hidden.device) if lse is None else None
    lse_out = torch.empty(T, dtype=torch.float32, device=hidden.device) if lse is None else lse
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if want_b else None
    weight_t = weight.t()
    chunk_rows = balanced_chunk_rows(T, chunk_rows)
    for r0 in range(0, T, chunk_rows):
        r1 = min(T, r0 + chunk_rows)
        h = hidden[r0:r1]
        logits = h @ weight_t if bias is None else torch.addmm(bias, h, weight_t)
        row_coef = None if coef is None else (coef if coef.shape[0] == 1 else coef[r0:r1])
        v, l, g = chunk_fn(logits, targets[r0:r1], spec, lse=None if lse is None else lse[r0:r1], coef=row_coef)
        del logits
        if values is not None:
            values[r0:r1] = v
            lse_out[r0:r1] = l
        if g is None:
            continue
        if want_h:
            torch.mm(g, weight, out=grad_h[r0:r1])
        if want_w:
            if grad_w is None:
                accumulate_fp32 = weight.dtype in (torch.float16, torch.bfloat16) and r1 < T
                grad_w = torch.zeros(weight.shape, dtype=torch.float32 if accumulate_fp32 else weight.dtype,
                                     device=weight.device)
            _accumulate_mm(grad_w, g.t(), h)
        if want_b:
            grad_b += g.sum(dim=0, dtype=torch.float32)
    if grad_b is not None:
        grad_b = grad_b.to(weight.dtype)
    if grad_w is not None and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    return values, lse_out, grad_h, grad_w, grad_b


def balanced_chunk_rows(total: int, limit: int, align: int = 16) -> int:
    """Rows per chunk, at most ``limit``, that split ``total`` rows into as few chunks as ``limit`` allows, of equal
    size (a multiple of ``align`` where that stays within the limit): no GEMM on a thin tail chunk."""
    chunks = -(-total // limit)
    rows = -(-total // chunks)
    aligned = -(-rows // align) * align
    return aligned if aligned <= limit else rows


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc float32 while a and b are 16-bit when the sum spans several chunks: one rounding to
    the weight's dtype at the end, as the naive single GEMM has (bf16 sums over n chunks lose ~sqrt(n) more)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:  # cuBLAS writes the float32 sum directly from 16-bit operands (torch >= 2.8)
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


# ---------------------------------------------------------------------------------------------- denoising steps

def denoise_step_(x: torch.Tensor, model_out: torch.Tensor, coefficients: torch.Tensor, clip: Optional[float],
                  noise: Optional[torch.Tensor]) -> torch.Tensor:
    """x [R, C] float32 <- cx * x + co * out + c0 * clamp(px * x + po * out) + sigma * noise, in place.

    coefficients: [R, 6] or [1, 6] float32 rows of a :class:`mmlatent.kernels.SamplerSchedule` table (columns cx,
    co, px, po, c0, sigma); model_out [R, C] any float dtype (upcast); noise [R, C] or None (no noise term)."""
    cx, co, px, po, c0, sigma = (c[:, None] for c in coefficients.unbind(dim=1))
    out = model_out.to(torch.float32)
    new = cx * x + co * out
    if clip is not None:
        new += c0 * (px * x + po * out).clamp(-clip, clip)
    if noise is not None:
        new += sigma * noise.to(torch.float32)
    return x.copy_(new)


# ------------------------------------------------------------------------------------------- adaLN modulation

def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension (no affine, statistics in float32) * (1 + scale) + shift.

    x, shift, scale: [..., W] of one float dtype; returns [..., W] in that dtype. Differentiable by autograd."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


# ------------------------------------------------------------------------------------------------ diffusion loss

def diffusion_mse(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, goal_x0: torch.Tensor,
                  goal_noise: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sum_r coef[r] * mean_c (pred - goal)^2 with goal = goal_x0[r] * x0 + goal_noise[r] * noise, in float32.

    pred, x0, noise: [R, C] (any float dtypes); goal_x0, goal_noise, coef: [R] float32. Differentiable by autograd
    in pred and x0."""
    goal = goal_x0[:, None] * x0.to(torch.float32) + goal_noise[:, None] * noise.to(torch.float32)
    return (coef * (pred.to(torch.float32) - goal).square().mean(dim=1)).sum()


__all__ = ["attention_with_scores", "row_attention_mass", "row_lse", "select_topk_tokens", "rank_eligible",
           "eligible_tokens", "SoftmaxLossSpec", "softmax_loss_chunk", "linear_softmax_loss", "denoise_step_",
           "layer_norm_modulate", "diffusion_mse"]
