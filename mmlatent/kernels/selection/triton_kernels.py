"""Triton kernel of select_topk_tokens: eligibility masking, deterministic top-k, the exclusion update and the
gather of the selected embeddings in one launch, one program per batch row.

Ranking packs each token into one int64 whose order is the contract's order: the high 32 bits are the score's
float32 bits mapped to a signed order-preserving integer (NaN below -inf, ineligible below NaN), the low 32 bits
are ``Ni - 1 - index`` so that equal scores prefer the lower index. ``tl.topk`` then returns the winners' keys.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..compile_cases import CompileCase, pointers
from ..limits import SELECTION_TRITON_MAX_TOKENS, next_power_of_2, triton_interpreting

# Shipped launch configurations by row width (the padded Ni), compiled for sm_90a by compile_check.py: each is the
# fewest warps that do not spill (4 warps spilled 372 B at Ni = 1024).
SELECTION_CONFIGS = {
    "ni1024": dict(num_warps=8, BLOCK_D=128),
    "ni4096": dict(num_warps=8, BLOCK_D=128),
    "ni8192": dict(num_warps=16, BLOCK_D=128),  # Ni up to SELECTION_TRITON_MAX_TOKENS
}


@triton.jit
def _select_topk(Scores, Valid, Exclude, Embeds, Idx, Gathered,
                 Ni, k, Dm,
                 stride_sb, stride_vb, stride_xb, stride_eb, stride_en, stride_gb, stride_gk,
                 HAS_VALID: tl.constexpr, HAS_EXCLUDE: tl.constexpr, HAS_EMBEDS: tl.constexpr,
                 BY_POSITION: tl.constexpr, BLOCK_NI: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_NI)
    in_row = offs < Ni
    score = tl.load(Scores + b * stride_sb + offs, mask=in_row, other=0.0).to(tl.float32)
    eligible = in_row
    if HAS_VALID:
        eligible = eligible & (tl.load(Valid + b * stride_vb + offs, mask=in_row, other=0) != 0)
    if HAS_EXCLUDE:
        eligible = eligible & (tl.load(Exclude + b * stride_xb + offs, mask=in_row, other=1) == 0)

    score = tl.where(score == 0.0, 0.0, score)  # -0.0 and +0.0 are one value: let the index break the tie
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order of the float values
    key = tl.where(score != score, -2147483647, key)  # NaN: below every number
    key = tl.where(eligible, key, -2147483648)  # ineligible: below NaN, never chosen (counts are checked first)
    tiebreak = tl.where(in_row, Ni - 1 - offs, 0).to(tl.int64)
    packed = key.to(tl.int64) * 4294967296 + tiebreak

    best = tl.sort(tl.topk(packed, BLOCK_K), descending=True)
    slot = tl.arange(0, BLOCK_K)
    chosen = slot < k
    index = (Ni - 1 - (best & 0xFFFFFFFF)).to(tl.int64)
    if BY_POSITION:
        index = tl.sort(tl.where(chosen, index, 2147483647), descending=False)
    tl.store(Idx + b * k + slot, index, mask=chosen)
    if HAS_EXCLUDE:
        tl.store(Exclude + b * stride_xb + index, tl.full([BLOCK_K], 1, tl.uint8), mask=chosen)
    if HAS_EMBEDS:
        safe = tl.where(chosen, index, 0)
        for d0 in range(0, Dm, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            keep = chosen[:, None] & (d < Dm)[None, :]
            rows = tl.load(Embeds + b * stride_eb + safe[:, None] * stride_en + d[None, :], mask=keep)
            tl.store(Gathered + b * stride_gb + slot[:, None] * stride_gk + d[None, :], rows, mask=keep)


def selection_config(num_tokens: int) -> dict:
    if triton_interpreting():
        return dict(num_warps=4, BLOCK_D=64)
    for name, limit in (("ni1024", 1024), ("ni4096", 4096)):
        if num_tokens <= limit:
            return dict(SELECTION_CONFIGS[name])
    return dict(SELECTION_CONFIGS["ni8192"])


def select_topk(scores: torch.Tensor, k: int, *, exclude: Optional[torch.Tensor], valid: Optional[torch.Tensor],
                embeds: Optional[torch.Tensor], by_position: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch; inputs validated, eligible counts checked. scores/valid/embeds contiguous along their last dim,
    exclude contiguous (updated in place)."""
    B, Ni = scores.shape
    idx = torch.empty(B, k, dtype=torch.int64, device=scores.device)
    Dm = embeds.shape[2] if embeds is not None else 0
    gathered = torch.empty(B, k, Dm, dtype=embeds.dtype if embeds is not None else scores.dtype,
                           device=scores.device)
    if B == 0:
        return idx, gathered
    cfg = selection_config(Ni)
    placeholder = idx
    valid_u8 = valid.view(torch.uint8) if valid is not None else placeholder
    exclude_u8 = exclude.view(torch.uint8) if exclude is not None else placeholder
    _select_topk[(B,)](
        scores, valid_u8, exclude_u8, embeds if embeds is not None else placeholder, idx, gathered,
        Ni, k, Dm,
        scores.stride(0), valid.stride(0) if valid is not None else 0, exclude.stride(0) if exclude is not None else 0,
        embeds.stride(0) if embeds is not None else 0, embeds.stride(1) if embeds is not None else 0,
        gathered.stride(0), gathered.stride(1),
        HAS_VALID=valid is not None, HAS_EXCLUDE=exclude is not None, HAS_EMBEDS=embeds is not None,
        BY_POSITION=by_position, BLOCK_NI=max(16, next_power_of_2(Ni)), BLOCK_K=max(2, next_power_of_2(k)),
        BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    return idx, gathered


def _selection_case(cfg_name: str, ni: int, score_dtype: str, embed_dtype: str) -> CompileCase:
    cfg = SELECTION_CONFIGS[cfg_name]
    types = {"Scores": f"*{score_dtype}", "Valid": "*u8", "Exclude": "*u8", "Embeds": f"*{embed_dtype}",
             "Idx": "*i64", "Gathered": f"*{embed_dtype}"}
    return CompileCase(f"select_topk[{cfg_name}] scores={score_dtype} embeds={embed_dtype}", _select_topk, types,
                       dict(HAS_VALID=True, HAS_EXCLUDE=True, HAS_EMBEDS=True, BY_POSITION=True, BLOCK_NI=ni,
                            BLOCK_K=64, BLOCK_D=cfg["BLOCK_D"]),
                       num_warps=cfg["num_warps"], aligned=pointers(types))


COMPILE_CASES = tuple(_selection_case(name, ni, "fp32", "bf16")
                      for name, ni in (("ni1024", 1024), ("ni4096", 4096),
                                       ("ni8192", SELECTION_TRITON_MAX_TOKENS))) + (
    _selection_case("ni4096", 4096, "bf16", "fp32"),)
