"""GRPO's pieces: advantages and the loss against TRL's own GRPOTrainer code on identical inputs (value, gradient
and logged ratios, every loss type, both importance-sampling levels, beta 0 and > 0, asymmetric epsilons; TRL
1.13.0), float64 oracles, masks, Modal-mixed rollouts whose recomputed log-probs equal the rollout's own, and bad
input."""
import types
from collections import defaultdict

import pytest
import torch

from mmlatent.models import LatentDiffusionHead, ModalMixedCoT, tiny
from mmlatent.train import grpo

START, END, LATENT, EOS = 4, 5, 3, 2
K, D = 4, 64


# ------------------------------------------------------------------------------------------------ advantages

def oracle_advantages(rewards, group_size, scale):
    r = rewards.double()
    out = torch.empty_like(r)
    groups = r.view(-1, group_size)
    batch_std = r.std() if r.numel() > 1 else torch.zeros((), dtype=torch.float64)
    for g, row in enumerate(groups):
        mean = row.mean()
        std = row.std() if group_size > 1 else torch.zeros((), dtype=torch.float64)
        for j, value in enumerate(row):
            a = value - mean
            if scale == "group":
                a = a / (std + 1e-4)
            elif scale == "batch":
                a = a / (batch_std + 1e-4)
            out[g * group_size + j] = a
    return out


@pytest.mark.parametrize("scale", grpo.SCALES)
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_group_advantages_match_the_float64_oracle(scale, group_size):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.25, 0.0, 1.0])
    got = grpo.group_advantages(rewards, group_size, scale=scale)
    assert got.dtype == torch.float32 and got.shape == rewards.shape
    torch.testing.assert_close(got.double(), oracle_advantages(rewards, group_size, scale), rtol=1e-6, atol=1e-6)


def test_a_group_with_equal_rewards_has_zero_advantage():
    got = grpo.group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    assert got[:2].abs().max() == 0 and got[2] < 0 < got[3]


@pytest.mark.parametrize("scale", grpo.SCALES)
def test_group_advantages_are_trls(scale):
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="TRL is a test extra: pip install -e '.[test]'")
    rewards = torch.rand(24, generator=torch.Generator().manual_seed(0)).round()
    G = 6
    grouped = rewards.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    if scale == "batch":
        std = trl_utils.nanstd(rewards).expand_as(rewards)
    else:
        std = trl_utils.nanstd(grouped, dim=1).repeat_interleave(G)
    expected = rewards - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    # torch.std and nanstd round differently (one float32 ulp apart)
    torch.testing.assert_close(grpo.group_advantages(rewards, G, scale=scale), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the loss vs TRL

def _trl_loss(inputs, logp, *, loss_type, level, beta, epsilon_low, epsilon_high, max_completion_length):
    """TRL's GRPOTrainer._compute_loss itself, on an object holding exactly the settings it reads (one process,
    one accumulation window, no vLLM); the policy forward is replaced by the given per-token log-probs."""
    from trl import GRPOTrainer

    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction="sum": x, sync_gradients=True)
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, accelerator=accelerator, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


def _inputs(N=6, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:N]
    mask = torch.arange(L)[None] < lengths[:, None]
    logp = -torch.rand(N, L, generator=g, dtype=torch.float64) * 3
    # weights well outside [0.8, 1.2], per token and (by a per-row shift) per sequence
    old = logp + 0.3 * torch.randn(N, L, generator=g, dtype=torch.float64) + \
        0.4 * torch.randn(N, 1, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(N, L, generator=g, dtype=torch.float64)
    advantages = torch.randn(N, generator=g, dtype=torch.float64)
    return logp.float(), old.float(), ref.float(), advantages.float(), mask


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("level", grpo.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("beta,epsilons", [(0.0, (0.2, 0.2)), (0.04, (0.2, 0.28)), (0.1, (0.1, 0.3))])
def test_grpo_loss_equals_trls_in_value_gradient_and_logged_ratios(loss_type, level, beta, epsilons):
    pytest.importorskip("trl", reason="TRL is a test extra: pip install -e '.[test]'")
    logp, old, ref, advantages, mask = _inputs()
    num_items = int(mask.sum()) + 9  # dapo: the tokens of the whole accumulated batch, more than this micro-batch
    ours_logp = logp.clone().requires_grad_(True)
    ours = grpo.grpo_loss(ours_logp, advantages, mask, old_logp=old, ref_logp=ref if beta else None, beta=beta,
                          epsilon_low=epsilons[0], epsilon_high=epsilons[1], loss_type=loss_type,
                          importance_sampling_level=level, max_completion_length=10, num_items_in_batch=num_items)
    ours.loss.backward()
    theirs_logp = logp.clone().requires_grad_(True)
    N, L = logp.shape
    inputs = dict(prompt_ids=torch.zeros(N, 2, dtype=torch.long), prompt_mask=torch.ones(N, 2, dtype=torch.long),
                  completion_ids=torch.zeros(N, L, dtype=torch.long), completion_mask=mask.long(),
                  advantages=advantages, old_per_token_logps=old, ref_per_token_logps=ref if beta else None,
                  num_items_in_batch=torch.tensor(num_items))
    theirs, metrics = _trl_loss(inputs, theirs_logp, loss_type=loss_type, level=level, beta=beta,
                                epsilon_low=epsilons[0], epsilon_high=epsilons[1], max_completion_length=10)
    theirs.backward()
    torch.testing.assert_close(ours.loss, theirs.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_logp.grad, theirs_logp.grad, rtol=1e-5, atol=1e-7)
    assert ours_logp.grad.abs().sum() > 0
    assert ours.clip_ratio.item() == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=1e-7)
    assert ours.clip_ratio.item() > 0, "the inputs must clip some weights for the test to mean anything"
    if beta:
        assert ours.kl.item() == pytest.approx(metrics["kl"][-1], rel=1e-6)


def test_one_iteration_has_unit_weights_and_the_plain_policy_gradient():
    logp, _, _, advantages, mask = _inputs()
    x = logp.clone().requires_grad_(True)
    out = grpo.grpo_loss(x, advantages, mask, loss_type="bnpo")
    out.loss.backward()
    # d/dlogp of -exp(logp - sg(logp)) * A = -A, over the micro-batch's tokens
    expected = -advantages[:, None].expand_as(x) * mask / mask.sum()
    torch.testing.assert_close(x.grad, expected)
    assert out.clip_ratio.item() == 0 and out.kl is None
    assert out.loss.item() == pytest.approx(float(-(advantages[:, None] * mask).sum() / mask.sum()), rel=1e-6)


def test_masked_positions_may_hold_anything():
    logp, old, ref, advantages, mask = _inputs()
    dirty = [t.clone() for t in (logp, old, ref)]
    for t in dirty:
        t[~mask] = float("-inf")
    clean = grpo.grpo_loss(logp, advantages, mask, old_logp=old, ref_logp=ref, beta=0.1)
    x = dirty[0].clone().requires_grad_(True)
    messy = grpo.grpo_loss(x, advantages, mask, old_logp=dirty[1], ref_logp=dirty[2], beta=0.1)
    messy.loss.backward()
    assert torch.equal(clean.loss, messy.loss) and torch.isfinite(x.grad).all() and x.grad[~mask].abs().max() == 0


def test_bad_input_names_the_argument():
    logp, old, ref, advantages, mask = _inputs()
    with pytest.raises(ValueError, match="group_size: 4 does not divide the 6 rewards"):
        grpo.group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale: expected one of group, batch, none"):
        grpo.group_advantages(torch.zeros(6), 3, scale="std")
    with pytest.raises(ValueError, match="rewards: expected finite"):
        grpo.group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="mask: expected a bool tensor of logp's shape"):
        grpo.grpo_loss(logp, advantages, mask[:, :-1])
    with pytest.raises(ValueError, match="mask: expected a bool tensor"):
        grpo.grpo_loss(logp, advantages, mask.long())
    with pytest.raises(ValueError, match="old_logp: expected logp's shape"):
        grpo.grpo_loss(logp, advantages, mask, old_logp=old[:, :3])
    with pytest.raises(ValueError, match="advantages: expected \\[6\\]"):
        grpo.grpo_loss(logp, advantages[:4], mask)
    with pytest.raises(ValueError, match="ref_logp: needed with beta > 0"):
        grpo.grpo_loss(logp, advantages, mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_type: expected one of grpo, bnpo, dr_grpo, dapo"):
        grpo.grpo_loss(logp, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo.grpo_loss(logp, advantages, mask, importance_sampling_level="segment")
    with pytest.raises(ValueError, match="num_items_in_batch: expected a positive count"):
        grpo.grpo_loss(logp, advantages, mask, num_items_in_batch=0)


# ------------------------------------------------------------------------------- rollouts replayed exactly

def _model(kind: str, start_bias: float = 3.0) -> ModalMixedCoT:
    builders = {"qwen2_vl": tiny.tiny_qwen2_vl, "qwen2_5_vl": tiny.tiny_qwen2_5_vl}
    torch.manual_seed(0)
    head = LatentDiffusionHead(D, D, width=32, depth=2)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.05)
    model = ModalMixedCoT(builders[kind](), head, start_token_id=START, end_token_id=END, latent_token_id=LATENT,
                          num_latents=K, pool_grid=(2, 2))
    lm_head = model.backbone.lm_head  # a bias on START: rows open sketches, at different steps
    bias = torch.zeros(lm_head.out_features)
    bias[START] = start_bias
    lm_head.bias = torch.nn.Parameter(bias)
    return model.eval()


def _prompts(model):
    backbone = model.backbone
    image = [backbone.config.vision_start_token_id] + [backbone.image_token_id] * backbone.tokens_per_image(
        (16, 16)) + [backbone.config.vision_end_token_id]
    rows = [[1] + image + [10, 11], [1, 20, 21, 22, 23], [1, 30, 10, 31]]
    S = max(map(len, rows))
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, S - len(row):] = torch.tensor(row)
        mask[b, S - len(row):] = 1
    pixels = backbone.random_pixel_values([(16, 16)], torch.Generator().manual_seed(0))
    return ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), pixels


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_recomputed_log_probs_of_a_sampled_rollout_equal_its_own(kind):
    model = _model(kind)
    ids, mask, pixels = _prompts(model)
    # the image belongs to rows 0 and 1 (the first prompt, twice)
    pixel_values = torch.cat([pixels["pixel_values"]] * 2)
    grid = torch.cat([pixels["image_grid_thw"]] * 2)
    gen = model.generate(ids, mask, pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=24, steps=3,
                         do_sample=True, text_temperature=0.7, generator=torch.Generator().manual_seed(3),
                         eos_token_id=EOS, pad_token_id=0)
    batch = grpo.rollout_batch(model, ids, mask, gen, pad_token_id=0, pixel_values=pixel_values,
                               image_grid_thw=grid)
    assert batch["latents"].shape[0] >= 2, "the test needs sketches to replay"
    starts = [(row == START).nonzero()[0, 0].item() if (row == START).any() else None for row in gen.sequences]
    assert len({s for s in starts if s is not None}) >= 2, "rows should open sketches at different steps"
    logp, out_mask = grpo.completion_log_probs(model, batch, temperature=0.7)
    assert torch.equal(out_mask, batch["completion_mask"]) and out_mask.any()
    torch.testing.assert_close(logp[out_mask], batch["old_logp"][out_mask], rtol=0, atol=1e-5)
    assert not out_mask[gen.sequences == LATENT].any() and not out_mask[gen.sequences == END].any()
    # at old parameters the weights are 1 and the loss is the plain policy gradient
    out = grpo.grpo_loss(logp, torch.ones(logp.shape[0]), out_mask, old_logp=batch["old_logp"])
    assert out.clip_ratio.item() == 0


def test_log_probs_have_gradients_and_never_build_the_full_logits():
    model = _model("qwen2_vl").train()
    ids, mask, _ = _prompts(model)
    ids, mask = ids[2:], mask[2:]  # the text-only prompts
    gen = model.generate(ids, mask, max_new_tokens=12, steps=2, do_sample=True,
                         generator=torch.Generator().manual_seed(1), eos_token_id=EOS, pad_token_id=0)
    batch = grpo.rollout_batch(model, ids, mask, gen, pad_token_id=0)
    vocab = model.backbone.text_config.vocab_size
    seen = []

    def spy(module, args, output):
        seen.append(output.shape)
    handle = model.backbone.lm_head.register_forward_hook(spy)
    try:
        logp, m = grpo.completion_log_probs(model, batch)
    finally:
        handle.remove()
    assert not seen, f"the output layer ran as a module: {seen} (logits of width {vocab})"
    logp[m].sum().backward()
    assert model.backbone.lm_head.weight.grad.abs().sum() > 0


def test_a_sketch_cut_short_is_dropped_from_its_start():
    model = _model("qwen2_vl", start_bias=100.0)  # START is every text step's argmax
    ids, mask, _ = _prompts(model)
    ids, mask = ids[2:], mask[2:]
    gen = model.generate(ids, mask, max_new_tokens=3, steps=2, eos_token_id=EOS, pad_token_id=0)
    assert (gen.sequences[:, 0] == START).all() and (gen.sequences[:, 1:] == LATENT).all()
    batch = grpo.rollout_batch(model, ids, mask, gen, pad_token_id=0)
    completion = batch["input_ids"][:, -gen.sequences.shape[1]:]
    assert not (completion == LATENT).any() and batch["latents"].shape[0] == 0
    logp, m = grpo.completion_log_probs(model, batch)
    assert not m[gen.sequences == START].any()


def _causal_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128)).eval()


@pytest.mark.parametrize("kind", ["vlm", "causal_lm"])
def test_completion_log_probs_of_a_plain_policy_equal_log_softmax(kind):
    """A plain VLM's distribution excludes its image and video placeholders (it never writes them); a text-only
    causal LM's is its whole softmax."""
    model = tiny.tiny_qwen2_vl().eval() if kind == "vlm" else _causal_lm()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 60, (2, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[1, :2] = 0
    completion_mask = torch.ones(2, 4, dtype=torch.bool)
    completion_mask[0, -1] = False
    logp, m = grpo.completion_log_probs(model, dict(input_ids=ids, attention_mask=attention,
                                                    completion_mask=completion_mask), temperature=1.3)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double() / 1.3
    unwritable = grpo.plain_unwritable_token_ids(model)
    assert (len(unwritable) == 2) == (kind == "vlm")
    logits[..., list(unwritable)] = -float("inf")
    expected = torch.log_softmax(logits[:, -5:-1], -1).gather(2, ids[:, -4:, None])[..., 0]
    torch.testing.assert_close(logp[m].double(), expected[m], rtol=0, atol=1e-5)
    assert (logp[~m] == 0).all()
    # its rollout scores what it sampled, never an unwritable id
    batch = grpo.plain_rollout(model, ids, attention, max_new_tokens=16, eos_token_id=EOS, pad_token_id=0,
                               generator=torch.Generator().manual_seed(1))
    completion = batch["input_ids"][:, ids.shape[1]:]
    assert not torch.isin(completion, torch.tensor(unwritable or [-1])).any()
    again, _ = grpo.completion_log_probs(model, batch)
    torch.testing.assert_close(again, batch["old_logp"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_a_shared_prompt_gives_the_full_forwards_log_probs_and_gradients(kind):
    """group_size runs each group's prompt once and shares its keys and values: the log-probs of a Modal-mixed
    rollout (sketches replayed) and of a plain policy's, and the gradients, equal the full forward's."""
    model = _model(kind)
    ids, mask, pixels = _prompts(model)  # three prompts, each twice: groups of 2
    pixel_values = torch.cat([pixels["pixel_values"]] * 2)
    grid = torch.cat([pixels["image_grid_thw"]] * 2)
    gen = model.generate(ids, mask, pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=24, steps=3,
                         do_sample=True, generator=torch.Generator().manual_seed(3), eos_token_id=EOS, pad_token_id=0)
    mixed = grpo.rollout_batch(model, ids, mask, gen, pad_token_id=0, pixel_values=pixel_values, image_grid_thw=grid)
    assert mixed["latents"].shape[0] >= 2
    plain = grpo.plain_rollout(model.vlm, ids, mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=0,
                               generator=torch.Generator().manual_seed(1), pixel_values=pixel_values,
                               image_grid_thw=grid)
    for policy, batch in ((model, mixed), (model.vlm, plain)):
        results = []
        for group_size in (None, 2):
            policy.zero_grad(set_to_none=True)
            logp, m = grpo.completion_log_probs(policy, dict(batch, group_size=group_size), temperature=0.8)
            (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
            results.append((logp.detach(), [p.grad.clone() for p in policy.parameters() if p.grad is not None]))
        (full, full_grads), (shared, shared_grads) = results
        torch.testing.assert_close(shared, full, rtol=0, atol=2e-6)
        assert len(shared_grads) == len(full_grads) > 0
        for a, b in zip(shared_grads, full_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_group_size_whose_rows_do_not_share_a_prompt_is_refused():
    model = _model("qwen2_vl")
    ids, mask, _ = _prompts(model)
    batch = dict(input_ids=torch.cat([ids, ids[:, -3:]], 1), attention_mask=torch.cat([mask, mask[:, -3:]], 1),
                 completion_mask=torch.ones(6, 3, dtype=torch.bool), latents=torch.zeros(0, K, D))
    batch["input_ids"][:, -3:] = 10
    with pytest.raises(ValueError, match=r"batch\['group_size'\]: rows 0..2 \(group 0\) do not share one prompt"):
        grpo.completion_log_probs(model, dict(batch, group_size=3))
    with pytest.raises(ValueError, match=r"batch\['group_size'\]: expected a positive int dividing the 6 rows"):
        grpo.completion_log_probs(model, dict(batch, group_size=4))
    # a family without a known KV-cache path (a text-only causal LM) takes the full forward
    lm = _causal_lm()
    prompt = torch.randint(10, 60, (1, 5)).repeat(2, 1)
    rows = dict(input_ids=torch.cat([prompt, torch.randint(10, 60, (2, 3))], 1),
                attention_mask=torch.ones(2, 8, dtype=torch.long), completion_mask=torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(grpo.completion_log_probs(lm, dict(rows, group_size=2))[0],
                               grpo.completion_log_probs(lm, rows)[0], rtol=0, atol=0)


def test_completion_log_probs_bad_batches():
    model = _model("qwen2_vl")
    ids = torch.randint(10, 60, (2, 9))
    attention = torch.ones_like(ids)
    with pytest.raises(ValueError, match="batch: missing 'completion_mask'"):
        grpo.completion_log_probs(model, dict(input_ids=ids, attention_mask=attention))
    with pytest.raises(ValueError, match="completion_mask'\\]: expected a bool \\[N, L\\]"):
        grpo.completion_log_probs(model, dict(input_ids=ids, attention_mask=attention,
                                              completion_mask=torch.ones(2, 9, dtype=torch.bool)))
    with pytest.raises(ValueError, match="batch: missing 'latents'"):
        grpo.completion_log_probs(model, dict(input_ids=ids, attention_mask=attention,
                                              completion_mask=torch.ones(2, 3, dtype=torch.bool)))
    ids[0, -2] = LATENT
    with pytest.raises(ValueError, match="True on a latent placeholder"):
        grpo.completion_log_probs(model, dict(input_ids=ids, attention_mask=attention, latents=torch.zeros(0, K, D),
                                              completion_mask=torch.ones(2, 3, dtype=torch.bool)))


# ------------------------------------------------------------------------------------------------- the loop

SFT = dict(model={"tiny_qwen2_vl": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64}},
           data={"synthetic": {"n_train": 32, "n_eval": 8, "seed": 0, "kinds": ["swap"]}},
           num_latents=9, pool_grid=[3, 3], head={"width": 32, "depth": 1}, sampler={"steps": 2},
           batch_size=8, epochs=10, max_new_tokens=40, eval_samples=4, cache_targets=True)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A short Modal-mixed SFT run (40 steps; it writes sketches), the GRPO runs' starting point; the torch
    backend of the kernels (the interpreted Triton kernels would take minutes a step) on one thread."""
    from mmlatent.train import modal_mixed as mm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMLATENT_BACKEND", "torch")
        out = tmp_path_factory.mktemp("sft")
        config = mm.ModalMixedConfig(name="sft", train={"lr": 0.02, "warmup_steps": 1, "clip": 1.0, "seed": 0,
                                                        "progress": False, "output_dir": str(out)}, **SFT)
        mm.train(config, progress=False)
        yield str(out / "final")
    torch.set_num_threads(threads)


def _grpo(init_from, out, **changes):
    train = dict(dict(lr=1e-3, max_steps=4, seed=0, progress=False, output_dir=str(out)), **changes.pop("train", {}))
    options = dict(dict(name="g", init_from=init_from, group_size=4, prompts_per_step=2, micro_batch_size=4), **changes)
    return grpo.GRPOConfig(train=train, **options)


def test_grpo_run_logs_every_step_and_writes_a_modal_mixed_folder(sft_run, tmp_path):
    from mmlatent.train import modal_mixed as mm
    config = _grpo(sft_run, tmp_path, beta=0.04, format_weight=0.5, eval_samples=4, train={"eval_every": 2})
    result = grpo.train(config, progress=False)
    steps = result["history"]["train"]
    assert len(steps) == 4
    assert [e["step"] for e in result["history"]["eval"]] == [0, 2, 4]  # the SFT policy's accuracy first
    for key in ("reward", "reward_std", "zero_std_groups", "kl", "clip_ratio", "completion_length", "sketches",
                "tokens_per_s", "peak_memory_bytes"):
        assert all(key in s for s in steps), key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    assert any(s["kl"] > 0 for s in steps[1:])
    model, _, sft, _ = mm.load_run(result["checkpoint"])
    assert sft.name == "g" and sft.num_latents == 9  # the SFT run's config, under the GRPO run's name
    assert (tmp_path / "reward.png").read_bytes()[:4] == b"\x89PNG"
    # the head and the vision tower did not move; the language model did
    before, _, _, _ = mm.load_run(sft_run)
    assert all(torch.equal(a, b) for a, b in zip(model.head.state_dict().values(),
                                                 before.head.state_dict().values()))
    vision = lambda m: m.backbone.vision_tower.state_dict().values()  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(vision(model), vision(before)))
    assert not all(torch.equal(a, b) for a, b in zip(model.vlm.state_dict().values(),
                                                     before.vlm.state_dict().values()))


def test_grpo_resume_is_bit_exact_rollouts_included(sft_run, tmp_path):
    config = _grpo(sft_run, tmp_path / "a", num_iterations=2, train={"max_steps": 4})
    stopped = grpo.train(config, progress=False, until=2)
    assert stopped["checkpoint"].endswith("checkpoint-2")
    resumed = grpo.train(config, progress=False, resume=stopped["checkpoint"])
    whole = grpo.train(_grpo(sft_run, tmp_path / "b", num_iterations=2, train={"max_steps": 4}), progress=False)
    assert [s["reward"] for s in resumed["history"]["train"]] == [s["reward"] for s in whole["history"]["train"]]
    assert [s["loss"] for s in resumed["history"]["train"]] == [s["loss"] for s in whole["history"]["train"]]
    for a, b in zip(resumed["model"].vlm.state_dict().values(), whole["model"].vlm.state_dict().values()):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def cot_run(tmp_path_factory):
    """The text-CoT variant of the SFT run (4 steps: only its mode matters here)."""
    from mmlatent.train import modal_mixed as mm
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMLATENT_BACKEND", "torch")
        out = tmp_path_factory.mktemp("cot")
        config = mm.ModalMixedConfig(name="cot", mode="cot", train={"lr": 0.02, "seed": 0, "progress": False,
                                                                    "output_dir": str(out)}, **dict(SFT, epochs=1))
        mm.train(config, progress=False)
        yield str(out / "final")


def test_a_plain_policy_trains_the_vlm_alone_and_resumes_bit_exact(sft_run, cot_run, tmp_path):
    from mmlatent.train import modal_mixed as mm
    config = _grpo(cot_run, tmp_path / "a", beta=0.04, train={"max_steps": 4})  # a full fine-tune: a frozen copy
    assert config.policy is None
    whole = grpo.train(config, progress=False)
    assert whole["grpo"]["policy"] == "plain"  # the text-CoT run's default
    steps = whole["history"]["train"]
    assert all(s["sketches"] == 0 for s in steps) and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    model, _, sft, _ = mm.load_run(whole["checkpoint"])
    assert sft.mode == "cot"
    stopped = grpo.train(_grpo(cot_run, tmp_path / "b", beta=0.04, train={"max_steps": 4}), progress=False, until=2)
    resumed = grpo.train(_grpo(cot_run, tmp_path / "b", beta=0.04, train={"max_steps": 4}), progress=False,
                         resume=stopped["checkpoint"])
    assert [s["loss"] for s in resumed["history"]["train"]] == [s["loss"] for s in steps]
    for a, b in zip(resumed["model"].vlm.state_dict().values(), whole["model"].vlm.state_dict().values()):
        assert torch.equal(a, b)
    # a sketching run rolled out as a plain policy: text only, its head untouched
    result = grpo.train(_grpo(sft_run, tmp_path / "c", policy="plain", lora={"r": 4}, beta=0.04), progress=False)
    assert all(s["sketches"] == 0 for s in result["history"]["train"])
    before, _, _, _ = mm.load_run(sft_run)
    assert all(torch.equal(a, b) for a, b in zip(result["model"].head.state_dict().values(),
                                                 before.head.state_dict().values()))
    with pytest.raises(ValueError, match="policy: modal_mixed needs a Modal-mixed SFT run"):
        grpo.train(_grpo(cot_run, tmp_path / "d", policy="modal_mixed"), progress=False)


def test_a_reward_of_the_wrong_length_is_refused(sft_run, tmp_path):
    grpo.register_reward("one_short", lambda completions, records: [1.0] * (len(completions) - 1))
    try:
        with pytest.raises(ValueError, match="reward: 'one_short' returned 3 rewards for 4 completions"):
            grpo.train(_grpo(sft_run, tmp_path, reward="one_short"), progress=False)
    finally:
        grpo.REWARDS.pop("one_short")


def test_grpo_config_errors_name_the_key(sft_run):
    for changes, needle in (({"micro_batch_size": 6}, "micro_batch_size: 6 is not a multiple of group_size"),
                            ({"group_size": 1, "micro_batch_size": 1}, "group_size: expected >= 2"),
                            ({"reward": "bleu"}, "reward: expected a registered reward"),
                            ({"loss_type": "ppo"}, "loss_type"),
                            ({"train": {"grad_accum": 2}}, "train.grad_accum: set by the rollout"),
                            ({"policy": "hf"}, "policy: expected one of modal_mixed, plain or null"),
                            ({"num_iterations": 2, "train": {"save_every": 3}}, "train.save_every: 3"),
                            ({"init_from": ""}, "init_from: expected the final/ folder")):
        init_from = changes.pop("init_from", sft_run)
        with pytest.raises(ValueError, match=needle):
            _grpo(init_from, "/tmp/unused", **changes)


def test_cli_trains_grpo_from_a_config(sft_run, tmp_path, capsys):
    import yaml

    from mmlatent import cli
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(dict(name="cli-grpo", method="grpo", init_from=sft_run, group_size=4,
                                        prompts_per_step=2, micro_batch_size=8,
                                        train=dict(lr=1e-3, max_steps=2, seed=0, output_dir=str(tmp_path / "r")))))
    assert cli.main(["train", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cli-grpo: accuracy" in out
    assert (tmp_path / "r" / "final" / "eval.json").is_file() and (tmp_path / "r" / "reward.png").is_file()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "r" / "final"), "--n", "2"]) == 0


def test_the_shipped_grpo_config_loads():
    import os

    from mmlatent.train.methods import load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", "synthetic-grpo.yaml"))
    assert isinstance(config, grpo.GRPOConfig) and config.loss_type == "dapo" and config.beta == 0.0
    assert config.completions_per_step == 64 and config.init_from == "checkpoints/synthetic-modal-mixed/final"
    plain = load_config(os.path.join(root, "configs", "synthetic-grpo-cot.yaml"))
    assert plain.policy is None and plain.init_from == "checkpoints/synthetic-modal-mixed-cot/final"
    from mmlatent.train import modal_mixed as mm
    assert mm.run_method(os.path.join(root, plain.init_from)) == mm.METHOD
