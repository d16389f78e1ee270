"""An IVT-LR wrapper as a standard Hugging Face / PEFT folder, and back.

One folder holds the wrapped model as transformers or PEFT save it, and ``ivtlr_config.json`` (the wrapper's
settings: latent token id, k, position mode, and what the folder holds):

- a full model: ``config.json``, ``model.safetensors`` (or its shards and index), ``generation_config.json``, from
  ``vlm.save_pretrained``; ``AutoModelForImageTextToText.from_pretrained(folder)`` (or the model class's) loads it;
- a PEFT model: ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's own key names, from
  ``peft_model.save_pretrained``; ``peft.PeftModel.from_pretrained(base_model, folder)`` loads it. When the base
  has no checkpoint on disk (built from a config, as the tiny models are), it is saved as well, with
  ``save_pretrained``, in ``folder/base``, and ``adapter_config.json`` names it by that relative path:
  ``PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(f"{folder}/base"), folder)``. When the
  base is a checkpoint folder but the vocabulary was resized past it (IVT-LR's latent tokens added), the embedding
  matrices go into the adapter file (PEFT's ``save_embedding_layers``) and ``ivtlr_config.json`` records the
  vocabulary size: resize the base to it before ``PeftModel.from_pretrained`` (:func:`load_pretrained` does).

:meth:`IVTLR.save_pretrained` writes such a folder through :func:`mmlatent.train.checkpoint.write_checkpoint`
(scratch folder, fsync, a manifest of SHA-256s, rename), and :meth:`IVTLR.from_pretrained` verifies the manifest
before reading anything: a missing or corrupt file is a :class:`~mmlatent.train.checkpoint.CheckpointError` naming
it. A training run's ``final`` folder is one such folder with the run's files beside the model's.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from ..backbones import VLMBackbone, supported_model_classes
from .layout import POSITION_MODES

IVTLR_CONFIG_FILE = "ivtlr_config.json"
FORMAT = "mmlatent-ivtlr"
VERSION = 1
BASE_FOLDER = "base"
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_peft_model(vlm: nn.Module) -> bool:
    return hasattr(vlm, "peft_config") and hasattr(vlm, "get_base_model")


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars and load reports off: a save or load is one step of what mmlatent reports, and
    what a report would say (a tensor of another shape, say) becomes mmlatent's one error naming the file."""
    from transformers.utils import logging as hf_logging
    enabled, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if enabled:
            hf_logging.enable_progress_bar()


def _model_folder(name_or_path: Optional[str], relative_to: Optional[str] = None) -> Optional[str]:
    """The local model folder (one with config.json) that ``name_or_path`` names, relative to ``relative_to``
    first when given, else None."""
    if not name_or_path:
        return None
    candidates = [name_or_path] if os.path.isabs(name_or_path) else (
        ([os.path.join(relative_to, name_or_path)] if relative_to else []) + [name_or_path])
    return next((c for c in candidates if os.path.isfile(os.path.join(c, "config.json"))), None)


def _vocab_size(folder: str) -> Optional[int]:
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(folder).get_text_config().vocab_size
    except (OSError, ValueError, KeyError):
        return None


def _base_state(vlm: nn.Module) -> Dict[str, torch.Tensor]:
    """The base model's own tensors under its own names: the PEFT layers' base weights, without the adapters."""
    base = vlm.get_base_model()
    prefix = getattr(getattr(vlm, "base_model", None), "prefix", "lora_")
    state = {}
    for key, value in base.state_dict().items():
        if f".{prefix}" in key or ".modules_to_save." in key:
            continue
        state[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return state


def check_replaceable(directory: str) -> None:
    """A save replaces the whole folder (crash safely), so it goes only into a new or empty folder or over an
    mmlatent checkpoint: ValueError for a folder holding other files."""
    from mmlatent.train.checkpoint import MANIFEST
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.isfile(os.path.join(directory, MANIFEST)):
        raise ValueError(f"directory: {directory} holds files but no {MANIFEST} (not an mmlatent checkpoint); saving "
                         f"replaces the whole folder, so give a new or empty folder")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory: {directory} is a file")


def write_pretrained(vlm: nn.Module, folder: str, *, latent_token_id: int, k: int, position_mode: str,
                     save_base: Optional[bool] = None, save_embedding_layers: Union[bool, str] = "auto") -> dict:
    """Writes ``vlm`` and the IVT-LR settings into the existing folder ``folder`` (no manifest: the caller's
    :func:`~mmlatent.train.checkpoint.write_checkpoint` adds it). Returns the settings written.

    Args:
        save_base: for a PEFT model, also write the base model into ``folder/base``; default: when the base has no
            local checkpoint folder (``adapter_config``'s ``base_model_name_or_path``).
        save_embedding_layers: for a PEFT model, put the embedding matrices into the adapter file; "auto": when the
            base is not saved and its checkpoint's vocabulary is smaller than the model's (rows were added).
    """
    from mmlatent.train.checkpoint import write_json
    backbone = VLMBackbone(vlm)
    base = backbone.model
    settings = {"format": FORMAT, "version": VERSION, "latent_token_id": int(latent_token_id), "k": int(k),
                "position_mode": position_mode, "model_class": type(base).__name__,
                "vocab_size": int(base.get_input_embeddings().weight.shape[0]), "weights": "full", "base": None,
                "embedding_layers": False}
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers: expected True, False or 'auto', got {save_embedding_layers!r}")
    with quiet_progress():
        if not is_peft_model(vlm):
            vlm.save_pretrained(folder)
        else:
            configs = vlm.peft_config
            recorded = {name: c.base_model_name_or_path for name, c in configs.items()}
            checkpoint = _model_folder(recorded.get("default") or next(iter(recorded.values()), None))
            save_base = checkpoint is None if save_base is None else bool(save_base)
            if save_embedding_layers == "auto":
                embeddings = not save_base and (checkpoint is None
                                                or _vocab_size(checkpoint) != settings["vocab_size"])
            else:
                embeddings = bool(save_embedding_layers)
            if save_base:
                base.save_pretrained(os.path.join(folder, BASE_FOLDER), state_dict=_base_state(vlm))
            try:
                if save_base:  # the adapter names its base by the path beside it, so the folder can move
                    for c in configs.values():
                        c.base_model_name_or_path = BASE_FOLDER
                vlm.save_pretrained(folder, save_embedding_layers=embeddings)
            finally:
                for name, c in configs.items():
                    c.base_model_name_or_path = recorded[name]
            settings.update(weights="adapter", base=BASE_FOLDER if save_base else None, embedding_layers=embeddings)
    write_json(os.path.join(folder, IVTLR_CONFIG_FILE), settings)
    return settings


def read_settings(path: str) -> dict:
    """The verified folder ``path``'s ``ivtlr_config.json``, checked; CheckpointError naming the file."""
    from mmlatent.train.checkpoint import CheckpointError, checked_name, read_settings_file
    where = os.path.join(path, IVTLR_CONFIG_FILE)
    settings = read_settings_file(path, IVTLR_CONFIG_FILE, FORMAT, VERSION, "an IVT-LR settings file")

    def positive(key, minimum=1):
        value = settings.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise CheckpointError(f"{where}: {key}: expected an int >= {minimum}, got {value!r}")

    positive("latent_token_id", 0)
    positive("k")
    positive("vocab_size")
    if settings.get("position_mode") not in POSITION_MODES:
        raise CheckpointError(f"{where}: position_mode: expected one of {POSITION_MODES}, got "
                              f"{settings.get('position_mode')!r}")
    if settings.get("base") is not None:
        try:
            checked_name(settings["base"], "base")
        except ValueError as err:
            raise CheckpointError(f"{where}: {err}") from None
    return settings


def _required(path: str, files, names, what: str) -> None:
    from mmlatent.train.checkpoint import MANIFEST, CheckpointError
    missing = [n for n in names if n not in files]
    if missing:
        raise CheckpointError(f"{os.path.join(path, MANIFEST)}: does not list {missing[0]}, which {what} must have")


def load_model_folder(folder: str, *, dtype: Optional[torch.dtype] = None, attn_implementation: Optional[str] = None,
                      device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """The model of a ``save_pretrained`` folder, by the class its config.json names (one IVT-LR supports); a
    folder transformers cannot load, or tensors whose names or shapes differ from that model's, raise
    CheckpointError naming the file (and the tensor with both shapes)."""
    import transformers

    from mmlatent.train.checkpoint import CheckpointError, read_json
    config = read_json(folder, "config.json")
    architectures = config.get("architectures") if isinstance(config, dict) else None
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    cls = getattr(transformers, name) if name in supported_model_classes() and hasattr(transformers, name) \
        else transformers.AutoModelForImageTextToText
    options = {k: v for k, v in (("dtype", dtype), ("attn_implementation", attn_implementation)) if v is not None}
    weights = next((os.path.join(folder, n) for n in WEIGHTS_FILES if os.path.exists(os.path.join(folder, n))),
                   os.path.join(folder, WEIGHTS_FILES[0]))
    try:
        with quiet_progress():
            model, info = cls.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True,
                                              **options)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}: not a model folder transformers loads ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, expected = mismatched[0]
        raise CheckpointError(f"{weights}: tensor {key} has shape {list(stored)} in the checkpoint but "
                              f"{list(expected)} in the model")
    for kind, what in (("missing_keys", "tensors the model has"), ("unexpected_keys", "tensors the model lacks")):
        keys = sorted(info.get(kind) or [])
        if keys:
            raise CheckpointError(f"{weights}: {kind.split('_')[0]} {len(keys)} {what} (first: {keys[0]})")
    model.eval()
    return model.to(device) if device is not None else model


def _resize(model: nn.Module, vocab_size: int, where: str) -> None:
    from mmlatent.train.checkpoint import CheckpointError
    rows = model.get_input_embeddings().weight.shape[0]
    if rows > vocab_size:
        raise CheckpointError(f"{where}: the adapter was saved with a vocabulary of {vocab_size}, the base model has "
                              f"{rows} rows")
    if rows < vocab_size:  # the added rows come from the adapter file; their initial values must not matter
        with torch.random.fork_rng(devices=[]):
            model.resize_token_embeddings(vocab_size, mean_resizing=False)


def load_pretrained(directory: str, model: Optional[nn.Module] = None, *, base_model: Optional[nn.Module] = None,
                    device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None,
                    attn_implementation: Optional[str] = None, is_trainable: bool = False,
                    verified: bool = False) -> Tuple[nn.Module, dict]:
    """(model, settings) of a folder written by :func:`write_pretrained`, verified against its manifest first
    (``verified``: the caller has just verified ``directory`` itself, so its files are not hashed again).

    ``model``: a model that already holds the folder's weights (loaded with your own device map, say): only the
    settings are read. ``base_model`` (an adapter folder): the base ``nn.Module`` (changed in place, as
    ``PeftModel.from_pretrained`` changes it) or a local model folder; default: the folder's ``base/``, else
    ``adapter_config.json``'s ``base_model_name_or_path`` when it is a local model folder."""
    from mmlatent.train.checkpoint import CheckpointError, read_manifest, resolve_checkpoint
    path = directory if verified else resolve_checkpoint(directory, required=(IVTLR_CONFIG_FILE,))
    files = read_manifest(path, required=(IVTLR_CONFIG_FILE,))["files"]
    settings = read_settings(path)
    where = os.path.join(path, IVTLR_CONFIG_FILE)
    if settings["weights"] == "full":
        _required(path, files, ("config.json",), "a full model folder")
        if not any(n in files for n in WEIGHTS_FILES):
            _required(path, files, WEIGHTS_FILES[:1], "a full model folder")
        if base_model is not None:
            raise ValueError(f"base_model: {path} holds a full model, not an adapter")
        if model is None:
            model = load_model_folder(path, dtype=dtype, attn_implementation=attn_implementation, device=device)
        return model, settings
    _required(path, files, ADAPTER_FILES, "an adapter folder")
    if model is not None:
        if not is_peft_model(model):
            raise ValueError(f"model: {path} holds a PEFT adapter; pass the model it adapts as base_model=, or a "
                             f"PEFT model that already holds it as model=")
        return model, settings
    if base_model is None:
        if settings["base"] is not None:
            _required(path, files, (f"{settings['base']}/config.json",), "the base it names")
            base_model = os.path.join(path, *settings["base"].split("/"))
        else:
            adapter = read_adapter_config(path)
            base_model = _model_folder(adapter.get("base_model_name_or_path"), relative_to=path)
            if base_model is None:
                raise ValueError(f"base_model: required: {os.path.join(path, 'adapter_config.json')} names "
                                 f"{adapter.get('base_model_name_or_path')!r}, which is no local model folder")
    if isinstance(base_model, (str, os.PathLike)):
        if _model_folder(str(base_model)) is None:
            raise ValueError(f"base_model: {base_model} is not a model folder (no config.json)")
        base_model = load_model_folder(str(base_model), dtype=dtype, attn_implementation=attn_implementation,
                                       device=device)
    elif not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model: expected an nn.Module or a model folder, got {type(base_model).__name__}")
    elif device is not None:
        base_model.to(device)
    _resize(base_model, settings["vocab_size"], where)
    from peft import PeftModel
    adapter_file = os.path.join(path, ADAPTER_FILES[1])
    try:
        with quiet_progress():
            model = PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{adapter_file}: not an adapter of this base model ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[-1] if str(err) else ''})") from None
    if not is_trainable:
        model.eval()
    return model, settings


def read_adapter_config(path: str) -> dict:
    from mmlatent.train.checkpoint import CheckpointError, read_json
    adapter = read_json(path, ADAPTER_FILES[0])
    if not isinstance(adapter, dict):
        raise CheckpointError(f"{os.path.join(path, ADAPTER_FILES[0])}: expected a JSON object")
    return adapter


__all__ = ["IVTLR_CONFIG_FILE", "BASE_FOLDER", "check_replaceable", "write_pretrained", "load_pretrained",
           "load_model_folder", "read_settings", "read_adapter_config", "is_peft_model", "quiet_progress"]
