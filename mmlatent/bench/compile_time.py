"""What torch.compile costs and gives on IVT-LR's training step (forward + backward), written to
``compile-ivtlr.json`` / ``.md`` in benches/results/<device>/.

    python -m mmlatent.bench.compile_time [--out DIR]

Rows: the eager step; ``torch.compile(IVTLR)`` on its first batch (compilation included), on a second batch of the
same layout (the compiled graphs reused) and on a batch of a new layout (where each sample's images and latent
tokens sit: the rollout's Python control flow is planned from it, so dynamo guards on it and compiles again);
then regional compilation (``layer.compile(dynamic=True)`` on each decoder layer, the rollout left eager) on the
same three batches. The losses of every row are compared with eager's.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict, List, Optional

import torch

from .report import device_label


def _batches(model) -> Dict[str, dict]:
    from mmlatent.models.tiny import synthetic_batch
    first = dict(images=[[(16, 16)], [(16, 24)]], prompt_lengths=[3, 6], answer_lengths=[4, 2], num_latents=[2, 3])
    return {"first batch": synthetic_batch(model, **first),
            "same layout": synthetic_batch(model, **first, seed=5),
            "new layout": synthetic_batch(model, images=[[(16, 32)], [(16, 16)]], prompt_lengths=[4, 6],
                                          answer_lengths=[4, 3], num_latents=[3, 1], seed=7)}


def _step(run: Callable, batch: dict) -> tuple:
    t0 = time.perf_counter()
    out = run(**batch)
    out.loss.backward()
    return time.perf_counter() - t0, float(out.loss.detach())


def measure() -> List[dict]:
    """The rows (seconds and loss of each call), on a fresh tiny Qwen2-VL per variant."""
    from mmlatent.models import IVTLR, VLMBackbone
    from mmlatent.models.tiny import LATENT_ID, tiny_qwen2_vl
    rows = []
    eager = IVTLR(tiny_qwen2_vl(), LATENT_ID, k=2)
    batches = _batches(eager.vlm)
    _step(eager, batches["first batch"])  # warm-up: lazy initialisation is not the eager step's
    reference = {}
    for name, batch in batches.items():
        seconds, loss = _step(eager, batch)
        reference[name] = loss
        rows.append(dict(variant="eager", call=name, seconds=seconds, loss=loss))
    for variant in ("torch.compile(IVTLR)", "regional: layer.compile(dynamic=True)"):
        torch._dynamo.reset()
        model = tiny_qwen2_vl()
        wrapper = IVTLR(model, LATENT_ID, k=2)
        if variant.startswith("regional"):
            for layer in VLMBackbone(model).language_model.layers:
                layer.compile(dynamic=True)
            run = wrapper
        else:
            run = torch.compile(wrapper)
        for name, batch in _batches(model).items():
            seconds, loss = _step(run, batch)
            rows.append(dict(variant=variant, call=name, seconds=seconds, loss=loss,
                             loss_minus_eager=loss - reference[name]))
    return rows


def markdown(result: dict) -> str:
    lines = [f"Device `{result['device']}`, torch {result['torch']}, tiny Qwen2-VL (hidden 64, 2 layers), IVT-LR "
             f"k 2, 2-3 latent steps, one training step per call; command: `{result['command']}`", "",
             "| variant | call | seconds | loss - eager loss |", "|---|---|---:|---:|"]
    for r in result["rows"]:
        delta = "" if "loss_minus_eager" not in r else f"{r['loss_minus_eager']:.2e}"
        lines.append(f"| {r['variant']} | {r['call']} | {r['seconds']:.2f} | {delta} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmlatent.bench.compile_time", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default benches/results/<device>/)")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    result = dict(device=device_label(device), torch=torch.__version__,
                  command="python -m mmlatent.bench.compile_time", rows=measure())
    out = args.out or os.path.join("benches", "results", result["device"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compile-ivtlr.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(out, "compile-ivtlr.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
