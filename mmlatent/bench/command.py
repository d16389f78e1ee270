"""The command line of ``python -m mmlatent.bench`` and ``mmlatent bench``: options, defaults, result files."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional, Sequence

import torch

from .cases import SIZES
from .harness import memory_probe, run
from .report import markdown, plot

DTYPES = ("float32", "bfloat16", "float16")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options, shared by ``python -m mmlatent.bench`` and ``mmlatent bench``."""
    parser.add_argument("--sizes", choices=SIZES, default=None,
                        help="shape set: default (CPU), gpu (real sizes), tiny (smoke test), demo (the CPU rows "
                             "make demo shows)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed runs per row (median reported)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="input dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--out", default=None, help="output folder (default benches/results/<device>/)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--ops", help="only rows whose op starts with this (results go to kernels-<ops>.*)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # INDEX:IMPL, see peak_memory_cpu_subprocess
    return parser


def _result_stem(sizes: str, ops: Optional[str]) -> str:
    stem = "kernels" if sizes in ("default", "gpu") else f"kernels-{sizes}"
    if ops:
        stem += "-" + re.sub(r"[^a-z0-9]+", "-", ops.lower()).strip("-")
    return stem


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark and writes <stem>.json, .md and .png into ``--out``; returns the exit status."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m mmlatent.bench", description="mmlatent micro-benchmarks (ratios against same-run baselines)"))
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    sizes = args.sizes or ("gpu" if gpu else "default")
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.memory_probe:  # child process of peak_memory_cpu_subprocess
        index, impl = args.memory_probe.split(":", 1)
        print(memory_probe(sizes, int(index), impl, dtype))
        return 0
    repeats = args.repeats or (20 if gpu else 5)
    print(f"mmlatent.bench: sizes={sizes} dtype={dtype} repeats={repeats}", flush=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m mmlatent.bench", *argv])
    result = run(sizes, repeats, dtype, memory=not args.no_memory, command=command, ops=args.ops)
    out = args.out or os.path.join("benches", "results", result["device"])
    os.makedirs(out, exist_ok=True)
    stem = _result_stem(sizes, args.ops)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(table)
    plot(result, os.path.join(out, f"{stem}.png"))
    print()
    print(table)  # the table ends with one line of reading per baseline
    print(f"wrote {out}/{stem}.json, .md, .png")
    return 0
