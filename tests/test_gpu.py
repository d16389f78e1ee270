"""bf16 on a CUDA GPU: the Triton and CUDA kernels against float64 oracles (skipped without CUDA)."""
import pytest
import torch

from mmlatent.kernels import attention_with_scores, row_attention_mass, select_topk_tokens

from oracles import (LOW_PRECISION_ATOL, assert_close_fp32, assert_within_torch_error, dense_attention64,
                     image_index_for, image_mass64, padded_key_valid, plain_attention)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(1, 28, 4, 1, 2048, 128), (2, 28, 4, 33, 2048, 128), (1, 28, 4, 512, 2048, 128),
                                   (2, 7, 1, 37, 1000, 80), (2, 16, 4, 1, 16384, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_attention_with_scores_bf16(shape, causal, use_backend):
    use_backend("triton")
    B, Hq, Hkv, M, N, D = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(torch.bfloat16) for h, n in ((Hq, M), (Hkv, N), (Hkv, N)))
    key_valid = padded_key_valid(B, N, g)
    image_index = image_index_for(B, N, 256, g)
    o64, lse64, p64 = dense_attention64(q, k, v, causal=causal, key_valid=key_valid, scale=D ** -0.5)
    torch_o = plain_attention(q.cuda(), k.cuda(), v.cuda(), causal=causal, key_valid=key_valid.cuda(),
                              scale=D ** -0.5).cpu()
    scores = torch.zeros(B, 256, device="cuda")
    o, lse = attention_with_scores(q.cuda(), k.cuda(), v.cuda(), causal=causal, key_valid=key_valid.cuda(),
                                   image_index=image_index.cuda(), scores_out=scores)
    assert_within_torch_error(o.cpu(), o64, torch_o, LOW_PRECISION_ATOL[torch.bfloat16], what="o")
    assert_close_fp32(lse.cpu(), lse64, rtol=1e-4, atol=1e-4, what="lse")
    assert_close_fp32(scores.cpu(), image_mass64(p64[:, :, -1], image_index), rtol=1e-4, atol=1e-6, what="mass")


@pytest.mark.parametrize("N", [1, 4096, 65536])
def test_row_attention_mass_bf16(N, use_backend):
    use_backend("triton")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 28, 128, generator=g).to(torch.bfloat16)
    k = torch.randn(2, 4, N, 128, generator=g).to(torch.bfloat16)
    image_index = image_index_for(2, N, 64, g)
    out = torch.zeros(2, 64, device="cuda")
    row_attention_mass(q.cuda(), k.cuda(), image_index.cuda(), out)
    _, _, p64 = dense_attention64(q[:, :, None], k, None, causal=False, key_valid=None, scale=128 ** -0.5)
    assert_close_fp32(out.cpu(), image_mass64(p64[:, :, 0], image_index), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("Ni, k", [(256, 32), (1024, 64), (4096, 64), (4096, 4096), (8192, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_topk_tokens_cuda(backend, Ni, k, dtype, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(Ni)
    scores = ((torch.randn(3, Ni, generator=g) * 8).round() / 8).to(dtype)  # ties
    scores[0, ::7] = float("nan")
    valid = torch.ones(3, Ni, dtype=torch.bool)
    embeds = torch.randn(3, Ni, 3584, generator=g).to(torch.bfloat16)
    exclude = torch.zeros(3, Ni, dtype=torch.bool)
    expected_ex = exclude.clone()
    expected = select_topk_tokens(scores, k, exclude=expected_ex, valid=valid, embeds=embeds)  # native CPU op
    ex = exclude.cuda()
    idx, gathered = select_topk_tokens(scores.cuda(), k, exclude=ex, valid=valid.cuda(), embeds=embeds.cuda())
    assert torch.equal(idx.cpu(), expected[0]) and torch.equal(gathered.cpu(), expected[1])
    assert torch.equal(ex.cpu(), expected_ex)
