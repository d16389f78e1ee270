"""gated_mix (MM-CoT's fusion gate as one fused op) against its float64 oracle, forward and gradients, every
backend, low-precision error relative to the unfused torch expression's own, compile, bad input; GatedFusion
against MM-CoT's JointEncoder formula in float64, with and without a feature mask."""
import pytest
import torch

from mmlatent.kernels import BackendUnavailableError, backend_report, gated_mix
from mmlatent.models import GatedFusion

from oracles import gated_mix64, plain_gated_mix

BACKENDS = ["triton", "torch"]


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    text = torch.randn(shape, generator=g).to(dtype)
    attended = torch.randn(shape, generator=g).to(dtype)
    weight = (torch.randn(d, 2 * d, generator=g) / (2 * d) ** 0.5).to(dtype)
    bias = (torch.randn(d, generator=g) * 0.1).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    return text, attended, weight, bias, grad


def run(fn, text, attended, weight, bias, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (text, attended, weight, bias)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def max_err(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (2, 5, 64), (3, 300)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_float32_matches_the_float64_formula(backend, shape, with_bias, use_backend):
    use_backend(backend)
    text, attended, weight, bias, grad = inputs(shape, torch.float32)
    bias = bias if with_bias else None
    got = run(gated_mix, text, attended, weight, bias, grad)
    expected = run(gated_mix64, text.double(), attended.double(), weight.double(),
                   bias.double() if bias is not None else None, grad.double())
    names = ("out", "grad_text", "grad_attended", "grad_weight", "grad_bias")
    for name, a, e in zip(names, got, expected):
        assert a.dtype == torch.float32
        assert max_err(a, e) <= 1e-5 * max(1.0, float(e.abs().max())), name


def test_float64_is_the_formula_to_rounding(use_backend):
    use_backend("torch")
    text, attended, weight, bias, grad = inputs((4, 9, 16), torch.float64)
    for a, e in zip(run(gated_mix, text, attended, weight, bias, grad),
                    run(gated_mix64, text, attended, weight, bias, grad)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_the_unfused_expressions(dtype, use_backend):
    """One rounding of the mix against the unfused expression's four; its error against float64 is at most the
    unfused one's (plus slack: the GEMMs round alike)."""
    text, attended, weight, bias, grad = inputs((32, 96), dtype, seed=3)
    expected = run(gated_mix64, text.double(), attended.double(), weight.double(), bias.double(), grad.double())
    unfused = run(plain_gated_mix, text, attended, weight, bias, grad)
    for backend in BACKENDS:
        use_backend(backend)
        fused = run(gated_mix, text, attended, weight, bias, grad)
        for name, f, u, e in zip(("out", "text", "attended", "weight", "bias"), fused, unfused, expected):
            assert f.dtype == dtype
            assert max_err(f, e) <= 1.25 * max_err(u, e) + 1e-3 * max(1.0, float(e.abs().max())), \
                f"{backend} {name}"


def test_ops_pass_opcheck():
    text, attended, weight, bias, grad = inputs((6, 24), torch.float32)
    torch.library.opcheck(torch.ops.mmlatent.gated_mix.default,
                          (text.requires_grad_(), attended.requires_grad_(), weight.requires_grad_(), bias))
    torch.library.opcheck(torch.ops.mmlatent.gated_mix.default, (text, attended, weight, None))
    _, logits = torch.ops.mmlatent.gated_mix(text.detach(), attended.detach(), weight.detach(), bias)
    torch.library.opcheck(torch.ops.mmlatent.gated_mix_backward.default,
                          (grad, text.detach(), attended.detach(), logits, weight.detach(), True))


def test_torch_compile_fullgraph_matches_eager(use_backend):
    use_backend("triton")
    text, attended, weight, bias, grad = inputs((9, 48), torch.float32, seed=5)

    def block(text, attended, weight, bias):
        return torch.tanh(gated_mix(text, attended, weight, bias)) * 2

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for a, b in zip(run(block, text, attended, weight, bias, grad), run(compiled, text, attended, weight, bias, grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_empty_rows(use_backend):
    use_backend("triton")
    text, attended, weight, bias, grad = inputs((0, 16), torch.float32)
    out, gt, ga, gw, gb = run(gated_mix, text, attended, weight, bias, grad)
    assert out.shape == (0, 16) and gt.shape == (0, 16) and ga.shape == (0, 16)
    assert torch.all(gw == 0) and torch.all(gb == 0)


def test_dispatch_refuses_float64_on_triton(use_backend):
    assert "float64" in backend_report("gated_mix", device=torch.device("cpu"), dtype=torch.float64)["triton"]
    use_backend("triton")
    text, attended, weight, bias, _ = inputs((2, 8), torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        gated_mix(text, attended, weight, bias)


@pytest.mark.parametrize("case, error, match", [
    (lambda t, a, w, b: (t, a[:, :4], w, b), ValueError, "attended: expected text's shape"),
    (lambda t, a, w, b: (t, a, w[:, :8], b), ValueError, "weight: expected"),
    (lambda t, a, w, b: (t, a, w, b[:3]), ValueError, "bias: expected"),
    (lambda t, a, w, b: (t, a.double(), w, b), TypeError, "attended: expected the dtype of text"),
    (lambda t, a, w, b: (t.int(), a, w, b), TypeError, "text: expected dtype"),
    (lambda t, a, w, b: (t, a, [1.0], b), TypeError, "weight: expected a torch.Tensor"),
])
def test_bad_input_names_the_argument(case, error, match):
    text, attended, weight, bias, _ = inputs((3, 8), torch.float32)
    with pytest.raises(error, match=match):
        gated_mix(*case(text, attended, weight, bias))


# ------------------------------------------------------------------------------------------------ GatedFusion

def joint_encoder_fusion(fusion, hidden_states, image_ids):
    """MM-CoT's JointEncoder fusion (amazon-science/mm-cot model.py L289-295), transcribed."""
    image_embedding = fusion.image_dense(image_ids)
    image_att, _ = fusion.mha_layer(hidden_states, image_embedding, image_embedding)
    merge = torch.cat([hidden_states, image_att], dim=-1)
    gate = torch.sigmoid(fusion.gate_dense(merge))
    return (1 - gate) * hidden_states + gate * image_att


def fusion_inputs(B=3, T=7, N=5, d=16, F=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fusion = GatedFusion(d, F).double()
    return fusion, torch.randn(B, T, d, generator=g).double(), torch.randn(B, N, F, generator=g).double()


def test_gated_fusion_equals_mm_cots_formula_in_float64(use_backend):
    use_backend("torch")
    fusion, text, features = fusion_inputs()
    torch.testing.assert_close(fusion(text, features), joint_encoder_fusion(fusion, text, features),
                               rtol=1e-12, atol=1e-12)
    # the parameters carry MM-CoT's names, so its fusion weights load by name
    assert {k.split(".")[0] for k in fusion.state_dict()} == {"image_dense", "mha_layer", "gate_dense"}


def test_gated_fusion_gradients_equal_the_formula(use_backend):
    use_backend("torch")
    fusion, text, features = fusion_inputs(seed=1)
    text.requires_grad_()
    grads = torch.autograd.grad(fusion(text, features).square().sum(), [text] + list(fusion.parameters()))
    expected = torch.autograd.grad(joint_encoder_fusion(fusion, text, features).square().sum(),
                                   [text] + list(fusion.parameters()))
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_a_feature_mask_hides_the_masked_tokens(use_backend):
    use_backend("torch")
    fusion, text, features = fusion_inputs(B=3, N=5)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False], [False] * 5])
    out = fusion(text, features, mask)
    torch.testing.assert_close(out[0], fusion(text[:1], features[:1])[0], rtol=1e-12, atol=1e-12)
    kept = features[1:2, mask[1]]  # the masked tokens' values cannot matter: the same as dropping them
    torch.testing.assert_close(out[1], fusion(text[1:2], kept)[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[2], text[2])  # nothing to attend to: the text states, unchanged
    torch.testing.assert_close(fusion(text, features, torch.ones(3, 5, dtype=torch.bool)), fusion(text, features),
                               rtol=0, atol=0)


def test_gated_fusion_bad_input():
    fusion, text, features = fusion_inputs()
    with pytest.raises(ValueError, match="features: expected \\[B = 3, N, feature_dim = 12\\]"):
        fusion(text, features[..., :8])
    with pytest.raises(ValueError, match="text_states: expected width d_model = 16"):
        fusion(text[..., :8], features)
    with pytest.raises(ValueError, match="feature_mask: expected"):
        fusion(text, features, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="features: expected the dtype of text_states"):
        fusion(text, features.float())
    with pytest.raises(ValueError, match="d_model: expected a positive int"):
        GatedFusion(0, 4)
