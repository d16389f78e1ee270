"""The `mmlatent` command.

    mmlatent demo                    what `make demo` runs (see mmlatent/demo.py)
    mmlatent train --config FILE     one training run from a YAML config (configs/*.yaml); the config's ``method``
                                     key picks the method: absent or ``ivtlr`` (IVT-LR), ``modal_mixed``
    mmlatent eval --checkpoint DIR   evaluate a saved run on its held-out records (either method)
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,train,eval,recover,bench}")
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
        from mmlatent.train.ivtlr import evaluate as run_eval, train as run_train
        from mmlatent.train.modal_mixed import ModalMixedConfig, load_config
        config = load_config(args.config)
        if isinstance(config, ModalMixedConfig):
            return _train_modal_mixed(args, config)
        out_dir = config.train.get("output_dir")
        if out_dir:
            _check_writable_folder(out_dir, "train.output_dir")
        if args.report:
            _check_writable_file(args.report, "--report")
        if args.resume:
            from mmlatent.train.checkpoint import resolve_checkpoint
            resolve_checkpoint(args.resume)  # a missing or corrupt checkpoint is refused before building anything
        result = run_train(config, device=args.device, resume=args.resume,
                           allow_config_change=args.allow_config_change)
        metrics = run_eval(result["wrapper"], result["tokenizer"], result["image_processor"], config,
                           result["eval_records"], progress=True)
        _report(metrics, result.get("train_seconds"))
        if out_dir:  # next to the verified files, outside the manifest (it is written after the checkpoint)
            _write_json(os.path.join(result["checkpoint"], "eval.json"), metrics)
        if args.report:
            keep = ("name", "mode", "stage", "device", "train_seconds", "peak_memory_bytes", "median_step_seconds")
            summary = {k: result.get(k) for k in keep}
            summary.update(command=f"mmlatent train --config {args.config}", steps=len(result["history"]["train"]),
                           batch_size=config.batch_size, accuracy=metrics["accuracy"], n_eval=metrics["n"])
            os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
            _write_json(args.report, summary)
        return 0
    if args.command == "eval":
        from mmlatent.train.checkpoint import resolve_checkpoint
        from mmlatent.train.ivtlr import build_data, evaluate as run_eval, load_run
        from mmlatent.train.modal_mixed import METHOD, run_method
        if args.out:
            _check_writable_file(args.out, "--out")
        if run_method(resolve_checkpoint(args.checkpoint), verified=True) == METHOD:
            return _eval_modal_mixed(args)
        wrapper, tokenizer, config, image_processor = load_run(args.checkpoint, device=args.device)
        _, _, records = build_data(config)
        records = records[:args.n] if args.n else records
        metrics = run_eval(wrapper, tokenizer, image_processor, config, records, progress=True)
        _report(metrics)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            _write_json(args.out, metrics)
            print(f"wrote {args.out}", flush=True)
        return 0
    raise ValueError(f"command: unknown {args.command!r}")


def _train_modal_mixed(args, config) -> int:
    """``mmlatent train`` of a ``method: modal_mixed`` config: train, evaluate (with the reconstruction error and
    the dummy-latent ablation), print the summary, write eval.json beside the run and the --report."""
    from mmlatent.train import modal_mixed as mm
    out_dir = config.train.get("output_dir")
    if out_dir:
        _check_writable_folder(out_dir, "train.output_dir")
    if args.report:
        _check_writable_file(args.report, "--report")
    if args.resume:
        from mmlatent.train.checkpoint import resolve_checkpoint
        resolve_checkpoint(args.resume)
    result = mm.train(config, device=args.device, resume=args.resume, allow_config_change=args.allow_config_change)
    metrics = mm.evaluate(result["model"], result["tokenizer"], result["image_processor"], config,
                          result["eval_records"], progress=True)
    print("\n".join(mm.summary_lines(metrics, result.get("train_seconds"))), flush=True)
    if out_dir:  # next to the verified files, outside the manifest (it is written after the checkpoint)
        _write_json(os.path.join(result["checkpoint"], "eval.json"), metrics)
    if args.report:
        keep = ("name", "method", "mode", "device", "train_seconds", "peak_memory_bytes", "median_step_seconds")
        summary = {k: result.get(k) for k in keep}
        summary.update(command=f"mmlatent train --config {args.config}", steps=len(result["history"]["train"]),
                       batch_size=config.batch_size, accuracy=metrics["accuracy"], n_eval=metrics["n"],
                       ablation={k: v["accuracy"] for k, v in (metrics["ablation"] or {}).items()},
                       latent_mse=metrics["latent_mse"], latent_cosine=metrics["latent_cosine"])
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        _write_json(args.report, summary)
    return 0


def _eval_modal_mixed(args) -> int:
    from mmlatent.train import modal_mixed as mm
    model, tokenizer, config, image_processor = mm.load_run(args.checkpoint, device=args.device)
    _, _, records = mm.build_data(config)
    records = records[:args.n] if args.n else records
    metrics = mm.evaluate(model, tokenizer, image_processor, config, records, progress=True)
    print("\n".join(mm.summary_lines(metrics)), flush=True)
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


def _report(metrics: dict, train_seconds=None) -> None:
    line = (f"{metrics['name']}: accuracy {100 * metrics['accuracy']:.1f}% +- {100 * metrics['accuracy_stderr']:.1f} "
            f"(n={metrics['n']}; lenient, public code's scoring: {100 * metrics['lenient_accuracy_public_code']:.1f}%)"
            f", {1000 * metrics['latency_per_sample_s']:.1f} ms and {metrics['tokens_per_answer']:.1f} tokens per "
            f"answer")
    if train_seconds is not None:
        line += f"; trained in {train_seconds:.0f} s"
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
