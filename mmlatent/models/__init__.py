"""nn.Modules built on mmlatent.kernels: language-model heads and Hugging Face integration (IVT-LR, the diffusion
head, Modal-mixed CoT and DPMM-CoT follow in their issues)."""
from .lm_head import CausalLMLoss, LinearCrossEntropyHead, causal_lm_loss, head_for, next_token_labels

__all__ = ["LinearCrossEntropyHead", "causal_lm_loss", "head_for", "next_token_labels", "CausalLMLoss"]
