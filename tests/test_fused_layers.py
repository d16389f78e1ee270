"""apply_fused_layers on real transformers T5 models: the same loss and gradients as the model's own modules
(float64 to rounding, float32 close), generation unchanged to the bit, less saved for the backward, PEFT LoRA and
activation checkpointing, state dicts untouched, undo, bad input."""
import copy

import pytest
import torch

from mmlatent.models import apply_fused_layers, fused_layer_count, remove_fused_layers, tiny


def batch(vocab=256, B=2, T=11, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    labels = torch.randint(3, vocab, (B, L), generator=g)
    labels[0, -2:] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def with_float64_norm_statistics(model):
    """T5LayerNorm takes its mean square in float32 even of float64 rows; the fused norm keeps float64 inputs in
    float64. For a float64 comparison the reference's norms take it in float64 too (the formula otherwise T5's)."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    for module in model.modules():
        if isinstance(module, T5LayerNorm):
            module.forward = lambda h, m=module: m.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True)
                                                                             + m.variance_epsilon))
    return model


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_loss_and_gradients_equal_the_models_own(dtype, tol, use_backend):
    use_backend("torch")
    own = tiny.tiny_t5(dtype=dtype).train()
    fused = apply_fused_layers(copy.deepcopy(own))
    if dtype == torch.float64:
        with_float64_norm_statistics(own)
    assert fused_layer_count(fused) == 4 + 12  # 2 + 2 feed-forwards; norms: 2 + 3 per block and a final one
    assert fused_layer_count(own) == 0
    inputs = batch()
    loss, grads = loss_and_grads(own, inputs)
    fused_loss, fused_grads = loss_and_grads(fused, inputs)
    torch.testing.assert_close(fused_loss, loss, rtol=tol, atol=tol)
    assert grads.keys() == fused_grads.keys()
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=tol, atol=tol, msg=name)


def test_the_triton_kernels_train_alike(use_backend):
    own = tiny.tiny_t5().train()
    fused = apply_fused_layers(copy.deepcopy(own))
    use_backend("torch")
    loss, grads = loss_and_grads(own, batch(seed=1))
    use_backend("triton")
    fused_loss, fused_grads = loss_and_grads(fused, batch(seed=1))
    torch.testing.assert_close(fused_loss, loss, rtol=2e-5, atol=2e-5)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=2e-4, atol=2e-5, msg=name)


def test_less_is_saved_for_the_backward(use_backend):
    use_backend("torch")

    def saved_bytes(model):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch(B=2, T=64, L=64)).loss
        return sum(storages.values())

    own = tiny.tiny_t5(d_model=64, d_ff=512).train()
    fused = apply_fused_layers(copy.deepcopy(own))
    # per feed-forward the activation's temporaries and its output ([B, T, d_ff] each) are no longer kept
    assert saved_bytes(fused) <= saved_bytes(own) - 4 * 3 * (2 * 64 * 512 * 4)


def test_generation_is_the_models_own_to_the_bit(use_backend):
    use_backend("torch")
    own = tiny.tiny_t5().eval()
    fused = apply_fused_layers(copy.deepcopy(own))
    inputs = batch()
    del inputs["labels"]
    kwargs = dict(max_new_tokens=9, do_sample=False, output_scores=True, return_dict_in_generate=True)
    a, b = own.generate(**inputs, **kwargs), fused.generate(**inputs, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))


def test_state_dict_and_save_pretrained_are_untouched(tmp_path, use_backend):
    use_backend("torch")
    own = tiny.tiny_t5()
    fused = apply_fused_layers(copy.deepcopy(own))
    assert list(fused.state_dict()) == list(own.state_dict())
    fused.save_pretrained(tmp_path)
    from transformers import T5ForConditionalGeneration
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert fused_layer_count(loaded) == 0
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), own.state_dict().values()))


def test_lora_adapters_train_through_the_fused_blocks(use_backend):
    use_backend("torch")
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wi_0", "wi_1", "wo"], init_lora_weights=False)
    torch.manual_seed(0)
    own = get_peft_model(tiny.tiny_t5(dtype=torch.float64).train(), config)
    fused = apply_fused_layers(copy.deepcopy(own))
    with_float64_norm_statistics(own)
    assert fused_layer_count(fused) == 16
    loss, grads = loss_and_grads(own, batch())
    fused_loss, fused_grads = loss_and_grads(fused, batch())
    torch.testing.assert_close(fused_loss, loss, rtol=1e-12, atol=1e-12)
    assert any("lora_A" in n for n in grads) and grads.keys() == fused_grads.keys()
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_activation_checkpointing_composes(use_backend):
    use_backend("torch")
    own = tiny.tiny_t5(dtype=torch.float64).train()
    fused = apply_fused_layers(copy.deepcopy(own))
    with_float64_norm_statistics(own)
    fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = loss_and_grads(own, batch())
    fused_loss, fused_grads = loss_and_grads(fused, batch())
    torch.testing.assert_close(fused_loss, loss, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_apply_twice_copy_and_remove(use_backend):
    use_backend("torch")
    model = apply_fused_layers(apply_fused_layers(tiny.tiny_t5()))
    assert fused_layer_count(model) == 16
    clone = copy.deepcopy(model)
    block = clone.encoder.block[0].layer[1].DenseReluDense
    assert block.forward.__self__ is block  # the copy's forward runs the copy's weights
    remove_fused_layers(model)
    assert fused_layer_count(model) == 0 and "forward" not in model.encoder.final_layer_norm.__dict__
    assert fused_layer_count(clone) == 16


def test_a_model_without_t5_layers_is_refused():
    with pytest.raises(TypeError, match="model: Linear has no T5 gated GELU feed-forward block"):
        apply_fused_layers(torch.nn.Linear(4, 4))
