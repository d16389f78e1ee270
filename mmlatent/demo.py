"""What `make demo` runs on a CPU laptop in a few minutes.

1. Trains the tiny Qwen2-VL of :mod:`mmlatent.models.tiny` briefly on the embedded synthetic task, three ways: a
   no-CoT baseline, explicit CoT (IVT-LR's stage 0) and the IVT-LR curriculum up to stage 3, with live progress.
2. Evaluates those runs and the shipped checkpoints (``checkpoints/synthetic-*/final``) on held-out questions:
   strict accuracy with its standard error, the public code's lenient scoring, latency and tokens per answer.
3. Writes the table (markdown and JSON) and a PNG of the loss curves and accuracies into ``out``.
4. Modal-mixed CoT on the intermediate-state questions (swap, move, double swap): trains a brief run (the IVT-LR
   runs' model, data size and epochs) and evaluates it beside the shipped Modal-mixed checkpoints
   (``checkpoints/synthetic-modal-mixed/final`` and its no-CoT baseline): accuracy per kind, the held-out
   sketches' reconstruction error and the dummy-latent ablation (generated latents replaced by zeros, or noise of
   their norm); the table goes to ``out/demo-modal-mixed.md`` and ``.json``.
5. DPMM-CoT: evaluates the shipped answer runs of DPMM-CoT and its two controls (MM-CoT-style fixed features,
   text-only T5; ``checkpoints/synthetic-dpmm-cot*/answer/final``) on the rationales their rationale runs
   generated, with ScienceQA's official breakdown; the table goes to ``out/demo-dpmm.md`` and ``.json``.
6. Runs the CPU-size benchmark rows where the implementation matters (``--sizes demo``) and prints their table,
   each baseline read in one line, and a plot labelled with the ratios.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Iterator, List, Optional, Sequence

import torch

from mmlatent.train.ivtlr import (RunConfig, build_data, evaluate, evaluate_result, load_run, markdown_table,
                                  table_row, train)

SHIPPED = ["synthetic-no-cot", "synthetic-cot", "synthetic-ivtlr", "synthetic-ivtlr-no-image"]
BRIEF = dict(model={"tiny_qwen2_vl": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128}},
             data={"synthetic": {"n_train": 1600, "n_eval": 200, "seed": 0}}, epochs=4, max_latent_steps=3,
             batch_size=32, k=2, max_new_tokens=48,
             train={"lr": 0.003, "weight_decay": 0.01, "warmup_steps": 10, "clip": 1.0, "seed": 0})
EVAL_N = 400
# the shipped Modal-mixed run and its no-CoT baseline (the text-CoT one writes ~80 tokens per answer: left to
# `mmlatent eval --checkpoint checkpoints/synthetic-modal-mixed-cot/final`), on MODAL_MIXED_EVAL_N questions
SHIPPED_MODAL_MIXED = ["synthetic-modal-mixed-no-cot", "synthetic-modal-mixed"]
MODAL_MIXED_EVAL_N = 200
SHIPPED_DPMM = ["synthetic-dpmm-cot-text-only", "synthetic-dpmm-cot-fixed-features", "synthetic-dpmm-cot"]
DPMM_EVAL_N = 200
MODAL_MIXED_BRIEF_EVAL_N = 100  # the brief run's held-out questions (it is there to show the loop, not a result)
# the brief Modal-mixed run's own settings; its model, data size, epochs and optimiser come from BRIEF
MODAL_MIXED = dict(num_latents=9, pool_grid=[3, 3], diffusion_weight=1.0, batch_mul=4, cache_targets=True,
                   head={"width": 256, "depth": 3}, sampler={"steps": 20}, max_new_tokens=64)


def _brief_runs() -> List[RunConfig]:
    return [RunConfig(name="brief no-CoT", mode="no_cot", epochs_per_stage=1, **BRIEF),
            RunConfig(name="brief CoT (stage 0)", mode="cot", epochs_per_stage=1, **BRIEF),
            RunConfig(name="brief IVT-LR (stages 0-3)", mode="ivtlr", epochs_per_stage=1, **BRIEF)]


def plot(histories: dict, rows: Sequence[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, history in histories.items():
        losses = [r["loss"] for r in history["train"]]
        left.plot(range(1, len(losses) + 1), losses, label=name)
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss")
    left.set_yscale("log")
    left.legend()
    names = [f"{r['name']}\n({r['source']})" for r in rows]
    right.barh(names, [100 * r["accuracy"] for r in rows], xerr=[100 * r["accuracy_stderr"] for r in rows],
               color="tab:blue")
    right.axvline(25, color="k", ls="--", lw=0.8, label="chance (4 options)")
    right.set_xlabel("held-out accuracy, % (strict parse)")
    right.tick_params(axis="y", labelsize=7)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _modal_mixed_brief():
    from mmlatent.data import synthetic
    from mmlatent.train.modal_mixed import ModalMixedConfig
    data = BRIEF["data"]["synthetic"]
    return ModalMixedConfig(name="brief Modal-mixed", mode="modal_mixed", model=BRIEF["model"],
                            data={"synthetic": {"n_train": data["n_train"], "n_eval": data["n_eval"],
                                                "seed": data["seed"], "kinds": list(synthetic.INTERMEDIATE_KINDS)}},
                            epochs=BRIEF["epochs"], batch_size=BRIEF["batch_size"],
                            train=dict(BRIEF["train"], progress=True), **MODAL_MIXED)


@contextlib.contextmanager
def _kernels_of_a_cpu_run() -> Iterator[None]:
    """Without a GPU, the kernels a user's CPU run picks: ``TRITON_INTERPRET=1`` (which the test suite sets, and
    which mmlatent's dispatch reads at every call) would run the diffusion head's Triton kernels in the
    interpreter, minutes per training step; it is lifted for the duration and restored."""
    value = os.environ.get("TRITON_INTERPRET")
    lift = value is not None and not torch.cuda.is_available()
    if lift:
        del os.environ["TRITON_INTERPRET"]
    try:
        yield
    finally:
        if lift:
            os.environ["TRITON_INTERPRET"] = value


def modal_mixed_part(out: str, checkpoints: str) -> List[dict]:
    """Step 4: the brief Modal-mixed run and the shipped Modal-mixed checkpoints, evaluated on held-out
    intermediate-state questions; prints each summary and writes the table."""
    with _kernels_of_a_cpu_run():
        return _modal_mixed_part(out, checkpoints)


def _modal_mixed_part(out: str, checkpoints: str) -> List[dict]:
    from mmlatent.train import modal_mixed as mm
    print("\nModal-mixed CoT: the model writes text, then K latent sketch embeddings drawn by a diffusion head from "
          "its hidden\nstate, then text. Questions whose answer holds only after an operation (swap, move, double "
          "swap); the ablation\nfeeds zeros or noise back instead of the generated sketches.\n", flush=True)
    rows = []
    config = _modal_mixed_brief()
    t0 = time.perf_counter()
    started = t0
    result = mm.train(config)
    seconds = time.perf_counter() - t0
    metrics = mm.evaluate(result["model"], result["tokenizer"], result["image_processor"], config,
                          result["eval_records"][:MODAL_MIXED_BRIEF_EVAL_N], progress=True)
    print("\n".join(mm.summary_lines(metrics, seconds)), flush=True)
    rows.append(mm.table_row(metrics, "trained now", seconds))
    for name in SHIPPED_MODAL_MIXED:
        directory = os.path.join(checkpoints, name, "final")
        if not os.path.exists(directory):
            print(f"  (no shipped checkpoint at {directory}: skipped)", flush=True)
            continue
        model, tokenizer, loaded, image_processor = mm.load_run(directory)
        _, _, records = mm.build_data(loaded)
        metrics = mm.evaluate(model, tokenizer, image_processor, loaded, records[:min(EVAL_N, MODAL_MIXED_EVAL_N)],
                              progress=True)
        print("\n".join(mm.summary_lines(metrics)), flush=True)
        trained = _trained_seconds(directory)
        rows.append(mm.table_row(metrics, "shipped checkpoint", trained))
    table = mm.markdown_table(rows)
    print(f"(Modal-mixed part: {time.perf_counter() - started:.0f} s)", flush=True)
    with open(os.path.join(out, "demo-modal-mixed.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "demo-modal-mixed.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n" + table)
    print(f"wrote {out}/demo-modal-mixed.md, demo-modal-mixed.json\n", flush=True)
    return rows


def dpmm_part(out: str, checkpoints: str) -> List[dict]:
    """Step 5: the shipped DPMM-CoT answer runs and their controls on held-out ScienceQA-shaped questions, each on
    its own rationale run's generated rationales; prints each summary and writes the table."""
    from dataclasses import replace

    from mmlatent.train import dpmm
    print("\nDPMM-CoT: a T5 whose image features come from a diffusion UNet that denoises the image's latents "
          "conditioned on\nthe question, fused by MM-CoT's gated attention; rationale first, then the answer. "
          "Beside it MM-CoT-style fixed\nfeatures and text-only T5. The context of a question is its image (IMG), a "
          "hint describing the grid (TXT) or\nneither (NO): text alone cannot answer the IMG ones.\n", flush=True)
    rows = []
    started = time.perf_counter()
    for name in SHIPPED_DPMM:
        directory = os.path.join(checkpoints, name, "answer", "final")
        if not os.path.exists(directory):
            print(f"  (no shipped checkpoint at {directory}: skipped)", flush=True)
            continue
        with _kernels_of_a_cpu_run():
            model, tokenizer, loaded, _ = dpmm.load_run(directory)
            # the rationales its rationale run wrote, found beside it wherever the demo runs from
            loaded = replace(loaded, rationales=os.path.join(checkpoints, name, "rationale", dpmm.RATIONALES_FILE))
            _, _, records = dpmm.build_data(loaded)
            metrics = dpmm.evaluate(model, tokenizer, None, loaded, records[:DPMM_EVAL_N], progress=True)
        print("\n".join(dpmm.summary_lines(metrics)), flush=True)
        trained = _trained_seconds(directory)
        rows.append(dpmm.table_row(metrics, "shipped checkpoint", trained))
    table = dpmm.markdown_table(rows)
    print(f"(DPMM-CoT part: {time.perf_counter() - started:.0f} s)", flush=True)
    with open(os.path.join(out, "demo-dpmm.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "demo-dpmm.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n" + table)
    print(f"wrote {out}/demo-dpmm.md, demo-dpmm.json\n", flush=True)
    return rows


def _trained_seconds(directory: str) -> Optional[float]:
    """A shipped run's training time, from its run.json."""
    with open(os.path.join(directory, "run.json")) as f:
        return json.load(f)["result"].get("train_seconds")


def shipped_checkpoints() -> str:
    """The checkpoints/ folder of this mmlatent checkout (beside the package), wherever the demo is run from."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")


def main(out: str = "demo-output", bench: bool = True, checkpoints: Optional[str] = None) -> int:
    checkpoints = checkpoints or shipped_checkpoints()
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print("mmlatent demo: a tiny Qwen2-VL learns the embedded visual reasoning task (3 x 3 grids of coloured "
          "squares,\nquestions of 2-3 reasoning steps, 4 options: chance is 25%). Training three variants briefly, "
          "then evaluating them\nand the shipped checkpoints on held-out questions.\n", flush=True)
    rows, histories = [], {}
    for config in _brief_runs():
        t0 = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - t0
        histories[config.name] = result["history"]
        losses = [r["loss"] for r in result["history"]["train"]]
        metrics = evaluate_result(result, config)
        print(f"  {config.name}: loss {losses[0]:.2f} -> {sum(losses[-10:]) / len(losses[-10:]):.2f}; held-out "
              f"accuracy {100 * metrics['accuracy']:.1f}% (one-object colour questions: "
              f"{100 * metrics['accuracy_by_kind'].get('colour', float('nan')):.0f}%)", flush=True)
        rows.append(table_row(metrics, "trained now", seconds))
    for name in SHIPPED:
        directory = os.path.join(checkpoints, name, "final")
        if not os.path.exists(directory):
            print(f"  (no shipped checkpoint at {directory}: skipped; --checkpoints DIR names another folder)",
                  flush=True)
            continue
        wrapper, tokenizer, config, image_processor = load_run(directory)
        _, _, records = build_data(config)
        metrics = evaluate(wrapper, tokenizer, image_processor, config, records[:EVAL_N], progress=True)
        trained = _trained_seconds(directory)
        rows.append(table_row(metrics, "shipped checkpoint", trained))
    table = markdown_table(rows)
    with open(os.path.join(out, "demo.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(histories, rows, os.path.join(out, "demo.png"))
    print("\n" + table)
    print(f"wrote {out}/demo.md, demo.json, demo.png\n", flush=True)
    modal_mixed_part(out, checkpoints)
    dpmm_part(out, checkpoints)
    if bench:
        from mmlatent import bench as bench_module
        print("Micro-benchmarks at CPU sizes, the rows where the implementation decides the outcome (at tiny sizes "
              "fixed\nper-call overhead makes every fused op look slower than its baseline). The full CPU set: "
              "`python -m mmlatent.bench`,\ncommitted in benches/results/cpu-2core/kernels.md.", flush=True)
        return bench_module.main(["--sizes", "demo", "--repeats", "3", "--out", os.path.join(out, "bench")])
    return 0


__all__ = ["main"]
