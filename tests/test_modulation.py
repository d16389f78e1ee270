"""layer_norm_modulate (adaLN) against its float64 reference: forward and gradients, every backend, strided
modulation slices, low-precision error relative to the unfused torch expression's own, compile, bad input."""
import pytest
import torch

from mmlatent.kernels import BackendUnavailableError, backend_report, layer_norm_modulate

from oracles import layer_norm_modulate64, plain_layer_norm_modulate

BACKENDS = ["triton", "torch"]


def inputs(shape, dtype, seed=0):
    """x [..., W] and shift/scale as column slices of one [N, 3W] modulation output (row stride 3W)."""
    g = torch.Generator().manual_seed(seed)
    W = shape[-1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    mods = (torch.randn(*shape[:-1], 3 * W, generator=g) * 0.5).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, mods, dy


def run(x, mods, dy, fn):
    x = x.detach().clone().requires_grad_()
    mods = mods.detach().clone().requires_grad_()
    shift, scale, _gate = mods.chunk(3, dim=-1)
    y = fn(x, shift, scale)
    y.backward(dy)
    return y.detach(), x.grad, mods.grad


def truth(x, mods, dy):
    return run(x.double(), mods.double(), dy.double(), lambda x, s, c: layer_norm_modulate64(x, s, c, 1e-6))


def max_err(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 1), (7, 13), (4, 200), (2, 3, 96), (3, 1500)])
def test_float32_matches_float64_reference(backend, shape, use_backend):
    use_backend(backend)
    x, mods, dy = inputs(shape, torch.float32)
    got = run(x, mods, dy, layer_norm_modulate)
    for name, a, e in zip(("y", "grad_x", "grad_mods"), got, truth(x, mods, dy)):
        assert max_err(a, e) <= 1e-5 * max(1.0, float(e.abs().max())), name
    if shape[-1] > 1:  # gate's columns get no gradient
        assert torch.all(got[2][..., 2 * shape[-1]:] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_the_unfused_expressions(dtype, use_backend):
    """The fused kernel rounds once; its error against float64 is at most the torch expression's (plus slack)."""
    x, mods, dy = inputs((16, 384), dtype, seed=3)
    expected = truth(x, mods, dy)
    unfused = run(x, mods, dy, lambda x, s, c: plain_layer_norm_modulate(x, s, c, 1e-6))
    for backend in BACKENDS:  # both backends round once
        use_backend(backend)
        fused = run(x, mods, dy, layer_norm_modulate)
        for name, f, u, e in zip(("y", "grad_x", "grad_mods"), fused, unfused, expected):
            assert f.dtype == dtype
            assert max_err(f, e) <= 1.25 * max_err(u, e) + 1e-6, f"{backend} {name}"


def test_triton_op_passes_opcheck():
    x, mods, dy = inputs((6, 40), torch.float32)
    shift, scale, _ = mods.chunk(3, dim=1)
    torch.library.opcheck(torch.ops.mmlatent.layer_norm_modulate.default, (x.requires_grad_(), shift, scale, 1e-6))
    y, mean, rstd = torch.ops.mmlatent.layer_norm_modulate(x, shift, scale, 1e-6)
    torch.library.opcheck(torch.ops.mmlatent.layer_norm_modulate_backward.default, (dy, x.detach(), scale, mean, rstd))


def test_torch_compile_fullgraph_matches_eager(use_backend):
    use_backend("triton")
    x, mods, dy = inputs((9, 48), torch.float32, seed=5)

    def block(x, mods):
        shift, scale, gate = mods.chunk(3, dim=1)
        return x + gate * torch.nn.functional.silu(layer_norm_modulate(x, shift, scale))

    eager = run(x, mods, dy, lambda x, s, c: block(x, torch.cat([s, c, torch.zeros_like(s)], 1)))
    compiled_block = torch.compile(block, backend="aot_eager", fullgraph=True)
    compiled = run(x, mods, dy, lambda x, s, c: compiled_block(x, torch.cat([s, c, torch.zeros_like(s)], 1)))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_empty_rows(use_backend):
    use_backend("triton")
    x, mods, dy = inputs((0, 32), torch.float32)
    y, gx, gm = run(x, mods, dy, layer_norm_modulate)
    assert y.shape == (0, 32) and gx.shape == (0, 32) and gm.shape == (0, 96)


def test_dispatch_explains_what_the_kernel_cannot_take(use_backend):
    report = backend_report("layer_norm_modulate", device=torch.device("cpu"), dtype=torch.float32, width=1 << 15)
    assert "exceed" in report["triton"] and report["torch"] == "ok"
    assert "float64" in backend_report("layer_norm_modulate", device=torch.device("cpu"), dtype=torch.float64,
                                       width=8)["triton"]
    use_backend("triton")
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        layer_norm_modulate(x, x, x)


@pytest.mark.parametrize("case, error, match", [
    (lambda x: (x, x[:, :4], x), ValueError, "shift: expected the shape of x"),
    (lambda x: (x, x, x.double()), TypeError, "scale: expected the dtype of x"),
    (lambda x: (x.int(), x.int(), x.int()), TypeError, "x: expected dtype"),
    (lambda x: (x, x, [1.0]), TypeError, "scale: expected a torch.Tensor"),
])
def test_bad_input_names_the_argument(case, error, match):
    x = torch.randn(3, 8)
    with pytest.raises(error, match=match):
        layer_norm_modulate(*case(x))


def test_bad_eps():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="eps: expected a positive number"):
        layer_norm_modulate(x, x, x, eps=0.0)
