"""Argument checks shared by the public ops: every failure names the argument and what was expected.

Shape, dtype, device and memory-layout checks are traceable (they run in the public wrappers, under torch.compile
too); ``check_index_range`` reads the values, so it runs inside the registered op, which executes eagerly even in a
compiled graph.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value: object, *, dims: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
           device: Optional[torch.device] = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {str(value.dtype).replace('torch.', '')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected device {device}, got {value.device}")
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence, what: str) -> None:
    """``expected`` holds ints or None (any size); ``what`` spells the expected layout, e.g. "[B, Ni]"."""
    ok = value.dim() == len(expected) and all(e is None or s == e for s, e in zip(value.shape, expected))
    if not ok:
        spelled = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name}: expected shape {what} = [{spelled}], got {tuple(value.shape)}")


def same_dtype(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.dtype != ref.dtype:
        raise TypeError(f"{name}: expected the dtype of {ref_name} ({ref.dtype}), got {value.dtype}")


def number(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    return value


def check_index_range(name: str, index: torch.Tensor, upper: int) -> bool:
    """Entries must be -1 (padding) or in [0, upper). Returns whether any entry is not padding, so that callers
    skip the launch when there is nothing to do. Costs one host sync."""
    if index.numel() == 0:
        return False
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= upper:
        raise ValueError(f"{name}: entries must be -1 (padding) or in [0, {upper}), found values in [{lo}, {hi}]")
    return hi >= 0


def on_meta(*values: object) -> bool:
    """Meta tensors carry shapes only: the ops answer them with their fake implementations, never a backend."""
    return any(isinstance(v, torch.Tensor) and v.is_meta for v in values)


_ENUMERATE_LIMIT = 1 << 22


def _elements_share_memory(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    dims = sorted((st, sz) for sz, st in zip(sizes, strides) if sz > 1)
    if any(st == 0 for st, _ in dims):
        return True
    reach, disjoint = 0, True  # the largest offset the smaller-stride dims reach
    for st, sz in dims:
        if st <= reach:
            disjoint = False
            break
        reach += st * (sz - 1)
    if disjoint:
        return False
    if len(dims) == 2:
        # Offsets i*s + j*t collide iff d*s == e*t for some 0 < d < n, 0 < e < m; the smallest such pair is
        # (t / g, s / g) with g = gcd(s, t).
        (s, n), (t, m) = dims
        g = math.gcd(s, t)
        return t // g < n and s // g < m
    if math.prod(sz for _, sz in dims) > _ENUMERATE_LIMIT:
        return True  # cannot be proven disjoint cheaply: refusing is safe, a silent race is not
    offsets = torch.zeros((), dtype=torch.int64)
    for st, sz in dims:
        offsets = (offsets[..., None] + torch.arange(sz, dtype=torch.int64) * st)
    return offsets.unique().numel() != offsets.numel()


def writable(name: str, value: torch.Tensor) -> None:
    """An output written in place must give every element its own memory: an ``expand``-ed tensor (stride 0) or
    overlapping ``as_strided`` rows would make every backend write several results through one location (the
    kernels race, torch ops fail midway). Raises before anything is written."""
    if value.numel() > 1 and _elements_share_memory(value.shape, value.stride()):
        raise ValueError(f"{name}: is written in place, but some of its elements share memory (shape "
                         f"{tuple(value.shape)}, strides {tuple(value.stride())}, e.g. an expand()-ed tensor); pass "
                         f"a tensor with one memory location per element (.clone() makes one)")
