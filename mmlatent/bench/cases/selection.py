"""Selection family: select_topk_tokens against ``torch topk``, the same steps in plain torch (masked_fill +
torch.topk + sort + gather + scatter (index_put) of the exclusion mask); select_image_tokens (every layer's mass
of the last query row, then the selection, one call) against the composition it is defined as."""
from __future__ import annotations

from typing import List, Sequence

import torch

from mmlatent.kernels import row_attention_mass, select_image_tokens, select_topk_tokens

from ..case import Case, Inputs, Make
from .inputs import cpu_generator, normal_tensors, pinned_backend


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


def _image_inputs(L: int, B: int, Hq: int, Hkv: int, N: int, D: int, Ni: int, k: int, Dm: int) -> Make:
    """The last query row of L layers [L, B, Hq, D], their caches [L, B, Hkv, N, D] in the run's dtype; Ni image
    positions among the N keys, ~10% of them already chosen; embeds [B, Ni, Dm]."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = cpu_generator()
        randn = normal_tensors(g, device, dtype)
        positions = torch.stack([torch.randperm(N, generator=g)[:Ni].sort().values for _ in range(B)])
        return dict(q=randn(L, B, Hq, D), k=randn(L, B, Hkv, N, D), image_index=positions.to(device), k_select=k,
                    exclude=(torch.rand(B, Ni, generator=g) < 0.1).to(device), embeds=randn(B, Ni, Dm))
    return make


def _ours_image_tokens(a):
    return select_image_tokens(a["q"], a["k"], a["image_index"], a["k_select"], exclude=a["exclude"],
                               embeds=a["embeds"])


def _image_tokens_composition(a):
    """What the rollout runs without the fused op: one row_attention_mass per layer, then select_topk_tokens."""
    scores = torch.zeros(a["image_index"].shape, dtype=torch.float32, device=a["image_index"].device)
    for q_layer, k_layer in zip(a["q"], a["k"]):
        row_attention_mass(q_layer, k_layer, a["image_index"], scores)
    return select_topk_tokens(scores, a["k_select"], exclude=a["exclude"], embeds=a["embeds"])


def image_tokens_case(L: int, B: int, Hq: int, Hkv: int, N: int, D: int, Ni: int, k: int, Dm: int,
                      backends: Sequence[str] = ("torch",), fused_native: bool = False) -> Case:
    """IVT-LR's selection at the end of a latent step from the KV cache of L layers: the op as ``auto`` runs it
    against the per-layer composition as ``auto`` runs it, against the composition with each of ``backends``
    pinned, and with ``fused_native`` against the op on its native backend (on CUDA the one-launch kernel, which
    ``auto`` does not pick there yet)."""
    baselines = {"row mass per layer + select": _image_tokens_composition}
    baselines.update({f"{b} backend (row mass per layer + select)": pinned_backend(b, _image_tokens_composition)
                      for b in backends})
    if fused_native:
        baselines["native backend (one launch)"] = pinned_backend("native", _ours_image_tokens)
    return Case("select_image_tokens", f"L{L} B{B} Hq{Hq} Hkv{Hkv} N{N} D{D} Ni{Ni} k{k}",
                _image_inputs(L, B, Hq, Hkv, N, D, Ni, k, Dm), _ours_image_tokens, baselines)


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":
        return [select_case(2, 64, 8, 16), image_tokens_case(2, 1, 4, 2, 64, 16, 16, 4, 16)]
    if sizes == "gpu":  # Qwen2-7B's width, its 28 layers of 28 query and 4 KV heads of dim 128
        return ([select_case(2, ni, k, 3584) for ni in (256, 1024, 4096) for k in (32, 64)]
                + [image_tokens_case(28, 1, 28, 4, n, 128, 1024, 32, 3584, fused_native=True) for n in (2048, 8192)])
    # Qwen2-VL-2B's 28 layers (12 query, 2 KV heads of dim 128) over a 2048-token cache
    return [select_case(2, 1024, 32, 1024), select_case(2, 4096, 64, 1024),
            image_tokens_case(28, 1, 12, 2, 2048, 128, 1024, 32, 1536)]
