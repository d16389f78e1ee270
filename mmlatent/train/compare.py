"""Finished runs of one method evaluated side by side on their held-out records (``mmlatent compare``): the
method's markdown table, the rows as JSON (with the command, torch and thread count) and a plot of the accuracy
per question kind with standard errors, beside each Modal-mixed run's dummy-latent ablation."""
from __future__ import annotations

import os
import platform
from typing import List, Optional, Sequence

import torch

from .checkpoint import read_json, resolve_checkpoint, write_json
from .methods import method_module
from .modal_mixed import run_method


def compare(checkpoints: Sequence[str], out: str, *, n: Optional[int] = None, device: Optional[str] = None,
            command: Optional[str] = None, progress: bool = True) -> List[dict]:
    """Evaluates each run folder of ``checkpoints`` (all of one method, each verified) on its first ``n``
    held-out records (None: all), prints each summary, and writes ``out + ".md"`` (the method's
    ``markdown_table``), ``out + ".json"`` ({command, torch, threads, rows}) and ``out + ".png"``. Returns the
    rows (the method's ``table_row`` of each run, its source the folder given). A folder of another method than
    the first is refused, naming it, before anything is evaluated."""
    if not checkpoints:
        raise ValueError("checkpoints: expected at least one run folder, got none")
    methods = []
    for path in checkpoints:
        methods.append(run_method(resolve_checkpoint(path), verified=True))
        if methods[-1] != methods[0]:
            raise ValueError(f"checkpoint: {path} holds a {methods[-1]} run and {checkpoints[0]} a {methods[0]} "
                             f"run; one table compares runs of one method")
    method = method_module(methods[0])
    rows = []
    for path in checkpoints:
        model, tokenizer, config, image_processor = method.load_run(path, device=device)
        _, _, records = method.build_data(config)
        metrics = method.evaluate(model, tokenizer, image_processor, config, records[:n] if n else records,
                                  progress=progress)
        print("\n".join(method.summary_lines(metrics)), flush=True)
        trained = read_json(resolve_checkpoint(path), "run.json")["result"].get("train_seconds")
        rows.append(method.table_row(metrics, path, trained))
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(method.markdown_table(rows))
    write_json(out + ".json", dict(command=command, method=methods[0], torch=torch.__version__,
                                   threads=torch.get_num_threads(), machine=platform.machine(), rows=rows))
    plot_accuracy(rows, out + ".png")
    return rows


def plot_accuracy(rows: Sequence[dict], path: str) -> None:
    """Grouped bars: each run's strict accuracy per question kind and overall, with standard-error whiskers, and
    for a run with a dummy-latent ablation its accuracy with zeros and with noise fed back (hatched)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = sorted({k for r in rows for k in r["accuracy_by_kind"]}) + ["all"]
    bars = []  # (label, [(value, stderr) per kind], hatch)
    for r in rows:
        by_kind = dict(r["accuracy_by_kind"], all=dict(accuracy=r["accuracy"], accuracy_stderr=r["accuracy_stderr"]))
        bars.append((r["name"], [(by_kind[k]["accuracy"], by_kind[k]["accuracy_stderr"]) if k in by_kind
                                 else (float("nan"), 0.0) for k in kinds], None))
        for override, result in (r.get("ablation") or {}).items():
            ablated = dict(result["accuracy_by_kind"],
                           all=dict(accuracy=result["accuracy"], accuracy_stderr=result["accuracy_stderr"]))
            bars.append((f"{r['name']}, latents -> {override}",
                         [(ablated[k]["accuracy"], ablated[k]["accuracy_stderr"]) if k in ablated
                          else (float("nan"), 0.0) for k in kinds], "//"))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(kinds) * max(1, len(bars)) / 3), 4.5))
    width = 0.8 / len(bars)
    for i, (label, values, hatch) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(kinds))]
        ax.bar(xs, [100 * v for v, _ in values], width, yerr=[100 * e for _, e in values], capsize=2,
               label=label, hatch=hatch, edgecolor="k", linewidth=0.4)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("held-out accuracy, % (strict parse)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["compare", "plot_accuracy"]
