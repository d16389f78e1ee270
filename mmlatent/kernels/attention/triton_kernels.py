"""Triton kernels of the attention family: flash-style attention that also writes the score row's logits, a
split-KV combine, and the accumulation of the score row's image-token mass.

One kernel serves both public attention ops: ``attention_with_scores`` runs it with V, ``row_attention_mass`` runs
it without V (M = 1: only the log-sum-exp and the row's logits are produced). GQA packs the G = Hq / Hkv query
heads of one KV head into the rows of a tile (row r = g * M + m), so every K/V tile is loaded once for all G heads.
With causal masking, query row m sits at key position N - M + m (bottom-right aligned).

The score row's image mass is produced without any [B, H, M, N] buffer and without recomputing QK^T: the tiles
that hold the score row store its (masked) logits, [B, Hq, N] float32, as they go; once the row's log-sum-exp is
final, ``_accumulate_image_mass`` reads those logits at the image slots only and adds
``weight * sum_h exp(logit - lse)`` into ``out``.

Forward only: the op (``op.py``) sends inputs that need gradients to the torch backend.
"""
from __future__ import annotations

import functools
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..compile_cases import CompileCase
from ..limits import ATTENTION_MAX_HEAD_DIM, ATTENTION_MAX_SPLITS, next_power_of_2, triton_interpreting

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # used inside the kernels

# Launch configurations shipped for GPUs, each with the head dims it serves (up to ATTENTION_MAX_HEAD_DIM).
# compile_check compiles every one
# for sm_90a (with the launcher's unit-stride and 16-byte specialisations) and finds no register spills; the
# choices below are the widest tiles that got there (4 warps at 64 rows spilled 48 B at D = 128, 128 x 64 tiles
# spilled 8-108 B, so the 128-row tiles take 32 keys a block). rows = G * M query rows per (batch, kv head).
ATTENTION_CONFIGS = {
    "rows16": dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=2, head_dims=(1, 128)),
    "rows16_d256": dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=2,
                        head_dims=(129, ATTENTION_MAX_HEAD_DIM)),
    "rows64": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3, head_dims=(1, 128)),
    "rows128": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, head_dims=(1, 128)),
}


@triton.jit
def _attention_fwd(
    Q, K, V, KeyValid, O, LSE, RowLogits,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_validb,
    stride_os, stride_ob, stride_oh, stride_om,
    stride_ls, stride_lb, stride_lh,
    stride_rb, stride_rh,
    Hkv, M, N, G, score_row, qk_scale, keys_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_V: tl.constexpr, HAS_KEY_VALID: tl.constexpr, CAUSAL: tl.constexpr, STORE_ROW: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    row0 = pid_r * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < G * M
    g = rows // M
    m = rows % M
    h = kvh * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + m[:, None] * stride_qm + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
        q = q.to(tl.float32)

    n_begin = pid_s * keys_per_split
    n_end = tl.minimum(N, n_begin + keys_per_split)
    row_limit = N - M + m
    if CAUSAL:
        max_m = tl.max(tl.where(row_ok, m, 0), axis=0)
        n_end = tl.minimum(n_end, N - M + max_m + 1)

    scored = row_ok & (m == score_row)
    # Does this tile hold a score row at all? (first r >= row0 with r % M == score_row, below the tile end)
    first_scored = row0 + ((score_row - row0 % M) % M + M) % M
    tile_scored = first_scored < tl.minimum(row0 + BLOCK_M, G * M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(n_begin, n_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_end
        kt = tl.load(K + b * stride_kb + kvh * stride_kh + cols[None, :] * stride_kn + d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST_DOT:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt) * qk_scale  # base-2 logits
        allowed = row_ok[:, None] & col_ok[None, :]
        key_used = col_ok
        if HAS_KEY_VALID:
            key_ok = tl.load(KeyValid + b * stride_validb + cols, mask=col_ok, other=0)
            key_used = key_used & (key_ok != 0)
            allowed = allowed & key_used[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= row_limit[:, None])
        s = tl.where(allowed, s, float("-inf"))
        if STORE_ROW:
            if tile_scored:
                tl.store(RowLogits + b * stride_rb + h[:, None] * stride_rh + cols[None, :], s * LN2,
                         mask=scored[:, None] & col_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet keeps p = 0, never NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_V:
            # Padding keys load as 0: their p is 0, but 0 * NaN (or inf) in a padding V row would still be NaN.
            v = tl.load(V + b * stride_vb + kvh * stride_vh + cols[:, None] * stride_vn + d[None, :] * stride_vd,
                        mask=key_used[:, None] & d_ok[None, :], other=0.0)
            if UPCAST_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_mass = l_i > 0
    lse = tl.where(has_mass, (m_i + tl.log2(tl.where(has_mass, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(LSE + pid_s * stride_ls + b * stride_lb + h * stride_lh + m, lse, mask=row_ok)
    if HAS_V:
        out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
        tl.store(O + pid_s * stride_os + b * stride_ob + h[:, None] * stride_oh + m[:, None] * stride_om + d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_splits(PartO, PartLSE, O, LSE, S, split_stride_o, split_stride_lse,
                    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_V: tl.constexpr):
    row = tl.program_id(0)  # flat (b, h, m)
    sid = tl.arange(0, BLOCK_S)
    s_ok = sid < S
    lse_s = tl.load(PartLSE + sid * split_stride_lse + row, mask=s_ok, other=float("-inf"))
    top = tl.max(lse_s, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse_s - top_safe)
    total = tl.sum(w, axis=0)
    lse = tl.where(total > 0, top_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(LSE + row, lse)
    if HAS_V:
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        part = tl.load(PartO + sid[:, None] * split_stride_o + row * HEAD_DIM + d[None, :],
                       mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        w = w / tl.where(total > 0, total, 1.0)
        out = tl.sum(part * w[:, None], axis=0)
        tl.store(O + row * HEAD_DIM + d, out.to(O.dtype.element_ty), mask=d_ok)


@triton.jit
def _accumulate_image_mass(RowLogits, RowLSE, ImageIndex, Out, Hq, Ni, key_limit, weight,
                           stride_rb, stride_rh, stride_lb, stride_lh, stride_ib, stride_outb,
                           BLOCK_I: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    j_ok = j < Ni
    idx = tl.load(ImageIndex + b * stride_ib + j, mask=j_ok, other=-1)
    used = j_ok & (idx >= 0)
    visible = used & (idx <= key_limit)  # keys past a causal score row were never visited
    safe = tl.where(visible, idx, 0)
    total = tl.zeros([BLOCK_I], tl.float32)
    for h in range(0, Hq):
        lse = tl.load(RowLSE + b * stride_lb + h * stride_lh)
        logit = tl.load(RowLogits + b * stride_rb + h * stride_rh + safe, mask=visible, other=float("-inf"))
        lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
        p = tl.exp(logit - lse_safe)
        total += tl.where(lse == float("-inf"), 0.0, p)
    old = tl.load(Out + b * stride_outb + j, mask=used, other=0.0)
    tl.store(Out + b * stride_outb + j, old + weight * total, mask=used)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def attention_config(rows: int, head_dim: int) -> dict:
    """Tile shape for ``rows = G * M`` query rows per (batch, kv head) at head dim ``head_dim``."""
    # numpy executes whole tiles: fewer, larger blocks are faster; small rows still need >= 16
    if triton_interpreting():
        return dict(BLOCK_M=max(16, min(64, next_power_of_2(rows))), BLOCK_N=64, num_warps=4, num_stages=1)
    if head_dim > 128:
        name = "rows16_d256"  # every wider tile spills at D = 256
    elif rows <= 16:
        name = "rows16"
    elif rows <= 256:
        name = "rows64"
    else:
        name = "rows128"
    return dict(ATTENTION_CONFIGS[name])


def plan_splits(programs: int, keys: int, block_n: int, device: torch.device,
                num_splits: Optional[int] = None) -> Tuple[int, int]:
    """(num_splits, keys_per_split): split the keys when too few programs would occupy the GPU (flash-decoding)."""
    if num_splits is None:
        if triton_interpreting() or device.type != "cuda":
            num_splits = 1
        else:
            target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            num_splits = 1 if programs >= target // 2 else min(
                ATTENTION_MAX_SPLITS, triton.cdiv(target, programs), max(1, triton.cdiv(keys, 4 * block_n)))
    num_splits = max(1, min(int(num_splits), max(1, triton.cdiv(keys, block_n))))
    keys_per_split = triton.cdiv(triton.cdiv(max(keys, 1), num_splits), block_n) * block_n
    return triton.cdiv(max(keys, 1), keys_per_split), keys_per_split


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], *, causal: bool,
                      key_valid: Optional[torch.Tensor], image_index: Optional[torch.Tensor],
                      scores_out: Optional[torch.Tensor], score_row: int, scale: float, weight: float,
                      num_splits: Optional[int] = None) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Launches the attention kernels. q [B,Hq,M,D]; k, v [B,Hkv,N,D] (v may be None: lse and the score row only).

    Returns (o or None, lse [B,Hq,M] float32). ``score_row`` is already in [0, M). Inputs are validated.
    """
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dev = q.device
    has_v = v is not None
    store_row = scores_out is not None
    cfg = attention_config(G * M, D)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_d = max(16, next_power_of_2(D))
    row_tiles = triton.cdiv(G * M, block_m)
    splits, keys_per_split = plan_splits(row_tiles * B * Hkv, N, block_n, dev, num_splits)

    lse = torch.empty(B, Hq, M, dtype=torch.float32, device=dev)
    o = torch.empty(B, Hq, M, D, dtype=q.dtype, device=dev) if has_v else None
    if splits > 1:
        part_lse = torch.empty(splits, B, Hq, M, dtype=torch.float32, device=dev)
        part_o = torch.empty(splits, B, Hq, M, D, dtype=torch.float32, device=dev) if has_v else None
    else:
        part_lse, part_o = lse[None], (o[None] if has_v else None)
    row_logits = torch.empty(B, Hq, N, dtype=torch.float32, device=dev) if store_row else lse
    valid_u8 = key_valid.view(torch.uint8) if key_valid is not None else lse
    v_arg = v if has_v else k
    o_arg = part_o if has_v else part_lse  # placeholder pointer when there is no output

    _attention_fwd[(row_tiles, B * Hkv, splits)](
        q, k, v_arg, valid_u8, o_arg, part_lse, row_logits,
        *q.stride(), *k.stride(), *v_arg.stride(),
        key_valid.stride(0) if key_valid is not None else 0,
        *(part_o.stride()[:4] if has_v else (0, 0, 0, 0)),
        *part_lse.stride()[:3],
        *(row_logits.stride()[:2] if store_row else (0, 0)),
        Hkv, M, N, G, score_row, scale * LOG2E, keys_per_split,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_V=has_v, HAS_KEY_VALID=key_valid is not None, CAUSAL=causal, STORE_ROW=store_row,
        UPCAST_DOT=triton_interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _combine_splits[(B * Hq * M,)](
            part_o if has_v else part_lse, part_lse, o if has_v else lse, lse, splits,
            B * Hq * M * D, B * Hq * M,
            HEAD_DIM=D, BLOCK_S=max(2, next_power_of_2(splits)), BLOCK_D=block_d, HAS_V=has_v, num_warps=4,
        )
    if store_row:
        accumulate_image_mass(row_logits, lse[:, :, score_row], image_index, scores_out,
                              key_limit=(N - M + score_row) if causal else N - 1, weight=weight)
    return o, lse


def accumulate_image_mass(row_logits: torch.Tensor, row_lse: torch.Tensor, image_index: torch.Tensor,
                          out: torch.Tensor, *, key_limit: int, weight: float) -> None:
    """out[b, j] += weight * sum_h exp(row_logits[b, h, image_index[b, j]] - row_lse[b, h]) at non-padding slots."""
    B, Hq, _ = row_logits.shape
    Ni = image_index.shape[1]
    block_i = 128 if triton_interpreting() else 256
    _accumulate_image_mass[(B, triton.cdiv(Ni, block_i))](
        row_logits, row_lse, image_index, out, Hq, Ni, key_limit, weight,
        row_logits.stride(0), row_logits.stride(1), row_lse.stride(0), row_lse.stride(1),
        image_index.stride(0), out.stride(0), BLOCK_I=block_i, num_warps=4,
    )


# ------------------------------------------------------------------------------------------------ compile cases

_COMPILED_HEAD_DIMS = (64, 80, 128, 256)


def _attention_case(cfg_name: str, head_dim: int, dtype: str, has_v: bool) -> CompileCase:
    cfg = ATTENTION_CONFIGS[cfg_name]
    ptr = f"*{dtype}"
    strides16 = ("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb",
                 "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_om", "stride_rb", "stride_rh")
    types = {"Q": ptr, "K": ptr, "V": ptr, "KeyValid": "*u8", "O": ptr, "LSE": "*fp32", "RowLogits": "*fp32",
             "qk_scale": "fp32"}
    return CompileCase(
        f"attention[{cfg_name}] D={head_dim} {dtype} {'qkv' if has_v else 'qk-only'}", _attention_fwd, types,
        dict(HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
             BLOCK_D=max(16, next_power_of_2(head_dim)), HAS_V=has_v, HAS_KEY_VALID=True, CAUSAL=has_v,
             STORE_ROW=True, UPCAST_DOT=False),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], unit=("stride_qd", "stride_kd", "stride_vd"),
        aligned=("Q", "K", "V", "KeyValid", "O", "LSE", "RowLogits") + (strides16 if head_dim % 16 == 0 else ()))


def _attention_cases() -> Iterator[CompileCase]:
    for cfg_name, cfg in ATTENTION_CONFIGS.items():
        lo, hi = cfg["head_dims"]
        for head_dim in (d for d in _COMPILED_HEAD_DIMS if lo <= d <= hi):
            yield _attention_case(cfg_name, head_dim, "bf16", True)
            if head_dim == 128:
                yield _attention_case(cfg_name, head_dim, "fp16", True)
            if cfg["BLOCK_M"] == 16:  # row_attention_mass: one row, no V
                yield _attention_case(cfg_name, head_dim, "bf16", False)
    yield CompileCase("combine_splits D=128", _combine_splits,
                      {"PartO": "*fp32", "PartLSE": "*fp32", "O": "*bf16", "LSE": "*fp32"},
                      dict(HEAD_DIM=128, BLOCK_S=ATTENTION_MAX_SPLITS, BLOCK_D=128, HAS_V=True), num_warps=4)
    yield CompileCase("accumulate_image_mass", _accumulate_image_mass,
                      {"RowLogits": "*fp32", "RowLSE": "*fp32", "ImageIndex": "*i64", "Out": "*fp32",
                       "weight": "fp32"}, dict(BLOCK_I=256), num_warps=4)


COMPILE_CASES = tuple(_attention_cases())
