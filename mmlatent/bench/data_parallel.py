"""Data-parallel training of a small causal LM on the Trainer: one rank's run (``run``), and the scaling benchmark
that times it at 1 and N processes over the same global batch (``bench``).

    python -m mmlatent.bench.data_parallel run OUT_FILE [--parallel ddp|fsdp] [--batch-size B] [--grad-accum A]
        [--steps S] [--until U] [--save DIR] [--resume DIR] [--die-at-step N] [--unweighted] [--lora]
        [--checkpointing] [--dtype float64|float32] [--hidden H] [--layers L] [--vocab V] [--length T]
    python -m mmlatent.bench.data_parallel bench [--sizes default|gpu] [--nproc N] [--out PREFIX]

``run``: a Qwen2 causal LM (float64 by default, so that the only differences between a one-process and a
data-parallel run are the order of float64 sums) trains on records of different lengths, so that the ranks'
shards hold different numbers of label tokens and only the Trainer's weighting makes their average the global
batch's mean. A process started without ``RANK`` in its environment is a one-process run; under torchrun each
process is a rank. Rank 0 writes the trained parameters (gathered, under FSDP2) to ``OUT_FILE`` as safetensors, with
the step losses and seconds in its metadata. ``--die-at-step N``: rank 1 SIGKILLs itself after optimizer step N (the
test that the others stop with a DistributedError instead of hanging). ``--unweighted``: every rank's loss counts
the same (the naive data-parallel mean, which the tests show is not the global batch's).

``bench``: the time per global optimizer step of N processes x 1 thread (gloo on a CPU, NCCL on GPUs), with DDP
and with FSDP2, against 1 process x 1 thread over the same global batch and gradient accumulation, measured in the
same run; the median of the steps after the first two, written as ``PREFIX.md`` / ``PREFIX.json``.
"""
import argparse
import json
import os
import signal
from typing import List, Optional

import torch

from mmlatent.train import EpochBatches, TrainConfig, Trainer
from mmlatent.train.loop import label_tokens


def make_records(n=48, vocab=61, length=16, seed=3, uniform=False):
    """``n`` token sequences of lengths between a quarter of ``length`` and ``length`` (all ``length`` when
    ``uniform``: the benchmark, where shorter shards would also pad less)."""
    g = torch.Generator().manual_seed(seed)
    shortest = length if uniform else max(2, length // 4)
    return [torch.randint(1, vocab, (int(torch.randint(shortest, length + 1, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def collate(rows, epoch):
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)], attention_mask[i, :len(r)] = r, 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100  # a prompt without loss
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def next_token_loss(model, batch):
    """The mean next-token cross-entropy over the label tokens, in float64 (transformers' own loss casts the
    logits to float32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100)


def build(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                                         intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                                         num_attention_heads=4, num_key_value_heads=2))
    model = model.to(getattr(torch, args.dtype))
    if args.lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    return model


def run(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmlatent.bench.data_parallel run")
    parser.add_argument("out")
    parser.add_argument("--parallel", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--until", type=int, default=None)
    parser.add_argument("--save", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--die-at-step", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--unweighted", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=61)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--uniform-length", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every layer")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = build(args)
    if torch.cuda.is_available():
        from mmlatent.train.distributed import current_world, rank_device
        model.to(rank_device(current_world()))
    batches = EpochBatches(make_records(args.records, args.vocab, args.length, uniform=args.uniform_length),
                           args.batch_size, collate, seed=0)
    config = TrainConfig(max_steps=args.steps, lr=1e-2, warmup_steps=1, grad_accum=args.grad_accum, clip=1.0,
                         seed=0, bf16=False, progress=False, parallel=args.parallel, dist_timeout_s=args.timeout,
                         gradient_checkpointing=args.checkpointing)
    trainer = None

    def step_log():
        if args.die_at_step is not None and trainer.world.rank == 1 and trainer.step == args.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}

    trainer = Trainer(model, next_token_loss, batches, config, step_log=step_log,
                      count_items=(lambda b: 1) if args.unweighted else (lambda b: label_tokens(b["labels"])))
    if args.resume:
        trainer.resume(args.resume)
    history = trainer.fit(until=args.until)
    if args.save:
        trainer.save(args.save)
    exported = trainer.exported()
    if exported is not None:
        from safetensors.torch import save_file
        weights = {n: p.detach().contiguous().cpu() for n, p in exported.named_parameters()}
        save_file(weights, args.out, metadata={"losses": json.dumps([r["loss"] for r in history["train"]]),
                                               "seconds": json.dumps([r["seconds"] for r in history["train"]]),
                                               "world_size": str(trainer.world.size)})
    from mmlatent.train.distributed import close_distributed
    close_distributed(trainer.world, config.dist_timeout_s)


__all__ = ["run", "bench", "BENCH_SIZES"]

# the benchmark's shape sets: (hidden, layers, vocab, tokens per record, global batch, grad_accum, steps)
BENCH_SIZES = {"default": (256, 4, 8192, 256, 8, 2, 10), "gpu": (2048, 8, 32000, 2048, 16, 2, 10)}


def bench(argv: Optional[List[str]] = None) -> dict:
    import statistics
    import subprocess
    import sys
    import tempfile

    from safetensors import safe_open
    parser = argparse.ArgumentParser(prog="python -m mmlatent.bench.data_parallel bench")
    parser.add_argument("--sizes", default="default", choices=sorted(BENCH_SIZES))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default=None, help="write PREFIX.md and PREFIX.json")
    args = parser.parse_args(argv)
    hidden, layers, vocab, length, batch, accum, steps = BENCH_SIZES[args.sizes]
    gpu = args.sizes == "gpu"
    options = ["--dtype", "float32", "--hidden", str(hidden), "--layers", str(layers), "--vocab", str(vocab),
               "--length", str(length), "--records", str(batch * accum * steps), "--batch-size", str(batch),
               "--grad-accum", str(accum), "--steps", str(steps), "--uniform-length"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, nproc, parallel in (("1", 1, None), ("ddp", args.nproc, "ddp"), ("fsdp", args.nproc, "fsdp")):
            out = f"{tmp}/{label}.st"
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
                if nproc > 1 or gpu else [sys.executable]
            extra = ["--parallel", parallel] if parallel else []
            subprocess.run(launch + ["-m", "mmlatent.bench.data_parallel", "run", out, *options, *extra], env=env,
                           check=True)
            with safe_open(out, "pt") as f:
                seconds = json.loads(f.metadata()["seconds"])
            medians[label] = statistics.median(seconds[2:])
    ratios = {label: medians[label] / medians["1"] for label in ("ddp", "fsdp")}
    device = torch.cuda.get_device_name() if gpu else f"cpu-{os.cpu_count()}core"
    shape = (f"Qwen2 h{hidden} L{layers} V{vocab} float32, global batch {batch} x {length} tokens (no padding), "
             f"grad_accum {accum}")
    command = f"python -m mmlatent.bench.data_parallel bench --sizes {args.sizes} --nproc {args.nproc}"
    result = dict(device=device, shape=shape, command=command, steps=steps, timed_steps=steps - 2,
                  seconds_per_step=medians, time_ratio=ratios, processes=args.nproc, threads_per_process=1)
    table = "\n".join([f"Device `{device}`; {shape}; median of the last {steps - 2} of {steps} optimizer steps; "
                        f"command: `{command}`", "",
                        "| processes x threads | seconds per global step | time ratio |", "|---|---:|---:|",
                        f"| 1 x 1 | {medians['1']:.3f} | 1.00 |",
                        f"| {args.nproc} x 1 (DDP) | {medians['ddp']:.3f} | {ratios['ddp']:.2f} |",
                        f"| {args.nproc} x 1 (FSDP2) | {medians['fsdp']:.3f} | {ratios['fsdp']:.2f} |", ""])
    print(table)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(table)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    import sys
    commands = {"run": run, "bench": bench}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit("usage: python -m mmlatent.bench.data_parallel run|bench ...")
    commands[sys.argv[1]](sys.argv[2:])
