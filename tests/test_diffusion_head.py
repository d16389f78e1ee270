"""LatentDiffusionHead (discrete schedules): the merged adaLN GEMM against an unfused reference, the loss (batch_mul,
mask), sampling (deterministic, equal to a diffusers loop over the same network; a diffusers scheduler, a string and
a SamplerSchedule as ``schedule`` agree), the schedule checks against the head's training, and a tiny convergence
run. Flow-matching heads: tests/test_flow_matching.py."""
import pytest
import torch
import warnings

from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch.nn import functional as F

from mmlatent.kernels import SamplerSchedule
from mmlatent.models import LatentDiffusionHead
from mmlatent.models.diffusion_head import timestep_embedding


def make_head(seed=0, **kw):
    torch.manual_seed(seed)
    head = LatentDiffusionHead(6, 5, width=32, depth=3, **kw)
    with torch.no_grad():  # away from the zero initialisation, so every path matters
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head


def unfused_forward(head, x, t, cond):
    """The same network written plainly: each block's own modulation projection, LayerNorm then modulation."""
    c = F.silu(head.time_embed(timestep_embedding(t)) + head.cond_proj(cond))
    h = head.input_proj(x)
    W, b = head.modulation.weight, head.modulation.bias
    w = head.width
    for i, block in enumerate(head.blocks):
        rows = slice(3 * i * w, 3 * (i + 1) * w)
        shift, scale, gate = F.linear(c, W[rows], b[rows]).split(w, dim=1)
        normed = (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + 1e-6)
        h = h + gate * block(normed * (1 + scale) + shift)
    shift, scale = head.final_modulation(c).split(w, dim=1)
    normed = (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + 1e-6)
    return head.output(normed * (1 + scale) + shift)


def test_zero_initialised_prediction():
    head = LatentDiffusionHead(6, 5, width=32, depth=2)
    assert torch.equal(head(torch.randn(4, 6), torch.tensor([0, 10, 500, 999]), torch.randn(4, 5)),
                       torch.zeros(4, 6))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_forward_and_gradients_equal_unfused_reference(backend, use_backend):
    use_backend(backend)
    head = make_head()
    x, t, cond = torch.randn(7, 6), torch.randint(0, 1000, (7,)), torch.randn(7, 5)
    ours = head(x, t, cond)
    grads = torch.autograd.grad(ours.square().sum(), list(head.parameters()))
    theirs = unfused_forward(head, x, t, cond)
    ref_grads = torch.autograd.grad(theirs.square().sum(), list(head.parameters()))
    assert torch.allclose(ours, theirs, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)


def unfused_loss(head, target, cond, mask, batch_mul, generator):
    """The textbook loss with the same random draws as head.loss: noise, build the target, masked mean MSE."""
    R = target.shape[0]
    x0 = target.repeat(batch_mul, 1)
    t = torch.randint(0, head.num_train_timesteps, (R * batch_mul,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = head.alphas_cumprod[t][:, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    goal = {"v": a.sqrt() * noise - (1 - a).sqrt() * x0, "epsilon": noise, "sample": x0}[head.prediction]
    err = (unfused_forward(head, x_t, t, cond.repeat(batch_mul, 1)) - goal).pow(2).mean(dim=1)
    w = mask.float().repeat(batch_mul)
    return (w * err).sum() / w.sum().clamp_min(1.0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("prediction", ["v", "epsilon", "sample"])
def test_loss_and_gradients_equal_unfused_reference(prediction, backend, use_backend):
    use_backend(backend)
    head = make_head(prediction=prediction)
    target, cond = torch.randn(5, 6), torch.randn(5, 5).requires_grad_()
    mask = torch.tensor([True, True, False, True, False])
    params = [cond, *head.parameters()]
    ours = head.loss(target, cond, mask=mask, batch_mul=2, generator=torch.Generator().manual_seed(9))
    theirs = unfused_loss(head, target, cond, mask, 2, torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_batch_mul_and_mask():
    head = make_head(prediction="v")
    target, cond = torch.randn(4, 6), torch.randn(4, 5)
    a = head.loss(target, cond, batch_mul=3, generator=torch.Generator().manual_seed(2))
    b = head.loss(target.repeat(3, 1), cond.repeat(3, 1), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(a, b, atol=1e-6)
    ga = torch.autograd.grad(a, list(head.parameters()))
    gb = torch.autograd.grad(b, list(head.parameters()))
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))
    mask = torch.tensor([True, False, True, False])
    masked = head.loss(target, cond, mask=mask, generator=torch.Generator().manual_seed(5))
    kept = head.loss(target[mask], cond[mask], generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(masked) and masked > 0 and torch.isfinite(kept)


def test_sampling_is_deterministic_and_equals_a_diffusers_loop():
    head = make_head()
    cond = torch.randn(5, 5)
    a = head.sample(cond, steps=12, generator=torch.Generator().manual_seed(4))
    b = head.sample(cond, steps=12, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                              prediction_type="v_prediction", timestep_spacing="trailing")
    scheduler.set_timesteps(12)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(head(x, t.expand(5), cond), t, x).prev_sample
    assert torch.allclose(a, x, rtol=1e-4, atol=1e-5)
    guided = head.sample(cond, steps=12, cfg_scale=3.0, generator=torch.Generator().manual_seed(4))
    assert guided.shape == (5, 6) and not torch.allclose(guided, a)


def test_bad_input():
    with pytest.raises(ValueError, match="prediction"):
        LatentDiffusionHead(2, 2, prediction="x0")
    head = LatentDiffusionHead(6, 5, width=16, depth=1)
    with pytest.raises(ValueError, match="x_t: expected"):
        head(torch.randn(3, 5), torch.zeros(3), torch.randn(3, 5))
    with pytest.raises(ValueError, match="cond: expected"):
        head.loss(torch.randn(3, 6), torch.randn(2, 5))
    with pytest.raises(ValueError, match="batch_mul"):
        head.loss(torch.randn(3, 6), torch.randn(3, 5), batch_mul=0)
    with pytest.raises(ValueError, match="schedule: 'euler' is a flow-matching sampler, but this head is trained"):
        head.sample(torch.randn(3, 5), schedule="euler")
    with pytest.raises(ValueError, match="steps: expected a positive int"):
        head.sample(torch.randn(3, 5), steps=0)
    with pytest.raises(ValueError, match="temperature"):
        head.sample(torch.randn(3, 5), temperature=-1.0)
    with pytest.raises(TypeError, match="cfg_scale"):
        head.sample(torch.randn(3, 5), cfg_scale="3")
    with pytest.raises(ValueError, match="cuda_graph: True needs cond on a CUDA device"):
        head.sample(torch.randn(3, 5), cuda_graph=True)
    with pytest.raises(ValueError, match="cond: expected"):
        head.sample(torch.randn(3, 4))


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_zero_padded_rows_change_nothing(cfg_scale, use_backend):
    """The captured loop runs on rows padded with zeros to a power-of-two bucket: the real rows' trajectories must
    not depend on the padding (every op is row-wise, and a zero row normalises without NaN)."""
    use_backend("reference")
    head = make_head()
    cond, x = torch.randn(5, 5), torch.randn(5, 6)
    schedule = head.schedule("ddim", 10)
    assert head.schedule("ddim", 10) is schedule  # converted once, cached
    guidance = None if cfg_scale == 1.0 else cfg_scale
    with torch.no_grad():
        plain = head._sample_loop(x.clone(), cond, schedule, guidance, torch.Generator().manual_seed(0))
        padded_x, padded_cond = torch.cat([x, torch.zeros(3, 6)]), torch.cat([cond, torch.zeros(3, 5)])
        padded = head._sample_loop(padded_x, padded_cond, schedule, guidance, torch.Generator().manual_seed(0))
    assert torch.isfinite(padded).all()
    assert torch.allclose(padded[:5], plain, rtol=1e-5, atol=1e-6)


def test_learns_a_two_dimensional_mixture(use_backend, one_thread):
    """Four Gaussians (std 0.15) at (+-2, +-2): after ~10 s of CPU training, samples sit on the modes (median
    distance to the nearest centre < 0.35) and split evenly between them (each 25% +- 8%). The torch step here:
    2000 rows x 50 steps would take minutes in the Triton interpreter (the kernel has its own tests)."""
    use_backend("reference")
    torch.manual_seed(0)
    head = LatentDiffusionHead(2, 4, width=64, depth=2, prediction="v")
    centres = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]])
    optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(1200):
        x = centres[torch.randint(0, 4, (256,), generator=g)] + 0.15 * torch.randn(256, 2, generator=g)
        loss = head.loss(x, torch.zeros(256, 4), batch_mul=2, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    samples = head.sample(torch.zeros(2000, 4), steps=50, generator=torch.Generator().manual_seed(1))
    assert float(torch.cdist(samples, centres).min(dim=1).values.median()) < 0.35
    quadrant = (samples[:, 0] > 0).long() * 2 + (samples[:, 1] > 0).long()
    shares = torch.bincount(quadrant, minlength=4).float() / 2000
    assert bool(((shares - 0.25).abs() < 0.08).all()), shares


# ------------------------------------------------------------------------ schedule=: diffusers, strings, tables
def head_scheduler_kwargs(head):
    """The diffusers configuration of this head's training (cosine = squaredcos_cap_v2, its prediction)."""
    return dict(num_train_timesteps=head.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                prediction_type={"v": "v_prediction"}.get(head.prediction, head.prediction))


def diffusers_loop(head, scheduler, cond, steps, seed, **step_kwargs):
    """What a user writes: the diffusers scheduler's own step() with the head as the model, the initial noise and
    every step's noise drawn from one generator (as head.sample draws them)."""
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(cond.shape[0], head.latent_dim, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(head(x, t.expand(cond.shape[0]), cond), t, x, generator=g, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
@pytest.mark.parametrize("name, eta", [("ddim", 0.0), ("ddim", 0.6), ("ddpm", 0.0)])
def test_a_diffusers_scheduler_equals_the_string_and_a_diffusers_loop(name, eta, prediction, use_backend):
    """schedule=DDIMScheduler / DDPMScheduler (trailing spacing, no clipping: the strings' configuration) equals
    schedule="ddim" / "ddpm", equals SamplerSchedule.create, and equals the scheduler's own step() loop given the
    same generator: the stochastic ones (DDPM, DDIM with eta) draw their step noise from the same stream."""
    use_backend("torch")
    head = make_head(prediction=prediction)
    cond = torch.randn(5, 5)
    make = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[name]
    scheduler = make(**head_scheduler_kwargs(head), clip_sample=False, timestep_spacing="trailing")
    steps = 12
    kw = dict(eta=eta) if eta else {}
    by_scheduler = head.sample(cond, steps, scheduler, generator=torch.Generator().manual_seed(4), **kw)
    by_string = head.sample(cond, steps, name, generator=torch.Generator().manual_seed(4), **kw)
    table = SamplerSchedule.create(name, steps, {"v": "v_prediction"}.get(prediction, prediction),
                                   beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", eta=eta)
    by_table = head.sample(cond, schedule=table, generator=torch.Generator().manual_seed(4))
    theirs = diffusers_loop(head, scheduler, cond, steps, 4, **kw)
    torch.testing.assert_close(by_scheduler, by_string, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_table, by_string, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_scheduler, theirs, rtol=1e-4, atol=1e-5)
    assert scheduler.num_inference_steps == steps  # set by our loop above; sample itself leaves it alone


def test_a_scheduler_keeps_its_own_sampling_choices(use_backend):
    """Leading spacing, steps_offset, clip_sample (diffusers' default True) and set_alpha_to_one are sampling
    choices: taken from the scheduler as configured, and still equal to its step() loop."""
    use_backend("torch")
    head = make_head()
    cond = torch.randn(4, 5)
    scheduler = DDIMScheduler(**head_scheduler_kwargs(head), steps_offset=1, set_alpha_to_one=False)
    assert scheduler.config.clip_sample and scheduler.config.timestep_spacing == "leading"
    ours = head.sample(cond, 10, scheduler, generator=torch.Generator().manual_seed(2))
    theirs = diffusers_loop(head, scheduler, cond, 10, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, head.sample(cond, 10, "ddim", generator=torch.Generator().manual_seed(2)))


def test_sampler_keyword_is_a_deprecated_alias(use_backend):
    use_backend("torch")
    head = make_head()
    cond = torch.randn(3, 5)
    with pytest.warns(DeprecationWarning, match="sampler= is deprecated, pass schedule=") as record:
        old = head.sample(cond, steps=4, sampler="ddim", generator=torch.Generator().manual_seed(0))
    assert record[0].filename == __file__  # attributed to the caller
    assert torch.equal(old, head.sample(cond, steps=4, schedule="ddim", generator=torch.Generator().manual_seed(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(TypeError, match="sampler: the deprecated name of schedule; pass schedule only"):
            head.sample(cond, steps=4, schedule="ddim", sampler="ddim")


def test_schedules_that_do_not_fit_the_head_are_refused():
    head = make_head()  # cosine, v, T = 1000
    cond = torch.randn(2, 5)
    fitting = head_scheduler_kwargs(head)
    bad = [
        (DDIMScheduler(**{**fitting, "num_train_timesteps": 500}), ValueError,
         "schedule: the DDIMScheduler's num_train_timesteps = 500 is not this head's 1000"),
        (DDPMScheduler(**{**fitting, "prediction_type": "epsilon"}), ValueError,
         "schedule: the DDPMScheduler's prediction_type 'epsilon' is not what this head predicts; configure it "
         "with prediction_type='v_prediction'"),
        (DDIMScheduler(**{**fitting, "beta_schedule": "linear"}), ValueError,
         r"schedule: the DDIMScheduler \(beta_schedule='linear', .*\) has another noise schedule than this "
         "head's 'cosine'"),
        (DDIMScheduler(**fitting, rescale_betas_zero_snr=True), ValueError, "schedule: alphas_cumprod must lie in"),
        (DDIMScheduler(**fitting, thresholding=True), ValueError, "schedule: DDIMScheduler with thresholding"),
        (DDPMScheduler(**fitting, variance_type="learned"), ValueError, "variance_type"),
        (FlowMatchEulerDiscreteScheduler(), ValueError,
         "schedule: a FlowMatchEulerDiscreteScheduler is a flow-matching sampler, but this head is trained as "
         "discrete diffusion"),
        (SamplerSchedule.create("flow_euler", 10, "velocity"), ValueError, "schedule: the SamplerSchedule is a "
         "flow-matching sampler"),
        (SamplerSchedule.create("ddim", 10, "epsilon", beta_schedule="squaredcos_cap_v2"), ValueError,
         "schedule: the SamplerSchedule steps a 'epsilon' prediction, but this head predicts 'v_prediction'"),
        (SamplerSchedule.create("ddim", 10, "v_prediction"), ValueError,
         "schedule: the SamplerSchedule has another noise schedule"),
        (SamplerSchedule.create("ddim", 10, "v_prediction", beta_schedule="squaredcos_cap_v2",
                                num_train_timesteps=100), ValueError,
         "schedule: the SamplerSchedule has num_train_timesteps = 100, this head 1000"),
        ("flow", ValueError, "schedule: 'flow' is a flow-matching sampler"),
        ("dpm++", ValueError, "schedule: expected 'ddim', 'ddpm', 'flow'"),
        (7, TypeError, "schedule: expected a str, a SamplerSchedule or one of DDPMScheduler"),
    ]
    for schedule, error, match in bad:
        with pytest.raises(error, match=match):
            head.sample(cond, steps=10, schedule=schedule)
    table = head.schedule("ddim", 10)
    with pytest.raises(ValueError, match="steps: 12 differs from the SamplerSchedule's 10 steps"):
        head.sample(cond, steps=12, schedule=table)
    with pytest.raises(ValueError, match="eta: a SamplerSchedule has its eta and time shift built in"):
        head.sample(cond, schedule=table, eta=0.5)
    with pytest.raises(ValueError, match="eta: only DDIM takes eta"):
        head.sample(cond, steps=10, schedule="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="mu: only flow sampling takes mu"):
        head.sample(cond, steps=10, schedule="ddim", mu=1.0)
    with pytest.raises(ValueError, match="mu: DDIMScheduler takes no mu"):
        head.sample(cond, steps=10, schedule=DDIMScheduler(**fitting), mu=1.0)
    with pytest.raises(ValueError, match="eta: expected a value in \\[0"):
        head.sample(cond, steps=10, schedule="ddim", eta=-1.0)
    with pytest.raises(ValueError, match="steps: expected at most num_train_timesteps = 1000"):
        head.sample(cond, steps=1001, schedule=DDIMScheduler(**fitting))
    # the prediction names of the two families are kept apart
    with pytest.raises(ValueError, match="prediction: 'velocity' is flow matching's target and needs "
                                         "schedule='flow'"):
        LatentDiffusionHead(6, 5, width=16, depth=1, prediction="velocity")
    with pytest.raises(ValueError, match="timestep_sampling: 'logit_normal' draws continuous flow times"):
        LatentDiffusionHead(6, 5, width=16, depth=1, timestep_sampling="logit_normal")
    assert head.schedule(None, 10) is head.schedule("ddim", 10)  # the default sampler of a discrete head


@pytest.mark.parametrize("schedule, options", [("ddim", dict(prediction="v")), ("ddim", dict(prediction="epsilon",
                                               schedule="linear")), ("ddpm", dict(prediction="sample")),
                                              ("flow", dict(schedule="flow"))])
def test_diffusers_scheduler_steps_what_sample_samples(schedule, options, use_backend):
    head = make_head(**options)
    scheduler = head.diffusers_scheduler(schedule)
    assert scheduler is not head.diffusers_scheduler(schedule)  # a new one each call: stepping one changes it
    cond = torch.randn(4, 5)
    use_backend("torch")
    ours = head.sample(cond, steps=7, schedule=schedule, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    scheduler.set_timesteps(7)
    x = torch.randn(4, 6, generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            extra = {"generator": generator} if schedule == "ddpm" else {}
            x = scheduler.step(head(x, t.expand(4), cond), t, x, **extra).prev_sample
    assert torch.allclose(ours, x, rtol=1e-4, atol=1e-5)


def test_diffusers_scheduler_refuses_another_family():
    with pytest.raises(ValueError, match="schedule"):
        make_head().diffusers_scheduler("flow")
    with pytest.raises(ValueError, match="schedule"):
        make_head(schedule="flow").diffusers_scheduler("ddim")
    with pytest.raises(ValueError, match="schedule: expected one of"):
        make_head().diffusers_scheduler("heun")
