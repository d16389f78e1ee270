"""IVT-LR wrappers as standard Hugging Face / PEFT folders (save_pretrained / from_pretrained give identical logits,
also through transformers' and PEFT's own loaders), and IVTLR.generate with generation options: the tokens of
transformers' generate on the same (assembled) inputs, greedy and sampled under one seed, stop strings, EOS,
merged configs, refused modes and unknown keywords."""
import json
import os

import pytest
import torch

from mmlatent.models import IVTLR, ivtlr_reference
from mmlatent.models.ivtlr.generation import GREEDY_OPTIONS
from mmlatent.models.tiny import LATENT_ID, synthetic_batch, tiny_chameleon, tiny_qwen2_vl
from mmlatent.train.checkpoint import CheckpointError

peft = pytest.importorskip("peft")
IMAGES = [[(16, 16), (8, 16)], [(16, 24)]]
SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
LORA_TARGETS = r".*language_model.*\.(q_proj|v_proj|up_proj)"


def batch_of(model, num_latents=(2, 2), seed=0, with_answer=True, latent_id=LATENT_ID):
    return synthetic_batch(model, images=IMAGES, prompt_lengths=[3, 6], answer_lengths=[4, 2],
                           num_latents=list(num_latents), seed=seed, with_answer=with_answer, latent_id=latent_id)


def prompt_of(model, num_latents=(2, 2), seed=0, latent_id=LATENT_ID):
    batch = batch_of(model, num_latents, seed, with_answer=False, latent_id=latent_id)
    del batch["labels"]
    return batch


@torch.no_grad()
def outputs(wrapper, batch):
    out = wrapper(**batch, return_logits=True)
    return out.logits, out.loss


def assert_same_outputs(a, b, batch):
    (logits_a, loss_a), (logits_b, loss_b) = outputs(a, batch), outputs(b, batch)
    assert torch.equal(logits_a, logits_b) and torch.equal(loss_a, loss_b)


def safetensors_keys(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return set(f.keys())


# -------------------------------------------------------------------------------------------- saving, loading

def test_full_model_round_trip_is_a_standard_folder(tmp_path):
    from transformers import AutoModelForImageTextToText
    model = tiny_qwen2_vl(seed=1, **SMALL)
    wrapper = IVTLR(model, LATENT_ID, k=2, position_mode="mrope")
    batch = batch_of(model)
    expected = outputs(wrapper, batch)
    folder = tmp_path / "ivtlr"
    assert wrapper.save_pretrained(str(folder)) == str(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "ivtlr_config.json",
                                          "manifest.json", "model.safetensors"]
    settings = json.loads((folder / "ivtlr_config.json").read_text())
    assert (settings["latent_token_id"], settings["k"], settings["position_mode"], settings["version"]) == (
        LATENT_ID, 2, "mrope", 1)
    # the model's own key names, as its save_pretrained writes them (no "vlm." prefix of the wrapper's state dict)
    model.save_pretrained(tmp_path / "direct")
    keys = safetensors_keys(folder / "model.safetensors")
    assert keys == safetensors_keys(tmp_path / "direct" / "model.safetensors")
    assert not any(k.startswith("vlm.") for k in keys)
    loaded = IVTLR.from_pretrained(str(folder))
    assert (loaded.latent_token_id, loaded.k, loaded.position_mode) == (LATENT_ID, 2, "mrope")
    got = outputs(loaded, batch)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    plain = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(plain) is type(model)
    assert_same_outputs(IVTLR(plain, LATENT_ID, k=2, position_mode="mrope"), wrapper, batch)


def test_chameleon_round_trip(tmp_path):
    model = tiny_chameleon(seed=2, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    wrapper = IVTLR(model, LATENT_ID, k=4)
    batch = synthetic_batch(model, images=[[(32, 32)], [(32, 32)]], prompt_lengths=[3, 6], answer_lengths=[4, 2],
                            num_latents=[2, 2])
    wrapper.save_pretrained(str(tmp_path / "chameleon"))
    loaded = IVTLR.from_pretrained(str(tmp_path / "chameleon"))
    assert type(loaded.vlm) is type(model) and loaded.k == 4
    assert_same_outputs(loaded, wrapper, batch)


def test_lora_round_trip_with_a_base_built_from_a_config(tmp_path):
    """A tiny base has no checkpoint on disk: it is saved beside the adapter, in base/, which the adapter names."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    base = tiny_qwen2_vl(seed=3, **SMALL)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                     target_modules=LORA_TARGETS))
    wrapper = IVTLR(lora, LATENT_ID, k=2)
    batch = batch_of(base)
    expected = outputs(wrapper, batch)
    folder = tmp_path / "adapter"
    wrapper.save_pretrained(str(folder))
    assert {"adapter_config.json", "adapter_model.safetensors", "ivtlr_config.json", "manifest.json",
            "base"} <= set(os.listdir(folder))
    assert sorted(os.listdir(folder / "base")) == ["config.json", "generation_config.json", "model.safetensors"]
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert "base/model.safetensors" in manifest and "adapter_model.safetensors" in manifest
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    adapter_keys = safetensors_keys(folder / "adapter_model.safetensors")
    assert adapter_keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in adapter_keys)
    assert not any("lora" in k for k in safetensors_keys(folder / "base" / "model.safetensors"))
    loaded = IVTLR.from_pretrained(str(folder))
    assert isinstance(loaded.vlm, PeftModel)
    got = outputs(loaded, batch)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # PEFT's own loader, on transformers' own load of the base
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(folder / "base"), folder)
    assert_same_outputs(IVTLR(plain.eval(), LATENT_ID, k=2), wrapper, batch)


def test_lora_with_latent_rows_added_to_a_local_base(tmp_path):
    """The base is a checkpoint folder with a smaller vocabulary: the new rows travel in the adapter file (PEFT's
    save_embedding_layers), the base is not copied, and loading resizes the base before the adapter goes in."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    tiny_qwen2_vl(seed=4, **SMALL).save_pretrained(tmp_path / "base")
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "base")
    latent = base.get_input_embeddings().weight.shape[0]  # the first added row
    base.resize_token_embeddings(latent + 3)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                     target_modules=LORA_TARGETS))
    wrapper = IVTLR(lora, latent, k=2)
    batch = batch_of(base, latent_id=latent)
    expected = outputs(wrapper, batch)
    folder = tmp_path / "adapter"
    wrapper.save_pretrained(str(folder))
    assert "base" not in os.listdir(folder)
    assert json.loads((folder / "ivtlr_config.json").read_text())["vocab_size"] == latent + 3
    keys = safetensors_keys(folder / "adapter_model.safetensors")
    assert any(k.endswith("embed_tokens.weight") for k in keys) and any(k.endswith("lm_head.weight") for k in keys)
    loaded = IVTLR.from_pretrained(str(folder))  # the base from adapter_config's base_model_name_or_path
    got = outputs(loaded, batch)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    fresh = AutoModelForImageTextToText.from_pretrained(tmp_path / "base")
    fresh.resize_token_embeddings(latent + 3)
    plain = PeftModel.from_pretrained(fresh, folder)
    assert_same_outputs(IVTLR(plain.eval(), latent, k=2), wrapper, batch)
    given = IVTLR.from_pretrained(str(folder), base_model=AutoModelForImageTextToText.from_pretrained(
        tmp_path / "base"))  # a base module passed in is resized too
    assert_same_outputs(given, wrapper, batch)


def test_a_missing_or_corrupt_file_is_refused_naming_it(tmp_path):
    base = tiny_qwen2_vl(seed=3, **SMALL)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=LORA_TARGETS))
    IVTLR(lora, LATENT_ID, k=2).save_pretrained(str(tmp_path / "adapter"))
    os.remove(tmp_path / "adapter" / "base" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"base/model\.safetensors: listed in manifest\.json but missing"):
        IVTLR.from_pretrained(str(tmp_path / "adapter"))
    IVTLR(tiny_qwen2_vl(**SMALL), LATENT_ID, k=2).save_pretrained(str(tmp_path / "full"))
    weights = tmp_path / "full" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: content differs from the manifest"):
        IVTLR.from_pretrained(str(tmp_path / "full"))
    os.remove(tmp_path / "full" / "manifest.json")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        IVTLR.from_pretrained(str(tmp_path / "full"))
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        IVTLR.from_pretrained(str(tmp_path / "absent"))


def test_save_replaces_only_a_new_empty_or_checkpoint_folder(tmp_path):
    wrapper = IVTLR(tiny_qwen2_vl(**SMALL), LATENT_ID, k=2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="directory: .*mine holds files but no manifest.json"):
        wrapper.save_pretrained(str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    wrapper.save_pretrained(str(tmp_path / "ckpt"))
    IVTLR(tiny_qwen2_vl(seed=5, **SMALL), LATENT_ID, k=3).save_pretrained(str(tmp_path / "ckpt"))  # replaced whole
    assert IVTLR.from_pretrained(str(tmp_path / "ckpt")).k == 3 and sorted(os.listdir(tmp_path)) == ["ckpt", "mine"]


def test_a_shape_that_differs_names_the_tensor(tmp_path):
    from mmlatent.train.checkpoint import write_manifest
    folder = tmp_path / "full"
    IVTLR(tiny_qwen2_vl(**SMALL), LATENT_ID, k=2).save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    write_manifest(str(folder))  # a deliberate edit, re-hashed
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor \S*mlp\.\w+_proj\.weight has shape "
                                              r"\[\d+, \d+\] in the checkpoint but \[\d+, \d+\] in the model"):
        IVTLR.from_pretrained(str(folder))


# ------------------------------------------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_vl(seed=1)


def hf_tokens(vlm, inputs, **options):
    """transformers' own generate on the same inputs; the new tokens."""
    return vlm.generate(**inputs, **options)[:, inputs["input_ids"].shape[1]:]


OPTIONS = [dict(max_new_tokens=8),
           dict(max_new_tokens=8, repetition_penalty=1.5, no_repeat_ngram_size=2),
           dict(max_new_tokens=10, do_sample=True),
           dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3),
           dict(max_new_tokens=10, do_sample=True, temperature=1.3, min_p=0.05, typical_p=0.95),
           dict(max_new_tokens=10, do_sample=True, top_k=0, epsilon_cutoff=3e-3, suppress_tokens=[7, 8])]


@pytest.mark.parametrize("options", OPTIONS, ids=[",".join(o) for o in OPTIONS])
def test_generate_without_latents_is_hf_generate_on_the_prompt(model, options):
    """No latent token: the assembled sequence is the prompt; with the model's own positions (mrope) IVTLR decodes
    what transformers' generate decodes from input_ids, pixels and image grids."""
    prompt = prompt_of(model, num_latents=(0, 0))
    wrapper = IVTLR(model, LATENT_ID, k=2, position_mode="mrope")
    torch.manual_seed(0)
    ours = wrapper.generate(**prompt, **options)
    torch.manual_seed(0)
    theirs = hf_tokens(model, dict(prompt, mm_token_type_ids=(prompt["input_ids"] == model.config.image_token_id)
                                   .int()), **options)
    assert ours.dtype == torch.int64 and torch.equal(ours, theirs)


@pytest.mark.parametrize("mode", ["linear", "mrope"])
@pytest.mark.parametrize("options", OPTIONS, ids=[",".join(o) for o in OPTIONS])
def test_generate_after_latent_steps_is_hf_generate_on_the_assembled_prompt(model, mode, options):
    """With latent steps: transformers' generate on the assembled embeddings, their ids, mask and positions."""
    prompt = prompt_of(model, num_latents=(2, 2), seed=3)
    wrapper = IVTLR(model, LATENT_ID, k=2, position_mode=mode)
    torch.manual_seed(1)
    ours = wrapper.generate(**prompt, **options)
    assembled = wrapper.assembled_prompt(**prompt)
    assert assembled["input_ids"].shape[1] == prompt["input_ids"].shape[1] + 2 * 2
    torch.manual_seed(1)
    assert torch.equal(ours, hf_tokens(model, assembled, **options))
    torch.manual_seed(1)
    assert torch.equal(ours, ivtlr_reference(model, LATENT_ID, k=2, position_mode=mode).generate(**prompt,
                                                                                                 **options))


@pytest.mark.parametrize("num_latents", [(0, 0), (2, 2)])
def test_chameleon_generate_never_picks_the_image_codes_transformers_suppresses(num_latents):
    """Chameleon's forward sets its image codes' logits to the minimum: decoding over the hidden states does the
    same, so greedy decoding equals transformers' generate on the assembled prompt."""
    vlm = tiny_chameleon(seed=2)
    prompt = synthetic_batch(vlm, images=[[(32, 32)], [(32, 32)]], prompt_lengths=[3, 6], answer_lengths=[0, 0],
                             num_latents=list(num_latents), seed=4, with_answer=False)
    del prompt["labels"]
    wrapper = IVTLR(vlm, LATENT_ID, k=2)
    suppressed = torch.tensor(wrapper.backbone.suppressed_token_ids())
    first = wrapper.generate(**prompt, max_new_tokens=1, eos_token_id=-1)[0, 0]
    with torch.no_grad():  # an image code whose raw logit beats the token greedy decoding picks first
        vlm.get_output_embeddings().weight[suppressed[0]] = 3 * vlm.get_output_embeddings().weight[first]
    ours = wrapper.generate(**prompt, max_new_tokens=12, eos_token_id=-1)
    assert torch.equal(ours, hf_tokens(vlm, wrapper.assembled_prompt(**prompt), max_new_tokens=12, eos_token_id=-1))
    assert not bool(torch.isin(ours, suppressed).any())


def test_eos_ids_stop_rows_and_pad_them_as_hf_does(model):
    prompt = prompt_of(model, num_latents=(1, 1), seed=2)
    wrapper = IVTLR(model, LATENT_ID, k=2)
    free = wrapper.generate(**prompt, max_new_tokens=8, eos_token_id=-1)  # never stops early
    assert free.shape == (2, 8)
    eos = int(free[0, 2])
    assembled = wrapper.assembled_prompt(**prompt)
    for eos_ids in (eos, [eos, int(free[1, 3])]):
        ours = wrapper.generate(**prompt, max_new_tokens=8, eos_token_id=eos_ids, pad_token_id=0)
        assert torch.equal(ours, hf_tokens(model, assembled, max_new_tokens=8, eos_token_id=eos_ids, pad_token_id=0))
        first = int((ours[0] == eos).nonzero()[0])
        assert first <= 2 and bool((ours[0, first + 1:] == 0).all())
    both = wrapper.generate(**prompt, max_new_tokens=8, eos_token_id=[int(free[0, 0]), int(free[1, 0])])
    assert both.shape == (2, 1)  # every row stopped at its first token: no further step


def test_stop_strings_stop_as_hf_does(model):
    """stop_strings with the tokenizer they are matched with (transformers' StopStringCriteria, which probes the
    vocabulary with the text "abcdef"); mmlatent's own tokenizers are taken too."""
    from mmlatent.data.tokenizer import WordTokenizer
    words = WordTokenizer(["abcdef"] + [f"w{i}" for i in range(244)])
    assert len(words) == model.config.text_config.vocab_size
    prompt = prompt_of(model, num_latents=(2, 2), seed=3)
    wrapper = IVTLR(model, LATENT_ID, k=2)
    free = wrapper.generate(**prompt, max_new_tokens=10, eos_token_id=-1)
    stop = words.decode(free[1, 3:5].tolist())  # two words, e.g. "w12 w40"
    ours = wrapper.generate(**prompt, max_new_tokens=10, eos_token_id=-1, stop_strings=stop, tokenizer=words)
    theirs = hf_tokens(model, wrapper.assembled_prompt(**prompt), max_new_tokens=10, eos_token_id=-1,
                       stop_strings=stop, tokenizer=words.to_hf())
    assert torch.equal(ours, theirs)
    # row 1 stops with the token that completes the stop string, and is padded while the other row goes on
    assert torch.equal(ours[1, :5], free[1, :5]) and bool((ours[1, 5:] == 0).all())
    with pytest.raises(ValueError, match="tokenizer: required with stop_strings"):
        wrapper.generate(**prompt, max_new_tokens=4, stop_strings="w1")
    with pytest.raises(ValueError, match="tokenizer: transformers' stop-string matching cannot read"):
        wrapper.generate(**prompt, max_new_tokens=4, stop_strings="w1", tokenizer=WordTokenizer(
            [f"w{i}" for i in range(245)]))


def test_generation_config_merges_as_hf_does():
    """The model's generation_config fills what the caller's GenerationConfig leaves unset; keywords win over
    both; nothing set anywhere is transformers' default (greedy, 20 new tokens)."""
    from transformers import GenerationConfig
    model = tiny_qwen2_vl(seed=2, **SMALL)
    prompt = prompt_of(model, num_latents=(1, 1), seed=4)
    wrapper = IVTLR(model, LATENT_ID, k=2)
    assembled = wrapper.assembled_prompt(**prompt)
    greedy = wrapper.generate(**prompt, eos_token_id=-1)
    assert greedy.shape == (2, 20)
    model.generation_config.max_new_tokens = 5
    model.generation_config.repetition_penalty = 2.0
    model.generation_config.do_sample = True
    # what evaluation passes: plain greedy decoding whatever the checkpoint's generation_config says
    assert torch.equal(wrapper.generate(**prompt, **GREEDY_OPTIONS, max_new_tokens=20, eos_token_id=-1), greedy)
    model.generation_config.do_sample = None
    cases = [({}, 5), (dict(generation_config=GenerationConfig(max_new_tokens=7)), 7),
             (dict(generation_config=GenerationConfig(max_new_tokens=7), max_new_tokens=3), 3),
             (dict(generation_config=GenerationConfig(do_sample=True, top_k=5)), 5)]
    for options, length in cases:
        torch.manual_seed(0)
        ours = wrapper.generate(**prompt, eos_token_id=-1, **options)
        torch.manual_seed(0)
        assert ours.shape == (2, length) and torch.equal(ours, hf_tokens(model, assembled, eos_token_id=-1,
                                                                         **options)), options


def test_custom_processors_and_criteria_join_the_built_ones(model):
    from transformers import (LogitsProcessorList, MaxLengthCriteria, StoppingCriteriaList,
                              SuppressTokensLogitsProcessor)
    prompt = prompt_of(model, num_latents=(1, 1), seed=5)
    wrapper = IVTLR(model, LATENT_ID, k=2)
    free = wrapper.generate(**prompt, max_new_tokens=6, eos_token_id=-1)
    banned = sorted(set(free[:, 0].tolist()))
    extra = dict(logits_processor=LogitsProcessorList([SuppressTokensLogitsProcessor(banned)]),
                 stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(prompt["input_ids"].shape[1] + 2 * 1 + 4)]))
    ours = wrapper.generate(**prompt, max_new_tokens=6, eos_token_id=-1, **extra)
    assert ours.shape == (2, 4) and not any(t in banned for t in ours[:, 0].tolist())
    assert torch.equal(ours, hf_tokens(model, wrapper.assembled_prompt(**prompt), max_new_tokens=6, eos_token_id=-1,
                                       **extra))


def test_generate_refuses_what_it_does_not_do_naming_it(model):
    from transformers import GenerationConfig
    prompt = prompt_of(model, num_latents=(1, 1))
    wrapper = IVTLR(model, LATENT_ID, k=2)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['max_tokens', 'sample'\]"):
        wrapper.generate(**prompt, max_tokens=3, sample=True)
    with pytest.raises(ValueError, match=r"num_beams: beam search \(num_beams=4\) is not supported"):
        wrapper.generate(**prompt, num_beams=4)
    with pytest.raises(ValueError, match="num_beams: beam search"):
        wrapper.generate(**prompt, generation_config=GenerationConfig(num_beams=2))
    with pytest.raises(ValueError, match="assistant_model: assisted decoding"):
        wrapper.generate(**prompt, assistant_model=model)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens: assisted decoding"):
        wrapper.generate(**prompt, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="num_return_sequences"):
        wrapper.generate(**prompt, num_return_sequences=2, do_sample=True)
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        wrapper.generate(**prompt, return_dict_in_generate=True)
    with pytest.raises(TypeError, match="generation_config: expected a transformers.GenerationConfig, got dict"):
        wrapper.generate(**prompt, generation_config={"max_new_tokens": 3})
    with pytest.raises(ValueError, match="max_new_tokens: expected a positive int, got 0"):
        wrapper.generate(**prompt, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_length: 5 leaves no new token"):
        wrapper.generate(**prompt, max_length=5)
    with pytest.raises(ValueError, match="temperature"):
        wrapper.generate(**prompt, do_sample=True, temperature=0.0)
    # greedy decoding ignores the sampling options, as transformers does
    assert torch.equal(wrapper.generate(**prompt, max_new_tokens=3, temperature=0.5, top_k=3),
                       wrapper.generate(**prompt, max_new_tokens=3))
