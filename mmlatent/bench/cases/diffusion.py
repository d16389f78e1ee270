"""Diffusion family: the head's layer_norm_modulate (adaLN) and diffusion_mse (its training loss), forward +
backward with the gradients returned, against the torch expressions the head ran before them."""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F

from mmlatent.kernels import PhiloxNoise, SamplerSchedule, denoise_step_, diffusion_mse, layer_norm_modulate

from ..case import Call, Case, Inputs, Make
from ..ceilings import denoise_step_bytes, diffusion_mse_bytes, layer_norm_modulate_bytes
from .inputs import cpu_generator, normal_tensors, pinned_backend

# LatentDiffusionHead's LayerNorm epsilon.
HEAD_EPS = 1e-6


def _modulate_inputs(N: int, W: int) -> Make:
    """x [N, W] and mods [N, 3W] (shift, scale, gate; both require grad), dy [N, W]: all in the run's dtype."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        randn = normal_tensors(cpu_generator(), device, dtype)
        return dict(x=randn(N, W).requires_grad_(), mods=randn(N, 3 * W).requires_grad_(), dy=randn(N, W))
    return make


def _torch_layer_norm_modulate(x, shift, scale):
    """The head before the fused op: LayerNorm without affine, then the adaLN modulation."""
    return F.layer_norm(x, x.shape[-1:], eps=HEAD_EPS) * (1 + scale) + shift


def _fused_layer_norm_modulate(x, shift, scale):
    return layer_norm_modulate(x, shift, scale, eps=HEAD_EPS)


def _modulate_fwd_bwd(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Call:
    def call(a: Inputs) -> object:
        shift, scale, _gate = a["mods"].chunk(3, dim=1)
        return torch.autograd.grad(fn(a["x"], shift, scale), (a["x"], a["mods"]), a["dy"])
    return call


def modulate_case(N: int, W: int) -> Case:
    """adaLN forward + backward on N rows of width W: the fused op against the torch expression."""
    return Case("layer_norm_modulate", f"N{N} W{W} fwd+bwd", _modulate_inputs(N, W),
                _modulate_fwd_bwd(_fused_layer_norm_modulate),
                {"torch LayerNorm * (1 + scale) + shift": _modulate_fwd_bwd(_torch_layer_norm_modulate)},
                bytes_moved=layer_norm_modulate_bytes(N, W))


def _mse_inputs(R: int, C: int) -> Make:
    """pred [R, C] (requires grad), x0 and noise [R, C], in the run's dtype; alphas [R] float32 in [0, 1), each
    row's alpha-bar."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = cpu_generator()
        randn = normal_tensors(g, device, dtype)
        return dict(pred=randn(R, C).requires_grad_(), x0=randn(R, C), noise=randn(R, C),
                    alphas=torch.rand(R, generator=g).to(device))
    return make


def _torch_v_prediction_mse(pred, x0, noise, alphas_cumprod):
    """The head's loss before the fused op: the v target sqrt(a) noise - sqrt(1 - a) x0 built in float32, then the
    squared error's mean over channels and rows."""
    a = alphas_cumprod.to(torch.float32)[:, None]
    target = a.sqrt() * noise.to(torch.float32) - (1 - a).sqrt() * x0.to(torch.float32)
    return (pred.to(torch.float32) - target).square().mean()


def _fused_v_prediction_mse(pred, x0, noise, alphas_cumprod):
    return diffusion_mse(pred, x0, noise, alphas_cumprod, "v_prediction")


def _mse_fwd_bwd(loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Call:
    def call(a: Inputs) -> object:
        return torch.autograd.grad(loss_fn(a["pred"], a["x0"], a["noise"], a["alphas"]), a["pred"])
    return call


def diffusion_mse_case(R: int, C: int) -> Case:
    """The head's loss on its prediction, forward + backward, against the torch expression."""
    return Case("diffusion_mse", f"R{R} C{C} v-target fwd+bwd", _mse_inputs(R, C),
                _mse_fwd_bwd(_fused_v_prediction_mse), {"torch target + MSE": _mse_fwd_bwd(_torch_v_prediction_mse)},
                bytes_moved=diffusion_mse_bytes(R, C))


# The guidance scale of the step benchmark (any value: the work does not depend on it).
STEP_CFG = 3.0


def _step_inputs(R: int, C: int) -> Make:
    """x [R, C] float32, model_out [2R, C] (conditional rows, then unconditional) in the run's dtype, noise [R, C]
    float32, and each row at its own step of a 50-step DDPM schedule."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = cpu_generator()
        schedule = SamplerSchedule.create("ddpm", 50, "epsilon")
        return dict(x=torch.randn(R, C, generator=g).to(device), out=torch.randn(2 * R, C, generator=g).to(device,
                                                                                                             dtype),
                    noise=torch.randn(R, C, generator=g).to(device), schedule=schedule,
                    steps=torch.randint(0, 49, (R,), generator=g).to(device))
    return make


def _step(a: Inputs) -> object:
    return denoise_step_(a["x"], a["out"], a["steps"], a["schedule"], noise=a["noise"], cfg_scale=STEP_CFG)


def denoise_step_case(R: int, C: int, backends: Sequence[str] = ("torch",)) -> Case:
    """One guided DDPM step with ragged per-row steps and explicit noise: the op as ``auto`` runs it (the native
    C++ op on a CPU, Triton on a GPU) against the op with each backend of ``backends`` pinned."""
    baselines = {f"{backend} backend": pinned_backend(backend, _step) for backend in backends}
    return Case("denoise_step_", f"R{R} C{C} cfg+noise ragged steps", _step_inputs(R, C), _step, baselines,
                bytes_moved=denoise_step_bytes(R, C))


def _philox_step_inputs(R: int, C: int) -> Make:
    """The step's inputs with a PhiloxNoise stream on the device in place of the noise tensor."""
    step_inputs = _step_inputs(R, C)

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        inputs = step_inputs(device, dtype)
        del inputs["noise"]
        return dict(inputs, stream=PhiloxNoise(0, device=device))
    return make


def _philox_step(a: Inputs) -> object:
    return denoise_step_(a["x"], a["out"], a["steps"], a["schedule"], noise=a["stream"], cfg_scale=STEP_CFG)


def _randn_step(a: Inputs) -> object:
    return denoise_step_(a["x"], a["out"], a["steps"], a["schedule"], cfg_scale=STEP_CFG)


def philox_step_case(R: int, C: int, backends: Sequence[str] = ("torch",)) -> Case:
    """The same step with its noise drawn inside the kernel (PhiloxNoise) against the step that draws it with
    torch.randn first (``generator``), and against each backend of ``backends`` pinned."""
    baselines = {"torch.randn noise, then the step": _randn_step}
    baselines.update({f"{backend} backend": pinned_backend(backend, _philox_step) for backend in backends})
    return Case("denoise_step_", f"R{R} C{C} cfg+Philox ragged steps", _philox_step_inputs(R, C), _philox_step,
                baselines, bytes_moved=denoise_step_bytes(R, C, noise_in_kernel=True))


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":
        return [modulate_case(8, 64), diffusion_mse_case(8, 64), denoise_step_case(8, 64), philox_step_case(8, 64)]
    if sizes == "gpu":
        out = [modulate_case(N, 1024) for N in (256, 4096, 65536)]  # the head's width; 65536 rows: HBM-bound
        out += [diffusion_mse_case(R, 3584) for R in (1024, 16384)]  # 32-row sketches x batch x batch_mul
        # the head's rows of a decoding batch, then a whole Zebra-CoT batch of sketches: the CUDA kernel against
        # the Triton one (auto's pick on a GPU) and the torch path
        gpu_backends = ("native", "triton", "torch")
        return out + [case(R, 3584, backends=gpu_backends) for case in (denoise_step_case, philox_step_case)
                      for R in (256, 16384)]
    # the default CPU set times the whole head elsewhere (diffusion_head); these rows are the step alone
    return [denoise_step_case(4096, 512), philox_step_case(4096, 512)]
