"""select_topk_tokens on every CPU backend (native C++, Triton interpreter, torch) against a Python oracle."""
import math

import pytest
import torch

from mmlatent.kernels import BackendUnavailableError, select_topk_tokens

CPU_BACKENDS = ["native", "triton", "torch"]


def oracle(scores, k, exclude, valid, order):
    """Plain Python ranking in float64: higher first, NaN below every number, ties to the lower index."""
    out = []
    for b in range(scores.shape[0]):
        row = scores[b].double().tolist()
        eligible = [i for i in range(len(row))
                    if (valid is None or valid[b, i]) and (exclude is None or not exclude[b, i])]
        ranked = sorted(eligible, key=lambda i: (math.isnan(row[i]), -row[i] if not math.isnan(row[i]) else 0, i))
        chosen = ranked[:k]
        out.append(sorted(chosen) if order == "position" else chosen)
    return torch.tensor(out, dtype=torch.int64)


def make_case(B, Ni, Dm, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(B, Ni, generator=g) * 4).round() / 4  # many exact ties
    scores[0, :: max(1, Ni // 5)] = float("nan")
    if Ni > 3:
        scores[-1, 1] = float("-inf")
        scores[-1, 2] = -0.0
        scores[-1, 3] = 0.0
    scores = scores.to(dtype)
    valid = torch.ones(B, Ni, dtype=torch.bool)
    if Ni > 6:
        valid[0, :2] = False  # padding at the front
        valid[-1, -2:] = False  # and at the back
    exclude = torch.rand(B, Ni, generator=g) < 0.2
    exclude &= valid
    exclude[:, Ni // 2] = False  # at least one eligible token per row
    embeds = torch.randn(B, Ni, Dm, generator=g)
    return scores, valid, exclude, embeds


SHAPES = [(1, 1, 8), (2, 37, 80), (3, 256, 64), (2, 1000, 16)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B, Ni, Dm", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", ["position", "score"])
def test_matches_oracle(backend, B, Ni, Dm, dtype, order, use_backend):
    if backend == "triton" and Ni >= 1000 and dtype != torch.float32:
        pytest.skip("interpreter time (~10 s a case): the wide row runs under Triton in float32")
    use_backend(backend)
    scores, valid, exclude, embeds = make_case(B, Ni, Dm, dtype, seed=Ni)
    eligible = int((valid & ~exclude).sum(1).min())
    for k in sorted({1, min(32, eligible), eligible}):  # k = 1 and k = all eligible
        ex = exclude.clone()
        idx, gathered = select_topk_tokens(scores, k, exclude=ex, valid=valid, embeds=embeds, order=order)
        expected = oracle(scores, k, exclude, valid, order)
        assert idx.dtype == torch.int64 and torch.equal(idx, expected), f"k={k}"
        assert torch.equal(gathered, torch.gather(embeds, 1, expected[:, :, None].expand(-1, -1, Dm)))
        updated = exclude.clone()
        updated.scatter_(1, expected, True)
        assert torch.equal(ex, updated)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_float64_ranked_exactly(backend, use_backend):
    """Two float64 scores that round to the same float32 must still be ordered (native CPU op, torch)."""
    use_backend(backend)
    scores = torch.tensor([[1.0, 1.0 + 1e-12, 0.5]], dtype=torch.float64)
    idx, _ = select_topk_tokens(scores, 1)
    assert idx.tolist() == [[1]]


def test_float64_not_rounded_by_triton(use_backend):
    use_backend("triton")
    with pytest.raises(BackendUnavailableError, match="float64"):
        select_topk_tokens(torch.zeros(1, 4, dtype=torch.float64), 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_exclude_no_embeds(backend, use_backend):
    use_backend(backend)
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    idx, gathered = select_topk_tokens(scores, 2, order="score")
    assert gathered is None
    assert idx.tolist() == [[1, 3], [0, 1]]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_steps_never_reselect(backend, use_backend):
    """IVT-LR's loop: each step excludes what it selected, so steps partition the eligible tokens."""
    use_backend(backend)
    scores, valid, _, embeds = make_case(2, 64, 4, torch.float32, seed=5)
    exclude = ~valid
    seen = []
    for _ in range(4):
        idx, _ = select_topk_tokens(scores, 8, exclude=exclude, valid=valid)
        seen.append(idx)
    allidx = torch.cat(seen, 1)
    for b in range(2):
        assert len(set(allidx[b].tolist())) == 32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_too_few_eligible_names_row_and_modifies_nothing(backend, use_backend):
    use_backend(backend)
    scores = torch.randn(3, 10)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[2, 3:] = False
    exclude = torch.zeros(3, 10, dtype=torch.bool)
    exclude[2, 0] = True
    before = exclude.clone()
    with pytest.raises(ValueError, match="row 2 has 2 eligible"):
        select_topk_tokens(scores, 3, exclude=exclude, valid=valid, embeds=torch.randn(3, 10, 4))
    assert torch.equal(exclude, before)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(scores=torch.randn(4)), ValueError, "scores"),
    (dict(scores=torch.zeros(2, 5, dtype=torch.int64)), TypeError, "scores"),
    (dict(k=0), ValueError, "k"),
    (dict(k=6), ValueError, "k"),
    (dict(k=2.0), TypeError, "k"),
    (dict(exclude=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "exclude"),
    (dict(exclude=torch.zeros(2, 5, dtype=torch.uint8)), TypeError, "exclude"),
    (dict(valid=torch.ones(2, 5)), TypeError, "valid"),
    (dict(embeds=torch.zeros(2, 4, 3)), ValueError, "embeds"),
    (dict(embeds=torch.zeros(2, 5, 3, device="meta")), ValueError, "embeds"),
    (dict(order="rank"), ValueError, "order"),
])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input(kwargs, error, name, backend, use_backend):
    use_backend(backend)
    args = dict(scores=torch.randn(2, 5), k=2, exclude=torch.zeros(2, 5, dtype=torch.bool))
    args.update(kwargs)
    before = args["exclude"].clone()
    scores, k = args.pop("scores"), args.pop("k")
    with pytest.raises(error, match=name):
        select_topk_tokens(scores, k, **args)
    assert torch.equal(args["exclude"], before)


def test_non_contiguous_exclude(use_backend):
    """In-place update of a strided mask: the torch backend handles it, the kernels decline with a reason."""
    scores = torch.randn(2, 6)
    base = torch.zeros(6, 2, dtype=torch.bool)
    use_backend("auto")
    idx, _ = select_topk_tokens(scores, 2, exclude=base.t())
    assert torch.equal(base.t().nonzero()[:, 1].view(2, 2), idx)
    for name in ("native", "triton"):
        use_backend(name)
        with pytest.raises(BackendUnavailableError, match="not contiguous"):
            select_topk_tokens(scores, 2, exclude=torch.zeros(6, 2, dtype=torch.bool).t())


def test_native_op_checks_arguments_itself():
    """The C++ op is reachable directly through torch.ops; it must refuse bad input with a named argument too."""
    op = torch.ops.mmlatent.select_topk_tokens_native
    with pytest.raises(ValueError, match="k"):
        op(torch.randn(2, 5), 9, None, None, None, False)
    with pytest.raises(TypeError, match="valid"):
        op(torch.randn(2, 5), 1, None, torch.ones(2, 5), None, False)
    with pytest.raises(ValueError, match="embeds"):
        op(torch.randn(2, 5), 1, None, None, torch.randn(2, 4, 3), False)
