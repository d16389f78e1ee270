"""Backend dispatch, torch.library registration (opcheck) and torch.compile."""
import pytest
import torch

import mmlatent.kernels as K
from mmlatent.kernels import BackendUnavailableError, attention_with_scores, row_attention_mass, select_topk_tokens


def test_invalid_backend_name(use_backend):
    use_backend("cuda-magic")
    with pytest.raises(ValueError, match="MMLATENT_BACKEND"):
        select_topk_tokens(torch.randn(1, 3), 1)


def test_error_lists_every_backend_with_reason(use_backend, monkeypatch):
    use_backend("triton")
    import mmlatent.kernels.limits as limits
    monkeypatch.setattr(limits, "triton_interpreting", lambda: False)  # as on a CPU machine without the interpreter
    with pytest.raises(BackendUnavailableError) as err:  # an op without a native implementation
        attention_with_scores(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    message = str(err.value)
    for backend in ("native", "triton", "torch"):
        assert f"- {backend}:" in message
    assert "TRITON_INTERPRET=1" in message and "no native implementation" in message


def test_auto_order_and_report(use_backend):
    use_backend("auto")
    scores = torch.randn(2, 8)
    report = K.backend_report("select_topk_tokens", scores=scores, exclude=None, embeds=None)
    assert set(report) == {"native", "triton", "torch"} and report["torch"] == "ok"
    # auto picks the first backend that can run: native (the C++ op is built by `make test`)
    assert K.SELECT_TOPK_TOKENS.choose(scores=scores, exclude=None, embeds=None) == "native"


@pytest.mark.parametrize("name", ["triton", "torch", "reference"])
def test_requested_backend_really_runs(name, use_backend, monkeypatch):
    """Pinning a backend runs that backend's code (a spy on the Triton launcher proves it)."""
    import mmlatent.kernels.attention.triton_kernels as triton_attention
    calls = []
    real = triton_attention.attention_forward
    monkeypatch.setattr(triton_attention, "attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    use_backend(name)
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    attention_with_scores(q, k, v)
    assert len(calls) == (1 if name == "triton" else 0)


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g), \
        torch.randn(2, 2, 9, 16, generator=g)
    image_index = torch.tensor([[0, 4, -1], [8, 2, 1]])
    key_valid = torch.ones(2, 9, dtype=torch.bool)
    key_valid[0, :2] = False
    return [
        (torch.ops.mmlatent.attention_with_scores.default,
         (q, k, v, True, key_valid, image_index, torch.zeros(2, 3), 2, 0.25, 1.0)),
        (torch.ops.mmlatent.attention_with_scores.default, (q, k, v, False, None, None, None, 0, 0.25, 1.0)),
        (torch.ops.mmlatent.attention_with_scores.default,
         (q, k, v, True, key_valid, image_index, torch.zeros(2, 3), 1, 0.25, 1.0, False)),
        (torch.ops.mmlatent.row_attention_mass.default,
         (q[:, :, 0], k, image_index, torch.zeros(2, 3), key_valid, 0.25, 0.5)),
        (torch.ops.mmlatent.select_topk_tokens.default,
         (torch.randn(2, 9, generator=g), 3, torch.zeros(2, 9, dtype=torch.bool), key_valid,
          torch.randn(2, 9, 4, generator=g), True)),
        (torch.ops.mmlatent.select_topk_tokens.default, (torch.randn(2, 9, generator=g), 2, None, None, None, False)),
        (torch.ops.mmlatent.select_topk_tokens_native.default,
         (torch.randn(2, 9, generator=g), 3, torch.zeros(2, 9, dtype=torch.bool), None,
          torch.randn(2, 9, 4, generator=g), False)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case, use_backend):
    use_backend("auto")
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", range(3))
def test_opcheck_torch_backend(case, use_backend):
    """The torch backend's outputs have the strides the fake kernel promises (a compiled graph reads them so):
    SDPA's CPU path returns o in [B, M, H, D] memory order, which the op makes contiguous."""
    use_backend("torch")
    op, args = _opcheck_cases()[case]
    # q, k, v as a model's attention layer makes them: projections viewed [B, M, H, D], transposed to [B, H, M, D]
    args = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) if i < 3 else t for i, t in enumerate(args))
    torch.library.opcheck(op, args)
    o, _ = op(*args)
    assert o.is_contiguous()


def test_torch_compile_fullgraph(use_backend):
    """The public ops trace into one graph (fake implementations), and compiled results equal eager ones."""
    use_backend("auto")
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g), \
        torch.randn(2, 2, 9, 16, generator=g)
    image_index = torch.tensor([[0, 4, 5, 6], [8, 2, 1, 3]])
    embeds = torch.randn(2, 4, 8, generator=g)

    def step(q, k, v, scores, exclude):
        o, lse = attention_with_scores(q, k, v, image_index=image_index, scores_out=scores)
        row_attention_mass(q[:, :, -1], k, image_index, scores, weight=0.5)
        idx, picked = select_topk_tokens(scores, 2, exclude=exclude, embeds=embeds)
        return o * 2, lse, idx, picked

    eager_state = (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool))
    compiled_state = (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool))
    expected = step(q, k, v, *eager_state)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, *compiled_state)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)
    for a, b in zip(eager_state, compiled_state):
        torch.testing.assert_close(a, b)
