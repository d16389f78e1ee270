"""Selection family: select_topk_tokens against ``torch topk``, the same steps in plain torch (masked_fill +
torch.topk + sort + gather + scatter (index_put) of the exclusion mask)."""
from __future__ import annotations

from typing import List

import torch

from mmlatent.kernels import select_topk_tokens

from ..case import Case, Inputs, Make
from .inputs import cpu_generator


def _select_inputs(B: int, Ni: int, k: int, Dm: int) -> Make:
    """scores [B, Ni] float32; valid [B, Ni] bool (the first Ni/16 tokens padding); exclude [B, Ni] bool (~10%
    already chosen, updated in place); embeds [B, Ni, Dm] in the run's dtype; k the tokens to pick per row."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = cpu_generator()
        valid = torch.ones(B, Ni, dtype=torch.bool)
        valid[:, : Ni // 16] = False
        return dict(scores=torch.rand(B, Ni, generator=g).to(device), k=k, valid=valid.to(device),
                    exclude=(torch.rand(B, Ni, generator=g) < 0.1).to(device),
                    embeds=torch.randn(B, Ni, Dm, generator=g).to(device=device, dtype=dtype))
    return make


def _torch_topk(a):
    eligible = a["valid"] & ~a["exclude"]
    masked = a["scores"].masked_fill(~eligible, float("-inf"))
    idx = torch.topk(masked, a["k"], dim=1).indices.sort(dim=1).values
    gathered = torch.gather(a["embeds"], 1, idx[:, :, None].expand(-1, -1, a["embeds"].shape[2]))
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
    a["exclude"].index_put_((rows, idx), torch.ones((), dtype=torch.bool, device=idx.device))
    return idx, gathered


def _ours_select(a):
    return select_topk_tokens(a["scores"], a["k"], exclude=a["exclude"], valid=a["valid"], embeds=a["embeds"])


def select_case(B: int, Ni: int, k: int, Dm: int) -> Case:
    """Pick the k best-scoring eligible of Ni image tokens per row, gather their Dm-wide embeddings, mark them."""
    return Case("select_topk_tokens", f"B{B} Ni{Ni} k{k} Dm{Dm}", _select_inputs(B, Ni, k, Dm), _ours_select,
                {"torch topk": _torch_topk})


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":
        return [select_case(2, 64, 8, 16)]
    if sizes == "gpu":  # Qwen2-7B's width
        return [select_case(2, ni, k, 3584) for ni in (256, 1024, 4096) for k in (32, 64)]
    return [select_case(2, 1024, 32, 1024), select_case(2, 4096, 64, 1024)]
