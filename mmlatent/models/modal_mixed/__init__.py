"""Modal-mixed CoT (arXiv 2602.00574) on Qwen2-VL / Qwen2.5-VL: :class:`ModalMixedCoT` (joint SFT loss, batched
KV-cached generation of text and latent sketches) and :func:`modal_mixed_reference_generate`, the per-sample
uncached loop it is checked against.

Layout: :mod:`.layout` (where the sketches of a batch are), :mod:`.model` (the module, its targets and loss),
:mod:`.generation` (the batched decode loop), :mod:`.reference` (the transparent loop). docs/design.md,
"Modal-mixed CoT", describes the method as implemented and what is inferred where the paper is silent.
"""
from .generation import LATENT_OVERRIDES, ModalMixedGeneration
from .layout import SketchLayout, SketchTokens, sketch_layout
from .model import ModalMixedCoT, ModalMixedOutput, mrope_positions
from .reference import modal_mixed_reference_generate

__all__ = ["ModalMixedCoT", "ModalMixedOutput", "ModalMixedGeneration", "modal_mixed_reference_generate",
           "SketchLayout", "SketchTokens", "sketch_layout", "mrope_positions", "LATENT_OVERRIDES"]
