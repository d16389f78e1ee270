"""nn.Modules built on mmlatent.kernels: IVT-LR and Modal-mixed CoT on Hugging Face VLMs, the latent diffusion head, language-model
heads, tiny configs, the model families behind one interface (:mod:`mmlatent.models.backbones`), the rollout's
attention function (:mod:`mmlatent.models.attention`), and the transformers API that changed name
(:mod:`mmlatent.models.compat`)."""
from .backbones import VLMBackbone
from .compat import cache_kwargs, cache_keyword, enable_activation_checkpointing
from .diffusion_head import LatentDiffusionHead
from .dpmm import DPMMCoT, DPMMOutput, FusedT5, GatedFusion, cache_latents, latent_tokens, load_latents
from .ivtlr import IVTLR, IVTLROutput, IVTLRReference, ivtlr_reference
from .fused_loss import apply_fused_loss, is_fused_loss_applied, unpatch
from .fused_layers import apply_fused_layers, fused_layer_count, remove_fused_layers
from .modal_mixed import (ModalMixedCoT, ModalMixedGeneration, ModalMixedOutput,
                          modal_mixed_reference_generate)
from .lm_head import CausalLMLoss, LinearCrossEntropyHead, causal_lm_loss, head_for, next_token_labels
from .unwrap import unwrap_peft

__all__ = ["VLMBackbone", "LatentDiffusionHead", "GatedFusion", "DPMMCoT", "DPMMOutput", "FusedT5", "latent_tokens", "cache_latents",
           "load_latents", "IVTLR", "IVTLROutput", "IVTLRReference", "ivtlr_reference",
           "LinearCrossEntropyHead", "causal_lm_loss", "apply_fused_loss", "unpatch", "is_fused_loss_applied",
           "apply_fused_layers", "fused_layer_count", "remove_fused_layers",
           "unwrap_peft", "ModalMixedCoT", "ModalMixedOutput", "ModalMixedGeneration",
           "modal_mixed_reference_generate",
           "head_for", "next_token_labels", "CausalLMLoss", "cache_kwargs", "cache_keyword",
           "enable_activation_checkpointing"]
