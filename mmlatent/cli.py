"""The `mmlatent` command.

    mmlatent demo     what `make demo` runs: the kernel micro-benchmarks on the embedded default sizes
    mmlatent bench    the micro-benchmarks, with the options of `python -m mmlatent.bench`
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmlatent", description="multimodal latent chain-of-thought toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the kernel micro-benchmarks on the embedded default sizes and print the table")
    bench = sub.add_parser("bench", help="kernel micro-benchmarks (see python -m mmlatent.bench --help)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    from mmlatent import bench as bench_module
    if args.command == "demo":
        print("mmlatent demo: fused IVT-LR selection kernels against the baselines IVT-LR's public code uses.\n"
              "Until the models land (issues #4-#6), the demo is the micro-benchmark table at the default sizes.",
              flush=True)
        return bench_module.main([])
    return bench_module.main(args.bench_args)


if __name__ == "__main__":
    sys.exit(main())
