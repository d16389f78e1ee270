"""IVTLR.generate with generation options: the tokens of transformers' generate on the same (assembled) inputs,
greedy and sampled under one seed, stop strings, EOS, merged configs, refused modes and unknown keywords."""
import pytest
import torch

from mmlatent.models import IVTLR, ivtlr_reference
from mmlatent.models.ivtlr.generation import GREEDY_OPTIONS
from mmlatent.models.tiny import LATENT_ID, synthetic_batch, tiny_qwen2_vl

IMAGES = [[(16, 16), (8, 16)], [(16, 24)]]
SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)


def batch_of(model, num_latents=(2, 2), seed=0, with_answer=True, latent_id=LATENT_ID):
    return synthetic_batch(model, images=IMAGES, prompt_lengths=[3, 6], answer_lengths=[4, 2],
                           num_latents=list(num_latents), seed=seed, with_answer=with_answer, latent_id=latent_id)


def prompt_of(model, num_latents=(2, 2), seed=0, latent_id=LATENT_ID):
    batch = batch_of(model, num_latents, seed, with_answer=False, latent_id=latent_id)
    del batch["labels"]
    return batch


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
