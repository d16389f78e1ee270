"""Argument checks shared by the public ops: every failure names the argument and what was expected.

Shape, dtype and device checks are traceable (they run in the public wrappers, under torch.compile too);
``check_index_range`` reads the values, so it runs inside the registered op, which executes eagerly even in a
compiled graph.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, *, dims: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
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


def number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    return value


def check_index_range(name: str, index: torch.Tensor, upper: int) -> None:
    """Entries must be -1 (padding) or in [0, upper). Costs one host sync."""
    if index.numel() == 0:
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= upper:
        raise ValueError(f"{name}: entries must be -1 (padding) or in [0, {upper}), found values in [{lo}, {hi}]")
