"""IVT-LR training runs from a config file: the progressive curriculum, the no-CoT and explicit-CoT variants, the
no-image control, evaluation (strict accuracy and, labelled separately, the public code's lenient scoring) and
self-contained checkpoints: a finished run's folder is a standard Hugging Face folder (a full model) or PEFT
adapter folder (LoRA), with the tokenizer, the image processor and the run's config beside the model's files."""
from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from mmlatent.data import (MODES, VLMCollator, WordTokenizer, lenient_correct, prompt_text, strict_answer,
                           synthetic)
from mmlatent.data.records import Record
from mmlatent.models import IVTLR
from mmlatent.models.backbones import VLMBackbone
from mmlatent.models.ivtlr.generation import GREEDY_OPTIONS
from mmlatent.models import tiny as tiny_models

from .checkpoint import RUN_FILES, CheckpointError, check_shapes, load_tensors, read_manifest, write_run_checkpoint

# what run.json records since runs are saved as Hugging Face / PEFT folders (absent: the first format, a
# model.safetensors of model.state_dict() and tokenizer.json, still read)
RUN_FORMAT = 2
from .curriculum import Curriculum
from .distributed import World
from .loop import EpochBatches, TrainConfig, Trainer, check_int, label_tokens
from .methods import (check_data_keys, check_kind_weights, check_model_spec, check_train_options, from_mapping,
                      open_run, prepare_trainable, read_yaml)


@dataclass
class RunConfig:
    """One training run (YAML keys are these fields; ``train`` holds :class:`TrainConfig` fields)."""

    name: str = "run"
    mode: str = "ivtlr"  # ivtlr | cot | no_cot
    model: Dict = field(default_factory=lambda: {"tiny_qwen2_vl": {}})
    data: Dict = field(default_factory=lambda: {"synthetic": {"n_train": 2000, "n_eval": 400, "seed": 0}})
    epochs: int = 4
    epochs_per_stage: int = 1
    max_latent_steps: int = 3
    batch_size: int = 16
    k: int = 1
    lora: Optional[Dict] = None
    freeze_vision: bool = True
    reset_optimizer_per_stage: bool = False
    no_image: bool = False
    max_new_tokens: int = 48
    eval_samples: int = 64  # held-out questions of the periodic evaluation (train.eval_every steps)
    train: Dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("epochs", "epochs_per_stage", "batch_size", "k", "max_new_tokens", "eval_samples"):
            check_int(name, getattr(self, name))
        check_int("max_latent_steps", self.max_latent_steps, minimum=0)
        for name in ("freeze_vision", "reset_optimizer_per_stage", "no_image"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        _one_kind("model", self.model, MODEL_KINDS)
        check_model_spec(self.model)
        _one_kind("data", self.data, DATA_KEYS)
        _check_data(self.data)
        if self.lora is not None:
            _check_lora(self.lora)
        check_train_options(self.train)

    @classmethod
    def load(cls, path: str) -> "RunConfig":
        """Reads a YAML config; every problem (no such file, invalid YAML with its line, unknown keys, a value
        out of range) is a ValueError or FileNotFoundError naming the file and the key
        (:mod:`mmlatent.train.methods`)."""
        return from_mapping(cls, read_yaml(path), path)


MODEL_KINDS = ("tiny_qwen2_vl", "tiny_chameleon", "qwen2_vl_7b_shapes", "path")
DATA_KEYS = {"synthetic": {"n_train", "n_eval", "seed", "kinds", "weights", "image_size", "vocab_size"},
             "scienceqa": {"root", "train_split", "eval_split", "skip_bad"},
             "m3cot": {"train", "eval", "skip_bad"}}
DATA_REQUIRED = {"scienceqa": ("root",), "m3cot": ("train", "eval")}


RUN_CONFIG = RunConfig  # the config class of this method's runs (mmlatent.train.methods)


def _check_data(data: dict) -> None:
    kind, spec = check_data_keys(data, DATA_KEYS, DATA_REQUIRED)
    for key, value in spec.items():
        name = f"data.{kind}.{key}"
        if key in ("n_train", "n_eval", "vocab_size"):
            check_int(name, value)
        elif key == "seed":
            check_int(name, value, minimum=0)
        elif key == "skip_bad":
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected true or false, got {value!r}")
        elif key in ("root", "train", "eval", "train_split", "eval_split"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        elif key == "image_size":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"{name}: expected [height, width], got {value!r}")
            for item in value:
                check_int(name, item)
        elif key == "kinds":
            if not isinstance(value, (list, tuple)) or not value or any(k not in synthetic.KINDS for k in value):
                raise ValueError(f"{name}: expected a non-empty list of {', '.join(synthetic.KINDS)}, got {value!r}")
        elif key == "weights":
            check_kind_weights(name, value, spec.get("kinds", synthetic.KINDS))


def _check_lora(lora) -> None:
    if not isinstance(lora, dict):
        raise ValueError(f"lora: expected a mapping of peft.LoraConfig options or null, got {lora!r}")
    try:
        import peft
    except ImportError:
        raise ValueError("lora: needs peft, which is not installed (pip install 'mmlatent[lora]')") from None
    known = {f.name for f in fields(peft.LoraConfig)}
    unknown = sorted(set(lora) - known)
    if unknown:
        raise ValueError(f"lora: unknown keys {unknown}; peft.LoraConfig has no such field")
    if "r" in lora:
        check_int("lora.r", lora["r"])
    for key in ("lora_alpha", "lora_dropout"):
        value = lora.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                or (key == "lora_dropout" and value >= 1):
            bound = "in [0, 1)" if key == "lora_dropout" else ">= 0"
            raise ValueError(f"lora.{key}: expected a number {bound}, got {value!r}")
    modules = lora.get("target_modules", [])
    if not isinstance(modules, (list, tuple)) or any(not isinstance(m, str) or not m for m in modules):
        raise ValueError(f"lora.target_modules: expected a list of module names, got {modules!r}")


def _one_kind(name: str, value, kinds) -> None:
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError(f"{name}: expected one entry {{kind: settings}} with kind one of {', '.join(kinds)}, "
                         f"got {value!r}")
    kind = next(iter(value))
    if kind not in kinds:
        raise ValueError(f"{name}: unknown kind {kind!r}; expected one of {', '.join(kinds)}")


# ------------------------------------------------------------------------------------------------------ building

def build_data(config: RunConfig) -> Tuple[Any, List[Record], List[Record]]:
    """(tokenizer, train records, eval records)."""
    if "synthetic" in config.data:
        spec = dict(config.data["synthetic"])
        kinds = tuple(spec.get("kinds", synthetic.KINDS))
        weights = spec.get("weights")
        train = synthetic.generate(spec.get("n_train", 2000), seed=spec.get("seed", 0), kinds=kinds, weights=weights)
        evaluation = synthetic.generate(spec.get("n_eval", 400), seed=spec.get("seed", 0), kinds=kinds,
                                        weights=weights, split="test")
        if "image_size" in spec:  # nearest-neighbour upscaling: real-size image-token counts on the same task
            train, evaluation = (_resized(records, spec["image_size"]) for records in (train, evaluation))
        tokenizer = WordTokenizer(synthetic.vocabulary(), size=spec.get("vocab_size"))
    else:
        from mmlatent.data import readers
        from mmlatent.data.tokenizer import HFTokenizer
        if "path" not in config.model:
            raise ValueError("model: a real dataset needs a model loaded from a local path (model: {path: ...}), "
                             "whose tokenizer reads its text")
        from transformers import AutoTokenizer
        kind, spec = next(iter(config.data.items()))
        train, evaluation = readers.load(kind, spec)
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(config.model["path"]))
    if config.no_image:  # the control that shows whether the task needs the image
        train, evaluation = _blank(train), _blank(evaluation)
    return tokenizer, train, evaluation


def _resized(records: List[Record], size) -> List[Record]:
    height, width = size
    out = []
    for r in records:
        resized = copy.copy(r)
        rows = np.arange(height) * r.image.shape[0] // height
        cols = np.arange(width) * r.image.shape[1] // width
        resized.image = r.image[rows][:, cols]
        out.append(resized)
    return out


def _blank(records: List[Record]) -> List[Record]:
    out = []
    for r in records:
        blank = copy.copy(r)
        blank.image = np.zeros_like(r.image) if isinstance(r.image, np.ndarray) else r.image
        out.append(blank)
    return out


def _model_dtype(config: RunConfig, device) -> torch.dtype:
    """The dtype a run's model is built in: bf16 on a GPU for a local checkpoint and the 7B-shaped model, else
    float32 (the tiny models)."""
    kind = next(iter(config.model))
    return torch.bfloat16 if kind in ("path", "qwen2_vl_7b_shapes") and device.type == "cuda" else torch.float32


def build_model(config: RunConfig, vocab_size: int, device: torch.device) -> nn.Module:
    """The run's model, on ``device``: built from its config kind (seeded by the caller), the vision tower frozen
    when asked, LoRA adapters on the language model's layers when ``config.lora`` is set."""
    (kind, spec), = config.model.items()
    spec = dict(spec) if isinstance(spec, dict) else spec
    if kind == "tiny_qwen2_vl":
        model = tiny_models.tiny_qwen2_vl(vocab=vocab_size, device=device, **spec)
    elif kind == "tiny_chameleon":  # word ids below its image-code ids; its own image token ids (collator)
        model = tiny_models.tiny_chameleon(text_vocab=max(vocab_size, spec.pop("text_vocab", 200)), device=device,
                                           **spec)
    elif kind == "qwen2_vl_7b_shapes":  # random weights, for memory and speed measurements on a GPU
        model = tiny_models.qwen2_vl_7b_shapes(device=device, dtype=_model_dtype(config, device), **(spec or {}))
        if vocab_size != model.config.text_config.vocab_size:
            raise ValueError(f"data: the tokenizer has {vocab_size} tokens, the 7B-shaped model "
                             f"{model.config.text_config.vocab_size}; set data.synthetic.vocab_size to match")
    elif kind == "path":  # a local checkpoint (Qwen2-VL, Qwen2.5-VL)
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained(spec, attn_implementation="sdpa",
                                                            dtype=_model_dtype(config, device)).to(device)
        if vocab_size > model.get_input_embeddings().num_embeddings:  # IVT-LR's latent tokens were added
            model.resize_token_embeddings(vocab_size)
    else:
        raise ValueError(f"model: unknown kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    return prepare_trainable(model, freeze_vision=config.freeze_vision, lora=config.lora)


def curriculum(config: RunConfig) -> Curriculum:
    return Curriculum(config.mode, config.epochs_per_stage, config.max_latent_steps,
                      config.reset_optimizer_per_stage)


def collator(config: RunConfig, tokenizer, image_processor, stage: int, prompt_only: bool = False,
             image_token_ids=None) -> VLMCollator:
    """``stage``: the curriculum's stage, the number of latent steps in each prompt."""
    return VLMCollator(tokenizer, image_processor, mode=config.mode, stage=stage,
                       max_latent_steps=config.max_latent_steps, prompt_only=prompt_only,
                       image_token_ids=image_token_ids)


def final_stage(config: RunConfig) -> int:
    return curriculum(config).final_stage(config.epochs)


# ------------------------------------------------------------------------------------------------------ running

def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's global generators (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: RunConfig, device: Optional[Union[str, torch.device]] = None, resume: Optional[str] = None,
          progress: bool = True, until: Optional[int] = None, allow_config_change: bool = False) -> dict:
    """Trains one run. A run that reaches its last step writes ``<output_dir>/final`` (:func:`save_run`: the model
    as a Hugging Face or PEFT folder, the tokenizer, the image processor, run.json, manifest.json); one stopped
    early by ``until`` writes ``<output_dir>/checkpoint-<step>`` instead, which ``resume`` continues. Everything
    random (model initialisation, LoRA adapters, resized embedding rows) is created after seeding with
    ``train.seed``, so two runs of one config are identical.
    Returns the trainer history (and ``completed``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_options = TrainConfig(**dict({"max_steps": 1}, **config.train))  # checks the options before any work
    seed_everything(train_options.seed)
    tokenizer, train_records, eval_records = build_data(config)
    model = build_model(config, len(tokenizer), device)
    image_processor = _image_processor(config, model)
    wrapper = IVTLR(model, tokenizer.latent_id, k=config.k)
    stages = curriculum(config)
    collators = {}

    def collate(records, epoch):
        stage = stages.stage(epoch)
        if stage not in collators:
            collators[stage] = collator(config, tokenizer, image_processor, stage,
                                        image_token_ids=wrapper.backbone.collator_image_token_ids())
        return collators[stage](records)

    batches = EpochBatches(train_records, config.batch_size, collate, seed=train_options.seed)
    options = dict(config.train)
    options.setdefault("max_steps", max(1, config.epochs * batches.per_epoch // options.get("grad_accum", 1)))
    train_config = TrainConfig(**options)

    def on_epoch(epoch, previous):
        # the stage of the previous epoch comes from the trainer's saved epoch tracker, so a resumed run resets
        # the optimizer at exactly the boundaries an uninterrupted one does
        if stages.resets_optimizer(epoch, previous):
            trainer.reset_optimizer()

    def loss_fn(m, batch):
        return wrapper(**batch).loss

    def eval_fn(_model):  # periodic evaluation on the first held-out questions, at the current stage
        metrics = evaluate(wrapper, tokenizer, image_processor, config, eval_records[:config.eval_samples],
                           stage=stages.stage(trainer.epoch), world=trainer.world)
        return {k: metrics[k] for k in ("accuracy", "accuracy_stderr", "stage", "n")}

    train_config.progress = progress and train_config.progress
    trainer = Trainer(model, loss_fn, batches, train_config, on_epoch=on_epoch, describe=config.name,
                      eval_fn=eval_fn, run_config=dict(asdict(config), train=asdict(train_config)),
                      count_items=lambda batch: label_tokens(batch["labels"]))
    from .methods import finish_run, fit_run
    summary = fit_run(trainer, [], resume=resume, allow_config_change=allow_config_change, until=until)
    summary.pop("loss_parts")
    result = dict(summary, name=config.name, mode=config.mode, stage=final_stage(config), device=str(device))

    def save_final(trained):  # FSDP2's export is a plain copy of the model: wrap it as the run's wrapper was
        saved = wrapper if trained is model else IVTLR(trained, tokenizer.latent_id, k=config.k)
        return save_run(os.path.join(train_config.output_dir, "final"), saved, tokenizer, config, result,
                        image_processor=image_processor)

    checkpoint = finish_run(trainer, train_config.output_dir, save_final)
    if checkpoint:
        result["checkpoint"] = checkpoint
    return dict(result, model=model, wrapper=wrapper, tokenizer=tokenizer, eval_records=eval_records,
                image_processor=image_processor)


def save_run(directory: str, model: nn.Module, tokenizer: Any, config: RunConfig, result: dict, *,
             image_processor: Optional[Any] = None) -> str:
    """A finished run's folder, self-contained and verified, replacing ``directory`` only once complete
    (:func:`mmlatent.train.checkpoint.write_run_checkpoint`). ``model``: the run's :class:`IVTLR` wrapper (its
    latent token id, k and position mode are saved), or the model itself (then: the tokenizer's latent id,
    ``config.k``, linear positions).

    Layout (:mod:`mmlatent.models.ivtlr.saving`): the model as ``save_pretrained`` writes it (config.json,
    model.safetensors, generation_config.json), or with LoRA as PEFT writes it (adapter_config.json,
    adapter_model.safetensors; the base model in ``base/`` when it was built from a config, the embedding matrices
    in the adapter file when the vocabulary was resized past ``model.path``'s), ivtlr_config.json, the tokenizer
    (word_tokenizer.json, or the Hugging Face tokenizer's files), preprocessor_config.json (the image processor,
    when it is a transformers one), run.json (config, summary, which tokenizer was saved) and manifest.json."""
    from mmlatent.models.ivtlr import saving
    from mmlatent.models.ivtlr.base import IVTLRBase
    if isinstance(model, IVTLRBase):
        vlm, settings = model.vlm, dict(latent_token_id=model.latent_token_id, k=model.k,
                                        position_mode=model.position_mode)
    else:
        vlm, settings = model, dict(latent_token_id=tokenizer.latent_id, k=config.k, position_mode="linear")
    summary = {k: v for k, v in result.items() if k != "history"}
    summary["train_loss"] = [r["loss"] for r in result["history"]["train"]]
    run = {"format": RUN_FORMAT, "config": asdict(config), "result": summary,
           "tokenizer": "word" if isinstance(tokenizer, WordTokenizer) else "hf"}
    if not callable(getattr(image_processor, "save_pretrained", None)):
        image_processor = None  # mmlatent's own (Chameleon's pixels to VQ tokens) is rebuilt from the model config
    return write_run_checkpoint(directory, lambda folder: saving.write_pretrained(vlm, folder, **settings), run,
                                tokenizer, image_processor=image_processor)


def load_run(directory: str, device: Optional[Union[str, torch.device]] = None) -> Tuple[IVTLR, Any, RunConfig, Any]:
    """(IVTLR wrapper, tokenizer, RunConfig, image processor) from a folder written by :func:`save_run`, or by the
    first format (model.safetensors of the model's state dict, tokenizer.json).

    The folder is verified against its manifest (a save killed midway is found in its surviving copy). The
    tokenizer is the one saved: a word tokenizer, or the Hugging Face tokenizer's files. A LoRA run's base model
    comes from ``base/`` or from ``model.path``. A corrupt file, a config this version cannot read, or tensors
    whose names or shapes differ from the model's raise :class:`CheckpointError` naming the file (and the tensor
    with both shapes)."""
    from mmlatent.models.ivtlr import saving
    device = torch.device(device or "cpu")
    path, files, stored, config, tokenizer = open_run(directory, required=RUN_FILES, config_class=RunConfig,
                                                      run_format=RUN_FORMAT)
    if saving.IVTLR_CONFIG_FILE in files:
        # a LoRA run on a local checkpoint adapts model.path, which is not in the folder
        base = config.model["path"] if config.lora and "path" in config.model and "base/config.json" not in files \
            else None
        vlm, settings = saving.load_pretrained(path, base_model=base, device=device,
                                               dtype=_model_dtype(config, device), attn_implementation="sdpa",
                                               verified=True)
        wrapper = IVTLR(vlm, settings["latent_token_id"], k=settings["k"], position_mode=settings["position_mode"])
        if wrapper.latent_token_id != tokenizer.latent_id:
            raise CheckpointError(f"{os.path.join(path, saving.IVTLR_CONFIG_FILE)}: latent_token_id "
                                  f"{wrapper.latent_token_id}, but the saved tokenizer's latent token is "
                                  f"{tokenizer.latent_id}")
    else:
        wrapper = _load_first_format(path, files, config, tokenizer, device)
    wrapper.vlm.eval()
    if "preprocessor_config.json" in files:
        from transformers import AutoImageProcessor
        image_processor = AutoImageProcessor.from_pretrained(path)
    else:
        image_processor = _image_processor(config, wrapper.vlm)
    return wrapper, tokenizer, config, image_processor


def _saved_tokenizer(path: str, files, kind: Optional[str]):
    """The tokenizer the folder holds: run.json says which (``"word"`` or ``"hf"``); a folder of the first
    format is told by its tokenizer.json, a word tokenizer's or a Hugging Face one."""
    from mmlatent.data.tokenizer import (LEGACY_WORD_TOKENIZER_FILE, WORD_TOKENIZER_FILE, HFTokenizer,
                                         is_word_tokenizer_file)
    if kind is None:
        legacy = os.path.join(path, LEGACY_WORD_TOKENIZER_FILE)
        kind = "word" if WORD_TOKENIZER_FILE in files or (LEGACY_WORD_TOKENIZER_FILE in files
                                                         and is_word_tokenizer_file(legacy)) else "hf"
    if kind == "word":
        name = WORD_TOKENIZER_FILE if WORD_TOKENIZER_FILE in files else LEGACY_WORD_TOKENIZER_FILE
        read_manifest(path, required=(name,))  # its hash was verified with the rest
        try:
            return WordTokenizer.load(os.path.join(path, name))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{os.path.join(path, name)}: not a word tokenizer this version reads ({err})") \
                from None
    if kind not in ("hf", "hf-text"):
        raise CheckpointError(f"{os.path.join(path, 'run.json')}: tokenizer: expected 'word', 'hf' or 'hf-text', got "
                              f"{kind!r}")
    from transformers import AutoTokenizer
    if not any(n in files for n in ("tokenizer.json", "tokenizer_config.json")):
        read_manifest(path, required=("tokenizer_config.json",))
    try:
        if kind == "hf-text":  # a seq2seq model's own tokenizer, without the latent tokens
            from .dpmm import TextTokenizer
            return TextTokenizer(AutoTokenizer.from_pretrained(path))
        return HFTokenizer(AutoTokenizer.from_pretrained(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: the saved Hugging Face tokenizer does not load ({type(err).__name__}: "
                              f"{err})") from None


def _load_first_format(path: str, files, config: RunConfig, tokenizer, device) -> IVTLR:
    """The first format's model: built from the run config, its model.safetensors (the state dict, or with LoRA
    the adapters and resized embeddings) loaded over it."""
    read_manifest(path, required=("model.safetensors",))
    model = build_model(config, len(tokenizer), device)
    weights = load_tensors(path, "model.safetensors", device=str(device))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.lora:  # adapters (and resized embeddings) only: every stored tensor must exist with its shape
        expected = {k: expected.get(k, ("<not in the model>",)) for k in weights}
    check_shapes(expected, weights, os.path.join(path, "model.safetensors"), "tensor")
    model.load_state_dict(weights, strict=not config.lora)
    return IVTLR(model, tokenizer.latent_id, k=config.k)


def _image_processor(config: RunConfig, model):
    """A local checkpoint's own image processor (its normalisation), else one built from the model's config (the
    tiny models, and a model folder saved without a preprocessor_config.json)."""
    if "path" in config.model and os.path.isfile(os.path.join(config.model["path"], "preprocessor_config.json")):
        from transformers import AutoImageProcessor
        return AutoImageProcessor.from_pretrained(config.model["path"])
    return VLMBackbone(model).image_processor()


def evaluate(wrapper: IVTLR, tokenizer: Any, image_processor: Any, config: RunConfig, records: List[Record],
             batch_size: int = 32, stage: Optional[int] = None, progress: bool = False,
             world: Optional[World] = None) -> dict:
    """Accuracy with the strict parse (the first "the answer is X" of the generated text must be the gold
    letter), the public code's lenient scoring reported separately, latency and generated tokens per sample.
    Decoding is greedy up to ``config.max_new_tokens`` or the tokenizer's EOS, as the public code decodes, whatever
    sampling or penalties the model's ``generation_config`` sets. With a data-parallel ``world`` every rank
    generates its share of ``records`` (:func:`~mmlatent.train.distributed.map_shards`) and every rank returns
    the metrics of them all."""
    from tqdm.auto import tqdm

    from .distributed import map_shards
    stage = final_stage(config) if stage is None else stage
    make = collator(config, tokenizer, image_processor, stage, prompt_only=True,
                    image_token_ids=wrapper.backbone.collator_image_token_ids())
    device = next(wrapper.parameters()).device

    def answers(shard: List[Record]) -> List[Tuple[List[int], float]]:  # (generated ids, seconds) per record
        out = []
        for start in tqdm(range(0, len(shard), batch_size), disable=not progress, desc=f"eval {config.name}"):
            chunk = shard[start:start + batch_size]
            batch = {k: v.to(device) for k, v in make(chunk).items()}
            t0 = time.perf_counter()
            with torch.no_grad():
                generated = wrapper.generate(**batch, **GREEDY_OPTIONS, max_new_tokens=config.max_new_tokens,
                                             eos_token_id=tokenizer.eos_id)
            seconds = (time.perf_counter() - t0) / len(chunk)
            for row in generated.tolist():
                out.append((row[:row.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in row else row, seconds))
        return out

    correct, lenient, tokens, seconds, per_kind, outputs = 0, 0, 0, 0.0, {}, []
    for record, (ids, spent) in zip(records, map_shards(answers, records, world, "the evaluation")):
        text = tokenizer.decode(ids)
        ok = strict_answer(text) == record.answer_letter
        correct += ok
        lenient += lenient_correct(tokenizer.decode(tokenizer.encode(prompt_text(record))) + " " + text,
                                   record.answer_letter)
        tokens += len(ids)
        seconds += spent
        kind = record.meta.get("kind", "all")
        per_kind.setdefault(kind, [0, 0])
        per_kind[kind][0] += ok
        per_kind[kind][1] += 1
        outputs.append({"id": record.id, "gold": record.answer_letter, "output": text, "correct": bool(ok)})
    n = len(records)
    accuracy = correct / n if n else float("nan")
    return dict(name=config.name, mode=config.mode, stage=stage, n=n, accuracy=accuracy,
                accuracy_stderr=math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan"),
                lenient_accuracy_public_code=lenient / n if n else float("nan"),
                latency_per_sample_s=seconds / n if n else float("nan"),
                tokens_per_answer=tokens / n if n else float("nan"),
                accuracy_by_kind={k: v[0] / v[1] for k, v in per_kind.items()}, outputs=outputs)


def table_row(metrics: dict, source: str, train_seconds: Optional[float] = None) -> dict:
    """One row of :func:`markdown_table`: the summary of :func:`evaluate`'s metrics (no per-question outputs),
    with where the model came from and how long it trained."""
    keep = ("name", "mode", "stage", "n", "accuracy", "accuracy_stderr", "lenient_accuracy_public_code",
            "latency_per_sample_s", "tokens_per_answer", "accuracy_by_kind")
    return dict({k: metrics[k] for k in keep}, source=source, train_seconds=train_seconds)


def markdown_table(rows: Sequence[dict]) -> str:
    """The IVT-LR runs' table: strict and lenient accuracy, latency and tokens per answer, training time."""
    lines = ["| variant | source | n | accuracy (strict) | lenient (public code) | ms / answer | tokens / answer |"
             " trained in |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        trained = "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f} s"
        lines.append(f"| {r['name']} | {r['source']} | {r['n']} | {100 * r['accuracy']:.1f}% "
                     f"± {100 * r['accuracy_stderr']:.1f} | {100 * r['lenient_accuracy_public_code']:.1f}% | "
                     f"{1000 * r['latency_per_sample_s']:.1f} | {r['tokens_per_answer']:.1f} | {trained} |")
    return "\n".join(lines) + "\n"


def evaluate_result(result: dict, config: RunConfig, progress: bool = False, world: Optional[World] = None) -> dict:
    """:func:`evaluate` of what :func:`train` returned (its IVT-LR model, tokenizer and image processor) on the
    run's held-out records (shared out over a data-parallel ``world``)."""
    return evaluate(result["wrapper"], result["tokenizer"], result["image_processor"], config, result["eval_records"],
                    progress=progress, world=world)


def summary_lines(metrics: dict, train_seconds: Optional[float] = None) -> List[str]:
    """The printed summary of :func:`evaluate`'s metrics: strict accuracy with its standard error, the public
    code's lenient scoring, latency and tokens per answer."""
    line = (f"{metrics['name']}: accuracy {100 * metrics['accuracy']:.1f}% +- {100 * metrics['accuracy_stderr']:.1f}"
            f" (n={metrics['n']}; lenient, public code's scoring: {100 * metrics['lenient_accuracy_public_code']:.1f}%)"
            f", {1000 * metrics['latency_per_sample_s']:.1f} ms and {metrics['tokens_per_answer']:.1f} tokens per "
            f"answer")
    if train_seconds is not None:
        line += f"; trained in {train_seconds:.0f} s"
    return [line]


__all__ = ["RunConfig", "RUN_CONFIG", "train", "evaluate", "evaluate_result", "summary_lines", "table_row",
           "markdown_table", "save_run", "load_run", "build_data", "build_model", "seed_everything"]
