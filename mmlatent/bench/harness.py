"""Measurement: median times, peak memory, and each baseline's ratios against mmlatent measured in the same run.

Peak memory: on CUDA, the allocator's peak above the inputs; on CPU, the process's peak resident memory above its
level before the call, measured in a fresh subprocess per row (``python -m mmlatent.bench --memory-probe``, with
glibc's mmap threshold fixed so freed blocks return to the system and one row's garbage is not the next one's
headroom).
"""
from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import List, Optional

import torch

from .case import FLOOR_PREFIX, MMLATENT, Call, Case, Inputs, implementation
from .cases import cases_for
from .ceilings import hardware_rates
from .report import device_label


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Call, args: Inputs, device: torch.device, repeats: int) -> List[float]:
    """Seconds of each of ``repeats`` calls ``fn(args)`` after one untimed warm-up (compilation, caches)."""
    fn(args)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_memory_here(fn: Call, args: Inputs, device: torch.device) -> int:
    """Bytes of peak memory the call ``fn(args)`` adds above what is allocated before it, in this process."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(args)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn(args)
    return max(0, _status_kib("VmHWM") - base) * 1024


def peak_memory_cpu_subprocess(sizes: str, index: int, impl: str, dtype: str) -> Optional[int]:
    """Peak CPU memory in bytes of implementation ``impl`` of case ``index`` of ``cases_for(sizes)``, measured by
    ``memory_probe`` in a fresh interpreter (None, with its stderr printed, if that fails)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "mmlatent.bench", "--sizes", sizes, "--memory-probe", f"{index}:{impl}",
           "--dtype", dtype]
    probe = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        print(probe.stderr[-2000:], file=sys.stderr)
        return None
    return int(probe.stdout.strip().splitlines()[-1])


def memory_probe(sizes: str, index: int, impl: str, dtype: str) -> int:
    """The child side of ``peak_memory_cpu_subprocess``: peak bytes of one call on the CPU after a warm-up, so
    that lazy initialisation (imports, thread pools) is not counted as the op's."""
    case = cases_for(sizes)[index]
    device, float_dtype = torch.device("cpu"), getattr(torch, dtype)
    fn = implementation(case, impl)
    fn(case.make(device, float_dtype))
    return peak_memory_here(fn, case.make(device, float_dtype), device)


def measure(case: Case, index: int, name: str, sizes: str, device: torch.device, dtype_name: str, repeats: int,
            memory: bool) -> dict:
    """One row: times (median, min, max), peak bytes and, for mmlatent on a GPU, its rates against the ceilings.

    ``index`` is the case's position in ``cases_for(sizes)``, which the CPU memory subprocess rebuilds."""
    repeats = case.repeats or repeats
    dtype = getattr(torch, dtype_name)
    fn = implementation(case, name)
    args = case.make(device, dtype)
    times = time_call(fn, args, device, repeats)
    del args
    if not memory:
        peak = None
    elif device.type == "cuda":
        peak = peak_memory_here(fn, case.make(device, dtype), device)
    else:
        peak = peak_memory_cpu_subprocess(sizes, index, name, dtype_name)
    median = statistics.median(times)
    row = dict(median_s=median, min_s=min(times), max_s=max(times), repeats=repeats, peak_bytes=peak)
    if name == MMLATENT and device.type == "cuda":
        row.update(hardware_rates(case.flops, case.bytes_moved, median, device_label(device)))
    return row


def compare_with_ours(ours: dict, baselines: List[dict]) -> None:
    """Adds to each baseline row mmlatent's speed-up and memory ratio against it (and, for a floor, how far above
    it mmlatent runs), when both sides were measured."""
    for row in baselines:
        if row["median_s"] is not None and ours["median_s"] is not None:
            row["speedup_of_mmlatent"] = row["median_s"] / ours["median_s"]
        if row["peak_bytes"] and ours["peak_bytes"] is not None:
            row["memory_ratio_of_mmlatent"] = ours["peak_bytes"] / row["peak_bytes"]
        if row["impl"].startswith(FLOOR_PREFIX) and "speedup_of_mmlatent" in row:
            row["mmlatent_over_floor"] = 1.0 / row["speedup_of_mmlatent"]


def run(sizes: str, repeats: int, dtype_name: str, memory: bool = True, command: str = "",
        ops: Optional[str] = None) -> dict:
    """Measures every case of ``cases_for(sizes)`` whose op starts with ``ops`` (all if None), printing each row.

    Args:
        sizes: a shape set, one of ``mmlatent.bench.SIZES``.
        repeats: timed runs per row (cases with their own ``repeats`` keep it).
        dtype_name: the activations' dtype, one of ``mmlatent.bench.DTYPES``.
        memory: measure peak memory (on CPU, one subprocess per row).
        command: the command line, recorded in the result.
        ops: an op-name prefix; ValueError if no case matches it.

    Returns:
        A JSON-ready dict: the environment (device, torch, python, machine, cpus), the settings, and ``rows``.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    cases = cases_for(sizes)
    if ops and not any(case.op.startswith(ops) for case in cases):
        raise ValueError(f"--ops: no benchmark row's op starts with {ops!r}; the ops are "
                         f"{', '.join(sorted({case.op for case in cases}))}")
    for index, case in enumerate(cases):
        if ops and not case.op.startswith(ops):
            continue
        case_rows = []
        for name in case.implementations():
            row = dict(op=case.op, shape=case.shape, impl=name, device=device_label(device), dtype=dtype_name)
            try:
                row.update(measure(case, index, name, sizes, device, dtype_name, repeats, memory))
            except torch.OutOfMemoryError:  # the naive baselines of the largest shapes do not fit: say so
                row.update(median_s=None, peak_bytes=None, error="out of memory")
            if row["median_s"] is None and device.type == "cuda":  # after the except block freed its traceback
                gc.collect()
                torch.cuda.empty_cache()
            case_rows.append(row)
            timing = "out of memory" if row["median_s"] is None else f"{row['median_s'] * 1e3:10.3f} ms"
            peak = row["peak_bytes"]
            print(f"  {case.op:22s} {case.shape:38s} {name:24s} {timing} "
                  f"{'' if peak is None else f'{peak / 2**20:10.1f} MiB'}", flush=True)
        compare_with_ours(case_rows[0], case_rows[1:])
        rows += case_rows
    return dict(device=device_label(device), torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), cpus=os.cpu_count(), sizes=sizes, dtype=dtype_name, repeats=repeats,
                command=command, rows=rows)
