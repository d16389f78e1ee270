"""The norms family: ``rms_norm`` (op.py), T5's RMS layer norm as one op that keeps only its input and one float32
statistic per row, its torch backend (torch_impl.py) and Triton kernels (triton_kernels.py, imported only when
that backend runs)."""
from .op import RMS_NORM, rms_norm  # noqa: F401

__all__ = ["rms_norm", "RMS_NORM"]
