"""Memory-lean linear-softmax losses: ``linear_cross_entropy`` and ``linear_log_probs`` (contracts in their docstrings).

Both compute softmax quantities of z = hidden @ weight.T + bias without ever holding the [T, V] logits: row
chunks of ``chunk_rows`` rows are computed, reduced and freed one at a time (see
``chunks.py``). Per-chunk softmax math runs in float32 on the torch or the Triton backend, chosen once per call
inside the registered op; the GEMMs are torch's (cuBLAS on a GPU).

Two gradient strategies:

- A scalar loss (``reduction`` "mean" or "sum") computes its gradients during the forward pass, while each chunk's
  softmax is at hand: forward + backward costs the naive path's three GEMMs and one read of the logits. The
  backward only scales the stored gradients by the upstream scalar.
- A per-row result (``reduction="none"``, ``linear_log_probs``) has a different upstream gradient per row. With a
  frozen head (LoRA), the hidden gradient of row t is that scalar times a vector known in the forward pass, so
  the forward computes those rows [T, H] and the backward scales them (two GEMMs, as the naive path). A trainable
  head's gradient cannot absorb per-row scalars after the fact: the forward then keeps each row's log-sum-exp [T]
  and the backward recomputes the chunks' logits (one GEMM more than the naive path, no [T, V] memory).

Rows whose label is ``ignore_index`` are dropped before any GEMM (prompt tokens in SFT cost nothing).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import checks
from ..dispatch import OpDispatch, Reasons, native_op_reasons, torch_reasons, triton_float_reasons
from . import torch_impl
from .chunks import SoftmaxLossSpec, default_chunk_rows, linear_softmax_loss

def _native_row_reasons(device, dtype, softcap=None) -> Reasons:
    reasons = native_op_reasons(device, "softmax_loss_chunk_native")
    if device.type == "cuda":
        reasons.append("the native row kernel is a CPU op (Triton runs the rows on a GPU)")
    if softcap is not None:
        reasons.append("logit_softcap: its derivative needs the logits the native row kernel overwrites")
    return reasons


def _triton_row_reasons(device, dtype, softcap=None) -> Reasons:
    return triton_float_reasons(device, dtype)


_ROW_BACKENDS = {"native": _native_row_reasons, "triton": _triton_row_reasons, "torch": torch_reasons}
# auto on CPU: native first. T2048 H256 V32000 fwd+bwd, where the GEMMs dominate: the same time as the torch
# backend with a trainable head (1.04x: 507 against 529 ms) and 1.18x with a frozen one (336 against 396 ms);
# log-probs 1.09x frozen, 0.96x trainable (benches/results/cpu-2core/kernels-linear-cross-entropy.md, -log-probs.md).
LINEAR_CROSS_ENTROPY = OpDispatch("linear_cross_entropy", dict(_ROW_BACKENDS))
LINEAR_LOG_PROBS = OpDispatch("linear_log_probs", dict(_ROW_BACKENDS))


def _chunk_fn(op: OpDispatch, hidden: torch.Tensor, softcap: Optional[float] = None):
    """The chunk function of the backend dispatch chooses, once per call of a registered op."""
    backend = op.choose(device=hidden.device, dtype=hidden.dtype, softcap=softcap)
    if backend == "native":
        return _native_softmax_loss_chunk
    if backend == "triton":
        from .triton_kernels import softmax_loss_chunk  # imports triton: only once that backend was chosen
        return softmax_loss_chunk
    return torch_impl.softmax_loss_chunk


def register_native_fake() -> None:
    """Fake (meta) implementation of the C++ row kernel, once mmlatent._C has registered it."""
    if hasattr(torch.ops.mmlatent, "softmax_loss_chunk_native"):
        torch.library.register_fake(
            "mmlatent::softmax_loss_chunk_native",
            lambda logits, targets, log_probs, smoothing, temperature, lse, coef: (
                logits.new_empty(0 if lse is not None else logits.shape[0], dtype=torch.float32),
                logits.new_empty(logits.shape[0], dtype=torch.float32)))


def _native_softmax_loss_chunk(logits: torch.Tensor, targets: torch.Tensor, spec: SoftmaxLossSpec, *,
                               lse: Optional[torch.Tensor] = None, coef: Optional[torch.Tensor] = None
                               ) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """:func:`torch_impl.softmax_loss_chunk`'s contract on the C++ row kernel: the gradient overwrites the chunk's
    logits (16-bit logits: a float32 copy of them, as the torch backend makes), one exponential per logit."""
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    values, row_lse = torch.ops.mmlatent.softmax_loss_chunk_native(
        work, targets, spec.kind == "logp", spec.label_smoothing, spec.temperature, lse, coef)
    return (values if lse is None else None), row_lse, (work.to(logits.dtype) if coef is not None else None)


def _kept_rows(targets: torch.Tensor, vocab: int, ignore_index: Optional[int], name: str):
    """(row indices to compute or None for all, number kept). Raises naming ``name`` when a target is outside
    [0, vocab) and is not ``ignore_index``. One host sync (two when rows are dropped)."""
    keep = torch.ones_like(targets, dtype=torch.bool) if ignore_index is None else targets != ignore_index
    bad = keep & ((targets < 0) | (targets >= vocab))
    kept, n_bad = torch.stack([keep.sum(), bad.sum()]).tolist()
    if n_bad:
        first = int(bad.nonzero()[0, 0])
        allowed = f"[0, {vocab})" + ("" if ignore_index is None else f" or ignore_index = {ignore_index}")
        raise ValueError(f"{name}: expected values in {allowed}, found {int(targets[first])} at position {first} "
                         f"({n_bad} such entries)")
    if kept == targets.shape[0]:
        return None, kept
    return keep.nonzero().squeeze(1), kept


def _empty_if_none(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


# ------------------------------------------------------------------------ scalar cross-entropy, fused gradients

def _fused_ce_impl(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, logit_softcap,
                   chunk_rows, needs):
    rows, kept = _kept_rows(labels, weight.shape[0], ignore_index, "labels")
    want = [bool(n) for n in needs]
    if kept == 0:  # every label ignored: loss 0 and zero gradients, never 0/0
        zero = hidden.new_zeros((), dtype=torch.float32)
        return (zero, hidden.new_zeros(hidden.shape) if want[0] else hidden.new_empty(0),
                torch.zeros_like(weight) if want[1] else weight.new_empty(0),
                torch.zeros_like(bias) if (want[2] and bias is not None) else weight.new_empty(0))
    h, y = (hidden, labels) if rows is None else (hidden.index_select(0, rows), labels.index_select(0, rows))
    scale = 1.0 / kept if reduction == "mean" else 1.0
    coef = torch.full((1,), scale, dtype=torch.float32, device=hidden.device) if any(want) else None
    values, _, gh, gw, gb = linear_softmax_loss(
        h, weight, bias, y, SoftmaxLossSpec("ce", label_smoothing, logit_softcap, 1.0), chunk_rows, coef=coef,
        needs=want, chunk_fn=_chunk_fn(LINEAR_CROSS_ENTROPY, hidden, logit_softcap))
    loss = values.sum() * scale
    if gh is not None and rows is not None:
        gh = hidden.new_zeros(hidden.shape).index_copy_(0, rows, gh)
    return loss, _empty_if_none(gh, hidden), _empty_if_none(gw, weight), _empty_if_none(gb, weight)


@torch.library.custom_op("mmlatent::linear_cross_entropy_fused", mutates_args=())
def _fused_ce_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                 ignore_index: int, reduction: str, label_smoothing: float, logit_softcap: Optional[float],
                 chunk_rows: int, needs: List[bool]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fused_ce_impl(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, logit_softcap,
                          chunk_rows, needs)


@_fused_ce_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, logit_softcap, chunk_rows, needs):
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty(hidden.shape) if needs[0] else hidden.new_empty(0),
            weight.new_empty(weight.shape) if needs[1] else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if (needs[2] and bias is not None) else weight.new_empty(0))


def _fused_ce_setup(ctx, inputs, output):
    _, grad_h, grad_w, grad_b = output
    ctx.needs = inputs[-1]
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(grad_h, grad_w, grad_b)


def _fused_ce_backward(ctx, grad_loss, *_unused):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    g = grad_loss.to(torch.float32)
    out_h = (grad_h * g).to(grad_h.dtype) if ctx.needs[0] else None
    out_w = (grad_w * g).to(grad_w.dtype) if ctx.needs[1] else None
    out_b = (grad_b * g).to(grad_b.dtype) if (ctx.needs[2] and ctx.has_bias) else None
    return out_h, out_w, out_b, None, None, None, None, None, None, None


_fused_ce_op.register_autograd(_fused_ce_backward, setup_context=_fused_ce_setup)


# --------------------------------------------------------------------- per-row results, recomputing backward

def _rows_forward_impl(hidden, weight, bias, targets, kind, ignore_index, label_smoothing, softcap, temperature,
                       chunk_rows, row_grad_hidden):
    T = hidden.shape[0]
    name = "labels" if kind == "ce" else "tokens"
    op = LINEAR_CROSS_ENTROPY if kind == "ce" else LINEAR_LOG_PROBS
    rows, kept = _kept_rows(targets, weight.shape[0], ignore_index, name)
    values = torch.zeros(T, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(T, dtype=torch.float32, device=hidden.device)
    grad_h = hidden.new_zeros(hidden.shape) if row_grad_hidden else hidden.new_empty(0)
    if kept == 0:
        return values, lse, grad_h
    h, y = (hidden, targets) if rows is None else (hidden.index_select(0, rows), targets.index_select(0, rows))
    coef = torch.ones(1, dtype=torch.float32, device=hidden.device) if row_grad_hidden else None
    spec = SoftmaxLossSpec(kind, label_smoothing, softcap, temperature)
    v, l, gh, _, _ = linear_softmax_loss(h, weight, bias, y, spec, chunk_rows, coef=coef,
                                                   needs=(True, False, False), chunk_fn=_chunk_fn(op, hidden, softcap))
    if rows is None:
        return v, l, (gh if row_grad_hidden else grad_h)
    if row_grad_hidden:
        grad_h.index_copy_(0, rows, gh)
    return values.index_copy_(0, rows, v), lse.index_copy_(0, rows, l), grad_h


def _rows_backward_impl(grad_values, hidden, weight, bias, targets, lse, kind, ignore_index, label_smoothing,
                        softcap, temperature, chunk_rows, needs):
    want = [bool(n) for n in needs]
    want[2] = want[2] and bias is not None
    keep = None if ignore_index is None else targets != ignore_index
    rows = None if keep is None or bool(keep.all()) else keep.nonzero().squeeze(1)
    if rows is not None and rows.numel() == 0:
        return (hidden.new_zeros(hidden.shape) if want[0] else hidden.new_empty(0),
                torch.zeros_like(weight) if want[1] else weight.new_empty(0),
                weight.new_zeros(weight.shape[0]) if want[2] else weight.new_empty(0))
    pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
    op = LINEAR_CROSS_ENTROPY if kind == "ce" else LINEAR_LOG_PROBS
    spec = SoftmaxLossSpec(kind, label_smoothing, softcap, temperature)
    _, _, gh, gw, gb = linear_softmax_loss(
        pick(hidden), weight, bias, pick(targets), spec, chunk_rows, lse=pick(lse),
        coef=pick(grad_values.to(torch.float32)), needs=want, chunk_fn=_chunk_fn(op, hidden, softcap))
    if gh is not None and rows is not None:
        gh = hidden.new_zeros(hidden.shape).index_copy_(0, rows, gh)
    return _empty_if_none(gh, hidden), _empty_if_none(gw, weight), _empty_if_none(gb, weight)


@torch.library.custom_op("mmlatent::linear_softmax_rows", mutates_args=())
def _rows_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
             kind: str, ignore_index: Optional[int], label_smoothing: float, softcap: Optional[float],
             temperature: float, chunk_rows: int, row_grad_hidden: bool
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rows_forward_impl(hidden, weight, bias, targets, kind, ignore_index, label_smoothing, softcap,
                              temperature, chunk_rows, row_grad_hidden)


@_rows_op.register_fake
def _(hidden, weight, bias, targets, kind, ignore_index, label_smoothing, softcap, temperature, chunk_rows,
      row_grad_hidden):
    T = hidden.shape[0]
    grad_h = hidden.new_empty(hidden.shape) if row_grad_hidden else hidden.new_empty(0)
    return hidden.new_empty(T, dtype=torch.float32), hidden.new_empty(T, dtype=torch.float32), grad_h


@torch.library.custom_op("mmlatent::linear_softmax_rows_backward", mutates_args=())
def _rows_backward_op(grad_values: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], targets: torch.Tensor, lse: torch.Tensor, kind: str,
                      ignore_index: Optional[int], label_smoothing: float, softcap: Optional[float],
                      temperature: float, chunk_rows: int, needs: List[bool]
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rows_backward_impl(grad_values, hidden, weight, bias, targets, lse, kind, ignore_index,
                               label_smoothing, softcap, temperature, chunk_rows, needs)


@_rows_backward_op.register_fake
def _(grad_values, hidden, weight, bias, targets, lse, kind, ignore_index, label_smoothing, softcap, temperature,
      chunk_rows, needs):
    return (hidden.new_empty(hidden.shape) if needs[0] else hidden.new_empty(0),
            weight.new_empty(weight.shape) if needs[1] else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if (needs[2] and bias is not None) else weight.new_empty(0))


def _rows_setup(ctx, inputs, output):
    hidden, weight, bias, targets, *options, row_grad_hidden = inputs
    ctx.options = options
    ctx.has_bias = bias is not None
    ctx.row_grad_hidden = row_grad_hidden
    if row_grad_hidden:  # d value_t / d hidden_t, computed in the forward: the backward only scales rows
        ctx.save_for_backward(output[2])
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, output[1])


def _rows_backward(ctx, grad_values, _grad_lse, _grad_row_grads):
    nothing = (None,) * 8
    if ctx.row_grad_hidden:
        (row_grads,) = ctx.saved_tensors
        return ((row_grads * grad_values.to(torch.float32)[:, None]).to(row_grads.dtype), None, None) + nothing
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    gh, gw, gb = _rows_backward_op(grad_values, hidden, weight, bias, targets, lse, *ctx.options, needs)
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None) + nothing


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


# -------------------------------------------------------------------------------------------- public functions

def _check_linear(hidden, weight, bias, targets, targets_name: str, chunk_rows):
    checks.tensor("hidden", hidden, dims=2, dtypes=checks.FLOAT_DTYPES)
    T, H = hidden.shape
    if T == 0:
        raise ValueError("hidden: expected at least one row (T >= 1), got shape (0, H)")
    checks.tensor("weight", weight, dims=2, device=hidden.device)
    checks.same_dtype("weight", weight, "hidden", hidden)
    if weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape [V, H] = [*, {H}] with V >= 1 (H from hidden), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        checks.tensor("bias", bias, dims=1, device=hidden.device)
        checks.same_dtype("bias", bias, "hidden", hidden)
        checks.shape("bias", bias, (weight.shape[0],), "[V]")
    checks.tensor(targets_name, targets, dims=1, dtypes=(torch.int64, torch.int32), device=hidden.device)
    checks.shape(targets_name, targets, (T,), "[T] like hidden's rows")
    if chunk_rows is None:
        return default_chunk_rows(weight.shape[0], hidden.element_size(), hidden.device)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int):
        raise TypeError(f"chunk_rows: expected a positive int or None, got {type(chunk_rows).__name__}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected a positive int or None, got {chunk_rows}")
    return chunk_rows


def _autocast(hidden, weight, bias):
    """Under torch.autocast, run in the autocast dtype as F.linear would (the casts are differentiable)."""
    device_type = hidden.device.type
    # Meta tensors have no autocast state (asking raises); they run the ops' fake implementations.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = (lambda t: t if t is None or t.dtype == dtype or t.dtype == torch.float64 else t.to(dtype))
    return cast(hidden), cast(weight), cast(bias)


def _needs(hidden, weight, bias) -> List[bool]:
    if not torch.is_grad_enabled():
        return [False, False, False]
    return [hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]


def _only_hidden_needs_grad(hidden, weight, bias) -> bool:
    """The frozen-head case (LoRA, GRPO on adapters): each row's hidden gradient is its upstream scalar times a
    vector known in the forward pass, so per-row results can compute it there as scalar losses do."""
    return _needs(hidden, weight, bias) == [True, False, False]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, logit_softcap: Optional[float] = None,
                         chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` against ``labels``, without building the logits.

    Equals ``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=..., reduction=...,
    label_smoothing=...)`` (with ``logit_softcap`` c, of ``c * tanh(logits / c)`` first), with softmax math in
    float32, and peak extra memory O(chunk_rows * V) in the forward and the backward.

    Args:
        hidden: [T, H] float16/bfloat16/float32/float64, T >= 1.
        weight: [V, H] same dtype (an ``lm_head.weight``).
        labels: [T] int64 (int32 accepted) in [0, V), or ``ignore_index``.
        bias: [V] or None.
        ignore_index: label of rows that add nothing (no GEMM is spent on them).
        reduction: "mean" over the non-ignored rows, "sum", or "none" ([T] float32, 0 at ignored rows).
            With every label ignored: 0 for "mean" and "sum" (never NaN), zero gradients.
        label_smoothing: in [0, 1], PyTorch's definition.
        logit_softcap: c > 0 or None (Gemma-2's final logit soft-capping).
        chunk_rows: rows per chunk; None picks one from V and the device (see :func:`default_chunk_rows`).

    Returns:
        float32 loss: a scalar, or [T] with ``reduction="none"``. Differentiable in hidden, weight and bias.

    Scalar reductions compute the gradients during the forward pass (when any input requires grad), so their
    backward costs nothing but a scale; ``reduction="none"`` recomputes each chunk's logits in the backward.
    Under torch.autocast the inputs are cast to the autocast dtype, as ``F.linear`` would.
    """
    hidden, weight, bias = _autocast(hidden, weight, bias)
    chunk_rows = _check_linear(hidden, weight, bias, labels, "labels", chunk_rows)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    label_smoothing = checks.number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing}")
    if logit_softcap is not None:
        logit_softcap = checks.number("logit_softcap", logit_softcap, positive=True)
    labels = labels.long()
    if reduction == "none":
        values, *_ = _rows_op(hidden, weight, bias, labels, "ce", ignore_index, label_smoothing, logit_softcap, 1.0,
                              chunk_rows, _only_hidden_needs_grad(hidden, weight, bias))
        return values
    loss, *_ = _fused_ce_op(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, logit_softcap,
                            chunk_rows, _needs(hidden, weight, bias))
    return loss


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                     bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                     chunk_rows: Optional[int] = None) -> torch.Tensor:
    """log_softmax((hidden @ weight.T + bias) / temperature)[t, tokens[t]] for every row, without the logits.

    What policy-gradient losses (GRPO, PPO) need: the log-probability of each sampled token.

    Args:
        hidden: [T, H] float16/bfloat16/float32/float64, T >= 1.
        weight: [V, H] same dtype; bias: [V] or None.
        tokens: [T] int64 (int32 accepted) in [0, V).
        temperature: > 0, divides the logits.
        chunk_rows: rows per chunk; None picks one from V and the device.

    Returns:
        logp [T] float32, differentiable in hidden, weight and bias (the backward recomputes each chunk's logits;
        peak extra memory O(chunk_rows * V)).
    """
    hidden, weight, bias = _autocast(hidden, weight, bias)
    chunk_rows = _check_linear(hidden, weight, bias, tokens, "tokens", chunk_rows)
    temperature = checks.number("temperature", temperature, positive=True)
    values, *_ = _rows_op(hidden, weight, bias, tokens.long(), "logp", None, 0.0, None, temperature, chunk_rows,
                          _only_hidden_needs_grad(hidden, weight, bias))
    return values


__all__ = ["linear_cross_entropy", "linear_log_probs", "default_chunk_rows", "LINEAR_CROSS_ENTROPY",
           "LINEAR_LOG_PROBS"]
