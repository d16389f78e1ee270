"""SamplerSchedule + denoise_step_ against diffusers' own schedulers: whole trajectories, same model outputs and
noise, within 1e-5 relative; flow-matching time shifts (static and dynamic, exponential and linear) bit for bit;
ragged per-row steps, classifier-free guidance, bad input."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from mmlatent.kernels import SamplerSchedule, denoise_step_

R, C, STEPS = 6, 10, 25


def fake_model(x, t):
    """A deterministic stand-in for a denoiser: depends on the state and the timestep."""
    return 0.7 * torch.tanh(x) + 0.05 * float(t) / 1000.0 - 0.1 * x


def rel_err(a, e):
    return float((a - e).abs().max() / e.abs().max())


def run_pair(scheduler, schedule, eta=None, generator_noise=False, mu=None):
    torch.manual_seed(0)
    x_theirs = torch.randn(R, C)
    x_ours = x_theirs.clone()
    g_theirs, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    scheduler.set_timesteps(STEPS, **({} if mu is None else {"mu": mu}))
    for i, t in enumerate(scheduler.timesteps):
        out_theirs, out_ours = fake_model(x_theirs, t), fake_model(x_ours, t)
        kwargs = {}
        noise = None
        if eta is not None:
            kwargs["eta"] = eta
            if eta > 0:
                noise = torch.randn(R, C, generator=g_ours)
                kwargs["variance_noise"] = noise.clone()
        if generator_noise:  # DDPM draws its own noise with the generator at every t > 0
            kwargs["generator"] = g_theirs
            noise = torch.randn(R, C, generator=g_ours) if int(t) > 0 else None
        x_theirs = scheduler.step(out_theirs, t, x_theirs, **kwargs).prev_sample
        denoise_step_(x_ours, out_ours, i, schedule, noise=noise)
    return x_ours, x_theirs


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_trajectory_matches_diffusers(prediction, clip):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction,
                              clip_sample=clip)
    schedule = SamplerSchedule.from_diffusers(scheduler, STEPS)
    ours, theirs = run_pair(scheduler, schedule, generator_noise=True)
    assert rel_err(ours, theirs) <= 1e-5


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_trajectory_matches_diffusers(prediction, eta, clip):
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction,
                              clip_sample=clip, set_alpha_to_one=False, steps_offset=1)
    schedule = SamplerSchedule.from_diffusers(scheduler, STEPS, eta=eta)
    ours, theirs = run_pair(scheduler, schedule, eta=eta)
    assert rel_err(ours, theirs) <= 1e-5


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler_matches_diffusers(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    schedule = SamplerSchedule.from_diffusers(scheduler, STEPS)
    ours, theirs = run_pair(scheduler, schedule)
    assert rel_err(ours, theirs) <= 1e-5
    assert torch.allclose(schedule.timesteps, scheduler.timesteps)


@pytest.mark.parametrize("kind,prediction,options", [
    ("ddim", "epsilon", dict(set_alpha_to_one=False, steps_offset=1)),
    ("ddpm", "v_prediction", dict(clip_sample=1.0)),
    ("flow_euler", "velocity", dict(shift=3.0)),
])
def test_create_without_diffusers_equals_from_diffusers(kind, prediction, options):
    made = SamplerSchedule.create(kind, STEPS, prediction, **options)
    if kind == "flow_euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    elif kind == "ddim":
        scheduler = DDIMScheduler(prediction_type=prediction, clip_sample=False, **options)
    else:
        scheduler = DDPMScheduler(prediction_type=prediction, clip_sample=True)
    read = SamplerSchedule.from_diffusers(scheduler, STEPS)
    assert torch.allclose(made.timesteps.double(), read.timesteps.double(), atol=1e-3)
    assert torch.allclose(made.table, read.table, rtol=1e-5, atol=1e-6)


def test_ragged_steps_and_guidance():
    schedule = SamplerSchedule.create("ddim", 10, "v_prediction", eta=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(R, C, generator=g)
    out = torch.randn(2 * R, C, generator=g)
    noise = torch.randn(R, C, generator=g)
    steps = torch.tensor([0, 3, 9, 3, 5, 1])
    guided = out[R:] + 2.5 * (out[:R] - out[R:])
    expected = torch.cat([denoise_step_(x[i:i + 1].clone(), guided[i:i + 1], int(s), schedule, noise=noise[i:i + 1])
                          for i, s in enumerate(steps)])
    y = x.clone()
    assert denoise_step_(y, out, steps, schedule, noise=noise, cfg_scale=2.5) is y
    assert torch.allclose(y, expected, atol=1e-6)


def test_generator_noise_is_deterministic():
    schedule = SamplerSchedule.create("ddpm", 10, "epsilon")
    a, b = torch.zeros(R, C), torch.zeros(R, C)
    out = torch.ones(R, C)
    denoise_step_(a, out, 0, schedule, generator=torch.Generator().manual_seed(3))
    denoise_step_(b, out, 0, schedule, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.std() > 0


def test_bad_input():
    schedule = SamplerSchedule.create("ddim", 10, "epsilon")
    x = torch.zeros(R, C)
    with pytest.raises(ValueError, match="kind"):
        SamplerSchedule.create("euler_a", 10, "epsilon")
    with pytest.raises(ValueError, match="prediction: flow_euler takes velocity"):
        SamplerSchedule.create("flow_euler", 10, "epsilon")
    with pytest.raises(ValueError, match=r"step: expected an int in \[0, 10\)"):
        denoise_step_(x, x.clone(), 10, schedule)
    with pytest.raises(ValueError, match=r"step: entries must be in \[0, 10\)"):
        denoise_step_(x, x.clone(), torch.tensor([0, 1, 2, 3, 4, 12]), schedule)
    with pytest.raises(ValueError, match="model_out: expected shape"):
        denoise_step_(x, torch.zeros(R + 1, C), 0, schedule)
    with pytest.raises(ValueError, match="model_out: with cfg_scale, expected"):
        denoise_step_(x, torch.zeros(R, C), 0, schedule, cfg_scale=3.0)
    with pytest.raises(TypeError, match="x: expected dtype"):
        denoise_step_(x.double(), x.double(), 0, schedule)
    with pytest.raises(TypeError, match="scheduler: expected DDPMScheduler"):
        from diffusers import EulerDiscreteScheduler
        SamplerSchedule.from_diffusers(EulerDiscreteScheduler(), 10)
    y = x.clone()
    with pytest.raises(ValueError):
        denoise_step_(y, torch.zeros(R, C + 1), 0, schedule)
    assert torch.equal(y, x)  # untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind,prediction,clip", [("ddpm", "epsilon", 1.0), ("ddim", "v_prediction", None),
                                                  ("flow_euler", "velocity", None)])
def test_triton_step_matches_torch(kind, prediction, clip, dtype, use_backend):
    """The Triton kernel (interpreter) against the torch backend: ragged steps, guidance, clamp, noise."""
    options = {"clip_sample": clip} if kind == "ddpm" else ({"eta": 0.7} if kind == "ddim" else {})
    schedule = SamplerSchedule.create(kind, 12, prediction, **options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=g)
    out = torch.randn(10, 300, generator=g).to(dtype)
    noise = torch.randn(5, 300, generator=g)
    for step in (3, torch.tensor([0, 11, 4, 4, 7], dtype=torch.int32)):
        results = {}
        for backend in ("torch", "triton"):
            use_backend(backend)
            y = x.clone()
            denoise_step_(y, out, step, schedule, noise=noise, cfg_scale=1.5)
            results[backend] = y
        assert torch.allclose(results["triton"], results["torch"], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ flow matching: time shifting
# Flux and SD3 pipelines configure the scheduler so; mu then comes from the image sequence length.
FLUX = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)


def diffusers_sigma_steps(scheduler):
    """dt = sigma_next - sigma per step, as diffusers' step() takes it from its float32 sigmas."""
    sigmas = scheduler.sigmas.double()
    return sigmas[1:] - sigmas[:-1]


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("mu", [0.5, 0.63, 1.15, 1.6, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 10, 28, 50])
def test_dynamic_shifting_equals_diffusers(time_shift_type, mu, steps):
    """create(mu=...) and from_diffusers(mu=...) give exactly the timesteps and steps of diffusers' own
    set_timesteps(steps, mu=mu), bit for bit (diffusers' float32 / float64 steps are followed)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX, time_shift_type=time_shift_type)
    scheduler.set_timesteps(steps, mu=mu)
    made = SamplerSchedule.create("flow_euler", steps, "velocity", mu=mu, time_shift_type=time_shift_type)
    read = SamplerSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(**FLUX, time_shift_type=time_shift_type),
                                          steps, mu=mu)
    for schedule in (made, read):
        assert schedule.timesteps.dtype == torch.float32
        assert torch.equal(schedule.timesteps, scheduler.timesteps)
        assert torch.equal(schedule.table[:, 1], diffusers_sigma_steps(scheduler))
        assert torch.equal(schedule.table[:, 0], torch.ones(steps, dtype=torch.float64))


@pytest.mark.parametrize("shift", [1.0, 3.0, 3.1582])
@pytest.mark.parametrize("steps", [1, 10, 28])
def test_static_shift_equals_diffusers_exactly(shift, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    made = SamplerSchedule.create("flow_euler", steps, "velocity", shift=shift)
    assert torch.equal(made.timesteps, scheduler.timesteps)
    assert torch.equal(made.table[:, 1], diffusers_sigma_steps(scheduler))


def test_static_shift_e_mu_is_not_dynamic_shifting():
    """The exponential time shift e^mu / (e^mu + 1/t - 1) is the static shift formula with shift = e^mu, but the
    static scheduler shifts its training sigmas at construction, so its grid ends at shift(1/T) and is shifted
    again: the last timestep lands 6.7 away from dynamic shifting's (9.89 against 3.15 for mu = 1.15, 10 steps).
    create(shift=e^mu) is the static scheduler and create(mu=mu) the dynamic one, each exactly."""
    mu, steps = 1.15, 10
    dynamic = FlowMatchEulerDiscreteScheduler(**FLUX)
    dynamic.set_timesteps(steps, mu=mu)
    static = FlowMatchEulerDiscreteScheduler(shift=math.exp(mu))
    static.set_timesteps(steps)
    assert float(static.timesteps[-1] - dynamic.timesteps[-1]) == pytest.approx(6.734, abs=1e-3)
    assert torch.equal(SamplerSchedule.create("flow_euler", steps, "velocity", mu=mu).timesteps, dynamic.timesteps)
    assert torch.equal(SamplerSchedule.create("flow_euler", steps, "velocity", shift=math.exp(mu)).timesteps,
                       static.timesteps)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_dynamic_shifting_trajectory_matches_diffusers(time_shift_type, mu):
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX, time_shift_type=time_shift_type)
    schedule = SamplerSchedule.from_diffusers(scheduler, STEPS, mu=mu)
    ours, theirs = run_pair(scheduler, schedule, mu=mu)
    assert rel_err(ours, theirs) <= 1e-5
    made = SamplerSchedule.create("flow_euler", STEPS, "velocity", mu=mu, time_shift_type=time_shift_type)
    assert torch.equal(made.table, schedule.table)


def test_dynamic_shift_mu_is_the_pipelines_line():
    # diffusers' calculate_shift (Flux / SD3 pipelines) gives 0.5 at 256 tokens, 1.15 at 4096 and 0.63 at 1024
    assert SamplerSchedule.dynamic_shift_mu(256) == pytest.approx(0.5)
    assert SamplerSchedule.dynamic_shift_mu(4096) == pytest.approx(1.15)
    assert SamplerSchedule.dynamic_shift_mu(1024) == pytest.approx(0.63)
    assert SamplerSchedule.dynamic_shift_mu(10, base_seq_len=1, max_seq_len=11, base_shift=0.0,
                                            max_shift=1.0) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="max_seq_len: must differ from base_seq_len"):
        SamplerSchedule.dynamic_shift_mu(10, base_seq_len=16, max_seq_len=16)
    with pytest.raises(TypeError, match="image_seq_len: expected an int"):
        SamplerSchedule.dynamic_shift_mu(10.5)


@pytest.mark.parametrize("call, error, match", [
    (lambda: SamplerSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(**FLUX), 10), ValueError,
     "mu: this FlowMatchEulerDiscreteScheduler has use_dynamic_shifting=True, which needs mu"),
    (lambda: SamplerSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(), 10, mu=1.0), ValueError,
     "mu: FlowMatchEulerDiscreteScheduler takes no mu \\(its config has use_dynamic_shifting=False"),
    (lambda: SamplerSchedule.from_diffusers(DDIMScheduler(), 10, mu=1.0), ValueError,
     "mu: DDIMScheduler takes no mu"),
    (lambda: SamplerSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(**FLUX), 10, mu=float("nan")),
     ValueError, "mu: expected a finite number"),
    (lambda: SamplerSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(**FLUX), 10, mu="1"), TypeError,
     "mu: expected a Python float"),
    (lambda: SamplerSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(**FLUX), 10, mu=20.0), ValueError,
     "mu: the exponential time shift needs e\\^mu in"),
    (lambda: SamplerSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(**FLUX, time_shift_type="linear"), 10,
                                            mu=0.0), ValueError, "mu: the linear time shift needs mu in"),
    (lambda: SamplerSchedule.create("ddim", 10, "epsilon", mu=1.0), ValueError, "mu: dynamic time shifting is "
     "flow_euler's; ddim takes no mu"),
    (lambda: SamplerSchedule.create("flow_euler", 10, "velocity", mu=1.0, shift=3.0), ValueError,
     "mu: dynamic shifting replaces the static shift"),
    (lambda: SamplerSchedule.create("flow_euler", 10, "velocity", time_shift_type="linear"), ValueError,
     "time_shift_type: only dynamic shifting \\(mu\\) uses it"),
    (lambda: SamplerSchedule.create("flow_euler", 10, "velocity", mu=1.0, time_shift_type="cubic"), ValueError,
     "time_shift_type: expected exponential or linear"),
    (lambda: SamplerSchedule.create("flow_euler", 10, "velocity", mu=-20.0), ValueError,
     "mu: the exponential time shift needs"),
])
def test_time_shift_arguments_are_checked(call, error, match):
    with pytest.raises(error, match=match):
        call()
