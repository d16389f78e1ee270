"""The linear-loss family: ``linear_cross_entropy`` and ``linear_log_probs`` (op.py), the row-chunk walk both
backends share (chunks.py), the torch chunk function (torch_impl.py) and the Triton one (triton_kernels.py,
imported only when that backend runs)."""
from .chunks import default_chunk_rows  # noqa: F401
from .op import LINEAR_CROSS_ENTROPY, LINEAR_LOG_PROBS, linear_cross_entropy, linear_log_probs  # noqa: F401

__all__ = ["linear_cross_entropy", "linear_log_probs", "default_chunk_rows", "LINEAR_CROSS_ENTROPY",
           "LINEAR_LOG_PROBS"]
