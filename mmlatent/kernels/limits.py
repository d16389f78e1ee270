"""Every limit the backends share with dispatch, defined once (docs/design.md, "Operators: backends and dispatch").

Dispatch must not import triton (importing it fixes the interpreter mode), so the Triton kernels import their caps
from here instead of dispatch reading them from the kernels. The CUDA selection cap is compiled into
``mmlatent._C`` from ``csrc/select_topk_cuda.h`` and read back from the extension, never restated in Python.
"""
from __future__ import annotations

from typing import Tuple

import os

# Widest head dim the attention kernels' configurations cover (compile_check proves they compile without spills).
ATTENTION_MAX_HEAD_DIM = 256
# Most key splits of one attention row tile (flash-decoding); the combine kernel holds all of them in one tile.
ATTENTION_MAX_SPLITS = 128
# Largest Ni one Triton selection program ranks: the row's keys live in registers, and at 16384 every warp count
# spills on sm_90a.
SELECTION_TRITON_MAX_TOKENS = 8192
# Widest row the adaLN modulation kernel holds in one tile (a 16384 tile spills in the backward even at 32 warps).
MODULATION_MAX_WIDTH = 8192
# rms_norm keeps a row in one tile as well: wider rows go to the torch backend
NORM_MAX_WIDTH = 8192


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n, for n >= 1 (the tile widths of every kernel)."""
    return 1 << max(0, int(n - 1).bit_length())


def triton_interpreting() -> bool:
    """Whether Triton runs its interpreter (CPU tensors) rather than compiling for a GPU: ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_row_mass_limits() -> Tuple[int, int]:
    """(most query heads per KV head, widest head dim) of the native CUDA row mass, as compiled into
    ``mmlatent._C`` (call only when the extension imports). AttributeError when it predates this binding."""
    from mmlatent import _C
    group, head_dim = _C.row_mass_limits()
    return int(group), int(head_dim)


def cuda_select_max_tokens() -> int:
    """Largest Ni the native CUDA selection kernel ranks, as compiled into ``mmlatent._C`` (call only when the
    extension imports). AttributeError when the built extension predates this binding."""
    from mmlatent import _C
    return int(_C.select_topk_max_tokens())


def cuda_select_image_max_layers() -> int:
    """Most layers one launch of the fused native CUDA select_image_tokens takes, as compiled into ``mmlatent._C``
    (call only when the extension imports). AttributeError when the built extension predates this binding."""
    from mmlatent import _C
    return int(_C.select_image_max_layers())


__all__ = ["ATTENTION_MAX_HEAD_DIM", "ATTENTION_MAX_SPLITS", "SELECTION_TRITON_MAX_TOKENS", "MODULATION_MAX_WIDTH",
           "NORM_MAX_WIDTH", "next_power_of_2", "triton_interpreting", "cuda_select_max_tokens",
           "cuda_select_image_max_layers", "cuda_row_mass_limits"]
