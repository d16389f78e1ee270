"""IVT-LR runs from configs: the curriculum's stages, self-contained checkpoints, evaluation, the CLI."""
import json
import os

import numpy as np
import pytest
import torch

from mmlatent import cli
from mmlatent.train import ivtlr as runs

TINY = dict(model={"tiny_qwen2_vl": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64}},
            data={"synthetic": {"n_train": 48, "n_eval": 8, "seed": 0}}, batch_size=16, k=2, max_new_tokens=12,
            train={"lr": 0.003, "warmup_steps": 1, "clip": 1.0, "seed": 0})


def test_curriculum_stages_and_optimizer_reset(tmp_path, monkeypatch):
    stages, resets = [], []
    real = runs.collator

    def spy(config, tokenizer, image_processor, stage, prompt_only=False, image_token_ids=None):
        if not prompt_only:
            stages.append(stage)
        return real(config, tokenizer, image_processor, stage, prompt_only, image_token_ids)

    monkeypatch.setattr(runs, "collator", spy)
    monkeypatch.setattr(runs.Trainer, "reset_optimizer",
                        lambda self, real_reset=runs.Trainer.reset_optimizer: resets.append(self.step)
                        or real_reset(self))
    config = runs.RunConfig(name="t", mode="ivtlr", epochs=5, epochs_per_stage=1, reset_optimizer_per_stage=True,
                            eval_samples=4, **dict(TINY, train=dict(TINY["train"], output_dir=str(tmp_path),
                                                                    eval_every=6)))
    result = runs.train(config, progress=False)
    assert stages == [0, 1, 2, 3]  # stage = epoch // epochs_per_stage, capped at max_latent_steps
    assert resets == [0, 3, 6, 9]  # at construction, then at each new stage (3 steps per epoch)
    assert result["stage"] == 3 and len(result["history"]["train"]) == 15
    assert [(e["step"], e["stage"], e["n"]) for e in result["history"]["eval"]] == [(6, 1, 4), (12, 3, 4)]
    final = tmp_path / "final"
    # a standard Hugging Face model folder, with the run's files beside it
    assert sorted(os.listdir(final)) == ["config.json", "generation_config.json", "ivtlr_config.json",
                                         "manifest.json", "model.safetensors", "preprocessor_config.json", "run.json",
                                         "word_tokenizer.json"]
    metrics = runs.evaluate(result["wrapper"], result["tokenizer"], result["image_processor"], config,
                            result["eval_records"])
    wrapper, tokenizer, loaded, processor = runs.load_run(str(final))
    again = runs.evaluate(wrapper, tokenizer, processor, loaded, result["eval_records"])
    assert again["outputs"] == metrics["outputs"]  # the saved run reproduces the in-memory one
    assert metrics["n"] == 8 and 0 <= metrics["accuracy"] <= 1 and metrics["tokens_per_answer"] > 0


def test_lora_run_folder_is_a_peft_folder_with_its_base_beside_it(tmp_path):
    """A LoRA run on a tiny model (built from a config, no base checkpoint on disk): the adapter as PEFT saves it,
    the base in base/; PEFT's own loader and load_run give the run's outputs."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mmlatent.models import IVTLR
    config = runs.RunConfig(name="lora", mode="ivtlr", epochs=2, epochs_per_stage=1, lora={
        "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        **dict(TINY, data={"synthetic": {"n_train": 16, "n_eval": 4, "seed": 0}},
               train=dict(TINY["train"], output_dir=str(tmp_path), progress=False)))
    result = runs.train(config, progress=False)
    final = tmp_path / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "base", "word_tokenizer.json"} <= set(
        os.listdir(final))
    metrics = runs.evaluate(result["wrapper"], result["tokenizer"], result["image_processor"], config,
                            result["eval_records"])
    wrapper, tokenizer, loaded, processor = runs.load_run(str(final))
    assert runs.evaluate(wrapper, tokenizer, processor, loaded, result["eval_records"])["outputs"] == \
        metrics["outputs"]
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(final / "base"), final).eval()
    assert runs.evaluate(IVTLR(plain, tokenizer.latent_id, k=config.k), tokenizer, processor, loaded,
                         result["eval_records"])["outputs"] == metrics["outputs"]


def test_no_image_control_blanks_every_image():
    config = runs.RunConfig(no_image=True, **TINY)
    _, train, evaluation = runs.build_data(config)
    assert all(not np.any(r.image) for r in train + evaluation)


def test_config_file_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]"):
        runs.RunConfig.load(str(path))
    with pytest.raises(ValueError, match="mode"):
        runs.RunConfig(mode="latent")


def test_cli_train_then_eval(tmp_path, capsys):
    import yaml
    config = dict(TINY, name="cli", mode="no_cot", epochs=1, train=dict(TINY["train"], output_dir=str(tmp_path / "r"),
                                                                       progress=False))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", "--config", str(path)]) == 0
    assert "cli: accuracy" in capsys.readouterr().out
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "r" / "final"), "--n", "4",
                     "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["n"] == 4 and "lenient_accuracy_public_code" in report
    assert torch.is_tensor(torch.tensor(report["accuracy"]))


def test_demo_end_to_end_on_tiny_settings(tmp_path, monkeypatch):
    from mmlatent import demo
    monkeypatch.setattr(demo, "BRIEF", dict(TINY, epochs=2, max_latent_steps=3))
    monkeypatch.setattr(demo, "EVAL_N", 4)
    shipped = tmp_path / "checkpoints"
    config = dict(TINY, name="synthetic-no-cot", mode="no_cot", epochs=1,
                  train=dict(TINY["train"], output_dir=str(shipped / "synthetic-no-cot"), progress=False))
    runs.train(runs.RunConfig(**config), progress=False)
    assert demo.main(out=str(tmp_path / "out"), bench=False, checkpoints=str(shipped)) == 0
    table = (tmp_path / "out" / "demo.md").read_text()
    assert table.count("trained now") == 3 and "shipped checkpoint" in table
    assert (tmp_path / "out" / "demo.png").stat().st_size > 1000


def local_qwen2_vl_checkpoint(tmp_path):
    """(checkpoint folder, ScienceQA root): a tiny Qwen2-VL saved as a local checkpoint (weights, a Hugging Face
    tokenizer, an image processor) and ScienceQA in its official layout."""
    from transformers import PreTrainedTokenizerFast

    from mmlatent.data import WordTokenizer, image_processor_for
    from mmlatent.data.tokenizer import SPECIALS, VISION
    from mmlatent.models.tiny import tiny_qwen2_vl
    from test_data import _scienceqa_official

    words = WordTokenizer(["which", "is", "red", "blue", "apple", "sky", "apples", "are", "the", "context", "look",
                           "question", "options", "answer", "therefore", "a", "b"])
    hf = PreTrainedTokenizerFast(tokenizer_object=words._tokenizer, bos_token="<bos>", eos_token="<eos>",
                                 pad_token="<pad>", unk_token="<unk>",
                                 additional_special_tokens=[t for t in SPECIALS + VISION
                                                            if t not in ("<bos>", "<eos>", "<pad>", "<unk>")])
    checkpoint = tmp_path / "qwen2-vl-tiny"
    model = tiny_qwen2_vl(vocab=len(words))
    model.save_pretrained(checkpoint)
    hf.save_pretrained(checkpoint)
    image_processor_for(model).save_pretrained(checkpoint)
    data = tmp_path / "scienceqa"
    data.mkdir()
    _scienceqa_official(str(data))
    return checkpoint, data


def test_real_data_path_with_a_local_checkpoint(tmp_path):
    """The real-data route end to end, offline: a Qwen2-VL checkpoint folder and ScienceQA in its official layout,
    trained through the curriculum and evaluated."""
    import yaml
    checkpoint, data = local_qwen2_vl_checkpoint(tmp_path)
    config = dict(name="real", mode="ivtlr", model={"path": str(checkpoint)}, epochs=2, epochs_per_stage=1, k=1,
                  batch_size=2, max_new_tokens=8,
                  data={"scienceqa": {"root": str(data), "train_split": "train", "eval_split": "train"}},
                  train={"lr": 1e-3, "seed": 0, "output_dir": str(tmp_path / "run"), "progress": False})
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", "--config", str(path), "--report", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 2 and report["n_eval"] == 2 and report["stage"] == 1
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run" / "final")]) == 0


def test_chameleon_run(tmp_path):
    config = runs.RunConfig(name="cham", mode="ivtlr", epochs=2, epochs_per_stage=1,
                            **dict(TINY, model={"tiny_chameleon": {"hidden": 32, "layers": 1, "heads": 2,
                                                                   "kv_heads": 1, "intermediate": 64}}))
    result = runs.train(config, progress=False)
    metrics = runs.evaluate(result["wrapper"], result["tokenizer"], result["image_processor"], config,
                            result["eval_records"][:4])
    assert result["stage"] == 1 and metrics["n"] == 4
