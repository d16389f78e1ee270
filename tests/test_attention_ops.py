"""attention_with_scores and row_attention_mass against float64 dense oracles, on every CPU backend."""
import pytest
import torch

from mmlatent.kernels import BackendUnavailableError, attention_with_scores, row_attention_mass

from oracles import (LOW_PRECISION_ATOL, assert_close_fp32, assert_within_torch_error, dense_attention64,
                     image_index_for, image_mass64, padded_key_valid, plain_attention)

CPU_BACKENDS = ["torch", "triton"]
# (B, Hq, Hkv, M, N, D): N in {1, 37, 1000}, D in {64, 80, 128}, Hq/Hkv in {1, 4, 7}
ATTN_SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 4, 1, 5, 37, 80),
    (2, 7, 1, 1, 1000, 128),
    (2, 8, 2, 37, 37, 64),
    (1, 4, 4, 16, 1000, 64),
]


def make_inputs(B, Hq, Hkv, M, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    key_valid = padded_key_valid(B, N, g)
    image_index = image_index_for(B, N, min(N, 12) + 2, g)
    return q, k, v, key_valid, image_index


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_with_scores_matches_float64(backend, shape, causal, dtype, use_backend):
    use_backend(backend)
    B, Hq, Hkv, M, N, D = shape
    q, k, v, key_valid, image_index = make_inputs(*shape, dtype)
    scale = D ** -0.5
    start = torch.rand(B, image_index.shape[1])
    scores = start.clone()
    score_row = -1 if M == 1 else M // 2
    o, lse = attention_with_scores(q, k, v, causal=causal, key_valid=key_valid, image_index=image_index,
                                   scores_out=scores, score_row=score_row, weight=0.25)
    o64, lse64, p64 = dense_attention64(q, k, v, causal=causal, key_valid=key_valid, scale=scale)
    assert o.dtype == dtype and o.shape == q.shape and lse.dtype == torch.float32 and lse.shape == (B, Hq, M)
    expected_scores = start.double() + 0.25 * image_mass64(p64[:, :, score_row], image_index)
    # lse and the mass are float32 math on the (already rounded) inputs: 1e-5 relative in every input dtype.
    assert_close_fp32(lse, lse64, what="lse")
    assert_close_fp32(scores, expected_scores, what="scores_out")
    assert torch.equal(scores[image_index < 0], start[image_index < 0]), "padding slots must stay untouched"
    if dtype == torch.float32:
        assert_close_fp32(o, o64, atol=1e-5, what="o")
    else:
        torch_o = plain_attention(q, k, v, causal=causal, key_valid=key_valid, scale=scale)
        assert_within_torch_error(o, o64, torch_o, LOW_PRECISION_ATOL[dtype], what="o")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_rows_give_zero_and_neg_inf(backend, use_backend):
    """A query row with no valid key (all keys before it are padding) gives o = 0 and lse = -inf, never NaN."""
    use_backend(backend)
    q, k, v, _, image_index = make_inputs(2, 4, 2, 6, 10, 64, torch.float32)
    key_valid = torch.ones(2, 10, dtype=torch.bool)
    key_valid[0, :7] = False  # causal: rows 0..2 of item 0 see keys <= 4..6 only, all padding
    scores = torch.zeros(2, image_index.shape[1])
    o, lse = attention_with_scores(q, k, v, causal=True, key_valid=key_valid, image_index=image_index,
                                   scores_out=scores, score_row=0)
    assert torch.all(o[0, :, :3] == 0) and torch.all(torch.isneginf(lse[0, :, :3]))
    assert not torch.isnan(o).any() and not torch.isnan(scores).any()
    assert torch.all(scores[0] == 0), "a score row with no valid key adds no mass"


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("splits", [2, 5])
def test_triton_split_kv_matches(backend, splits, use_backend):
    """The flash-decoding path (keys split over programs, then combined) gives the unsplit result."""
    from mmlatent.kernels.attention.triton_kernels import attention_forward
    q, k, v, key_valid, image_index = make_inputs(2, 7, 1, 3, 300, 64, torch.float32)
    outs = []
    for n in (1, splits):
        scores = torch.zeros(2, image_index.shape[1])
        o, lse = attention_forward(q, k, v, causal=True, key_valid=key_valid, image_index=image_index,
                                   scores_out=scores, score_row=2, scale=0.125, weight=1.0, num_splits=n)
        outs.append((o, lse, scores))
    for a, b in zip(*outs):
        assert_close_fp32(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["native"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 64), (2, 7, 1, 1, 1000, 128), (3, 4, 4, 1, 37, 80),
                                   (2, 8, 2, 1, 200, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_attention_mass_matches_float64(backend, shape, dtype, use_backend):
    use_backend(backend)
    B, Hq, Hkv, _, N, D = shape
    q, k, _, key_valid, image_index = make_inputs(*shape, dtype, seed=1)
    q = q[:, :, 0]
    out = torch.randn(B, image_index.shape[1])
    start = out.clone()
    result = row_attention_mass(q, k, image_index, out, key_valid=key_valid, weight=0.5, scale=0.1)
    assert result is out
    _, _, p64 = dense_attention64(q[:, :, None], k, None, causal=False, key_valid=key_valid, scale=0.1)
    assert_close_fp32(out, start.double() + 0.5 * image_mass64(p64[:, :, 0], image_index))
    assert torch.equal(out[image_index < 0], start[image_index < 0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_attention_mass_equals_score_row_of_attention(backend, use_backend):
    """The same row through both ops: attention_with_scores must add exactly what row_attention_mass adds."""
    use_backend(backend)
    q, k, v, key_valid, image_index = make_inputs(2, 8, 2, 4, 90, 64, torch.float32, seed=3)
    a = torch.zeros(2, image_index.shape[1])
    b = torch.zeros_like(a)
    attention_with_scores(q, k, v, causal=True, key_valid=key_valid, image_index=image_index, scores_out=a)
    row_attention_mass(q[:, :, -1], k, image_index, b, key_valid=key_valid)
    assert_close_fp32(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_output_only_matches_float64(backend, causal, use_backend):
    """``return_lse=False`` (the torch backend's SDPA path): o and the mass equal the float64 oracle, with
    padding, NaN in padding keys and values, grouped heads and a causal row that sees no valid key."""
    use_backend(backend)
    q, k, v, key_valid, image_index = make_inputs(2, 4, 2, 5, 9, 16, torch.float32, seed=3)
    key_valid[0, :6] = False  # row 0 of batch 0 sees no valid key when causal
    k[0, 0, 0] = float("nan")
    v[0, 1, 2] = float("nan")
    scores = torch.zeros(2, image_index.shape[1])
    o, lse = attention_with_scores(q, k, v, causal=causal, key_valid=key_valid, image_index=image_index,
                                   scores_out=scores, score_row=2, return_lse=False)
    clean = [t.masked_fill(torch.isnan(t), 0.0) for t in (q, k, v)]
    o64, _, p64 = dense_attention64(*clean, causal=causal, key_valid=key_valid, scale=0.25)
    assert lse is None
    assert_close_fp32(o, o64, what="o")
    assert_close_fp32(scores, image_mass64(p64[:, :, 2], image_index), what="scores_out")


def test_float64_runs_on_torch_under_auto(use_backend):
    use_backend("auto")
    q, k, v, key_valid, image_index = make_inputs(1, 4, 2, 3, 20, 64, torch.float64)
    o, lse = attention_with_scores(q, k, v, key_valid=key_valid)
    o64, lse64, _ = dense_attention64(q, k, v, causal=True, key_valid=key_valid, scale=0.125)
    assert o.dtype == torch.float64
    torch.testing.assert_close(o, o64, rtol=1e-10, atol=1e-12)


def test_float64_refused_by_triton_with_reasons(use_backend):
    use_backend("triton")
    q, k, v, key_valid, _ = make_inputs(1, 4, 2, 3, 20, 64, torch.float64)
    with pytest.raises(BackendUnavailableError) as err:
        attention_with_scores(q, k, v)
    message = str(err.value)
    assert "float64" in message and "native" in message and "torch" in message


# ---------------------------------------------------------------------------------------------------- bad input

def _good():
    q, k, v, key_valid, image_index = make_inputs(2, 4, 2, 3, 20, 64, torch.float32)
    return dict(q=q, k=k, v=v, key_valid=key_valid, image_index=image_index,
                scores_out=torch.zeros(2, image_index.shape[1]))


@pytest.mark.parametrize("change, error, name", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q"),
    (lambda a: a.update(k=a["k"].half()), TypeError, "k"),
    (lambda a: a.update(v=a["v"][:, :, :10]), ValueError, "v"),
    (lambda a: a.update(k=a["k"][:, :1].expand(2, 3, 20, 64)), ValueError, "k"),
    (lambda a: a.update(q=torch.randn(2, 4, 30, 64)), ValueError, "N >= M"),
    (lambda a: a.update(key_valid=a["key_valid"].int()), TypeError, "key_valid"),
    (lambda a: a.update(key_valid=a["key_valid"][:, :5]), ValueError, "key_valid"),
    (lambda a: a.update(scores_out=a["scores_out"].double()), TypeError, "scores_out"),
    (lambda a: a.update(scores_out=None), ValueError, "scores_out"),
    (lambda a: a.update(image_index=a["image_index"].int()), TypeError, "image_index"),
    (lambda a: a.update(q=a["q"].to("meta")), ValueError, "device"),
    (lambda a: a.update(score_row=3), ValueError, "score_row"),
    (lambda a: a.update(score_row=1.0), TypeError, "score_row"),
    (lambda a: a.update(scale=-1.0), ValueError, "scale"),
    (lambda a: a.update(weight=float("nan")), ValueError, "weight"),
])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_bad_input(change, error, name, backend, use_backend):
    use_backend(backend)
    args = _good()
    change(args)
    before = None if args["scores_out"] is None else args["scores_out"].clone()
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=name):
        attention_with_scores(q, k, v, **args)
    if before is not None and args["scores_out"].device.type == "cpu":
        assert torch.equal(args["scores_out"], before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_range_image_index_is_rejected_untouched(backend, use_backend):
    use_backend(backend)
    args = _good()
    args["image_index"][1, 2] = 20  # N = 20
    before = args["scores_out"].clone()
    with pytest.raises(ValueError, match="image_index"):
        attention_with_scores(args["q"], args["k"], args["v"], image_index=args["image_index"],
                              scores_out=args["scores_out"])
    out = torch.zeros(2, args["image_index"].shape[1])
    with pytest.raises(ValueError, match="image_index"):
        row_attention_mass(args["q"][:, :, 0], args["k"], args["image_index"], out)
    assert torch.equal(args["scores_out"], before) and torch.all(out == 0)


def test_attention_with_scores_refuses_grad():
    args = _good()
    q = args["q"].requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        attention_with_scores(q, args["k"], args["v"])
    with torch.no_grad():
        attention_with_scores(q, args["k"], args["v"])


@pytest.mark.parametrize("change, error, name", [
    (lambda a: a.update(q=a["q"][:, :, :10]), ValueError, "k"),
    (lambda a: a.update(out=torch.zeros(2, 3)), ValueError, "out"),
    (lambda a: a.update(out=torch.zeros(2, a["image_index"].shape[1], dtype=torch.float16)), TypeError, "out"),
    (lambda a: a.update(k=a["k"][None]), ValueError, "k"),
])
def test_row_attention_mass_bad_input(change, error, name):
    args = _good()
    args = dict(q=args["q"][:, :, 0], k=args["k"], image_index=args["image_index"],
                out=torch.zeros(2, args["image_index"].shape[1]))
    change(args)
    with pytest.raises(error, match=name):
        row_attention_mass(args["q"], args["k"], args["image_index"], args["out"])
