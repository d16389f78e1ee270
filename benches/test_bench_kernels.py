"""pytest-benchmark view of the same cases as `python -m mmlatent.bench` (ops and their baselines side by side).

    make bench            # or: pytest benches --benchmark-columns=median,iqr,rounds
    MMLATENT_BENCH_SIZES=default pytest benches   # the larger CPU shapes
"""
import os

import pytest
import torch

from mmlatent.bench import cases_for, implementation

SIZES = os.environ.get("MMLATENT_BENCH_SIZES", "gpu" if torch.cuda.is_available() else "tiny")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = cases_for(SIZES)
PARAMS = [(i, name) for i, case in enumerate(CASES) for name in case.implementations()]


@pytest.mark.parametrize("index, impl", PARAMS,
                         ids=[f"{CASES[i].op}[{CASES[i].shape}]-{name}" for i, name in PARAMS])
def test_kernel(benchmark, index, impl):
    case = CASES[index]
    benchmark.group = f"{case.op} {case.shape}"
    args = case.make(DEVICE, DTYPE)
    fn = implementation(case, impl)

    def call():
        fn(args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(call)
