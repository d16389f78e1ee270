"""DPMM-CoT training runs from a config file (``method: dpmm``): a T5 with image features learned by a
text-conditioned diffusion UNet (``variant: dpmm``), and the two controls on the same data, MM-CoT-style fusion of
fixed features (``fixed_features``: the frozen VAE latents as the features, no diffusion loss) and text-only T5
(``text_only``); MM-CoT's two stages (``stage: rationale``, then ``stage: answer`` on the first stage's generated
rationales) and their evaluation (ROUGE-L / BLEU of the rationales; the answer's accuracy, strictly and with MM-CoT's
random fallback, with ScienceQA's official breakdown).

A run folder (``final/``) holds the T5 (``t5/``, as ``save_pretrained`` writes it), the VAE and UNet (``vae/``,
``unet/``, diffusers' folders) of a dpmm run, the fusion (and cross-attention projection) weights
(``dpmm_weights.safetensors``), ``dpmm_config.json``, the tokenizer and ``run.json``, under one manifest. A
rationale run's evaluation writes ``rationales.json`` ({record id: generated rationale}) beside ``final/``: what
an answer run's ``rationales`` names.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from mmlatent.data import scienceqa as sqa
from mmlatent.data import synthetic

from .checkpoint import CheckpointError, load_tensors, read_json, read_settings_file, write_json, write_run_checkpoint
from .distributed import World
from .loop import EpochBatches, TrainConfig, Trainer, check_int, label_tokens
from .methods import (check_data_keys, check_train_options, finish_run, fit_run, from_mapping, open_run,
                      read_yaml)

METHOD = "dpmm"
BOTH = "both"  # a config's stage: the rationale run, then the answer run on its generated rationales
RUN_FORMAT = 1
VARIANTS = ("dpmm", "fixed_features", "text_only")
TASKS = ("scienceqa", "translation")
SETTINGS_FILE = "dpmm_config.json"
WEIGHTS_FILE = "dpmm_weights.safetensors"
SETTINGS_FORMAT = "mmlatent-dpmm"
SETTINGS_VERSION = 1
RATIONALES_FILE = "rationales.json"
DATA_KEYS = {"synthetic": {"n_train", "n_eval", "seed", "contexts", "weights"},
             "scienceqa": {"root", "train", "eval", "n_train", "n_eval", "skip_bad"},
             "multi30k": {"root", "train", "eval", "source", "target", "image_root", "n_train", "n_eval"}}
DATA_REQUIRED = {"scienceqa": ("root",), "multi30k": ("root", "image_root")}
TINY_PARTS = {"t5": ("d_model", "layers", "heads", "d_ff", "seed"),
              "vae": ("block_out_channels", "latent_channels", "layers_per_block", "seed"),
              "unet": ("block_out_channels", "attention_head_dim", "layers_per_block", "seed")}


@dataclass
class DPMMConfig:
    """One DPMM-CoT run (YAML keys are these fields; ``train`` holds :class:`TrainConfig` fields).

    ``task``: ``scienceqa`` (MM-CoT's two stages; ``stage`` picks one, or ``both``: the rationale run into
    ``<output_dir>/rationale``, then the answer run on its generated rationales into ``<output_dir>/answer``) or
    ``translation`` (source text in, its
    translation out). ``model``: ``{tiny: {t5: {...}, vae: {...}, unet: {...}}}`` (random weights built from
    :mod:`mmlatent.models.tiny`'s configs) or ``{path: {t5: folder, vae: folder, unet: folder}}`` (local
    checkpoints). ``data``: ``synthetic`` (the embedded ScienceQA-shaped task), ``scienceqa`` (a local copy) or
    ``multi30k``. ``rationales``: an answer run's file of the rationale run's generated rationales for the eval
    records (None: the gold ones, labelled so in the results). ``image_size``: every image is resized to it.
    ``cache_latents``: the VAE frozen and its latents computed once (else the VAE trains with the model, as the
    paper's ablation favours). ``feature_blocks``, ``feature_timesteps``, ``feature_positions``,
    ``diffusion_weight``, ``latent_scale``: :class:`~mmlatent.models.DPMMCoT`'s (the fixed-feature control appends
    the same position codes to its latent tokens). ``fused_layers``: T5's feed-forward activations and norms train as
    mmlatent's lean fused ops (:func:`~mmlatent.models.apply_fused_layers`; the same values, less kept for the
    backward); false keeps transformers' modules. Evaluation and generation run transformers' modules either way."""

    name: str = "dpmm-cot"
    method: str = METHOD
    task: str = "scienceqa"
    stage: str = "rationale"
    variant: str = "dpmm"
    model: Dict = field(default_factory=lambda: {"tiny": {}})
    data: Dict = field(default_factory=lambda: {"synthetic": {"n_train": 2000, "n_eval": 400, "seed": 0}})
    rationales: Optional[str] = None
    image_size: int = 32
    feature_blocks: List[str] = field(default_factory=lambda: ["mid"])
    feature_timesteps: List[int] = field(default_factory=lambda: [0])
    feature_positions: int = 16
    diffusion_weight: float = 1.0
    latent_scale: float = 0.18215
    cache_latents: bool = True
    fused_layers: bool = True
    max_input_tokens: int = 512
    max_target_tokens: int = 512
    max_new_tokens: int = 128
    epochs: int = 4
    batch_size: int = 16
    eval_samples: int = 64
    train: Dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        if self.method != METHOD:
            raise ValueError(f"method: expected {METHOD!r} for a DPMM-CoT run, got {self.method!r}")
        for key, allowed in (("task", TASKS), ("stage", sqa.STAGES + (BOTH,)), ("variant", VARIANTS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: expected one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if isinstance(self.feature_positions, bool) or not isinstance(self.feature_positions, int) \
                or self.feature_positions < 0 or self.feature_positions % 4:
            raise ValueError(f"feature_positions: expected a multiple of 4 >= 0, got {self.feature_positions!r}")
        for key in ("image_size", "max_input_tokens", "max_target_tokens", "max_new_tokens", "epochs", "batch_size",
                    "eval_samples"):
            check_int(key, getattr(self, key))
        for key in ("cache_latents", "fused_layers"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}: expected true or false, got {getattr(self, key)!r}")
        for key in ("diffusion_weight", "latent_scale"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (key == "latent_scale" and value == 0):
                raise ValueError(f"{key}: expected a finite number {'> 0' if key == 'latent_scale' else '>= 0'}, "
                                 f"got {value!r}")
        if self.stage == BOTH and (self.task != "scienceqa" or not self.train.get("output_dir")):
            raise ValueError("stage: both (the rationale run, then the answer run on its rationales) needs task "
                             "scienceqa and train.output_dir, under which each stage writes its run")
        if self.rationales is not None:
            if self.task != "scienceqa" or self.stage != "answer":
                raise ValueError("rationales: only an answer run (task scienceqa, stage answer) reads rationales")
            if not isinstance(self.rationales, str) or not self.rationales:
                raise ValueError(f"rationales: expected the path of a rationale run's {RATIONALES_FILE}, got "
                                 f"{self.rationales!r}")
        self._check_model()
        if not isinstance(self.data, dict) or len(self.data) != 1 or next(iter(self.data)) not in DATA_KEYS:
            raise ValueError(f"data: expected one of {', '.join(DATA_KEYS)} with its settings, got {self.data!r}")
        kind, spec = check_data_keys(self.data, DATA_KEYS, DATA_REQUIRED)
        if (kind == "multi30k") != (self.task == "translation"):
            raise ValueError(f"data: {kind} data for task {self.task!r}; translation reads multi30k, scienceqa the "
                             f"others")
        for key in ("n_train", "n_eval"):
            if key in spec:
                check_int(f"data.{kind}.{key}", spec[key])
        check_train_options(self.train)

    def _check_model(self) -> None:
        if not isinstance(self.model, dict) or len(self.model) != 1 or next(iter(self.model)) not in ("tiny",
                                                                                                      "path"):
            raise ValueError(f"model: expected {{tiny: {{t5, vae, unet}}}} or {{path: {{t5, vae, unet}}}}, got "
                             f"{self.model!r}")
        (kind, spec), = self.model.items()
        spec = {} if spec is None else spec
        if not isinstance(spec, dict) or set(spec) - set(TINY_PARTS):
            raise ValueError(f"model.{kind}: expected a mapping of t5, vae, unet, got {spec!r}")
        for part, value in spec.items():
            if kind == "path":
                if not isinstance(value, str) or not os.path.isfile(os.path.join(value, "config.json")):
                    raise ValueError(f"model.path.{part}: {value!r} is not a local model folder (no config.json)")
            elif not isinstance(value, dict) or set(value) - set(TINY_PARTS[part]):
                raise ValueError(f"model.tiny.{part}: expected some of {', '.join(TINY_PARTS[part])}, got {value!r}")
        if kind == "path" and "t5" not in spec:
            raise ValueError("model.path.t5: required (the T5 checkpoint's folder)")

    @classmethod
    def load(cls, path: str) -> "DPMMConfig":
        return from_mapping(cls, read_yaml(path), path)


RUN_CONFIG = DPMMConfig  # the config class of this method's runs (mmlatent.train.methods)


# ------------------------------------------------------------------------------------------------------ building

def build_data(config: DPMMConfig) -> Tuple[Any, list, list]:
    """(tokenizer, train records, eval records). Synthetic: :func:`~mmlatent.data.synthetic.generate_scienceqa`
    with a cased word tokenizer of its words; ScienceQA: ``read_scienceqa`` with the image-less questions; Multi30K:
    ``read_multi30k``. The local data read the local T5 checkpoint's tokenizer."""
    (kind, spec), = config.data.items()
    if kind == "synthetic":
        from mmlatent.data.tokenizer import WordTokenizer
        seed = spec.get("seed", 0)
        contexts = tuple(spec.get("contexts", synthetic.CONTEXTS))
        train = synthetic.generate_scienceqa(spec.get("n_train", 2000), seed=seed, split="train", contexts=contexts,
                                             weights=spec.get("weights"))
        evaluation = synthetic.generate_scienceqa(spec.get("n_eval", 400), seed=seed, split="test",
                                                  contexts=contexts, weights=spec.get("weights"))
        return WordTokenizer(synthetic.scienceqa_vocabulary(), cased=True), train, evaluation
    tokenizer = _hf_tokenizer(config)
    if kind == "scienceqa":
        from mmlatent.data.readers import read_scienceqa
        train, _ = read_scienceqa(spec["root"], spec.get("train", "train"), skip_bad=spec.get("skip_bad", False),
                                  with_imageless=True)
        evaluation, _ = read_scienceqa(spec["root"], spec.get("eval", "test"), skip_bad=spec.get("skip_bad", False),
                                       with_imageless=True)
    else:
        from mmlatent.data.multi30k import read_multi30k
        options = dict(source=spec.get("source", "en"), target=spec.get("target", "de"), image_root=spec["image_root"])
        train = read_multi30k(spec["root"], spec.get("train", "train"), **options)
        evaluation = read_multi30k(spec["root"], spec.get("eval", "test_2016_flickr"), **options)
    train = train[:spec["n_train"]] if "n_train" in spec else train
    evaluation = evaluation[:spec["n_eval"]] if "n_eval" in spec else evaluation
    return tokenizer, train, evaluation


class TextTokenizer:
    """A Hugging Face seq2seq tokenizer (T5's) behind the interface the runs use: ``encode`` without special
    tokens, ``decode`` without them, ``eos_id``, ``pad_id``; ``tokenizer`` is the wrapped one (saved with the run)."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: a seq2seq tokenizer needs eos and pad tokens")
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)


def _hf_tokenizer(config: DPMMConfig) -> TextTokenizer:
    (kind, spec), = config.model.items()
    if kind != "path":
        raise ValueError(f"model: local data ({next(iter(config.data))}) need a local T5 checkpoint "
                         f"(model: {{path: {{t5: ...}}}}), whose tokenizer reads them")
    from transformers import AutoTokenizer
    return TextTokenizer(AutoTokenizer.from_pretrained(spec["t5"]))


def build_model(config: DPMMConfig, tokenizer: Any, device: torch.device) -> nn.Module:
    """The run's model: :class:`~mmlatent.models.DPMMCoT` (dpmm), :class:`~mmlatent.models.FusedT5` over the VAE
    latents' channels (fixed_features) or without fusion (text_only); tiny parts from their configs, or local
    checkpoints. The VAE is frozen when latents are cached (and in fixed_features, whose features are fixed)."""
    from mmlatent.models import DPMMCoT, FusedT5
    from mmlatent.models import tiny as tiny_models
    (kind, spec), = config.model.items()
    spec = spec or {}
    if kind == "tiny":
        t5 = tiny_models.tiny_t5(vocab=len(tokenizer), device=device, **spec.get("t5", {}))
        d_model = t5.config.d_model
        vae = tiny_models.tiny_vae(device=device, **spec.get("vae", {})) if config.variant != "text_only" else None
        unet = (tiny_models.tiny_unet(cross_attention_dim=d_model, in_channels=vae.config.latent_channels,
                                      device=device, **spec.get("unet", {})) if config.variant == "dpmm" else None)
    else:
        from transformers import T5ForConditionalGeneration
        t5 = T5ForConditionalGeneration.from_pretrained(spec["t5"]).to(device)
        vae = unet = None
        if config.variant != "text_only":
            from diffusers import AutoencoderKL
            if "vae" not in spec:
                raise ValueError(f"model.path.vae: required for variant {config.variant}")
            vae = AutoencoderKL.from_pretrained(spec["vae"]).to(device)
        if config.variant == "dpmm":
            from diffusers import UNet2DConditionModel
            if "unet" not in spec:
                raise ValueError("model.path.unet: required for variant dpmm")
            unet = UNet2DConditionModel.from_pretrained(spec["unet"]).to(device)
    t5.train()
    if config.fused_layers:
        from mmlatent.models import apply_fused_layers
        apply_fused_layers(t5)
    if vae is not None and (config.cache_latents or config.variant == "fixed_features"):
        vae.requires_grad_(False).eval()
    if config.variant == "dpmm":
        unet.train()
        return DPMMCoT(t5, vae, unet, feature_blocks=tuple(config.feature_blocks),
                       feature_timesteps=tuple(config.feature_timesteps),
                       diffusion_weight=float(config.diffusion_weight), latent_scale=float(config.latent_scale),
                       feature_positions=config.feature_positions).to(device)
    width = vae.config.latent_channels + config.feature_positions if vae is not None else None
    return _fixed_features(FusedT5(t5, width).to(device), vae, config.latent_scale, config.feature_positions)


def _fixed_features(model: nn.Module, vae: Optional[nn.Module], latent_scale: float, positions: int) -> nn.Module:
    """A control model with what its features need: the frozen VAE (saved with the run, never trained), the
    latents' scale and the position channels appended to its latent tokens."""
    model.vae = vae
    model.latent_scale_for_features = float(latent_scale)
    model.feature_positions = positions
    return model


# ------------------------------------------------------------------------------------------------------ batches

def prompt_and_target(config: DPMMConfig, record: Any, rationales: Optional[Dict[str, str]] = None
                      ) -> Tuple[str, str]:
    """The encoder's input and the decoder's target of a record for the run's task and stage; an answer run's
    input holds ``rationales[record.id]`` (the rationale run's) or, without them, the gold rationale."""
    if config.task == "translation":
        return record.source, record.target
    if config.stage == "rationale":
        return sqa.rationale_prompt(record), sqa.rationale_target(record)
    if rationales is None:
        rationale = sqa.rationale_target(record)
    else:
        if record.id not in rationales:
            raise ValueError(f"rationales: {config.rationales} has no rationale for record {record.id!r}")
        rationale = rationales[record.id]
    return sqa.answer_prompt(record, rationale), sqa.answer_target(record)


def image_tensor(image: Any, size: int) -> torch.Tensor:
    """[3, size, size] float32 in [-1, 1] of an RGB uint8 array [H, W, 3] or an image file (bilinear, antialiased
    resize)."""
    if isinstance(image, str):
        from PIL import Image
        with Image.open(image) as im:
            image = np.array(im.convert("RGB"))
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    if pixels.shape[-2:] != (size, size):
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True,
                                                 align_corners=False)
    return pixels[0].clamp(-1.0, 1.0)


def collate(config: DPMMConfig, tokenizer: Any, records: list, rationales: Optional[Dict[str, str]] = None,
            latents: Optional[Dict[str, torch.Tensor]] = None, with_targets: bool = True) -> Dict[str, Any]:
    """A batch: ``input_ids`` / ``attention_mask`` [B, T] (right-padded, eos-terminated), ``labels`` [B, L]
    (eos-terminated, -100 on padding), ``has_image`` [B], and ``latents`` [B, C, h, w] (cached; zeros where there
    is no image) or ``pixel_values`` [B, 3, S, S] (zeros where there is no image), ``ids``."""
    inputs, targets = zip(*(prompt_and_target(config, r, rationales) for r in records))

    def pad(texts: Sequence[str], limit: int, fill: int) -> torch.Tensor:
        rows = [tokenizer.encode(t)[:limit - 1] + [tokenizer.eos_id] for t in texts]
        out = torch.full((len(rows), max(map(len, rows))), fill, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row)
        return out

    input_ids = pad(inputs, config.max_input_tokens, tokenizer.pad_id)
    batch: Dict[str, Any] = dict(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_id).long(),
                                 ids=[r.id for r in records])
    if with_targets:
        batch["labels"] = pad(targets, config.max_target_tokens, -100)
    if config.variant == "text_only":
        return batch
    has_image = torch.tensor([r.image is not None for r in records])
    batch["has_image"] = has_image
    if latents is not None:
        shape = next(iter(latents.values())).shape if latents else (4, config.image_size // 2, config.image_size // 2)
        batch["latents"] = torch.stack([latents[r.id] if r.image is not None else torch.zeros(shape)
                                        for r in records])
    else:
        batch["pixel_values"] = torch.stack([image_tensor(r.image, config.image_size) if r.image is not None
                                             else torch.zeros(3, config.image_size, config.image_size)
                                             for r in records])
    return batch


def _to(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def encode_latents(model: nn.Module, config: DPMMConfig, records: list, path: str,
                   progress: bool = False) -> Dict[str, torch.Tensor]:
    """Every record's image through the frozen VAE once, into ``path`` (:func:`~mmlatent.models.cache_latents`),
    read back; records without an image have none."""
    from mmlatent.models import cache_latents, load_latents
    images = {r.id: image_tensor(r.image, config.image_size) for r in records if r.image is not None}
    if not images:
        return {}
    cache_latents(model.vae, images, path, scale=config.latent_scale, progress=progress)
    return load_latents(path, scale=config.latent_scale)


def features_of(model: nn.Module, batch: Dict[str, Any]) -> Optional[torch.Tensor]:
    """A fixed-features model's features: the batch's VAE latents as tokens (zeros for image-less rows, which
    the batch's latents already are), from the cache or the frozen VAE."""
    from mmlatent.models import latent_tokens
    if getattr(model, "fusion", None) is None:
        return None
    if "latents" in batch:
        latents = batch["latents"]
    else:
        with torch.no_grad():
            latents = model.vae.encode(batch["pixel_values"]).latent_dist.mean * model.latent_scale_for_features
        latents = latents * batch["has_image"][:, None, None, None]
    return latent_tokens(latents, model.feature_positions)


def run_loss(model: nn.Module, batch: Dict[str, Any]) -> Any:
    """The :class:`~mmlatent.models.dpmm.model.DPMMOutput` of one training batch, for any variant."""
    from mmlatent.models import DPMMCoT
    if isinstance(model, DPMMCoT):
        return model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                     pixel_values=batch.get("pixel_values"), latents=batch.get("latents"),
                     has_image=batch.get("has_image"))
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"], features=features_of(model, batch))


def run_generate(model: nn.Module, batch: Dict[str, Any], max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding of one batch, for any variant."""
    from mmlatent.models import DPMMCoT
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    if isinstance(model, DPMMCoT):
        return model.generate(batch["input_ids"], batch["attention_mask"], pixel_values=batch.get("pixel_values"),
                              latents=batch.get("latents"), has_image=batch.get("has_image"), **options)
    return model.generate(batch["input_ids"], batch["attention_mask"], features=features_of(model, batch), **options)


# ------------------------------------------------------------------------------------------------------ running

def train(config: DPMMConfig, device: Optional[Union[str, torch.device]] = None, resume: Optional[str] = None,
          progress: bool = True, until: Optional[int] = None, allow_config_change: bool = False) -> dict:
    """Trains one run on the :class:`~mmlatent.train.Trainer` (``text_loss + diffusion_weight *
    diffusion_loss`` for dpmm, the text loss for the controls). With ``cache_latents`` the frozen VAE encodes
    every image once, before training (into ``<output_dir>/vae-latents.safetensors``). A finished run writes
    ``<output_dir>/final`` (:func:`save_run`); one stopped by ``until`` writes ``checkpoint-<step>``, which
    ``resume`` continues. Returns the summary, the history, and the model, tokenizer and eval records."""
    import tempfile

    from .distributed import barrier, init_distributed
    from .ivtlr import seed_everything
    world = init_distributed(float(config.train.get("dist_timeout_s", 600.0)))
    if config.stage == BOTH:
        return _train_both(config, device, progress, resume, until)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.rationales is not None:  # read before training, so that a wrong path costs no run
        read_rationales(config.rationales)
    train_options = TrainConfig(**dict({"max_steps": 1}, **config.train))
    seed_everything(train_options.seed)
    tokenizer, train_records, eval_records = build_data(config)
    model = build_model(config, tokenizer, device)
    latents = None
    if config.cache_latents and config.variant != "text_only":
        folder = train_options.output_dir or tempfile.mkdtemp(prefix="mmlatent-dpmm-")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "vae-latents.safetensors")
        if world.distributed and not train_options.output_dir:
            raise ValueError("train.output_dir: a data-parallel run with cache_latents needs it, where rank 0 "
                             "writes the latents every rank reads")
        if world.main:
            latents = encode_latents(model, config, train_records + eval_records, path, progress=progress)
        barrier(world, "waiting for rank 0's VAE latents", train_options.dist_timeout_s)
        if not world.main:
            from mmlatent.models import load_latents
            latents = load_latents(path, scale=config.latent_scale)
    batches = EpochBatches(train_records, config.batch_size,
                           lambda records, epoch: collate(config, tokenizer, records, latents=latents),
                           seed=train_options.seed)
    options = dict(config.train)
    options.setdefault("max_steps", max(1, config.epochs * batches.per_epoch // options.get("grad_accum", 1)))
    train_config = TrainConfig(**options)
    train_config.progress = progress and train_config.progress
    parts: List[torch.Tensor] = []

    def loss_fn(m, batch):
        out = run_loss(model, batch)
        parts.append(torch.stack([out.text_loss.detach(), out.diffusion_loss.detach()]))  # read after training
        # over label tokens, over the samples with an image (the controls have no diffusion term)
        return out.text_loss, getattr(model, "diffusion_weight", 0.0) * out.diffusion_loss

    def count_items(batch):
        images = int(batch["has_image"].sum()) if torch.is_tensor(batch.get("has_image")) else 0
        return label_tokens(batch["labels"], shift=False), images

    def eval_fn(_model):
        metrics = evaluate(model, tokenizer, None, config, eval_records[:config.eval_samples], latents=latents,
                           world=trainer.world)
        return {k: metrics[k] for k in _EVAL_KEYS if k in metrics}

    run_config = dict(asdict(config), train=asdict(train_config))
    trainer = Trainer(model, loss_fn, batches, train_config, describe=config.name, eval_fn=eval_fn,
                      run_config=run_config, count_items=count_items)
    summary = fit_run(trainer, parts, resume=resume, allow_config_change=allow_config_change, until=until)
    split = summary.pop("loss_parts").reshape(-1, 2)
    result = dict(summary, name=config.name, method=METHOD, variant=config.variant, stage=config.stage,
                  task=config.task, device=str(device), text_loss=[float(v) for v in split[:, 0]],
                  diffusion_loss=[float(v) for v in split[:, 1]],
                  trainable_parameters=sum(p.numel() for _, p in trainer.named_params))
    checkpoint = finish_run(trainer, train_config.output_dir, lambda trained: save_run(
        os.path.join(train_config.output_dir, "final"), trained, tokenizer, config, result))
    if checkpoint:
        result["checkpoint"] = checkpoint
    return dict(result, model=model, tokenizer=tokenizer, eval_records=eval_records, latents=latents)


def stage_configs(config: DPMMConfig) -> Tuple[DPMMConfig, DPMMConfig]:
    """The rationale and the answer run of a ``stage: both`` config: named ``<name>-rationale`` and
    ``<name>-answer``, under ``<output_dir>/rationale`` and ``<output_dir>/answer``; the answer run reads the
    rationale run's ``rationales.json``."""
    from dataclasses import replace
    out = config.train["output_dir"]
    first = replace(config, name=f"{config.name}-rationale", stage="rationale",
                    train=dict(config.train, output_dir=os.path.join(out, "rationale")))
    second = replace(config, name=f"{config.name}-answer", stage="answer",
                     rationales=os.path.join(out, "rationale", RATIONALES_FILE),
                     train=dict(config.train, output_dir=os.path.join(out, "answer")))
    return first, second


def _train_both(config: DPMMConfig, device: Optional[Union[str, torch.device]], progress: bool,
                resume: Optional[str], until: Optional[int]) -> dict:
    if resume is not None or until is not None:
        raise ValueError("resume: a stage: both run is two runs; resume the stage's own run (its config is "
                         "stage_configs(config)) instead")
    from .distributed import current_world
    from .methods import reload_final
    first, second = stage_configs(config)
    rationale = train(first, device=device, progress=progress)
    world = current_world()
    if world.distributed:  # every rank writes its share of the rationales with the whole model of the final folder
        rationale = reload_final(rationale, device)
    rationale_metrics = evaluate_result(rationale, first, progress=progress and world.main, world=world)
    answer = train(second, device=device, progress=progress)
    return dict(answer, rationale_metrics=rationale_metrics, stage_configs=(first, second),
                train_seconds=rationale["train_seconds"] + answer["train_seconds"])


_EVAL_KEYS = ("accuracy", "accuracy_stderr", "n", "rouge_l", "bleu1", "bleu4", "bleu")


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer: Any, config: DPMMConfig, records: list, *,
                   rationales: Optional[Dict[str, str]] = None, latents: Optional[Dict[str, torch.Tensor]] = None,
                   batch_size: int = 32, progress: bool = False, world: Optional[World] = None
                   ) -> Tuple[List[str], float]:
    """(the greedy outputs for ``records``, seconds per record); with a data-parallel ``world`` every rank
    generates its share (:func:`~mmlatent.train.distributed.map_shards`) and returns them all."""
    from tqdm.auto import tqdm

    from .distributed import map_shards
    device = next(model.parameters()).device

    def answers(shard: list) -> List[Tuple[str, float]]:
        out: List[Tuple[str, float]] = []
        for start in tqdm(range(0, len(shard), batch_size), disable=not progress, desc=f"eval {config.name}"):
            chunk = shard[start:start + batch_size]
            t0 = time.perf_counter()
            batch = _to(collate(config, tokenizer, chunk, rationales, latents, with_targets=False), device)
            rows = run_generate(model, batch, config.max_new_tokens)
            seconds = (time.perf_counter() - t0) / len(chunk)
            out += [(tokenizer.decode(row.tolist()).strip(), seconds) for row in rows]
        return out

    was_training = model.training
    model.eval()
    try:
        pairs = map_shards(answers, records, world, "the evaluation")
    finally:
        model.train(was_training)
    return [text for text, _ in pairs], sum(seconds for _, seconds in pairs) / max(1, len(records))


def read_rationales(path: str) -> Dict[str, str]:
    """{record id: rationale} of a rationale run's ``rationales.json``, checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rationales: no file at {path} (a rationale run's evaluation writes "
                                f"{RATIONALES_FILE} beside its final/)")
    stored = read_json(os.path.dirname(path) or ".", os.path.basename(path))
    if not isinstance(stored, dict) or not isinstance(stored.get("rationales"), dict) \
            or not all(isinstance(v, str) for v in stored["rationales"].values()):
        raise ValueError(f"rationales: {path} is not a rationales file (an object with a rationales mapping of "
                         f"record id to text)")
    return stored["rationales"]


def evaluate(model: nn.Module, tokenizer: Any, image_processor: Any, config: DPMMConfig, records: list,
             batch_size: int = 32, progress: bool = False,
             latents: Optional[Dict[str, torch.Tensor]] = None, world: Optional[World] = None) -> dict:
    """Greedy evaluation on ``records`` for the run's task and stage.

    - rationale: ``rouge_l``, ``bleu1``, ``bleu4`` (percent, :func:`~mmlatent.data.scienceqa.rationale_scores`)
      and ``rationales`` ({record id: text}, what an answer run reads);
    - answer: ``accuracy`` / ``accuracy_stderr`` (MM-CoT's answer pattern, unparsable answers wrong),
      ``accuracy_random_fallback`` (MM-CoT's rule: a random option for an unparsable answer, seeded),
      ``answered``, ``breakdown`` (ScienceQA's official categories, percent), ``accuracy_by_kind`` for the
      synthetic task, and ``rationales_source`` (the file, or "gold");
    - translation: ``bleu`` (sacrebleu's corpus BLEU).

    Also ``latency_per_sample_s`` and ``n``. ``image_processor`` is unused (images are resized by the run itself);
    it keeps the signature every method shares."""
    rationales = read_rationales(config.rationales) if (config.task == "scienceqa" and config.stage == "answer"
                                                        and config.rationales) else None
    texts, latency = generate_texts(model, tokenizer, config, records, rationales=rationales, latents=latents,
                                    batch_size=batch_size, progress=progress, world=world)
    out: Dict[str, Any] = dict(n=len(records), latency_per_sample_s=latency, name=config.name,
                               variant=config.variant, stage=config.stage, task=config.task)
    if config.task == "translation":
        from mmlatent.data.multi30k import corpus_bleu
        return dict(out, bleu=corpus_bleu(texts, [r.target for r in records]), outputs=texts[:20])
    if config.stage == "rationale":
        scores = sqa.rationale_scores(texts, [sqa.rationale_target(r) for r in records])
        return dict(out, **{k: scores[k] for k in ("rouge_l", "bleu1", "bleu4")},
                    rationales={r.id: t for r, t in zip(records, texts)})
    correct = [sqa.answer_correct(t, r) for t, r in zip(texts, records)]
    rng = random.Random(0)
    fallback = [sqa.answer_correct(t, r, random_fallback=rng) for t, r in zip(texts, records)]
    accuracy, stderr = _rate(correct)
    by_kind: Dict[str, List[bool]] = {}
    for r, ok in zip(records, correct):
        by_kind.setdefault(str(r.meta.get("kind", "all")), []).append(ok)
    return dict(out, accuracy=accuracy, accuracy_stderr=stderr,
                accuracy_random_fallback=sum(fallback) / max(1, len(fallback)),
                answered=sum(sqa.parse_answer(t) is not None for t in texts) / max(1, len(texts)),
                breakdown=sqa.scienceqa_breakdown(records, correct),
                accuracy_by_category={k: dict(zip(("accuracy", "accuracy_stderr"),
                                                  _rate([correct[i] for i in rows])), n=len(rows))
                                      for k, rows in sqa.breakdown_groups(records).items()},
                accuracy_by_kind={k: dict(zip(("accuracy", "accuracy_stderr"), _rate(v)), n=len(v))
                                  for k, v in sorted(by_kind.items())},
                rationales_source=config.rationales or "gold", outputs=texts[:20])


def _rate(correct: Sequence[bool]) -> Tuple[float, float]:
    """(accuracy, its standard error) of a list of outcomes."""
    p = sum(correct) / max(1, len(correct))
    return p, math.sqrt(p * (1 - p) / max(1, len(correct)))


def evaluate_result(result: dict, config: DPMMConfig, progress: bool = False, world: Optional[World] = None) -> dict:
    """:func:`evaluate` of a run just trained on its eval records (shared out over a data-parallel ``world``); a
    rationale run also writes ``rationales.json`` ({record id: generated rationale}) beside its ``final/``, for
    the answer run (rank 0 writes it, and every rank returns once it is there)."""
    if config.stage == BOTH:
        metrics = evaluate_result(result, result["stage_configs"][1], progress=progress, world=world)
        return dict(metrics, rationale_scores={k: result["rationale_metrics"][k] for k in ("rouge_l", "bleu1",
                                                                                          "bleu4")})
    metrics = evaluate(result["model"], result["tokenizer"], None, config, result["eval_records"],
                       progress=progress, latents=result.get("latents"), world=world)
    output_dir = config.train.get("output_dir")
    if "rationales" in metrics and output_dir and result.get("completed"):
        from .distributed import barrier
        path = os.path.join(output_dir, RATIONALES_FILE)
        if world is None or world.main:
            write_json(path, {"run": config.name, "checkpoint": result.get("checkpoint"),
                              "rationales": metrics["rationales"]})
        if world is not None:
            barrier(world, "waiting for rank 0's rationales file", float(config.train.get("dist_timeout_s", 600.0)))
        metrics["rationales_file"] = path
    return metrics


def summary_lines(metrics: dict, train_seconds: Optional[float] = None) -> List[str]:
    """Human-readable lines of :func:`evaluate`'s metrics."""
    trained = f"; trained in {train_seconds:.0f} s" if train_seconds is not None else ""
    name = f"{metrics['name']} ({metrics['variant']}, {metrics['task']}"
    if metrics["task"] == "translation":
        return [f"{name}): BLEU {metrics['bleu']:.2f} (n={metrics['n']}){trained}"]
    if metrics["stage"] == "rationale":
        return [f"{name}, rationale): ROUGE-L {metrics['rouge_l']:.1f}, BLEU-1 {metrics['bleu1']:.1f}, "
                f"BLEU-4 {metrics['bleu4']:.1f} (n={metrics['n']}){trained}"]
    lines = [f"{name}, answer): accuracy {100 * metrics['accuracy']:.1f}% +- {100 * metrics['accuracy_stderr']:.1f} "
             f"(n={metrics['n']}; {100 * metrics['accuracy_random_fallback']:.1f}% with MM-CoT's random fallback; "
             f"{100 * metrics['answered']:.1f}% answered; rationales: {metrics['rationales_source']}){trained}",
             "  breakdown: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["breakdown"].items())]
    if "rationale_scores" in metrics:
        scores = metrics["rationale_scores"]
        lines.append(f"  its rationales: ROUGE-L {scores['rouge_l']:.1f}, BLEU-1 {scores['bleu1']:.1f}, BLEU-4 "
                     f"{scores['bleu4']:.1f}")
    return lines


def table_row(metrics: dict, source: str, trained_seconds: Optional[float] = None) -> dict:
    """One row of :func:`markdown_table` and of ``mmlatent compare``'s plot (``accuracy_by_kind``: an answer
    run's accuracy per ScienceQA category, with standard errors): the metrics without the sample outputs."""
    row = {k: v for k, v in metrics.items() if k not in ("outputs", "rationales")}
    row.update(source=source, trained_seconds=trained_seconds)
    if "accuracy_by_category" in metrics:
        row["accuracy_by_kind"] = metrics["accuracy_by_category"]
        row["accuracy_by_question_kind"] = metrics["accuracy_by_kind"]
    return row


def markdown_table(rows: List[dict]) -> str:
    """The runs side by side: accuracy with its standard error and the official breakdown (answer runs), or the
    rationale scores, or BLEU."""
    if not rows:
        return ""
    first = rows[0]
    if first["task"] == "translation":
        head = "| run | variant | source | n | BLEU |\n|---|---|---|---:|---:|\n"
        return head + "".join(f"| {r['name']} | {r['variant']} | {r['source']} | {r['n']} | {r['bleu']:.2f} |\n"
                              for r in rows)
    if first["stage"] == "rationale":
        head = "| run | variant | source | n | ROUGE-L | BLEU-1 | BLEU-4 |\n|---|---|---|---:|---:|---:|---:|\n"
        return head + "".join(f"| {r['name']} | {r['variant']} | {r['source']} | {r['n']} | {r['rouge_l']:.1f} | "
                              f"{r['bleu1']:.1f} | {r['bleu4']:.1f} |\n" for r in rows)
    keys = list(sqa.BREAKDOWN_KEYS)
    head = ("| run | variant | source | n | accuracy | with random fallback | " + " | ".join(keys) + " |\n"
            + "|---|---|---|---:|---:|---:|" + "---:|" * len(keys) + "\n")
    lines = []
    for r in rows:
        cells = [f"{r['breakdown'][k]:.1f}" if k in r["breakdown"] else "" for k in keys]
        lines.append(f"| {r['name']} | {r['variant']} | {r['source']} | {r['n']} | {100 * r['accuracy']:.1f}% ± "
                     f"{100 * r['accuracy_stderr']:.1f} | {100 * r['accuracy_random_fallback']:.1f}% | "
                     + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ saving

def save_run(directory: str, model: nn.Module, tokenizer: Any, config: DPMMConfig, result: dict) -> str:
    """A finished run's folder: ``t5/`` (``save_pretrained``), ``vae/`` and ``unet/`` (diffusers'), the fusion
    and projection weights, ``dpmm_config.json``, the tokenizer and run.json, written crash-safely under one
    manifest."""
    from mmlatent.data.tokenizer import WordTokenizer
    summary = {k: v for k, v in result.items() if k not in ("history", "text_loss", "diffusion_loss")}
    summary["train_loss"] = [r["loss"] for r in result["history"]["train"]]
    summary["text_loss"] = result.get("text_loss", [])
    summary["diffusion_loss"] = result.get("diffusion_loss", [])
    summary["eval_history"] = result["history"].get("eval", [])
    run = {"format": RUN_FORMAT, "method": METHOD, "config": asdict(config), "result": summary,
           "tokenizer": "word" if isinstance(tokenizer, WordTokenizer) else "hf-text"}
    return write_run_checkpoint(directory, lambda folder: write_model(model, folder), run, tokenizer)


def _extra_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The weights outside the T5 / VAE / UNet folders: the fusion's and the cross-attention projection's."""
    state = {}
    for prefix in ("fusion", "cross_attention_proj"):
        module = getattr(model, prefix, None)
        if module is not None:
            state.update({f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in module.state_dict().items()})
    return state


def write_model(model: nn.Module, folder: str) -> dict:
    """Writes ``model`` into ``folder`` (no manifest: the caller's writer adds it); returns the settings."""
    from safetensors.torch import save_file

    from mmlatent.models import DPMMCoT
    from mmlatent.models.ivtlr import saving
    from mmlatent.models.unwrap import unwrap_peft
    with saving.quiet_progress():
        unwrap_peft(model.t5).save_pretrained(os.path.join(folder, "t5"))
        if getattr(model, "vae", None) is not None:
            model.vae.save_pretrained(os.path.join(folder, "vae"))
        if isinstance(model, DPMMCoT):
            model.unet.save_pretrained(os.path.join(folder, "unet"))
    settings = {"format": SETTINGS_FORMAT, "version": SETTINGS_VERSION, "class": type(model).__name__,
                "weights": "full"}
    if isinstance(model, DPMMCoT):
        settings["dpmm"] = dict(feature_blocks=list(model.feature_blocks),
                                feature_timesteps=list(model.feature_timesteps),
                                diffusion_weight=model.diffusion_weight, latent_scale=model.latent_scale,
                                cross_attention_proj=model.cross_attention_proj is not None,
                                feature_positions=model.feature_positions)
    else:
        settings["fused_t5"] = dict(feature_dim=model.feature_dim, latent_scale=model.latent_scale_for_features,
                                    feature_positions=model.feature_positions)
    save_file(_extra_state(model) or {"none": torch.zeros(0)}, os.path.join(folder, WEIGHTS_FILE))
    write_json(os.path.join(folder, SETTINGS_FILE), settings)
    return settings


def load_run(directory: str, device: Optional[Union[str, torch.device]] = None) -> Tuple[nn.Module, Any, DPMMConfig,
                                                                                        None]:
    """(model, tokenizer, DPMMConfig, None) of a folder :func:`save_run` wrote, verified against its manifest."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import T5ForConditionalGeneration

    from mmlatent.models import DPMMCoT, FusedT5
    from mmlatent.models.ivtlr import saving
    device = torch.device(device or "cpu")
    path, _, stored, config, tokenizer = open_run(directory, required=("run.json", SETTINGS_FILE, WEIGHTS_FILE),
                                                  config_class=DPMMConfig, run_format=RUN_FORMAT, method=METHOD)
    settings = read_settings_file(path, SETTINGS_FILE, SETTINGS_FORMAT, SETTINGS_VERSION, "a DPMM-CoT settings file")
    with saving.quiet_progress():
        t5 = T5ForConditionalGeneration.from_pretrained(os.path.join(path, "t5")).to(device)
        vae = (AutoencoderKL.from_pretrained(os.path.join(path, "vae")).to(device)
               if os.path.isdir(os.path.join(path, "vae")) else None)
        if settings.get("class") == "DPMMCoT":
            unet = UNet2DConditionModel.from_pretrained(os.path.join(path, "unet")).to(device)
    where = os.path.join(path, SETTINGS_FILE)
    try:
        if settings.get("class") == "DPMMCoT":
            options = settings["dpmm"]
            proj = (nn.Linear(t5.config.d_model, unet.config.cross_attention_dim).to(device)
                    if options["cross_attention_proj"] else None)
            model = DPMMCoT(t5, vae, unet, feature_blocks=tuple(options["feature_blocks"]),
                            feature_timesteps=tuple(options["feature_timesteps"]),
                            diffusion_weight=options["diffusion_weight"], latent_scale=options["latent_scale"],
                            cross_attention_proj=proj, feature_positions=options["feature_positions"]).to(device)
        else:
            options = settings["fused_t5"]
            model = _fixed_features(FusedT5(t5, options["feature_dim"]).to(device), vae, options["latent_scale"],
                                    options["feature_positions"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: not settings this version reads ({err})") from None
    extra = {k: v for k, v in load_tensors(path, WEIGHTS_FILE, device=str(device)).items() if k != "none"}
    expected = _extra_state(model)
    if set(extra) != set(expected) or any(tuple(extra[k].shape) != tuple(expected[k].shape) for k in expected):
        raise CheckpointError(f"{os.path.join(path, WEIGHTS_FILE)}: its tensors are not this model's fusion and "
                              f"projection weights")
    model.load_state_dict(extra, strict=False)
    return model.eval(), tokenizer, config, None


__all__ = ["DPMMConfig", "RUN_CONFIG", "METHOD", "VARIANTS", "TASKS", "build_data", "build_model", "collate",
           "prompt_and_target", "image_tensor", "encode_latents", "run_loss", "run_generate", "train", "evaluate",
           "evaluate_result", "generate_texts", "read_rationales", "summary_lines", "table_row", "markdown_table",
           "save_run", "write_model", "load_run", "TextTokenizer", "RATIONALES_FILE", "BOTH", "stage_configs"]
