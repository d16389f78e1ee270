"""One rank of a tiny data-parallel run, for the distributed tests (or the whole run, in one process):

    python distributed_run.py OUT_FILE [--parallel ddp|fsdp] [--batch-size B] [--grad-accum A] [--steps S]
        [--until U] [--save DIR] [--resume DIR] [--die-at-step N] [--unweighted] [--lora]

A tiny Qwen2 causal LM in float64 (so that the only differences between a one-process and a data-parallel run are
the order of float64 sums) trains on records of different lengths, so that the ranks' shards hold different
numbers of label tokens and only the Trainer's weighting makes their average the global batch's mean. The rank
or process started without ``RANK`` in its environment is a one-process run. Rank 0 writes the trained
parameters (gathered, under FSDP2) to ``OUT_FILE`` as safetensors, with the step losses in its metadata.
``--die-at-step N``: rank 1 SIGKILLs itself after optimizer step N, for the test that the others stop with a
DistributedError instead of hanging. ``--unweighted``: every rank's loss counts the same (the naive data-parallel
mean, which the equality tests show is not the global batch's).
"""
import argparse
import json
import os
import signal

import torch

from mmlatent.train import EpochBatches, TrainConfig, Trainer
from mmlatent.train.loop import label_tokens


def make_records(n=48, vocab=61, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(torch.randint(4, 17, (1,), generator=g)),), generator=g)
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
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).double()
    if args.lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    return model


def main():
    parser = argparse.ArgumentParser()
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build(args)
    batches = EpochBatches(make_records(), args.batch_size, collate, seed=0)
    config = TrainConfig(max_steps=args.steps, lr=1e-2, warmup_steps=1, grad_accum=args.grad_accum, clip=1.0,
                         seed=0, bf16=False, progress=False, parallel=args.parallel, dist_timeout_s=args.timeout)
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
                                               "world_size": str(trainer.world.size)})


if __name__ == "__main__":
    main()
