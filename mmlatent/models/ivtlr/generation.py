"""The options of ``IVTLR.generate`` as Hugging Face ``generate`` takes them, decoded as it decodes them.

``generate(..., generation_config=None, **options)`` merges its settings as ``transformers`` does: a copy of the
caller's ``GenerationConfig`` (or an empty one), then every value still unset taken from the model's own
``generation_config``, then transformers' global defaults (greedy, 20 new tokens, ``top_k=50`` when sampling), and
the keyword ``options`` last, over all of them. The logits processors and stopping criteria are transformers' own
public classes, built from the merged config in the order ``GenerationMixin`` builds them, and the loop picks each
token as ``GenerationMixin._sample`` does (float32 scores, ``softmax`` + ``torch.multinomial`` or ``argmax``, the
pad id after a row's EOS). So for the same assembled inputs the tokens are the ones ``vlm.generate`` returns, also
when sampling under the same seed.

What the processors and criteria see as ``input_ids`` is the assembled prompt as token ids (``[B, S_asm]``, then
each new token appended): the original ids at their columns, the image token id where image embeddings were
inserted, the pad id in the layout's left padding. Lengths that count the prompt (``max_length``,
``min_length``) count those columns, as HF counts ``input_ids`` passed with ``inputs_embeds``.

Decoding is greedy or multinomial sampling only: beam search, assisted, contrastive, constrained or DoLa decoding,
guidance, watermarking, several sequences per prompt and output dictionaries are refused, naming the option (also
when the model's ``generation_config`` sets it: pass the neutral value to override).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple

import torch

if TYPE_CHECKING:  # transformers is imported when generating, not with mmlatent
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    from .layout import LayoutPlan

# options with an effect on greedy or sampled decoding that are built here exactly as transformers builds them
SUPPORTED_OPTIONS = (
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "max_time", "stop_strings",
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
    "remove_invalid_values", "renormalize_logits", "eos_token_id", "pad_token_id")
# options that change how transformers runs, or that only beam search or assisted decoding read: the tokens of
# greedy or sampled decoding do not depend on them (IVTLR always decodes over its own dynamic KV cache)
IGNORED_OPTIONS = (
    "bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config", "max_cache_len",
    "compile_config", "disable_compile", "prefill_chunk_size", "early_stopping", "length_penalty",
    "diversity_penalty", "low_memory", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight",
    "speculation_type", "transformers_version")
# the neutral value of every supported option that changes the scores or stops early: plain greedy decoding to
# max_new_tokens or EOS whatever a checkpoint's generation_config sets (IVT-LR's evaluation decodes so)
GREEDY_OPTIONS = {"do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                  "min_length": 0, "min_new_tokens": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                  "remove_invalid_values": False, "renormalize_logits": False, "max_time": None, "stop_strings": None}
# what a refused option asks for, for the error message
_REFUSED = {
    "num_beams": "beam search", "num_beam_groups": "group beam search", "penalty_alpha": "contrastive search",
    "constraints": "constrained beam search", "force_words_ids": "constrained beam search",
    "prompt_lookup_num_tokens": "assisted decoding (prompt lookup)", "assistant_early_exit": "assisted decoding",
    "use_mtp": "assisted decoding (multi-token prediction)", "dola_layers": "DoLa decoding",
    "num_return_sequences": "several sequences per prompt (repeat the prompt's rows instead)",
    "guidance_scale": "classifier-free guidance", "watermarking_config": "watermarking",
    "sequence_bias": "sequence bias", "token_healing": "token healing", "top_h": "top-H sampling",
    "encoder_repetition_penalty": "an encoder repetition penalty",
    "encoder_no_repeat_ngram_size": "encoder n-gram blocking", "forced_bos_token_id": "a forced first token",
    "forced_eos_token_id": "a forced last token", "exponential_decay_length_penalty": "a length penalty",
    "return_dict_in_generate": "generate's output dictionary (IVTLR.generate returns the new tokens)",
    "output_scores": "scores in the output", "output_logits": "logits in the output",
    "output_attentions": "attentions in the output", "output_hidden_states": "hidden states in the output",
    "continuous_batching_config": "continuous batching"}
# keywords of transformers' generate that are not GenerationConfig options
_REFUSED_KEYWORDS = {
    "assistant_model": "assisted decoding", "assistant_tokenizer": "assisted decoding",
    "prefix_allowed_tokens_fn": "constrained decoding", "negative_prompt_ids": "classifier-free guidance",
    "negative_prompt_attention_mask": "classifier-free guidance", "streamer": "streaming",
    "synced_gpus": "synchronised multi-GPU decoding", "custom_generate": "a custom decoding loop",
    "trust_remote_code": "a custom decoding loop from the Hub"}


def _generation_config_class():
    from transformers import GenerationConfig
    return GenerationConfig


def _global_defaults() -> Dict[str, object]:
    """transformers' defaults for what neither the caller nor the model sets (greedy, max_length 20, ...)."""
    GenerationConfig = _generation_config_class()
    # a static method of GenerationConfig since transformers 5; older releases set these in __init__ instead
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    return dict(defaults()) if callable(defaults) else {}


def _option_names() -> frozenset:
    return frozenset(k for k in vars(_generation_config_class()()) if not k.startswith("_"))


def resolve(model_config: Optional["GenerationConfig"], generation_config: Optional["GenerationConfig"],
            options: Mapping[str, object]) -> Tuple["GenerationConfig", bool]:
    """The merged ``GenerationConfig`` of one call and whether its length is transformers' default (no
    ``max_new_tokens`` or ``max_length`` set anywhere); raises TypeError for an unknown keyword or a
    ``generation_config`` that is not a GenerationConfig, ValueError for a refused decoding mode or option."""
    GenerationConfig = _generation_config_class()
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config: expected a transformers.GenerationConfig, got "
                        f"{type(generation_config).__name__}")
    if model_config is not None and not isinstance(model_config, GenerationConfig):
        model_config = None
    names = _option_names()
    for key in options:
        if key in _REFUSED_KEYWORDS:
            raise ValueError(f"{key}: {_REFUSED_KEYWORDS[key]} is not supported by IVTLR.generate, which decodes "
                             f"greedily or by sampling")
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        raise TypeError(f"generate: unexpected keyword arguments {unknown}; it takes generation_config, "
                        f"logits_processor, stopping_criteria, tokenizer and GenerationConfig options (supported: "
                        f"{', '.join(SUPPORTED_OPTIONS)})")
    max_new_tokens = options.get("max_new_tokens")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    # as GenerationMixin._prepare_generation_config: the caller's config, the model's for what is unset, the global
    # defaults for what is still unset, the keywords over everything
    default_length = (options.get("max_length") is None and options.get("max_new_tokens") is None
                      and all(c is None or (c.max_length is None and c.max_new_tokens is None)
                              for c in (generation_config, model_config)))
    merged = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    if model_config is not None:
        merged.update(**model_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    merged.update(**_global_defaults(), defaults_only=True)
    merged.update(**dict(options))
    _refuse_unsupported(merged, names)
    return merged, default_length


def _refuse_unsupported(config, names: frozenset) -> None:
    defaults = _global_defaults()
    for key in sorted(names):
        if key in SUPPORTED_OPTIONS or key in IGNORED_OPTIONS:
            continue
        value = getattr(config, key, None)
        neutral = defaults.get(key)
        if value is None or value is False or (not isinstance(value, torch.Tensor) and value == neutral):
            continue
        what = _REFUSED.get(key, "an option")
        hint = f" (pass {key}={neutral!r} to override a model default)" if neutral is not None else ""
        raise ValueError(f"{key}: {what} ({key}={value!r}) is not supported by IVTLR.generate, which decodes "
                         f"greedily or by sampling{hint}; supported options: {', '.join(SUPPORTED_OPTIONS)}")


def hf_tokenizer(tokenizer: Optional[Any]) -> Optional[Any]:
    """A ``transformers`` tokenizer for ``tokenizer``: itself, or what an mmlatent tokenizer's ``to_hf`` gives."""
    if tokenizer is None:
        return None
    from transformers import PreTrainedTokenizerBase
    if not isinstance(tokenizer, PreTrainedTokenizerBase) and callable(getattr(tokenizer, "to_hf", None)):
        tokenizer = tokenizer.to_hf()
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer: expected a transformers tokenizer (or an mmlatent tokenizer), got "
                        f"{type(tokenizer).__name__}")
    return tokenizer


def special_tokens(config: "GenerationConfig") -> Tuple[Optional[torch.Tensor], Optional[int]]:
    """(eos ids as a 1-D int64 tensor or None, pad id or None) as GenerationMixin._prepare_special_tokens makes
    them: the pad id defaults to the first EOS id."""
    eos = config.eos_token_id
    eos = None if eos is None else torch.as_tensor(eos, dtype=torch.long).reshape(-1).cpu()
    pad = config.pad_token_id
    if pad is None and eos is not None and eos.numel():
        pad = int(eos[0])
    return eos, None if pad is None else int(pad)


@dataclass
class DecodingPlan:
    """One call's decoding: the merged config, the number of new tokens at most, transformers' logits processors
    and stopping criteria, the pad id for rows that have finished (a 0-d int64 tensor, used when a criterion stops
    at an EOS id, as transformers does)."""

    config: "GenerationConfig"
    max_new_tokens: int
    processors: "LogitsProcessorList"
    criteria: "StoppingCriteriaList"
    pad: Optional[torch.Tensor]
    pads_finished: bool

    def run(self, history: torch.Tensor, logits: torch.Tensor,
            feed: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """Decodes from ``logits`` [B, V] (the next-token logits of the prompt) and ``history`` [B, S_asm] int64
        (the assembled prompt as ids); ``feed(token [B] int64, step)`` reads the step-th new token and returns the
        next logits [B, V]. Returns [B, T] int64 new tokens, T <= max_new_tokens, the pad id after each row's
        end."""
        B = history.shape[0]
        unfinished = torch.ones(B, dtype=torch.long, device=history.device)
        pad = None if self.pad is None else self.pad.to(history.device)
        tokens = []
        for step in range(self.max_new_tokens):
            scores = self.processors(history, logits.to(dtype=torch.float32, copy=True))
            if self.config.do_sample:
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                token = torch.argmax(scores, dim=-1)
            if self.pads_finished:
                token = token * unfinished + pad * (1 - unfinished)
            history = torch.cat([history, token[:, None]], dim=-1)
            tokens.append(token)
            unfinished = unfinished & ~self.criteria(history, None)
            # host sync, one per new token, as in transformers' _sample: stopping when every row is done saves the
            # remaining decoder passes, which cost far more than the read
            if not bool(unfinished.max() > 0):
                break
            logits = feed(token, step)
        return torch.stack(tokens, dim=1)


def plan(config: "GenerationConfig", default_length: bool, history: torch.Tensor, valid: torch.Tensor, *,
         tokenizer: Optional[Any] = None, logits_processor: Optional["LogitsProcessorList"] = None,
         stopping_criteria: Optional["StoppingCriteriaList"] = None,
         max_position_embeddings: Optional[int] = None) -> DecodingPlan:
    """The processors and criteria of ``config`` (from :func:`resolve`) for a prompt whose assembled ids are
    ``history`` [B, L] and whose real columns are ``valid`` [B, L] bool (left padding), built with transformers'
    classes in the order ``GenerationMixin._get_logits_processor`` / ``_get_stopping_criteria`` use."""
    from transformers import (EosTokenCriteria, InfNanRemoveLogitsProcessor, LogitNormalization, LogitsProcessorList,
                              MaxLengthCriteria, MaxTimeCriteria, MinLengthLogitsProcessor,
                              MinNewTokensLengthLogitsProcessor, MinPLogitsWarper, NoBadWordsLogitsProcessor,
                              NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, StoppingCriteriaList,
                              StopStringCriteria, SuppressTokensAtBeginLogitsProcessor,
                              SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper, TypicalLogitsWarper)
    from transformers.generation.logits_process import EpsilonLogitsWarper, EtaLogitsWarper
    c = copy.deepcopy(config)
    device = history.device
    length = history.shape[1]
    eos, pad = special_tokens(c)
    eos = None if eos is None else eos.to(device)
    if logits_processor is not None and not isinstance(logits_processor, LogitsProcessorList):
        raise TypeError(f"logits_processor: expected a transformers.LogitsProcessorList, got "
                        f"{type(logits_processor).__name__}")
    if stopping_criteria is not None and not isinstance(stopping_criteria, StoppingCriteriaList):
        raise TypeError(f"stopping_criteria: expected a transformers.StoppingCriteriaList, got "
                        f"{type(stopping_criteria).__name__}")

    # lengths, as GenerationMixin._prepare_generated_length counts them (input_ids = the assembled prompt)
    if c.max_new_tokens is not None:
        c.max_length = c.max_new_tokens + length
    elif default_length:
        c.max_length = c.max_length + length
        if max_position_embeddings is not None:
            c.max_length = min(c.max_length, max_position_embeddings)
    if c.min_new_tokens is not None:
        c.min_length = c.min_new_tokens + length
    if c.max_length <= length:
        raise ValueError(f"max_length: {c.max_length} leaves no new token after the assembled prompt's {length} "
                         f"columns (the prompt, the inserted image tokens and the padding); use max_new_tokens")

    processors = LogitsProcessorList()
    if c.repetition_penalty is not None and c.repetition_penalty != 1.0:
        # the left padding is not part of the prompt; transformers drops an all-ones mask before this, which the
        # zero lengths here equal
        # (host sync, once per generate call, only with a repetition penalty)
        padding = None if bool(valid.all()) else valid.int().argmax(dim=1)
        processors.append(RepetitionPenaltyLogitsProcessor(c.repetition_penalty, prompt_ignore_length=padding))
    if c.no_repeat_ngram_size is not None and c.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(c.no_repeat_ngram_size))
    if c.bad_words_ids is not None:
        processors.append(NoBadWordsLogitsProcessor(c.bad_words_ids, eos))
    if c.min_length is not None and eos is not None and c.min_length > 0:
        processors.append(MinLengthLogitsProcessor(c.min_length, eos, device=device))
    if c.min_new_tokens is not None and eos is not None and c.min_new_tokens > 0:
        processors.append(MinNewTokensLengthLogitsProcessor(length, c.min_new_tokens, eos, device=device))
    if c.remove_invalid_values is True:
        processors.append(InfNanRemoveLogitsProcessor())
    if c.suppress_tokens is not None:
        processors.append(SuppressTokensLogitsProcessor(c.suppress_tokens, device=device))
    if c.begin_suppress_tokens is not None:
        processors.append(SuppressTokensAtBeginLogitsProcessor(c.begin_suppress_tokens, length, device=device))
    processors = _merge(processors, logits_processor)
    if c.do_sample:
        if c.temperature is not None and c.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(c.temperature))
        if c.top_k is not None and c.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=c.top_k, min_tokens_to_keep=1))
        if c.top_p is not None and c.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=c.top_p, min_tokens_to_keep=1))
        if c.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=c.min_p, min_tokens_to_keep=1))
        if c.typical_p is not None and c.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(mass=c.typical_p, min_tokens_to_keep=1))
        if c.epsilon_cutoff is not None and 0.0 < c.epsilon_cutoff < 1.0:
            processors.append(EpsilonLogitsWarper(epsilon=c.epsilon_cutoff, min_tokens_to_keep=1))
        if c.eta_cutoff is not None and 0.0 < c.eta_cutoff < 1.0:
            processors.append(EtaLogitsWarper(epsilon=c.eta_cutoff, min_tokens_to_keep=1, device=device))
    if c.renormalize_logits is True:
        processors.append(LogitNormalization())

    criteria = StoppingCriteriaList()
    criteria.append(MaxLengthCriteria(max_length=c.max_length, max_position_embeddings=max_position_embeddings))
    if c.max_time is not None:
        criteria.append(MaxTimeCriteria(max_time=c.max_time))
    if c.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("tokenizer: required with stop_strings (they are matched against the tokenizer's "
                             "vocabulary, as transformers' generate requires)")
        try:
            criteria.append(StopStringCriteria(stop_strings=c.stop_strings, tokenizer=hf_tokenizer(tokenizer)))
        except ValueError as err:  # it reads each token's text after the probe "abcdef", which it must encode
            raise ValueError(f"tokenizer: transformers' stop-string matching cannot read this tokenizer's "
                             f"vocabulary ({err}); a word-level vocabulary needs the word 'abcdef'") from None
    if eos is not None:
        criteria.append(EosTokenCriteria(eos_token_id=eos))
    criteria = _merge(criteria, stopping_criteria)
    pads_finished = any(hasattr(criterion, "eos_token_id") for criterion in criteria)
    if pads_finished and pad is None:
        raise ValueError("pad_token_id: required to fill the rows that have finished (no eos_token_id either)")
    return DecodingPlan(config=c, max_new_tokens=c.max_length - length, processors=processors, criteria=criteria,
                        pad=None if pad is None else torch.tensor(pad, dtype=torch.long), pads_finished=pads_finished)


def _merge(defaults, custom):
    """As GenerationMixin._merge_criteria_processor_list: a custom entry replaces the default of its type, the
    other custom entries go after the defaults."""
    if not custom:
        return defaults
    merged = type(defaults)()
    for default in defaults:
        merged.append(next((c for c in custom if type(c) is type(default)), default))
    for entry in custom:
        if entry not in merged:
            merged.append(entry)
    return merged


def assembled_ids(plan: "LayoutPlan", input_ids: torch.Tensor, image_token_id: int,
                  pad_id: Optional[int]) -> torch.Tensor:
    """[B, S_asm] int64: the assembled prompt as token ids (the ids of ``input_ids`` at their columns, the image
    token id at the inserted image embeddings, ``pad_id`` (or 0) in the layout's left padding)."""
    B = input_ids.shape[0]
    ids = input_ids.new_full((B, plan.length), 0 if pad_id is None else pad_id)
    ids.scatter_(1, plan.orig_to_asm, input_ids)
    inserted = plan.inserted.clone()
    inserted.scatter_(1, plan.orig_to_asm, False)  # the latent tokens are original columns
    return ids.masked_fill(inserted, image_token_id)


__all__ = ["SUPPORTED_OPTIONS", "IGNORED_OPTIONS", "GREEDY_OPTIONS", "DecodingPlan", "resolve", "plan", "assembled_ids",
           "special_tokens", "hf_tokenizer"]
