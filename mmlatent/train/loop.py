"""One lean training loop for every method: bf16 autocast on GPU, gradient checkpointing, gradient accumulation,
torch's fused AdamW, gradient clipping, warmup + cosine schedule, a progress bar (loss, tokens/s, peak memory),
periodic evaluation, and atomic safetensors checkpoints that resume exactly (model, optimizer, scheduler, RNG
states, data position)."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .distributed import all_reduce_sum, full_tensor, gradient_sync
from .checkpoint import (TRAINER_FILES, CheckpointError, check_shapes, load_tensors, read_json,
                         resolve_checkpoint, write_trainer_checkpoint)

LOG = logging.getLogger("mmlatent")

# Config keys that cannot change the trained weights: a resume may differ in these without being refused.
# the subfolder of an FSDP2 checkpoint that torch.distributed.checkpoint writes, and trainer.json's layout for it
SHARDED = "sharded"
RESULT_NEUTRAL_KEYS = frozenset({"name", "eval_samples", "max_new_tokens", "train.progress", "train.output_dir",
                                 "train.save_every", "train.eval_every", "train.dist_timeout_s"})

@dataclass
class TrainConfig:
    """Optimisation settings (IVT-LR's public defaults: lr 4e-5, weight decay 0.01, clip 0.7).

    ``parallel``: how a run under torchrun shares the work, ``ddp`` (DistributedDataParallel) or ``fsdp`` (FSDP2's
    ``fully_shard`` per transformer block); None means ddp when the world has more than one process. One process
    ignores it. ``dist_timeout_s``: how long a collective waits for the other ranks before the run fails.
    """

    max_steps: int
    lr: float = 4e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    clip: float = 0.7
    bf16: Optional[bool] = None  # None: on when training on a GPU
    gradient_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0
    output_dir: Optional[str] = None
    seed: int = 0
    progress: bool = True
    parallel: Optional[str] = None
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            check_int(name, getattr(self, name), minimum=0)
        for name, low, high in (("lr", 0.0, None), ("weight_decay", 0.0, None), ("clip", 0.0, None),
                                ("min_lr_ratio", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (high is not None and value > high) or (name == "lr" and value == 0):
                bound = f"in [{low}, {high}]" if high is not None else ("> 0" if name == "lr" else f">= {low}")
                raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")
        for name in ("bf16",):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true, false or null, got {getattr(self, name)!r}")
        for name in ("gradient_checkpointing", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        from .distributed import PARALLEL
        if self.parallel is not None and self.parallel not in PARALLEL:
            raise ValueError(f"parallel: expected one of {', '.join(PARALLEL)} or null, got {self.parallel!r}")
        if isinstance(self.dist_timeout_s, bool) or not isinstance(self.dist_timeout_s, (int, float)) \
                or not math.isfinite(self.dist_timeout_s) or self.dist_timeout_s <= 0:
            raise ValueError(f"dist_timeout_s: expected a finite number of seconds > 0, got {self.dist_timeout_s!r}")


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """A count or size from a config: an int (not a bool) in [minimum, 2**31 - 1]; beyond that it is a typo and
    overflows the libraries' C integers."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 2**31 - 1:
        raise ValueError(f"{name}: expected an int in [{minimum}, {2**31 - 1}], got {value!r}")


class EpochBatches:
    """A deterministic stream of ``(epoch, batch)`` pairs: each epoch visits the records in an order drawn from
    (seed, epoch), in batches of ``batch_size`` built by ``collate(records, epoch)``. Its position is part of every
    checkpoint.

    Args:
        records: any sequence (mmlatent Records, strings, dicts): collate's input.
        batch_size: records per batch, 1..len(records).
        collate: ``collate(records: list, epoch: int) -> dict`` of tensors (and other values) for ``loss_fn``.
        seed: the shuffling seed (every epoch's order is drawn from (seed, epoch)).
        drop_last: drop an epoch's last, incomplete batch.
    """

    def __init__(self, records: Sequence, batch_size: int, collate: Callable[[list, int], Dict[str, Any]],
                 seed: int = 0, drop_last: bool = True) -> None:
        if not callable(collate):
            raise TypeError(f"collate: expected a callable collate(records, epoch), got {type(collate).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 \
                or batch_size > len(records):
            raise ValueError(f"batch_size: expected 1..{len(records)} (the number of records), got {batch_size}")
        self.records, self.batch_size, self.collate, self.seed = records, batch_size, collate, seed
        self.per_epoch = len(records) // batch_size if drop_last else math.ceil(len(records) / batch_size)
        self.epoch, self.index = 0, 0
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Makes this the stream of one rank of ``world_size``: every batch is still drawn from the whole epoch's
        order (the batch one process would train on), and this rank takes its records ``rank::world_size``, so
        the ranks' shards partition each batch and no record is seen twice in an epoch. A last, incomplete batch
        (``drop_last=False``) is split the same way; each rank still gets at least one record of it unless it
        has fewer records than there are ranks, and then every rank skips it."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank}")
        if self.batch_size < world_size:
            raise ValueError(f"batch_size: {self.batch_size} records cannot be shared by {world_size} ranks; the "
                             f"batch size is the global one, at least one record a rank")
        if self.per_epoch * self.batch_size > len(self.records) and len(self.records) % self.batch_size < world_size:
            self.per_epoch -= 1
        self.rank, self.world_size = rank, world_size

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def __next__(self) -> Tuple[int, Dict[str, Any]]:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)
        chosen = order[self.index * self.batch_size:(self.index + 1) * self.batch_size][self.rank::self.world_size]
        self.index += 1
        return self.epoch, self.collate([self.records[i] for i in chosen], self.epoch)

    def __iter__(self) -> Iterator[Tuple[int, Dict[str, Any]]]:
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens one batch trains on, the Trainer's default count for tokens/s: the ones of ``attention_mask``, else
    every position of ``input_ids`` (or of ``labels``), else 0. On host tensors (what a collate function returns)
    this needs no device synchronisation."""
    for key in ("attention_mask", "input_ids", "labels"):
        value = batch.get(key)
        if torch.is_tensor(value):
            return int(value.sum()) if key == "attention_mask" else value.numel()
    return 0


def label_tokens(labels: torch.Tensor, shift: bool = True) -> int:
    """The positions a mean cross-entropy averages over: labels other than -100, after the next-token shift
    (``shift``: a causal LM's first label is never predicted) or as they are (an encoder-decoder's labels)."""
    labels = labels[:, 1:] if shift else labels
    return int((labels != -100).sum())


def batch_samples(batch: Mapping[str, Any]) -> int:
    """The Trainer's default item count: the samples of a batch (dim 0 of ``input_ids``, else of ``labels``)."""
    for key in ("input_ids", "labels"):
        if torch.is_tensor(batch.get(key)):
            return int(batch[key].shape[0])
    raise ValueError("count_items: the batch has no input_ids or labels tensor to count samples in; pass the "
                     "Trainer a count_items(batch) of its own")


def _counts(value: object, name: str) -> List[int]:
    values = [value] if not isinstance(value, (list, tuple)) else list(value)
    out = []
    for v in values:
        if torch.is_tensor(v) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
            raise ValueError(f"{name}: expected an int >= 0 or a sequence of them, got {value!r}")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name}: returned no count")
    return out


def weighted_loss(terms: Any, weights: Optional[Sequence[float]]) -> torch.Tensor:
    """The scalar a micro-batch back-propagates: ``terms`` (one loss tensor, or a tuple of the loss's terms) summed,
    each term times its weight when ``weights`` are given (a data-parallel run's shares of the global batch)."""
    parts = list(terms) if isinstance(terms, (tuple, list)) else [terms]
    if not parts or not all(torch.is_tensor(t) and t.dim() == 0 for t in parts):
        raise TypeError(f"loss_fn: expected a scalar tensor or a tuple of scalar tensors, got {terms!r}")
    if weights is None:
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum()
    if len(weights) != len(parts):
        raise ValueError(f"count_items: gave {len(weights)} counts for a loss of {len(parts)} terms; it must give "
                         f"one count per term loss_fn returns")
    return sum(w * t for w, t in zip(weights, parts))


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory; ties and requires_grad kept) and
    whose buffers are copied: what :meth:`Trainer.exported` fills with the gathered FSDP2 weights."""
    import copy
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


class LossForward(nn.Module):
    """``loss_fn(model, batch)`` as a module's forward: what DistributedDataParallel wraps and FSDP2 shards as its
    root, so their hooks run around the whole loss however many of the model's parts it calls."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Dict[str, Any]], Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        # (module, parameter name) of the parameters every rank's backward must give a gradient (see use_all)
        self.used_by_every_step: List[Tuple[nn.Module, str]] = []

    def use_all(self, modules: Sequence[nn.Module]) -> None:
        """Makes every trainable parameter outside ``modules`` (FSDP2's sharded blocks) part of each loss, times
        zero. FSDP2 reduce-scatters the root's gradients as one buffer of the parameters that have one, so a
        rank whose batch skips a part (DPMM-CoT's UNet on a batch without images) would send a buffer of
        another size than the others and the collective would fail; with the zero term every rank sends all."""
        inside = {id(p) for m in modules for p in m.parameters()}
        self.used_by_every_step = [(sub, name) for sub in self.model.modules()
                                   for name, p in sub.named_parameters(recurse=False)
                                   if p.requires_grad and id(p) not in inside]

    def forward(self, batch: Optional[Dict[str, Any]], run: Optional[Callable[[nn.Module], Any]] = None) -> Any:
        """The loss of ``batch``; or, with ``run``, ``run(model)``: evaluation under FSDP2 goes through the root's
        forward too, which gathers the parameters outside the sharded blocks."""
        if run is not None:
            return run(self.model)
        out = self.loss_fn(self.model, batch)
        if self.used_by_every_step and torch.is_grad_enabled():
            # looked up now: inside the root's forward these are FSDP2's gathered parameters
            zero = sum(getattr(sub, name).sum() for sub, name in self.used_by_every_step) * 0.0
            out = (out[0] + zero, *out[1:]) if isinstance(out, (tuple, list)) else out + zero
        return out


class Trainer:
    """Runs ``loss_fn(model, batch) -> scalar loss`` over ``batches`` for ``config.max_steps`` optimizer steps.

    Args:
        model: any ``nn.Module`` (a transformers model, a PEFT model, an mmlatent wrapper's model). Only the
            parameters that require grad are optimized and checkpointed (LoRA adapters, or everything).
        loss_fn: ``loss_fn(model, batch) -> torch.Tensor``, a scalar; called under bf16 autocast when
            ``config.bf16`` (default: on a GPU) with ``batch`` already on the model's device. For a plain causal
            LM patched by :func:`mmlatent.models.apply_fused_loss`: ``lambda m, b: m(**b).loss``.
        batches: an :class:`EpochBatches` over the training records; its ``collate(records, epoch) -> dict``
            builds each batch from a list of records and the epoch they are drawn in (curricula change the batch
            with the epoch; ignore ``epoch`` otherwise). Tensor values move to the device; others pass as they are.
        config: :class:`TrainConfig`.
        eval_fn: ``eval_fn(model) -> dict`` of JSON-able metrics, every ``config.eval_every`` steps, under
            no_grad and eval mode, with the RNG states restored afterwards (evaluating never changes the run). In a
            data-parallel run every rank calls it (see :meth:`evaluate`).
        on_epoch: ``on_epoch(epoch, previous_epoch)`` before the first batch of each epoch (``previous_epoch`` None
            at the start of a run); its inputs are part of the checkpoint, so a resumed run makes the same calls.
        describe: the progress bar's label.
        run_config: the run's full JSON-able config (default: the :class:`TrainConfig`), stored in every
            checkpoint and compared on :meth:`resume`, which refuses a change that would alter the run.
        count_tokens: ``count_tokens(batch) -> int``, the tokens a batch trains on, for tokens/s (default
            :func:`batch_tokens`); called on the batch before it moves to the device.
        step_log: ``step_log() -> dict`` of JSON-able numbers, called after each optimizer step: merged into the
            step's history record and shown on the progress bar (a method's own per-step metrics, such as GRPO's
            reward).
        count_items: ``count_items(batch) -> int or [int, ...]``, what each of the loss's terms averages over in
            a batch (tokens with a label, images, samples), on the host batch. ``loss_fn`` then returns the
            terms' means as one tensor or a tuple of as many tensors. In a data-parallel run each rank weighs
            its term ``i`` by ``world size x its count / the count summed over ranks``, so that the gradients
            DistributedDataParallel averages are those of the global batch's means; one process uses the terms
            as they are. Default: every term averages over the batch's samples.

    ``history`` keeps every step's loss, learning rate, gradient norm, tokens/s, peak memory and seconds, and every
    evaluation. Sync points per optimizer step: the loss and gradient norm when they are logged; in a
    data-parallel run also one all-reduce of the step's item counts before its first forward, the gradient
    all-reduce (DDP) or reduce-scatter (FSDP2) in the last micro-batch's backward, and one all-reduce of the logged
    loss. Rank 0 shows the progress bar and writes checkpoints (every rank its shard, under FSDP2); every rank
    evaluates its share of the records, whose results are gathered.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Dict[str, Any]], torch.Tensor],
                 batches: EpochBatches, config: TrainConfig,
                 eval_fn: Optional[Callable[[nn.Module], Dict[str, Any]]] = None,
                 on_epoch: Optional[Callable[[int, Optional[int]], None]] = None, describe: str = "train",
                 run_config: Optional[dict] = None,
                 count_tokens: Callable[[Mapping[str, Any]], int] = batch_tokens,
                 step_log: Optional[Callable[[], Dict[str, float]]] = None,
                 count_items: Optional[Callable[[Mapping[str, Any]], Any]] = None) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss_fn(model, batch), got {type(loss_fn).__name__}")
        if not isinstance(batches, EpochBatches):
            raise TypeError(f"batches: expected an EpochBatches, got {type(batches).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        self.model, self.loss_fn, self.batches, self.config = model, loss_fn, batches, config
        self.eval_fn, self.on_epoch, self.describe = eval_fn, on_epoch, describe
        self.count_tokens = count_tokens
        if step_log is not None and not callable(step_log):
            raise TypeError(f"step_log: expected a callable step_log() -> dict, got {type(step_log).__name__}")
        self.step_log = step_log
        if count_items is not None and not callable(count_items):
            raise TypeError(f"count_items: expected a callable count_items(batch), got {type(count_items).__name__}")
        self.count_items = count_items if count_items is not None else batch_samples
        self.run_config = json.loads(json.dumps(run_config if run_config is not None else {"train": asdict(config)}))
        self.device = next(model.parameters()).device
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        from .distributed import init_distributed, transformer_blocks, wrap_module
        self.world = init_distributed(config.dist_timeout_s)
        self.parallel = (config.parallel or "ddp") if self.world.distributed else None
        if isinstance(self.run_config.get("train"), dict):  # what was used, not "decide by device"
            self.run_config["train"]["bf16"] = self.bf16
            self.run_config["train"]["parallel"] = self.parallel
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model: no parameter requires grad; nothing to train")
        if config.gradient_checkpointing:  # before FSDP2 shards the blocks it checkpoints
            from mmlatent.models.compat import enable_activation_checkpointing
            enable_activation_checkpointing(model, use_reentrant=False)
        # the loss is the forward of the module that data parallelism wraps: DDP's reducer and FSDP2's root hooks
        # see every parameter loss_fn uses, whichever of the model's parts it calls
        self.loss_module = LossForward(model, loss_fn)
        # under FSDP2, rank 0 keeps a parameterless copy of the model to export the gathered weights into
        self._replica = meta_copy(model) if self.parallel == "fsdp" and self.world.main else None
        if self.parallel == "fsdp":  # before sharding, while the blocks' parameters are still theirs
            self.loss_module.use_all(transformer_blocks(model))
        if self.parallel:
            self.loss_module = wrap_module(self.loss_module, self.parallel, self.world, self.device, self.bf16)
        if self.world.distributed:
            batches.shard(self.world.rank, self.world.size)
        # after sharding: FSDP2 replaces each parameter by a DTensor of this rank's shard
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.step = 0
        self.history: Dict[str, List] = {"train": [], "eval": []}
        # the epoch of the last batch trained on (None before the first): what on_epoch was last called with
        self._seen_epoch = None
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        """A fresh AdamW (fused; foreach over FSDP2's DTensor shards) and schedule continuing from the current step
        (IVT-LR may reset per stage)."""
        params = [p for _, p in self.named_params]
        fused = self.parallel != "fsdp" and all(p.dtype.is_floating_point for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay,
                                           fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor, last_epoch=-1)
        if self.step:  # keep the schedule where the run is
            self.scheduler.last_epoch = self.step
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * self._lr_factor(self.step)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _lr_factor(self, step: int) -> float:
        c = self.config
        return warmup_cosine(step, c.warmup_steps, c.max_steps, c.min_lr_ratio)

    # ------------------------------------------------------------------------------------------------ training
    def fit(self, until: Optional[int] = None) -> Dict[str, List]:
        """Trains to ``config.max_steps`` (or stops after step ``until``: an interruption, for tests and
        time-boxed runs; the schedule is still the one of max_steps)."""
        from tqdm.auto import tqdm
        c = self.config
        last = c.max_steps if until is None else min(until, c.max_steps)
        if self.step == 0:  # a resumed run restores its RNG states instead; ranks draw different noise and dropout
            torch.manual_seed(c.seed + self.world.rank)
        self.model.train()
        bar = tqdm(total=c.max_steps, initial=self.step, desc=self.describe,
                   disable=not c.progress or not self.world.main, leave=True)
        while self.step < last:
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            step_loss, tokens = torch.zeros((), device=self.device), 0
            for index, epoch, batch, weights in self._micro_batches():
                # counted before the move: on a host batch (what collate returns) this is no device sync
                tokens += self.count_tokens(batch)
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with gradient_sync(self.loss_module, self.parallel, sync=index == c.grad_accum - 1):
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                        loss = weighted_loss(self.loss_module(batch), weights)
                    (loss / c.grad_accum).backward()
                step_loss += loss.detach().float() / c.grad_accum  # stays on the device until it is logged
            params = [p for _, p in self.named_params]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.clip) if c.clip > 0 else None
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            # sync point, once per optimizer step: the loss and gradient norm are logged (history, progress bar);
            # in a data-parallel run the loss is the global batch's, one all-reduce
            step_loss = self._global_mean(float(step_loss), "the step's loss")
            grad_norm = float(full_tensor(grad_norm)) if grad_norm is not None else float("nan")
            elapsed = time.perf_counter() - t0
            peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                    else _rss_peak_bytes())
            record = dict(step=self.step, loss=step_loss, lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                          tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0, peak_memory_bytes=peak,
                          epoch=epoch, seconds=elapsed)
            extra = self.step_log() if self.step_log is not None else {}
            record.update(extra)
            self.history["train"].append(record)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            peak=f"{peak / 2**20:.0f}MiB", epoch=epoch,
                            **{k: f"{v:.3g}" for k, v in extra.items() if isinstance(v, (int, float))})
            bar.update(1)
            if self.eval_fn is not None and c.eval_every and self.step % c.eval_every == 0:
                self.evaluate()
            if c.output_dir and c.save_every and self.step % c.save_every == 0:
                self.save(os.path.join(c.output_dir, f"checkpoint-{self.step}"))
        bar.close()
        return self.history

    def _micro_batches(self) -> Iterator[Tuple[int, int, Dict[str, Any], Optional[List[float]]]]:
        """(index, epoch, batch, term weights) for each micro-batch of one optimizer step. One process draws each
        batch just before its forward and weighs nothing (None); a data-parallel run draws the whole window
        first and reduces its item counts in one all-reduce (a sync point), so that each rank can weigh its
        terms by its share of the global batch."""
        accum = self.config.grad_accum
        if not self.world.distributed:
            for index in range(accum):
                epoch, batch = next(self.batches)
                self._enter_epoch(epoch)
                yield index, epoch, batch, None
            return
        window = []
        for _ in range(accum):
            epoch, batch = next(self.batches)
            self._enter_epoch(epoch)
            window.append((epoch, batch, _counts(self.count_items(batch), "count_items")))
        terms = len(window[0][2])
        if any(len(counts) != terms for _, _, counts in window):
            raise ValueError("count_items: returned a different number of counts for batches of one run")
        flat = all_reduce_sum([n for _, _, counts in window for n in counts], self.world, self.device,
                              "the all-reduce of the step's item counts", self.config.dist_timeout_s)
        for index, (epoch, batch, counts) in enumerate(window):
            totals = flat[index * terms:(index + 1) * terms]
            yield index, epoch, batch, [self.world.size * n / total if total else 0.0
                                        for n, total in zip(counts, totals)]

    def _global_mean(self, value: float, what: str) -> float:
        if not self.world.distributed:
            return value
        return all_reduce_sum([value], self.world, self.device, f"the all-reduce of {what}",
                              self.config.dist_timeout_s)[0] / self.world.size

    @property
    def finished(self) -> bool:
        return self.step >= self.config.max_steps

    @property
    def epoch(self) -> int:
        """The epoch of the last batch trained on (0 before the first)."""
        return 0 if self._seen_epoch is None else self._seen_epoch

    def _enter_epoch(self, epoch: int) -> None:
        if epoch != self._seen_epoch:
            previous, self._seen_epoch = self._seen_epoch, epoch
            if self.on_epoch is not None:
                self.on_epoch(epoch, previous)

    def evaluate(self) -> dict:
        """Runs ``eval_fn`` and appends its metrics to the history. In a data-parallel run every rank calls it on
        the whole model (:meth:`with_full_model`), so that an ``eval_fn`` that shares its records out
        (:func:`~mmlatent.train.distributed.map_shards` with this trainer's ``world``, as every method's
        ``evaluate(..., world=)`` does) evaluates each record once and every rank records the gathered result."""
        result = self._evaluate_here()
        self.history["eval"].append(result)
        return result

    def _evaluate_here(self) -> dict:
        was_training = self.model.training
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):  # evaluating must not move training's RNG
            state = random.getstate(), np.random.get_state()
            metrics = self.with_full_model(self.eval_fn)
            result = dict(step=self.step, **metrics)
            random.setstate(state[0])
            np.random.set_state(state[1])
        self.model.train(was_training)
        return result

    def with_full_model(self, fn: Callable[[nn.Module], Any]) -> Any:
        """``fn(model)`` with the whole model on this rank and no collective in its forwards, for inference whose
        forwards differ between ranks (evaluating a shard of the records, GRPO's rollouts): ``model`` itself in one
        process or under DDP; under FSDP2, through the root's forward with every block gathered
        (:func:`~mmlatent.train.distributed.gathered`: the model's full size in memory on each rank while ``fn``
        runs). Every rank must call it together under FSDP2 (the gathers are collectives)."""
        if self.parallel != "fsdp":
            return fn(self.model)
        from .distributed import gathered

        def run(model: nn.Module) -> Any:
            with gathered(self.loss_module, self.world, self.config.dist_timeout_s):
                return fn(model)
        return self.loss_module(None, run=run)

    def exported(self) -> Optional[nn.Module]:
        """The trained model whole, for writing a finished run: ``model`` itself in one process or under DDP; under
        FSDP2 (a collective: every rank calls it) rank 0 gets a plain copy of ``model`` holding the gathered
        parameters, on the CPU, and the other ranks None. Only rank 0 writes a run folder."""
        if self.parallel != "fsdp":
            return self.model if self.world.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        with self._collective("gathering the FSDP2 shards for the export"):
            full = get_model_state_dict(self.loss_module,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.world.main:
            return None
        replica = self._replica
        replica.load_state_dict({k[len("model."):]: v for k, v in full.items()}, strict=False, assign=True)
        for sub in replica.modules():  # assign=True gives tied weights separate tensors; tie them again
            if hasattr(sub, "tie_weights") and hasattr(sub, "config"):
                sub.tie_weights()
        still_meta = [n for n, p in replica.named_parameters() if p.is_meta]
        if still_meta:
            raise RuntimeError(f"export: the gathered FSDP2 state lacks {still_meta[:3]} (of {len(still_meta)})")
        return replica

    def _collective(self, what: str):
        from .distributed import collective
        return collective(what, self.world, self.config.dist_timeout_s)

    def _rank_state(self) -> dict:
        """What differs between ranks and must come back on resume: the RNG states and the data stream's state."""
        state = dict(torch_cpu=torch.get_rng_state().tolist(), python_rng=_jsonable(random.getstate()),
                     numpy_rng=_jsonable(np.random.get_state()), data=self.batches.state_dict())
        if torch.cuda.is_available():
            state["torch_cuda"] = torch.cuda.get_rng_state(
                self.device if self.device.type == "cuda" else None).tolist()
        return state

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save(self, directory: str) -> str:
        """Writes a verified checkpoint (see :mod:`mmlatent.train.checkpoint`): model.safetensors (trainable
        parameters), optimizer.safetensors, rng.safetensors, trainer.json (step, schedule, data position, epoch
        tracker, RNG states, history, the full run config) and manifest.json, replacing ``directory`` only once
        the new checkpoint is complete.

        In a data-parallel run every rank calls it: trainer.json also keeps each rank's RNG and data states and the
        world size. Under DDP rank 0 writes the files; under FSDP2 the model and optimizer go, sharded, through
        ``torch.distributed.checkpoint`` into ``sharded/`` (every rank its shards), inside the same crash-safe
        folder, under the same manifest."""
        from .distributed import barrier, gather_objects
        ranks = gather_objects(self._rank_state(), self.world, "gathering the ranks' RNG states for a checkpoint",
                               self.config.dist_timeout_s)
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device if self.device.type == "cuda" else None)
        state = dict(step=self.step, scheduler=self.scheduler.state_dict(), data=self.batches.state_dict(),
                     python_rng=_jsonable(random.getstate()), numpy_rng=_jsonable(np.random.get_state()),
                     run_config=self.run_config, history=self.history, seen_epoch=self._seen_epoch)
        if self.world.distributed:
            state.update(world_size=self.world.size, ranks=ranks)
        if self.parallel == "fsdp":
            return self._save_sharded(directory, rng, state)
        if self.world.main:
            opt_tensors, state["optimizer"] = _flatten_optimizer(self.optimizer.state_dict())
            weights = {n: p.detach().contiguous().cpu() for n, p in self.named_params}
            write_trainer_checkpoint(directory, weights, opt_tensors, rng, state)
        barrier(self.world, "waiting for rank 0's checkpoint", self.config.dist_timeout_s)
        return os.path.normpath(directory)

    def _save_sharded(self, directory: str, rng: dict, state: dict) -> str:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from .checkpoint import write_checkpoint, write_json
        from .distributed import barrier
        timeout = self.config.dist_timeout_s
        with self._collective("collecting the FSDP2 state dict"):
            model_state, optimizer_state = get_state_dict(self.loss_module, self.optimizer)
        scratch = os.path.join(os.path.normpath(directory) + ".tmp", SHARDED)

        def write_shards() -> None:  # every rank, once rank 0 has made the scratch folder
            barrier(self.world, "waiting for rank 0's scratch folder", timeout)
            with self._collective("writing the FSDP2 shards"):
                dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=scratch)
            barrier(self.world, "waiting for every rank's shards", timeout)

        if self.world.main:
            from safetensors.torch import save_file
            state["layout"] = SHARDED
            write_checkpoint(directory, {"rng.safetensors": lambda path: save_file(dict(rng), path),
                                         "trainer.json": lambda path: write_json(path, state, indent=None)},
                             fill=lambda folder: write_shards())
        else:
            write_shards()
        barrier(self.world, "waiting for rank 0 to put the checkpoint in place", timeout)
        return os.path.normpath(directory)

    def resume(self, directory: str, allow_config_change: bool = False) -> str:
        """Restores everything :meth:`save` wrote; the run then continues exactly where it stopped.

        The checkpoint is verified against its manifest first (after a save killed midway, the surviving complete
        copy is used). A checkpoint written by a run whose config differs in a key that changes the result is
        refused, listing the differing keys, unless ``allow_config_change``: then the current config applies
        (learning rate, weight decay and schedule included) and the changes are logged. A data-parallel
        checkpoint resumes only at the world size and with the parallelism it was written with (each rank takes
        back its own RNG and data states; the FSDP2 shards load through ``torch.distributed.checkpoint``).
        Returns the folder read.
        """
        path = resolve_checkpoint(directory, required=("rng.safetensors", "trainer.json"))
        state = read_json(path, "trainer.json")
        where = os.path.join(path, "trainer.json")
        if not isinstance(state, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(state).__name__}")
        sharded = state.get("layout") == SHARDED
        for key in ("step", "scheduler", "data", "python_rng", "numpy_rng", "run_config", "history") + \
                (() if sharded else ("optimizer",)):
            if key not in state:
                raise CheckpointError(f"{where}: no {key!r} entry (written by an older mmlatent, or not by "
                                      f"Trainer.save)")
        stored_world = state.get("world_size", 1)
        if stored_world != self.world.size:
            raise ValueError(f"resume: {path} was written by a run of {stored_world} process(es) and this one has "
                             f"{self.world.size}; a run resumes exactly only at the world size it was saved at "
                             f"(each rank's data shard and RNG state are part of the checkpoint)")
        if sharded != (self.parallel == "fsdp"):
            raise ValueError(f"resume: {path} holds {'FSDP2 shards' if sharded else 'whole parameters'} and this "
                             f"run is {'FSDP2' if self.parallel == 'fsdp' else self.parallel or 'one process'}; "
                             f"resume it with the train.parallel it was written with")
        changes = config_changes(state["run_config"], self.run_config) if isinstance(state["run_config"], dict) \
            else [("run_config", state["run_config"], "a mapping")]
        if changes and not allow_config_change:
            listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in changes)
            raise ValueError(f"resume: {path} was written by a run whose config differs in {listed}. Resuming "
                             f"would silently change the run; pass --allow-config-change (allow_config_change=True) "
                             f"to resume with the new values")
        if not sharded:
            path = resolve_checkpoint(path, required=TRAINER_FILES)
            weights = load_tensors(path, "model.safetensors")
            check_shapes({n: tuple(p.shape) for n, p in self.named_params}, weights,
                         os.path.join(path, "model.safetensors"), "trainable parameter")
            optimizer_tensors = load_tensors(path, "optimizer.safetensors")
        rng = load_tensors(path, "rng.safetensors")
        # everything is parsed and tried on scratch objects first: a refused checkpoint changes nothing
        try:
            mine = state
            if self.world.distributed:
                ranks = state.get("ranks")
                if not isinstance(ranks, list) or len(ranks) != self.world.size:
                    raise ValueError("ranks: expected one state per rank")
                mine = ranks[self.world.rank]
            step, data = state["step"], mine["data"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"step: expected an int >= 0, got {step!r}")
            if not isinstance(data, dict) or any(isinstance(data.get(k), bool) or not isinstance(data.get(k), int)
                                                 for k in ("epoch", "index")):
                raise ValueError(f"data: expected {{epoch: int, index: int}}, got {data!r}")
            if not isinstance(state["history"], dict):
                raise ValueError("history: expected a mapping")
            python_rng, numpy_rng = _tuples(mine["python_rng"]), _tuples(mine["numpy_rng"])
            random.Random().setstate(python_rng)
            np.random.RandomState().set_state(numpy_rng)
            cpu_state = (torch.tensor(mine["torch_cpu"], dtype=torch.uint8) if self.world.distributed
                         else rng.get("torch_cpu"))
            cuda_state = (torch.tensor(mine["torch_cuda"], dtype=torch.uint8) if "torch_cuda" in mine
                          and self.world.distributed else rng.get("torch_cuda"))
            optimizer_state = None if sharded else _unflatten_optimizer(optimizer_tensors, state["optimizer"],
                                                                        self.device)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise CheckpointError(f"{where}: {err!s} (the file does not hold a trainer state this version reads)") \
                from None
        if cpu_state is None or cpu_state.dtype != torch.uint8 or cpu_state.dim() != 1:
            raise CheckpointError(f"{os.path.join(path, 'rng.safetensors')}: no uint8 torch_cpu generator state")
        before = self.step, self.optimizer, self.scheduler
        self.step = step
        self.reset_optimizer()
        try:
            if sharded:
                self._load_sharded(os.path.join(path, SHARDED))
            else:
                self.optimizer.load_state_dict(optimizer_state)
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            self.step, self.optimizer, self.scheduler = before
            raise CheckpointError(f"{os.path.join(path, 'optimizer.safetensors')} / {where}: the optimizer state "
                                  f"does not fit this model's trainable parameters ({err!s})") from None
        if not sharded:
            with torch.no_grad():
                for n, p in self.named_params:
                    p.copy_(weights[n].to(p.device, p.dtype))
        self.batches.load_state_dict(data)
        self.history = state["history"]
        self._seen_epoch = state.get("seen_epoch")
        torch.set_rng_state(cpu_state)
        if cuda_state is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_state)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        if changes:
            self._apply_config_change()
            for key, before, after in changes:
                LOG.warning("resume: %s changed from %s to %s (allowed by allow_config_change)", key, _show(before),
                            _show(after))
        return path

    def _load_sharded(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        with self._collective("loading the FSDP2 shards"):
            model_state, optimizer_state = get_state_dict(self.loss_module, self.optimizer)
            loaded = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(loaded, checkpoint_id=folder)
            set_state_dict(self.loss_module, self.optimizer, model_state_dict=loaded["model"],
                           optim_state_dict=loaded["optimizer"])

    def _apply_config_change(self) -> None:
        """After a resume with another config: the optimizer's hyper-parameters and the schedule are this
        config's, not the checkpoint's."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["initial_lr"] = c.lr
            group["weight_decay"] = c.weight_decay
            group["lr"] = c.lr * self._lr_factor(self.step)
        self.scheduler.base_lrs = [c.lr for _ in self.optimizer.param_groups]
        self.scheduler.lr_lambdas = [self._lr_factor for _ in self.optimizer.param_groups]
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _flat(config: object, prefix: str = "") -> Dict[str, object]:
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: config}


def config_changes(stored: dict, current: dict) -> List[tuple]:
    """(key, stored value, current value) for every dotted key whose value differs and that can change the
    result (keys in :data:`RESULT_NEUTRAL_KEYS` are ignored); a key absent on one side shows as ``<absent>``."""
    a, b = _flat(stored), _flat(current)
    missing = "<absent>"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if k not in RESULT_NEUTRAL_KEYS and a.get(k, missing) != b.get(k, missing)]


def _show(value: object) -> str:
    return value if value == "<absent>" else json.dumps(value)


def _rss_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _flatten_optimizer(state: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        meta["state"][str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
                meta["state"][str(index)][key] = "tensor"
            else:
                meta["state"][str(index)][key] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict, device: torch.device) -> dict:
    state = {}
    for index, values in meta["state"].items():
        state[int(index)] = {key: (tensors[f"{index}.{key}"].to(device) if kind == "tensor" else kind)
                             for key, kind in values.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _jsonable(value: object) -> object:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value: object) -> Any:
    if isinstance(value, dict) and "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


__all__ = ["TrainConfig", "Trainer", "EpochBatches", "batch_tokens", "warmup_cosine", "config_changes",
           "RESULT_NEUTRAL_KEYS", "label_tokens", "batch_samples", "weighted_loss", "LossForward", "meta_copy",
           "SHARDED"]
