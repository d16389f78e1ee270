"""IVTLR against ivtlr_reference (the public code's computation) on tiny random-weight Qwen2-VL, Qwen2.5-VL and
Chameleon: same selections, loss, gradients and generated tokens; bad input; the kernels really run."""
import pytest
import torch

import mmlatent.models.attention as attention
import mmlatent.models.ivtlr.rollout as rollout
from mmlatent.models import IVTLR, ivtlr_reference
from mmlatent.models.compat import enable_activation_checkpointing
from mmlatent.models.tiny import LATENT_ID, synthetic_batch, tiny_chameleon, tiny_qwen2_5_vl, tiny_qwen2_vl

BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "chameleon": tiny_chameleon}
# per sample: images of different sizes and counts (several per sample), different prompt and answer lengths, so the
# latent tokens sit at different columns under left padding
IMAGES = {"qwen2_vl": [[(16, 16), (8, 16)], [(16, 24)]], "qwen2_5_vl": [[(16, 16), (16, 16)], [(16, 32)]],
          "chameleon": [[(32, 32)], [(32, 32)]]}
K = 2


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, build in BUILDERS.items():
        model = build()
        for pname, p in model.named_parameters():  # as IVT-LR trains: language model only, vision and embeddings frozen
            p.requires_grad_(("layers" in pname or "norm" in pname) and "vqmodel" not in pname
                             and "visual" not in pname)
        out[name] = model
    return out


def rel_err(a, e) -> float:
    a, e = a.detach().double(), e.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def run(wrapper, model, batch):
    model.zero_grad(set_to_none=True)
    out = wrapper(**batch, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


CASES = [(name, stage, mode) for name in BUILDERS for stage in range(4)
         for mode in (("linear", "mrope") if name != "chameleon" else ("linear",))]


@pytest.mark.parametrize("name,stage,mode", CASES, ids=[f"{n}-stage{s}-{m}" for n, s, m in CASES])
def test_matches_reference(models, name, stage, mode):
    model = models[name]
    batch = synthetic_batch(model, images=IMAGES[name], prompt_lengths=[3, 6], answer_lengths=[4, 2],
                            num_latents=[stage, stage], seed=stage)
    fast, ref = IVTLR(model, LATENT_ID, k=K, position_mode=mode), ivtlr_reference(model, LATENT_ID, k=K,
                                                                                 position_mode=mode)
    ours, grads = run(fast, model, batch)
    theirs, ref_grads = run(ref, model, batch)
    assert len(ours.selected) == stage
    for a, b in zip(ours.selected, theirs.selected):
        assert torch.equal(a, b)
        assert bool((a[:, 1:] > a[:, :-1]).all())  # ascending image-token order
    assert rel_err(ours.loss, theirs.loss) <= 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) <= 1e-4, n
    assert ours.logits.shape == theirs.logits.shape == (2, batch["input_ids"].shape[1] + stage * K,
                                                        model.config.get_text_config().vocab_size)
    real = ours.inputs_embeds.abs().sum(-1) > 0  # padding columns hold no embedding; their logits are arbitrary
    assert rel_err(ours.logits[real], theirs.logits[real]) <= 1e-4
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(fast.generate(**prompt, max_new_tokens=6), ref.generate(**prompt, max_new_tokens=6))


def test_ragged_batch_matches_reference_and_single_samples(models):
    """Different numbers of latent steps, images and positions per sample: the batch gives each sample what it
    gets alone (no batch-alignment assumption)."""
    model = models["qwen2_vl"]
    batch = synthetic_batch(model, images=[[(16, 16), (8, 16)], [(16, 24)], [(16, 16)]], prompt_lengths=[3, 6, 1],
                            answer_lengths=[4, 2, 3], num_latents=[1, 3, 2], seed=5)
    fast, ref = IVTLR(model, LATENT_ID, k=1), ivtlr_reference(model, LATENT_ID, k=1)
    ours, grads = run(fast, model, batch)
    theirs, ref_grads = run(ref, model, batch)
    assert rel_err(ours.loss, theirs.loss) <= 1e-5
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) <= 1e-4, n
    assert [s.tolist() for s in ours.selected] == [s.tolist() for s in theirs.selected]
    assert ours.selected[1][0].tolist() == [-1] and ours.selected[2][2].tolist() == [-1]
    with torch.no_grad():
        for b in range(3):
            single = IVTLR(model, LATENT_ID, k=1)(**one_sample(model, batch, b))
            steps = [s[b].tolist() for s in ours.selected if s[b, 0] >= 0]
            assert [s[0].tolist() for s in single.selected] == steps


def one_sample(model, batch, b):
    """Sample b of a Qwen batch alone: its row without padding, its images' pixel rows and grids."""
    starts = (batch["input_ids"] == model.config.vision_start_token_id).sum(dim=1).tolist()
    first = sum(starts[:b])
    grids = batch["image_grid_thw"]
    rows = grids.prod(dim=1).tolist()
    row0 = sum(rows[:first])
    keep = batch["attention_mask"][b].bool()
    return dict(input_ids=batch["input_ids"][b, keep][None], attention_mask=batch["attention_mask"][b, keep][None],
                labels=batch["labels"][b, keep][None], image_grid_thw=grids[first:first + starts[b]],
                pixel_values=batch["pixel_values"][row0:row0 + sum(rows[first:first + starts[b]])])


# attention_with_scores has no native backend and select_image_tokens no Triton one: auto runs the native fused
# selection (and the Triton interpreter's attention)
@pytest.mark.parametrize("backend, deferred", [("reference", False), ("triton", False), ("reference", True),
                                               ("auto", True)],
                         ids=["in_attention-torch", "in_attention-triton", "deferred-torch", "deferred-auto"])
def test_rollout_runs_the_fused_kernels(models, monkeypatch, use_backend, backend, deferred):
    """No eager attention, no output_attentions: the image mass comes from mmlatent's kernels. In attention (a
    GPU's way): every no-grad read calls the fused attention_with_scores, which decides itself what runs
    (Triton, here its interpreter, or SDPA + row mass); a differentiable prefix read runs the model's attention
    and row_attention_mass. Deferred (a CPU's way): the same attention calls compute no mass; each latent step's
    selection is one select_image_tokens over every layer's cache. Either way the tokens are the reference's."""
    use_backend(backend)
    model = models["qwen2_vl"]
    calls = {"row": 0, "fused": 0, "image": 0}

    def counting(name, module, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, real.__name__, call)
    counting("row", attention, attention.row_attention_mass)
    counting("fused", attention, attention.attention_with_scores)
    counting("image", rollout, rollout.select_image_tokens)
    batch = synthetic_batch(model, images=IMAGES["qwen2_vl"], prompt_lengths=[3, 6], answer_lengths=[4, 2],
                            num_latents=[3, 3])
    fast = IVTLR(model, LATENT_ID, k=K, selection="deferred" if deferred else "in_attention")
    ref = ivtlr_reference(model, LATENT_ID, k=K)
    out = fast(**batch)
    layers = model.config.text_config.num_hidden_layers
    expected_calls = dict(row=0 if deferred else layers, fused=2 * layers, image=3 if deferred else 0)
    assert calls == expected_calls
    assert out.loss.requires_grad and model.config.text_config._attn_implementation == "mmlatent_sdpa"
    expected = ref(**batch)
    assert [s.tolist() for s in out.selected] == [s.tolist() for s in expected.selected]
    assert rel_err(out.loss, expected.loss) <= 1e-5
    calls.update(row=0, fused=0, image=0)
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(fast.generate(**prompt, max_new_tokens=3), ref.generate(**prompt, max_new_tokens=3))
    assert calls == dict(row=0, fused=3 * layers, image=3 if deferred else 0)


def test_selection_auto_defers_on_cpu_only_and_a_bad_choice_is_refused(models):
    from mmlatent.models.ivtlr.rollout import defers_selection
    assert defers_selection("auto", torch.device("cpu")) and not defers_selection("auto", torch.device("cuda"))
    assert defers_selection("deferred", torch.device("cuda")) and not defers_selection("in_attention",
                                                                                      torch.device("cpu"))
    model = models["qwen2_vl"]
    before = model.config.text_config._attn_implementation
    with pytest.raises(ValueError, match="selection: expected one of 'auto', 'in_attention', 'deferred'"):
        IVTLR(model, LATENT_ID, k=K, selection="later")
    assert model.config.text_config._attn_implementation == before


def test_wrapping_keeps_the_model_outputs():
    """The model's own calls, while wrapped, run the implementation it was loaded with (SDPA here, eager too: an
    eager vision tower is wrapped as well, for IVTLR's calls only)."""
    for implementation in ("sdpa", "eager"):
        model = tiny_qwen2_vl(seed=2)
        model.set_attn_implementation(implementation)
        batch = synthetic_batch(model, images=IMAGES["qwen2_vl"], prompt_lengths=[3, 6], answer_lengths=[4, 2],
                                num_latents=[0, 0])
        inputs = dict(batch, mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).int())
        del inputs["labels"]
        with torch.no_grad():
            before = model(**inputs).logits
            wrapper = IVTLR(model, LATENT_ID, k=K)
            after = model(**inputs).logits
        assert model.config.text_config._attn_implementation == f"mmlatent_{implementation}"
        assert model.config.vision_config._attn_implementation == {"sdpa": "sdpa", "eager": "mmlatent_eager"}[
            implementation]
        real = batch["attention_mask"].bool()
        assert torch.allclose(before[real], after[real], atol=1e-6)
        assert wrapper.unwrap() is model and model.config.text_config._attn_implementation == implementation


def test_default_k_and_local_checkpoint(models, tmp_path):
    model = models["chameleon"]
    assert IVTLR(model, LATENT_ID).k == 64 and IVTLR(models["qwen2_vl"], LATENT_ID).k == 32
    models["qwen2_vl"].save_pretrained(tmp_path)
    from transformers import Qwen2VLForConditionalGeneration
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    batch = synthetic_batch(loaded, images=IMAGES["qwen2_vl"], prompt_lengths=[3, 6], answer_lengths=[4, 2],
                            num_latents=[2, 2])
    with torch.no_grad():
        a = IVTLR(loaded, LATENT_ID, k=K)(**batch)
        b = IVTLR(models["qwen2_vl"], LATENT_ID, k=K)(**batch)
    assert rel_err(a.loss, b.loss) <= 1e-6


def test_lora_model_matches_reference(models):
    peft = pytest.importorskip("peft")
    base = tiny_qwen2_vl(seed=3)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                     target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)"))
    batch = synthetic_batch(base, images=IMAGES["qwen2_vl"], prompt_lengths=[3, 6], answer_lengths=[4, 2],
                            num_latents=[2, 2])
    ours, grads = run(IVTLR(lora, LATENT_ID, k=K), lora, batch)
    theirs, ref_grads = run(ivtlr_reference(lora, LATENT_ID, k=K), lora, batch)
    assert rel_err(ours.loss, theirs.loss) <= 1e-5
    assert grads.keys() == ref_grads.keys() and all("lora" in n for n in grads)
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) <= 1e-4, n


# ------------------------------------------------------------------------------------------------------ bad input

def _batch(models, **kw):
    args = dict(images=IMAGES["qwen2_vl"], prompt_lengths=[3, 6], answer_lengths=[4, 2], num_latents=[2, 2])
    args.update(kw)
    return synthetic_batch(models["qwen2_vl"], **args)


def test_bad_input_names_sample_and_argument(models):
    model = models["qwen2_vl"]
    fast = IVTLR(model, LATENT_ID, k=K)
    with pytest.raises(ValueError, match="input_ids: sample 1 has no latent token"):
        fast(**_batch(models, num_latents=[2, 0]))
    with pytest.raises(ValueError, match="input_ids: sample 0 has 6 image tokens, fewer than the 8"):
        IVTLR(model, LATENT_ID, k=4)(**_batch(models, num_latents=[2, 1]))
    with pytest.raises(ValueError, match="input_ids: sample 1 has latent tokens but no image token"):
        fast(**_batch(models, images=[[(16, 16), (8, 16)], []]))
    batch = _batch(models)
    with pytest.raises(ValueError, match="pixel_values: expected 48 rows .*, got 44"):
        fast(**dict(batch, pixel_values=batch["pixel_values"][:-4]))
    # pixels consistent with a grid that describes twice the image tokens input_ids hold
    with pytest.raises(ValueError, match="image_grid_thw: describes 24 image tokens, but input_ids hold 12"):
        fast(**dict(batch, pixel_values=torch.cat([batch["pixel_values"]] * 2),
                    image_grid_thw=batch["image_grid_thw"] * torch.tensor([2, 1, 1])))
    with pytest.raises(ValueError, match="labels: expected shape"):
        fast(**dict(batch, labels=batch["labels"][:, 1:]))
    with pytest.raises(TypeError, match="vlm: unsupported model class"):
        IVTLR(torch.nn.Linear(2, 2), LATENT_ID)
    with pytest.raises(ValueError, match="position_mode"):
        IVTLR(models["chameleon"], LATENT_ID, position_mode="mrope")
    with pytest.raises(ValueError, match="k: expected a positive int"):
        IVTLR(model, LATENT_ID, k=0)
    with pytest.raises(ValueError, match="left-padded"):
        right = dict(batch, attention_mask=batch["attention_mask"].flip(1))
        fast.generate(**{k: v for k, v in right.items() if k != "labels"})


def test_gradient_checkpointing_in_training_mode(models):
    """As the public code trains (gradient checkpointing, train mode): transformers drops the KV cache of
    checkpointed layers, so the rollout pauses checkpointing (it has no graph) and the loss pass re-reads the
    prompt; results equal the reference's."""
    model = tiny_qwen2_vl(seed=7)
    for name, p in model.named_parameters():
        p.requires_grad_("language_model.layers" in name)
    enable_activation_checkpointing(model, use_reentrant=False)
    model.train()
    try:
        batch = synthetic_batch(model, images=IMAGES["qwen2_vl"], prompt_lengths=[3, 6], answer_lengths=[4, 2],
                                num_latents=[3, 3])
        ours, grads = run(IVTLR(model, LATENT_ID, k=K), model, batch)
        theirs, ref_grads = run(ivtlr_reference(model, LATENT_ID, k=K), model, batch)
        assert [s.tolist() for s in ours.selected] == [s.tolist() for s in theirs.selected]
        assert rel_err(ours.loss, theirs.loss) <= 1e-5
        for n in grads:
            assert rel_err(grads[n], ref_grads[n]) <= 1e-4, n
        layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing for m in layers if type(m).__name__.endswith("DecoderLayer"))
    finally:
        model.eval()
