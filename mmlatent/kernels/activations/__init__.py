"""The activations family: ``geglu`` (op.py), the gated GELU of T5 / flan-T5 feed-forward layers as one op that
saves only its two inputs, its torch backend (torch_impl.py) and Triton kernels (triton_kernels.py, imported only
when that backend runs)."""
from .op import GEGLU, geglu  # noqa: F401

__all__ = ["geglu", "GEGLU"]
