"""diffusion_mse: every target kind against a float64 torch oracle (value, grad of pred and x0), row weights and
masks, low precision, opcheck / compile, bad input."""
import pytest
import torch

from mmlatent.kernels import diffusion_mse
from mmlatent.kernels.diffusion import TARGETS, target_coefficients

from oracles import plain_diffusion_mse

BACKENDS = ["triton", "torch"]


def inputs(R, C, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred, x0, noise = (torch.randn(R, C, generator=g).to(dtype) for _ in range(3))
    alphas = torch.rand(R, generator=g).clamp(0.01, 0.99)
    return pred, x0, noise, alphas


def oracle(pred, x0, noise, alphas, prediction, weights=None):
    """The textbook expression in float64: build the target, square, mean, weight."""
    a = alphas.double()[:, None]
    x0, noise = x0.double(), noise.double()
    target = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0,
              "velocity": noise - x0}[prediction]
    err = (pred.double() - target).pow(2).mean(dim=1)
    if weights is None:
        return err.mean()
    w = weights.double()
    return (w * err).sum() / w.sum().clamp_min(1.0)


def value_and_grads(fn, pred, x0, *rest, **kw):
    pred = pred.detach().clone().requires_grad_()
    x0 = x0.detach().clone().requires_grad_()
    loss = fn(pred, x0, *rest, **kw)
    gp, gx = torch.autograd.grad(loss, (pred, x0), allow_unused=True)  # the oracle's epsilon target has no x0
    return loss.detach(), gp, torch.zeros_like(x0) if gx is None else gx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", TARGETS)
@pytest.mark.parametrize("R, C", [(1, 1), (7, 10), (5, 300)])
def test_matches_float64_oracle(backend, prediction, R, C, use_backend):
    use_backend(backend)
    pred, x0, noise, alphas = inputs(R, C)
    weights = torch.tensor([True, False] * R)[:R]
    for w in (None, weights, torch.rand(R, generator=torch.Generator().manual_seed(1)) * 3):
        got = value_and_grads(diffusion_mse, pred, x0, noise, alphas, prediction, weights=w)
        want = value_and_grads(lambda p, x, *r, **k: oracle(p, x, *r, **k), pred.double(), x0.double(), noise,
                               alphas, prediction, weights=w)
        for name, a, e in zip(("loss", "grad_pred", "grad_x0"), got, want):
            assert a.dtype == (torch.float32 if name == "loss" else pred.dtype)
            torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-7, msg=name)


def test_all_rows_masked_is_zero(use_backend):
    use_backend("triton")
    pred, x0, noise, alphas = inputs(4, 8)
    loss, gp, gx = value_and_grads(diffusion_mse, pred, x0, noise, alphas, "epsilon", weights=torch.zeros(4))
    assert float(loss) == 0.0 and not gp.any() and not gx.any()


def test_bfloat16_prediction_error_within_the_torch_expressions(use_backend):
    pred, x0, noise, alphas = inputs(64, 256, seed=4)
    pred = pred.to(torch.bfloat16)
    exact = value_and_grads(oracle, pred.double(), x0.double(), noise, alphas, "v_prediction")
    a, b = target_coefficients("v_prediction", alphas)
    coef = torch.full((64,), 1 / 64)
    unfused = value_and_grads(lambda p, x, n, *_: plain_diffusion_mse(p, x, n, a, b, coef), pred, x0, noise, alphas,
                              "v_prediction")
    for backend in BACKENDS:
        use_backend(backend)
        result = value_and_grads(diffusion_mse, pred, x0, noise, alphas, "v_prediction")
        for i, name in enumerate(("loss", "grad_pred", "grad_x0")):
            fused = (result[i].double() - exact[i]).abs().max()
            torch_err = (unfused[i].double() - exact[i]).abs().max()
            assert fused <= 1.25 * torch_err + 1e-7, f"{backend} {name}"


def test_opcheck_and_compile(use_backend):
    pred, x0, noise, alphas = inputs(6, 20)
    a, b = target_coefficients("v_prediction", alphas)
    coef = torch.full((6,), 1 / 6)
    torch.library.opcheck(torch.ops.mmlatent.diffusion_mse.default,
                          (pred.requires_grad_(), x0, noise, a, b, coef, True))
    use_backend("triton")
    eager = value_and_grads(diffusion_mse, pred, x0, noise, alphas, "v_prediction")
    compiled_fn = torch.compile(diffusion_mse, backend="aot_eager", fullgraph=True)
    compiled = value_and_grads(compiled_fn, pred, x0, noise, alphas, "v_prediction")
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(e, c, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change, error, match", [
    (dict(prediction="x0"), ValueError, "prediction: expected one of"),
    (dict(x0=torch.randn(3, 5)), ValueError, "x0: expected shape"),
    (dict(noise=torch.randn(4, 8).int()), TypeError, "noise: expected dtype"),
    (dict(alphas_cumprod=torch.rand(3)), ValueError, "alphas_cumprod: expected shape"),
    (dict(weights=torch.ones(5)), ValueError, "weights: expected shape"),
    (dict(pred=torch.randn(4, 0), x0=torch.randn(4, 0), noise=torch.randn(4, 0)), ValueError, "at least one column"),
])
def test_bad_input_names_the_argument(change, error, match):
    pred, x0, noise, alphas = inputs(4, 8)
    args = dict(pred=pred, x0=x0, noise=noise, alphas_cumprod=alphas, prediction="epsilon")
    args.update(change)
    weights = args.pop("weights", None)
    with pytest.raises(error, match=match):
        diffusion_mse(**args, weights=weights)


def test_torch_backend_is_the_textbook_expression(use_backend):
    use_backend("torch")
    pred, x0, noise, alphas = inputs(5, 9)
    got = diffusion_mse(pred, x0, noise, alphas, "sample")
    torch.testing.assert_close(got.double(), oracle(pred, x0, noise, alphas, "sample"))
