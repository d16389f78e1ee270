"""Crash-safe, verified checkpoint folders: the one place where mmlatent writes and reads a checkpoint.

A checkpoint is a folder of files plus ``manifest.json`` (each file's size and SHA-256, subfolders' files under
``/``-separated names such as ``base/config.json``), written last. Writing ``DIR`` goes through two sibling folders:

1. every file is written and fsynced into ``DIR.tmp``; the manifest goes in last (written to a temporary name,
   fsynced, renamed), so a ``DIR.tmp`` with a manifest is complete;
2. an existing ``DIR`` is renamed to ``DIR.old``, ``DIR.tmp`` is renamed to ``DIR``, and ``DIR.old`` is deleted.

Whatever instant a process is killed at, one complete checkpoint survives: the old ``DIR`` (kill during 1),
``DIR.old`` and the complete ``DIR.tmp`` (kill between the renames of 2), or the new ``DIR``.
:func:`resolve_checkpoint` finds it: ``DIR`` when it verifies, else the complete ``DIR.tmp`` (the newer), else
``DIR.old``. Loading never moves files; :func:`recover_checkpoint` (``mmlatent recover DIR``, and the start of
every write to ``DIR``) finishes the interrupted replacement on disk.

The two kinds of checkpoint are written here: :func:`write_trainer_checkpoint` (``checkpoint-N``, what
:meth:`mmlatent.train.Trainer.resume` continues) and :func:`write_run_checkpoint` (a finished run's ``final``, what
``mmlatent eval`` reads: a standard Hugging Face / PEFT folder, see :mod:`mmlatent.models.ivtlr.saving`);
:func:`write_json` is the one atomic JSON writer. Files that a library writes itself (``save_pretrained``) go in
through ``write_checkpoint``'s ``fill``, into the scratch folder, and are fsynced and hashed like the rest.

Every load verifies the manifest: a missing, truncated or altered file is refused with a :class:`CheckpointError`
that names the file. Files added to the folder after it was written (``eval.json``) are not covered and not
checked.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

MANIFEST = "manifest.json"
# what a training checkpoint (checkpoint-N) and a finished run (final) hold besides the manifest; a run's model
# files depend on its layout (a full save_pretrained folder, a PEFT adapter folder, or the model.safetensors of the
# first format), which mmlatent.train.ivtlr.load_run tells apart
TRAINER_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json")
RUN_FILES = ("run.json",)
FORMAT = "mmlatent-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the folder and file and what is wrong."""


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str, payload: Any, indent: Optional[int] = 1) -> None:
    """Writes ``payload`` as UTF-8 JSON atomically (a temporary file, fsynced, renamed over ``path``)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checked_name(name: str, what: str = "name") -> str:
    """``name`` if it is a file name a manifest may list: a relative path with ``/`` between its parts (no part
    empty, ``.`` or ``..``), not the manifest itself; else ValueError naming ``what``."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(p in ("", ".", "..") for p in parts) or "\\" in name or name == MANIFEST:
        raise ValueError(f"{what}: {name!r} is not a relative file name (parts joined by '/') other than {MANIFEST}")
    return name


def _local(directory: str, name: str) -> str:
    return os.path.join(directory, *name.split("/"))


def _files(directory: str) -> List[str]:
    """Every regular file under ``directory``, subfolders included, as sorted ``/``-separated names; the manifest
    and the temporary files of unfinished atomic writes left out."""
    names = []
    for root, folders, files in os.walk(directory):
        folders.sort()
        prefix = os.path.relpath(root, directory)
        for name in files:
            rel = name if prefix == "." else "/".join(prefix.split(os.sep) + [name])
            if rel != MANIFEST and not name.endswith(".tmp") and os.path.isfile(os.path.join(root, name)):
                names.append(rel)
    return sorted(names)


def _fsync_tree(directory: str) -> None:
    """fsyncs every file under ``directory`` and every subfolder (not ``directory`` itself)."""
    for root, folders, files in os.walk(directory, topdown=False):
        for name in files:
            _fsync_file(os.path.join(root, name))
        if root != directory:
            _fsync_dir(root)


def write_manifest(directory: str) -> dict:
    """Records every regular file under ``directory`` (subfolders included; not the manifest) with its size and
    SHA-256, atomically."""
    files = {}
    for name in _files(directory):
        path = _local(directory, name)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    manifest = {"format": FORMAT, "version": VERSION, "files": files}
    write_json(os.path.join(directory, MANIFEST), manifest)
    return manifest


def write_checkpoint(directory: str, writers: Mapping[str, Callable[[str], None]],
                     fill: Optional[Callable[[str], None]] = None) -> str:
    """Writes ``directory`` crash-safely: ``fill(folder)``, when given, first writes any files (in subfolders too)
    into the scratch folder, as a library's ``save_pretrained`` does; then ``writers[name](path)`` writes the file
    ``name`` (a ``/``-separated relative name) at ``path``. Everything is fsynced, the manifest is added last and an
    existing folder of that name is replaced only once the new one is complete."""
    for name in writers:
        checked_name(name, "writers")
    directory = os.path.normpath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp, old = directory + ".tmp", directory + ".old"
    if not os.path.isdir(directory):  # a replacement a crash interrupted: its complete copy goes in place first
        recover_checkpoint(directory, missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if fill is not None:
        fill(tmp)
        if os.path.exists(os.path.join(tmp, MANIFEST)):
            raise ValueError(f"fill: wrote {MANIFEST}, which only write_checkpoint writes")
        _fsync_tree(tmp)
    for name, write in writers.items():
        path = _local(tmp, name)
        if os.path.exists(path):
            raise ValueError(f"writers: {name!r} was already written by fill")
        if "/" in name:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path)
        _fsync_file(path)
        if "/" in name:
            _fsync_dir(os.path.dirname(path))
    write_manifest(tmp)
    _fsync_dir(tmp)
    # only now, with a newer complete copy in DIR.tmp, may a leftover DIR.old of an earlier crash go
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(tmp, directory)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def save_into(folder: str, save: Callable[[str], None], what: str) -> List[str]:
    """Runs ``save(scratch)`` (a library's ``save_pretrained``) in a scratch folder inside ``folder`` (same file
    system, so the moves are renames) and moves what it wrote into ``folder``; a name that is already there is
    refused, naming ``what`` wrote it. Returns the names moved."""
    scratch = tempfile.mkdtemp(prefix=".part-", dir=folder)
    try:
        save(scratch)
        names = _files(scratch)
        for name in names:
            target = _local(folder, name)
            if os.path.exists(target):
                raise ValueError(f"{what}: wrote {name}, which another part of the checkpoint already wrote")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(_local(scratch, name), target)
        return names
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_trainer_checkpoint(directory: str, weights: Mapping[str, torch.Tensor],
                             optimizer: Mapping[str, torch.Tensor], rng: Mapping[str, torch.Tensor],
                             state: dict) -> str:
    """``checkpoint-N``: model.safetensors (``weights``, the trainable parameters), optimizer.safetensors (the
    optimizer's tensors), rng.safetensors (torch generator states, uint8) and trainer.json (``state``: step,
    schedule, data position, the optimizer's other entries, RNG states, history, run config), on the CPU."""
    from safetensors.torch import save_file
    return write_checkpoint(directory, {
        "model.safetensors": lambda path: save_file(dict(weights), path),
        "optimizer.safetensors": lambda path: save_file(dict(optimizer), path),
        "rng.safetensors": lambda path: save_file(dict(rng), path),
        "trainer.json": lambda path: write_json(path, state, indent=None),
    })


def write_run_checkpoint(directory: str, write_model: Callable[[str], None], run: dict, tokenizer: Any,
                         image_processor: Optional[Any] = None) -> str:
    """A finished run's ``final``: the model's files (``write_model(folder)`` writes them, see
    :func:`mmlatent.models.ivtlr.saving.write_pretrained`), run.json (``run``: config, result summary and which
    tokenizer was saved), the tokenizer (``word_tokenizer.json`` for a
    :class:`mmlatent.data.tokenizer.WordTokenizer`, else the files its Hugging Face tokenizer saves) and, when
    given, the image processor's ``preprocessor_config.json``; every file under one manifest."""
    from mmlatent.data.tokenizer import WORD_TOKENIZER_FILE, WordTokenizer

    def fill(folder: str) -> None:
        save_into(folder, write_model, "the model")
        if isinstance(tokenizer, WordTokenizer):
            save_into(folder, lambda scratch: tokenizer.save(os.path.join(scratch, WORD_TOKENIZER_FILE)),
                      "the tokenizer")
        else:  # a checkpoint's tokenizer, with the latent tokens added
            save_into(folder, tokenizer.tokenizer.save_pretrained, "the tokenizer")
        if image_processor is not None:
            save_into(folder, image_processor.save_pretrained, "the image processor")

    return write_checkpoint(directory, {"run.json": lambda path: write_json(path, run)}, fill=fill)


def read_manifest(directory: str, required: Sequence[str] = ()) -> dict:
    """The manifest of ``directory``, checked for form; every name in ``required`` must be listed in it."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: not a complete checkpoint: no {MANIFEST} (it is written last, so the "
                              f"save that made this folder did not finish, or the folder was not written by mmlatent)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a valid manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not an mmlatent checkpoint manifest")
    for name, entry in manifest["files"].items():
        try:
            checked_name(name)
        except ValueError:
            entry = None
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int)):
            raise CheckpointError(f"{path}: entry {name!r} is not a file name with its bytes and sha256")
    for name in required:
        if name not in manifest["files"]:
            raise CheckpointError(f"{path}: does not list {name}, which this checkpoint must have; the manifest "
                                  f"or the folder was altered")
    return manifest


def verify_checkpoint(directory: str, required: Sequence[str] = ()) -> dict:
    """Checks every file the manifest lists (presence, size, SHA-256), and that it lists every name in
    ``required``; returns the manifest or raises :class:`CheckpointError` naming the first file that differs."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint folder")
    manifest = read_manifest(directory, required)
    for name, expected in manifest["files"].items():
        path = _local(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: listed in {MANIFEST} but missing")
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes where the manifest records {expected['bytes']} "
                                  f"(truncated or rewritten); the checkpoint is corrupt")
        digest = _sha256(path)
        if digest != expected["sha256"]:
            raise CheckpointError(f"{path}: content differs from the manifest (SHA-256 {digest[:16]}... where "
                                  f"{expected['sha256'][:16]}... was recorded); the checkpoint is corrupt")
    return manifest


def _complete(directory: str, required: Sequence[str] = ()) -> bool:
    try:
        verify_checkpoint(directory, required)
        return True
    except CheckpointError:
        return False


def resolve_checkpoint(directory: str, required: Sequence[str] = ()) -> str:
    """The folder holding the verified checkpoint saved as ``directory``, also after a save into it was killed;
    its manifest must list every name in ``required`` (the files the caller will read).

    Raises :class:`CheckpointError` naming what is wrong when no verified checkpoint of that name exists."""
    directory = os.path.normpath(directory)
    if os.path.isdir(directory):
        verify_checkpoint(directory, required)  # a damaged folder is an error, never silently replaced
        return directory
    for candidate in (directory + ".tmp", directory + ".old"):  # the newer first
        if _complete(candidate, required):
            return candidate
    if os.path.exists(directory + ".tmp") or os.path.exists(directory + ".old"):
        raise CheckpointError(f"{directory}: missing, and neither {directory}.tmp nor {directory}.old holds a "
                              f"complete checkpoint")
    raise CheckpointError(f"{directory}: no such checkpoint folder")


def recover_checkpoint(directory: str, missing_ok: bool = False) -> str:
    """Finishes a replacement of ``directory`` that was interrupted: puts the newest complete copy in place and
    removes the leftovers. Returns ``directory``."""
    directory = os.path.normpath(directory)
    tmp, old = directory + ".tmp", directory + ".old"
    if os.path.isdir(directory):
        verify_checkpoint(directory)  # a damaged DIR keeps its siblings: they may be the only good copy
    else:
        found = next((c for c in (tmp, old) if _complete(c)), None)
        if found is None:
            if missing_ok:
                return directory
            raise CheckpointError(f"{directory}: nothing to recover (no complete {os.path.basename(tmp)} or "
                                  f"{os.path.basename(old)})")
        os.rename(found, directory)
        _fsync_dir(os.path.dirname(os.path.abspath(directory)))
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    return directory


def read_json(directory: str, name: str) -> Any:
    path = os.path.join(directory, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or corrupt") from None


def read_settings_file(directory: str, name: str, file_format: str, version: int, what: str) -> dict:
    """``directory/name``, a settings JSON object whose ``format`` is ``file_format`` and whose ``version`` is an int
    up to ``version`` (what this mmlatent reads); ``what`` names the kind in the error ("an IVT-LR settings
    file"). CheckpointError naming the file otherwise."""
    where = os.path.join(directory, name)
    settings = read_json(directory, name)
    if not isinstance(settings, dict) or settings.get("format") != file_format:
        raise CheckpointError(f"{where}: not {what} (format {file_format!r})")
    found = settings.get("version")
    if isinstance(found, bool) or not isinstance(found, int) or found > version:
        raise CheckpointError(f"{where}: version {found!r}, this mmlatent reads up to {version}; upgrade mmlatent")
    if settings.get("weights") not in ("full", "adapter"):
        raise CheckpointError(f"{where}: weights: expected 'full' or 'adapter', got {settings.get('weights')!r}")
    return settings


def load_tensors(directory: str, name: str, device: str = "cpu") -> Dict:
    from safetensors.torch import load_file
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(path, device=device)
    except Exception as err:  # safetensors raises its own error types for every malformed header or body
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def check_shapes(expected: Mapping[str, tuple], stored: Mapping, path: str, what: str = "parameter") -> None:
    """Refuses ``stored`` tensors whose names or shapes differ from ``expected`` (name -> shape), naming the first
    differing name and both shapes."""
    missing = [n for n in expected if n not in stored]
    unexpected = [n for n in stored if n not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} {what}s the model has (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} {what}s the model does not have (first: {unexpected[0]})")
        raise CheckpointError(f"{path}: {'; '.join(parts)}")
    for name, shape in expected.items():
        if tuple(stored[name].shape) != tuple(shape):
            raise CheckpointError(f"{path}: {what} {name} has shape {list(stored[name].shape)} in the checkpoint "
                                  f"but {list(shape)} in the model")


__all__ = ["CheckpointError", "write_checkpoint", "save_into", "checked_name", "write_trainer_checkpoint",
           "write_run_checkpoint",
           "verify_checkpoint", "resolve_checkpoint", "recover_checkpoint",
           "write_manifest", "read_manifest", "read_json", "write_json", "load_tensors", "check_shapes", "MANIFEST",
           "TRAINER_FILES", "RUN_FILES"]
