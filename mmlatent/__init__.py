"""mmlatent: fused operators, modules and lean training loops for multimodal latent chain-of-thought reasoning.

Layers import downward only: ``kernels`` <- ``models`` <- ``train`` <- ``cli``.
"""
__version__ = "0.1.0"
