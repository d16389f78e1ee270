"""Modal-mixed CoT (:class:`mmlatent.models.ModalMixedCoT`) on a Qwen2.5-VL: the joint SFT step and batched
generation of text and latent sketches, each against what a user writes without mmlatent, and generation also
against its floor.

- "modal-mixed SFT step": ``ModalMixedCoT.forward`` + backward (gradients zeroed before each step, returned)
  against "naive step": the Hugging Face forward with labels (transformers' loss over the full [B, S, V] logits,
  the latents scattered into ``inputs_embeds``, the conditions read from ``output_hidden_states``), then MAR's
  unfused diffusion loss (the conditions repeated ``batch_mul`` times, noised targets through ``head.forward``,
  ``F.mse_loss`` on the v target), the two losses summed, backward. Both sides draw the diffusion times and noise
  from the same seeded generator in the same order, so they compute the same loss and gradients.
- "modal-mixed generate": ``ModalMixedCoT.generate`` (batched, KV-cached, every sketching row's latent drawn in
  one ``head.sample``) against ``modal_mixed_reference_generate`` (per sample, no cache, a diffusers DDIM
  ``step()`` loop per latent), and against the floor of any batched cached generator: the prefill, the same
  number of cached decode steps of the language model at the whole batch, ``head.sample`` at the batched row
  count of every latent step and the output layer at every text step, and nothing else.

The generated text is forced so that every sample writes exactly ``SKETCHES`` sketches (see
:func:`force_sketches`): the output layer gets a bias that makes START the argmax of every text step whatever the
hidden state, so each row writes START, K latents, END, START, K latents, END (``plan``) and
``max_new_tokens`` ends the run after the last END. Sizes: "tiny" (the smoke test), "default" (CPU, float32),
"gpu" (Qwen2.5-VL-7B's shapes, random weights, LoRA r=64; built only on a CUDA device).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..case import FLOOR_PREFIX, Call, Case, Inputs, Make
from .inputs import cpu_generator

if TYPE_CHECKING:
    from transformers import Qwen2_5_VLForConditionalGeneration

# build(device=, dtype=) -> a Qwen2.5-VL model
Build = Callable[..., "Qwen2_5_VLForConditionalGeneration"]

# the tiny vocabularies' ids (mmlatent.models.tiny): 0 pad, 1 bos, 2 eos, 3 the latent placeholder, 4 / 5 the
# sketch's START / END; text ids from 6 up to the image ids at the top of the vocabulary
PAD_ID, BOS_ID, EOS_ID, LATENT_ID, START_ID, END_ID = 0, 1, 2, 3, 4, 5
FIRST_TEXT_ID = 6
SKETCHES = 2
BATCH_MUL = 4
DDIM_STEPS = 50
# added to START's logit by force_sketches: the other logits of a random output layer over a final-normed hidden
# state (norm sqrt(D)) stay within a few units at every size here, D = 3584 and V = 152064 included
START_BIAS = 1000.0
NAIVE_STEP = "naive step"
REFERENCE = "modal_mixed_reference_generate"
FLOOR = f"{FLOOR_PREFIX}cached decode steps + head.sample"
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"  # q, k, v, o of the language model only


# ---------------------------------------------------------------------------------------------------- models
def _cpu_model(device: Optional[torch.device] = None,
               dtype: Optional[torch.dtype] = None) -> "Qwen2_5_VLForConditionalGeneration":
    from mmlatent.models.tiny import tiny_qwen2_5_vl
    return tiny_qwen2_5_vl(vocab=32000, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512,
                           vision_depth=2, vision_dim=64, patch=4, device=device, dtype=dtype)


def _tiny_model(device: Optional[torch.device] = None,
                dtype: Optional[torch.dtype] = None) -> "Qwen2_5_VLForConditionalGeneration":
    from mmlatent.models.tiny import tiny_qwen2_5_vl
    return tiny_qwen2_5_vl(vocab=500, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, device=device,
                           dtype=dtype)


def _gpu_model(device: Optional[torch.device] = None,
               dtype: Optional[torch.dtype] = None) -> "Qwen2_5_VLForConditionalGeneration":
    """Qwen2.5-VL-7B's shapes with random weights: language model hidden 3584, 28 layers, 28 heads, 4 KV heads,
    MLP 18944, vocabulary 152064 (M-RoPE sections 16/24/24); vision tower 32 layers of width 1280, 16 heads, MLP
    3420, patch 14, merge 2, window 112, full attention in layers 7/15/23/31. Built on the GPU only: at these
    shapes a CPU build is tens of GiB and minutes, and no CPU run measures it."""
    if device is None or torch.device(device).type != "cuda":
        raise RuntimeError(f"the --sizes gpu Modal-mixed rows build Qwen2.5-VL-7B shapes on a CUDA device only; got "
                           f"device {device}")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    vocab = 152064
    text = dict(vocab_size=vocab, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    vision = dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16,
                  in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 4,
                              video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                               dtype=dtype or torch.bfloat16).eval()


def _trainable(vlm: nn.Module, lora_rank: Optional[int]) -> nn.Module:
    """LoRA of ``lora_rank`` on the language model's q, k, v, o (everything else of the VLM frozen), or, without
    LoRA, the language model's layers, final norm and output layer trained (vision tower and token embeddings
    frozen, as IVT-LR's rows train)."""
    if lora_rank:
        import peft
        torch.manual_seed(0)
        return peft.get_peft_model(vlm, peft.LoraConfig(r=lora_rank, lora_alpha=16, lora_dropout=0.0,
                                                        target_modules=LORA_TARGETS))
    from mmlatent.models.backbones import VLMBackbone
    backbone = VLMBackbone(vlm)
    frozen = {id(p) for module in (backbone.vision_tower, backbone.model.get_input_embeddings())
              for p in module.parameters()}
    for p in vlm.parameters():
        p.requires_grad_(id(p) not in frozen)
    return vlm


def _head(hidden: int, width: int, depth: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A LatentDiffusionHead(hidden -> hidden) with every parameter drawn from N(0, 0.02^2): its freshly built
    modulation and output layers are zero, which would make every prediction (and every sampled latent) zero."""
    from mmlatent.models import LatentDiffusionHead
    torch.manual_seed(0)
    head = LatentDiffusionHead(hidden, hidden, width=width, depth=depth)
    generator = cpu_generator(1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return head.to(device=device, dtype=dtype)


def _modal_mixed(vlm: nn.Module, head: nn.Module, K: int) -> nn.Module:
    from mmlatent.models import ModalMixedCoT
    rows = next(r for r in range(int(K ** 0.5), 0, -1) if K % r == 0)  # the most square pooling grid of K cells
    return ModalMixedCoT(vlm, head, start_token_id=START_ID, end_token_id=END_ID, latent_token_id=LATENT_ID,
                         num_latents=K, pool_grid=(rows, K // rows), batch_mul=BATCH_MUL)


def force_sketches(vlm: nn.Module) -> None:
    """Gives the VLM's output layer a bias of ``START_BIAS`` on START (0 elsewhere), so that START is the argmax
    of every text step: a generation run then writes START, K latents, END, START, ... whatever the hidden states
    (the latents, drawn by the head, still depend on them). The output layer's GEMM is unchanged."""
    from mmlatent.models.backbones import VLMBackbone
    lm_head = VLMBackbone(vlm).lm_head
    bias = torch.zeros(lm_head.out_features, device=lm_head.weight.device, dtype=lm_head.weight.dtype)
    bias[START_ID] = START_BIAS
    lm_head.bias = nn.Parameter(bias, requires_grad=False)


def plan(K: int, sketches: int = SKETCHES) -> List[int]:
    """The ids every row of a forced generation run writes: (START, K placeholders, END) ``sketches`` times."""
    return [START_ID, *[LATENT_ID] * K, END_ID] * sketches


# ----------------------------------------------------------------------------------------------------- batches
def _text(generator: torch.Generator, n: int, vocab: int) -> List[int]:
    return torch.randint(FIRST_TEXT_ID, vocab - 4, (n,), generator=generator).tolist()


def sketch_batch(vlm: nn.Module, *, image_hw: Sequence[int], text_runs: Sequence[Sequence[int]], K: int,
                 seed: int = 0) -> Dict[str, torch.Tensor]:
    """A training batch in the processor's layout, one prompt image per sample: sample b is bos, vision start,
    the image's placeholders, vision end, ``text_runs[b][0]`` random text tokens (the prompt), then for each later
    run a sketch (START, K placeholders, END) followed by that many random text tokens, then eos. Rows of
    different lengths are left-padded. Labels: every token after the prompt (text, START, END, eos), -100 on the
    prompt, the placeholders and the padding. ``latent_targets`` [N_seg, K, D] float32 N(0, 1).

    Returns input_ids, attention_mask, labels, pixel_values, image_grid_thw, latent_targets (on the CPU)."""
    from mmlatent.models.backbones import VLMBackbone
    backbone = VLMBackbone(vlm)
    config = backbone.config
    vocab, D = backbone.text_config.vocab_size, backbone.text_config.hidden_size
    generator = cpu_generator(seed)
    n_image = backbone.tokens_per_image(image_hw)
    rows, labels = [], []
    for runs in text_runs:
        prompt = [BOS_ID, config.vision_start_token_id, *[config.image_token_id] * n_image,
                  config.vision_end_token_id, *_text(generator, runs[0], vocab)]
        answer = []
        for run in runs[1:]:
            answer += [START_ID, *[LATENT_ID] * K, END_ID, *_text(generator, run, vocab)]
        answer.append(EOS_ID)
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + [-100 if t == LATENT_ID else t for t in answer])
    width = max(map(len, rows))
    pad = [width - len(r) for r in rows]
    batch = dict(input_ids=torch.tensor([[PAD_ID] * p + r for p, r in zip(pad, rows)]),
                 attention_mask=torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pad, rows)]),
                 labels=torch.tensor([[-100] * p + r for p, r in zip(pad, labels)]))
    batch.update(backbone.random_pixel_values([image_hw] * len(rows), generator))
    segments = sum(len(runs) - 1 for runs in text_runs)
    batch["latent_targets"] = torch.randn(segments, K, D, generator=generator)
    return batch


def prompt_batch(vlm: nn.Module, *, image_hw: Sequence[int], prompt_lengths: Sequence[int],
                 seed: int = 0) -> Dict[str, torch.Tensor]:
    """Left-padded generation prompts, one image each: bos, vision start, the image's placeholders, vision end,
    ``prompt_lengths[b]`` random text tokens. Returns input_ids, attention_mask, pixel_values, image_grid_thw."""
    batch = sketch_batch(vlm, image_hw=image_hw, text_runs=[[n] for n in prompt_lengths], K=1, seed=seed)
    # every left-padded row ends with the eos sketch_batch closes it with: without that column, with its text
    return dict(input_ids=batch["input_ids"][:, :-1], attention_mask=batch["attention_mask"][:, :-1],
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])


def _to(batch: Dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------- SFT step
def _sft_inputs(build: Build, image_hw: Sequence[int], image_tokens: int, text_runs: Sequence[Sequence[int]],
                K: int, width: int, depth: int, lora_rank: Optional[int]) -> Make:
    """model: ModalMixedCoT (the trainable parameters in ``params``), batch: its forward's tensors, base: the
    unwrapped Hugging Face model (LoRA layers in place), rows / cols: every placeholder (row-major, the targets'
    order), seed: the diffusion loss's generator seed."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        from mmlatent.models.backbones import VLMBackbone
        vlm = _trainable(build(device=device, dtype=dtype), lora_rank)
        backbone = VLMBackbone(vlm)
        if backbone.tokens_per_image(image_hw) != image_tokens:
            raise ValueError(f"image_tokens: the model gives a {tuple(image_hw)} image "
                             f"{backbone.tokens_per_image(image_hw)} tokens, the case's label says {image_tokens}")
        hidden = backbone.text_config.hidden_size
        model = _modal_mixed(vlm, _head(hidden, width, depth, device, dtype), K)
        model.train()
        batch = _to(sketch_batch(vlm, image_hw=image_hw, text_runs=text_runs, K=K), device, dtype)
        rows, cols = (batch["input_ids"] == LATENT_ID).nonzero(as_tuple=True)
        return dict(model=model, batch=batch, base=backbone.model, rows=rows, cols=cols, seed=0,
                    params=[p for p in model.parameters() if p.requires_grad])
    return make


def _loss_generator(a: Inputs) -> torch.Generator:
    return torch.Generator(device=a["batch"]["input_ids"].device).manual_seed(a["seed"])


def _ours_sft(a: Inputs) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(loss, gradients of the trainable parameters) of ModalMixedCoT's forward + backward."""
    model = a["model"]
    model.zero_grad(set_to_none=True)
    loss = model(**a["batch"], generator=_loss_generator(a)).loss
    loss.backward()
    return loss.detach(), [p.grad for p in a["params"]]


def _naive_sft(a: Inputs) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """What a user writes with transformers and a MAR-style head loss: the VLM's forward with labels (the full
    logits), the latents scattered into the input embeddings, then the diffusion loss with the conditions
    repeated batch_mul times, written out; the same draws as LatentDiffusionHead.loss."""
    model, base, batch = a["model"], a["base"], a["batch"]
    head, bm = model.head, model.batch_mul
    model.zero_grad(set_to_none=True)
    ids, rows, cols = batch["input_ids"], a["rows"], a["cols"]
    targets = batch["latent_targets"].reshape(-1, batch["latent_targets"].shape[-1])
    embeds = base.get_input_embeddings()(ids).index_put((rows, cols), targets.to(base.dtype))
    out = base(input_ids=ids, inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
               pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
               mm_token_type_ids=(ids == base.config.image_token_id).int(), output_hidden_states=True)
    cond = out.hidden_states[-1][rows, cols - 1]  # the final-normed hidden state before each placeholder
    generator = _loss_generator(a)
    n = targets.shape[0] * bm
    t = torch.randint(0, head.num_train_timesteps, (n,), generator=generator, device=ids.device)
    x0 = targets.repeat(bm, 1)
    noise = torch.randn(x0.shape, generator=generator, device=ids.device, dtype=x0.dtype)
    alpha = head.alphas_cumprod[t][:, None].to(x0.dtype)  # in the targets' dtype, as the head's loss forms x_t
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    v = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    prediction = head(x_t, t, cond.repeat(bm, 1))
    loss = out.loss + model.diffusion_weight * F.mse_loss(prediction.float(), v.float())
    loss.backward()
    return loss.detach(), [p.grad for p in a["params"]]


def sft_case(build: Build, shape: str, image_hw: Sequence[int], image_tokens: int,
             text_runs: Sequence[Sequence[int]], K: int, width: int, depth: int = 3, lora_rank: Optional[int] = None,
             repeats: Optional[int] = None) -> Case:
    """One Modal-mixed SFT step (forward + backward, gradients returned) against the naive step.

    Args:
        build: ``build(device=, dtype=)`` -> a Qwen2.5-VL model.
        shape: the model's label in the table.
        image_hw: the one prompt image per sample, (height, width) pixels; image_tokens: the tokens the model
            gives it (for the label; ``make`` checks it against the model).
        text_runs: per sample, the prompt's text length then the text after each sketch (one sketch per later
            entry); see :func:`sketch_batch`.
        K: latents per sketch. width, depth: the diffusion head's.
        lora_rank: LoRA on q, k, v, o (None: the language model's layers and output layer trained).
    """
    # bos, vision start / end, eos, the texts, the sketches, and the image tokens of one (t = 1) image
    tokens = max(4 + sum(runs) + (len(runs) - 1) * (K + 2) for runs in text_runs) + image_tokens
    sketches = "/".join(map(str, sorted({len(runs) - 1 for runs in text_runs})))
    label = (f"{shape} B{len(text_runs)} x {tokens} tokens ({image_tokens} image), {sketches} sketches x {K} "
             f"latents, head w{width} d{depth}, batch_mul {BATCH_MUL}" + (f", LoRA r{lora_rank}" if lora_rank
                                                                          else ""))
    return Case("modal-mixed SFT step", label,
                _sft_inputs(build, image_hw, image_tokens, text_runs, K, width, depth, lora_rank),
                _ours_sft, {NAIVE_STEP: _naive_sft}, repeats=repeats)


# ------------------------------------------------------------------------------------------------- generation
def _generate_inputs(build: Build, image_hw: Sequence[int], prompt_lengths: Sequence[int], K: int, width: int,
                     depth: int, steps: int) -> Make:
    """model: ModalMixedCoT in eval mode with its output layer forced (force_sketches), prompts: the generate
    keywords' tensors, positions: the prompts' M-RoPE positions (the floor's), settings: the generate keywords."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        from mmlatent.models.backbones import VLMBackbone
        from mmlatent.models.modal_mixed import mrope_positions
        vlm = build(device=device, dtype=dtype)
        force_sketches(vlm)
        hidden = VLMBackbone(vlm).text_config.hidden_size
        model = _modal_mixed(vlm, _head(hidden, width, depth, device, dtype), K).eval()
        prompts = _to(prompt_batch(vlm, image_hw=image_hw, prompt_lengths=prompt_lengths), device, dtype)
        new = len(plan(K))
        settings = dict(max_new_tokens=new, steps=steps, schedule="ddim", temperature=0.0, do_sample=False,
                        eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        positions, _ = mrope_positions(vlm, prompts["input_ids"], prompts["attention_mask"],
                                       prompts["image_grid_thw"])
        return dict(model=model, prompts=prompts, settings=settings, positions=positions, K=K)
    return make


def _ours_generate(a: Inputs):
    return a["model"].generate(**a["prompts"], **a["settings"])


def _reference_generate(a: Inputs):
    from mmlatent.models import modal_mixed_reference_generate
    return modal_mixed_reference_generate(a["model"], **a["prompts"], **a["settings"])


@torch.no_grad()
def _floor_generate(a: Inputs) -> torch.Tensor:
    """The work any batched, cached generator of this run must do, and nothing else: the prompts' embeddings
    (vision tower included) and prefill, then ``max_new_tokens - 1`` cached decode steps of the language model at
    the whole batch (the mask grown by one column per step), ``head.sample`` over the batch's rows at every latent
    step of the plan (the run's batched row counts: every row sketches in the same steps) and the output layer's
    argmax at every text step. The decode inputs are one fixed embedding: no bookkeeping, no feeding back."""
    from transformers import DynamicCache

    from mmlatent.models import cache_kwargs
    model, prompts, settings = a["model"], a["prompts"], a["settings"]
    backbone, head = model.backbone, model.head
    lm = backbone.language_model
    ids, mask = prompts["input_ids"], prompts["attention_mask"].to(torch.long)
    B = ids.shape[0]
    schedule = head.schedule(settings["schedule"], settings["steps"])
    embeds = backbone.input_embeddings(ids, prompts["pixel_values"], prompts["image_grid_thw"])
    cache = DynamicCache(config=backbone.text_config)
    positions = a["positions"]
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                **cache_kwargs(lm, cache)).last_hidden_state[:, -1]
    next_position = positions.amax(dim=(0, 2)) + 1
    step_embeds = backbone.embed_tokens(torch.full((B, 1), START_ID, dtype=torch.long, device=ids.device))
    steps = plan(a["K"])
    for step, token in enumerate(steps):
        if token == START_ID:  # a text step
            out = backbone.logits(hidden).argmax(dim=-1)
        elif token == LATENT_ID:
            out = head.sample(hidden, schedule=schedule, temperature=settings["temperature"])
        if step == len(steps) - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        hidden = lm(inputs_embeds=step_embeds, attention_mask=mask,
                    position_ids=next_position.view(1, B, 1).expand(3, B, 1), use_cache=True,
                    **cache_kwargs(lm, cache)).last_hidden_state[:, -1]
        next_position = next_position + 1
    return out


def generate_case(build: Build, shape: str, image_hw: Sequence[int], prompt_lengths: Sequence[int], K: int,
                  width: int, depth: int = 3, steps: int = DDIM_STEPS, repeats: Optional[int] = None) -> Case:
    """Greedy generation (temperature 0: the head starts from x_T = 0, DDIM with eta 0) of ``SKETCHES`` forced
    sketches of ``K`` latents per sample, ``steps`` DDIM steps per latent, against the reference loop and the
    floor. ``prompt_lengths``: the prompts' text tokens per sample, after one image of ``image_hw`` pixels."""
    label = (f"{shape} B{len(prompt_lengths)}, {SKETCHES} sketches x {K} latents, {steps} DDIM steps, head "
             f"w{width} d{depth}")
    # the floor first: measured right after mmlatent, so that on a shared machine the two closest rows see the
    # same load (the reference's minutes come after)
    baselines: Dict[str, Call] = {FLOOR: _floor_generate, REFERENCE: _reference_generate}
    return Case("modal-mixed generate", label, _generate_inputs(build, image_hw, prompt_lengths, K, width, depth,
                                                                steps),
                _ours_generate, baselines, repeats=repeats)


# ---------------------------------------------------------------------------------------------------- the sets
def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":
        shape = "tiny Qwen2.5-VL h32 L2 V500"
        return [sft_case(_tiny_model, shape, (32, 32), 16, [[6, 5, 4], [4, 3, 5]], K=4, width=32, depth=2),
                generate_case(_tiny_model, shape, (32, 32), [5, 3, 7], K=4, width=32, depth=2, steps=5)]
    if sizes == "gpu":  # 256 image tokens per sample (448 x 448 pixels at patch 14, merge 2)
        shape = "Qwen2.5-VL-7B shapes bf16"
        return [sft_case(_gpu_model, shape, (448, 448), 256, [[400, 400, 372], [300, 500, 372]], K=32, width=1024,
                         lora_rank=64, repeats=5),
                generate_case(_gpu_model, shape, (448, 448), [24, 40, 31, 36, 28, 33, 38, 26], K=32, width=1024,
                              repeats=3)]
    # 256 image tokens per sample (128 x 128 pixels at patch 4, merge 2): 2 x 1500 tokens in all
    shape = "Qwen2.5-VL h256 L4 H4 KV2 V32000"
    return [sft_case(_cpu_model, shape, (128, 128), 256, [[400, 400, 372], [300, 500, 372]], K=32, width=256),
            generate_case(_cpu_model, shape, (64, 64), [24, 40, 31, 36, 28, 33, 38, 26], K=32, width=256,
                          repeats=3)]


__all__ = ["sft_case", "generate_case", "sketch_batch", "prompt_batch", "force_sketches", "plan", "cases",
           "NAIVE_STEP", "REFERENCE", "FLOOR", "SKETCHES", "START_BIAS"]
