"""The selection family: ``select_topk_tokens`` (op.py), its torch backend (torch_impl.py), its Triton kernel
(triton_kernels.py, imported only when that backend runs) and the C++/CUDA op of ``mmlatent._C`` (csrc/)."""
from .op import SELECT_TOPK_TOKENS, register_native_fake, select_topk_tokens  # noqa: F401

__all__ = ["select_topk_tokens", "register_native_fake", "SELECT_TOPK_TOKENS"]
