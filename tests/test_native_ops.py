"""The native backend (mmlatent._C's C++ CPU ops) against the float64 oracles and the torch backend, on the shape
classes the other backends are tested on, plus bad input with untouched outputs and opcheck. The CUDA kernels
of the same ops are tested in tests/test_gpu.py."""
import pytest
import torch

from mmlatent.kernels import SamplerSchedule, backend_report, denoise_step_
from mmlatent.kernels.dispatch import native_module
from oracles import assert_close_fp32, denoise_step64

pytestmark = pytest.mark.skipif(native_module()[0] is None, reason="mmlatent._C is not built")

SCHEDULES = [("ddpm", "epsilon", {"clip_sample": 1.0}), ("ddpm", "v_prediction", {}),
             ("ddim", "v_prediction", {"eta": 0.7}), ("ddim", "sample", {}), ("flow_euler", "velocity", {})]


def _step_inputs(R, C, out_dtype, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, generator=g)
    out = torch.randn((2 if cfg else 1) * R, C, generator=g).to(out_dtype)
    return x, out, torch.randn(R, C, generator=g)


# ------------------------------------------------------------------------------------------------- denoise_step_

@pytest.mark.parametrize("kind,prediction,options", SCHEDULES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cfg", [None, 2.5])
def test_native_denoise_step_matches_the_oracle(kind, prediction, options, out_dtype, cfg, use_backend):
    """Every schedule kind and prediction, CFG rows or not, an int step and ragged per-row steps, explicit noise:
    within 1e-5 of the float64 oracle, and equal to the torch backend (the same float32 order of operations)."""
    schedule = SamplerSchedule.create(kind, 12, prediction, **options)
    x, out, noise = _step_inputs(7, 300, out_dtype, cfg)
    for step in (3, torch.tensor([0, 11, 4, 4, 7, 1, 10], dtype=torch.int32), torch.tensor([5] * 7)):
        results = {}
        for backend in ("native", "torch"):
            use_backend(backend)
            y = x.clone()
            denoise_step_(y, out, step, schedule, noise=noise, cfg_scale=cfg)
            results[backend] = y
        steps = step if isinstance(step, torch.Tensor) else torch.full((7,), step)
        stochastic = bool(schedule.table[steps.long(), 5].ne(0).any())
        expected = denoise_step64(x, out.float(), schedule.table.float(), steps, schedule.clip,
                                  noise if stochastic else None, cfg)
        assert_close_fp32(results["native"], expected, what=f"{kind} {prediction} step {step}")
        torch.testing.assert_close(results["native"], results["torch"], rtol=1e-6, atol=1e-6)


def test_native_denoise_step_generated_noise_and_layouts(use_backend):
    """Noise drawn by the op (same generator state, same result as the torch backend), a state that is a column
    slice of a wider buffer (row stride > C), one column, empty inputs."""
    use_backend("native")
    schedule = SamplerSchedule.create("ddpm", 8, "epsilon")
    x, out, _ = _step_inputs(5, 33, torch.float32, None)
    results = {}
    for backend in ("native", "torch"):
        use_backend(backend)
        y = x.clone()
        denoise_step_(y, out, 4, schedule, generator=torch.Generator().manual_seed(3))
        results[backend] = y
    torch.testing.assert_close(results["native"], results["torch"], rtol=0, atol=0)
    use_backend("native")
    wide = torch.randn(5, 50)
    view = wide[:, 7:40]
    expected = view.clone()
    use_backend("torch")
    denoise_step_(expected, out, 2, schedule, noise=torch.ones(5, 33))
    use_backend("native")
    denoise_step_(view, out, 2, schedule, noise=torch.ones(5, 33))
    torch.testing.assert_close(view, expected, rtol=0, atol=0)
    one = torch.randn(4, 1)
    denoise_step_(one, torch.zeros(4, 1), 0, SamplerSchedule.create("ddim", 4, "epsilon"))
    denoise_step_(torch.empty(0, 6), torch.empty(0, 6), 0, schedule, noise=torch.empty(0, 6))


def test_native_denoise_step_reasons_and_bad_input():
    """A transposed state is left to the other backends (it is updated in place along C); direct calls of the C++
    op with bad arguments raise, naming the argument, before x changes."""
    x = torch.randn(16, 4).t()
    assert "unit stride along C" in backend_report("denoise_step_", x=x, model_out=x, noise=None)["native"]
    assert backend_report("denoise_step_", x=torch.randn(2, 3), model_out=torch.randn(2, 3), noise=None)["native"] \
        == "ok"
    schedule = SamplerSchedule.create("ddpm", 8, "epsilon")
    table = schedule.device_table(torch.device("cpu"))
    x = torch.randn(3, 5)
    before = x.clone()
    op = torch.ops.mmlatent.denoise_step_native
    cases = [((x, torch.randn(3, 6), table, 0, None, None, None, None), "model_out: expected \\[3, 5\\]"),
             ((x, torch.randn(3, 5), table, 0, None, None, None, 2.0), "model_out: expected \\[6, 5\\]"),
             ((x, torch.randn(3, 5), table, 8, None, None, None, None), "step: expected 0 <= step < 8"),
             ((x, torch.randn(3, 5), table, 0, torch.tensor([0, 1, 9]), None, None, None), "steps: entries must be"),
             ((x, torch.randn(3, 5), table, 0, torch.tensor([0, 1]), None, None, None), "steps: expected \\[3\\]"),
             ((x, torch.randn(3, 5), table, 0, None, None, torch.randn(3, 4), None), "noise: expected the shape"),
             ((x, torch.randn(3, 5), table[:, :5], 0, None, None, None, None), "table: expected \\[S, 6\\]")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            op(*args)
        assert torch.equal(x, before)


def test_native_denoise_step_opcheck():
    schedule = SamplerSchedule.create("ddim", 8, "v_prediction", eta=0.5)
    table = schedule.device_table(torch.device("cpu"))
    x, out, noise = _step_inputs(4, 9, torch.bfloat16, 1.5)
    torch.library.opcheck(torch.ops.mmlatent.denoise_step_native.default,
                          (x, out, table, 0, torch.tensor([1, 2, 3, 7]), 1.0, noise, 1.5))
