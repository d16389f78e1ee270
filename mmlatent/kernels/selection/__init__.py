"""The selection family: ``select_topk_tokens`` and ``select_image_tokens`` (op.py), the torch backend
(torch_impl.py), the Triton kernel (triton_kernels.py, imported only when that backend runs) and the C++/CUDA ops
of ``mmlatent._C`` (csrc/)."""
from .op import (SELECT_IMAGE_TOKENS, SELECT_TOPK_TOKENS, register_image_tokens_native_fake,  # noqa: F401
                 register_native_fake, select_image_tokens, select_topk_tokens)

__all__ = ["select_topk_tokens", "select_image_tokens", "register_native_fake", "register_image_tokens_native_fake",
           "SELECT_TOPK_TOKENS", "SELECT_IMAGE_TOKENS"]
