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

from .checkpoint import (TRAINER_FILES, CheckpointError, check_shapes, load_tensors, read_json,
                         resolve_checkpoint, write_trainer_checkpoint)

LOG = logging.getLogger("mmlatent")

# Config keys that cannot change the trained weights: a resume may differ in these without being refused.
RESULT_NEUTRAL_KEYS = frozenset({"name", "eval_samples", "max_new_tokens", "train.progress", "train.output_dir",
                                 "train.save_every", "train.eval_every"})

@dataclass
class TrainConfig:
    """Optimisation settings (IVT-LR's public defaults: lr 4e-5, weight decay 0.01, clip 0.7)."""

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

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def __next__(self) -> Tuple[int, Dict[str, Any]]:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)
        chosen = order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
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
            no_grad and eval mode, with the RNG states restored afterwards (evaluating never changes the run).
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

    ``history`` keeps every step's loss, learning rate, gradient norm, tokens/s, peak memory and seconds, and every
    evaluation. One host synchronisation per optimizer step: the loss and gradient norm, when they are logged.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Dict[str, Any]], torch.Tensor],
                 batches: EpochBatches, config: TrainConfig,
                 eval_fn: Optional[Callable[[nn.Module], Dict[str, Any]]] = None,
                 on_epoch: Optional[Callable[[int, Optional[int]], None]] = None, describe: str = "train",
                 run_config: Optional[dict] = None,
                 count_tokens: Callable[[Mapping[str, Any]], int] = batch_tokens,
                 step_log: Optional[Callable[[], Dict[str, float]]] = None) -> None:
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
        self.run_config = json.loads(json.dumps(run_config if run_config is not None else {"train": asdict(config)}))
        self.device = next(model.parameters()).device
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        if isinstance(self.run_config.get("train"), dict):  # what was used, not "decide by device"
            self.run_config["train"]["bf16"] = self.bf16
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise ValueError("model: no parameter requires grad; nothing to train")
        self.step = 0
        self.history: Dict[str, List] = {"train": [], "eval": []}
        # the epoch of the last batch trained on (None before the first): what on_epoch was last called with
        self._seen_epoch = None
        self.reset_optimizer()
        if config.gradient_checkpointing:
            from mmlatent.models.compat import enable_activation_checkpointing
            enable_activation_checkpointing(model, use_reentrant=False)

    def reset_optimizer(self) -> None:
        """A fresh AdamW (fused) and schedule continuing from the current step (IVT-LR may reset per stage)."""
        params = [p for _, p in self.named_params]
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay,
                                           fused=all(p.dtype.is_floating_point for p in params))
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
        if self.step == 0:  # a resumed run restores its RNG states instead
            torch.manual_seed(c.seed)
        self.model.train()
        bar = tqdm(total=c.max_steps, initial=self.step, desc=self.describe, disable=not c.progress, leave=True)
        while self.step < last:
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            step_loss, tokens = torch.zeros((), device=self.device), 0
            for _ in range(c.grad_accum):
                epoch, batch = next(self.batches)
                self._enter_epoch(epoch)
                # counted before the move: on a host batch (what collate returns) this is no device sync
                tokens += self.count_tokens(batch)
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss = self.loss_fn(self.model, batch)
                (loss / c.grad_accum).backward()
                step_loss += loss.detach().float() / c.grad_accum  # stays on the device until it is logged
            params = [p for _, p in self.named_params]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.clip) if c.clip > 0 else None
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            # sync point, once per optimizer step: the loss and gradient norm are logged (history, progress bar)
            step_loss = float(step_loss)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
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
        was_training = self.model.training
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):  # evaluating must not move training's RNG
            state = random.getstate(), np.random.get_state()
            result = dict(step=self.step, **self.eval_fn(self.model))
            random.setstate(state[0])
            np.random.set_state(state[1])
        self.model.train(was_training)
        self.history["eval"].append(result)
        return result

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save(self, directory: str) -> str:
        """Writes a verified checkpoint (see :mod:`mmlatent.train.checkpoint`): model.safetensors (trainable
        parameters), optimizer.safetensors, rng.safetensors, trainer.json (step, schedule, data position, epoch
        tracker, RNG states, history, the full run config) and manifest.json, replacing ``directory`` only once
        the new checkpoint is complete."""
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device if self.device.type == "cuda" else None)
        state = dict(step=self.step, scheduler=self.scheduler.state_dict(), data=self.batches.state_dict(),
                     optimizer=opt_meta, python_rng=_jsonable(random.getstate()),
                     numpy_rng=_jsonable(np.random.get_state()), run_config=self.run_config, history=self.history,
                     seen_epoch=self._seen_epoch)
        weights = {n: p.detach().contiguous().cpu() for n, p in self.named_params}
        return write_trainer_checkpoint(directory, weights, opt_tensors, rng, state)

    def resume(self, directory: str, allow_config_change: bool = False) -> str:
        """Restores everything :meth:`save` wrote; the run then continues exactly where it stopped.

        The checkpoint is verified against its manifest first (after a save killed midway, the surviving complete
        copy is used). A checkpoint written by a run whose config differs in a key that changes the result is
        refused, listing the differing keys, unless ``allow_config_change``: then the current config applies
        (learning rate, weight decay and schedule included) and the changes are logged. Returns the folder read.
        """
        path = resolve_checkpoint(directory, required=TRAINER_FILES)
        state = read_json(path, "trainer.json")
        where = os.path.join(path, "trainer.json")
        if not isinstance(state, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(state).__name__}")
        for key in ("step", "scheduler", "data", "optimizer", "python_rng", "numpy_rng", "run_config", "history"):
            if key not in state:
                raise CheckpointError(f"{where}: no {key!r} entry (written by an older mmlatent, or not by "
                                      f"Trainer.save)")
        changes = config_changes(state["run_config"], self.run_config) if isinstance(state["run_config"], dict) \
            else [("run_config", state["run_config"], "a mapping")]
        if changes and not allow_config_change:
            listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in changes)
            raise ValueError(f"resume: {path} was written by a run whose config differs in {listed}. Resuming "
                             f"would silently change the run; pass --allow-config-change (allow_config_change=True) "
                             f"to resume with the new values")
        weights = load_tensors(path, "model.safetensors")
        check_shapes({n: tuple(p.shape) for n, p in self.named_params}, weights,
                     os.path.join(path, "model.safetensors"), "trainable parameter")
        optimizer_tensors = load_tensors(path, "optimizer.safetensors")
        rng = load_tensors(path, "rng.safetensors")
        # everything is parsed and tried on scratch objects first: a refused checkpoint changes nothing
        try:
            step, data = state["step"], state["data"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"step: expected an int >= 0, got {step!r}")
            if not isinstance(data, dict) or any(isinstance(data.get(k), bool) or not isinstance(data.get(k), int)
                                                 for k in ("epoch", "index")):
                raise ValueError(f"data: expected {{epoch: int, index: int}}, got {data!r}")
            if not isinstance(state["history"], dict):
                raise ValueError("history: expected a mapping")
            python_rng, numpy_rng = _tuples(state["python_rng"]), _tuples(state["numpy_rng"])
            random.Random().setstate(python_rng)
            np.random.RandomState().set_state(numpy_rng)
            optimizer_state = _unflatten_optimizer(optimizer_tensors, state["optimizer"], self.device)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise CheckpointError(f"{where}: {err!s} (the file does not hold a trainer state this version reads)") \
                from None
        cpu_state = rng.get("torch_cpu")
        if cpu_state is None or cpu_state.dtype != torch.uint8 or cpu_state.dim() != 1:
            raise CheckpointError(f"{os.path.join(path, 'rng.safetensors')}: no uint8 torch_cpu generator state")
        before = self.step, self.optimizer, self.scheduler
        self.step = step
        self.reset_optimizer()
        try:
            self.optimizer.load_state_dict(optimizer_state)
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            self.step, self.optimizer, self.scheduler = before
            raise CheckpointError(f"{os.path.join(path, 'optimizer.safetensors')} / {where}: the optimizer state "
                                  f"does not fit this model's trainable parameters ({err!s})") from None
        with torch.no_grad():
            for n, p in self.named_params:
                p.copy_(weights[n].to(p.device, p.dtype))
        self.batches.load_state_dict(data)
        self.history = state["history"]
        self._seen_epoch = state.get("seen_epoch")
        torch.set_rng_state(cpu_state)
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        if changes:
            self._apply_config_change()
            for key, before, after in changes:
                LOG.warning("resume: %s changed from %s to %s (allowed by allow_config_change)", key, _show(before),
                            _show(after))
        return path

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
           "RESULT_NEUTRAL_KEYS"]
