"""apply_fused_loss on real transformers / peft models: the model's own loss and gradients without its logits, the
model unchanged without labels, save_pretrained / from_pretrained bit-exact, and unpatch."""
import copy

import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mmlatent.models import (LinearCrossEntropyHead, apply_fused_loss, causal_lm_loss, enable_activation_checkpointing,
                             is_fused_loss_applied, unpatch)
from mmlatent.models.tiny import synthetic_batch, tiny_chameleon, tiny_qwen2_5_vl, tiny_qwen2_vl

from causal_lms import TINY, LargestTensor, left_padded_batch, rel_err, tiny_causal_lm

def vlm_and_batch(name):
    build = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "chameleon": tiny_chameleon}[name]
    model = build()
    hw = (32, 32) if name == "chameleon" else (16, 16)
    batch = synthetic_batch(model, images=[[hw], [hw]], prompt_lengths=[3, 6], answer_lengths=[4, 2],
                            num_latents=[0, 0])
    labels = batch.pop("labels")
    if name != "chameleon":  # what Qwen's processor returns beside input_ids: 1 at image tokens (M-RoPE needs it)
        batch["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).long()
    return model, batch, labels


def model_and_batch(name):
    if name in ("qwen2", "gemma2-softcap"):
        return (tiny_causal_lm(name), *left_padded_batch())
    return vlm_and_batch(name)


def loss_and_grads(model, inputs, labels, **extra):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=labels, **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_same_loss_and_grads(ours, expected, tol=1e-5):
    (out, grads), (ref, ref_grads) = ours, expected
    assert rel_err(out.loss, ref.loss) <= tol
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) <= 10 * tol, n


MODELS = ["qwen2", "gemma2-softcap", "qwen2_vl", "qwen2_5_vl", "chameleon"]


@pytest.mark.parametrize("name", MODELS)
def test_loss_and_gradients_equal_the_models_own(name):
    model, inputs, labels = model_and_batch(name)
    expected = loss_and_grads(model, inputs, labels)
    assert expected[0].logits is not None
    apply_fused_loss(model)
    ours = loss_and_grads(model, inputs, labels)
    assert ours[0].logits is None
    assert ours[0].loss.dtype == torch.float32
    assert_same_loss_and_grads(ours, expected)
    # every other field is the model's own (the cache; Qwen's image outputs)
    assert set(ours[0].keys()) == set(expected[0].keys()) - {"logits"}


@pytest.mark.parametrize("name", ["qwen2", "chameleon"])
def test_loss_options_pass_through(name):
    """num_items_in_batch (transformers' gradient-accumulation normaliser), shift_labels and return_dict=False."""
    model, inputs, labels = model_and_batch(name)
    shifted = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    expected = [model(**inputs, labels=labels, num_items_in_batch=7).loss,
                model(**inputs, shift_labels=shifted.roll(1, 1), labels=labels).loss if name == "qwen2" else None,
                model(**inputs, labels=labels, return_dict=False)[0]]
    apply_fused_loss(model, chunk_rows=4)
    assert rel_err(model(**inputs, labels=labels, num_items_in_batch=7).loss, expected[0]) <= 1e-5
    if name == "qwen2":
        assert rel_err(model(**inputs, shift_labels=shifted.roll(1, 1), labels=labels).loss, expected[1]) <= 1e-5
    as_tuple = model(**inputs, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and rel_err(as_tuple[0], expected[2]) <= 1e-5


def test_never_builds_the_logits():
    torch.manual_seed(0)
    V, B, L, chunk = 5000, 2, 64, 16
    model = Qwen2ForCausalLM(Qwen2Config(**dict(TINY, vocab_size=V)))
    ids = torch.randint(0, V, (B, L))
    apply_fused_loss(model, chunk_rows=chunk)
    with LargestTensor() as probe:
        model(input_ids=ids, labels=ids).loss.backward()
    # float32 bytes: the weight and its gradient are [V, H]; a [B, L, V] logits tensor would be 4x larger than either
    assert probe.largest <= 4 * max(chunk * V, V * TINY["hidden_size"]) < 4 * B * L * V
    with LargestTensor() as probe:
        model(input_ids=ids).logits  # without labels: the model's own logits
    assert probe.largest >= 4 * B * L * V


@pytest.mark.parametrize("name", ["qwen2", "qwen2_vl"])
def test_without_labels_nothing_changes(name):
    model, inputs, _ = model_and_batch(name)
    model.eval()
    before = model(**inputs).logits
    prompt = {k: v for k, v in inputs.items()}
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    apply_fused_loss(model)
    assert torch.equal(model(**inputs).logits, before)
    assert torch.equal(model.generate(**prompt, max_new_tokens=4, do_sample=False), generated)


@pytest.mark.parametrize("name", ["qwen2", "qwen2_vl"])
def test_peft_model(name):
    model, inputs, labels = model_and_batch(name)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    expected = loss_and_grads(wrapped, inputs, labels)
    assert all("lora_" in n for n in expected[1])
    assert apply_fused_loss(wrapped) is wrapped and is_fused_loss_applied(wrapped)
    ours = loss_and_grads(wrapped, inputs, labels)
    assert ours[0].logits is None
    assert_same_loss_and_grads(ours, expected)
    # causal_lm_loss takes the PEFT model too, and its adapters receive the gradients
    wrapped.zero_grad(set_to_none=True)
    loss = causal_lm_loss(wrapped, labels, **inputs).loss
    loss.backward()
    assert rel_err(loss, expected[0].loss) <= 1e-5
    assert {n for n, p in wrapped.named_parameters() if p.grad is not None} == set(expected[1])


@pytest.mark.parametrize("name", ["qwen2", "qwen2_vl"])
def test_gradient_checkpointing(name):
    model, inputs, labels = model_and_batch(name)
    model.train()
    enable_activation_checkpointing(model)
    expected = loss_and_grads(model, inputs, labels)
    apply_fused_loss(model)
    assert_same_loss_and_grads(loss_and_grads(model, inputs, labels), expected)


@pytest.mark.parametrize("name", ["qwen2", "qwen2_vl"])
def test_save_pretrained_round_trips_bit_exactly(name, tmp_path):
    model, inputs, labels = model_and_batch(name)
    model.eval()
    plain = copy.deepcopy(model)
    apply_fused_loss(model)
    model.save_pretrained(tmp_path / "patched")
    plain.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "patched" / "model.safetensors")
    reference = load_file(tmp_path / "plain" / "model.safetensors")
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    loaded, info = type(model).from_pretrained(tmp_path / "patched", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.eval()
    assert torch.equal(loaded(**inputs).logits, plain(**inputs).logits)
    assert not is_fused_loss_applied(loaded)


def test_installed_head_keeps_the_state_dict_keys(tmp_path):
    model = tiny_causal_lm("qwen2")
    inputs, labels = left_padded_batch()
    keys = set(model.state_dict())
    before = model(**inputs).logits
    weight = model.lm_head.weight
    model.lm_head = LinearCrossEntropyHead(model.lm_head)
    assert set(model.state_dict()) == keys and model.lm_head.weight is weight
    assert torch.equal(model(**inputs).logits, before)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.lm_head.weight, weight.detach())
    assert torch.equal(loaded(**inputs).logits, before)


def test_unpatch_restores_the_model():
    model = tiny_causal_lm("qwen2")
    inputs, labels = left_padded_batch()
    apply_fused_loss(model)
    apply_fused_loss(model, chunk_rows=8)  # again: the options change, the patch stays single
    assert len(model.model._forward_hooks) == 1
    copied = copy.deepcopy(model)
    assert copied(**inputs, labels=labels).logits is None
    assert unpatch(model) is model
    assert "forward" not in model.__dict__ and not model.model._forward_hooks
    out = model(**inputs, labels=labels)
    assert out.logits is not None and not is_fused_loss_applied(model)
    assert copied(**inputs, labels=labels).logits is None  # the copy keeps its own patch
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)


def test_bad_arguments():
    model = tiny_causal_lm("qwen2")
    inputs, labels = left_padded_batch()
    with pytest.raises(ValueError, match="chunk_rows"):
        apply_fused_loss(model, chunk_rows=0)
    with pytest.raises(TypeError, match="logits_to_keep"):
        apply_fused_loss(nn.Linear(3, 4))
    assert not is_fused_loss_applied(model)
    apply_fused_loss(model)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**inputs, labels=labels, logits_to_keep=1)
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        causal_lm_loss("not a model", labels, **inputs)


def test_benchmark_row_gradients_equal_the_unpatched_model(use_backend):
    """The benchmark's CPU row (Qwen2-shaped, vocabulary 32000, 2 x 1024 tokens, float32): every parameter
    gradient within 1e-5 relative of the unpatched model's, on the backend a CPU runs outside the Triton
    interpreter (the interpreter would take minutes at this size)."""
    use_backend("torch")
    from mmlatent.bench import cases_for
    from mmlatent.bench.case import implementation
    case = next(c for c in cases_for("default") if c.op == "apply_fused_loss training step")
    inputs = case.make(torch.device("cpu"), torch.float32)
    ours = implementation(case, "mmlatent")(inputs)
    theirs = implementation(case, case.implementations()[1])(inputs)
    assert len(ours) == len(theirs) == len(list(inputs["models"]["plain"].parameters()))
    for a, e in zip(ours, theirs):
        assert rel_err(a, e) <= 1e-5


def test_torch_compile_fullgraph(use_backend):
    """A patched model compiles into one graph (the hook and the loss op trace), with the model's own loss."""
    use_backend("torch")
    model = tiny_causal_lm("qwen2")
    model.config.use_cache = False
    inputs, labels = left_padded_batch()
    expected = model(**inputs, labels=labels).loss
    apply_fused_loss(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(**inputs, labels=labels)
    assert out.logits is None and rel_err(out.loss, expected) <= 1e-5
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
