"""Backend choice for every public op (DESIGN.md, "Backends and dispatch").

Backends, in the default ``auto`` order:

- ``native``: ``mmlatent._C`` (C++ CPU ops, CUDA ops when the extension was built with nvcc);
- ``triton``: Triton kernels on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``;
- ``reference``: the memory-lean pure-torch path of :mod:`mmlatent.kernels.reference`, on any device.

``MMLATENT_BACKEND=auto|native|triton|reference`` (read at every call) overrides the order. Each op declares, per
backend, a function that returns ``None`` when the backend can run the given inputs or a sentence saying why not;
when the requested backend cannot run, :class:`BackendUnavailableError` lists every backend with its reason.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch

BACKENDS = ("native", "triton", "reference")
ENV_VAR = "MMLATENT_BACKEND"

Reason = Optional[str]


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these inputs; the message names every backend and why it was skipped."""


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}: expected one of auto, {', '.join(BACKENDS)}; got {value!r}")
    return value


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _native_module():
    """(module, None) when mmlatent._C imports, else (None, reason)."""
    try:
        from mmlatent import _C  # noqa: F401  (importing registers the mmlatent::*_native ops)
    except ImportError as err:  # not built: a source checkout without `pip install -e .`
        return None, f"mmlatent._C is not built ({err})"
    return _C, None


@functools.lru_cache(maxsize=None)
def _triton_import_reason() -> Reason:
    try:
        import triton  # noqa: F401
    except Exception as err:  # triton missing or broken
        return f"triton is not importable ({type(err).__name__}: {err})"
    return None


def native_reason(device: torch.device) -> Reason:
    module, why = _native_module()
    if module is None:
        return why
    if device.type == "cuda" and not module.cuda_archs():
        return "mmlatent._C was built without nvcc, so it has no CUDA kernels"
    if device.type not in ("cpu", "cuda"):
        return f"no native kernels for device type {device.type!r}"
    return None


def triton_reason(device: torch.device) -> Reason:
    why = _triton_import_reason()
    if why is not None:
        return why
    if device.type == "cpu":
        return None if triton_interpreting() else "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    if device.type == "cuda":
        if triton_interpreting():
            return "TRITON_INTERPRET=1 is set, and the interpreter runs on CPU tensors only"
        return None
    return f"no Triton target for device type {device.type!r}"


def reference_reason(**_) -> Reason:
    """The reference backend (pure torch) runs any inputs on any device."""
    return None


def triton_float_reason(device: torch.device, dtype: torch.dtype) -> Reason:
    """``triton_reason``, and float64 refused: the kernels compute in float32, the reference keeps float64 exact."""
    why = triton_reason(device)
    if why is None and dtype == torch.float64:
        return "float64 inputs are computed in float64 only by the reference"
    return why


@dataclass
class OpDispatch:
    """Which backends an op has and when each can run.

    ``checks[backend](**ctx)`` returns ``None`` when that backend can run the inputs described by ``ctx``
    (tensors and flags of the call), otherwise the reason it cannot. A backend missing from ``checks`` has no
    implementation of this op. ``auto_order`` is the order ``auto`` tries; an op that deviates from the default
    says which benchmark figure justifies it.
    """

    name: str
    checks: Dict[str, Callable[..., Reason]]
    auto_order: Sequence[str] = field(default=BACKENDS)

    def reason(self, backend: str, **ctx) -> Reason:
        check = self.checks.get(backend)
        if check is None:
            return f"{self.name} has no {backend} implementation"
        return check(**ctx)

    def choose(self, **ctx) -> str:
        requested = requested_backend()
        order = tuple(self.auto_order) if requested == "auto" else (requested,)
        reasons: Dict[str, str] = {}
        for backend in order:
            why = self.reason(backend, **ctx)
            if why is None:
                return backend
            reasons[backend] = why
        for backend in BACKENDS:
            if backend not in reasons:
                why = self.reason(backend, **ctx)
                reasons[backend] = why or f"could run, but {ENV_VAR}={requested} asks for another backend"
        lines = "\n".join(f"  - {b}: {reasons[b]}" for b in BACKENDS)
        raise BackendUnavailableError(
            f"{self.name}: no usable backend for {ENV_VAR}={requested}. Backends and why each was skipped:\n{lines}"
        )

    def report(self, **ctx) -> Dict[str, str]:
        """Every backend with "ok" or the reason it cannot run these inputs (for users and error messages)."""
        return {b: (self.reason(b, **ctx) or "ok") for b in BACKENDS}
