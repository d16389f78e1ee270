"""LinearCrossEntropyHead and causal_lm_loss against transformers' own loss on tiny random-weight models."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmlatent.models import LinearCrossEntropyHead, causal_lm_loss, next_token_labels

from causal_lms import left_padded_batch, rel_err, tiny_causal_lm as tiny_model

def param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["qwen2", "gemma2-softcap"])
@pytest.mark.parametrize("normaliser", [None, 17])
def test_causal_lm_loss_matches_transformers(name, normaliser):
    model = tiny_model(name)
    inputs, labels = left_padded_batch()
    extra = {} if normaliser is None else {"num_items_in_batch": normaliser}
    expected = model(**inputs, labels=labels, **extra).loss
    expected.backward()
    expected_grads = param_grads(model)
    model.zero_grad(set_to_none=True)
    ours = causal_lm_loss(model, labels, **inputs, **extra)
    ours.loss.backward()
    grads = param_grads(model)
    assert rel_err(ours.loss, expected) <= 1e-5
    assert ours.hidden_states.shape == (3, 13, 32)
    assert grads.keys() == expected_grads.keys()
    for n in grads:
        assert rel_err(grads[n], expected_grads[n]) <= 1e-4, n


def test_causal_lm_loss_with_shift_labels():
    model = tiny_model("qwen2")
    inputs, labels = left_padded_batch()
    expected = model(**inputs, labels=labels).loss
    ours = causal_lm_loss(model, shift_labels=next_token_labels(labels), **inputs).loss
    assert rel_err(ours, expected) <= 1e-5
    with pytest.raises(ValueError, match="exactly one"):
        causal_lm_loss(model, labels, shift_labels=labels, **inputs)


def test_next_token_labels_shift_like_transformers():
    labels = torch.tensor([[5, 6, 7], [-100, 8, 9]])
    assert next_token_labels(labels).tolist() == [[6, 7, -100], [8, 9, -100]]


def test_head_is_a_drop_in_for_lm_head():
    model = tiny_model("qwen2")
    inputs, _ = left_padded_batch()
    before = model(**inputs).logits
    weight = model.lm_head.weight
    model.lm_head = LinearCrossEntropyHead(model.lm_head)
    after = model(**inputs).logits
    assert torch.equal(before, after)
    assert model.lm_head.weight is weight  # shared, not copied
    assert "lm_head.weight" in model.state_dict() and "lm_head.lm_head.weight" not in model.state_dict()
    # causal_lm_loss reuses a head that is already there
    _, labels = left_padded_batch()
    assert torch.isfinite(causal_lm_loss(model, labels, **inputs).loss)


def test_head_loss_and_log_probs():
    torch.manual_seed(0)
    lm_head = nn.Linear(16, 50, bias=True)
    head = LinearCrossEntropyHead(lm_head, label_smoothing=0.1)
    hidden = torch.randn(2, 7, 16)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, 0] = -100
    logits = lm_head(hidden)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=0.1, reduction="none")
    assert rel_err(head(hidden, labels, reduction="none"), expected.view(2, 7)) <= 1e-5
    assert rel_err(head(hidden, labels), expected.sum() / 13) <= 1e-5
    assert rel_err(head(hidden, labels, num_items_in_batch=20), expected.sum() / 20) <= 1e-5
    tokens = labels.clamp(min=0)
    expected_logp = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert rel_err(head.log_probs(hidden, tokens, temperature=0.5), expected_logp) <= 1e-5


def test_head_bad_input():
    with pytest.raises(TypeError, match="lm_head: expected an nn.Linear"):
        LinearCrossEntropyHead(nn.Embedding(3, 4))
    head = LinearCrossEntropyHead(nn.Linear(8, 10))
    with pytest.raises(ValueError, match="labels: expected shape"):
        head(torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_items_in_batch"):
        head(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match="labels: expected values in"):
        head(torch.randn(2, 3, 8), torch.full((2, 3), 10))
