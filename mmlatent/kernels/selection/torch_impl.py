"""The torch backend of select_topk_tokens: two stable sorts rank every row exactly in any float dtype (no
packing of values into keys), then a scatter marks the selection and a gather copies the embeddings. Every row is
checked before anything is modified."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def rank_eligible(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Permutation [B, Ni] of each row, best first: eligible before ineligible, then higher score first, NaN below
    every number, ties to the lower index. Exact in every float dtype (two stable sorts, no value packing)."""
    filled = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    by_score = torch.sort(filled, dim=1, descending=True, stable=True).indices
    rank_class = eligible.to(torch.int8) * 2 + (eligible & ~torch.isnan(scores)).to(torch.int8)
    by_class = torch.sort(torch.gather(rank_class, 1, by_score), dim=1, descending=True, stable=True).indices
    return torch.gather(by_score, 1, by_class)


def eligible_tokens(scores: torch.Tensor, exclude: Optional[torch.Tensor], valid: Optional[torch.Tensor],
                    k: int) -> torch.Tensor:
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


def select_topk_tokens(scores: torch.Tensor, k: int, exclude: Optional[torch.Tensor], valid: Optional[torch.Tensor],
                       embeds: Optional[torch.Tensor],
                       by_position: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """See :func:`mmlatent.kernels.select_topk_tokens`. Checks every row before modifying anything."""
    B, Ni = scores.shape
    eligible = eligible_tokens(scores, exclude, valid, k)
    idx = rank_eligible(scores, eligible)[:, :k]
    if by_position:
        idx = idx.sort(dim=1).values
    if exclude is not None:
        exclude.scatter_(1, idx, True)
    gathered = None
    if embeds is not None:
        gathered = torch.gather(embeds, 1, idx[:, :, None].expand(B, k, embeds.shape[2]))
    return idx, gathered


__all__ = ["rank_eligible", "eligible_tokens", "select_topk_tokens"]
