"""The torch backend of the attention family (memory-lean: no [B, H, M, N] tensor is ever built).

- The attention output: a streaming attention over key blocks with an online softmax, query chunk by query chunk.
  torch's CPU flash kernel (the one behind ``F.scaled_dot_product_attention``, which also returns a log-sum-exp)
  is faster, but its log-sum-exp was measured 6e-5 off a float64 oracle (float32 and float16 inputs), beyond the
  op's 1e-5 contract, so it is not used here.
- Where the caller needs no log-sum-exp: torch's SDPA (its fused CPU kernel) with the padding and causal
  masks, padding K and V zeroed first.
- The score row's image-token mass: from the row's log-sum-exp and the image keys only.

Math is float32 (float64 for float64 inputs). Arguments arrive validated by ``op.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

QUERY_CHUNK = 256
KEY_BLOCK = 512
IMAGE_CHUNK = 1024


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _key_mask(key_valid: Optional[torch.Tensor], n0: int, n1: int,
              row_limit: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
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


def _online_softmax_block(s: torch.Tensor, mask: Optional[torch.Tensor], m_i: torch.Tensor,
                          l_i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key block of the online softmax; returns (p, alpha, m_new). Fully masked rows keep m = -inf, p = 0."""
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m_new = torch.maximum(m_i, s.amax(dim=-1))
    m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[..., None])
    alpha = torch.exp(m_i - m_safe)
    l_i.mul_(alpha).add_(p.sum(dim=-1))
    return p, alpha, m_new


def _finish_lse(m_i: torch.Tensor, l_i: torch.Tensor) -> torch.Tensor:
    return torch.where(l_i > 0, m_i + torch.log(l_i), torch.full_like(m_i, float("-inf")))


def accumulate_row_mass(q_row: torch.Tensor, k: torch.Tensor, image_index: torch.Tensor, out: torch.Tensor,
                        lse_row: torch.Tensor, key_valid: Optional[torch.Tensor], key_limit: Optional[int],
                        scale: float, weight: float) -> None:
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


def _padding_zeroed(t: torch.Tensor, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """K or V with padding keys zeroed: their probability is 0, but 0 * NaN is NaN, so NaN there must not enter."""
    if key_valid is None:
        return t
    return t.masked_fill(~key_valid[:, None, :, None], 0.0)


def _streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                         key_valid: Optional[torch.Tensor], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dt = _math_dtype(q.dtype)
    o = torch.empty(B, Hq, M, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device)
    qg = q.reshape(B, Hkv, G, M, D)
    v = _padding_zeroed(v, key_valid)
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
            acc.mul_(alpha[..., None]).add_(torch.einsum("bhgmn,bhnd->bhgmd", p, v[:, :, n0:n1].to(dt)))
        out_c = torch.where(l_i[..., None] > 0, acc / l_i.clamp_min(torch.finfo(dt).tiny)[..., None], 0.0)
        o.view(B, Hkv, G, M, D)[:, :, :, m0:m1] = out_c.to(q.dtype)
        lse.view(B, Hkv, G, M)[:, :, :, m0:m1] = _finish_lse(m_i, l_i).to(torch.float32)
    return o, lse


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_valid: Optional[torch.Tensor],
              scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o [B, Hq, M, D] in q's dtype, lse [B, Hq, M] float32); see :func:`mmlatent.kernels.attention_with_scores`.

    Streams over key blocks (peak extra memory one [B, Hq, QUERY_CHUNK, KEY_BLOCK] block of scores). A row with
    no valid key gives o = 0, lse = -inf."""
    return _streaming_attention(q, k, v, causal, key_valid, scale)


def attention_with_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                          key_valid: Optional[torch.Tensor], image_index: Optional[torch.Tensor],
                          scores_out: Optional[torch.Tensor], score_row: int, scale: float,
                          weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention`, then the score row's image mass from its lse (``score_row`` already in [0, M))."""
    o, lse = attention(q, k, v, causal, key_valid, scale)
    if scores_out is not None:
        N, M = k.shape[2], q.shape[2]
        accumulate_row_mass(q[:, :, score_row], k, image_index, scores_out, lse[:, :, score_row], key_valid,
                            (N - M + score_row) if causal else None, scale, weight)
    return o, lse


def _causal_valid(key_valid: Optional[torch.Tensor], B: int, M: int, N: int, causal: bool,
                  device: torch.device) -> Optional[torch.Tensor]:
    """[B, 1, M, N] bool of the keys each query row may attend (bottom-right causal and padding), or None."""
    allowed = None
    if causal:
        allowed = (torch.arange(N, device=device)[None, :] <= torch.arange(M, device=device)[:, None] + (N - M))
        allowed = allowed[None, None]
    if key_valid is not None:
        padding = key_valid[:, None, None, :]
        allowed = padding if allowed is None else allowed & padding
    return None if allowed is None else allowed.expand(B, 1, M, N)


def attention_output_with_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                                 key_valid: Optional[torch.Tensor], image_index: Optional[torch.Tensor],
                                 scores_out: Optional[torch.Tensor], score_row: int, scale: float,
                                 weight: float) -> torch.Tensor:
    """o [B, Hq, M, D] from SDPA, then the score row's image mass by :func:`row_attention_mass` (no lse)."""
    B, Hq, M, _ = q.shape
    N = k.shape[2]
    allowed = _causal_valid(key_valid, B, M, N, causal, q.device)
    k_in, v_in = _padding_zeroed(k, key_valid), _padding_zeroed(v, key_valid)
    o = torch.nn.functional.scaled_dot_product_attention(q, k_in, v_in, attn_mask=allowed, scale=scale,
                                                         enable_gqa=Hq != k.shape[1])
    if allowed is not None:  # a row with no valid key is 0, as the other backends give it (SDPA leaves NaN)
        o = torch.where(allowed.any(dim=-1, keepdim=True), o, 0.0)
    if scores_out is not None:
        row_valid = None if allowed is None else allowed[:, 0, score_row]
        row_attention_mass(q[:, :, score_row], k, image_index, scores_out, row_valid, scale, weight)
    return o


def row_lse(q: torch.Tensor, k: torch.Tensor, *, key_valid: Optional[torch.Tensor] = None,
            scale: float) -> torch.Tensor:
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


def row_attention_mass(q: torch.Tensor, k: torch.Tensor, image_index: torch.Tensor, out: torch.Tensor,
                       key_valid: Optional[torch.Tensor], scale: float, weight: float) -> torch.Tensor:
    """See :func:`mmlatent.kernels.row_attention_mass`. Two streaming reads: all keys (lse), then image keys."""
    lse = row_lse(q, k, key_valid=key_valid, scale=scale)
    accumulate_row_mass(q, k, image_index, out, lse, key_valid, None, scale, weight)
    return out


__all__ = ["attention", "attention_with_scores", "attention_output_with_scores", "row_attention_mass", "row_lse",
           "accumulate_row_mass"]
