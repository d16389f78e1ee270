"""Micro-benchmarks of the fused ops and of the methods built on them, against baselines measured in the same run.

    python -m mmlatent.bench [--sizes default|tiny|gpu|demo] [--out DIR] [--repeats N] [--dtype D] [--ops PREFIX]

Every row is one op at one shape, timed as the median of ``--repeats`` runs after a warm-up, with its peak memory,
next to its baselines at the same shape (each cases module names its baselines and what they stand for). On a GPU
the table adds TFLOP/s or GB/s against the device's measured ceiling. Writes kernels.json, kernels.md and
kernels.png into DIR (default benches/results/<device>/).

Layout: ``case`` (the Case record), ``cases`` (one module per op family and per method, ``cases_for``),
``harness`` (timing, peak memory, ratios), ``ceilings`` (hardware ceilings, FLOP and byte formulas), ``report``
(table, plot, device label), ``command`` (the command line).
"""
from .case import FLOOR_PREFIX, MMLATENT, Case, implementation
from .cases import DEMO_ROWS, FAMILIES, SIZES, cases_for
from .cases.attention import attention_case, row_mass_case
from .cases.causal_lm import causal_lm_case
from .cases.diffusion import diffusion_mse_case, modulate_case
from .cases.diffusion_head import diffusion_case
from .cases.ivtlr import LATENT_STEPS, ivtlr_case
from .cases.losses import cross_entropy_case, log_probs_case
from .cases.selection import select_case
from .ceilings import (BF16_TFLOPS_CEILING, HBM_TBPS, attention_flops, diffusion_mse_bytes, hardware_rates,
                       layer_norm_modulate_bytes, linear_head_flops, row_mass_bytes)
from .command import DTYPES, add_arguments, main, positive_int
from .harness import (compare_with_ours, measure, memory_probe, peak_memory_cpu_subprocess, peak_memory_here, run,
                      time_call)
from .report import device_label, markdown, plot, reading, readings

__all__ = ["Case", "MMLATENT", "FLOOR_PREFIX", "implementation", "SIZES", "FAMILIES", "DEMO_ROWS", "cases_for",
           "attention_case", "row_mass_case", "select_case", "cross_entropy_case", "log_probs_case",
           "modulate_case", "diffusion_mse_case", "diffusion_case", "ivtlr_case", "causal_lm_case", "LATENT_STEPS",
           "BF16_TFLOPS_CEILING", "HBM_TBPS", "attention_flops", "linear_head_flops", "row_mass_bytes",
           "layer_norm_modulate_bytes", "diffusion_mse_bytes", "hardware_rates",
           "time_call", "peak_memory_here", "peak_memory_cpu_subprocess", "memory_probe", "measure",
           "compare_with_ours", "run", "markdown", "plot", "reading", "readings", "device_label", "DTYPES",
           "positive_int",
           "add_arguments", "main"]
