"""The fusion family: ``gated_mix`` (op.py), MM-CoT's fusion gate as two summed GEMMs and one elementwise pass,
its torch backend (torch_impl.py) and Triton kernels (triton_kernels.py, imported only when that backend runs)."""
from .op import GATED_MIX, gated_mix  # noqa: F401

__all__ = ["gated_mix", "GATED_MIX"]
