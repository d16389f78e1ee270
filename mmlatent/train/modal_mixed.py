"""Modal-mixed CoT (arXiv 2602.00574) training runs from a config file (``method: modal_mixed``): the joint SFT of a
Qwen2-VL / Qwen2.5-VL and its latent diffusion head on interleaved records, the text-CoT and no-CoT variants on the
same data, evaluation (strict accuracy per question kind, latency and tokens per answer, the reconstruction error of
the held-out sketches, the dummy-latent ablation) and self-contained run folders.

A run folder (``final/``) is the VLM as ``save_pretrained`` writes it (or a PEFT adapter folder, with the base in
``base/`` when it was built from a config), ``diffusion_head.safetensors`` (the head's state dict),
``modal_mixed_config.json`` (the head's constructor arguments, the :class:`~mmlatent.models.ModalMixedCoT` settings
and what the folder holds), the tokenizer, the image processor and ``run.json``, all under one manifest written by
:func:`mmlatent.train.checkpoint.write_run_checkpoint` and verified on load.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from mmlatent.data import strict_answer, synthetic
from mmlatent.data.tokenizer import WordTokenizer
from mmlatent.models import LatentDiffusionHead, ModalMixedCoT, ModalMixedOutput
from mmlatent.models.backbones import VLMBackbone
from mmlatent.models import tiny as tiny_models

from .checkpoint import (CheckpointError, check_shapes, load_tensors, read_json, read_manifest, read_settings_file,
                         resolve_checkpoint, write_json, write_run_checkpoint)
from .distributed import World
from .loop import EpochBatches, TrainConfig, Trainer, check_int, label_tokens
from .methods import (check_data_keys, check_kind_weights, check_model_spec, check_train_options, finish_run, fit_run,
                      from_mapping, open_run, prepare_trainable, read_yaml)

METHOD = "modal_mixed"
MODES = ("modal_mixed", "cot", "no_cot")
RUN_FORMAT = 1
SETTINGS_FILE = "modal_mixed_config.json"
HEAD_FILE = "diffusion_head.safetensors"
SETTINGS_FORMAT = "mmlatent-modal-mixed"
SETTINGS_VERSION = 1
MODEL_KINDS = ("tiny_qwen2_5_vl", "tiny_qwen2_vl", "path")
DATA_KEYS = {"synthetic": {"n_train", "n_eval", "seed", "kinds", "weights", "eval_kinds"},
             "zebra_cot": {"train", "eval", "skip_bad", "n_train", "n_eval"}}
DATA_REQUIRED = {"zebra_cot": ("train", "eval")}
HEAD_KEYS = ("width", "depth", "prediction", "schedule", "num_train_timesteps", "timestep_sampling", "logit_mean",
             "logit_std")
SAMPLER_KEYS = ("steps", "schedule", "cfg_scale")
# what run.json records besides the config
OVERRIDES = ("zeros", "noise")


@dataclass
class ModalMixedConfig:
    """One Modal-mixed run (YAML keys are these fields; ``train`` holds :class:`TrainConfig` fields).

    ``head``: :class:`~mmlatent.models.LatentDiffusionHead` options (width, depth, prediction, schedule,
    num_train_timesteps, timestep_sampling, logit_mean, logit_std); ``sampler``: the head's sampler at generation
    (steps, schedule, cfg_scale); ``sketch_size``: [height, width] every reasoning image is resized to (None: as
    they are). ``cache_targets``: encode every training record's sketches once, before training (the vision tower
    is frozen, so ``encode_targets`` of a record never changes; for data that fits in memory). ``latent_scale``
    multiplies the pooled merger outputs before they are trained and fed back (the model then generates latents at
    that scale; the reconstruction error is measured after dividing it out)."""

    name: str = "modal-mixed"
    method: str = METHOD
    mode: str = "modal_mixed"  # modal_mixed | cot | no_cot
    model: Dict = field(default_factory=lambda: {"tiny_qwen2_5_vl": {}})
    data: Dict = field(default_factory=lambda: {"synthetic": {"n_train": 4000, "n_eval": 400, "seed": 0}})
    num_latents: int = 9
    pool_grid: List[int] = field(default_factory=lambda: [3, 3])
    diffusion_weight: float = 1.0
    batch_mul: int = 4
    detach_conditions: bool = False
    latent_scale: float = 1.0
    cache_targets: bool = False
    head: Dict = field(default_factory=lambda: {"width": 256, "depth": 3})
    sampler: Dict = field(default_factory=lambda: {"steps": 20, "schedule": "ddim"})
    sketch_size: Optional[List[int]] = None
    epochs: int = 4
    batch_size: int = 32
    lora: Optional[Dict] = None
    freeze_vision: bool = True
    max_new_tokens: int = 64
    eval_samples: int = 64  # held-out questions of the periodic evaluation (train.eval_every steps)
    train: Dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .ivtlr import _check_lora, _one_kind
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        if self.method != METHOD:
            raise ValueError(f"method: expected {METHOD!r} for a Modal-mixed run, got {self.method!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("num_latents", "batch_mul", "epochs", "batch_size", "max_new_tokens", "eval_samples"):
            check_int(name, getattr(self, name))
        for name in ("detach_conditions", "freeze_vision", "cache_targets"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if not isinstance(self.pool_grid, (list, tuple)) or len(self.pool_grid) != 2:
            raise ValueError(f"pool_grid: expected [rows, cols], got {self.pool_grid!r}")
        for value in self.pool_grid:
            check_int("pool_grid", value)
        self.pool_grid = [int(v) for v in self.pool_grid]
        if self.pool_grid[0] * self.pool_grid[1] != self.num_latents:
            raise ValueError(f"pool_grid: {self.pool_grid} pools to {self.pool_grid[0] * self.pool_grid[1]} latents, "
                             f"but num_latents is {self.num_latents}")
        for name, positive in (("diffusion_weight", False), ("latent_scale", True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        if self.sketch_size is not None:
            if not isinstance(self.sketch_size, (list, tuple)) or len(self.sketch_size) != 2:
                raise ValueError(f"sketch_size: expected [height, width] or null, got {self.sketch_size!r}")
            for value in self.sketch_size:
                check_int("sketch_size", value)
            self.sketch_size = [int(v) for v in self.sketch_size]
            if self.mode != "modal_mixed":
                raise ValueError(f"sketch_size: mode {self.mode!r} has no sketches; set it to null")
        if self.cache_targets and not self.freeze_vision:
            raise ValueError("cache_targets: the sketch targets are cached only under a frozen vision tower "
                             "(freeze_vision: true), which keeps them fixed")
        _one_kind("model", self.model, MODEL_KINDS)
        check_model_spec(self.model)
        _one_kind("data", self.data, tuple(DATA_KEYS))
        _check_data(self.data)
        _check_head(self.head)
        _check_sampler(self.sampler, self.head)
        if self.lora is not None:
            _check_lora(self.lora)
        check_train_options(self.train)

    @classmethod
    def load(cls, path: str) -> "ModalMixedConfig":
        """Reads a YAML config (``method: modal_mixed``); every problem is a ValueError or FileNotFoundError
        naming the file and the key (:mod:`mmlatent.train.methods`)."""
        return from_mapping(cls, read_yaml(path), path)


RUN_CONFIG = ModalMixedConfig  # the config class of this method's runs (mmlatent.train.methods)


def _check_data(data: dict) -> None:
    kind, spec = check_data_keys(data, DATA_KEYS, DATA_REQUIRED)
    known = synthetic.INTERMEDIATE_KINDS + synthetic.KINDS
    for key, value in spec.items():
        name = f"data.{kind}.{key}"
        if key in ("n_train", "n_eval"):
            check_int(name, value)
        elif key == "seed":
            check_int(name, value, minimum=0)
        elif key == "skip_bad":
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected true or false, got {value!r}")
        elif key in ("train", "eval"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: expected the path of a parquet file or a folder of them, got {value!r}")
        elif key in ("kinds", "eval_kinds"):
            if not isinstance(value, (list, tuple)) or not value or any(k not in known for k in value):
                raise ValueError(f"{name}: expected a non-empty list of {', '.join(known)}, got {value!r}")
        elif key == "weights":
            check_kind_weights(name, value, spec.get("kinds", known))


def _check_head(head: dict) -> None:
    if not isinstance(head, dict):
        raise ValueError(f"head: expected a mapping of LatentDiffusionHead options, got {head!r}")
    unknown = sorted(set(head) - set(HEAD_KEYS))
    if unknown:
        raise ValueError(f"head: unknown keys {unknown}; expected some of {list(HEAD_KEYS)}")
    for key in ("width", "depth", "num_train_timesteps"):
        if key in head:
            check_int(f"head.{key}", head[key])
    try:
        _probe_head(head)
    except (TypeError, ValueError) as err:
        raise ValueError(f"head.{err}") from None


def _probe_head(head: dict) -> LatentDiffusionHead:
    """A small head with ``head``'s options (width and depth aside): the head's own checks of the others, without
    allocating a head of the configured size."""
    return LatentDiffusionHead(8, 8, **dict(head, width=8, depth=1))


def _check_sampler(sampler: dict, head: dict) -> None:
    if not isinstance(sampler, dict):
        raise ValueError(f"sampler: expected a mapping (steps, schedule, cfg_scale), got {sampler!r}")
    unknown = sorted(set(sampler) - set(SAMPLER_KEYS))
    if unknown:
        raise ValueError(f"sampler: unknown keys {unknown}; expected some of {list(SAMPLER_KEYS)}")
    check_int("sampler.steps", sampler.get("steps", 20))
    scale = sampler.get("cfg_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"sampler.cfg_scale: expected a finite number, got {scale!r}")
    try:
        _probe_head(head).schedule(sampler.get("schedule"), sampler.get("steps", 20))
    except (TypeError, ValueError) as err:
        raise ValueError(f"sampler.{err}") from None


# ------------------------------------------------------------------------------------------------------ building

def build_data(config: ModalMixedConfig) -> Tuple[Any, list, list]:
    """(tokenizer, train records, eval records): :class:`~mmlatent.data.interleaved.InterleavedRecord` s. Synthetic
    data draws ``kinds`` for training and ``eval_kinds`` (default: the intermediate-state kinds) for evaluation,
    with the interleaved vocabulary's word tokenizer; Zebra-CoT reads the local parquet files with the local
    checkpoint's tokenizer."""
    (kind, spec), = config.data.items()
    if kind == "synthetic":
        known = synthetic.INTERMEDIATE_KINDS + synthetic.KINDS
        kinds = tuple(spec.get("kinds", known))
        seed = spec.get("seed", 0)
        train = synthetic.generate_interleaved(spec.get("n_train", 4000), seed=seed, kinds=kinds,
                                               weights=spec.get("weights"))
        evaluation = synthetic.generate_interleaved(spec.get("n_eval", 400), seed=seed,
                                                    kinds=tuple(spec.get("eval_kinds", synthetic.INTERMEDIATE_KINDS)),
                                                    split="test")
        tokenizer = WordTokenizer(synthetic.interleaved_vocabulary())
        return tokenizer, train, evaluation
    from mmlatent.data.readers import read_zebra_cot
    for key in ("train", "eval"):
        if not os.path.exists(spec[key]):
            raise FileNotFoundError(f"data.zebra_cot.{key}: no parquet file or folder at {spec[key]}")
    if "path" not in config.model:
        raise ValueError("model: Zebra-CoT needs a model loaded from a local path (model: {path: ...}), whose "
                         "tokenizer reads its text")
    train, _ = read_zebra_cot(spec["train"], skip_bad=spec.get("skip_bad", False))
    evaluation, _ = read_zebra_cot(spec["eval"], skip_bad=spec.get("skip_bad", False))
    train = train[:spec["n_train"]] if "n_train" in spec else train
    evaluation = evaluation[:spec["n_eval"]] if "n_eval" in spec else evaluation
    from transformers import AutoTokenizer

    from mmlatent.data.tokenizer import HFTokenizer
    return HFTokenizer(AutoTokenizer.from_pretrained(config.model["path"])), train, evaluation


def _model_dtype(config: ModalMixedConfig, device: torch.device) -> torch.dtype:
    """bf16 on a GPU for a local checkpoint, else float32 (the tiny models)."""
    return torch.bfloat16 if "path" in config.model and device.type == "cuda" else torch.float32


def build_vlm(config: ModalMixedConfig, tokenizer: Any, device: torch.device) -> nn.Module:
    """The run's VLM on ``device`` (seeded by the caller): a tiny Qwen built from its config, or a local
    checkpoint (its embeddings resized when the tokenizer gained the sketch tokens); the vision tower frozen when
    asked; LoRA adapters on the language model's layers when ``config.lora`` is set (with a resized vocabulary, the
    added tokens' rows of the input and output embeddings train too, as PEFT's trainable tokens)."""
    (kind, spec), = config.model.items()
    added: List[int] = []
    if kind == "path":
        from transformers import AutoModelForImageTextToText
        vlm = AutoModelForImageTextToText.from_pretrained(spec, attn_implementation="sdpa",
                                                          dtype=_model_dtype(config, device)).to(device)
        rows = vlm.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:  # START, END and the placeholder were added to the tokenizer
            added = list(range(rows, len(tokenizer)))
            vlm.resize_token_embeddings(len(tokenizer))
    else:
        vlm = getattr(tiny_models, kind)(vocab=len(tokenizer), device=device, **(spec or {}))
    return prepare_trainable(vlm, freeze_vision=config.freeze_vision, lora=config.lora, added_token_ids=added)


def build_head(config: ModalMixedConfig, hidden: int, device: torch.device) -> LatentDiffusionHead:
    return LatentDiffusionHead(hidden, hidden, **config.head).to(device)


def build_model(config: ModalMixedConfig, tokenizer: Any, device: torch.device) -> ModalMixedCoT:
    """The :class:`ModalMixedCoT` of a run: :func:`build_vlm`, a float32 head of the config's width and depth,
    the tokenizer's START / END / placeholder ids."""
    vlm = build_vlm(config, tokenizer, device)
    hidden = VLMBackbone(vlm).text_config.hidden_size
    return _wrap(config, vlm, build_head(config, hidden, device), tokenizer)


def _wrap(config: ModalMixedConfig, vlm: nn.Module, head: LatentDiffusionHead, tokenizer: Any) -> ModalMixedCoT:
    return ModalMixedCoT(vlm, head, start_token_id=tokenizer.start_latent_id, end_token_id=tokenizer.end_latent_id,
                         latent_token_id=tokenizer.latent_id, num_latents=config.num_latents,
                         pool_grid=tuple(config.pool_grid), diffusion_weight=float(config.diffusion_weight),
                         batch_mul=config.batch_mul, detach_conditions=config.detach_conditions)


def image_processor_for(config: ModalMixedConfig, vlm: nn.Module):
    """A local checkpoint's own image processor, else one built from the model's config."""
    if "path" in config.model and os.path.isfile(os.path.join(config.model["path"], "preprocessor_config.json")):
        from transformers import AutoImageProcessor
        return AutoImageProcessor.from_pretrained(config.model["path"])
    return VLMBackbone(vlm).image_processor()


def collator(config: ModalMixedConfig, tokenizer: Any, image_processor: Any, prompt_only: bool = False):
    from mmlatent.data.interleaved import ModalMixedCollator
    return ModalMixedCollator(tokenizer, image_processor, mode=config.mode, num_latents=config.num_latents,
                              prompt_only=prompt_only,
                              sketch_size=tuple(config.sketch_size) if config.sketch_size else None)


def sketch_targets(model: ModalMixedCoT, batch: dict, scale: float = 1.0) -> torch.Tensor:
    """[N_seg, K, D] targets of a batch's sketches (``encode_targets`` of its reasoning images, times
    ``scale``); [0, K, D] for a batch without sketches."""
    if "latent_targets" in batch:  # cached (cache_targets)
        targets = batch["latent_targets"]
        return targets * scale if scale != 1.0 else targets
    if "sketch_pixel_values" not in batch:
        device = next(model.parameters()).device
        return torch.zeros(0, model.num_latents, model.hidden_size, device=device)
    targets = model.encode_targets(batch["sketch_pixel_values"], batch["sketch_image_grid_thw"])
    return targets * scale if scale != 1.0 else targets


def joint_loss(model: ModalMixedCoT, batch: dict, scale: float = 1.0) -> ModalMixedOutput:
    """The :class:`~mmlatent.models.modal_mixed.ModalMixedOutput` of one training batch."""
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                 latent_targets=sketch_targets(model, batch, scale), pixel_values=batch.get("pixel_values"),
                 image_grid_thw=batch.get("image_grid_thw"))


# ------------------------------------------------------------------------------------------------------ running

@torch.no_grad()
def encode_records(model: ModalMixedCoT, make: Any, records: list, batch_size: int = 64,
                   progress: bool = False) -> Dict[str, torch.Tensor]:
    """{record id: [n_sketches, K, D] float32 targets on the CPU} of every record's sketches, in batches."""
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("cache_targets: the training records' ids are not unique, so their sketches cannot be "
                         "cached by id")
    cache: Dict[str, torch.Tensor] = {}
    for start in tqdm(range(0, len(records), batch_size), disable=not progress, desc="encoding sketch targets"):
        chunk = records[start:start + batch_size]
        batch = make(chunk)
        targets = sketch_targets(model, {k: v.to(device) for k, v in batch.items()}).float().cpu()
        for record, part in zip(chunk, targets.split(batch["sketches_per_sample"].tolist())):
            cache[record.id] = part
    return cache


def train(config: ModalMixedConfig, device: Optional[Union[str, torch.device]] = None, resume: Optional[str] = None,
          progress: bool = True, until: Optional[int] = None, allow_config_change: bool = False) -> dict:
    """Trains one run on the :class:`~mmlatent.train.Trainer`: the VLM's trainable parameters (all but the frozen
    vision tower, or its LoRA adapters) and the diffusion head, on ``text_loss + diffusion_weight *
    latent_loss``. A run that reaches its last step writes ``<output_dir>/final`` (:func:`save_run`); one
    stopped early by ``until`` writes ``<output_dir>/checkpoint-<step>``, which ``resume`` continues (a resume
    whose config would change the run is refused, unless ``allow_config_change``). Everything random is created
    after seeding with ``train.seed``. Returns the summary, the history, the per-step text and latent losses, and
    the model, tokenizer, image processor and eval records."""
    from .ivtlr import seed_everything
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_options = TrainConfig(**dict({"max_steps": 1}, **config.train))
    seed_everything(train_options.seed)
    tokenizer, train_records, eval_records = build_data(config)
    model = build_model(config, tokenizer, device)
    image_processor = image_processor_for(config, model.vlm)
    make = collator(config, tokenizer, image_processor)
    cache = encode_records(model, make, train_records, progress=progress) \
        if config.cache_targets and config.mode == "modal_mixed" else None

    def collate(records, epoch):
        batch = make(records)
        if cache is not None:  # the cached targets replace the sketch images
            batch.pop("sketch_pixel_values", None)
            batch.pop("sketch_image_grid_thw", None)
            batch["latent_targets"] = torch.cat([cache[r.id] for r in records])
        return batch

    batches = EpochBatches(train_records, config.batch_size, collate, seed=train_options.seed)
    options = dict(config.train)
    options.setdefault("max_steps", max(1, config.epochs * batches.per_epoch // options.get("grad_accum", 1)))
    train_config = TrainConfig(**options)
    parts: List[torch.Tensor] = []

    def loss_fn(m, batch):
        out = joint_loss(model, batch, config.latent_scale)
        parts.append(torch.stack([out.text_loss.detach(), out.latent_loss.detach()]))  # read after training
        return out.text_loss, model.diffusion_weight * out.latent_loss  # over label tokens, over latents

    def count_items(batch):
        return label_tokens(batch["labels"]), int((batch["input_ids"] == model.latent_token_id).sum())

    def eval_fn(_model):
        metrics = evaluate(model, tokenizer, image_processor, config, eval_records[:config.eval_samples],
                           ablation=False, world=trainer.world)
        return {k: metrics[k] for k in ("accuracy", "accuracy_stderr", "n", "latent_mse", "latent_cosine")}

    train_config.progress = progress and train_config.progress
    run_config = dict(asdict(config), train=asdict(train_config))
    if train_config.gradient_checkpointing:  # the VLM's layers; the Trainer's own call needs a transformers model
        from mmlatent.models.compat import enable_activation_checkpointing
        enable_activation_checkpointing(model.vlm, use_reentrant=False)
        train_config = replace(train_config, gradient_checkpointing=False)
    trainer = Trainer(model, loss_fn, batches, train_config, describe=config.name, eval_fn=eval_fn,
                      run_config=run_config, count_items=count_items)
    summary = fit_run(trainer, parts, resume=resume, allow_config_change=allow_config_change, until=until)
    split = summary.pop("loss_parts").reshape(-1, 2)
    result = dict(summary, name=config.name, method=METHOD, mode=config.mode, device=str(device),
                  text_loss=[float(v) for v in split[:, 0]], latent_loss=[float(v) for v in split[:, 1]],
                  trainable_parameters=sum(p.numel() for _, p in trainer.named_params),
                  head_parameters=sum(p.numel() for p in model.head.parameters()))
    checkpoint = finish_run(trainer, train_config.output_dir, lambda trained: save_run(
        os.path.join(train_config.output_dir, "final"), trained, tokenizer, config, result,
        image_processor=image_processor))
    if checkpoint:
        result["checkpoint"] = checkpoint
    return dict(result, model=model, tokenizer=tokenizer, eval_records=eval_records, image_processor=image_processor)


# ------------------------------------------------------------------------------------------------------ saving

def head_config(head: LatentDiffusionHead) -> dict:
    """The constructor arguments that rebuild ``head``: ``LatentDiffusionHead(**head_config(head))``."""
    return dict(latent_dim=head.latent_dim, cond_dim=head.cond_dim, width=head.width, depth=head.depth,
                prediction=head.prediction, schedule=head.noise_schedule,
                num_train_timesteps=head.num_train_timesteps, timestep_sampling=head.timestep_sampling,
                logit_mean=head.logit_mean, logit_std=head.logit_std)


def write_model(model: ModalMixedCoT, folder: str, latent_scale: float = 1.0) -> dict:
    """Writes ``model`` into the existing folder ``folder`` (no manifest: the caller's writer adds it): the VLM as
    ``save_pretrained`` writes it, or its PEFT adapter (the base in ``base/`` when it has no local checkpoint; the
    embedding matrices in the adapter file when the vocabulary grew past the checkpoint's), the head's state dict
    as ``diffusion_head.safetensors`` and ``modal_mixed_config.json``. Returns the settings written."""
    from safetensors.torch import save_file

    from mmlatent.models.ivtlr import saving
    vlm = model.vlm
    base = VLMBackbone(vlm).model
    settings = {"format": SETTINGS_FORMAT, "version": SETTINGS_VERSION, "model_class": type(base).__name__,
                "vocab_size": int(base.get_input_embeddings().weight.shape[0]), "weights": "full", "base": None,
                "embedding_layers": False,
                "modal_mixed": dict(start_token_id=model.start_token_id, end_token_id=model.end_token_id,
                                    latent_token_id=model.latent_token_id, num_latents=model.num_latents,
                                    pool_grid=list(model.pool_grid), diffusion_weight=model.diffusion_weight,
                                    batch_mul=model.batch_mul, detach_conditions=model.detach_conditions),
                "head": head_config(model.head), "head_dtype": str(next(model.head.parameters()).dtype),
                "latent_scale": float(latent_scale)}
    with saving.quiet_progress():
        if not saving.is_peft_model(vlm):
            vlm.save_pretrained(folder)
        else:
            configs = vlm.peft_config
            recorded = {name: c.base_model_name_or_path for name, c in configs.items()}
            checkpoint = saving._model_folder(recorded.get("default") or next(iter(recorded.values()), None))
            save_base = checkpoint is None
            embeddings = not save_base and saving._vocab_size(checkpoint) != settings["vocab_size"]
            if save_base:
                base.save_pretrained(os.path.join(folder, saving.BASE_FOLDER), state_dict=saving._base_state(vlm))
            try:
                if save_base:  # the adapter names its base by the path beside it, so the folder can move
                    for c in configs.values():
                        c.base_model_name_or_path = saving.BASE_FOLDER
                vlm.save_pretrained(folder, save_embedding_layers=embeddings)
            finally:
                for name, c in configs.items():
                    c.base_model_name_or_path = recorded[name]
            settings.update(weights="adapter", base=saving.BASE_FOLDER if save_base else None,
                            embedding_layers=embeddings)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()},
              os.path.join(folder, HEAD_FILE))
    write_json(os.path.join(folder, SETTINGS_FILE), settings)
    return settings


def save_run(directory: str, model: ModalMixedCoT, tokenizer: Any, config: ModalMixedConfig, result: dict, *,
             image_processor: Optional[Any] = None) -> str:
    """A finished run's folder (:func:`write_model`'s files, the tokenizer, preprocessor_config.json, run.json,
    manifest.json), written crash-safely: it replaces ``directory`` only once complete."""
    summary = {k: v for k, v in result.items() if k not in ("history", "text_loss", "latent_loss")}
    summary["train_loss"] = [r["loss"] for r in result["history"]["train"]]
    summary["text_loss"] = result.get("text_loss", [])
    summary["latent_loss"] = result.get("latent_loss", [])
    summary["eval_history"] = result["history"].get("eval", [])
    run = {"format": RUN_FORMAT, "method": METHOD, "config": asdict(config), "result": summary,
           "tokenizer": "word" if isinstance(tokenizer, WordTokenizer) else "hf"}
    if not callable(getattr(image_processor, "save_pretrained", None)):
        image_processor = None
    return write_run_checkpoint(directory, lambda folder: write_model(model, folder, config.latent_scale), run,
                                tokenizer, image_processor=image_processor)


def run_method(directory: str, verified: bool = False) -> str:
    """``"modal_mixed"`` or ``"ivtlr"``: which kind of run the folder ``directory`` holds (run.json's ``method``;
    an IVT-LR run's has none), after verifying it (``verified``: the caller just did, and passes the folder
    :func:`~mmlatent.train.checkpoint.resolve_checkpoint` returned). A folder without run.json (a training
    checkpoint) reads as its trainer.json's run config says."""
    path = directory if verified else resolve_checkpoint(directory)
    files = read_manifest(path)["files"]
    if "run.json" in files:
        stored = read_json(path, "run.json")
        return stored.get("method", "ivtlr") if isinstance(stored, dict) else "ivtlr"
    if "trainer.json" in files:
        state = read_json(path, "trainer.json")
        config = state.get("run_config") if isinstance(state, dict) else None
        return config.get("method", "ivtlr") if isinstance(config, dict) else "ivtlr"
    return "ivtlr"


def _read_settings(path: str) -> dict:
    settings = read_settings_file(path, SETTINGS_FILE, SETTINGS_FORMAT, SETTINGS_VERSION, "a Modal-mixed settings file")
    for key in ("modal_mixed", "head"):
        if not isinstance(settings.get(key), dict):
            raise CheckpointError(f"{os.path.join(path, SETTINGS_FILE)}: {key}: expected a JSON object")
    return settings


def load_model(path: str, *, device: torch.device, dtype: torch.dtype = torch.float32,
               base_model: Optional[str] = None, verified: bool = False) -> Tuple[ModalMixedCoT, dict]:
    """(ModalMixedCoT, settings) of a folder :func:`write_model` wrote, verified against its manifest first
    (``verified``: the caller just verified it). ``base_model``: the local checkpoint an adapter folder without
    ``base/`` adapts. A missing or corrupt file, or tensors of other names or shapes, raise
    :class:`CheckpointError` naming the file."""
    from mmlatent.models.ivtlr import saving
    if not verified:
        path = resolve_checkpoint(path, required=(SETTINGS_FILE, HEAD_FILE))
    files = read_manifest(path, required=(SETTINGS_FILE, HEAD_FILE))["files"]
    settings = _read_settings(path)
    where = os.path.join(path, SETTINGS_FILE)
    if settings["weights"] == "full":
        if "config.json" not in files:
            raise CheckpointError(f"{os.path.join(path, 'manifest.json')}: does not list config.json, which a full "
                                  f"model folder must have")
        vlm = saving.load_model_folder(path, dtype=dtype, attn_implementation="sdpa", device=device)
    else:
        for name in saving.ADAPTER_FILES:
            if name not in files:
                raise CheckpointError(f"{os.path.join(path, 'manifest.json')}: does not list {name}, which an "
                                      f"adapter folder must have")
        if settings.get("base") is not None:
            base_model = os.path.join(path, *str(settings["base"]).split("/"))
        if base_model is None:
            raise CheckpointError(f"{where}: an adapter without its base in the folder; the run's model.path "
                                  f"names it")
        base = saving.load_model_folder(base_model, dtype=dtype, attn_implementation="sdpa", device=device)
        saving._resize(base, int(settings["vocab_size"]), where)
        from peft import PeftModel
        try:
            with saving.quiet_progress():
                vlm = PeftModel.from_pretrained(base, path)
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{os.path.join(path, saving.ADAPTER_FILES[1])}: not an adapter of this base "
                                  f"model ({type(err).__name__}: {str(err).strip().splitlines()[-1]})") from None
    try:
        head = LatentDiffusionHead(**settings["head"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: head: {err}") from None
    weights = load_tensors(path, HEAD_FILE, device=str(device))
    check_shapes({k: tuple(v.shape) for k, v in head.state_dict().items()}, weights, os.path.join(path, HEAD_FILE),
                 "tensor")
    head.load_state_dict(weights)
    head.to(device=device, dtype=getattr(torch, settings.get("head_dtype", "torch.float32").replace("torch.", "")))
    options = settings["modal_mixed"]
    try:
        model = ModalMixedCoT(vlm, head, start_token_id=options["start_token_id"],
                              end_token_id=options["end_token_id"], latent_token_id=options["latent_token_id"],
                              num_latents=options["num_latents"], pool_grid=tuple(options["pool_grid"]),
                              diffusion_weight=options["diffusion_weight"], batch_mul=options["batch_mul"],
                              detach_conditions=options["detach_conditions"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: modal_mixed: not settings this version reads ({err})") from None
    return model.eval(), settings


def load_run(directory: str, device: Optional[Union[str, torch.device]] = None
             ) -> Tuple[ModalMixedCoT, Any, ModalMixedConfig, Any]:
    """(ModalMixedCoT, tokenizer, ModalMixedConfig, image processor) of a folder :func:`save_run` wrote, verified
    against its manifest once (a save killed midway is found in its surviving copy)."""
    device = torch.device(device or "cpu")
    path, files, stored, config, tokenizer = open_run(directory, required=("run.json", SETTINGS_FILE, HEAD_FILE),
                                                      config_class=ModalMixedConfig, run_format=RUN_FORMAT,
                                                      method=METHOD)
    model, settings = load_model(path, device=device, dtype=_model_dtype(config, device),
                                 base_model=config.model.get("path"), verified=True)
    if (model.start_token_id, model.end_token_id, model.latent_token_id) != (
            tokenizer.start_latent_id, tokenizer.end_latent_id, tokenizer.latent_id):
        raise CheckpointError(f"{os.path.join(path, SETTINGS_FILE)}: the sketch token ids differ from the saved "
                              f"tokenizer's")
    if "preprocessor_config.json" in files:
        from transformers import AutoImageProcessor
        image_processor = AutoImageProcessor.from_pretrained(path)
    else:
        image_processor = image_processor_for(config, model.vlm)
    return model, tokenizer, config, image_processor


# ------------------------------------------------------------------------------------------------------ evaluation

_FREE_ANSWER = re.compile(r"the\s+answer\s+is\s*[:\n\s]*(.+)", re.IGNORECASE | re.DOTALL)


def answer_correct(text: str, record: Any) -> bool:
    """Strict scoring: the first "the answer is X" of the generated text; X must be the gold letter (a question
    with options) or, without options, the gold answer's text (case, spaces and a final full stop ignored)."""
    if record.options is not None:
        return strict_answer(text) == record.answer
    match = _FREE_ANSWER.search(text)
    if not match:
        return False

    def norm(s: str) -> str:
        return " ".join(s.lower().split()).rstrip(" .")
    return norm(match.group(1)) == norm(record.answer)


def answer_given(text: str, record: Any) -> bool:
    """Whether ``text`` holds an answer the strict parse can read at all (right or wrong): it separates a model
    that answers wrongly from one whose output has lost its format."""
    if record.options is not None:
        return strict_answer(text) is not None
    return _FREE_ANSWER.search(text) is not None


def _rate(correct: int, n: int) -> Tuple[float, float]:
    if not n:
        return float("nan"), float("nan")
    p = correct / n
    return p, math.sqrt(p * (1 - p) / n)


def _by_kind(kinds: Sequence[str], correct: Sequence[bool]) -> Dict[str, dict]:
    out: Dict[str, list] = {}
    for kind, ok in zip(kinds, correct):
        out.setdefault(kind, [0, 0])
        out[kind][0] += bool(ok)
        out[kind][1] += 1
    return {k: dict(zip(("accuracy", "accuracy_stderr"), _rate(c, n)), n=n) for k, (c, n) in sorted(out.items())}


def _generate(model: ModalMixedCoT, tokenizer: Any, config: ModalMixedConfig, batch: dict,
              override: Optional[str], generator: Optional[torch.Generator]):
    sampler = config.sampler
    return model.generate(batch["input_ids"], batch["attention_mask"], pixel_values=batch.get("pixel_values"),
                          image_grid_thw=batch.get("image_grid_thw"), max_new_tokens=config.max_new_tokens,
                          steps=sampler.get("steps", 20), schedule=sampler.get("schedule", "ddim"),
                          cfg_scale=float(sampler.get("cfg_scale", 1.0)), temperature=0.0, do_sample=False,
                          generator=generator, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                          latent_override=override)


def evaluate(model: ModalMixedCoT, tokenizer: Any, image_processor: Any, config: ModalMixedConfig, records: list,
             batch_size: int = 64, progress: bool = False, ablation: bool = True,
             world: Optional[World] = None) -> dict:
    """Greedy, deterministic evaluation (text argmax; the head's DDIM from x_T = 0) on ``records``; with a
    data-parallel ``world`` every rank generates its share of them
    (:func:`~mmlatent.train.distributed.map_shards`) and returns the metrics of them all. The noise ablation draws
    its noise per rank, so only it depends on the world size.

    Returns ``accuracy`` and ``accuracy_stderr`` (strict parse, :func:`answer_correct`), ``accuracy_by_kind``
    ({kind: {accuracy, accuracy_stderr, n}}), ``answered`` (the fraction with any parseable answer,
    :func:`answer_given`), ``latency_per_sample_s`` and ``tokens_per_answer`` (every generated
    position up to eos: text, START, latents, END), ``sketches_per_answer``; in modal_mixed mode also the
    reconstruction of the held-out sketches: ``latent_mse`` and ``latent_cosine`` (generated vs. true pooled
    latents, sketch i of a sample matched to its i-th generated sketch; MSE over every element, cosine per latent
    vector, both averaged over the matched sketches), ``latent_mse_of_zeros`` (what all-zero latents would score),
    ``sketches_matched``, ``sketches_missing`` (held-out sketches without a generated one) and ``sketches_extra``
    (generated past the record's count); and with ``ablation`` the dummy-latent ablation: ``ablation`` =
    {"zeros" | "noise": {accuracy, accuracy_stderr, accuracy_by_kind, accuracy_drop, answered,
    tokens_per_answer}}, generated again with every latent replaced by zeros or by Gaussian noise of the latent's
    norm before it is fed back. Other modes give None for the reconstruction and ablation keys. ``outputs``: each
    record's generated text and correctness."""
    from tqdm.auto import tqdm

    from .distributed import map_shards
    make = collator(config, tokenizer, image_processor, prompt_only=True)
    device = next(model.parameters()).device
    sketching = config.mode == "modal_mixed"
    seed = config.train.get("seed", 0)
    overrides = OVERRIDES if sketching and ablation else ()

    def answers(shard: list) -> List[Dict[str, Any]]:  # what each record's generations scored, in shard order
        rows: List[Dict[str, Any]] = [dict(ablated={}) for _ in shard]
        chunks = range(0, len(shard), batch_size)
        runs = [(None, f"eval {config.name}")] + [(o, f"eval {config.name} (latents: {o})") for o in overrides]
        for override, label in runs:
            generator = torch.Generator(device).manual_seed(seed) if override == "noise" else None
            for start in tqdm(chunks, disable=not progress, desc=label):
                chunk = shard[start:start + batch_size]
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in make(chunk).items()}
                t0 = time.perf_counter()
                generated = _generate(model, tokenizer, config, batch, override, generator)
                seconds = (time.perf_counter() - t0) / len(chunk)
                for b, (record, seq) in enumerate(zip(chunk, generated.sequences.tolist())):
                    ids = seq[:seq.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in seq else seq
                    text = tokenizer.decode(ids)
                    row, ok, given = rows[start + b], answer_correct(text, record), answer_given(text, record)
                    if override is not None:
                        row["ablated"][override] = (ok, given, len(ids))
                        continue
                    row.update(text=text, ok=ok, answered=given, tokens=len(ids), seconds=seconds,
                               sketches=len(generated.latents[b]), errors=[], cosines=[], zero_errors=[],
                               missing=0, extra=0)
                if override is None and sketching and "sketches_per_sample" in batch:
                    per_sample = batch["sketches_per_sample"].tolist()
                    true = sketch_targets(model, batch) if sum(per_sample) else None
                    first = 0
                    for b, count in enumerate(per_sample):
                        row = rows[start + b]
                        made = generated.latents[b].float() / config.latent_scale
                        matched = min(count, made.shape[0])
                        for i in range(matched):
                            target = true[first + i].float()
                            row["errors"].append(float(((made[i] - target) ** 2).mean()))
                            row["cosines"].append(float(torch.nn.functional.cosine_similarity(
                                made[i], target, dim=-1).mean()))
                            row["zero_errors"].append(float((target ** 2).mean()))
                        row["missing"] += count - matched
                        row["extra"] += made.shape[0] - matched
                        first += count
        return rows

    was_training = model.training
    model.eval()
    try:
        rows = map_shards(answers, records, world, "the evaluation")
    finally:
        model.train(was_training)
    correct = [row["ok"] for row in rows]
    kinds = [str(record.meta.get("kind", "all")) for record in records]
    outputs = [{"id": record.id, "kind": kind, "gold": record.answer, "output": row["text"], "correct": bool(row["ok"]),
                "sketches": row["sketches"]} for record, kind, row in zip(records, kinds, rows)]
    answered, tokens = sum(row["answered"] for row in rows), sum(row["tokens"] for row in rows)
    sketches, seconds = sum(row["sketches"] for row in rows), sum(row["seconds"] for row in rows)
    errors = [e for row in rows for e in row["errors"]]
    cosines = [c for row in rows for c in row["cosines"]]
    zero_errors = [e for row in rows for e in row["zero_errors"]]
    missing, extra = sum(row["missing"] for row in rows), sum(row["extra"] for row in rows)
    n = len(records)
    accuracy, stderr = _rate(sum(correct), n)
    metrics = dict(name=config.name, method=METHOD, mode=config.mode, n=n, accuracy=accuracy, accuracy_stderr=stderr,
                   accuracy_by_kind=_by_kind(kinds, correct), answered=answered / n if n else float("nan"),
                   latency_per_sample_s=seconds / n if n else float("nan"),
                   tokens_per_answer=tokens / n if n else float("nan"),
                   sketches_per_answer=sketches / n if n else float("nan"),
                   latent_mse=None, latent_cosine=None, latent_mse_of_zeros=None, sketches_matched=None,
                   sketches_missing=None, sketches_extra=None, ablation=None, outputs=outputs)
    if sketching:
        metrics.update(latent_mse=float(np.mean(errors)) if errors else float("nan"),
                       latent_cosine=float(np.mean(cosines)) if cosines else float("nan"),
                       latent_mse_of_zeros=float(np.mean(zero_errors)) if zero_errors else float("nan"),
                       sketches_matched=len(errors), sketches_missing=missing, sketches_extra=extra)
    if overrides:
        metrics["ablation"] = {}
        for override in overrides:
            oks = [row["ablated"][override][0] for row in rows]
            rate, err = _rate(sum(oks), n)
            metrics["ablation"][override] = dict(
                accuracy=rate, accuracy_stderr=err, accuracy_by_kind=_by_kind(kinds, oks),
                accuracy_drop=accuracy - rate, answered=sum(row["ablated"][override][1] for row in rows) / n,
                tokens_per_answer=sum(row["ablated"][override][2] for row in rows) / n)
    return metrics


def evaluate_result(result: dict, config: ModalMixedConfig, progress: bool = False,
                    world: Optional[World] = None) -> dict:
    """:func:`evaluate` of what :func:`train` returned (its model, tokenizer and image processor) on the run's
    held-out records (shared out over a data-parallel ``world``)."""
    return evaluate(result["model"], result["tokenizer"], result["image_processor"], config, result["eval_records"],
                    progress=progress, world=world)


def table_row(metrics: dict, source: str, train_seconds: Optional[float] = None) -> dict:
    """One row of :func:`markdown_table`: the summary of :func:`evaluate`'s metrics (no per-question outputs),
    with where the model came from and how long it trained."""
    keep = ("name", "mode", "n", "accuracy", "accuracy_stderr", "accuracy_by_kind", "latency_per_sample_s",
            "tokens_per_answer", "answered", "latent_mse", "latent_mse_of_zeros", "latent_cosine", "ablation")
    return dict({k: metrics[k] for k in keep}, source=source, train_seconds=train_seconds)


def markdown_table(rows: Sequence[dict]) -> str:
    """The Modal-mixed runs' table: accuracy (strict) with its standard error, per kind, the ablation (accuracy,
    and how many answers the strict parse could read at all), the reconstruction of the held-out sketches, cost
    per answer, training time."""
    def pct(p, e=None):
        return "" if p is None else f"{100 * p:.1f}%" + ("" if e is None else f" ± {100 * e:.1f}")
    lines = ["| variant | source | n | accuracy (strict) | by kind | latents -> zeros | latents -> noise | "
             "sketch MSE (zeros) | cosine | ms / answer | tokens / answer | trained in |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ablation = r["ablation"] or {}

        def dummy(override):
            result = ablation.get(override)
            return "" if result is None else f"{pct(result['accuracy'])} ({pct(result['answered'])} answered)"
        kinds = ", ".join(f"{k} {100 * v['accuracy']:.0f}%" for k, v in r["accuracy_by_kind"].items())
        mse = "" if r["latent_mse"] is None else f"{r['latent_mse']:.2e} ({r['latent_mse_of_zeros']:.2e})"
        cosine = "" if r["latent_cosine"] is None else f"{r['latent_cosine']:.3f}"
        trained = "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f} s"
        lines.append(f"| {r['name']} | {r['source']} | {r['n']} | {pct(r['accuracy'], r['accuracy_stderr'])} | "
                     f"{kinds} | {dummy('zeros')} | {dummy('noise')} | {mse} | {cosine} | "
                     f"{1000 * r['latency_per_sample_s']:.1f} | {r['tokens_per_answer']:.1f} | {trained} |")
    return "\n".join(lines) + "\n"


def summary_lines(metrics: dict, train_seconds: Optional[float] = None) -> List[str]:
    """The printed summary of :func:`evaluate`'s metrics: overall and per-kind accuracy with standard errors,
    latency and tokens per answer, the reconstruction error and the ablation."""
    pct = lambda p, e: f"{100 * p:.1f}% +- {100 * e:.1f}"  # noqa: E731
    line = (f"{metrics['name']}: accuracy {pct(metrics['accuracy'], metrics['accuracy_stderr'])} (n={metrics['n']}, "
            f"{metrics['mode']}), {1000 * metrics['latency_per_sample_s']:.1f} ms and "
            f"{metrics['tokens_per_answer']:.1f} tokens per answer, {100 * metrics['answered']:.1f}% answered")
    if train_seconds is not None:
        line += f"; trained in {train_seconds:.0f} s"
    lines = [line, "  by kind: " + ", ".join(f"{k} {pct(v['accuracy'], v['accuracy_stderr'])} (n={v['n']})"
                                             for k, v in metrics["accuracy_by_kind"].items())]
    if metrics.get("latent_mse") is not None:
        lines.append(f"  held-out sketches: latent MSE {metrics['latent_mse']:.4g} (all-zero latents: "
                     f"{metrics['latent_mse_of_zeros']:.4g}), cosine {metrics['latent_cosine']:.3f}; "
                     f"{metrics['sketches_matched']} matched, {metrics['sketches_missing']} not generated, "
                     f"{metrics['sketches_extra']} extra; {metrics['sketches_per_answer']:.2f} sketches per answer")
    for override, result in (metrics.get("ablation") or {}).items():
        lines.append(f"  ablation, latents -> {override}: accuracy {pct(result['accuracy'], result['accuracy_stderr'])}"
                     f" ({100 * result['accuracy_drop']:.1f} points below Modal-mixed; {100 * result['answered']:.1f}%"
                     f" answered, {result['tokens_per_answer']:.1f} tokens per answer); by kind: "
                     + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in result["accuracy_by_kind"].items()))
    return lines


__all__ = ["ModalMixedConfig", "RUN_CONFIG", "build_data", "build_model", "build_vlm", "build_head", "train",
           "evaluate", "evaluate_result", "save_run", "load_run", "write_model", "load_model", "run_method",
           "joint_loss", "sketch_targets", "answer_correct", "answer_given", "summary_lines", "table_row",
           "markdown_table", "head_config", "METHOD"]
