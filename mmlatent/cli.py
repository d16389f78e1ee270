"""The `mmlatent` command.

    mmlatent demo                    what `make demo` runs (see mmlatent/demo.py)
    mmlatent train --config FILE     one training run from a YAML config (configs/*.yaml); the config's ``method``
                                     key picks the method: absent or ``ivtlr`` (IVT-LR), ``modal_mixed``
    mmlatent eval --checkpoint DIR   evaluate a saved run on its held-out records (either method)
    mmlatent compare --checkpoint DIR DIR ... --out PREFIX
                                     evaluate runs of one method side by side: PREFIX.md, .json and .png
    mmlatent recover --checkpoint DIR  finish a checkpoint replacement that a crash interrupted
    mmlatent bench                   the micro-benchmarks (the options of `python -m mmlatent.bench`)

A user error (a missing or invalid config, a value out of range, a missing or corrupt checkpoint, an output path
that cannot be written) prints one line to stderr and exits with status 2, before any work starts where it can be
known then; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

EXIT_USER_ERROR = 2


def _device(text: str) -> str:
    import torch
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for, but this torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the verb's --help has the rest)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from mmlatent import __version__
    from mmlatent import bench as bench_module
    parser = _Parser(prog="mmlatent", description="multimodal latent chain-of-thought toolkit")
    parser.add_argument("--version", action="version", version=f"mmlatent {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # --debug is also taken after the verb; SUPPRESS keeps a verb's parser from resetting the global one
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,train,eval,compare,recover,bench}")
    demo = sub.add_parser("demo", parents=[debug], help="train the tiny variants briefly, evaluate them and the "
                                                        "shipped checkpoints, then print the micro-benchmark table")
    demo.add_argument("--out", default="demo-output", help="folder for the runs, the table and the PNG "
                                                           "(default: demo-output)")
    demo.add_argument("--skip-bench", action="store_true", help="do not run the micro-benchmarks at the end")
    demo.add_argument("--checkpoints", help="folder holding the shipped checkpoints (default: the checkpoints/ "
                                            "folder of this mmlatent checkout)")
    train = sub.add_parser("train", parents=[debug], help="train one run from a YAML config")
    train.add_argument("--config", required=True, help="YAML file (see configs/)")
    train.add_argument("--resume", help="checkpoint folder to resume from (train.output_dir/checkpoint-N)")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even though the config differs from the checkpoint's in keys that change the "
                            "result; the new values apply and each change is logged")
    train.add_argument("--device", type=_device, help="cpu or cuda (default: cuda when available)")
    train.add_argument("--report", help="also write a JSON summary here (device, peak memory, step time, accuracy)")
    evaluate = sub.add_parser("eval", parents=[debug],
                              help="evaluate a saved run (a folder written by mmlatent train)")
    evaluate.add_argument("--checkpoint", required=True, help="a finished run's final/ folder")
    evaluate.add_argument("--n", type=bench_module.positive_int,
                          help="evaluate the first N held-out records (default: all)")
    evaluate.add_argument("--out", help="JSON file for the full results (default: only the summary is printed)")
    evaluate.add_argument("--device", type=_device, help="cpu or cuda (default: cpu)")
    compare = sub.add_parser("compare", parents=[debug],
                             help="evaluate saved runs of one method side by side: a table, JSON and a plot")
    compare.add_argument("--checkpoint", required=True, nargs="+", action="extend", metavar="DIR",
                         help="finished runs' final/ folders (all IVT-LR or all Modal-mixed)")
    compare.add_argument("--n", type=bench_module.positive_int,
                         help="evaluate the first N held-out records of each (default: all)")
    compare.add_argument("--out", required=True, metavar="PREFIX",
                         help="writes PREFIX.md (the table), PREFIX.json (the rows) and PREFIX.png (accuracy per kind)")
    compare.add_argument("--device", type=_device, help="cpu or cuda (default: cpu)")
    recover = sub.add_parser("recover", parents=[debug],
                             help="finish replacing a checkpoint folder after a crash during its save")
    recover.add_argument("--checkpoint", required=True, help="the checkpoint folder (e.g. runs/x/final)")
    bench = sub.add_parser("bench", parents=[debug],
                           help="kernel and model micro-benchmarks (python -m mmlatent.bench)")
    bench_module.add_arguments(bench)
    return parser


def _check_writable_file(path: str, what: str) -> None:
    """Refuses an output file that cannot be written, before any work is done (nothing is created)."""
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if os.path.isdir(path):
        raise ValueError(f"{what}: {path} is a folder; give a file path")
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK) or (
            os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{what}: cannot write {path} (no write permission in {existing})")


def _check_writable_folder(path: str, what: str) -> None:
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{what}: {existing} is a file, so {path} cannot be a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write into {path} (no write permission in {existing})")


def _write_json(path: str, payload: dict) -> None:
    from mmlatent.train.checkpoint import write_json
    write_json(path, payload)


def _run(args, argv) -> int:
    if args.command == "bench":  # the global options come before the verb, so what follows it is the bench's
        from mmlatent import bench as bench_module
        if args.out:
            _check_writable_folder(args.out, "--out")
        return bench_module.main([a for a in argv[argv.index("bench") + 1:] if a != "--debug"])
    if args.command == "demo":
        from mmlatent import demo as demo_module
        _check_writable_folder(args.out, "--out")
        return demo_module.main(out=args.out, bench=not args.skip_bench, checkpoints=args.checkpoints)
    if args.command == "recover":
        from mmlatent.train.checkpoint import recover_checkpoint, verify_checkpoint
        path = recover_checkpoint(args.checkpoint)
        verify_checkpoint(path)
        print(f"{path}: complete and verified", flush=True)
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "compare":
        from mmlatent.train.compare import compare
        for suffix in (".md", ".json", ".png"):
            _check_writable_file(args.out + suffix, "--out")
        compare(args.checkpoint, args.out, n=args.n, device=args.device,
                command="mmlatent " + " ".join(a for a in argv if a != "--debug"))
        print(f"wrote {args.out}.md, {args.out}.json, {args.out}.png", flush=True)
        return 0
    raise ValueError(f"command: unknown {args.command!r}")


def _train(args) -> int:
    """``mmlatent train``: train, evaluate on the held-out records (for Modal-mixed with the reconstruction error
    and the dummy-latent ablation), print the summary, write eval.json beside the run and the --report."""
    from mmlatent.train.methods import load_config, method_module
    config = load_config(args.config)
    method = method_module(getattr(config, "method", "ivtlr"))
    out_dir = config.train.get("output_dir")
    if out_dir:
        _check_writable_folder(out_dir, "train.output_dir")
    if args.report:
        _check_writable_file(args.report, "--report")
    if args.resume:
        from mmlatent.train.checkpoint import resolve_checkpoint
        resolve_checkpoint(args.resume)  # a missing or corrupt checkpoint is refused before building anything
    from mmlatent.train.distributed import close_distributed, init_distributed, rank_device
    # under torchrun: join the process group before any model is built, on this rank's device
    timeout_s = float(config.train.get("dist_timeout_s", 600.0))
    world = init_distributed(timeout_s)
    try:
        _train_and_report(args, config, method, world, rank_device(world) if world.distributed else None)
    except BaseException:
        close_distributed(world, timeout_s, wait=False)
        raise
    close_distributed(world, timeout_s)  # every rank leaves together, once rank 0 has written its reports
    return 0


def _train_and_report(args, config, method, world, device_of_rank) -> None:
    out_dir = config.train.get("output_dir")
    device = args.device or device_of_rank
    if world.distributed and not out_dir:
        raise ValueError("train.output_dir: a data-parallel run needs it (rank 0 writes the final model there and "
                         "every rank evaluates it from there)")
    result = method.train(config, device=device, resume=args.resume, allow_config_change=args.allow_config_change)
    if world.distributed:  # every rank evaluates its share of the records with the exported folder's whole model
        from mmlatent.train.methods import reload_final
        result = reload_final(result, device)
    metrics = method.evaluate_result(result, config, progress=world.main, world=world)
    if not world.main:  # rank 0 prints and writes the reports
        return
    print("\n".join(method.summary_lines(metrics, result.get("train_seconds"))), flush=True)
    if out_dir:  # next to the verified files, outside the manifest (it is written after the checkpoint)
        _write_json(os.path.join(result["checkpoint"], "eval.json"), metrics)
    if args.report:
        keep = ("name", "method", "mode", "stage", "device", "train_seconds", "peak_memory_bytes",
                "median_step_seconds")
        summary = {k: result[k] for k in keep if k in result}
        summary.update(command=f"mmlatent train --config {args.config}", steps=len(result["history"]["train"]),
                       batch_size=getattr(config, "batch_size", None), accuracy=metrics["accuracy"], n_eval=metrics["n"])
        if metrics.get("ablation") is not None:
            summary.update(ablation={k: v["accuracy"] for k, v in metrics["ablation"].items()},
                           latent_mse=metrics["latent_mse"], latent_cosine=metrics["latent_cosine"])
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        _write_json(args.report, summary)


def _eval(args) -> int:
    """``mmlatent eval``: a saved run (either method, read from its verified run.json) on its held-out records."""
    from mmlatent.train.checkpoint import resolve_checkpoint
    from mmlatent.train.methods import method_module
    from mmlatent.train.modal_mixed import run_method
    if args.out:
        _check_writable_file(args.out, "--out")
    method = method_module(run_method(resolve_checkpoint(args.checkpoint), verified=True))
    model, tokenizer, config, image_processor = method.load_run(args.checkpoint, device=args.device)
    _, _, records = method.build_data(config)
    records = records[:args.n] if args.n else records
    metrics = method.evaluate(model, tokenizer, image_processor, config, records, progress=True)
    print("\n".join(method.summary_lines(metrics)), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        _write_json(args.out, metrics)
        print(f"wrote {args.out}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)  # checks the benchmark's options too
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        print("mmlatent: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, KeyError) as err:
        if args.debug:
            raise
        message = str(err) if not isinstance(err, KeyError) else f"missing key {err}"
        if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        print(f"mmlatent {args.command}: error: {message.splitlines()[0] if message else type(err).__name__} "
              f"(--debug shows the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
