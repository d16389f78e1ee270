"""PhiloxNoise: the noise denoise_step_ draws inside its kernels from a device-resident (seed, offset), on every
backend, against Triton's own tl.randn (run by the interpreter) and against the explicit-noise step."""
import pytest
import torch

from mmlatent.kernels import PhiloxNoise, SamplerSchedule, denoise_step_
from mmlatent.kernels.diffusion.torch_impl import philox_normal

BACKENDS = ["native", "triton", "torch"]


def test_philox_normal_is_tritons_randn():
    """The torch arithmetic of csrc/philox.h against tl.randn itself (the interpreter runs Triton's own code),
    past a 2^32 boundary of the offset so that its high word counts."""
    import triton
    import triton.language as tl

    @triton.jit
    def randn_kernel(State, Out, N: tl.constexpr):
        i = tl.arange(0, N).to(tl.int64)
        tl.store(Out + i, tl.randn(tl.load(State), tl.load(State + 1) + i))

    for seed, offset in ((0, 0), (2 ** 40 + 17, (1 << 32) - 100)):
        state = torch.tensor([seed, offset], dtype=torch.int64)
        expected = torch.empty(256)
        randn_kernel[(1,)](state, expected, N=256)
        torch.testing.assert_close(philox_normal(state, 16, 16).flatten(), expected, rtol=0, atol=2e-6)


def test_philox_normal_draws_the_same_numbers_in_any_chunking(monkeypatch):
    from mmlatent.kernels.diffusion import torch_impl
    state = torch.tensor([3, (1 << 32) - 5], dtype=torch.int64)
    whole = philox_normal(state, 70, 100)
    monkeypatch.setattr(torch_impl, "PHILOX_CHUNK", 999)  # chunks that split rows
    assert torch.equal(philox_normal(state, 70, 100), whole)


def _step_inputs(R=33, C=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, generator=g)
    out = torch.randn(2 * R, C, generator=g).to(torch.bfloat16)
    steps = torch.randint(0, 20, (R,), generator=g)
    return x, out, steps, SamplerSchedule.create("ddpm", 20, "epsilon", clip_sample=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [5, (1 << 32) - 1000], ids=["offset5", "across_2^32"])
def test_each_backend_draws_the_streams_numbers(backend, offset, use_backend):
    """The step with the stream's draw equals the step with philox_normal's numbers as explicit noise (the
    native CPU kernel draws with its own vectorised log and cos, within a few ulp)."""
    use_backend(backend)
    x, out, steps, schedule = _step_inputs()
    stream = PhiloxNoise(1234)
    stream.advance_(offset)
    expected_noise = philox_normal(stream.state.clone(), *x.shape)
    expected = denoise_step_(x.clone(), out, steps, schedule, noise=expected_noise, cfg_scale=3.0)
    got = denoise_step_(x.clone(), out, steps, schedule, noise=stream, cfg_scale=3.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert stream.offset == offset + x.numel()


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_draw_afresh_and_a_seed_replays(backend, use_backend):
    use_backend(backend)
    x, out, _, schedule = _step_inputs()
    zeros = torch.zeros_like(x)

    def draws(seed):
        stream, steps = PhiloxNoise(seed), []
        for step in (0, 1):
            steps.append(denoise_step_(zeros.clone(), out[:x.shape[0]], step, schedule, noise=stream))
        return steps

    first, second = draws(7)
    assert not torch.allclose(first / schedule.table[0, 5], second / schedule.table[1, 5])
    assert all(torch.equal(a, b) for a, b in zip(draws(7), (first, second)))
    assert not torch.equal(draws(8)[0], first)


def test_a_deterministic_step_leaves_the_stream_where_it_was():
    x, out, _, _ = _step_inputs()
    schedule = SamplerSchedule.create("ddim", 10, "epsilon")  # eta = 0: no noise term
    stream = PhiloxNoise(3)
    denoise_step_(x, out[:x.shape[0]], 0, schedule, noise=stream)
    assert stream.offset == 0


@pytest.mark.parametrize("call, error, match", [
    (lambda: PhiloxNoise(-1), ValueError, "seed: expected an int in"),
    (lambda: PhiloxNoise(1.5), ValueError, "seed: expected an int in"),
    (lambda: denoise_step_(torch.zeros(2, 3), torch.zeros(2, 3), 0, SamplerSchedule.create("ddpm", 4, "epsilon"),
                           noise=PhiloxNoise(0), generator=torch.Generator()), ValueError, "generator: a PhiloxNoise"),
    (lambda: denoise_step_(torch.zeros(2, 3), torch.zeros(2, 3), 0, SamplerSchedule.create("ddpm", 4, "epsilon"),
                           noise=PhiloxNoise(0, device="meta")), ValueError, "the PhiloxNoise state is on meta"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_the_native_op_refuses_two_sources_and_a_bad_state():
    x, out, _, schedule = _step_inputs(4, 5)
    table = schedule.device_table(x.device)
    before = x.clone()
    with pytest.raises(ValueError, match="give one source of noise"):
        torch.ops.mmlatent.denoise_step_native(x, out[:4], table, 0, None, None, torch.zeros_like(x), None,
                                               PhiloxNoise(0).state)
    with pytest.raises(ValueError, match="philox_state: expected a contiguous int64"):
        torch.ops.mmlatent.denoise_step_native(x, out[:4], table, 0, None, None, None, None,
                                               torch.zeros(2, dtype=torch.int32))
    assert torch.equal(x, before)
