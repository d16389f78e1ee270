"""The methods a run can use, in one place: their modules (each has ``train``, ``evaluate``, ``evaluate_result``,
``load_run``, ``build_data``, ``summary_lines``, ``table_row``, ``markdown_table`` and ``RUN_CONFIG``), and their
YAML config files: one reader, one check of the keys, and the dispatch on a file's ``method`` key (absent: IVT-LR,
the first method, whose files predate the key).

Every problem is a ValueError or FileNotFoundError that names the file, and the key where there is one: no such
file, a folder, text that is not UTF-8, invalid YAML (with its line and column), a document that is not a
mapping, unknown keys, a value out of range (the config class's own check, prefixed with the file)."""
from __future__ import annotations

from dataclasses import fields
from types import ModuleType
from typing import Any, Iterable, Type, TypeVar

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


def method_module(name: str) -> ModuleType:
    """The module of the method ``name`` (``"ivtlr"`` or ``"modal_mixed"``); another name is a ValueError."""
    from . import ivtlr, modal_mixed
    modules = {"ivtlr": ivtlr, modal_mixed.METHOD: modal_mixed}
    if name not in modules:
        raise ValueError(f"method: expected one of {', '.join(modules)}, got {name!r}")
    return modules[name]


def load_config(path: str) -> Any:
    """The run config of a YAML file, by its ``method`` key: absent or ``ivtlr``, an IVT-LR
    :class:`~mmlatent.train.ivtlr.RunConfig`; ``modal_mixed``, a
    :class:`~mmlatent.train.modal_mixed.ModalMixedConfig`. Another method is a ValueError naming the file."""
    raw = read_yaml(path)
    try:
        cls = method_module(raw.get("method", "ivtlr")).RUN_CONFIG
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return from_mapping(cls, raw, path, also_known=() if "method" in {f.name for f in fields(cls)} else ("method",))


__all__ = ["read_yaml", "from_mapping", "load_config", "method_module"]
