"""mmlatent calls no deprecated transformers API: the KV cache goes under the keyword the installed forward takes,
checkpointing through the current method, and the test suite fails when a call of mmlatent's raises a
FutureWarning or DeprecationWarning in transformers, diffusers or peft (tests/conftest.py), which is checked here
by calling deprecated API through mmlatent on purpose. Also: the installed versions are within pyproject's
ranges."""
import importlib.metadata
import inspect
import pathlib
import warnings

import pytest
import torch

from mmlatent.models import IVTLR, cache_keyword, cache_kwargs, enable_activation_checkpointing, ivtlr_reference
from mmlatent.models.tiny import LATENT_ID, synthetic_batch, tiny_qwen2_vl

ROOT = pathlib.Path(__file__).resolve().parents[1]


def deprecations(record):
    return [w for w in record if issubclass(w.category, (FutureWarning, DeprecationWarning))]


def test_cache_keyword_is_the_one_the_installed_forward_takes():
    model = tiny_qwen2_vl()
    lm = model.model.language_model
    parameters = inspect.signature(type(lm).forward).parameters
    expected = "cache" if "cache" in parameters else "past_key_values"
    assert cache_keyword(lm) == expected and expected in parameters
    assert list(cache_kwargs(lm, None)) == [expected]
    with pytest.raises(TypeError, match="model: its forward .* takes none of cache, past_key_values"):
        cache_keyword(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        cache_keyword("not a model")


def test_ivtlr_with_gradient_checkpointing_raises_no_deprecation():
    """A training step under checkpointing and cached generation, with every warning recorded: none is a
    deprecation (mmlatent's own calls, of which the cached ones warned before)."""
    model = tiny_qwen2_vl(seed=5, attn_implementation="eager")
    for name, p in model.named_parameters():
        p.requires_grad_("language_model.layers" in name)
    batch = synthetic_batch(model, images=[[(16, 16)], [(16, 24)]], prompt_lengths=[3, 6], answer_lengths=[4, 2],
                            num_latents=[2, 2])
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        enable_activation_checkpointing(model)
        model.train()
        for wrapper in (IVTLR(model, LATENT_ID, k=2), ivtlr_reference(model, LATENT_ID, k=2)):
            wrapper(**batch).loss.backward()
            wrapper.generate(**prompt, max_new_tokens=3)
    model.eval()
    assert deprecations(record) == [], [str(w.message) for w in deprecations(record)]


def test_enable_activation_checkpointing_uses_the_current_method():
    model = tiny_qwen2_vl()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert layers and not any(m.gradient_checkpointing for m in layers)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        enable_activation_checkpointing(model, use_reentrant=False)
    assert deprecations(record) == []
    assert all(m.gradient_checkpointing for m in layers)
    with pytest.raises(ValueError, match="model: Linear has neither activation_checkpointing_enable"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="use_reentrant: expected a bool"):
        enable_activation_checkpointing(model, use_reentrant="no")


def test_a_deprecated_call_from_mmlatent_fails_the_suite():
    """The guard at work: a model that hides activation_checkpointing_enable (as a transformers before it would
    have none) sends enable_activation_checkpointing to gradient_checkpointing_enable, deprecated in 5.24; from
    mmlatent's call that FutureWarning is an error. The same deprecated call from a test only warns."""
    model = tiny_qwen2_vl()
    if not hasattr(type(model), "activation_checkpointing_enable"):
        pytest.skip("this transformers has no activation_checkpointing_enable: its old name is not deprecated")
    model.activation_checkpointing_enable = None  # an instance attribute: what getattr finds, not callable
    with pytest.raises(FutureWarning, match="gradient_checkpointing_enable.* inside a call mmlatent makes"):
        enable_activation_checkpointing(model)
    del model.activation_checkpointing_enable
    with pytest.warns(FutureWarning, match="gradient_checkpointing_enable` is deprecated"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def test_a_deprecated_cache_keyword_from_mmlatent_fails_the_suite():
    """The old cache keyword, passed from a function of an mmlatent module (compiled under that module's name,
    as the guard sees it), is an error; from a test it only warns."""
    model = tiny_qwen2_vl()
    lm = model.model.language_model
    if cache_keyword(lm) != "cache":
        pytest.skip("this transformers takes past_key_values: it is not deprecated")
    from transformers import DynamicCache
    inputs = dict(inputs_embeds=torch.randn(1, 3, model.config.text_config.hidden_size),
                  attention_mask=torch.ones(1, 3, dtype=torch.long), use_cache=True)
    namespace = {"__name__": "mmlatent.models.compat"}
    exec(compile("def call(lm, cache, inputs):\n    return lm(**inputs, past_key_values=cache)\n",
                 "<a function of mmlatent.models.compat>", "exec"), namespace)
    with pytest.raises(FutureWarning, match="past_key_values.* inside a call mmlatent makes"):
        namespace["call"](lm, DynamicCache(config=model.config.text_config), inputs)
    with pytest.warns(FutureWarning, match="past_key_values"):
        lm(**inputs, past_key_values=DynamicCache(config=model.config.text_config))


def test_another_librarys_deprecated_call_inside_mmlatents_call_is_not_an_error():
    """mmlatent calls peft.get_peft_model (the benchmark's LoRA rows); peft then asks transformers for the
    deprecated is_gradient_checkpointing. That is peft's call to fix, not mmlatent's: it stays a warning."""
    pytest.importorskip("peft")
    from mmlatent import bench
    case = bench.ivtlr_case("train", tiny_qwen2_vl, "tiny Qwen2-VL", [[(16, 32)]] * 2, [3, 5], [4, 2], k=2,
                            lora_rank=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        args = case.make(torch.device("cpu"), torch.float32)
    assert all("lora" in n for n, p in args["models"]["mmlatent"].named_parameters() if p.requires_grad)
    # what mmlatent itself calls raises no deprecation; the ones recorded are issued by transformers for peft
    for w in deprecations(record):
        assert "site-packages" in w.filename and "mmlatent" not in w.filename, str(w.message)


def _requirements():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]


def test_every_dependency_has_a_range_that_holds_the_installed_version():
    from packaging.requirements import Requirement
    checked = 0
    for line in _requirements():
        requirement = Requirement(line)
        bounds = {spec.operator for spec in requirement.specifier}
        assert ">=" in bounds and "<" in bounds, f"{line}: expected a lower and an upper bound"
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra not installed here (flash-attn needs CUDA)
        # local versions (torch's +cpu) are compared by their public part
        assert requirement.specifier.contains(installed.split("+")[0], prereleases=True), (line, installed)
        checked += 1
    assert checked >= 10


def test_deprecations_attributed_to_mmlatent_modules_are_errors():
    """pyproject's filterwarnings: a deprecation whose stacklevel points at an mmlatent module (any library's)
    is an error; elsewhere it stays a warning."""
    with pytest.raises(FutureWarning):
        warnings.warn_explicit("deprecated", FutureWarning, "ivtlr.py", 1, module="mmlatent.models.ivtlr")
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("deprecated", DeprecationWarning, "mmlatent/__init__.py", 1, module="mmlatent")
    with pytest.warns(FutureWarning):
        warnings.warn_explicit("deprecated", FutureWarning, "other.py", 1, module="mmlatent_other")
