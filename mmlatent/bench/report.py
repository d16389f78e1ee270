"""What a benchmark run leaves behind: the device's label, the markdown table and the speed-up / memory plot."""
from __future__ import annotations

import os
import re
from typing import List

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
    notes = readings(result)
    if notes:
        lines += ["", "Reading (speed-up > 1 and memory ratio < 1: mmlatent is better):", ""]
        lines += [line if line.startswith("  - ") else f"- {line}" for line in notes]
    return "\n".join(lines) + "\n"


def reading(row: dict) -> str:
    """One line that reads a baseline's row: how mmlatent compares with it in time and peak memory."""
    parts = []
    speedup = row.get("speedup_of_mmlatent")
    if speedup is not None:
        parts.append(f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower")
    memory = row.get("memory_ratio_of_mmlatent")
    if memory is not None:
        if memory == 0:  # an in-place op that allocates nothing, against a baseline that does
            parts.append("no extra peak memory, where the baseline allocates")
        else:
            parts.append(f"{1 / memory:.1f}x less peak memory" if memory <= 1 else f"{memory:.1f}x more peak memory")
    verdict = ", ".join(parts) if parts else "no ratio (the baseline did not run)"
    return f"mmlatent vs {row['impl']}: {verdict}"


def readings(result: dict) -> List[str]:
    """For each case of ``result`` with baselines: ``op [shape]: <what the row shows>`` (when the case has a known
    reading, see ``mmlatent.bench.cases.DEMO_ROWS``), then one :func:`reading` per baseline."""
    from .cases import DEMO_ROWS
    lines, seen = [], set()
    for row in result["rows"]:
        key = (row["op"], row["shape"])
        if key in seen or not any(r["op"] == row["op"] and r["shape"] == row["shape"] and "speedup_of_mmlatent" in r
                                  for r in result["rows"]):
            continue
        seen.add(key)
        why = DEMO_ROWS.get(key)
        lines.append(f"{row['op']} [{row['shape']}]" + (f": {why}" if why else ""))
        lines += [f"  - {reading(r)}" for r in result["rows"]
                  if (r["op"], r["shape"]) == key and "speedup_of_mmlatent" in r]
    return lines


def _ratio_bars(ax, labels, values, better_above_one: bool, unit: str) -> None:
    """Horizontal log-scale bars, each labelled with its ratio, green where mmlatent is better, red where worse."""
    import math
    colours = ["tab:gray" if not math.isfinite(v) else
               ("tab:green" if (v >= 1) == better_above_one else "tab:red") for v in values]
    bars = ax.barh(labels, [v if math.isfinite(v) else 0 for v in values], color=colours)
    for bar, v in zip(bars, values):
        if math.isfinite(v):
            ax.annotate(f"{v:.2f}{unit}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.tick_params(axis="y", labelsize=7)


def plot(result: dict, path: str) -> None:
    """Writes to ``path`` (a .png) two bar charts of the baselines' rows: mmlatent's speed-up (right of 1 is
    better) and memory ratio (left of 1 is better), each bar labelled with its ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "speedup_of_mmlatent" in r]
    labels = [f"{r['op']}\n{r['shape']}\nvs {r['impl']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(15, 0.6 * len(rows) + 2), sharey=True)
    _ratio_bars(axes[0], labels, [r["speedup_of_mmlatent"] for r in rows], True, "x")
    axes[0].set_xlabel("speed-up of mmlatent = baseline time / mmlatent time (log)\n> 1: mmlatent faster (green)")
    _ratio_bars(axes[1], labels, [r.get("memory_ratio_of_mmlatent", float("nan")) for r in rows], False, "")
    axes[1].set_xlabel("peak memory of mmlatent / baseline (log)\n< 1: mmlatent leaner (green)")
    fig.suptitle(f"mmlatent against same-run baselines on {result['device']} ({result['dtype']}, median of "
                 f"{result['repeats']} runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
