"""The methods a run can use, in one place: their modules (each has ``train``, ``evaluate``, ``evaluate_result``,
``load_run``, ``build_data``, ``summary_lines``, ``table_row``, ``markdown_table`` and ``RUN_CONFIG``), and their
YAML config files: one reader, one check of the keys, and the dispatch on a file's ``method`` key (absent: IVT-LR,
the first method, whose files predate the key).

Every problem is a ValueError or FileNotFoundError that names the file, and the key where there is one: no such
file, a folder, text that is not UTF-8, invalid YAML (with its line and column), a document that is not a
mapping, unknown keys, a value out of range (the config class's own check, prefixed with the file)."""
from __future__ import annotations

import math
import os
from dataclasses import fields
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Type, TypeVar

Config = TypeVar("Config")


def read_yaml(path: str) -> dict:
    """The mapping a YAML config file holds (an empty file is an empty mapping)."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config: no such file {path}") from None
    except IsADirectoryError:
        raise ValueError(f"config: {path} is a folder, not a YAML file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config: {path} is not UTF-8 text ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"config: {path} is not valid YAML{where}: {problem}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"config: {path} must hold a mapping of run settings, got a {type(raw).__name__}")
    return raw


def from_mapping(cls: Type[Config], raw: dict, path: str, also_known: Iterable[str] = ()) -> Config:
    """``cls(**raw)`` for a dataclass ``cls``; unknown keys (beyond ``cls``'s fields and ``also_known``, keys the
    caller has consumed) and the class's own ValueErrors are reported with ``path``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known - set(also_known))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected some of {sorted(known | set(also_known))}")
    try:
        return cls(**{k: v for k, v in raw.items() if k in known})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def check_train_options(train: Any) -> None:
    """A config's ``train`` mapping: only :class:`~mmlatent.train.TrainConfig` fields, each value in range."""
    from .loop import TrainConfig
    if not isinstance(train, dict):
        raise ValueError(f"train: expected a mapping of TrainConfig options, got {train!r}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(train) - known)
    if unknown:
        raise ValueError(f"train: unknown keys {unknown}; expected some of {sorted(known)}")
    try:
        TrainConfig(**dict({"max_steps": 1}, **train))
    except ValueError as err:
        raise ValueError(f"train.{err}") from None


def check_model_spec(model: dict) -> None:
    """A config's one-kind ``model`` mapping: ``{"path": local folder}`` or ``{<builder of mmlatent.models.tiny>:
    {its keyword arguments}}``, each value in range and the head counts dividing."""
    import inspect

    from mmlatent.models import tiny as tiny_models

    from .loop import check_int
    (kind, spec), = model.items()
    if kind == "path":
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"model.path: expected the path of a local checkpoint folder, got {spec!r}")
        if not os.path.isdir(spec) or not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"model.path: {spec} is not a model folder (no {os.path.join(spec, 'config.json')}); "
                             f"models are loaded from local folders only")
        return
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ValueError(f"model.{kind}: expected a mapping of settings, got {spec!r}")
    builder = getattr(tiny_models, kind)
    defaults = {n: p.default for n, p in inspect.signature(builder).parameters.items()
                if n not in ("vocab", "device", "dtype", "attn_implementation")}
    unknown = sorted(set(spec) - set(defaults))
    if unknown:
        raise ValueError(f"model.{kind}: unknown keys {unknown}; expected some of {sorted(defaults)}")
    for key, value in spec.items():
        if key == "mlp_ratio":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"model.{kind}.{key}: expected a positive number, got {value!r}")
            continue
        check_int(f"model.{kind}.{key}", value, minimum=0 if key == "seed" else 1)
    merged = dict(defaults, **spec)
    if "heads" in merged and merged["hidden"] % merged["heads"]:
        raise ValueError(f"model.{kind}.hidden: {merged['hidden']} is not a multiple of heads ({merged['heads']})")
    if "kv_heads" in merged and merged["heads"] % merged["kv_heads"]:
        raise ValueError(f"model.{kind}.heads: {merged['heads']} is not a multiple of kv_heads "
                         f"({merged['kv_heads']})")


def check_data_keys(data: dict, keys: Dict[str, set], required: Dict[str, Sequence[str]]) -> Tuple[str, dict]:
    """A config's one-kind ``data`` mapping: its settings a mapping, only ``keys[kind]``, every
    ``required[kind]`` present. Returns ``(kind, settings)``; each value is the method's to check."""
    (kind, spec), = data.items()
    if not isinstance(spec, dict):
        raise ValueError(f"data.{kind}: expected a mapping of settings, got {spec!r}")
    unknown = sorted(set(spec) - keys[kind])
    if unknown:
        raise ValueError(f"data.{kind}: unknown keys {unknown}; expected some of {sorted(keys[kind])}")
    for key in sorted(set(required.get(kind, ())) - set(spec)):
        raise ValueError(f"data.{kind}.{key}: required")
    return kind, spec


def check_kind_weights(name: str, value: Any, kinds: Sequence[str]) -> None:
    """Sampling weights of question kinds: one finite non-negative number per kind, with a positive sum."""
    if (not isinstance(value, (list, tuple)) or len(value) != len(kinds)
            or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
                   for w in value) or not sum(value) > 0):
        raise ValueError(f"{name}: expected {len(kinds)} non-negative numbers (one per kind) with a positive sum, "
                         f"got {value!r}")


def open_run(directory: str, *, required: Sequence[str], config_class: type, run_format: int,
             method: Optional[str] = None) -> Tuple[str, dict, dict, Any, Any]:
    """The finished run folder ``directory`` (or the surviving copy of a save a crash interrupted), verified
    against its manifest: ``(path, manifest files, run.json, config, tokenizer)``. A training checkpoint, a
    run.json of another ``method`` (None: one without the key) or of a newer ``run_format``, and a config this
    version cannot build are CheckpointErrors naming the file."""
    from .checkpoint import CheckpointError, read_json, read_manifest, resolve_checkpoint
    from .ivtlr import _saved_tokenizer
    if not os.path.exists(os.path.join(directory, "run.json")) and os.path.exists(os.path.join(directory,
                                                                                              "trainer.json")):
        raise CheckpointError(f"{directory}: a training checkpoint (continue it with mmlatent train --resume); a "
                              f"finished run's final/ folder is what is evaluated")
    path = resolve_checkpoint(directory, required=tuple(required))
    files = read_manifest(path)["files"]
    stored = read_json(path, "run.json")
    where = os.path.join(path, "run.json")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    if method is not None and stored.get("method") != method:
        raise CheckpointError(f"{where}: not a {method} run (method {stored.get('method')!r})")
    if isinstance(stored.get("format"), int) and stored["format"] > run_format:
        raise CheckpointError(f"{where}: format {stored['format']}, this mmlatent reads up to {run_format}")
    try:
        config = config_class(**stored["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: not a run config this version reads ({err})") from None
    return path, files, stored, config, _saved_tokenizer(path, files, stored.get("tokenizer"))


def fit_run(trainer: Any, parts: list, *, resume: Optional[str], allow_config_change: bool,
            until: Optional[int]) -> dict:
    """Resumes ``trainer`` when asked, fits it (to ``until``), and summarises: ``train_seconds``,
    ``peak_memory_bytes``, ``median_step_seconds``, ``completed``, ``steps``, ``history`` and ``loss_parts``, the
    per-micro-batch loss pieces ``parts`` collected (a list of [k] tensors, read once, after training) averaged
    over each optimizer step's accumulation window: a [steps, k] array."""
    import time

    import numpy as np
    import torch
    if resume:
        trainer.resume(resume, allow_config_change=allow_config_change)
    t0 = time.perf_counter()
    history = trainer.fit(until=until)
    seconds = time.perf_counter() - t0
    steps = history["train"]
    split = torch.stack(parts).float().cpu().numpy() if parts else np.zeros((0, 0))
    accum = trainer.config.grad_accum
    if len(split):
        split = split[:len(split) // accum * accum].reshape(-1, accum, split.shape[1]).mean(axis=1)
    return dict(train_seconds=seconds, peak_memory_bytes=max((r["peak_memory_bytes"] for r in steps), default=0),
                median_step_seconds=float(np.median([r["seconds"] for r in steps])) if steps else None,
                completed=trainer.finished, steps=trainer.step, history=history, loss_parts=split)


def finish_run(trainer: Any, output_dir: Optional[str], save_final: Callable[[Any], str]) -> Optional[str]:
    """Where a run ends: a finished one's ``<output_dir>/final`` (``save_final(model)`` writes it from the
    trained model whole, :meth:`~mmlatent.train.Trainer.exported`), an interrupted one's ``checkpoint-<step>``
    to resume from; None without ``output_dir``. In a data-parallel run every rank calls it (gathering FSDP2's
    shards and sharded checkpoints are collectives), rank 0 writes the run folder, and every rank returns the
    folder's path once it is in place."""
    from .distributed import barrier
    if not output_dir:
        return None
    if not trainer.finished:  # an interrupted run must not look finished: it leaves a checkpoint to resume from
        return trainer.save(os.path.join(output_dir, f"checkpoint-{trainer.step}"))
    directory = os.path.normpath(os.path.join(output_dir, "final"))
    model = trainer.exported()
    if model is not None:
        save_final(model)
    barrier(trainer.world, "waiting for rank 0's final run folder", trainer.config.dist_timeout_s)
    return directory


def reload_final(result: dict, device: Any = None) -> dict:
    """``result`` of a finished run with its model replaced by the one its final folder holds, loaded whole in
    this process (on ``device``): what each rank of a data-parallel run evaluates with once training is over,
    whatever sharded the training model (FSDP2 leaves each rank a shard)."""
    from .modal_mixed import run_method
    saved = method_module(run_method(result["checkpoint"], verified=True))  # GRPO writes a Modal-mixed run
    loaded, _, _, _ = saved.load_run(result["checkpoint"], device=device)
    return dict(result, **{"wrapper" if "wrapper" in result else "model": loaded})


DEFAULT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prepare_trainable(model: Any, *, freeze_vision: bool, lora: Optional[dict],
                      added_token_ids: Sequence[int] = ()) -> Any:
    """A run's VLM made trainable as its config says: the vision tower frozen (``freeze_vision``), and with
    ``lora`` (LoraConfig keywords; ``target_modules`` defaults to every projection) PEFT adapters in the language
    model's layers only, never the vision tower's projections. ``added_token_ids``: embedding rows the run added
    (special tokens of a resized vocabulary), trained as PEFT trainable tokens unless ``lora`` says otherwise.
    Returns the model (a PEFT model with ``lora``)."""
    import re

    from mmlatent.models.backbones import VLMBackbone
    backbone = VLMBackbone(model)
    if freeze_vision:
        backbone.vision_tower.requires_grad_(False)
    if not lora:
        return model
    import peft
    options = dict(lora)
    modules = options.pop("target_modules", list(DEFAULT_LORA_MODULES))
    pattern = re.escape(backbone.language_model_name) + r"\..*\.(" + "|".join(modules) + ")"
    if added_token_ids and "trainable_token_indices" not in options and "modules_to_save" not in options:
        options["trainable_token_indices"] = {"embed_tokens": list(added_token_ids)}
    return peft.get_peft_model(model, peft.LoraConfig(target_modules=pattern, **options))


def method_module(name: str) -> ModuleType:
    """The module of the method ``name`` (``"ivtlr"``, ``"modal_mixed"``, ``"grpo"`` or ``"dpmm"``); another name is
    a ValueError."""
    from . import dpmm, grpo, ivtlr, modal_mixed
    modules = {"ivtlr": ivtlr, modal_mixed.METHOD: modal_mixed, grpo.METHOD: grpo, dpmm.METHOD: dpmm}
    if name not in modules:
        raise ValueError(f"method: expected one of {', '.join(modules)}, got {name!r}")
    return modules[name]


def load_config(path: str) -> Any:
    """The run config of a YAML file, by its ``method`` key: absent or ``ivtlr``, an IVT-LR
    :class:`~mmlatent.train.ivtlr.RunConfig`; ``modal_mixed``, a
    :class:`~mmlatent.train.modal_mixed.ModalMixedConfig`; ``grpo``, a :class:`~mmlatent.train.grpo.GRPOConfig`;
    ``dpmm``, a :class:`~mmlatent.train.dpmm.DPMMConfig`.
    Another method is a ValueError naming the file."""
    raw = read_yaml(path)
    try:
        cls = method_module(raw.get("method", "ivtlr")).RUN_CONFIG
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return from_mapping(cls, raw, path, also_known=() if "method" in {f.name for f in fields(cls)} else ("method",))


__all__ = ["read_yaml", "from_mapping", "load_config", "method_module", "check_train_options", "check_model_spec",
           "check_data_keys", "check_kind_weights", "prepare_trainable", "open_run", "fit_run", "finish_run",
           "reload_final"]
