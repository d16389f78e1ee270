"""Seeded inputs shared by the cases modules: every case builds the same tensors on every device and run."""
from __future__ import annotations

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
