"""ModalMixedCoT on tiny Qwen2-VL and Qwen2.5-VL models built from configs: the sketch targets, the teacher-forced
loss pieces against a plain Hugging Face forward on the assembled embeddings, gradients, batched generation against
the per-sample uncached reference loop, and bad input."""
import pytest
import torch
from torch.nn import functional as F

from mmlatent.models import LatentDiffusionHead, ModalMixedCoT, modal_mixed_reference_generate, tiny
from mmlatent.models.backbones import VLMBackbone

START, END, LATENT, EOS = 4, 5, 3, 2
K, D = 4, 64
BUILDERS = {"qwen2_vl": tiny.tiny_qwen2_vl, "qwen2_5_vl": tiny.tiny_qwen2_5_vl}


def random_head(seed: int = 0, **options) -> LatentDiffusionHead:
    """A head whose zero-initialised layers are filled too, so its samples depend on every input."""
    torch.manual_seed(seed)
    head = LatentDiffusionHead(D, D, width=32, depth=2, **options)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.05)
    return head


def build(kind: str = "qwen2_5_vl", **options) -> ModalMixedCoT:
    vlm = BUILDERS[kind]()
    options = dict(dict(num_latents=K, pool_grid=(2, 2)), **options)
    return ModalMixedCoT(vlm, random_head(), start_token_id=START, end_token_id=END, latent_token_id=LATENT,
                         **options)


def left_pad(rows, pad=0):
    S = max(map(len, rows))
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, S - len(row):] = torch.tensor(row)
        mask[b, S - len(row):] = 1
    return ids, mask


def image_block(model, hw):
    backbone = model.backbone
    return [backbone.config.vision_start_token_id] + [backbone.image_token_id] * backbone.tokens_per_image(hw) + \
        [backbone.config.vision_end_token_id]


def sketch():
    return [START] + [LATENT] * K + [END]


def training_batch(model, seed=0):
    """Two samples: one with a 16 x 32 image and one sketch, one text-only with two sketches (3 in all)."""
    rows = [[1] + image_block(model, (16, 32)) + [10, 11] + sketch() + [12, 13, EOS],
            [1, 20, 21] + sketch() + [22] + sketch() + [23, EOS]]
    ids, mask = left_pad(rows)
    labels = torch.where(mask.bool() & (ids != LATENT), ids, torch.full_like(ids, -100))
    pixels = model.backbone.random_pixel_values([(16, 32)], torch.Generator().manual_seed(seed))
    targets = torch.randn(3, K, D, generator=torch.Generator().manual_seed(seed + 1))
    return dict(input_ids=ids, attention_mask=mask, labels=labels, latent_targets=targets, **pixels)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_encode_targets_pools_the_merger_output_of_each_image(kind):
    model = build(kind)
    backbone = model.backbone
    sizes = [(16, 16), (16, 32), (32, 24)]
    pixels = backbone.random_pixel_values(sizes, torch.Generator().manual_seed(0))
    targets = model.encode_targets(pixels["pixel_values"], pixels["image_grid_thw"])
    assert targets.shape == (3, K, D) and targets.dtype == torch.float32
    with torch.no_grad():
        merged = backbone.model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"],
                                                         return_dict=True).pooler_output
    for i, (h, w) in enumerate(sizes):
        grid = merged[i].reshape(h // 8, w // 8, D).permute(2, 0, 1)  # patch 4, merge 2: 8 pixels a token
        expected = F.adaptive_avg_pool2d(grid, (2, 2)).reshape(D, K).T
        torch.testing.assert_close(targets[i], expected)
    # raster order: latent 1 is the top-right quarter of the merged grid
    grid = merged[0].reshape(2, 2, D)
    torch.testing.assert_close(targets[0, 1], grid[0, 1])


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_loss_pieces_equal_a_plain_hf_forward_on_the_assembled_embeddings(kind):
    model = build(kind)
    batch = training_batch(model)
    out = model(**batch, generator=torch.Generator().manual_seed(7))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    vlm = model.backbone.model
    embeds = vlm.get_input_embeddings()(ids).detach().clone()
    embeds[ids == LATENT] = batch["latent_targets"].reshape(-1, D)
    reference = vlm(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, labels=labels,
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=(ids == model.backbone.image_token_id).int(), output_hidden_states=True)
    torch.testing.assert_close(out.text_loss, reference.loss, rtol=1e-5, atol=1e-5)
    final = reference.hidden_states[-1]
    rows, cols = (ids == LATENT).nonzero(as_tuple=True)  # row-major: by sample, then position
    torch.testing.assert_close(out.conditions, final[rows, cols - 1], rtol=1e-5, atol=1e-5)
    # latent 0 is conditioned on START's position, latent j on latent j-1's
    assert bool((ids[rows[0], cols[0] - 1] == START)) and bool((ids[rows[1], cols[1] - 1] == LATENT))
    torch.testing.assert_close(out.targets, batch["latent_targets"].reshape(-1, D))
    latent = model.head.loss(batch["latent_targets"].reshape(-1, D), final[rows, cols - 1],
                             batch_mul=model.batch_mul, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.latent_loss, latent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out.text_loss + model.diffusion_weight * out.latent_loss)


def test_a_generator_reproduces_the_loss_exactly():
    model = build()
    batch = training_batch(model)
    first = model(**batch, generator=torch.Generator().manual_seed(3)).latent_loss
    again = model(**batch, generator=torch.Generator().manual_seed(3)).latent_loss
    other = model(**batch, generator=torch.Generator().manual_seed(4)).latent_loss
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("detach", [False, True])
def test_the_diffusion_loss_reaches_the_vlm_through_the_conditions(detach):
    model = build(detach_conditions=detach)
    batch = training_batch(model)
    model(**batch, generator=torch.Generator().manual_seed(0)).latent_loss.backward()
    vlm_grad = sum(float(p.grad.abs().sum()) for p in model.vlm.parameters() if p.grad is not None)
    head_grad = sum(float(p.grad.abs().sum()) for p in model.head.parameters() if p.grad is not None)
    assert head_grad > 0
    assert (vlm_grad == 0) == detach


def test_diffusion_weight_scales_the_latent_term():
    batch = training_batch(build())
    losses = {}
    for weight in (0.0, 1.0, 10.0):
        out = build(diffusion_weight=weight)(**batch, generator=torch.Generator().manual_seed(0))
        losses[weight] = out
        torch.testing.assert_close(out.loss, out.text_loss + weight * out.latent_loss)
    torch.testing.assert_close(losses[0.0].loss, losses[0.0].text_loss)


def test_peft_model_trains_its_adapters():
    from peft import LoraConfig, get_peft_model
    vlm = tiny.tiny_qwen2_5_vl()
    peft_model = get_peft_model(vlm, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    model = ModalMixedCoT(peft_model, random_head(), start_token_id=START, end_token_id=END,
                          latent_token_id=LATENT, num_latents=K, pool_grid=(2, 2))
    batch = training_batch(model)
    model(**batch, generator=torch.Generator().manual_seed(0)).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_batches_without_sketches_have_no_latent_term():
    model = build()
    ids, mask = left_pad([[1, 10, 11, EOS], [1, 12, EOS]])
    out = model(ids, mask, ids.masked_fill(mask == 0, -100), latent_targets=torch.zeros(0, K, D))
    assert float(out.latent_loss) == 0.0 and out.conditions.shape == (0, D)
    torch.testing.assert_close(out.loss, out.text_loss)


# --------------------------------------------------------------------------------------------------- generation
def generation_prompts(model):
    """Sample 0 (with an image) ends its prompt with START, so it sketches at once; sample 1 writes text first:
    the two sketch at different steps."""
    rows = [[1] + image_block(model, (16, 16)) + [10, 11, START], [1, 30, 31, 32, 33]]
    ids, mask = left_pad(rows)
    pixels = model.backbone.random_pixel_values([(16, 16)], torch.Generator().manual_seed(5))
    return ids, mask, pixels


def biased_towards_start(model, amount=0.6):
    with torch.no_grad():
        model.backbone.lm_head.weight[START] += amount
    return model


def starts(sequence):
    return [i for i, t in enumerate(sequence.tolist()) if t == START]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_generate_equals_the_reference_loop(kind, cfg_scale):
    model = biased_towards_start(build(kind))
    ids, mask, pixels = generation_prompts(model)
    options = dict(**pixels, max_new_tokens=24, steps=8, schedule="ddim", temperature=0.0, cfg_scale=cfg_scale,
                   eos_token_id=EOS, pad_token_id=0)
    fast = model.generate(ids, mask, **options)
    slow = modal_mixed_reference_generate(model, ids, mask, **options)
    assert torch.equal(fast.sequences, slow.sequences)
    # the test means something only if the batch was ragged: sketches began at different steps
    first = [starts(row)[:1] for row in fast.sequences]
    assert all(first) and first[0] != first[1], fast.sequences
    for a, b in zip(fast.latents, slow.latents):
        assert a.shape == b.shape and a.shape[0] >= 1
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert a.abs().max() > 0
    # every sketch: K placeholders, then END
    for row in fast.sequences.tolist():
        for p in starts(torch.tensor(row)):
            if p + K + 1 < len(row):
                assert row[p + 1:p + K + 1] == [LATENT] * K and row[p + K + 1] == END


def test_generate_equals_the_reference_for_a_flow_head_and_a_diffusers_scheduler():
    from diffusers import DDIMScheduler
    model = biased_towards_start(build())
    ids, mask, pixels = generation_prompts(model)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")
    options = dict(**pixels, max_new_tokens=12, steps=6, schedule=scheduler, temperature=0.0, eos_token_id=EOS)
    fast, slow = model.generate(ids, mask, **options), modal_mixed_reference_generate(model, ids, mask, **options)
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.latents, slow.latents):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    flow = ModalMixedCoT(model.vlm, random_head(1, schedule="flow"), start_token_id=START, end_token_id=END,
                         latent_token_id=LATENT, num_latents=K, pool_grid=(2, 2))
    options = dict(**pixels, max_new_tokens=12, steps=6, schedule="flow", temperature=0.0, eos_token_id=EOS)
    fast, slow = flow.generate(ids, mask, **options), modal_mixed_reference_generate(flow, ids, mask, **options)
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.latents, slow.latents):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_generate_draws_every_sketching_row_in_one_head_call():
    model = biased_towards_start(build())
    rows = [[1, 10, START], [1, 11, 12, START], [1, 13, 14]]
    ids, mask = left_pad(rows)
    calls = []
    original = model.head.sample

    def counting(cond, *args, **kwargs):
        calls.append(cond.shape[0])
        return original(cond, *args, **kwargs)

    model.head.sample = counting  # this instance only
    out = model.generate(ids, mask, max_new_tokens=K + 1, steps=4, temperature=0.0, eos_token_id=EOS)
    assert calls[0] == 2, calls  # rows 0 and 1 sketch from the first step, in one call
    assert len(calls) <= K + 1  # one call a step, whatever the number of sketching rows
    assert out.sequences[0, :K].tolist() == [LATENT] * K and out.sequences[0, K] == END


def test_sampled_generation_is_reproducible_and_stops_at_eos():
    model = biased_towards_start(build(), amount=0.3)
    ids, mask, pixels = generation_prompts(model)
    options = dict(**pixels, max_new_tokens=20, steps=4, do_sample=True, eos_token_id=EOS)
    a = model.generate(ids, mask, **options, generator=torch.Generator().manual_seed(0))
    b = model.generate(ids, mask, **options, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.latents, b.latents):
        assert torch.equal(x, y)
    # placeholders appear only inside sketches: the text never writes the placeholder id
    for prompt, row in zip(ids.tolist(), a.sequences.tolist()):
        opened = ([-1] if prompt[-1] == START else []) + starts(torch.tensor(row))
        inside = {q for p in opened for q in range(p + 1, p + 1 + K)}
        assert {i for i, t in enumerate(row) if t == LATENT} <= inside


@pytest.mark.parametrize("override", ["zeros", "noise"])
def test_dummy_latents_replace_what_is_fed_back(override):
    model = biased_towards_start(build())
    ids, mask, pixels = generation_prompts(model)
    options = dict(**pixels, max_new_tokens=12, steps=4, temperature=0.0, eos_token_id=EOS)
    normal = model.generate(ids, mask, **options)
    dummy = model.generate(ids, mask, **options, latent_override=override,
                           generator=torch.Generator().manual_seed(0))
    fed = dummy.latents[0]
    if override == "zeros":
        assert fed.abs().max() == 0
    else:
        # the first latent is drawn from the same state in both runs; what follows depends on what was fed
        generated = normal.latents[0][0, 0]
        torch.testing.assert_close(fed[0, 0].norm(), generated.norm())
        assert not torch.allclose(fed[0, 0], generated)


# --------------------------------------------------------------------------------------------------- bad input
def test_bad_layouts_name_the_argument():
    model = build()
    batch = training_batch(model)

    def run(rows, n_targets=None, **change):
        ids, mask = left_pad(rows)
        labels = torch.where(mask.bool() & (ids != LATENT), ids, torch.full_like(ids, -100))
        targets = torch.zeros(n_targets if n_targets is not None else 1, K, D)
        args = dict(labels=labels, latent_targets=targets)
        args.update(change)
        return model(ids, mask, **args)

    with pytest.raises(ValueError, match=r"input_ids: the sketch at row 0, position 2 .* has 3 latent placeholders"):
        run([[1, 10, START] + [LATENT] * 3 + [END]])
    with pytest.raises(ValueError, match="START without END"):
        run([[1, 10, START] + [LATENT] * K + [11]])
    with pytest.raises(ValueError, match="START without END"):
        run([[1, 10, START] + [LATENT] * K])
    with pytest.raises(ValueError, match="outside a START ... END sketch"):
        run([[1, 10, LATENT, 11]], n_targets=0)
    with pytest.raises(ValueError, match="closes no sketch"):
        run([[1, 10, END, 11]], n_targets=0)
    with pytest.raises(ValueError, match=r"latent_targets: 1 sketches given, but input_ids hold 2"):
        run([[1] + sketch() + sketch()])
    with pytest.raises(ValueError, match=r"latent_targets: expected \[N_seg, 4, 64\]"):
        run([[1] + sketch()], latent_targets=torch.zeros(1, K, D + 1))
    with pytest.raises(ValueError, match=r"latent_targets: expected \[N_seg, 4, 64\]"):
        run([[1] + sketch()], latent_targets=torch.zeros(1, K + 1, D))
    ids, mask = left_pad([[1] + sketch()])
    with pytest.raises(ValueError, match="labels: expected -100 on every latent placeholder"):
        model(ids, mask, ids.clone(), latent_targets=torch.zeros(1, K, D))
    with pytest.raises(ValueError, match="labels: expected a tensor of input_ids' shape"):
        model(ids, mask, ids[:, 1:], latent_targets=torch.zeros(1, K, D))
    # nothing was written into the caller's tensors
    before = {k: v.clone() for k, v in batch.items()}
    model(**batch)
    for k, v in batch.items():
        assert torch.equal(v, before[k]), k


def test_bad_construction_names_the_argument():
    vlm = tiny.tiny_qwen2_vl()
    head = random_head()
    ok = dict(start_token_id=START, end_token_id=END, latent_token_id=LATENT, num_latents=K, pool_grid=(2, 2))
    image_id = VLMBackbone(vlm).image_token_id
    cases = [
        (dict(ok, pool_grid=(2, 3)), ValueError, "pool_grid: .* pools to 6 latents, but num_latents=4"),
        (dict(ok, latent_token_id=image_id), ValueError, "latent_token_id: .* image token ids"),
        (dict(ok, end_token_id=START), ValueError, "three different ids"),
        (dict(ok, start_token_id=10 ** 6), ValueError, "start_token_id: .* outside the vocabulary"),
        (dict(ok, diffusion_weight=-1.0), ValueError, "diffusion_weight"),
        (dict(ok, batch_mul=0), ValueError, "batch_mul"),
        (dict(ok, num_latents=0, pool_grid=(0, 1)), ValueError, "num_latents"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            ModalMixedCoT(vlm, head, **options)
    with pytest.raises(ValueError, match="head: expected latent_dim == cond_dim == 64"):
        ModalMixedCoT(vlm, LatentDiffusionHead(32, 64, width=16, depth=1), **ok)
    with pytest.raises(TypeError, match="vlm: Modal-mixed CoT reads the vision merger"):
        ModalMixedCoT(tiny.tiny_chameleon(), head, **ok)


def test_bad_generation_input_names_the_argument():
    model = build()
    ids, mask = left_pad([[1, 10, 11], [1, 12]])
    with pytest.raises(ValueError, match="input_ids: a prompt holds no latent placeholder"):
        model.generate(*left_pad([[1, START, LATENT]]))
    with pytest.raises(ValueError, match="attention_mask: generation prompts are left-padded"):
        model.generate(ids, torch.flip(mask, [1]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="latent_override"):
        model.generate(ids, mask, latent_override="ones")
    with pytest.raises(ValueError, match="schedule"):
        model.generate(ids, mask, schedule="flow")
    with pytest.raises(ValueError, match="pixel_values: required"):
        model.generate(*left_pad([[1] + image_block(model, (16, 16)) + [10]]))
    with pytest.raises(ValueError, match="image_grid_thw: image 0 has t=2"):
        model.encode_targets(torch.zeros(8, 96), torch.tensor([[2, 2, 2]]))
    with pytest.raises(ValueError, match="pixel_values: expected 4 rows"):
        model.encode_targets(torch.zeros(8, 96), torch.tensor([[1, 2, 2]]))
