"""Measured hardware ceilings, and the work of one call of each op that the GPU table holds against them.

Each formula counts the least work any implementation must do: FLOPs of the matrix products (2 per
multiply-add), or the bytes of the tensors that must be read and written once. The ceilings are the measured
dense bf16 matmul rate and HBM bandwidth (docs/benchmarks.md, "Hardware ceilings").
"""
from __future__ import annotations

from typing import Dict, Optional

BF16_TFLOPS_CEILING = 790.0
HBM_TBPS = {"h100": 3.0, "h200": 4.3}

# Bytes per activation element on the GPU, where the table reports bandwidth: bf16 (or fp16).
GPU_ELEMENT_BYTES = 2


def attention_flops(batch: int, q_heads: int, rows: int, keys: int, head_dim: int, causal: bool,
                    with_values: bool = True) -> float:
    """2 FLOPs per multiply-add of QK^T (and PV) over the visible (query, key) pairs; causal is bottom-right."""
    visible = rows * keys - rows * (rows - 1) // 2 if causal else rows * keys
    return 2.0 * batch * q_heads * visible * head_dim * (2 if with_values else 1)


def linear_head_flops(tokens: int, hidden: int, vocab: int, trainable_head: bool) -> float:
    """Forward + backward of a [T, H] x [H, V] head: the logits, grad_hidden and (if trained) grad_weight GEMMs."""
    gemms = 3 if trainable_head else 2
    return 2.0 * gemms * tokens * hidden * vocab


def row_mass_bytes(batch: int, kv_heads: int, keys: int, head_dim: int) -> float:
    """One query row against every key: reading K dominates the traffic."""
    return float(batch * kv_heads * keys * head_dim * GPU_ELEMENT_BYTES)


def layer_norm_modulate_bytes(rows: int, width: int) -> float:
    """Forward reads x, shift, scale and writes y; backward reads dy, x, scale and writes dx, dscale (dshift is
    dy itself): 9 tensors of [N, W]."""
    return 9.0 * rows * width * GPU_ELEMENT_BYTES


def diffusion_mse_bytes(rows: int, channels: int) -> float:
    """Forward reads pred, x0, noise and writes the gradient; backward reads it and writes pred's gradient: 6
    tensors of [R, C]."""
    return 6.0 * rows * channels * GPU_ELEMENT_BYTES


def denoise_step_bytes(rows: int, channels: int, out_bytes: float = GPU_ELEMENT_BYTES,
                       noise_in_kernel: bool = False) -> float:
    """One guided step: reads x, noise (float32) and the 2R model-output rows, writes x: [R, C] three times in
    float32 and twice in the output's dtype; noise drawn in the kernel saves one float32 read."""
    return rows * channels * ((2 if noise_in_kernel else 3) * 4.0 + 2 * out_bytes)


def hardware_rates(flops: float, bytes_moved: float, seconds: float, device: str) -> Dict[str, float]:
    """TFLOP/s and GB/s of one call taking ``seconds``, with their fraction of the ceiling of ``device`` (a
    ``device_label``; bandwidth fractions only for devices whose HBM bandwidth is known)."""
    rates: Dict[str, float] = {}
    if flops:
        rates["tflops"] = flops / seconds / 1e12
        rates["fraction_of_bf16_ceiling"] = rates["tflops"] / BF16_TFLOPS_CEILING
    if bytes_moved:
        rates["gbps"] = bytes_moved / seconds / 1e9
        hbm: Optional[float] = HBM_TBPS.get(device.replace("nvidia-", ""))
        if hbm:
            rates["fraction_of_hbm"] = rates["gbps"] / (hbm * 1e3)
    return rates
