"""The public API is typed and documented: every public function and method of mmlatent's public modules has
annotations, ``mmlatent/py.typed`` ships (PEP 561), and every ``python`` block of docs/api.md runs."""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import time
import types
from typing import Callable, Dict, Iterator, List, Set, Tuple

import pytest
import torch

import mmlatent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.dirname(os.path.abspath(mmlatent.__file__))
API_DOC = os.path.join(ROOT, "docs", "api.md")

# The packages whose ``__all__`` is the public API. Their public submodules (no part of the dotted name starts
# with "_", whether or not the package's ``__all__`` names them) are walked too, each with its own ``__all__``
# (or, without one, the public names it defines); ``__main__`` modules are scripts, not API.
PACKAGES = ("mmlatent", "mmlatent.kernels", "mmlatent.models", "mmlatent.train", "mmlatent.data", "mmlatent.bench")
# Methods with a dunder name that are part of a class's public surface.
PUBLIC_DUNDERS = ("__init__", "__call__", "__iter__", "__next__", "__len__", "__getitem__", "__enter__", "__exit__")
UNANNOTATED_OK = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


# ------------------------------------------------------------------------------------------------ type hints
def public_module_names() -> List[str]:
    """Every public module of the packages; only packages are imported here (walk_packages imports them)."""
    names: Set[str] = set(PACKAGES)
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", ()):
            if isinstance(getattr(module, name, None), types.ModuleType):
                names.add(getattr(module, name).__name__)
    for info in pkgutil.walk_packages(mmlatent.__path__, "mmlatent."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.add(info.name)
    return sorted(names)


def public_names(module: types.ModuleType) -> List[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__]


def in_package(function: object) -> bool:
    """Written in mmlatent's sources (not generated: dataclass and NamedTuple methods come from ``<string>``)."""
    code = getattr(function, "__code__", None)
    return code is not None and os.path.abspath(code.co_filename).startswith(PACKAGE_DIR + os.sep)


def missing_annotations(function: Callable, qualname: str, method: bool) -> List[str]:
    """One line per missing annotation of ``function``: every parameter but self / cls (of a method), *args and
    **kwargs, and the return."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return []
    problems = []
    parameters = list(signature.parameters.values())
    if method and parameters and parameters[0].name in ("self", "cls", "mcs"):
        parameters = parameters[1:]
    for parameter in parameters:
        if parameter.kind in UNANNOTATED_OK:
            continue
        if parameter.annotation is inspect.Parameter.empty:
            problems.append(f"{qualname}: parameter {parameter.name!r} has no annotation")
    if signature.return_annotation is inspect.Signature.empty:
        problems.append(f"{qualname}: no return annotation")
    return problems


def _function(value: object) -> object:
    """The Python function under functools wrappers (lru_cache, wraps, torch.no_grad), else ``value``."""
    return inspect.unwrap(value) if callable(value) else value  # type: ignore[arg-type]


def class_methods(cls: type) -> Iterator[Tuple[str, Callable, bool]]:
    """(qualified name, function, is_method) of every public method ``cls`` has from mmlatent's classes
    (inherited ones included: a public class's methods are public even when its base class is private)."""
    for klass in cls.__mro__:
        if not klass.__module__.startswith("mmlatent"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") and name not in PUBLIC_DUNDERS:
                continue
            qualname = f"{klass.__module__}.{klass.__qualname__}.{name}"
            if isinstance(value, staticmethod):
                yield qualname, _function(value.__func__), False
            elif isinstance(value, classmethod):
                yield qualname, _function(value.__func__), True
            elif isinstance(value, property):
                for accessor in (value.fget, value.fset):
                    if accessor is not None:
                        yield qualname, _function(accessor), True
            elif isinstance(value, functools.cached_property):
                yield qualname, _function(value.func), True
            elif inspect.isfunction(_function(value)):
                yield qualname, _function(value), True


def collect_offenders() -> List[Tuple[str, str, str]]:
    """(defining module, public module it is reached from, problem) for every missing annotation of a public
    function, or of a public method of a public class. Imports every public module: run it in a fresh interpreter
    (:func:`offenders_by_module`), since some (``mmlatent.kernels.compile_check``) set the environment when
    imported."""
    found: Dict[str, Tuple[str, str, str]] = {}
    for module_name in public_module_names():
        module = importlib.import_module(module_name)
        for name in public_names(module):
            value = getattr(module, name, None)
            if inspect.isclass(value) and value.__module__.startswith("mmlatent"):
                callables = list(class_methods(value))
            elif inspect.isfunction(_function(value)):
                function = _function(value)
                callables = [(f"{function.__module__}.{function.__qualname__}", function, False)]
            else:
                continue
            for qualname, function, method in callables:
                if in_package(function):
                    for problem in missing_annotations(function, qualname, method):
                        found.setdefault(problem, (function.__module__, module_name, problem))
    return sorted(found.values())


@functools.lru_cache(maxsize=None)
def offenders_by_module() -> Dict[str, Tuple[str, ...]]:
    """Public module -> the missing annotations of what it defines (what a private module defines counts for the
    public module that exposes it), from :func:`collect_offenders` run in a subprocess."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_api; "
            "print(json.dumps(test_api.collect_offenders()))")
    done = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    public = set(public_module_names())
    grouped: Dict[str, List[str]] = {}
    for defining, reached_from, problem in json.loads(done.stdout.strip().splitlines()[-1]):
        grouped.setdefault(defining if defining in public else reached_from, []).append(problem)
    return {module: tuple(sorted(problems)) for module, problems in grouped.items()}


def test_the_walk_sees_the_packages_and_their_submodules():
    names = public_module_names()
    assert set(PACKAGES) <= set(names)
    assert {"mmlatent.kernels.diffusion.schedule", "mmlatent.models.ivtlr.rollout", "mmlatent.models.tiny",
            "mmlatent.train.loop", "mmlatent.data.collate", "mmlatent.bench.harness", "mmlatent.cli"} <= set(names)
    assert not any(part.startswith("_") for name in names for part in name.split("."))


@pytest.mark.parametrize("module_name", public_module_names())
def test_public_functions_and_methods_are_annotated(module_name):
    problems = offenders_by_module().get(module_name, ())
    assert not problems, (f"{len(problems)} missing annotation(s) in {module_name}:\n  " + "\n  ".join(problems))


def test_the_annotation_check_names_an_offender():
    def untyped(x, y: int, *args, **kwargs) -> int:
        return y

    def no_return(x: int):
        return x

    assert missing_annotations(untyped, "untyped", False) == ["untyped: parameter 'x' has no annotation"]
    assert missing_annotations(no_return, "no_return", False) == ["no_return: no return annotation"]


# ------------------------------------------------------------------------------------------------ PEP 561
def test_py_typed_marker_ships():
    assert os.path.isfile(os.path.join(PACKAGE_DIR, "py.typed"))
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["mmlatent"]


# ------------------------------------------------------------------------------------------------ docs/api.md
def api_blocks() -> List[Tuple[str, int, str]]:
    """(heading, line, source) of every ```python block of docs/api.md (other fences, ```bash, are skipped)."""
    with open(API_DOC) as f:
        lines = f.read().splitlines()
    blocks, heading, fence, start, body = [], "", None, 0, []
    for number, line in enumerate(lines, 1):
        if fence is None:
            if line.startswith("```"):
                fence, start, body = line[3:].strip(), number, []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.strip() == "```":
            if fence == "python":
                blocks.append((heading, start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"docs/api.md:{start}: unterminated ``` block"
    return blocks


BLOCKS = api_blocks()
# On one CPU core each block takes well under this; the file as a whole stays under a minute.
BLOCK_SECONDS = 30.0


def test_api_md_has_examples():
    assert len(BLOCKS) >= 20


@pytest.mark.parametrize("package", ["mmlatent.kernels", "mmlatent.models", "mmlatent.train", "mmlatent.data"])
def test_api_md_lists_the_public_api(package):
    with open(API_DOC) as f:
        text = f.read()
    names = list(importlib.import_module(package).__all__)
    if package == "mmlatent.train":
        names += ["Curriculum", "RunConfig", "save_run", "load_run"]
    missing = [name for name in names if f"`{name}" not in text and f" {name}(" not in text]
    assert not missing, f"docs/api.md does not list {', '.join(missing)} of {package}"
    assert all(f"`{name}" in text for name in ("Case", "run", "python -m mmlatent.bench", "mmlatent train"))


@pytest.mark.parametrize("heading,line,source", BLOCKS, ids=[f"L{line}-{heading[:40]}" for heading, line, _ in BLOCKS])
def test_api_md_example_runs(heading, line, source, tmp_path, monkeypatch):
    if source.splitlines()[0].strip() == "# requires: cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not torch.cuda.is_available():  # as a user runs it on a CPU: the torch backend, not the Triton interpreter
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.chdir(tmp_path)
    namespace: Dict[str, object] = {"__name__": "__api_example__"}
    started = time.perf_counter()
    # the block's lines keep their numbers in docs/api.md, so a traceback points into the file
    exec(compile("\n" * line + source, API_DOC, "exec"), namespace)
    elapsed = time.perf_counter() - started
    assert elapsed < BLOCK_SECONDS, f"docs/api.md:{line} ({heading}) took {elapsed:.1f} s"
