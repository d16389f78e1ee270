"""nn.Modules built on mmlatent.kernels: IVT-LR on Hugging Face VLMs, the latent diffusion head, language-model
heads, tiny configs, the model families behind one interface (:mod:`mmlatent.models.backbones`), the rollout's
attention function (:mod:`mmlatent.models.attention`), and the transformers API that changed name
(:mod:`mmlatent.models.compat`)."""
from .backbones import VLMBackbone
from .compat import cache_kwargs, cache_keyword, enable_activation_checkpointing
from .diffusion_head import LatentDiffusionHead
from .ivtlr import IVTLR, IVTLROutput, IVTLRReference, ivtlr_reference
from .lm_head import CausalLMLoss, LinearCrossEntropyHead, causal_lm_loss, head_for, next_token_labels

__all__ = ["VLMBackbone", "LatentDiffusionHead", "IVTLR", "IVTLROutput", "IVTLRReference", "ivtlr_reference",
           "LinearCrossEntropyHead", "causal_lm_loss",
           "head_for", "next_token_labels", "CausalLMLoss", "cache_kwargs", "cache_keyword",
           "enable_activation_checkpointing"]
