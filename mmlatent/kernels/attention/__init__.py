"""The attention family: ``attention_with_scores`` and ``row_attention_mass`` (op.py), their torch backend
(torch_impl.py) and Triton kernels (triton_kernels.py, imported only when that backend runs)."""
from .op import ATTENTION_WITH_SCORES, ROW_ATTENTION_MASS, attention_with_scores, row_attention_mass  # noqa: F401

__all__ = ["attention_with_scores", "row_attention_mass", "ATTENTION_WITH_SCORES", "ROW_ATTENTION_MASS"]
