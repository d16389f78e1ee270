"""The `mmlatent` command.

    mmlatent demo                  what `make demo` runs (see mmlatent/demo.py)
    mmlatent train --config FILE   one training run from a YAML config (configs/*.yaml)
    mmlatent eval --checkpoint DIR evaluate a saved run on its held-out records, write JSON
    mmlatent bench                 the micro-benchmarks, with the options of `python -m mmlatent.bench`
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmlatent", description="multimodal latent chain-of-thought toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the tiny variants briefly, evaluate them and the shipped checkpoints, "
                                       "then print the micro-benchmark table")
    demo.add_argument("--out", default="demo-output", help="folder for the runs, the table and the PNG")
    demo.add_argument("--skip-bench", action="store_true", help="do not run the micro-benchmarks at the end")
    train = sub.add_parser("train", help="train one run from a YAML config")
    train.add_argument("--config", required=True, help="YAML file (see configs/)")
    train.add_argument("--resume", help="checkpoint folder to resume from")
    train.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    train.add_argument("--report", help="also write a JSON summary here (device, peak memory, step time, accuracy)")
    evaluate = sub.add_parser("eval", help="evaluate a saved run (folder with model.safetensors, run.json)")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--n", type=int, help="evaluate the first N held-out records")
    evaluate.add_argument("--out", help="JSON file for the results (default: <checkpoint>/eval.json)")
    evaluate.add_argument("--device")
    bench = sub.add_parser("bench", help="kernel and model micro-benchmarks (see python -m mmlatent.bench --help)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.command == "bench":
        from mmlatent import bench as bench_module
        return bench_module.main(args.bench_args)
    if args.command == "demo":
        from mmlatent import demo as demo_module
        return demo_module.main(out=args.out, bench=not args.skip_bench)
    if args.command == "train":
        from mmlatent.train.ivtlr import RunConfig, evaluate as run_eval, train as run_train
        config = RunConfig.load(args.config)
        result = run_train(config, device=args.device, resume=args.resume)
        metrics = run_eval(result["wrapper"], result["tokenizer"], result["image_processor"], config,
                           result["eval_records"], progress=True)
        _report(metrics, result.get("train_seconds"))
        out_dir = config.train.get("output_dir")
        if out_dir:
            _write_json(f"{out_dir}/final/eval.json", metrics)
        if args.report:
            import os
            os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
            keep = ("name", "mode", "stage", "device", "train_seconds", "peak_memory_bytes", "median_step_seconds")
            summary = {k: result.get(k) for k in keep}
            summary.update(command=f"mmlatent train --config {args.config}", steps=len(result["history"]["train"]),
                           batch_size=config.batch_size, accuracy=metrics["accuracy"], n_eval=metrics["n"])
            _write_json(args.report, summary)
        return 0
    if args.command == "eval":
        from mmlatent.train.ivtlr import build_data, evaluate as run_eval, load_run
        wrapper, tokenizer, config, image_processor = load_run(args.checkpoint, device=args.device)
        _, _, records = build_data(config)
        records = records[:args.n] if args.n else records
        metrics = run_eval(wrapper, tokenizer, image_processor, config, records, progress=True)
        _report(metrics)
        _write_json(args.out or f"{args.checkpoint}/eval.json", metrics)
        return 0
    return 2


def _report(metrics: dict, train_seconds=None) -> None:
    line = (f"{metrics['name']}: accuracy {100 * metrics['accuracy']:.1f}% +- {100 * metrics['accuracy_stderr']:.1f} "
            f"(n={metrics['n']}; lenient, public code's scoring: {100 * metrics['lenient_accuracy_public_code']:.1f}%)"
            f", {1000 * metrics['latency_per_sample_s']:.1f} ms and {metrics['tokens_per_answer']:.1f} tokens per "
            f"answer")
    if train_seconds is not None:
        line += f"; trained in {train_seconds:.0f} s"
    print(line, flush=True)


def _write_json(path: str, payload: dict) -> None:
    import os
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
