"""IVT-LR (Interleaved Vision-Text Latent Reasoning) on Hugging Face VLMs: :class:`IVTLR`, the fast wrapper, and
:func:`ivtlr_reference`, the method exactly as its public code computes it (the oracle and the baseline).

The method (docs/design.md, "IVT-LR: the method as its public code computes it"). Each ``latent_token_id`` in
``input_ids`` is one latent reasoning step. Before latent step j the model has read everything up to that latent
token; the attention of the last row it read (softmax over all keys, mean over every layer and query head) ranks
the sample's image tokens not selected yet; the top k of them (their layer-0 input embeddings: vision-merger
outputs, or Chameleon's embedded VQ tokens) are inserted, in ascending image-token order, right before the latent
token, and the latent token's input embedding becomes the last row's final hidden state. Both are detached: only
the last full pass over the assembled sequence carries gradient.

Layout: :mod:`.layout` (where each token goes; what the passes of one call share), :mod:`.base` (what both
wrappers share), :mod:`.rollout` (:class:`IVTLR`), :mod:`.reference` (:class:`IVTLRReference`),
:mod:`.generation` (``generate``'s options, decoded as transformers decodes them), :mod:`.saving` (a wrapper as a
standard Hugging Face or PEFT folder: ``save_pretrained`` / ``from_pretrained``).
"""
from .base import IVTLROutput
from .generation import SUPPORTED_OPTIONS as GENERATION_OPTIONS
from .layout import POSITION_MODES
from .reference import IVTLRReference, ivtlr_reference
from .rollout import IVTLR

__all__ = ["IVTLR", "IVTLROutput", "IVTLRReference", "ivtlr_reference", "POSITION_MODES", "GENERATION_OPTIONS"]
