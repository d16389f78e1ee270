"""Compiles every shipped Triton kernel configuration for Hopper (sm_90a) with no GPU, and reports registers,
spills and shared memory from ptxas.

    python -m mmlatent.kernels.compile_check [--json FILE]

Exit status 1 when any configuration fails to compile, spills registers or exceeds the shared-memory limit.
Run it in a fresh process: TRITON_INTERPRET must be 0 when the kernel modules are imported.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Iterator, Optional, Sequence  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmlatent.kernels.attention import triton_kernels as attention_kernels  # noqa: E402
from mmlatent.kernels.compile_cases import CompileCase  # noqa: E402
from mmlatent.kernels.diffusion import triton_kernels as diffusion_kernels  # noqa: E402
from mmlatent.kernels.fusion import triton_kernels as fusion_kernels  # noqa: E402
from mmlatent.kernels.activations import triton_kernels as activation_kernels  # noqa: E402
from mmlatent.kernels.norms import triton_kernels as norm_kernels  # noqa: E402
from mmlatent.kernels.losses import triton_kernels as loss_kernels  # noqa: E402
from mmlatent.kernels.selection import triton_kernels as selection_kernels  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # bytes a Hopper thread block may use
FAMILIES = (attention_kernels, selection_kernels, loss_kernels, diffusion_kernels, fusion_kernels, activation_kernels,
            norm_kernels)


def all_cases() -> Iterator[CompileCase]:
    """Every family's COMPILE_CASES, declared beside its kernels."""
    for family in FAMILIES:
        yield from family.COMPILE_CASES


def compile_for_hopper(case: CompileCase) -> dict:
    signature, constexprs, attrs = case.specialised()
    src = ASTSource(fn=case.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=HOPPER, options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
        ptx_path = f.name
    try:
        log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx_path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(ptx_path)
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    spill_loads = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    return dict(registers=registers, spill_stores=spill_stores, spill_loads=spill_loads,
                shared_bytes=int(compiled.metadata.shared))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    report, failures = [], 0
    for case in all_cases():
        name = case.name
        t0 = time.perf_counter()
        try:
            row = dict(kernel=name, **compile_for_hopper(case))
            row["ok"] = row["spill_stores"] == 0 and row["spill_loads"] == 0 and row["shared_bytes"] <= SHARED_LIMIT
        except Exception as err:  # a compile error is a failed row, reported with the others
            row = dict(kernel=name, ok=False, error=f"{type(err).__name__}: {err}"[:500])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        failures += not row["ok"]
        report.append(row)
        detail = row.get("error") or (f"{row['registers']} regs, spills {row['spill_stores']}/{row['spill_loads']} B, "
                                      f"smem {row['shared_bytes']} B")
        print(f"{'ok ' if row['ok'] else 'BAD'} {name}: {detail} ({row['seconds']} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{len(report) - failures}/{len(report)} configurations compile for sm_90a without spills")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
