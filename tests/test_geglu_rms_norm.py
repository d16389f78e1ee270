"""geglu (gated GELU) and rms_norm (T5's RMS norm) against their float64 oracles, forward and gradients, every
backend, every shape class (one element, odd widths, several leading dimensions, rows wider than one tile),
low-precision error relative to the unfused torch expression's own, opcheck, torch.compile, empty inputs, bad
input."""
import pytest
import torch

from mmlatent.kernels import BackendUnavailableError, backend_report, geglu, rms_norm

from oracles import geglu64, plain_geglu, plain_rms_norm, rms_norm64

BACKENDS = ["triton", "torch"]


def run(fn, *tensors, grad, **options):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **options)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def max_err(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def geglu_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 2).to(dtype) for _ in range(3)]


def norm_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    return x, weight, torch.randn(shape, generator=g).to(dtype)


# ------------------------------------------------------------------------------------------------ geglu

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 5, 64), (3, 5000)])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_geglu_float32_matches_the_float64_formula(backend, shape, approximate, use_backend):
    use_backend(backend)
    gate, up, grad = geglu_inputs(shape, torch.float32)
    got = run(geglu, gate, up, grad=grad, approximate=approximate)
    expected = run(geglu64, gate.double(), up.double(), grad=grad.double(), approximate=approximate)
    for name, a, e in zip(("out", "grad_gate", "grad_up"), got, expected):
        assert a.dtype == torch.float32 and a.shape == shape
        assert max_err(a, e) <= 2e-6 * max(1.0, float(e.abs().max())), name


def test_geglu_float64_is_the_formula_to_rounding(use_backend):
    use_backend("torch")
    gate, up, grad = geglu_inputs((4, 9, 16), torch.float64)
    for approximate in ("tanh", "none"):
        for a, e in zip(run(geglu, gate, up, grad=grad, approximate=approximate),
                        run(geglu64, gate, up, grad=grad, approximate=approximate)):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_geglu_low_precision_error_within_the_unfused_expressions(dtype, use_backend):
    gate, up, grad = geglu_inputs((64, 96), dtype, seed=3)
    expected = run(geglu64, gate.double(), up.double(), grad=grad.double(), approximate="tanh")
    unfused = run(plain_geglu, gate, up, grad=grad, approximate="tanh")
    for backend in BACKENDS:
        use_backend(backend)
        fused = run(geglu, gate, up, grad=grad, approximate="tanh")
        for name, f, u, e in zip(("out", "gate", "up"), fused, unfused, expected):
            assert f.dtype == dtype
            assert max_err(f, e) <= 1.25 * max_err(u, e) + 1e-6, f"{backend} {name}"


def test_geglu_keeps_only_its_two_inputs_for_the_backward(use_backend):
    use_backend("torch")
    gate, up, _ = geglu_inputs((8, 32), torch.float32)
    gate.requires_grad_(), up.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        geglu(gate, up)
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


def test_geglu_passes_opcheck():
    gate, up, grad = geglu_inputs((6, 24), torch.float32)
    torch.library.opcheck(torch.ops.mmlatent.geglu.default, (gate.requires_grad_(), up.requires_grad_(), "tanh"))
    torch.library.opcheck(torch.ops.mmlatent.geglu_backward.default, (grad, gate.detach(), up.detach(), "none"))


def test_geglu_empty_and_bad_input(use_backend):
    use_backend("triton")
    gate, up, grad = geglu_inputs((0, 16), torch.float32)
    assert all(t.shape == (0, 16) for t in run(geglu, gate, up, grad=grad))
    gate, up, _ = geglu_inputs((3, 8), torch.float32)
    with pytest.raises(ValueError, match="up: expected gate's shape"):
        geglu(gate, up[:, :4])
    with pytest.raises(TypeError, match="up: expected the dtype of gate"):
        geglu(gate, up.double())
    with pytest.raises(TypeError, match="gate: expected dtype"):
        geglu(gate.int(), up)
    with pytest.raises(ValueError, match="approximate: expected one of tanh, none"):
        geglu(gate, up, approximate="sigmoid")
    assert "float64" in backend_report("geglu", device=torch.device("cpu"), dtype=torch.float64)["triton"]
    with pytest.raises(BackendUnavailableError, match="float64"):
        geglu(gate.double(), up.double())


# ------------------------------------------------------------------------------------------------ rms_norm

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (2, 5, 64), (3, 300)])
def test_rms_norm_float32_matches_the_float64_formula(backend, shape, use_backend):
    use_backend(backend)
    x, weight, grad = norm_inputs(shape, torch.float32)
    got = run(rms_norm, x, weight, grad=grad, eps=1e-6)
    expected = run(rms_norm64, x.double(), weight.double(), grad=grad.double(), eps=1e-6)
    for name, a, e in zip(("out", "grad_x", "grad_weight"), got, expected):
        assert a.dtype == torch.float32
        assert max_err(a, e) <= 1e-5 * max(1.0, float(e.abs().max())), name


def test_rms_norm_float32_forward_is_t5_layer_norm_bit_for_bit(use_backend):
    """The torch backend computes what transformers' T5LayerNorm computes, in the same order: the same bits."""
    use_backend("torch")
    x, weight, _ = norm_inputs((4, 33, 64), torch.float32, seed=2)
    assert torch.equal(rms_norm(x, weight, eps=1e-6), plain_rms_norm(x, weight, 1e-6))


def test_rms_norm_float64_is_the_formula_to_rounding(use_backend):
    use_backend("torch")
    x, weight, grad = norm_inputs((4, 9, 16), torch.float64)
    for a, e in zip(run(rms_norm, x, weight, grad=grad, eps=1e-5), run(rms_norm64, x, weight, grad=grad, eps=1e-5)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_low_precision_error_within_the_unfused_expressions(dtype, use_backend):
    x, weight, grad = norm_inputs((64, 96), dtype, seed=3)
    expected = run(rms_norm64, x.double(), weight.double(), grad=grad.double(), eps=1e-6)
    unfused = run(plain_rms_norm, x, weight, grad=grad, eps=1e-6)
    for backend in BACKENDS:
        use_backend(backend)
        fused = run(rms_norm, x, weight, grad=grad, eps=1e-6)
        for name, f, u, e in zip(("out", "x", "weight"), fused, unfused, expected):
            assert f.dtype == dtype
            assert max_err(f, e) <= 1.25 * max_err(u, e) + 1e-3 * max(1.0, float(e.abs().max())), \
                f"{backend} {name}"


def test_rms_norm_rows_wider_than_a_tile_go_to_torch(use_backend):
    from mmlatent.kernels.limits import NORM_MAX_WIDTH
    reasons = backend_report("rms_norm", device=torch.device("cpu"), dtype=torch.float32, width=NORM_MAX_WIDTH + 1)
    assert "one-tile limit" in reasons["triton"] and reasons["torch"] == "ok"
    use_backend("auto")
    x, weight, grad = norm_inputs((2, NORM_MAX_WIDTH + 1), torch.float32)
    got = run(rms_norm, x, weight, grad=grad, eps=1e-6)
    expected = run(rms_norm64, x.double(), weight.double(), grad=grad.double(), eps=1e-6)
    for a, e in zip(got, expected):
        assert max_err(a, e) <= 1e-5 * max(1.0, float(e.abs().max()))


def test_rms_norm_keeps_its_input_and_one_statistic_per_row(use_backend):
    use_backend("torch")
    x, weight, _ = norm_inputs((8, 32), torch.float32)
    x.requires_grad_(), weight.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, weight)
    assert sorted(t.numel() for t in saved) == [8, 32, 8 * 32]  # rstd, weight, x


def test_rms_norm_passes_opcheck():
    x, weight, grad = norm_inputs((6, 24), torch.float32)
    torch.library.opcheck(torch.ops.mmlatent.rms_norm.default, (x.requires_grad_(), weight.requires_grad_(), 1e-6))
    _, rstd = torch.ops.mmlatent.rms_norm(x.detach(), weight.detach(), 1e-6)
    torch.library.opcheck(torch.ops.mmlatent.rms_norm_backward.default, (grad, x.detach(), weight.detach(), rstd))


def test_rms_norm_empty_and_bad_input(use_backend):
    use_backend("triton")
    x, weight, grad = norm_inputs((0, 16), torch.float32)
    out, gx, gw = run(rms_norm, x, weight, grad=grad)
    assert out.shape == (0, 16) and gx.shape == (0, 16) and torch.all(gw == 0)
    x, weight, _ = norm_inputs((3, 8), torch.float32)
    with pytest.raises(ValueError, match="weight: expected"):
        rms_norm(x, weight[:4])
    with pytest.raises(TypeError, match="weight: expected the dtype of x"):
        rms_norm(x, weight.double())
    with pytest.raises(ValueError, match="eps: expected a positive number"):
        rms_norm(x, weight, eps=0.0)
    with pytest.raises(ValueError, match="x: expected \\[..., W\\] with W > 0"):
        rms_norm(x[:, :0], weight[:0])
    with pytest.raises(BackendUnavailableError, match="float64"):
        rms_norm(x.double(), weight.double())


# ------------------------------------------------------------------------------------------------ both

@pytest.mark.parametrize("op, inputs", [(geglu, geglu_inputs), (rms_norm, norm_inputs)], ids=["geglu", "rms_norm"])
def test_torch_compile_fullgraph_matches_eager(op, inputs, use_backend):
    use_backend("triton")
    first, second, grad = inputs((9, 48), torch.float32, seed=5)

    def block(a, b):
        return torch.tanh(op(a, b)) * 2

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for a, b in zip(run(block, first, second, grad=grad), run(compiled, first, second, grad=grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
