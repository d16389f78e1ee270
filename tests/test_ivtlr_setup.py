"""IVTLR on a model loaded as IVT-LR's public code loads it (eager attention everywhere, vision tower frozen):
same results as ivtlr_reference, every call that needs no probabilities on SDPA (the vision tower's included), and
the model handed back as it was (unwrap, garbage collection), gradient checkpointing included."""
import gc
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmlatent.models import IVTLR, enable_activation_checkpointing, ivtlr_reference
from mmlatent.models.tiny import LATENT_ID, synthetic_batch, tiny_chameleon, tiny_qwen2_5_vl, tiny_qwen2_vl
from test_ivtlr import rel_err, run

BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "chameleon": tiny_chameleon}
IMAGES = {"qwen2_vl": [[(16, 16), (8, 16)], [(16, 24)]], "qwen2_5_vl": [[(16, 16), (16, 16)], [(16, 32)]],
          "chameleon": [[(32, 32)], [(32, 32)]]}
# the attention modules of each family: (language model, vision tower or None)
ATTENTION = {"qwen2_vl": ("Qwen2VLAttention", "VisionAttention"),
             "qwen2_5_vl": ("Qwen2_5_VLAttention", "Qwen2_5_VLVisionAttention"),
             "chameleon": ("ChameleonAttention", None)}
K = 2


def eager_loaded(name, seed=0):
    """As the public code sets the model up: eager attention, only the language model's layers trainable."""
    model = BUILDERS[name](seed=seed, attn_implementation="eager")
    for pname, p in model.named_parameters():
        p.requires_grad_(("layers" in pname or "norm" in pname) and "vqmodel" not in pname and "visual" not in pname)
    return model


def batch_for(model, name, steps=2, seed=0):
    return synthetic_batch(model, images=IMAGES[name], prompt_lengths=[3, 6], answer_lengths=[4, 2],
                           num_latents=[steps, steps], seed=seed)


def prompt_of(batch):
    return {k: v for k, v in batch.items() if k != "labels"}




def assert_same(ours, grads, theirs, ref_grads):
    assert [s.tolist() for s in ours.selected] == [s.tolist() for s in theirs.selected]
    assert rel_err(ours.loss, theirs.loss) <= 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) <= 1e-4, n


def implementations(model):
    """(config class, _attn_implementation) of every config of the model: its own, its sub-configs at any depth,
    and its sub-models' (found here independently of mmlatent's own walk)."""
    from transformers import PreTrainedModel
    seen, queue = {}, [model.config] + [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while queue:
        config = queue.pop(0)
        if id(config) not in seen:
            seen[id(config)] = config
            queue += [getattr(config, key) for key in config.sub_configs if getattr(config, key) is not None]
    return sorted((type(c).__name__, str(c._attn_implementation_internal)) for c in seen.values())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_eager_loaded_model_matches_reference(name):
    model = eager_loaded(name)
    assert model.config.get_text_config()._attn_implementation == "eager"
    batch = batch_for(model, name)
    fast, ref = IVTLR(model, LATENT_ID, k=K), ivtlr_reference(model, LATENT_ID, k=K)
    ours, grads = run(fast, model, batch)
    theirs, ref_grads = run(ref, model, batch)
    assert_same(ours, grads, theirs, ref_grads)
    real = ours.inputs_embeds.abs().sum(-1) > 0  # padding columns hold no embedding; their logits are arbitrary
    assert rel_err(ours.logits[real], theirs.logits[real]) <= 1e-4
    assert torch.equal(fast.generate(**prompt_of(batch), max_new_tokens=5),
                       ref.generate(**prompt_of(batch), max_new_tokens=5))


class AttentionOps(TorchDispatchMode):
    """Counts, per attention module class, its calls and the aten ops run inside them (forward hooks mark where
    a call starts and ends; the ops are the real ones torch dispatches, nothing is replaced)."""

    def __init__(self, model, classes):
        super().__init__()
        self.inside, self.calls, self.ops = None, Counter(), Counter()
        self.handles = []
        for module in model.modules():
            kind = type(module).__name__
            if kind in classes:
                self.handles.append(module.register_forward_pre_hook(lambda m, a, kind=kind: self._enter(kind)))
                self.handles.append(module.register_forward_hook(lambda m, a, o: self._leave()))

    def _enter(self, kind):
        self.inside = kind
        self.calls[kind] += 1

    def _leave(self):
        self.inside = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside is not None:
            self.ops[self.inside, func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))

    def sdpa(self, kind) -> int:
        """Probability-free attention calls: torch's SDPA, or mmlatent's attention op (opaque to a dispatch mode;
        its torch backend runs SDPA inside when no lse is asked for)."""
        return sum(n for (k, op), n in self.ops.items()
                   if k == kind and ("scaled_dot_product" in op or op == "attention_with_scores"))

    def softmax(self, kind) -> int:
        return sum(n for (k, op), n in self.ops.items() if k == kind and "softmax" in op)

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_probability_free_calls_run_sdpa_on_an_eager_loaded_model(name, use_backend):
    """Every attention call of IVTLR's training step and generation runs torch's SDPA: each language-model call
    exactly one, each vision-tower call one per image (Qwen2-VL splits its patches by image), and none builds
    softmax probabilities. The reference, on the same model, runs the vision tower eager as the public code.
    (The no-grad rollout reads run mmlatent's attention_with_scores, whose torch backend is SDPA plus the score
    row's mass; the reference alias of that backend is pinned, as user scripts may still pin it.)"""
    use_backend("reference")
    model = eager_loaded(name)
    text, vision = ATTENTION[name]
    batch = batch_for(model, name, steps=3)
    images = len(batch["image_grid_thw"]) if vision else 0  # Chameleon's VQ-GAN has no attention function
    fast, ref = IVTLR(model, LATENT_ID, k=K), ivtlr_reference(model, LATENT_ID, k=K)
    mode = AttentionOps(model, [c for c in (text, vision) if c])
    try:
        for step in ("train", "generate"):
            mode.calls.clear(), mode.ops.clear()
            with mode:
                if step == "train":
                    fast(**batch).loss.backward()
                else:
                    fast.generate(**prompt_of(batch), max_new_tokens=3)
            assert mode.calls[text] > 0 and mode.sdpa(text) == mode.calls[text], (step, dict(mode.ops))
            assert mode.softmax(text) == 0, step
            if vision:
                # one attention per image in each block; Qwen2.5-VL's windowed blocks split images further
                blocks = model.config.vision_config.depth
                assert mode.calls[vision] == blocks and mode.sdpa(vision) >= blocks * images, step
                assert name != "qwen2_vl" or mode.sdpa(vision) == blocks * images, step
                assert mode.softmax(vision) == 0, step
        if vision:
            mode.calls.clear(), mode.ops.clear()
            with mode, torch.no_grad():
                ref(**batch)
            assert mode.sdpa(vision) == 0 and mode.softmax(vision) >= model.config.vision_config.depth * images
    finally:
        mode.remove()
    assert model.config.get_text_config()._attn_implementation == "mmlatent_eager"


@pytest.mark.parametrize("loaded_with", ["eager", "sdpa", {"text_config": "eager", "vision_config": "sdpa"},
                                         {"text_config": "sdpa", "vision_config": "eager"}],
                         ids=["eager", "sdpa", "eager-text", "eager-vision"])
def test_unwrap_restores_every_config_exactly(loaded_with):
    model = tiny_qwen2_vl(seed=1, attn_implementation=loaded_with)
    original = implementations(model)
    batch = batch_for(model, "qwen2_vl")
    inputs = dict(prompt_of(batch), mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).int())
    with torch.no_grad():
        before = model(**inputs).logits
        fast, ref = IVTLR(model, LATENT_ID, k=K), ivtlr_reference(model, LATENT_ID, k=K)
        fast(**batch), ref(**batch)
    assert implementations(model) != original  # the language model's attention is mmlatent's while wrapped
    assert fast.unwrap() is model
    assert implementations(model) == original
    with pytest.raises(RuntimeError, match=r"IVTLR: unwrap\(\) was called"):
        fast(**batch)
    with torch.no_grad():
        ref(**batch)  # a wrapper still alive reinstalls at its next call...
        assert implementations(model) != original
        assert ref.unwrap() is model  # ...and gives the model back the same way
        assert implementations(model) == original
        assert torch.equal(model(**inputs).logits, before)


def test_unwrap_of_a_peft_model_returns_it_and_restores_the_base():
    peft = pytest.importorskip("peft")
    base = tiny_qwen2_vl(seed=3, attn_implementation="eager")
    original = implementations(base)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=r".*language_model.*\.q_proj"))
    wrapper = IVTLR(lora, LATENT_ID, k=K)
    assert implementations(base) != original
    assert wrapper.unwrap() is lora and implementations(base) == original


def test_garbage_collected_wrappers_restore_once_none_is_left():
    """The choice documented on IVTLR: a discarded wrapper restores the model once no other wrapper of it is
    alive."""
    model = eager_loaded("qwen2_vl")
    original = implementations(model)
    batch = batch_for(model, "qwen2_vl")
    with torch.no_grad():
        IVTLR(model, LATENT_ID, k=K)(**batch)  # a temporary wrapper
    gc.collect()
    assert implementations(model) == original
    first, second = IVTLR(model, LATENT_ID, k=K), ivtlr_reference(model, LATENT_ID, k=K)
    del first
    gc.collect()
    assert implementations(model) != original  # the second wrapper keeps the installation
    del second
    gc.collect()
    assert implementations(model) == original


def test_user_setting_another_implementation_while_wrapped_is_kept():
    model = eager_loaded("qwen2_vl")
    batch = batch_for(model, "qwen2_vl")
    fast, ref = IVTLR(model, LATENT_ID, k=K), ivtlr_reference(model, LATENT_ID, k=K)
    model.set_attn_implementation("sdpa")  # the user's change drops mmlatent's function...
    ours, grads = run(fast, model, batch)  # ...which the next call installs again, over SDPA
    assert model.config.text_config._attn_implementation == "mmlatent_sdpa"
    theirs, ref_grads = run(ref, model, batch)
    assert_same(ours, grads, theirs, ref_grads)
    fast.unwrap()
    assert {value for _, value in implementations(model)} == {"sdpa"}  # the user's latest choice comes back


def test_checkpointing_temporary_wrapper_keeps_its_attention_until_the_backward():
    """Gradient checkpointing on an eager-loaded model, in training mode, with a wrapper that is gone before the
    backward: the checkpointed layers' recompute holds the wrapper's lease, so the implementation stays until the
    graph is freed (switching it before the recompute would make it save different tensors); gradients equal the
    reference's, and the model is restored after."""
    model = eager_loaded("qwen2_vl", seed=7)
    enable_activation_checkpointing(model, use_reentrant=False)
    model.train()
    original = implementations(model)
    batch = batch_for(model, "qwen2_vl", steps=3)
    model.zero_grad(set_to_none=True)
    loss = IVTLR(model, LATENT_ID, k=K)(**batch).loss
    gc.collect()
    assert implementations(model) != original  # the graph's recompute closures hold the lease
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    del loss
    gc.collect()
    assert implementations(model) == original
    ref = ivtlr_reference(model, LATENT_ID, k=K)
    model.zero_grad(set_to_none=True)
    theirs = ref(**batch)
    theirs.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) <= 1e-4, n
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert layers and all(m.gradient_checkpointing for m in layers)


def test_checkpointing_eager_loaded_matches_reference_with_lora():
    """The public code's full setup: eager, frozen vision, LoRA on the language model, checkpointing on."""
    peft = pytest.importorskip("peft")
    base = eager_loaded("qwen2_vl", seed=4)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                     target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)"))
    enable_activation_checkpointing(lora, use_reentrant=False)
    lora.train()
    batch = batch_for(base, "qwen2_vl", steps=2)
    ours, grads = run(IVTLR(lora, LATENT_ID, k=K), lora, batch)
    theirs, ref_grads = run(ivtlr_reference(lora, LATENT_ID, k=K), lora, batch)
    assert_same(ours, grads, theirs, ref_grads)
    assert all("lora" in n for n in grads)
