"""Backend choice for every public op (docs/design.md, "Operators: backends and dispatch").

Backends, in the default ``auto`` order:

- ``native``: ``mmlatent._C`` (C++ CPU ops, CUDA ops when the extension was built with nvcc);
- ``triton``: Triton kernels on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``;
- ``torch``: the memory-lean torch implementation beside each op (``<family>/torch_impl.py``), on any device.

``MMLATENT_BACKEND=auto|native|triton|torch`` (read at every call) overrides the order; ``reference``, the name
the torch backend had before, is accepted as an alias of ``torch`` so that existing scripts keep working. Each op
declares, per backend, a function returning the list of reasons that backend cannot run the given inputs (empty:
it can); every reason is reported, not only the first. The op asks :meth:`OpDispatch.choose` once per call; when
no allowed backend can run, :class:`BackendUnavailableError` describes the inputs and lists every backend with all
of its reasons.
"""
from __future__ import annotations

import functools
import os
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import limits

BACKENDS = ("native", "triton", "torch")
# Old name -> backend: "reference" was the torch backend's name while it doubled as the test oracle.
BACKEND_ALIASES = {"reference": "torch"}
ENV_VAR = "MMLATENT_BACKEND"

Reasons = List[str]


class BackendUnavailableError(RuntimeError):
    """No allowed backend can run these inputs; the message describes them and lists every backend's reasons."""


def requested_backend() -> str:
    """``auto`` or a name in :data:`BACKENDS` (aliases resolved), from ``MMLATENT_BACKEND``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    value = BACKEND_ALIASES.get(value, value)
    if value != "auto" and value not in BACKENDS:
        aliases = ", ".join(f"{old} (= {new})" for old, new in BACKEND_ALIASES.items())
        raise ValueError(f"{ENV_VAR}: expected one of auto, {', '.join(BACKENDS)} or the alias {aliases}; "
                         f"got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def native_module() -> Tuple[Optional[types.ModuleType], Optional[str]]:
    """(module, None) when mmlatent._C imports, else (None, reason)."""
    try:
        from mmlatent import _C  # noqa: F401  (importing registers the mmlatent::*_native ops)
    except ImportError as err:  # not built: a source checkout without `pip install -e .`
        return None, f"mmlatent._C is not built ({err})"
    return _C, None


@functools.lru_cache(maxsize=None)
def _triton_import_reason() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as err:  # triton missing or broken
        return f"triton is not importable ({type(err).__name__}: {err})"
    return None


def native_reasons(device: torch.device) -> Reasons:
    module, why = native_module()
    if module is None:
        return [why]
    if device.type == "cuda" and not module.cuda_archs():
        return ["mmlatent._C was built without nvcc, so it has no CUDA kernels"]
    if device.type not in ("cpu", "cuda"):
        return [f"no native kernels for device type {device.type!r}"]
    return []


def triton_reasons(device: torch.device) -> Reasons:
    reasons = []
    why = _triton_import_reason()
    if why is not None:
        reasons.append(why)
    if device.type == "cpu":
        if not limits.triton_interpreting():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    elif device.type == "cuda":
        if limits.triton_interpreting():
            reasons.append("TRITON_INTERPRET=1 is set, and the interpreter runs on CPU tensors only")
    else:
        reasons.append(f"no Triton target for device type {device.type!r}")
    return reasons


def triton_float_reasons(device: torch.device, dtype: torch.dtype) -> Reasons:
    """``triton_reasons``, and float64 refused: the kernels compute in float32, the torch backend keeps float64."""
    reasons = triton_reasons(device)
    if dtype == torch.float64:
        reasons.append("float64 inputs are computed in float64 only by the torch backend")
    return reasons


def triton_row_reasons(max_width: int) -> Callable[[torch.device, torch.dtype, int], Reasons]:
    """The reasons of a row kernel that holds a whole row of ``width`` values in one tile: ``triton_float_reasons``,
    and rows wider than ``max_width`` refused."""
    def reasons(device: torch.device, dtype: torch.dtype, width: int) -> Reasons:
        out = triton_float_reasons(device, dtype)
        if width > max_width:
            out.append(f"rows of {width} values exceed the kernel's one-tile limit of {max_width}")
        return out
    return reasons


def torch_reasons(**_inputs) -> Reasons:
    """The torch backend runs any inputs on any device."""
    return []


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"Tensor{list(value.shape)} {dtype} on {value.device}"
    return repr(value)


@dataclass
class OpDispatch:
    """Which backends an op has and when each can run.

    ``checks[backend](**inputs)`` returns the list of reasons that backend cannot run the inputs (tensors and
    flags of the call); an empty list means it can. A backend missing from ``checks`` has no implementation of
    this op. ``auto_order`` is the order ``auto`` tries; an op that deviates from the default says which
    benchmark figure justifies it.
    """

    name: str
    checks: Dict[str, Callable[..., Reasons]]
    auto_order: Sequence[str] = field(default=BACKENDS)
    # device type -> the order ``auto`` tries on that device, where it differs from ``auto_order``
    device_auto_order: Dict[str, Sequence[str]] = field(default_factory=dict)

    def reasons(self, backend: str, **inputs) -> Reasons:
        check = self.checks.get(backend)
        if check is None:
            return [f"{self.name} has no {backend} implementation"]
        return list(check(**inputs))

    def choose(self, **inputs) -> str:
        """The backend to run: the first of ``auto_order`` (or the one ``MMLATENT_BACKEND`` names) that can."""
        requested = requested_backend()
        order = self.auto_order_for(_device_of(inputs)) if requested == "auto" else (requested,)
        for backend in order:
            if not self.reasons(backend, **inputs):
                return backend
        lines = []
        for backend in BACKENDS:
            why = self.reasons(backend, **inputs)
            if not why:
                why = [f"could run, but {ENV_VAR}={requested} asks for another backend"]
            lines.append(f"  - {backend}: " + "; ".join(why))
        described = ", ".join(f"{k}={_describe(v)}" for k, v in inputs.items())
        raise BackendUnavailableError(
            f"{self.name}: no usable backend for {ENV_VAR}={requested} with inputs ({described}). Backends and "
            f"why each was skipped:\n" + "\n".join(lines))

    def auto_order_for(self, device: Optional[torch.device]) -> Tuple[str, ...]:
        """The order ``auto`` tries for inputs on ``device`` (None: the default order)."""
        if device is not None and device.type in self.device_auto_order:
            return tuple(self.device_auto_order[device.type])
        return tuple(self.auto_order)

    def report(self, **inputs) -> Dict[str, str]:
        """Every backend with "ok" or all the reasons it cannot run these inputs (for users and error messages)."""
        return {b: ("; ".join(self.reasons(b, **inputs)) or "ok") for b in BACKENDS}


def _device_of(inputs: Dict[str, object]) -> Optional[torch.device]:
    """The device the inputs live on: a ``device`` input, else the first tensor's."""
    device = inputs.get("device")
    if isinstance(device, torch.device):
        return device
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def native_op_reasons(device: torch.device, op: str) -> Reasons:
    """``native_reasons``, and an extension built before ``op`` existed refused (rebuild it)."""
    reasons = native_reasons(device)
    if not reasons and not hasattr(torch.ops.mmlatent, op):
        reasons.append(f"mmlatent._C predates its sources and has no {op} (rebuild it: pip install -e .)")
    return reasons


def triton_or_torch(name: str, triton_check: Callable[..., Reasons]) -> OpDispatch:
    """The dispatch of an op with a Triton kernel and the torch implementation (every op but selection)."""
    return OpDispatch(name, {"triton": triton_check, "torch": torch_reasons})


__all__ = ["triton_or_torch", "triton_row_reasons", "BACKENDS", "BACKEND_ALIASES", "ENV_VAR", "BackendUnavailableError",
           "requested_backend", "OpDispatch",
           "native_module", "native_reasons", "native_op_reasons", "triton_reasons", "triton_float_reasons",
           "torch_reasons"]
