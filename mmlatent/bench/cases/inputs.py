"""Seeded inputs shared by the cases modules: every case builds the same tensors on every device and run."""
from __future__ import annotations

import os
from typing import Callable

import torch


def cpu_generator(seed: int = 0) -> torch.Generator:
    """A CPU generator: drawing on the CPU, then moving, gives the same values whatever the target device."""
    return torch.Generator(device="cpu").manual_seed(seed)


def normal_tensors(generator: torch.Generator, device: torch.device,
                   dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """``randn(*shape)`` -> a standard-normal tensor of that shape drawn from ``generator``, on ``device`` in
    ``dtype``."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    return randn


def pinned_backend(backend: str, call: Callable[[dict], object]) -> Callable[[dict], object]:
    """``call`` with ``MMLATENT_BACKEND`` set to ``backend`` while it runs (the variable is read at every op call;
    setting it costs about a microsecond), for rows that compare an op's backends in one run."""
    def pinned(inputs: dict) -> object:
        previous = os.environ.get("MMLATENT_BACKEND")
        os.environ["MMLATENT_BACKEND"] = backend
        try:
            return call(inputs)
        finally:
            if previous is None:
                del os.environ["MMLATENT_BACKEND"]
            else:
                os.environ["MMLATENT_BACKEND"] = previous
    return pinned
