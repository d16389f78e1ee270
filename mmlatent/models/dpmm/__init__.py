"""DPMM-CoT (arXiv 2312.08762): T5 over image features learned by a text-conditioned diffusion UNet (model.py),
fused by MM-CoT's gated cross-attention (fusion.py), with VAE latents cached once for a frozen VAE (latents.py)."""
from .fusion import GatedFusion  # noqa: F401
from .latents import cache_latents, load_latents  # noqa: F401
from .model import DPMMCoT, DPMMOutput, FusedT5, latent_tokens, sd_noise_scheduler  # noqa: F401

__all__ = ["GatedFusion", "DPMMCoT", "DPMMOutput", "FusedT5", "latent_tokens", "sd_noise_scheduler",
           "cache_latents", "load_latents"]
