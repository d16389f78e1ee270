"""Pure-torch reference of every op: the test oracle, and the path CPU users run.

Memory-lean by construction: attention streams over key blocks with an online softmax (and over query chunks),
so no [B, H, M, N] or [B, H, N, N] tensor is ever built; the image-token mass of a score row is computed from the
row's log-sum-exp and the image keys only. Math is float32 (float64 for float64 inputs). Arguments arrive
validated by the public wrappers in :mod:`mmlatent.kernels`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

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
        mass = (p * visible[:, None, None, :]).sum(dim=(1, 2)).to(torch.float32)
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
            acc.mul_(alpha[..., None]).add_(torch.einsum("bhgmn,bhnd->bhgmd", p, v[:, :, n0:n1].to(dt)))
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


__all__ = ["attention_with_scores", "row_attention_mass", "row_lse", "select_topk_tokens", "rank_eligible", "eligible_tokens"]

