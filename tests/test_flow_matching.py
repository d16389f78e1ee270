"""LatentDiffusionHead with flow matching (schedule="flow", prediction="velocity"): the loss against a float64
reference written from the formula (x_t = (1 - t) x0 + t noise, target noise - x0, same draws), sampling equal to a
plain loop over diffusers' FlowMatchEulerDiscreteScheduler.step (static shift, dynamic shifting, Karras sigmas),
the string, the scheduler and the SamplerSchedule agreeing, a convergence run on a conditional 2-D distribution,
and every argument check."""
import copy

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch.nn import functional as F

from mmlatent.kernels import SamplerSchedule
from mmlatent.models import LatentDiffusionHead
from mmlatent.models.diffusion_head import timestep_embedding

FLUX = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)


def make_flow_head(seed=0, **kw):
    torch.manual_seed(seed)
    head = LatentDiffusionHead(6, 5, width=32, depth=2, schedule="flow", **kw)
    with torch.no_grad():  # away from the zero initialisation, so every path matters
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head


def plain_forward(head, x, time_features, cond):
    """The network written plainly (each block's own modulation slice, LayerNorm then modulation), in the dtype of
    ``head``'s parameters."""
    c = F.silu(head.time_embed(time_features) + head.cond_proj(cond))
    h = head.input_proj(x)
    W, b, w = head.modulation.weight, head.modulation.bias, head.width

    def norm(v):
        return (v - v.mean(1, keepdim=True)) / torch.sqrt(v.var(1, unbiased=False, keepdim=True) + 1e-6)

    for i, block in enumerate(head.blocks):
        rows = slice(3 * i * w, 3 * (i + 1) * w)
        shift, scale, gate = F.linear(c, W[rows], b[rows]).split(w, dim=1)
        h = h + gate * block(norm(h) * (1 + scale) + shift)
    shift, scale = head.final_modulation(c).split(w, dim=1)
    return head.output(norm(h) * (1 + scale) + shift)


def reference_flow_loss(head, target, cond, mask, batch_mul, seed):
    """The flow-matching loss in float64 from its formula, with head.loss's draws (the times, then the noise)."""
    g = torch.Generator().manual_seed(seed)
    rows = target.shape[0] * batch_mul
    if head.timestep_sampling == "uniform":
        t = torch.rand(rows, generator=g)
    else:
        t = torch.sigmoid(head.logit_mean + head.logit_std * torch.randn(rows, generator=g))
    noise = torch.randn(rows, target.shape[1], generator=g).double()
    ref = copy.deepcopy(head).double()
    x0 = target.double().repeat(batch_mul, 1)
    s = t.double()[:, None]
    x_t = (1 - s) * x0 + s * noise
    # the sinusoid is the network's own float32 features of t * T; everything after it runs in float64
    features = timestep_embedding(t * head.num_train_timesteps).double()
    pred = plain_forward(ref, x_t, features, cond.double().repeat(batch_mul, 1))
    err = (pred - (noise - x0)).pow(2).mean(dim=1)
    w = torch.ones(rows, dtype=torch.float64) if mask is None else mask.double().repeat(batch_mul)
    return (w * err).sum() / w.sum().clamp_min(1.0), ref


def test_constructor_defaults_and_names():
    head = LatentDiffusionHead(6, 5, width=16, depth=1, prediction="velocity", schedule="flow")
    assert head.flow_matching and head.prediction == "velocity" and head.noise_schedule == "flow"
    assert head.timestep_sampling == "logit_normal" and (head.logit_mean, head.logit_std) == (0.0, 1.0)
    assert head.alphas_cumprod is None
    assert LatentDiffusionHead(6, 5, width=16, depth=1, schedule="flow").prediction == "velocity"
    discrete = LatentDiffusionHead(6, 5, width=16, depth=1)
    assert not discrete.flow_matching and discrete.prediction == "v" and discrete.timestep_sampling == "uniform"
    assert head.state_dict().keys() == discrete.state_dict().keys()  # the same network either way
    assert torch.equal(head(torch.randn(3, 6), torch.tensor([0.0, 500.5, 1000.0]), torch.randn(3, 5)),
                       torch.zeros(3, 6))  # zero-initialised output


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("sampling, options", [("logit_normal", {}), ("logit_normal", dict(logit_mean=0.5,
                                                                                           logit_std=0.8)),
                                               ("uniform", {})])
def test_loss_and_gradients_equal_a_float64_reference(sampling, options, backend, use_backend):
    use_backend(backend)
    head = make_flow_head(timestep_sampling=sampling, **options)
    target, cond = torch.randn(5, 6), torch.randn(5, 5)
    mask = torch.tensor([True, True, False, True, True])
    ours = head.loss(target, cond, mask=mask, batch_mul=2, generator=torch.Generator().manual_seed(9))
    theirs, ref = reference_flow_loss(head, target, cond, mask, 2, 9)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-7)
    grads = torch.autograd.grad(ours, list(head.parameters()))
    ref_grads = torch.autograd.grad(theirs, list(ref.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_logit_normal_and_uniform_draw_differently():
    """Same generator seed, same network: the sampling choice changes the times and so the loss."""
    target, cond = torch.randn(64, 6), torch.randn(64, 5)
    losses = [make_flow_head(timestep_sampling=s).loss(target, cond, generator=torch.Generator().manual_seed(1))
              for s in ("uniform", "logit_normal")]
    assert not torch.allclose(losses[0], losses[1])


def plain_euler_loop(head, scheduler, cond, steps, seed, mu=None):
    """A user's loop: diffusers' own FlowMatchEulerDiscreteScheduler.step with the head as the velocity model."""
    scheduler.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    x = torch.randn(cond.shape[0], head.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(head(x, t.expand(cond.shape[0]), cond), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 12])
def test_flow_sampling_equals_a_diffusers_loop(steps, use_backend):
    use_backend("torch")
    head = make_flow_head()
    cond = torch.randn(5, 5)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    by_string = head.sample(cond, steps, "flow", generator=torch.Generator().manual_seed(4))
    by_default = head.sample(cond, steps, generator=torch.Generator().manual_seed(4))
    by_scheduler = head.sample(cond, steps, scheduler, generator=torch.Generator().manual_seed(4))
    by_table = head.sample(cond, schedule=SamplerSchedule.create("flow_euler", steps, "velocity"),
                           generator=torch.Generator().manual_seed(4))
    theirs = plain_euler_loop(head, scheduler, cond, steps, 4)
    assert torch.equal(by_string, by_default)
    torch.testing.assert_close(by_scheduler, by_string, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_table, by_string, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_scheduler, theirs, rtol=1e-5, atol=1e-6)
    for name in ("euler", "flow_euler"):
        assert torch.equal(head.sample(cond, steps, name, generator=torch.Generator().manual_seed(4)), by_string)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("mu, steps", [(0.5, 4), (1.15, 28), (2.0, 10)])
def test_dynamic_shifting_sampling_equals_a_diffusers_loop(mu, steps, time_shift_type, use_backend):
    use_backend("torch")
    head = make_flow_head(seed=1)
    cond = torch.randn(4, 5)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX, time_shift_type=time_shift_type)
    ours = head.sample(cond, steps, scheduler, mu=mu, generator=torch.Generator().manual_seed(2))
    theirs = plain_euler_loop(head, scheduler, cond, steps, 2, mu=mu)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    table = SamplerSchedule.create("flow_euler", steps, "velocity", mu=mu, time_shift_type=time_shift_type)
    assert torch.equal(table.timesteps, scheduler.timesteps)
    by_table = head.sample(cond, schedule=table, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(by_table, ours, rtol=1e-6, atol=1e-6)
    if time_shift_type == "exponential":  # the string's mu is diffusers' default (exponential) time shift
        by_string = head.sample(cond, steps, "flow", mu=mu, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(by_string, ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", [dict(shift=3.0), dict(shift=3.0, use_karras_sigmas=True),
                                     dict(shift=2.0, shift_terminal=0.1)])
def test_a_configured_flow_scheduler_is_followed(options, use_backend):
    """Static shifts, Karras sigmas and shift_terminal come from diffusers' own set_timesteps."""
    use_backend("torch")
    head = make_flow_head(seed=2)
    cond = torch.randn(3, 5)
    scheduler = FlowMatchEulerDiscreteScheduler(**options)
    ours = head.sample(cond, 9, scheduler, generator=torch.Generator().manual_seed(5))
    theirs = plain_euler_loop(head, scheduler, cond, 9, 5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, head.sample(cond, 9, "flow", generator=torch.Generator().manual_seed(5)))


def test_guidance_and_steps_beyond_the_training_timesteps(use_backend):
    use_backend("torch")
    head = make_flow_head()
    cond = torch.randn(3, 5)
    plain = head.sample(cond, 6, generator=torch.Generator().manual_seed(0))
    guided = head.sample(cond, 6, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert guided.shape == (3, 6) and torch.isfinite(guided).all() and not torch.allclose(guided, plain)
    short = LatentDiffusionHead(3, 2, width=8, depth=1, schedule="flow", num_train_timesteps=20)
    assert short.sample(torch.zeros(2, 2), steps=25).shape == (2, 3)  # continuous time: any number of steps


def test_learns_a_conditional_two_dimensional_distribution(use_backend, one_thread):
    """Two conditions, each a 2-D Gaussian with its own mean and per-axis spread: a tiny flow head trained for 800
    steps (logit-normal times, the default; cosine-decayed learning rate) cuts its loss to under 0.4 of the start
    and its Euler samples (30 steps) match each condition's mean within 0.06 and standard deviations within 20%
    (seeds 0-4 give 0.02 and 0.87-0.98). Under 10 s on one CPU core."""
    use_backend("torch")
    torch.manual_seed(0)
    head = LatentDiffusionHead(2, 2, width=64, depth=2, schedule="flow")
    means = torch.tensor([[1.5, -1.0], [-1.0, 2.0]])
    stds = torch.tensor([[0.3, 0.6], [0.5, 0.2]])
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 800)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(800):
        label = torch.randint(0, 2, (256,), generator=g)
        x = means[label] + stds[label] * torch.randn(256, 2, generator=g)
        loss = head.loss(x, F.one_hot(label, 2).float(), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:10]) / 10, sum(losses[-50:]) / 50
    assert last < 0.4 * first, (first, last)
    for label in (0, 1):
        cond = F.one_hot(torch.full((2000,), label), 2).float()
        samples = head.sample(cond, steps=30, generator=torch.Generator().manual_seed(1 + label))
        assert torch.allclose(samples.mean(0), means[label], atol=0.06), (label, samples.mean(0))
        ratio = samples.std(0) / stds[label]
        assert bool(((ratio - 1).abs() < 0.2).all()), (label, samples.std(0))


def test_bad_arguments_are_named():
    make = lambda **kw: LatentDiffusionHead(6, 5, width=16, depth=1, **kw)  # noqa: E731
    constructor = [
        (dict(schedule="flow", prediction="v"), ValueError,
         "prediction: schedule='flow' trains the velocity noise - x0 \\(prediction='velocity'\\), got 'v' \\('v' "
         "is DDPM's v-parameterisation"),
        (dict(schedule="flow", prediction="epsilon"), ValueError, "prediction: schedule='flow' trains the velocity"),
        (dict(prediction="velocity"), ValueError, "prediction: 'velocity' is flow matching's target and needs "
                                                  "schedule='flow'"),
        (dict(schedule="karras"), ValueError, "schedule: expected one of cosine, linear, scaled_linear, flow"),
        (dict(schedule="flow", timestep_sampling="beta"), ValueError,
         "timestep_sampling: expected one of uniform, logit_normal"),
        (dict(timestep_sampling="logit_normal"), ValueError,
         "timestep_sampling: 'logit_normal' draws continuous flow times"),
        (dict(schedule="flow", logit_std=0.0), ValueError, "logit_std: expected a positive number"),
        (dict(schedule="flow", logit_mean=float("nan")), ValueError, "logit_mean: expected a finite number"),
        (dict(schedule="flow", logit_mean="0"), TypeError, "logit_mean: expected a Python float"),
        (dict(schedule="flow", timestep_sampling="uniform", logit_std=2.0), ValueError,
         "logit_std: only timestep_sampling='logit_normal' uses it"),
        (dict(logit_mean=1.0), ValueError, "logit_mean: only timestep_sampling='logit_normal' uses it"),
        (dict(schedule="flow", num_train_timesteps=1), ValueError, "num_train_timesteps: expected an int >= 2"),
    ]
    for kwargs, error, match in constructor:
        with pytest.raises(error, match=match):
            make(**kwargs)
    head = make(schedule="flow")
    cond = torch.randn(2, 5)
    sampling = [
        (dict(schedule="ddim"), ValueError, "schedule: 'ddim' is a discrete diffusion sampler, but this head is "
                                            "trained with flow matching"),
        (dict(schedule=DDIMScheduler()), ValueError, "schedule: a DDIMScheduler is a discrete diffusion sampler"),
        (dict(schedule=SamplerSchedule.create("ddim", 4, "epsilon")), ValueError,
         "schedule: the SamplerSchedule is a discrete diffusion sampler"),
        (dict(schedule=FlowMatchEulerDiscreteScheduler(num_train_timesteps=500)), ValueError,
         "schedule: the FlowMatchEulerDiscreteScheduler's num_train_timesteps = 500 is not this head's 1000 "
         "\\(the scale of its flow time input\\)"),
        (dict(schedule=SamplerSchedule.create("flow_euler", 4, "velocity", num_train_timesteps=500)), ValueError,
         "schedule: the SamplerSchedule has num_train_timesteps = 500, this head 1000"),
        (dict(schedule=FlowMatchEulerDiscreteScheduler(**FLUX)), ValueError,
         "mu: this FlowMatchEulerDiscreteScheduler has use_dynamic_shifting=True, which needs mu"),
        (dict(schedule=FlowMatchEulerDiscreteScheduler(), mu=1.0), ValueError,
         "mu: FlowMatchEulerDiscreteScheduler takes no mu"),
        (dict(schedule=FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)), ValueError,
         "schedule: FlowMatchEulerDiscreteScheduler with stochastic_sampling=True is not supported"),
        (dict(schedule=FlowMatchEulerDiscreteScheduler(invert_sigmas=True)), ValueError,
         "schedule: a FlowMatchEulerDiscreteScheduler with invert_sigmas=True runs from data"),
        (dict(schedule="flow", mu="1"), TypeError, "mu: expected a Python float"),
        (dict(schedule="flow", mu=50.0), ValueError, "mu: the exponential time shift needs"),
        (dict(schedule="flow", eta=0.5), ValueError, "eta: only DDIM takes eta"),
        (dict(schedule="flow", steps=0), ValueError, "steps: expected a positive int"),
        (dict(schedule=SamplerSchedule.create("flow_euler", 4, "velocity"), mu=1.0), ValueError,
         "mu: a SamplerSchedule has its eta and time shift built in"),
    ]
    for kwargs, error, match in sampling:
        with pytest.raises(error, match=match):
            head.sample(cond, **{"steps": 4, **kwargs})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_captured_flow_sampling_matches_eager_per_schedule(use_backend):
    """Flow Euler is deterministic given the initial noise: the replayed graph equals the eager loop. Two
    schedules with the same step count (two mu) capture two graphs: neither replays the other's table."""
    use_backend("auto")
    torch.manual_seed(0)
    head = LatentDiffusionHead(64, 96, width=256, depth=3, schedule="flow").cuda()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cond = torch.randn(37, 96, device="cuda")
    results = {}
    for mu in (0.5, 1.15):
        runs = [head.sample(cond, 20, "flow", mu=mu, generator=torch.Generator("cuda").manual_seed(3),
                            cuda_graph=graph) for graph in (True, False)]
        torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)
        results[mu] = runs[0]
    assert len(head._graphs) == 2
    assert not torch.allclose(results[0.5], results[1.15])
    again = head.sample(cond, 20, "flow", mu=0.5, generator=torch.Generator("cuda").manual_seed(3), cuda_graph=True)
    torch.testing.assert_close(again, results[0.5], rtol=1e-5, atol=1e-5)
    assert len(head._graphs) == 2
