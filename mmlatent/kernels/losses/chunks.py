"""The row-chunk walk shared by both backends of the linear-softmax losses.

A linear-softmax loss reads logits z = hidden @ weight.T + bias [T, V] one row chunk at a time: the chunk's logits
come from one torch GEMM (cuBLAS on a GPU), a chunk function (the torch one in ``torch_impl.py`` or the Triton
kernel in ``triton_kernels.py``, chosen once per call by ``op.py``) turns them into values and the gradient in
place, and the chunk's gradient GEMMs follow. The chunk's buffer is freed before the next one, so the extra memory
is O(chunk_rows * V), never O(T * V).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

# Bytes of one chunk's logits buffer that the default chunk_rows aims at. On the CPU, the float32 chunk should sit
# in the last-level cache more or less; on a GPU the chunk's GEMM must stay large enough to run near peak and to
# amortise the read-modify-write of grad_weight that every chunk's accumulation costs.
# 512 MiB on a GPU keeps T = 1024 rows of Qwen2's 152064-word vocabulary in one chunk (no float32 grad_weight
# accumulator, see linear_softmax_loss) and costs at most 0.1x of the naive path's logits at T >= 8192.
_CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 512 * 2**20}
_MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS, _CHUNK_ALIGN = 16, 8192, 16


def default_chunk_rows(vocab: int, element_size: int, device: torch.device) -> int:
    """Most rows per chunk when ``chunk_rows`` is None: as many as fit the device's chunk budget (a multiple of 16).
    The walk then splits T rows into equal chunks of at most this many."""
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    per_row = vocab * max(element_size, 4 if device.type == "cpu" else element_size)
    rows = budget // max(per_row, 1) // _CHUNK_ALIGN * _CHUNK_ALIGN
    return int(min(_MAX_CHUNK_ROWS, max(_MIN_CHUNK_ROWS, rows)))


@dataclass(frozen=True)
class SoftmaxLossSpec:
    """What one row of a linear-softmax loss computes from its logits z (row of hidden @ weight.T + bias).

    s = softcap * tanh(z / softcap) when ``softcap`` is set, else z / temperature; lse = logsumexp_j s_j;
    ``kind`` "ce": value = lse - (1 - label_smoothing) * s_y - label_smoothing * mean_j s_j (PyTorch's
    label-smoothed cross-entropy); ``kind`` "logp": value = s_y - lse (the log-probability of token y).
    """

    kind: str
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    temperature: float = 1.0


def linear_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        targets: torch.Tensor, spec: SoftmaxLossSpec, chunk_rows: int, *,
                        lse: Optional[torch.Tensor] = None, coef: Optional[torch.Tensor] = None,
                        needs: Tuple[bool, bool, bool] = (False, False, False),
                        chunk_fn: Callable[..., Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]]
                        ) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor],
                                   Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Walks ``hidden`` in chunks of ``chunk_rows`` rows: logits by one GEMM, then ``chunk_fn`` (this module's
    :func:`torch_impl.softmax_loss_chunk` or the Triton kernel with the same contract), then the chunk's gradient GEMMs.

    Args:
        hidden: [T, H]; weight: [V, H]; bias: [V] or None (all one dtype); targets: [T] int64 in [0, V).
        lse: [T] float32 from the forward pass (recompute mode, for per-row upstream gradients), or None.
        coef: [T] or [1] float32 multiplier of each row's gradient; None: no gradients.
        needs: which of (hidden, weight, bias) receive gradients (with ``coef``).

    Returns:
        (values [T] float32 or None, lse [T] float32, grad_hidden, grad_weight, grad_bias): each gradient in its
        input's dtype, or None when not needed. With 16-bit weights and more than one chunk, grad_weight
        accumulates in a float32 buffer (4 * V * H bytes) and is rounded once at the end.
    """
    T = hidden.shape[0]
    want_h, want_w, want_b = (bool(n) and coef is not None for n in needs)
    values = torch.empty(T, dtype=torch.float32, device=hidden.device) if lse is None else None
    lse_out = torch.empty(T, dtype=torch.float32, device=hidden.device) if lse is None else lse
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if want_b else None
    weight_t = weight.t()
    chunk_rows = balanced_chunk_rows(T, chunk_rows)
    for r0 in range(0, T, chunk_rows):
        r1 = min(T, r0 + chunk_rows)
        h = hidden[r0:r1]
        logits = h @ weight_t if bias is None else torch.addmm(bias, h, weight_t)
        row_coef = None if coef is None else (coef if coef.shape[0] == 1 else coef[r0:r1])
        v, l, g = chunk_fn(logits, targets[r0:r1], spec, lse=None if lse is None else lse[r0:r1], coef=row_coef)
        del logits
        if values is not None:
            values[r0:r1] = v
            lse_out[r0:r1] = l
        if g is None:
            continue
        if want_h:
            torch.mm(g, weight, out=grad_h[r0:r1])
        if want_w:
            if grad_w is None:
                accumulate_fp32 = weight.dtype in (torch.float16, torch.bfloat16) and r1 < T
                grad_w = torch.zeros(weight.shape, dtype=torch.float32 if accumulate_fp32 else weight.dtype,
                                     device=weight.device)
            _accumulate_mm(grad_w, g.t(), h)
        if want_b:
            grad_b += g.sum(dim=0, dtype=torch.float32)
    if grad_b is not None:
        grad_b = grad_b.to(weight.dtype)
    if grad_w is not None and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    return values, lse_out, grad_h, grad_w, grad_b


def balanced_chunk_rows(total: int, limit: int, align: int = 16) -> int:
    """Rows per chunk, at most ``limit``, that split ``total`` rows into as few chunks as ``limit`` allows, of equal
    size (a multiple of ``align`` where that stays within the limit): no GEMM on a thin tail chunk."""
    chunks = -(-total // limit)
    rows = -(-total // chunks)
    aligned = -(-rows // align) * align
    return aligned if aligned <= limit else rows


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc float32 while a and b are 16-bit when the sum spans several chunks: one rounding to
    the weight's dtype at the end, as the naive single GEMM has (bf16 sums over n chunks lose ~sqrt(n) more)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:  # cuBLAS writes the float32 sum directly from 16-bit operands (torch >= 2.8)
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


__all__ = ["SoftmaxLossSpec", "linear_softmax_loss", "balanced_chunk_rows", "default_chunk_rows"]
