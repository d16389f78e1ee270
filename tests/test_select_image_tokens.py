"""select_image_tokens: every layer's image-token mass of the last query row, then the top-k selection, against
the composition it is defined as (row_attention_mass per layer, then select_topk_tokens) on each backend and
against a float64 oracle; ties, exclusion, the fewer-than-k error with nothing modified, bad input."""
import pytest
import torch

from mmlatent.kernels import backend_report, row_attention_mass, select_image_tokens, select_topk_tokens
from oracles import dense_attention64, image_index_for, image_mass64, padded_key_valid

BACKENDS = ["native", "torch"]


def _inputs(L, B, Hq, Hkv, N, D, Ni, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, B, Hq, D, generator=g).to(dtype)
    k = torch.randn(L, B, Hkv, N, D, generator=g).to(dtype)
    image_index = image_index_for(B, N, Ni, g)
    return q, k, padded_key_valid(B, N, g), image_index, torch.randn(B, Ni, 6, generator=g)


def _composition(q, k, image_index, k_select, key_valid, exclude, valid, embeds, weights):
    scores = torch.zeros(image_index.shape)
    for layer in range(len(q)):
        row_attention_mass(q[layer], k[layer], image_index, scores, key_valid=key_valid, weight=weights[layer])
    return select_topk_tokens(scores, k_select, exclude=exclude, valid=valid, embeds=embeds)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 64, 1), (3, 2, 4, 2, 37, 80, 14), (28, 1, 4, 1, 300, 16, 70),
                                   (2, 2, 7, 1, 129, 128, 14)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stacked", [True, False])
def test_equals_row_mass_per_layer_then_selection(backend, shape, stacked, use_backend):
    use_backend(backend)
    q, k, key_valid, image_index, embeds = _inputs(*shape)
    L, B, Ni = shape[0], shape[1], shape[-1]
    valid = image_index >= 0
    exclude = torch.zeros(B, Ni, dtype=torch.bool)
    exclude[:, :1] = Ni > 2  # one token already taken where there is room
    k_select = max(1, min(3, int(valid.sum(1).min()) - int(exclude.any())))
    weights = [1.0 / (layer + 1) for layer in range(L)]
    expected_exclude = exclude.clone()
    expected = _composition(q, k, image_index, k_select, key_valid, expected_exclude, valid, embeds, weights)
    got = select_image_tokens(q if stacked else list(q), k if stacked else list(k), image_index, k_select,
                              key_valid=key_valid, exclude=exclude, valid=valid, embeds=embeds,
                              layer_weights=weights)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(exclude, expected_exclude)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selects_what_the_float64_mass_ranks_first(backend, use_backend):
    use_backend(backend)
    q, k, key_valid, image_index, _ = _inputs(4, 2, 4, 2, 200, 32, 40, torch.float64, seed=3)
    mass = torch.zeros(image_index.shape, dtype=torch.float64)
    for layer in range(4):
        _, _, p64 = dense_attention64(q[layer][:, :, None], k[layer], None, causal=False, key_valid=key_valid,
                                      scale=32 ** -0.5)
        mass += image_mass64(p64[:, :, 0], image_index)
    valid = image_index >= 0
    expected = mass.masked_fill(~valid, -1.0).topk(5, dim=1).indices.sort(dim=1).values
    idx, _ = select_image_tokens(q, k, image_index, 5, key_valid=key_valid, valid=valid)
    assert torch.equal(idx, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_index_and_a_short_row_modifies_nothing(backend, use_backend):
    use_backend(backend)
    q, k, _, _, embeds = _inputs(2, 1, 2, 1, 10, 8, 4)
    k[:, :, :, 3] = k[:, :, :, 7]  # two image keys with the same logits: the same mass in every layer
    image_index = torch.tensor([[7, 1, 3, 5]])
    idx, gathered = select_image_tokens(q, k, image_index, 1, embeds=embeds,
                                        valid=torch.tensor([[True, False, True, False]]))
    assert idx.tolist() == [[0]] and torch.equal(gathered[0, 0], embeds[0, 0])
    exclude = torch.tensor([[True, False, True, True]])
    before = exclude.clone()
    with pytest.raises(ValueError, match="row 0 has 1 eligible tokens"):
        select_image_tokens(q, k, image_index, 2, exclude=exclude)
    assert torch.equal(exclude, before)


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, i: select_image_tokens([], k, i, 1), TypeError, "q: expected a non-empty list"),
    (lambda q, k, i: select_image_tokens(q, k[:1], i, 1), ValueError, "k: expected one tensor per layer"),
    (lambda q, k, i: select_image_tokens(q, k[:, :, :, :, :4], i, 1), ValueError, "k\\[0\\]: expected shape"),
    (lambda q, k, i: select_image_tokens([q[0], q[1, :, :1]], k, i, 1), ValueError, "q\\[1\\]: expected"),
    (lambda q, k, i: select_image_tokens(q, k, i, 9), ValueError, "k_select: expected 1 <= k_select"),
    (lambda q, k, i: select_image_tokens(q, k, i + 20, 1), ValueError, "image_index: entries must be -1"),
    (lambda q, k, i: select_image_tokens(q, k, i, 1, layer_weights=[1.0]), ValueError, "layer_weights: expected 2"),
    (lambda q, k, i: select_image_tokens(q, k.double(), i, 1), TypeError, "k\\[0\\]: expected the dtype of q"),
])
def test_bad_input_names_the_argument(call, error, match):
    q, k, _, image_index, _ = _inputs(2, 1, 2, 1, 10, 8, 4)
    with pytest.raises(error, match=match):
        call(q, k, image_index)


def test_report_and_opcheck():
    q, k, key_valid, image_index, embeds = _inputs(2, 2, 4, 2, 20, 8, 6)
    report = backend_report("select_image_tokens", q=q[0])
    assert report["native"] == "ok" and report["torch"] == "ok"
    torch.library.opcheck(torch.ops.mmlatent.select_image_tokens.default,
                          (list(q), list(k), image_index, 2, key_valid, torch.zeros(2, 6, dtype=torch.bool),
                           image_index >= 0, embeds, 0.3, [1.0, 0.5]))
    torch.library.opcheck(torch.ops.mmlatent.select_image_tokens_native.default,
                          (list(q), list(k), image_index, 2, key_valid, torch.zeros(2, 6, dtype=torch.bool),
                           image_index >= 0, embeds, 0.3, [1.0, 0.5], False))
