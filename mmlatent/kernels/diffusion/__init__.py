"""The diffusion family: ``denoise_step_`` with :class:`SamplerSchedule` (schedule.py), ``layer_norm_modulate`` and
``diffusion_mse`` (op.py), their torch backend (torch_impl.py) and Triton kernels (triton_kernels.py, imported
only when that backend runs)."""
from .op import (DENOISE_STEP, DIFFUSION_MSE, LAYER_NORM_MODULATE, TARGETS, PhiloxNoise,  # noqa: F401
                 denoise_step_, diffusion_mse, layer_norm_modulate, target_coefficients)
from .schedule import SamplerSchedule  # noqa: F401

__all__ = ["denoise_step_", "PhiloxNoise", "layer_norm_modulate", "diffusion_mse", "target_coefficients", "TARGETS",
           "SamplerSchedule", "DENOISE_STEP", "LAYER_NORM_MODULATE", "DIFFUSION_MSE"]
