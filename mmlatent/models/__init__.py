"""nn.Modules built on mmlatent.kernels: IVT-LR on Hugging Face VLMs, language-model heads, tiny configs (the
diffusion head, Modal-mixed CoT and DPMM-CoT follow in their issues)."""
from .diffusion_head import LatentDiffusionHead
from .ivtlr import IVTLR, IVTLROutput, IVTLRReference, ivtlr_reference
from .lm_head import CausalLMLoss, LinearCrossEntropyHead, causal_lm_loss, head_for, next_token_labels

__all__ = ["LatentDiffusionHead", "IVTLR", "IVTLROutput", "IVTLRReference", "ivtlr_reference", "LinearCrossEntropyHead", "causal_lm_loss",
           "head_for", "next_token_labels", "CausalLMLoss"]
