"""Attention family: attention_with_scores and row_attention_mass against what their users run without them.

Baselines:

- ``eager+output_attentions``: what IVT-LR's public code does: the full [B, H, M, N] probability matrix (as
  transformers' eager attention returns it with output_attentions), then the score row's image-token mass;
- ``sdpa``: torch's scaled_dot_product_attention, the same attention with no scores;
- ``torch row``: one query row's softmax over all keys by plain torch, then a gather.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from mmlatent.kernels import attention_with_scores, row_attention_mass

from ..case import Case, Inputs, Make
from ..ceilings import attention_flops, row_mass_bytes
from .inputs import cpu_generator, normal_tensors, pinned_backend


def _attention_inputs(B: int, Hq: int, Hkv: int, M: int, N: int, D: int, Ni: int) -> Make:
    """q [B, Hq, M, D], k and v [B, Hkv, N, D] in the run's dtype; image_index [B, Ni] int64 sorted distinct key
    positions; scores [B, Ni] float32 zeros (accumulated into); causal when there is more than one query row."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = cpu_generator()
        randn = normal_tensors(g, device, dtype)
        image_index = torch.stack([torch.randperm(N, generator=g)[:Ni].sort().values for _ in range(B)]).to(device)
        return dict(q=randn(B, Hq, M, D), k=randn(B, Hkv, N, D), v=randn(B, Hkv, N, D), image_index=image_index,
                    scores=torch.zeros(B, Ni, device=device), causal=M > 1)
    return make


def _bottom_right_causal_mask(M: int, N: int, device: torch.device) -> torch.Tensor:
    """[M, N] bool: query row i sees keys up to N - M + i (the queries are the last M positions)."""
    return torch.ones(M, N, dtype=torch.bool, device=device).tril(N - M)


def _eager_with_scores(a):
    """transformers' eager attention with output_attentions, then the last row's image-token mass."""
    q, k, v = a["q"], a["k"], a["v"]
    G = q.shape[1] // k.shape[1]
    M, N = q.shape[2], k.shape[2]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    w = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if a["causal"]:
        w = w.masked_fill(~_bottom_right_causal_mask(M, N, q.device), float("-inf"))
    probs = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = probs @ vv
    row = probs[:, :, -1].float().sum(1)
    a["scores"] += torch.gather(row, 1, a["image_index"])
    return out, probs


def _sdpa(a):
    q, k, v = a["q"], a["k"], a["v"]
    M, N = q.shape[2], k.shape[2]
    # torch's is_causal is top-left aligned: with fewer queries than keys the mask must be given
    mask = _bottom_right_causal_mask(M, N, q.device) if a["causal"] and M < N else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a["causal"] and M == N,
                                          enable_gqa=True)


def _ours_attention(a):
    with torch.no_grad():
        return attention_with_scores(a["q"], a["k"], a["v"], causal=a["causal"], image_index=a["image_index"],
                                     scores_out=a["scores"])


def attention_case(B: int, Hq: int, Hkv: int, M: int, N: int, D: int, Ni: int, with_eager: bool = True) -> Case:
    """Attention of M query rows over N keys (causal if M > 1) with the image-token mass of the last row;
    ``with_eager`` False drops the eager baseline where its [B, H, M, N] matrix does not fit."""
    baselines = {"sdpa": _sdpa}
    if with_eager:
        baselines = {"eager+output_attentions": _eager_with_scores, **baselines}
    return Case("attention_with_scores", f"B{B} Hq{Hq} Hkv{Hkv} M{M} N{N} D{D} Ni{Ni}",
                _attention_inputs(B, Hq, Hkv, M, N, D, Ni), _ours_attention, baselines,
                flops=attention_flops(B, Hq, M, N, D, causal=M > 1))


def _torch_row(a):
    q, k = a["q"][:, :, 0], a["k"]
    G = q.shape[1] // k.shape[1]
    s = torch.einsum("bhd,bhnd->bhn", q.float(), k.repeat_interleave(G, 1).float()) * q.shape[-1] ** -0.5
    p = torch.softmax(s, dim=-1).sum(1)
    a["scores"] += torch.gather(p, 1, a["image_index"])


def _ours_row_mass(a):
    return row_attention_mass(a["q"][:, :, 0], a["k"], a["image_index"], a["scores"])


def row_mass_case(B: int, Hq: int, Hkv: int, N: int, D: int, Ni: int, backends: Sequence[str] = ("torch",)) -> Case:
    """One query row's attention mass on Ni image tokens among N keys (the score IVT-LR selects by): the op as
    ``auto`` runs it against a plain softmax row and against the op with each backend of ``backends`` pinned."""
    baselines = {"torch row": _torch_row}
    baselines.update({f"{backend} backend": pinned_backend(backend, _ours_row_mass) for backend in backends})
    return Case("row_attention_mass", f"B{B} Hq{Hq} Hkv{Hkv} N{N} D{D} Ni{Ni}",
                _attention_inputs(B, Hq, Hkv, 1, N, D, Ni), _ours_row_mass, baselines,
                bytes_moved=row_mass_bytes(B, Hkv, N, D))


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":
        return [attention_case(1, 4, 2, 64, 64, 32, 16), attention_case(1, 4, 2, 1, 128, 32, 16),
                row_mass_case(1, 4, 2, 128, 32, 16)]
    if sizes == "gpu":  # Qwen2-7B's attention: 28 query heads, 4 KV heads, head dim 128
        grid = [attention_case(1, 28, 4, M, N, 128, min(N, 1024), with_eager=N <= 8192)
                for M in (1, 33, 512) for N in (512, 2048, 8192, 16384)]
        return grid + [row_mass_case(1, 28, 4, N, 128, min(N, 1024), backends=("native", "triton", "torch"))
                       for N in (2048, 8192, 16384, 65536)]
    return [attention_case(1, 16, 4, 4096, 4096, 64, 1024), attention_case(1, 16, 4, 1, 4096, 64, 1024),
            row_mass_case(2, 16, 4, 4096, 64, 1024)]
