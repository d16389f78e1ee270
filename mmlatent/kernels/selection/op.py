"""Public selection op: ``select_topk_tokens``.

The public function validates and documents; the ``mmlatent::select_topk_tokens`` custom op (fake implementation
registered; no autograd: indices and bit copies have no gradient) wraps the computation; inside it dispatch
chooses once among the C++/CUDA op of ``mmlatent._C``, the Triton kernel and the torch implementation.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import checks
from ..dispatch import OpDispatch, Reasons, native_op_reasons, native_reasons, torch_reasons, triton_reasons
from ..limits import (SELECTION_TRITON_MAX_TOKENS, cuda_row_mass_limits, cuda_select_image_max_layers,
                      cuda_select_max_tokens)
from . import torch_impl


def _contiguous_exclude_reasons(exclude) -> Reasons:
    if exclude is not None and not exclude.is_contiguous():
        return ["exclude is not contiguous, and it is updated in place"]
    return []


def _native_reasons(scores, exclude, embeds, **_) -> Reasons:
    reasons = native_reasons(scores.device) + _contiguous_exclude_reasons(exclude)
    if scores.device.type == "cuda":
        if scores.dtype == torch.float64:
            reasons.append("the CUDA op ranks float32/float16/bfloat16 scores (float64: native CPU op or torch)")
        if not reasons:  # the extension imports: ask it for the cap it was compiled with
            try:
                cap = cuda_select_max_tokens()
            except AttributeError:
                reasons.append("mmlatent._C predates its sources (rebuild it: pip install -e .)")
            else:
                if scores.shape[1] > cap:
                    reasons.append(f"the CUDA op ranks at most {cap} tokens per row, got Ni = {scores.shape[1]}")
        if embeds is not None and (embeds.shape[2] * embeds.element_size()) % 2:
            reasons.append("the CUDA op gathers rows of an even number of bytes")
    return reasons


def _triton_reasons(scores, exclude, embeds, **_) -> Reasons:
    reasons = triton_reasons(scores.device) + _contiguous_exclude_reasons(exclude)
    if scores.dtype == torch.float64:
        reasons.append("float64 scores would be ranked after rounding to float32 (native CPU op and torch are "
                       "exact)")
    if scores.shape[1] > SELECTION_TRITON_MAX_TOKENS:
        reasons.append(f"one Triton program ranks at most {SELECTION_TRITON_MAX_TOKENS} tokens, got "
                       f"Ni = {scores.shape[1]}")
    return reasons


SELECT_TOPK_TOKENS = OpDispatch("select_topk_tokens", {
    "native": _native_reasons,
    "triton": _triton_reasons,
    "torch": torch_reasons,
})


@torch.library.custom_op("mmlatent::select_topk_tokens", mutates_args=("exclude",))
def _select_topk_tokens_op(scores: torch.Tensor, k: int, exclude: Optional[torch.Tensor],
                           valid: Optional[torch.Tensor], embeds: Optional[torch.Tensor],
                           by_position: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    backend = SELECT_TOPK_TOKENS.choose(scores=scores, exclude=exclude, embeds=embeds)
    if backend == "native":
        return torch.ops.mmlatent.select_topk_tokens_native(scores, k, exclude, valid, embeds, not by_position)
    if backend == "triton":
        from .triton_kernels import select_topk  # imports triton: only once that backend was chosen
        torch_impl.eligible_tokens(scores, exclude, valid, k)  # raises before anything is modified
        return select_topk(scores.contiguous(), k, exclude=exclude,
                           valid=None if valid is None else valid.contiguous(),
                           embeds=None if embeds is None else embeds.contiguous(), by_position=by_position)
    idx, gathered = torch_impl.select_topk_tokens(scores, k, exclude, valid, embeds, by_position)
    if gathered is None:
        gathered = scores.new_empty(scores.shape[0], k, 0)
    return idx, gathered


@_select_topk_tokens_op.register_fake
def _(scores, k, exclude, valid, embeds, by_position):
    B = scores.shape[0]
    idx = scores.new_empty(B, k, dtype=torch.int64)
    if embeds is None:
        return idx, scores.new_empty(B, k, 0)
    return idx, embeds.new_empty(B, k, embeds.shape[2])


def _native_fake(scores, k, exclude, valid, embeds, order_by_score):
    return _(scores, k, exclude, valid, embeds, not order_by_score)


def register_native_fake() -> None:
    """Fake (meta) implementation of the C++ op, once mmlatent._C has registered it."""
    if hasattr(torch.ops.mmlatent, "select_topk_tokens_native"):
        torch.library.register_fake("mmlatent::select_topk_tokens_native", _native_fake)


# Gathers are bit copies: embeds of a dtype that some backend cannot load or gather (complex numbers in Triton,
# float8 and unsigned 16/32/64-bit integers in torch.gather on the CPU) travel as integers of the same width.
_GATHERED_AS_IS = checks.FLOAT_DTYPES + (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_gatherable(embeds: torch.Tensor) -> torch.Tensor:
    if embeds.dtype in _GATHERED_AS_IS:
        return embeds
    if embeds.is_complex():  # (real, imag) pairs: complex128 has no 16-byte integer
        return torch.view_as_real(embeds).flatten(2)
    if embeds.element_size() not in _SAME_WIDTH_INT:
        raise TypeError(f"embeds: dtype {embeds.dtype} has no gather (elements of {embeds.element_size()} bytes)")
    return embeds.view(_SAME_WIDTH_INT[embeds.element_size()])


def _restore_dtype(gathered: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if gathered.dtype == dtype:
        return gathered
    if dtype.is_complex:
        return torch.view_as_complex(gathered.unflatten(2, (-1, 2)))
    return gathered.view(dtype)


def _check_selection(k_name: str, k: object, shape: Tuple[int, int], device: torch.device,
                     exclude: Optional[torch.Tensor], valid: Optional[torch.Tensor], embeds: Optional[torch.Tensor],
                     like: str) -> None:
    """The arguments of a top-k selection over [B, Ni] = ``shape`` (``like`` names the tensor of that shape)."""
    B, Ni = shape
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{k_name}: expected an int, got {type(k).__name__}")
    if not 1 <= k <= Ni:
        raise ValueError(f"{k_name}: expected 1 <= {k_name} <= Ni = {Ni}, got {k}")
    for name, mask in (("exclude", exclude), ("valid", valid)):
        if mask is not None:
            checks.tensor(name, mask, dims=2, dtypes=(torch.bool,), device=device)
            checks.shape(name, mask, (B, Ni), f"[B, Ni] like {like}")
    if exclude is not None:
        checks.writable("exclude", exclude)
    if embeds is not None:
        checks.tensor("embeds", embeds, dims=3, device=device)
        checks.shape("embeds", embeds, (B, Ni, None), "[B, Ni, Dm]")


def select_topk_tokens(scores: torch.Tensor, k: int, *, exclude: Optional[torch.Tensor] = None,
                       valid: Optional[torch.Tensor] = None, embeds: Optional[torch.Tensor] = None,
                       order: str = "position") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Selects, per row, the k eligible tokens with the highest score, marks them excluded and gathers them.

    Args:
        scores: [B, Ni] float (any float dtype).
        k: tokens to select per row, 1 <= k <= Ni.
        exclude: [B, Ni] bool, updated in place: selected entries become True. Excluded tokens are ineligible.
        valid: [B, Ni] bool, False at padding. Eligible = valid and not excluded.
        embeds: [B, Ni, Dm] optional, any dtype (complex and float8 too); the selected rows are gathered.
        order: "position" (indices ascending, spatial order kept) or "score" (best first).

    Ranking: higher score first, ties to the lower index, NaN ranks below every number. A row with fewer than k
    eligible tokens raises ValueError naming the row, and nothing is modified; so does an ``exclude`` whose
    elements share memory (an ``expand``-ed mask). Meta tensors give meta outputs (shapes only).

    Returns:
        (idx [B, k] int64 indices into the Ni axis, gathered [B, k, Dm] in embeds' dtype, or None).

    Example::

        >>> exclude = torch.zeros(1, 4, dtype=torch.bool)
        >>> select_topk_tokens(torch.tensor([[0.1, 0.9, 0.5, 0.9]]), 2, exclude=exclude)[0]
        tensor([[1, 3]])
    """
    checks.tensor("scores", scores, dims=2, dtypes=checks.FLOAT_DTYPES)
    _check_selection("k", k, tuple(scores.shape), scores.device, exclude, valid, embeds, "scores")
    if order not in ("position", "score"):
        raise ValueError(f"order: expected 'position' or 'score', got {order!r}")
    by_position = order == "position"
    bits = None if embeds is None else _as_gatherable(embeds)
    idx, gathered = _select_topk_tokens_op(scores, k, exclude, valid, bits, by_position)
    return idx, (_restore_dtype(gathered, embeds.dtype) if embeds is not None else None)


# ------------------------------------------------------------------------------------------ select_image_tokens

def _native_image_reasons(q, layers=1, kv_heads=1, num_images=0, embeds=None, **_) -> Reasons:
    reasons = native_op_reasons(q.device, "select_image_tokens_native")
    if q.device.type != "cuda" or reasons:
        return reasons
    if q.dtype == torch.float64:
        reasons.append("the CUDA kernel reads float32 / float16 / bfloat16 (float64: native CPU op or torch)")
    try:
        max_group, max_head_dim = cuda_row_mass_limits()
        max_tokens, max_layers = cuda_select_max_tokens(), cuda_select_image_max_layers()
    except AttributeError:
        return reasons + ["mmlatent._C predates its sources (rebuild it: pip install -e .)"]
    group, head_dim = q.shape[1] // kv_heads, q.shape[-1]
    if head_dim > max_head_dim or group > max_group:
        reasons.append(f"the CUDA kernel takes head dims up to {max_head_dim} and up to {max_group} query heads per "
                       f"KV head, got {head_dim} and {group}")
    if layers > max_layers:
        reasons.append(f"one launch takes at most {max_layers} layers, got {layers}")
    if num_images > max_tokens:
        reasons.append(f"the CUDA kernel ranks at most {max_tokens} tokens per row, got Ni = {num_images}")
    if embeds is not None and embeds.shape[2] * embeds.element_size() % 2:
        reasons.append("the CUDA kernel gathers rows of an even number of bytes")
    return reasons


# auto on CPU: native first, 1.39x the per-layer composition on its native ops and 4.14x on the torch backend over
# 28 layers at N2048 (8.4 against 11.7 and 34.8 ms, benches/results/cpu-2core/kernels-select-image-tokens.md). The
# "torch" backend is the composition itself: row_attention_mass per layer, then select_topk_tokens, each
# dispatching on its own. On CUDA the composition stays first (8.1 ms at 28 layers, N2048 on an H200,
# benches/results/nvidia-h200/kernels-select-image.md) until the fused kernel, which has not run on a GPU yet, is
# measured against it.
SELECT_IMAGE_TOKENS = OpDispatch("select_image_tokens", {"native": _native_image_reasons, "torch": torch_reasons},
                                 device_auto_order={"cuda": ("torch", "native")})


@torch.library.custom_op("mmlatent::select_image_tokens", mutates_args=("exclude",))
def _select_image_tokens_op(q: List[torch.Tensor], k: List[torch.Tensor], image_index: torch.Tensor, k_select: int,
                            key_valid: Optional[torch.Tensor], exclude: Optional[torch.Tensor],
                            valid: Optional[torch.Tensor], embeds: Optional[torch.Tensor], scale: float,
                            layer_weights: List[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    if SELECT_IMAGE_TOKENS.choose(q=q[0], layers=len(q), kv_heads=k[0].shape[1], num_images=image_index.shape[1],
                                  embeds=embeds) == "native":
        return torch.ops.mmlatent.select_image_tokens_native(q, k, image_index, k_select, key_valid, exclude, valid,
                                                             embeds, scale, layer_weights, False)
    from ..attention import row_attention_mass
    # the ranking is checked first, so that a row short of eligible tokens costs no attention pass
    torch_impl.eligible_tokens(image_index, exclude, valid, k_select)
    scores = torch.zeros(image_index.shape, dtype=torch.float32, device=image_index.device)
    for q_layer, k_layer, weight in zip(q, k, layer_weights):
        row_attention_mass(q_layer, k_layer, image_index, scores, key_valid=key_valid, scale=scale, weight=weight)
    idx, gathered = select_topk_tokens(scores, k_select, exclude=exclude, valid=valid, embeds=embeds)
    return idx, gathered if gathered is not None else scores.new_empty(scores.shape[0], k_select, 0)


@_select_image_tokens_op.register_fake
def _image_tokens_fake(q, k, image_index, k_select, key_valid, exclude, valid, embeds, scale, layer_weights):
    B = image_index.shape[0]
    idx = image_index.new_empty(B, k_select, dtype=torch.int64)
    if embeds is None:
        return idx, q[0].new_empty(B, k_select, 0)
    return idx, embeds.new_empty(B, k_select, embeds.shape[2])


def register_image_tokens_native_fake() -> None:
    """Fake (meta) implementation of the C++ op, once mmlatent._C has registered it."""
    if hasattr(torch.ops.mmlatent, "select_image_tokens_native"):
        torch.library.register_fake(
            "mmlatent::select_image_tokens_native",
            lambda q, k, image_index, k_select, key_valid, exclude, valid, embeds, scale, layer_weights, by_score:
            _image_tokens_fake(q, k, image_index, k_select, key_valid, exclude, valid, embeds, scale, layer_weights))


def _layers(name: str, value: object, dims: int) -> List[torch.Tensor]:
    """One tensor per layer: a list / tuple of [..] tensors, or one stacked [L, ..] tensor."""
    if isinstance(value, torch.Tensor):
        checks.tensor(name, value, dims=dims + 1, dtypes=checks.FLOAT_DTYPES)
        return list(value.unbind(0))
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name}: expected a non-empty list of per-layer tensors or one stacked [L, ...] tensor, got "
                        f"{type(value).__name__}" + (" (empty)" if isinstance(value, (list, tuple)) else ""))
    for i, layer in enumerate(value):
        checks.tensor(f"{name}[{i}]", layer, dims=dims, dtypes=checks.FLOAT_DTYPES)
    return list(value)


def select_image_tokens(q: Union[torch.Tensor, Sequence[torch.Tensor]], k: Union[torch.Tensor, Sequence[torch.Tensor]],
                        image_index: torch.Tensor, k_select: int, *, key_valid: Optional[torch.Tensor] = None,
                        exclude: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
                        embeds: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                        layer_weights: Optional[Sequence[float]] = None
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The k image tokens the last query row attends to most over every layer, selected, excluded and gathered in
    one call: IVT-LR's selection at the end of a latent step, from the KV cache.

    Args:
        q: the last query row of every layer, post-RoPE: a list of L [B, Hq, D] tensors or one [L, B, Hq, D].
        k: every layer's cached keys: a list of L [B, Hkv, N, D] tensors or one [L, B, Hkv, N, D]; the dtype of
            q; Hq % Hkv == 0.
        image_index: [B, Ni] int64 key positions of the image tokens; -1 marks padding.
        k_select: tokens to select per row, 1 <= k_select <= Ni.
        key_valid: [B, N] bool, False for padding keys; None = all keys valid.
        exclude: [B, Ni] bool, updated in place: selected entries become True; excluded tokens are ineligible.
        valid: [B, Ni] bool, False where a token may not be selected (padding slots); eligible = valid & ~exclude.
        embeds: [B, Ni, Dm] (any dtype), the embeddings gathered for the selected tokens.
        scale: softmax scale, default D ** -0.5.
        layer_weights: L numbers multiplying each layer's mass (default 1 each; 1 / L averages).

    Equal to ``row_attention_mass(q[l], k[l], image_index, scores, key_valid=key_valid, scale=scale,
    weight=layer_weights[l])`` for each layer in order into zero ``scores`` [B, Ni] float32, followed by
    ``select_topk_tokens(scores, k_select, exclude=exclude, valid=valid, embeds=embeds)``: the same tokens in
    position order, ties to the lower index, NaN below every number, and a row with fewer than ``k_select``
    eligible tokens a ValueError with nothing modified.

    Returns:
        (idx [B, k_select] int64 indices into the Ni axis, gathered [B, k_select, Dm] in embeds' dtype, or None).

    Backends: ``native`` (one C++ call on CPU: every layer's (batch, KV head) tasks in one parallel region, then the
    selection) and ``torch`` (the composition above, each op on its own backend).

    Example::

        >>> q, k = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 10, 16)  # 2 layers
        >>> select_image_tokens(q, k, torch.tensor([[1, 3, 5, 7]]), 2)[0].shape
        torch.Size([1, 2])
    """
    from ..attention.op import _check_key_valid, _check_kv
    q_layers, k_layers = _layers("q", q, 3), _layers("k", k, 4)
    if len(q_layers) != len(k_layers):
        raise ValueError(f"k: expected one tensor per layer of q ({len(q_layers)}), got {len(k_layers)}")
    first_q, first_k = q_layers[0], k_layers[0]
    for i, (q_layer, k_layer) in enumerate(zip(q_layers, k_layers)):
        checks.tensor(f"q[{i}]", q_layer, device=first_q.device)
        checks.same_dtype(f"q[{i}]", q_layer, "q[0]", first_q)
        checks.shape(f"q[{i}]", q_layer, tuple(first_q.shape), "the shape of q[0]")
        _check_kv(q_layer, k_layer, name_k=f"k[{i}]")
        checks.shape(f"k[{i}]", k_layer, tuple(first_k.shape), "the shape of k[0]")
    B, N = first_q.shape[0], first_k.shape[2]
    checks.tensor("image_index", image_index, dims=2, dtypes=(torch.int64,), device=first_q.device)
    checks.shape("image_index", image_index, (B, None), "[B, Ni]")
    _check_key_valid(key_valid, B, N, first_q.device)
    _check_selection("k_select", k_select, tuple(image_index.shape), first_q.device, exclude, valid, embeds,
                     "image_index")
    # image_index's range is checked inside the op, before anything is written (one host sync, which a compiled
    # caller must not trace): by the C++ op, or by row_attention_mass in the composition
    L = len(q_layers)
    if layer_weights is None:
        weights = [1.0] * L
    else:
        if isinstance(layer_weights, torch.Tensor):
            layer_weights = layer_weights.tolist()
        if not isinstance(layer_weights, (list, tuple)) or len(layer_weights) != L:
            raise ValueError(f"layer_weights: expected {L} numbers (one per layer), got {layer_weights!r}")
        weights = [checks.number(f"layer_weights[{i}]", w) for i, w in enumerate(layer_weights)]
    scale = first_q.shape[-1] ** -0.5 if scale is None else checks.number("scale", scale, positive=True)
    bits = None if embeds is None else _as_gatherable(embeds)
    with torch.no_grad():  # a selection, never differentiated
        idx, gathered = _select_image_tokens_op(q_layers, k_layers, image_index, k_select, key_valid, exclude, valid,
                                                bits, scale, weights)
    return idx, (_restore_dtype(gathered, embeds.dtype) if embeds is not None else None)


__all__ = ["select_topk_tokens", "select_image_tokens", "register_native_fake", "register_image_tokens_native_fake",
           "SELECT_TOPK_TOKENS", "SELECT_IMAGE_TOKENS"]
