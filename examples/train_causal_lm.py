"""Train a plain Hugging Face causal LM with mmlatent's Trainer and the fused loss, on a CPU in about a minute.

    python examples/train_causal_lm.py --steps 60

The model is a small Qwen2 built from its config (nothing downloaded); the text is the embedded synthetic task's
questions, rationales and answers, tokenized word by word. ``apply_fused_loss`` patches this one model so that
``model(**batch).loss`` never builds the [B, L, V] logits; the Trainer runs the optimizer, the schedule, the
progress bar (loss, tokens/s, peak memory) and crash-safe checkpoints (``--output-dir``, ``--resume``).
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mmlatent.data import synthetic
from mmlatent.data.records import Record, answer_text, prompt_text
from mmlatent.data.tokenizer import WordTokenizer
from mmlatent.models import apply_fused_loss
from mmlatent.train import EpochBatches, TrainConfig, Trainer


def make_collate(tokenizer: WordTokenizer, max_length: int = 96):
    """collate(records, epoch) -> input_ids, attention_mask, labels [B, L] int64: each record's prompt, rationale
    and answer, right-padded; the loss covers every real token (labels -100 at padding)."""
    def collate(records: List[Record], epoch: int) -> Dict[str, torch.Tensor]:
        rows = [tokenizer.encode(f"{prompt_text(r)} {r.rationale} {answer_text(r)}")[:max_length] for r in records]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row)
            attention_mask[i, :len(row)] = 1
        return dict(input_ids=input_ids, attention_mask=attention_mask,
                    labels=input_ids.masked_fill(attention_mask == 0, -100))
    return collate


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default=None, help="write checkpoint-N folders (and final) here")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", default=None, help="a checkpoint-N folder to continue")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    records = synthetic.generate(800, seed=0)
    tokenizer = WordTokenizer(synthetic.vocabulary())
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tokenizer.pad_id, use_cache=False))
    apply_fused_loss(model)

    batches = EpochBatches(records, args.batch_size, make_collate(tokenizer), seed=0)
    config = TrainConfig(max_steps=args.steps, lr=3e-3, warmup_steps=5, clip=1.0, output_dir=args.output_dir,
                         save_every=args.save_every, progress=not args.no_progress)
    trainer = Trainer(model, lambda m, batch: m(**batch).loss, batches, config, describe="causal LM")
    if args.resume:
        trainer.resume(args.resume)
    history = trainer.fit()
    steps = history["train"]
    summary = dict(steps=trainer.step, first_loss=steps[0]["loss"] if steps else None,
                   last_loss=steps[-1]["loss"] if steps else None,
                   median_tokens_per_s=float(torch.tensor([r["tokens_per_s"] for r in steps]).median())
                   if steps else None)
    print(json.dumps(summary))
    return dict(summary, history=history, trainer=trainer)


if __name__ == "__main__":
    main()
