import os
import sys
import warnings

# Must precede any import of triton kernels: without a GPU the Triton backend runs under the interpreter.
try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # triton.language's own @triton.jit functions (tl.sigmoid, ...) are built when triton is first imported, as
    # interpreted functions only if TRITON_INTERPRET is set then; tests that unset it (docs/api.md's examples run
    # as a user's CPU session) must not be the first to import it
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover
        pass
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

# ------------------------------------------------------------------------------ deprecations in mmlatent's calls
# A FutureWarning or DeprecationWarning that transformers, diffusers or peft raise inside a call mmlatent makes
# into them is an error of the test suite: mmlatent must keep working when the deprecated API is removed.
# pyproject's filterwarnings cannot say this alone: a warning's module is the frame its stacklevel points at, and
# these libraries attribute theirs to their own frames (transformers' ``past_key_values`` FutureWarning to
# transformers.utils.output_capturing, the one of ``gradient_checkpointing_enable`` to transformers.modeling_utils),
# not to mmlatent's caller. So the guard looks at the call stack when the warning is issued: walking outwards from
# the library's frame, through that library's own frames, torch's (nn.Module.__call__, checkpointing),
# accelerate's hooks and the standard library's, it reaches mmlatent's code. The warning is then raised as an
# exception where it is issued, as ``-W error`` would. Not flagged: a test calling the library itself, and one
# library's deprecated call into another (peft calling a deprecated transformers method is peft's to fix, and
# transformers' upper bound covers it). Libraries that bound ``from warnings import warn`` at import time would
# bypass the guard; none of the three does.
GUARDED_LIBRARIES = ("transformers", "diffusers", "peft")
PASS_THROUGH = ("torch", "accelerate")
_warn = warnings.warn


def _package(frame) -> str:
    return (frame.f_globals.get("__name__") or "").partition(".")[0]


def _in_stdlib(frame) -> bool:
    # by module name: in a virtualenv the standard library's platform path holds site-packages too
    return _package(frame) in sys.stdlib_module_names or frame.f_code.co_filename.startswith("<frozen ")


def mmlatent_call_into_library(frame):
    """The library (one of GUARDED_LIBRARIES) when ``frame``, the one issuing a warning, belongs to it and runs
    inside a call mmlatent's code made into it; else None."""
    library = _package(frame)
    if library not in GUARDED_LIBRARIES:
        return None
    caller = frame.f_back
    while caller is not None:
        package = _package(caller)
        if package == "mmlatent":
            return library
        if package != library and package not in PASS_THROUGH and not _in_stdlib(caller):
            return None  # a test's own call, or another package's
        caller = caller.f_back
    return None


def _guarded_warn(message, category=None, stacklevel=1, source=None, **kwargs):
    if category is None:
        category = type(message) if isinstance(message, Warning) else UserWarning
    if issubclass(category, (DeprecationWarning, FutureWarning)):
        library = mmlatent_call_into_library(sys._getframe(1))
        if library is not None:
            raise category(f"{message} [an error in mmlatent's tests: raised by {library} inside a call mmlatent "
                           f"makes; see tests/conftest.py]")
    # one frame more than the caller asked for: this function's own
    return _warn(message, category, stacklevel + 1, source, **kwargs)


def pytest_configure(config):
    warnings.warn = _guarded_warn


def pytest_unconfigure(config):
    warnings.warn = _warn


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("triton") pins MMLATENT_BACKEND for the rest of the test ("reference" is the torch backend's
    alias, still accepted)."""
    def pin(name: str):
        monkeypatch.setenv("MMLATENT_BACKEND", name)
    return pin


@pytest.fixture
def one_thread():
    """Training runs pinned to one intra-op thread: on a shared, loaded machine two spinning threads per tiny
    GEMM are many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
