"""Edge cases of every public op, on every backend it has: value domains of the sampler schedules, in-place outputs
whose elements share memory, empty inputs, NaN in padding keys, dtype refusals and meta tensors."""
import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

import mmlatent.kernels.attention.torch_impl as torch_attention
import mmlatent.kernels.attention.triton_kernels as triton_attention
from mmlatent.kernels import (SamplerSchedule, attention_with_scores, checks, denoise_step_, diffusion_mse,
                              layer_norm_modulate, linear_cross_entropy, linear_log_probs,
                              row_attention_mass, select_topk_tokens)
from mmlatent.models.diffusion_head import LatentDiffusionHead

BACKENDS = ["torch", "triton"]
SELECT_BACKENDS = ["native", "triton", "torch"]


def expanded(rows, cols, dtype=torch.float32, fill=0.0):
    """A [rows, cols] view of one row (stride 0 along rows), and that row."""
    base = torch.full((1, cols), fill, dtype=dtype)
    return base.expand(rows, cols), base


# ------------------------------------------------------------------------------------------ schedule domains

@pytest.mark.parametrize("kind, options, error, match", [
    ("ddim", dict(num_train_timesteps=1), ValueError, "num_train_timesteps: expected an int >= 2"),
    ("flow_euler", dict(num_train_timesteps=1), ValueError, "num_train_timesteps: expected an int >= 2"),
    ("ddpm", dict(num_train_timesteps=1000.0), TypeError, "num_train_timesteps: expected an int"),
    ("ddim", dict(num_steps=0), ValueError, "num_steps: expected an int in \\[1, 1000\\]"),
    ("flow_euler", dict(num_steps=0), ValueError, "num_steps: expected an int >= 1"),
    ("ddpm", dict(num_steps=1001), ValueError, "num_steps"),
    ("ddim", dict(num_steps=2.0), TypeError, "num_steps: expected an int"),
    ("ddim", dict(beta_start=0.0), ValueError, "beta_start: expected a beta in \\(0, 1\\)"),
    ("ddpm", dict(beta_start=-1e-4), ValueError, "beta_start"),
    ("ddim", dict(beta_end=1.0), ValueError, "beta_end: expected a beta in \\(0, 1\\)"),
    ("ddim", dict(beta_end=1.5, beta_schedule="scaled_linear"), ValueError, "beta_end"),
    ("ddim", dict(beta_end=float("nan")), ValueError, "beta_end: expected a finite number"),
    ("ddim", dict(beta_start=0.999, beta_end=0.999), ValueError, "beta_start, beta_end: alphas_cumprod"),
    ("ddpm", dict(beta_start=1e-20, beta_end=1e-20), ValueError, "beta_start, beta_end: alphas_cumprod"),
    ("ddim", dict(beta_schedule="quadratic"), ValueError, "beta_schedule"),
    ("flow_euler", dict(shift=0.0), ValueError, "shift: expected a positive number"),
    ("flow_euler", dict(shift=-2.0), ValueError, "shift: expected a positive number"),
    ("flow_euler", dict(shift=float("inf")), ValueError, "shift: expected a finite number"),
    ("ddim", dict(eta=-0.5), ValueError, "eta: expected a value in \\[0"),
    ("ddim", dict(eta="1"), TypeError, "eta"),
    ("ddpm", dict(clip_sample=0.0), ValueError, "clip_sample"),
    ("ddpm", dict(clip_sample=-1.0), ValueError, "clip_sample"),
    ("ddim", dict(timestep_spacing="even"), ValueError, "timestep_spacing"),
    ("ddim", dict(steps_offset=-1), ValueError, "steps_offset: expected an int >= 0"),
    ("ddim", dict(num_steps=1000, steps_offset=1), ValueError, "steps_offset: 1 puts the first"),
    ("ddim", dict(set_alpha_to_one=1), TypeError, "set_alpha_to_one"),
    ("ddpm", dict(variance_type="learned"), ValueError, "variance_type"),
])
def test_create_refuses_values_outside_their_domain(kind, options, error, match):
    options = dict(options)
    num_steps = options.pop("num_steps", 10)
    prediction = "velocity" if kind == "flow_euler" else "epsilon"
    with pytest.raises(error, match=match):
        SamplerSchedule.create(kind, num_steps, prediction, **options)


def test_create_accepts_the_edges_of_each_domain():
    # Two training timesteps, every one of them a step, the betas' open interval nearly reached.
    schedule = SamplerSchedule.create("ddim", 2, "sample", num_train_timesteps=2, beta_start=1e-6, beta_end=0.99)
    assert schedule.num_steps == 2 and bool(torch.isfinite(schedule.table).all())
    flow = SamplerSchedule.create("flow_euler", 1500, "velocity", shift=1e-3)  # continuous time: no step limit
    assert flow.num_steps == 1500 and bool(torch.isfinite(flow.table).all())
    # clip_sample follows diffusers' switch: True is its default range 1.0, False no clamp.
    assert SamplerSchedule.create("ddpm", 5, "epsilon", clip_sample=True).clip == 1.0
    assert SamplerSchedule.create("ddpm", 5, "epsilon", clip_sample=False).clip is None


@pytest.mark.parametrize("make, steps, eta, error, match", [
    (lambda: DDIMScheduler(), 0, 0.0, ValueError, "num_inference_steps: expected an int in \\[1, 1000\\]"),
    (lambda: DDPMScheduler(), 0, 0.0, ValueError, "num_inference_steps"),
    (lambda: DDIMScheduler(), 1001, 0.0, ValueError, "num_inference_steps"),
    (lambda: FlowMatchEulerDiscreteScheduler(), 0, 0.0, ValueError, "num_inference_steps: expected an int >= 1"),
    (lambda: DDIMScheduler(), 10.0, 0.0, TypeError, "num_inference_steps: expected an int"),
    (lambda: DDIMScheduler(), 10, -1.0, ValueError, "eta: expected a value in \\[0"),
    (lambda: DDIMScheduler(num_train_timesteps=1), 1, 0.0, ValueError, "scheduler: num_train_timesteps"),
    (lambda: FlowMatchEulerDiscreteScheduler(shift=-1.0), 10, 0.0, ValueError, "scheduler: shift"),
    (lambda: FlowMatchEulerDiscreteScheduler(shift=0.0), 10, 0.0, ValueError, "scheduler: shift"),
    (lambda: DDPMScheduler(clip_sample=True, clip_sample_range=0.0), 10, 0.0, ValueError,
     "scheduler.config.clip_sample_range"),
    (lambda: object(), 10, 0.0, TypeError, "scheduler: expected DDPMScheduler"),
])
def test_from_diffusers_refuses_values_outside_their_domain(make, steps, eta, error, match):
    scheduler = make()
    with pytest.raises(error, match=match):
        SamplerSchedule.from_diffusers(scheduler, steps, eta=eta)


def test_direct_construction_is_checked():
    with pytest.raises(ValueError, match="table: expected shape \\[S, 6\\] with S >= 1"):
        SamplerSchedule("ddim", "epsilon", torch.zeros(0, dtype=torch.int64), torch.zeros(0, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="table: every coefficient must be finite"):
        SamplerSchedule("ddim", "epsilon", torch.zeros(1, dtype=torch.int64),
                        torch.full((1, 6), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="prediction"):
        SamplerSchedule("flow_euler", "epsilon", torch.zeros(1), torch.zeros(1, 6, dtype=torch.float64))


def test_head_steps_beyond_its_training_timesteps():
    head = LatentDiffusionHead(3, 2, width=8, depth=1, num_train_timesteps=20)
    with pytest.raises(ValueError, match="steps: expected at most num_train_timesteps = 20"):
        head.sample(torch.zeros(1, 2), steps=21)
    with pytest.raises(ValueError, match="num_train_timesteps: expected an int >= 2"):
        LatentDiffusionHead(3, 2, width=8, depth=1, num_train_timesteps=1)


# ---------------------------------------------------------------------------------- in-place outputs, overlap

def _brute_force_overlap(sizes, strides):
    offsets = [sum(i * s for i, s in zip(index, strides)) for index in itertools.product(*map(range, sizes))]
    return len(set(offsets)) != len(offsets)


def test_overlap_test_equals_brute_force():
    cases = [(sizes, strides) for sizes in itertools.product((1, 2, 3, 5), repeat=2)
             for strides in itertools.product((0, 1, 2, 3, 4, 6), repeat=2)]
    cases += [(sizes, strides) for sizes in ((2, 3, 2), (3, 2, 4), (2, 2, 2))
              for strides in itertools.product((0, 1, 2, 3, 5, 7), repeat=3)]
    for sizes, strides in cases:
        expected = _brute_force_overlap(sizes, strides)
        assert checks._elements_share_memory(sizes, strides) == expected, (sizes, strides)


def test_writable_accepts_disjoint_views_and_refuses_shared_memory():
    buf = torch.zeros(4, 10)
    for view in (buf, buf[:, :3], buf[:, ::2], buf.t(), buf[1:2].expand(1, 10), torch.zeros(3, 0).expand(3, 0)):
        checks.writable("out", view)
    storage = torch.zeros(8)
    for view in (buf[:1].expand(4, 10), storage.as_strided((4, 3), (1, 1)), storage.as_strided((2, 4), (2, 1))):
        with pytest.raises(ValueError, match="out: is written in place, but some of its elements share memory"):
            checks.writable("out", view)


def _attention_inputs(B=2, Hq=2, Hkv=1, M=3, N=6, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["expand", "as_strided"])
def test_row_attention_mass_refuses_shared_out(backend, layout, use_backend):
    use_backend(backend)
    q, k, _ = _attention_inputs()
    image_index = torch.tensor([[0, 2, 4], [1, 3, 5]])
    if layout == "expand":
        out, base = expanded(2, 3, fill=0.5)
    else:
        base = torch.full((4,), 0.5)
        out = base.as_strided((2, 3), (1, 1))
    with pytest.raises(ValueError, match="out: is written in place"):
        row_attention_mass(q[:, :, 0], k, image_index, out)
    assert bool((base == 0.5).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_attention_mass_writes_a_disjoint_column_slice(backend, use_backend):
    use_backend(backend)
    q, k, _ = _attention_inputs()
    image_index = torch.tensor([[0, 2, 4], [1, 3, -1]])
    buf = torch.full((2, 5), 0.25)
    row_attention_mass(q[:, :, 0], k, image_index, buf[:, 1:4])
    _, _, p = _dense64(q[:, :, :1], k, None, causal=False, key_valid=None)
    expected = 0.25 + _mass64(p[:, :, 0], image_index)
    torch.testing.assert_close(buf[:, 1:4].double(), expected, rtol=1e-5, atol=1e-6)
    assert bool((buf[:, 0] == 0.25).all() and (buf[:, 4] == 0.25).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_with_scores_refuses_shared_scores_out(backend, use_backend):
    use_backend(backend)
    q, k, v = _attention_inputs()
    scores, base = expanded(2, 3, fill=0.5)
    with pytest.raises(ValueError, match="scores_out: is written in place"):
        attention_with_scores(q, k, v, image_index=torch.tensor([[0, 2, 4], [1, 3, 5]]), scores_out=scores)
    assert bool((base == 0.5).all())


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_select_topk_tokens_refuses_shared_exclude(backend, use_backend):
    use_backend(backend)
    exclude, base = expanded(3, 5, dtype=torch.bool, fill=False)
    with pytest.raises(ValueError, match="exclude: is written in place"):
        select_topk_tokens(torch.randn(3, 5), 2, exclude=exclude)
    assert not bool(base.any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_denoise_step_refuses_shared_x(backend, cfg_scale, use_backend):
    use_backend(backend)
    schedule = SamplerSchedule.create("ddim", 10, "epsilon")
    x, base = expanded(4, 8, fill=0.5)
    out = torch.randn(4 if cfg_scale is None else 8, 8)
    for step in (3, torch.tensor([0, 1, 2, 3])):
        with pytest.raises(ValueError, match="x: is written in place"):
            denoise_step_(x, out, step, schedule, cfg_scale=cfg_scale)
    assert bool((base == 0.5).all())


# ------------------------------------------------------------------------------------------------ empty inputs

def _dense64(q, k, v, *, causal, key_valid):
    """Float64 softmax attention over the allowed keys only; rows without one: o = 0, lse = -inf, p = 0."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s = q.double() @ k.double().repeat_interleave(G, dim=1).transpose(-1, -2) * D ** -0.5
    allowed = torch.ones(B, 1, M, N, dtype=torch.bool)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(N)[None, :] <= torch.arange(M)[:, None] + (N - M))[None, None]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))
    o = None
    if v is not None:  # only allowed keys' values enter the sum, whatever the others hold
        vv = v.double().repeat_interleave(G, dim=1)
        o = torch.einsum("bhmn,bhnd->bhmd", p, vv.masked_fill(~allowed.any(dim=2)[:, :, :, None], 0.0))
    return o, lse, p


def _mass64(p_row, image_index):
    mass = torch.gather(p_row.sum(1), 1, image_index.clamp(min=0))
    return torch.where(image_index < 0, 0.0, mass)


@pytest.fixture
def no_backend_runs(monkeypatch):
    """Every backend's entry point of the attention ops raises: the tests show that nothing is launched."""
    def boom(*args, **kwargs):
        raise AssertionError("a backend ran although there was nothing to compute")
    monkeypatch.setattr(triton_attention, "attention_forward", boom)
    monkeypatch.setattr(torch_attention, "row_attention_mass", boom)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, image_index", [
    (0, [[-1, -1], [-1, -1]]),  # no keys at all: only padding slots are allowed
    (5, [[-1, -1], [-1, -1]]),  # every slot padding
    (5, [[], []]),  # Ni = 0
])
def test_row_attention_mass_with_nothing_to_accumulate(backend, N, image_index, use_backend, no_backend_runs):
    use_backend(backend)
    q = torch.randn(2, 2, 16)
    k = torch.randn(2, 1, N, 16)
    index = torch.tensor(image_index, dtype=torch.int64).reshape(2, -1)
    out = torch.full(index.shape, 0.75)
    assert row_attention_mass(q, k, index, out, key_valid=torch.zeros(2, N, dtype=torch.bool)) is out
    assert bool((out == 0.75).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_attention_mass_with_no_keys_still_checks_the_index(backend, use_backend):
    use_backend(backend)
    out = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="image_index: entries must be -1 \\(padding\\) or in \\[0, 0\\)"):
        row_attention_mass(torch.randn(1, 1, 8), torch.randn(1, 1, 0, 8), torch.tensor([[0, -1]]), out)
    assert not bool(out.any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_with_scores_all_padding_slots_leave_scores_untouched(backend, use_backend):
    use_backend(backend)
    q, k, v = _attention_inputs()
    scores = torch.full((2, 3), 0.75)
    o, lse = attention_with_scores(q, k, v, image_index=torch.full((2, 3), -1), scores_out=scores)
    assert bool((scores == 0.75).all())
    o64, lse64, _ = _dense64(q, k, v, causal=True, key_valid=None)
    torch.testing.assert_close(o.double(), o64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 3, 16), (2, 0, 3, 16), (2, 2, 0, 16)])
def test_attention_with_scores_empty_queries(backend, shape, use_backend):
    use_backend(backend)
    B, Hq, M, D = shape
    q = torch.randn(shape)
    k = torch.randn(B, 1, 4, D)
    scores = torch.full((B, 2), 0.75)
    o, lse = attention_with_scores(q, k, k.clone(), image_index=torch.zeros(B, 2, dtype=torch.int64),
                                   scores_out=scores)
    assert o.shape == shape and lse.shape == (B, Hq, M) and lse.dtype == torch.float32
    assert bool((scores == 0.75).all())


def test_attention_refuses_a_zero_head_dim():
    with pytest.raises(ValueError, match="q: expected a head dim D >= 1"):
        attention_with_scores(torch.randn(1, 1, 2, 0), torch.randn(1, 1, 2, 0), torch.randn(1, 1, 2, 0))
    with pytest.raises(ValueError, match="q: expected a head dim D >= 1"):
        row_attention_mass(torch.randn(1, 1, 0), torch.randn(1, 1, 2, 0), torch.zeros(1, 1, dtype=torch.int64),
                           torch.zeros(1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 0), (2, 4, 0), (0, 0), (0,), (0, 5)])
def test_layer_norm_modulate_empty(backend, shape, use_backend):
    use_backend(backend)
    x, shift, scale = (torch.randn(shape, requires_grad=True) for _ in range(3))
    y = layer_norm_modulate(x, shift, scale)
    assert y.shape == shape and y.dtype == torch.float32
    y.sum().backward()
    for t in (x, shift, scale):
        assert t.grad.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("R, C, cfg", [(0, 4, None), (3, 0, None), (0, 4, 2.0), (3, 0, 2.0)])
def test_denoise_step_empty(backend, R, C, cfg, use_backend):
    use_backend(backend)
    schedule = SamplerSchedule.create("ddpm", 10, "epsilon")  # stochastic: the no-op must draw nothing either
    x = torch.randn(R, C)
    out = torch.randn(R if cfg is None else 2 * R, C)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    for step in (4, torch.full((R,), 4)):
        assert denoise_step_(x, out, step, schedule, generator=generator, cfg_scale=cfg) is x
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusion_mse_without_rows_is_zero(backend, use_backend):
    use_backend(backend)
    pred = torch.randn(0, 4, requires_grad=True)
    for weights in (None, torch.zeros(0, dtype=torch.bool)):
        loss = diffusion_mse(pred, torch.randn(0, 4), torch.randn(0, 4), torch.rand(0), "v_prediction",
                             weights=weights)
        assert loss.dtype == torch.float32 and float(loss.detach()) == 0.0
        (grad,) = torch.autograd.grad(loss, pred)
        assert grad.shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_losses_with_no_hidden_features(backend, use_backend):
    """H = 0: the logits are the bias alone, so the loss is logsumexp(bias) - bias[label], gradients zero-sized."""
    use_backend(backend)
    hidden = torch.randn(3, 0, requires_grad=True)
    weight = torch.randn(4, 0, requires_grad=True)
    bias = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    labels = torch.tensor([2, 0, 3])
    expected = torch.logsumexp(bias.double(), 0) - bias.double()[labels]
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias)
    torch.testing.assert_close(loss.double(), expected.mean())
    grad_bias = torch.softmax(bias.double(), 0) - torch.nn.functional.one_hot(labels, 4).double().mean(0)
    g_h, g_w, g_b = torch.autograd.grad(loss, (hidden, weight, bias))
    assert g_h.shape == (3, 0) and g_w.shape == (4, 0)
    torch.testing.assert_close(g_b.double(), grad_bias)
    torch.testing.assert_close(linear_log_probs(hidden, weight, labels, bias=bias).double(), -expected)


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_select_topk_tokens_without_rows(backend, use_backend):
    use_backend(backend)
    idx, gathered = select_topk_tokens(torch.randn(0, 5), 2, exclude=torch.zeros(0, 5, dtype=torch.bool),
                                       embeds=torch.randn(0, 5, 3))
    assert idx.shape == (0, 2) and idx.dtype == torch.int64 and gathered.shape == (0, 2, 3)


# ------------------------------------------------------------------------------------------- NaN in padding

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_padding_keys_never_contribute_even_when_nan(backend, causal, use_backend):
    """Batch item 0 has no valid key at all; item 1 has a few. Padding K and V hold NaN and inf."""
    use_backend(backend)
    q, k, v = _attention_inputs(B=2, Hq=4, Hkv=2, M=3, N=70, D=16, seed=3)  # N > 64: several key blocks
    key_valid = torch.zeros(2, 70, dtype=torch.bool)
    key_valid[1, [2, 5, 40, 66, 68]] = True
    k = k.masked_fill(~key_valid[:, None, :, None], float("nan"))
    v = v.masked_fill(~key_valid[:, None, :, None], float("nan"))
    v[1, :, 3] = float("inf")
    image_index = torch.tensor([[0, 3, 69], [2, 3, 68]])
    scores = torch.zeros(2, 3)
    o, lse = attention_with_scores(q, k, v, causal=causal, key_valid=key_valid, image_index=image_index,
                                   scores_out=scores, score_row=1)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and bool(torch.isneginf(lse[0]).all())
    o64, lse64, p64 = _dense64(q, k, v, causal=causal, key_valid=key_valid)
    torch.testing.assert_close(o[1].double(), o64[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse[1].double(), lse64[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.double(), _mass64(p64[:, :, 1], image_index), rtol=1e-5, atol=1e-6)

    mass = torch.zeros(2, 3)
    row_attention_mass(q[:, :, 0], k, image_index, mass, key_valid=key_valid)
    _, _, p_row = _dense64(q[:, :, :1], k, None, causal=False, key_valid=key_valid)
    torch.testing.assert_close(mass.double(), _mass64(p_row[:, :, 0], image_index), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- dtypes

def _bad_dtype_calls():
    f = torch.randn
    sched = SamplerSchedule.create("ddim", 4, "epsilon")
    return [
        ("q", lambda: row_attention_mass(f(1, 1, 8).to(torch.complex64), f(1, 1, 3, 8).to(torch.complex64),
                                         torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1))),
        ("out", lambda: row_attention_mass(f(1, 1, 8), f(1, 1, 3, 8), torch.zeros(1, 1, dtype=torch.int64),
                                           torch.zeros(1, 1, dtype=torch.float64))),
        ("image_index", lambda: row_attention_mass(f(1, 1, 8), f(1, 1, 3, 8), torch.zeros(1, 1, dtype=torch.int32),
                                                   torch.zeros(1, 1))),
        ("k", lambda: attention_with_scores(f(1, 1, 2, 8), f(1, 1, 3, 8).half(), f(1, 1, 3, 8))),
        ("key_valid", lambda: attention_with_scores(f(1, 1, 2, 8), f(1, 1, 3, 8), f(1, 1, 3, 8),
                                                    key_valid=torch.ones(1, 3))),
        ("scores", lambda: select_topk_tokens(torch.ones(2, 4, dtype=torch.int64), 1)),
        ("scores", lambda: select_topk_tokens(f(2, 4).to(torch.complex64), 1)),
        ("valid", lambda: select_topk_tokens(f(2, 4), 1, valid=torch.ones(2, 4))),
        ("hidden", lambda: linear_cross_entropy(f(3, 4).to(torch.complex64), f(5, 4).to(torch.complex64),
                                                torch.zeros(3, dtype=torch.int64))),
        ("labels", lambda: linear_cross_entropy(f(3, 4), f(5, 4), torch.zeros(3))),
        ("tokens", lambda: linear_log_probs(f(3, 4), f(5, 4), torch.zeros(3, dtype=torch.complex64))),
        ("x", lambda: denoise_step_(f(2, 3).to(torch.complex64), f(2, 3), 0, sched)),
        ("model_out", lambda: denoise_step_(f(2, 3), torch.ones(2, 3, dtype=torch.int32), 0, sched)),
        ("step", lambda: denoise_step_(f(2, 3), f(2, 3), torch.zeros(2), sched)),
        ("noise", lambda: denoise_step_(f(2, 3), f(2, 3), 0, sched, noise=f(2, 3).to(torch.complex64))),
        ("x", lambda: layer_norm_modulate(*(f(2, 3).to(torch.complex64),) * 3)),
        ("shift", lambda: layer_norm_modulate(f(2, 3), f(2, 3).half(), f(2, 3))),
        ("weights", lambda: diffusion_mse(f(3, 4), f(3, 4), f(3, 4), torch.rand(3), "epsilon",
                                          weights=torch.ones(3, dtype=torch.complex64))),
        ("alphas_cumprod", lambda: diffusion_mse(f(3, 4), f(3, 4), f(3, 4), torch.ones(3, dtype=torch.int64),
                                                 "epsilon")),
        ("pred", lambda: diffusion_mse(f(3, 4).to(torch.complex64), f(3, 4), f(3, 4), torch.rand(3), "epsilon")),
        # Python arguments of the wrong type are TypeErrors too (a wrong value is a ValueError)
        ("step", lambda: denoise_step_(f(2, 3), f(2, 3), 1.0, sched)),
        ("chunk_rows", lambda: linear_cross_entropy(f(3, 4), f(5, 4), torch.zeros(3, dtype=torch.int64),
                                                    chunk_rows=2.0)),
        ("causal", lambda: attention_with_scores(f(1, 1, 2, 8), f(1, 1, 3, 8), f(1, 1, 3, 8), causal=None)),
        ("k", lambda: select_topk_tokens(f(2, 4), 1.0)),
        ("score_row", lambda: attention_with_scores(f(1, 1, 2, 8), f(1, 1, 3, 8), f(1, 1, 3, 8), score_row=0.0)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_dtype_calls())))
def test_bad_dtypes_are_refused_naming_the_argument(backend, case, use_backend):
    use_backend(backend)
    name, call = _bad_dtype_calls()[case]
    with pytest.raises(TypeError, match=f"^{name}: expected"):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusion_mse_integer_weights_equal_float_weights(backend, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(2)
    pred, x0, noise = (torch.randn(4, 6, generator=g) for _ in range(3))
    alphas = torch.rand(4, generator=g).clamp(0.05, 0.95)
    ints = torch.tensor([1, 0, 2, 1])
    a = diffusion_mse(pred, x0, noise, alphas, "sample", weights=ints)
    b = diffusion_mse(pred, x0, noise, alphas, "sample", weights=ints.double())
    expected = (ints.double() * (pred.double() - x0.double()).square().mean(1)).sum() / 4
    torch.testing.assert_close(a.double(), expected)
    torch.testing.assert_close(b.double(), expected)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_head_refuses_non_float_conditions_and_latents(dtype):
    head = LatentDiffusionHead(3, 2, width=8, depth=1)
    bad = torch.zeros(2, 2, dtype=dtype)
    with pytest.raises(TypeError, match="^cond: expected dtype"):
        head.sample(bad, steps=2)
    with pytest.raises(TypeError, match="^cond: expected dtype"):
        head.loss(torch.randn(2, 3), bad)
    with pytest.raises(TypeError, match="^target: expected dtype"):
        head.loss(torch.zeros(2, 3, dtype=dtype), torch.randn(2, 2))
    with pytest.raises(TypeError, match="^x_t: expected dtype"):
        head(torch.zeros(2, 3, dtype=dtype), torch.zeros(2), torch.randn(2, 2))
    if dtype == torch.complex64:
        with pytest.raises(TypeError, match="^mask: expected dtype"):
            head.loss(torch.randn(2, 3), torch.randn(2, 2), mask=torch.ones(2, dtype=dtype))
        with pytest.raises(TypeError, match="^t: expected dtype"):
            head(torch.randn(2, 3), torch.zeros(2, dtype=dtype), torch.randn(2, 2))


def test_head_accepts_its_real_inputs():
    head = LatentDiffusionHead(3, 2, width=8, depth=1)
    g = torch.Generator().manual_seed(0)
    target, cond = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    masks = [torch.tensor([True, False, True, True]), torch.tensor([1, 0, 1, 1]), torch.tensor([1.0, 0.0, 1.0, 1.0])]
    losses = [head.loss(target, cond, mask=m, generator=torch.Generator().manual_seed(1)) for m in masks]
    assert losses[0] == losses[1] == losses[2]
    assert head.sample(cond.double(), steps=2).shape == (4, 3)
    assert head.sample(torch.zeros(0, 2), steps=2).shape == (0, 3)


def _bits(t):
    """Compares gathered rows bitwise, NaN payloads included."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.uint16, torch.bool,
                                   torch.int8, torch.bfloat16, torch.uint64])
def test_select_topk_tokens_gathers_embeds_of_any_dtype(backend, dtype, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(3, 6, generator=g)
    raw = torch.randint(0, 255, (3, 6, 4 * (2 if dtype.is_complex else 1) * dtype.itemsize), generator=g,
                        dtype=torch.uint8)
    embeds = raw.view(dtype) if dtype != torch.bool else raw > 127
    idx, gathered = select_topk_tokens(scores, 2, embeds=embeds, order="score")
    expected = torch.stack([_bits(embeds)[b, idx[b]] for b in range(3)])
    assert gathered.dtype == dtype and gathered.shape == (3, 2, embeds.shape[2])
    assert torch.equal(_bits(gathered), expected)
    assert torch.equal(idx, scores.topk(2, dim=1).indices)


# ------------------------------------------------------------------------------------------------------ meta

def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_runs_on_meta_tensors(backend, use_backend):
    use_backend(backend)
    i64 = torch.int64
    out = _meta(2, 3)
    assert row_attention_mass(_meta(2, 4, 16), _meta(2, 2, 5, 16), _meta(2, 3, dtype=i64), out) is out

    o, lse = attention_with_scores(_meta(2, 4, 3, 16), _meta(2, 2, 5, 16), _meta(2, 2, 5, 16),
                                   key_valid=_meta(2, 5, dtype=torch.bool), image_index=_meta(2, 3, dtype=i64),
                                   scores_out=_meta(2, 3))
    assert (o.shape, o.device.type, lse.shape, lse.dtype) == ((2, 4, 3, 16), "meta", (2, 4, 3), torch.float32)

    for loss, shape in ((linear_cross_entropy(_meta(3, 4), _meta(5, 4), _meta(3, dtype=i64)), ()),
                        (linear_cross_entropy(_meta(3, 4), _meta(5, 4), _meta(3, dtype=i64), reduction="none"), (3,)),
                        (linear_log_probs(_meta(3, 4), _meta(5, 4), _meta(3, dtype=i64)), (3,)),
                        (diffusion_mse(_meta(3, 4), _meta(3, 4), _meta(3, 4), _meta(3), "v_prediction"), ())):
        assert (loss.shape, loss.dtype, loss.device.type) == (shape, torch.float32, "meta")

    schedule = SamplerSchedule.create("ddpm", 4, "epsilon")
    x = _meta(3, 4)
    assert denoise_step_(x, _meta(6, 4, dtype=torch.bfloat16), _meta(3, dtype=i64), schedule, cfg_scale=2.0) is x

    x = _meta(2, 3, 8, dtype=torch.bfloat16).requires_grad_()
    y = layer_norm_modulate(x, _meta(2, 3, 8, dtype=torch.bfloat16), _meta(2, 3, 8, dtype=torch.bfloat16))
    assert (y.shape, y.dtype, y.device.type) == ((2, 3, 8), torch.bfloat16, "meta")
    y.sum().backward()
    assert x.grad.shape == (2, 3, 8) and x.grad.device.type == "meta"


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_select_topk_tokens_on_meta_tensors(backend, use_backend):
    use_backend(backend)
    idx, gathered = select_topk_tokens(_meta(2, 6), 3, exclude=_meta(2, 6, dtype=torch.bool),
                                       valid=_meta(2, 6, dtype=torch.bool),
                                       embeds=_meta(2, 6, 5, dtype=torch.complex64))
    assert (idx.shape, idx.dtype, idx.device.type) == ((2, 3), torch.int64, "meta")
    assert (gathered.shape, gathered.dtype, gathered.device.type) == ((2, 3, 5), torch.complex64, "meta")


def test_meta_keeps_the_device_checks():
    with pytest.raises(ValueError, match="k: expected device cpu, got meta"):
        attention_with_scores(torch.randn(1, 1, 2, 8), _meta(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    with pytest.raises(ValueError, match="model_out: expected device meta, got cpu"):
        denoise_step_(_meta(2, 3), torch.randn(2, 3), 0, SamplerSchedule.create("ddim", 4, "epsilon"))


@pytest.mark.parametrize("kind,prediction,options,needle", [
    ("flow_euler", "velocity", {"shift": 1e-308}, "shift"), ("flow_euler", "velocity", {"shift": 1e300}, "shift"),
    ("ddim", "epsilon", {"eta": 1e200}, "eta")])
def test_schedule_values_whose_arithmetic_would_overflow_are_refused(kind, prediction, options, needle):
    with pytest.raises(ValueError, match=rf"^{needle}: expected a value in"):
        SamplerSchedule.create(kind, 10, prediction, **options)
