"""The native backend (mmlatent._C's C++ CPU ops) against the float64 oracles and the torch backend, on the shape
classes the other backends are tested on, plus bad input with untouched outputs and opcheck. The CUDA kernels
of the same ops are tested in tests/test_gpu.py."""
import pytest
import torch

from mmlatent.kernels import SamplerSchedule, backend_report, denoise_step_, row_attention_mass
from mmlatent.kernels.dispatch import native_module
from oracles import (assert_close_fp32, assert_within_torch_error, dense_attention64, denoise_step64,
                     image_index_for, image_mass64, padded_key_valid)

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
    state = torch.tensor([5, 40], dtype=torch.int64)  # a PhiloxNoise stream's (seed, offset)
    torch.library.opcheck(torch.ops.mmlatent.denoise_step_native.default,
                          (x, out, table, 0, torch.tensor([1, 2, 3, 7]), 1.0, None, 1.5, state))
    torch.library.opcheck(torch.ops.mmlatent.denoise_step_.default,
                          (x, out, table, 0, torch.tensor([1, 2, 3, 7]), 1.0, None, 1.5, state))


# -------------------------------------------------------------------------------------------- row_attention_mass

def _row_inputs(B, Hq, Hkv, N, D, Ni, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    return q, k, padded_key_valid(B, N, g), image_index_for(B, N, Ni, g)


def _mass64(q, k, key_valid, image_index, scale):
    _, _, p64 = dense_attention64(q[:, :, None], k, None, causal=False, key_valid=key_valid, scale=scale)
    return image_mass64(p64[:, :, 0], image_index)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 64, 1), (2, 7, 1, 1000, 128, 14), (3, 4, 4, 37, 80, 14),
                                   (2, 16, 4, 300, 64, 70), (1, 4, 2, 129, 3, 9)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_native_row_attention_mass_matches_the_oracle(shape, dtype, use_backend):
    """Every key count and head grouping of the other backends' tests (blocks of 64 keys: partial, one, several),
    a head dim that is not a multiple of 8, every dtype: float32 / float64 within 1e-5 of the float64 oracle,
    half precision within twice the torch backend's own error."""
    q, k, key_valid, image_index = _row_inputs(*shape, dtype)
    start = torch.randn(image_index.shape)
    expected = start.double() + 0.25 * _mass64(q, k, key_valid, image_index, 0.1)
    results = {}
    for backend in ("native", "torch"):
        use_backend(backend)
        out = start.clone()
        row_attention_mass(q, k, image_index, out, key_valid=key_valid, scale=0.1, weight=0.25)
        results[backend] = out
    if dtype in (torch.float32, torch.float64):
        assert_close_fp32(results["native"], expected)
    else:
        assert_within_torch_error(results["native"], expected, results["torch"], 1e-6)
    assert torch.equal(results["native"][image_index < 0], start[image_index < 0])


def test_native_row_attention_mass_nan_strides_and_empty_heads(use_backend):
    """NaN in a padding key is ignored, and a NaN logit among the valid keys drops its heads (they put no mass
    anywhere, the torch backend's rule); a batch item whose keys are all padding adds nothing; the cache a slice
    of a longer one along N; ``out`` a column slice of a wider buffer."""
    use_backend("native")
    q, cache, key_valid, image_index = _row_inputs(3, 4, 2, 64, 16, 6, torch.float32, seed=2)
    k = torch.cat([cache, torch.randn(3, 2, 20, 16)], dim=2)[:, :, :64]  # N stride 84 rows, not 64
    key_valid[2] = False
    pad = (~key_valid[0]).nonzero()[0, 0]
    k[0, :, pad] = float("nan")
    wide = torch.zeros(3, 10)
    out = wide[:, 2:8]
    row_attention_mass(q, k, image_index, out, key_valid=key_valid)
    expected = _mass64(q, k.nan_to_num(0.0), key_valid, image_index, 16 ** -0.5)
    assert_close_fp32(out, expected)
    assert torch.all(out[2] == 0) and torch.all(wide[:, :2] == 0) and torch.all(wide[:, 8:] == 0)
    valid_key = key_valid[1].nonzero()[0, 0]
    k[1, 0, valid_key] = float("nan")  # KV head 0 serves query heads 0 and 1
    both = torch.zeros(3, 6)
    row_attention_mass(q, k, image_index, both, key_valid=key_valid)
    use_backend("torch")
    theirs = torch.zeros(3, 6)
    row_attention_mass(q, k, image_index, theirs, key_valid=key_valid)
    assert torch.isfinite(both).all()
    assert_close_fp32(both, theirs)
    _, _, p64 = dense_attention64(q[1:2, 2:, None], k[1:2, 1:], None, causal=False, key_valid=key_valid[1:2],
                                  scale=16 ** -0.5)
    assert_close_fp32(both[1], image_mass64(p64[:, :, 0], image_index[1:2])[0])  # the other KV head's queries


def test_native_row_attention_mass_bad_input_leaves_out_untouched():
    q, k, key_valid, image_index = _row_inputs(2, 4, 2, 10, 8, 3, torch.float32)
    out = torch.randn(2, 3)
    before = out.clone()
    op = torch.ops.mmlatent.row_attention_mass_native
    bad = image_index.clone()
    bad[1, 0] = 10
    cases = [((q, k, bad, out, key_valid, 0.5, 1.0), "image_index: entries must be -1"),
             ((q, k[:, :, :, :4], image_index, out, None, 0.5, 1.0), "k: expected \\[B, Hkv, N, D\\]"),
             ((q, torch.randn(2, 3, 10, 8), image_index, out, None, 0.5, 1.0), "k: its 3 heads must divide"),
             ((q, k, image_index, torch.randn(2, 4), None, 0.5, 1.0), "out: expected \\[B, Ni\\]"),
             ((q, k, image_index, out, key_valid[:, :5], 0.5, 1.0), "key_valid: expected \\[B, N\\]")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            op(*args)
        assert torch.equal(out, before)
    with pytest.raises(TypeError, match="k: expected the dtype of q"):
        op(q, k.double(), image_index, out, None, 0.5, 1.0)
    torch.library.opcheck(op.default, (q, k, image_index, out, key_valid, 0.5, 1.0))


# ------------------------------------------------------------------------------------ the losses' row kernel

def test_native_loss_rows_bad_input_and_opcheck():
    """The C++ row kernel of linear_cross_entropy / linear_log_probs (its values and gradients are tested against
    the float64 oracles with the other backends in tests/test_linear_losses.py): bad arguments raise, naming
    them, before the logits change."""
    op = torch.ops.mmlatent.softmax_loss_chunk_native
    logits = torch.randn(4, 300)
    before = logits.clone()
    targets = torch.tensor([0, 299, 5, 7])
    cases = [((logits, torch.tensor([0, 300, 5, 7]), False, 0.0, 1.0, None, None), ValueError,
              "targets: entries must be in \\[0, 300\\)"),
             ((logits, targets[:3], False, 0.0, 1.0, None, None), ValueError, "targets: expected \\[4\\] int64"),
             ((logits, targets, False, 0.0, 1.0, torch.zeros(3), None), ValueError, "lse: expected \\[4\\]"),
             ((logits, targets, False, 0.0, 1.0, None, torch.ones(2)), ValueError, "coef: expected \\[4\\] or"),
             ((logits, targets, False, 0.0, 0.0, None, None), ValueError, "temperature: expected a positive"),
             ((logits.t(), targets, False, 0.0, 1.0, None, None), ValueError, "logits: expected a contiguous"),
             ((logits.half(), targets, False, 0.0, 1.0, None, None), TypeError, "logits: the native row kernel")]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            op(*args)
        assert torch.equal(logits, before)
    values, lse = op(logits.clone(), targets, True, 0.0, 0.7, None, torch.ones(4))
    assert values.shape == lse.shape == (4,) and torch.allclose(lse, torch.logsumexp(before / 0.7, 1))
    torch.library.opcheck(op.default, (logits.clone(), targets, False, 0.1, 1.0, None, torch.full((1,), 0.25)))
