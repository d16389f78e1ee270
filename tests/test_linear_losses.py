"""linear_cross_entropy and linear_log_probs on the CPU backends (torch, Triton interpreter) against float64
F.cross_entropy / log_softmax, plus bad input, the memory bound, opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import mmlatent.kernels as K
from mmlatent.kernels import linear_cross_entropy, linear_log_probs
from mmlatent.kernels.losses import op as losses

from causal_lms import LargestTensor

CPU_BACKENDS = ["torch", "triton", "native"]


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: elementwise-relative would blow up at gradients near zero."""
    scale = expected.detach().double().abs().max().clamp_min(1e-30)
    return float((actual.detach().double() - expected.detach().double()).abs().max() / scale)


def make(T, H, V, dtype=torch.float32, bias=True, ignore_every=0, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, H, generator=g) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H ** -0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (T,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def grads_of(out, upstream, params):
    for p in params:
        p.grad = None
    (out * upstream).sum().backward()
    return [p.grad.clone() for p in params]


def oracle_ce(hidden, weight, bias, labels, upstream, **kw):
    """float64 loss and gradients of plain F.cross_entropy over materialised logits."""
    params = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    logits = params[0] @ params[1].T + (params[2] if bias is not None else 0)
    cap = kw.pop("logit_softcap", None)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    loss = F.cross_entropy(logits, labels, **kw)
    return loss.detach(), grads_of(loss, upstream.double(), params)


SETTINGS = [
    dict(reduction="mean"),
    dict(reduction="sum", label_smoothing=0.1),
    dict(reduction="none"),
    dict(reduction="mean", logit_softcap=4.0),
    dict(reduction="none", label_smoothing=0.2, logit_softcap=3.0),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("shape", [(37, 16, 101, 7), (20, 24, 1500, None)], ids=["chunks7", "V1500-onechunk"])
def test_cross_entropy_fp32_matches_float64(backend, settings, shape, use_backend):
    use_backend(backend)
    T, H, V, chunk = shape
    hidden, weight, bias, labels = make(T, H, V, ignore_every=4)
    if backend == "native" and settings.get("logit_softcap"):  # left to the torch backend, said so
        with pytest.raises(K.BackendUnavailableError, match="logit_softcap: its derivative needs the logits"):
            linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_rows=chunk, **settings)
        return
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_rows=chunk, **settings)
    upstream = torch.randn(T) if settings["reduction"] == "none" else torch.tensor(1.7)
    ours = grads_of(loss, upstream, [hidden, weight, bias])
    ref_loss, ref = oracle_ce(hidden, weight, bias, labels, upstream, **settings)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) <= 1e-5
    if settings["reduction"] == "none":
        assert bool((loss[labels == -100] == 0).all())
    for name, a, e in zip(("hidden", "weight", "bias"), ours, ref):
        assert a.dtype == torch.float32
        assert rel_err(a, e) <= 1e-5, name


@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("torch", torch.float16),
                                           ("triton", torch.float16), ("triton", torch.bfloat16)])
def test_cross_entropy_low_precision_within_twice_naive_error(backend, dtype, use_backend):
    """Error against float64 at most 2x that of the naive path in the same dtype (logits in `dtype`, softmax in
    float32, as transformers computes it), with several chunks (grad_weight sums over chunks)."""
    use_backend(backend)
    hidden, weight, bias, labels = make(96, 32, 700, dtype=dtype, ignore_every=5)
    upstream = torch.tensor(1.0)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_rows=16)
    ours = grads_of(loss, upstream, [hidden, weight, bias])
    naive_loss = F.cross_entropy((hidden @ weight.T + bias).float(), labels)
    naive = grads_of(naive_loss, upstream, [hidden, weight, bias])
    ref_loss, ref = oracle_ce(hidden, weight, bias, labels, upstream)
    assert rel_err(loss, ref_loss) <= 2 * rel_err(naive_loss, ref_loss) + 1e-6
    for name, a, n, e in zip(("hidden", "weight", "bias"), ours, naive, ref):
        assert a.dtype == dtype
        assert rel_err(a, e) <= 2 * rel_err(n, e), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_fp32_matches_float64(backend, temperature, use_backend):
    use_backend(backend)
    hidden, weight, bias, labels = make(29, 16, 1100, seed=3)
    tokens = labels
    logp = linear_log_probs(hidden, weight, tokens, bias=bias, temperature=temperature, chunk_rows=8)
    upstream = torch.randn(29)  # advantages: a different gradient per row
    ours = grads_of(logp, upstream, [hidden, weight, bias])
    params = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref_logp = torch.log_softmax((params[0] @ params[1].T + params[2]) / temperature, -1)
    ref_logp = ref_logp.gather(1, tokens[:, None]).squeeze(1)
    ref = grads_of(ref_logp, upstream.double(), params)
    assert logp.dtype == torch.float32 and logp.shape == (29,)
    assert rel_err(logp, ref_logp) <= 1e-5
    for name, a, e in zip(("hidden", "weight", "bias"), ours, ref):
        assert rel_err(a, e) <= 1e-5, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["log_probs", "cross_entropy_none"])
def test_per_row_results_with_frozen_head(backend, op, use_backend):
    """Frozen head (LoRA): the hidden gradient is computed in the forward pass and scaled per row."""
    use_backend(backend)
    hidden, weight, bias, labels = make(33, 16, 300, seed=5, ignore_every=4 if op != "log_probs" else 0)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    upstream = torch.randn(33)
    if op == "log_probs":
        out = linear_log_probs(hidden, weight, labels, bias=bias, temperature=1.3, chunk_rows=8)
        h64 = hidden.detach().double().requires_grad_()
        exact = torch.log_softmax((h64 @ weight.double().T + bias.double()) / 1.3, -1)
        exact = exact.gather(1, labels[:, None]).squeeze(1)
    else:
        out = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="none", label_smoothing=0.1,
                                   chunk_rows=8)
        h64 = hidden.detach().double().requires_grad_()
        exact = F.cross_entropy(h64 @ weight.double().T + bias.double(), labels, reduction="none",
                                label_smoothing=0.1)
    (grad,) = grads_of(out, upstream, [hidden])
    (grad64,) = grads_of(exact, upstream.double(), [h64])
    assert rel_err(out, exact) <= 1e-5 and rel_err(grad, grad64) <= 1e-5
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("frozen_head", [False, True])
def test_log_probs_fp16_within_twice_naive_error(backend, frozen_head, use_backend):
    use_backend(backend)
    hidden, weight, bias, tokens = make(64, 32, 600, dtype=torch.float16, seed=4)
    upstream = torch.randn(64)
    trained = [hidden] if frozen_head else [hidden, weight, bias]
    if frozen_head:
        weight.requires_grad_(False)
        bias.requires_grad_(False)
    logp = linear_log_probs(hidden, weight, tokens, bias=bias, chunk_rows=16)
    ours = grads_of(logp, upstream, trained)
    naive_logp = torch.log_softmax((hidden @ weight.T + bias).float(), -1).gather(1, tokens[:, None]).squeeze(1)
    naive = grads_of(naive_logp, upstream, trained)
    params = [t.detach().double().requires_grad_(t.requires_grad) for t in (hidden, weight, bias)]
    ref_logp = torch.log_softmax(params[0] @ params[1].T + params[2], -1).gather(1, tokens[:, None]).squeeze(1)
    ref = grads_of(ref_logp, upstream.double(), [p for p in params if p.requires_grad])
    assert rel_err(logp, ref_logp) <= 2 * rel_err(naive_logp, ref_logp) + 1e-6
    for name, a, n, e in zip(("hidden", "weight", "bias"), ours, naive, ref):
        assert rel_err(a, e) <= 2 * rel_err(n, e), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored(backend, reduction, use_backend):
    use_backend(backend)
    hidden, weight, bias, labels = make(9, 8, 30)
    labels[:] = -100
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction)
    assert bool((loss == 0).all()) and not bool(torch.isnan(loss).any())
    grads = grads_of(loss, torch.ones_like(loss), [hidden, weight, bias])
    assert all(bool((g == 0).all()) for g in grads)


def test_custom_ignore_index_and_int32_labels():
    hidden, weight, bias, labels = make(12, 8, 20, ignore_every=3)
    labels[::3] = 7
    ours = linear_cross_entropy(hidden, weight, labels.int(), bias=bias, ignore_index=7)
    expected = F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=7)
    assert rel_err(ours, expected) <= 1e-5


def test_no_grad_and_frozen_weight():
    hidden, weight, bias, labels = make(12, 8, 20)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias)
    assert not loss.requires_grad
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None


def test_autocast_runs_in_autocast_dtype():
    hidden, weight, bias, labels = make(16, 8, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias)
        expected = F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)
    loss.backward()
    assert weight.grad.dtype == torch.float32
    assert rel_err(loss, expected) <= 1e-5


# ------------------------------------------------------------------------------------------------------ bad input

BAD_INPUTS = [
    (lambda h, w, y: (h[:, :5], w, y), ValueError, "weight: expected shape"),
    (lambda h, w, y: (h, w, y[:-1]), ValueError, "labels: expected shape"),
    (lambda h, w, y: (h, w, y.float()), TypeError, "labels: expected dtype"),
    (lambda h, w, y: (h, w, y.bool()), TypeError, "labels: expected dtype"),
    (lambda h, w, y: (h[:0], w, y[:0]), ValueError, "hidden: expected at least one row"),
    (lambda h, w, y: (h, w.double(), y), TypeError, "weight: expected the dtype of hidden"),
    (lambda h, w, y: (h[0], w, y), ValueError, "hidden: expected 2 dimensions"),
    (lambda h, w, y: (h, w, torch.where(y == 3, 20, y)), ValueError, r"labels: expected values in \[0, 20\)"),
    (lambda h, w, y: (h, w, torch.where(y == 3, -5, y)), ValueError, "labels: .*ignore_index = -100"),
]


@pytest.mark.parametrize("make_bad,error,match", BAD_INPUTS)
def test_bad_input_names_the_argument(make_bad, error, match):
    hidden, weight, _, labels = make(10, 8, 20, bias=False)
    labels[0] = 3
    with pytest.raises(error, match=match):
        linear_cross_entropy(*make_bad(hidden, weight, labels))


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction="avg"), "reduction"), (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(logit_softcap=0.0), "logit_softcap"), (dict(chunk_rows=0), "chunk_rows"),
    (dict(bias=torch.zeros(19)), "bias: expected shape"), (dict(ignore_index=None), "ignore_index"),
])
def test_bad_options_name_the_argument(kwargs, match):
    hidden, weight, _, labels = make(10, 8, 20, bias=False)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_log_probs_bad_input():
    hidden, weight, _, tokens = make(10, 8, 20, bias=False)
    with pytest.raises(ValueError, match=r"tokens: expected values in \[0, 20\)"):
        linear_log_probs(hidden, weight, torch.where(tokens == tokens[0], -100, tokens))
    with pytest.raises(ValueError, match="temperature"):
        linear_log_probs(hidden, weight, tokens, temperature=0.0)


# --------------------------------------------------------------------------------------------- the memory bound

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_never_builds_the_logits(backend, use_backend):
    """Every tensor created by the forward and backward computations is at most one float32 chunk_rows x V (or
    the V x H weight gradient): never [T, V]."""
    use_backend(backend)
    T, H, V, chunk = 256, 8, 1000, 16
    hidden, weight, bias, labels = make(T, H, V, ignore_every=7)
    needs = [True, True, True]
    runs = {
        # the native row kernel leaves the softcap to the torch backend
        "fused": lambda: losses._fused_ce_impl(hidden, weight, bias, labels, -100, "mean", 0.1,
                                               None if backend == "native" else 5.0, chunk, needs),
        "rows": lambda: losses._rows_forward_impl(hidden, weight, bias, labels.clamp(min=0), "logp", None, 0.0,
                                                  None, 0.8, chunk, False),
        "rows, frozen head": lambda: losses._rows_forward_impl(hidden, weight, bias, labels, "ce", -100, 0.0, None,
                                                               1.0, chunk, True),
    }
    for name, run in runs.items():
        with torch.no_grad(), LargestTensor() as probe:
            out = run()
        assert probe.largest <= chunk * V * 4, (name, probe.largest)
    values, lse, _ = runs["rows"]()
    with torch.no_grad(), LargestTensor() as probe:
        losses._rows_backward_impl(torch.randn(T), hidden, weight, bias, labels.clamp(min=0), lse, "logp", None,
                                   0.0, None, 0.8, chunk, needs)
    assert probe.largest <= chunk * V * 4
    assert out is not None


def test_default_chunk_rows_is_bounded():
    cpu = torch.device("cpu")
    assert losses.default_chunk_rows(32000, 4, cpu) == 256  # 32 MiB of float32 logits per chunk
    assert losses.default_chunk_rows(152064, 2, torch.device("cuda")) % 16 == 0
    assert losses.default_chunk_rows(10, 4, cpu) == 8192  # tiny vocabularies: capped
    assert losses.default_chunk_rows(10**9, 4, cpu) == 16


# ---------------------------------------------------------------------------------------- registration, compile

def test_opcheck_loss_ops():
    hidden, weight, bias, labels = make(13, 8, 30, ignore_every=4)
    tokens = labels.clamp(min=0)
    lse = torch.randn(13)
    cases = [
        (torch.ops.mmlatent.linear_cross_entropy_fused.default,
         (hidden, weight, bias, labels, -100, "mean", 0.1, None, 4, [True, True, True])),
        (torch.ops.mmlatent.linear_cross_entropy_fused.default,
         (hidden, weight, None, labels, -100, "sum", 0.0, 2.0, 64, [True, False, False])),
        (torch.ops.mmlatent.linear_softmax_rows.default,
         (hidden, weight, bias, labels, "ce", -100, 0.0, None, 1.0, 4, False)),
        (torch.ops.mmlatent.linear_softmax_rows.default,
         (hidden, weight, None, tokens, "logp", None, 0.0, None, 0.5, 4, True)),
        (torch.ops.mmlatent.linear_softmax_rows_backward.default,
         (torch.randn(13), hidden.detach(), weight.detach(), bias.detach(), tokens, lse, "logp", None, 0.0, None, 1.0,
          4, [True, True, True])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    hidden, weight, bias, labels = make(23, 8, 50, ignore_every=3)

    def objective(h, w, b, y):
        return (linear_cross_entropy(h, w, y, bias=b, chunk_rows=8)
                + linear_cross_entropy(h, w, y, bias=b, reduction="none", label_smoothing=0.1).sum() * 0.01
                + linear_log_probs(h, w, y.clamp(min=0), bias=b, temperature=0.9).sum() * 0.1)

    params = [hidden, weight, bias]
    eager = objective(hidden, weight, bias, labels)
    expected = grads_of(eager, torch.tensor(1.0), params)
    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)(hidden, weight, bias, labels)
    got = grads_of(compiled, torch.tensor(1.0), params)
    assert torch.allclose(compiled, eager)
    for a, e in zip(got, expected):
        assert torch.allclose(a, e, atol=1e-6)


def test_backend_report_lists_loss_ops():
    report = K.backend_report("linear_cross_entropy", device=torch.device("cpu"), dtype=torch.float64)
    assert report["torch"] == "ok"
    assert report["triton"] != "ok"  # float64 (or, on a GPU machine, CPU tensors without the interpreter)
    assert report["native"] == "ok"  # the C++ row kernel (make test builds the extension)
    assert "CPU op" in K.backend_report("linear_log_probs", device=torch.device("cuda"), dtype=torch.bfloat16)["native"]
    assert "logit_softcap" in K.backend_report("linear_cross_entropy", device=torch.device("cpu"),
                                               dtype=torch.float32, softcap=30.0)["native"]
