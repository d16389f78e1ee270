"""Numerics shared by the Triton kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16_grid(x):
    # The interpreter converts float32 to bfloat16 by truncation (the GPU rounds to nearest even): round here so
    # that CPU tests see the GPU's rounding error, not twice it.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
