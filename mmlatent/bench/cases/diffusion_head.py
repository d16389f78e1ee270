"""The latent diffusion head's sampler (LatentDiffusionHead.sample: every segment's DDIM steps in one batch)
against what a user writes with diffusers, and against the floor of any sampler: the head's own forward at the
whole batch, once per step (a "floor: " baseline)."""
from __future__ import annotations

from typing import List

import torch

from ..case import FLOOR_PREFIX, Case, Inputs, Make
from .inputs import cpu_generator, normal_tensors

# The timestep the floor's head forwards run at: any fixed step costs the same.
FLOOR_TIMESTEP = 500


def _diffusion_inputs(segments: int, rows: int, C: int, width: int, depth: int, steps: int) -> Make:
    """head: a LatentDiffusionHead(C -> C) in eval mode in the run's dtype; cond and x_t [segments * rows, C];
    t [segments * rows] int64; segments and steps as given."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        from mmlatent.models import LatentDiffusionHead
        torch.manual_seed(0)
        head = LatentDiffusionHead(C, C, width=width, depth=depth).to(device=device, dtype=dtype).eval()
        randn = normal_tensors(cpu_generator(), device, dtype)
        cond, x_t = randn(segments * rows, C), randn(segments * rows, C)
        t = torch.full((segments * rows,), FLOOR_TIMESTEP, device=device)
        return dict(head=head, cond=cond, segments=segments, steps=steps, x_t=x_t, t=t)
    return make


def _head_sample(a):
    return a["head"].sample(a["cond"], steps=a["steps"], generator=None)


def _head_sample_eager(a):
    return a["head"].sample(a["cond"], steps=a["steps"], generator=None, cuda_graph=False)


def _head_forward_floor(a):
    """The floor of any sampler: the head's own forward at the whole batch, once per step, nothing else."""
    with torch.no_grad():
        for _ in range(a["steps"]):
            out = a["head"](a["x_t"], a["t"], a["cond"])
    return out


def _diffusers_loop_per_segment(a):
    """What a user writes: a DDIM scheduler's step() loop over the head, one segment at a time."""
    from diffusers import DDIMScheduler
    head, steps = a["head"], a["steps"]
    scheduler = DDIMScheduler(num_train_timesteps=head.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")
    outs = []
    with torch.no_grad():
        for cond in a["cond"].chunk(a["segments"]):
            scheduler.set_timesteps(steps)
            x = torch.randn(cond.shape[0], head.latent_dim, device=cond.device, dtype=cond.dtype)
            for t in scheduler.timesteps:
                x = scheduler.step(head(x, t.expand(cond.shape[0]).to(cond.device), cond), t, x).prev_sample
            outs.append(x)
    return torch.cat(outs)


def diffusion_case(segments: int, rows: int, C: int, width: int, depth: int = 3, steps: int = 50,
                   with_eager: bool = False) -> Case:
    """Sampling ``segments`` latent segments of ``rows`` rows each with ``steps`` DDIM steps. ``with_eager`` adds
    head.sample without its CUDA graph (on a GPU: what the graph saves)."""
    baselines = {"diffusers DDIM loop per segment": _diffusers_loop_per_segment}
    if with_eager:
        baselines["mmlatent without CUDA graph"] = _head_sample_eager
    baselines[f"{FLOOR_PREFIX}{steps} x head forward"] = _head_forward_floor
    return Case("diffusion head sample", f"{segments} segments x {rows} rows C{C} width{width} depth{depth} "
                f"{steps} DDIM steps", _diffusion_inputs(segments, rows, C, width, depth, steps), _head_sample,
                baselines)


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":
        return [diffusion_case(2, 4, 16, 16, steps=5)]
    if sizes == "gpu":
        return [diffusion_case(8, 32, 3584, 1024, with_eager=True),
                *(diffusion_case(1, R, 3584, 1024, with_eager=True) for R in (32, 256, 2048))]
    return [diffusion_case(8, 32, 512, 256)]
