import os

# Must precede any import of triton kernels: without a GPU the Triton backend runs under the interpreter.
try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("triton") pins MMLATENT_BACKEND for the rest of the test."""
    def pin(name: str):
        monkeypatch.setenv("MMLATENT_BACKEND", name)
    return pin
