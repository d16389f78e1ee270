"""What a benchmark run leaves behind: the device's label, the markdown table and the speed-up / memory plot."""
from __future__ import annotations

import os
import re

import torch


def device_label(device: torch.device) -> str:
    """A short stable name for ``device``: "nvidia-h200" for known GPUs, the lower-cased name otherwise,
    "cpu-<N>core" on a CPU. It names the folder results land in (benches/results/<label>/)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key in ("h200", "h100", "a100", "l40s"):
            if key in name:
                return f"nvidia-{key}"
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"cpu-{os.cpu_count()}core"


def _hardware_cell(row: dict) -> str:
    cell = ""
    if "tflops" in row:
        cell = f"{row['tflops']:.0f} TFLOP/s ({100 * row['fraction_of_bf16_ceiling']:.0f}%)"
    if "gbps" in row:
        cell = f"{row['gbps']:.0f} GB/s"
        if "fraction_of_hbm" in row:
            cell += f" ({100 * row['fraction_of_hbm']:.0f}% HBM)"
    if "mmlatent_over_floor" in row:
        cell = f"mmlatent = {row['mmlatent_over_floor']:.2f}x this floor"
    return cell


def markdown(result: dict) -> str:
    """The table of a ``run`` result: one line per (op, shape, implementation), ratios on the baselines' lines."""
    lines = [f"Device `{result['device']}`, torch {result['torch']}, dtype {result['dtype']}, "
             f"median of {result['repeats']} runs; command: `{result['command']}`", "",
             "| op | shape | impl | median ms | peak MiB | mmlatent speed-up | mmlatent memory ratio | HW |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        speed = f"{r['speedup_of_mmlatent']:.2f}x" if "speedup_of_mmlatent" in r else ""
        mem = f"{r['memory_ratio_of_mmlatent']:.3f}" if "memory_ratio_of_mmlatent" in r else ""
        median = "out of memory" if r["median_s"] is None else f"{r['median_s'] * 1e3:.3f}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {median} | {peak} | {speed} | "
                     f"{mem} | {_hardware_cell(r)} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """Writes to ``path`` (a .png) two bar charts of the baselines' rows: mmlatent's speed-up and memory ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "speedup_of_mmlatent" in r]
    labels = [f"{r['op']}\n{r['shape']}\nvs {r['impl']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.55 * len(rows) + 2), sharey=True)
    axes[0].barh(labels, [r["speedup_of_mmlatent"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("speed-up of mmlatent (baseline time / ours), log scale")
    axes[1].barh(labels, [r.get("memory_ratio_of_mmlatent", float("nan")) for r in rows], color="tab:green")
    axes[1].set_xlabel("peak memory of mmlatent / baseline, log scale")
    for ax in axes:
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"mmlatent kernels on {result['device']} ({result['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
