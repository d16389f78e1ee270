"""Modal-mixed CoT runs from configs: training on the Trainer, the run folder and its round trip, resume refusal,
evaluation (accuracy per kind, reconstruction of the held-out sketches, the dummy-latent ablation), the CLI, and the
7B Zebra-CoT config."""
import json
import os

import pytest
import torch
import yaml

from mmlatent import cli
from mmlatent.train import modal_mixed as mm
from mmlatent.train.checkpoint import CheckpointError
from mmlatent.train.methods import from_mapping, load_config, method_module, read_yaml
from mmlatent.data.records import strict_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model={"tiny_qwen2_vl": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64}},
            data={"synthetic": {"n_train": 32, "n_eval": 8, "seed": 0, "kinds": ["swap", "move"]}},
            num_latents=9, pool_grid=[3, 3], head={"width": 32, "depth": 1}, sampler={"steps": 2},
            batch_size=8, epochs=1, max_new_tokens=40, eval_samples=4,
            train={"lr": 0.01, "warmup_steps": 1, "clip": 1.0, "seed": 0, "progress": False})


@pytest.fixture(scope="module", autouse=True)
def torch_backend_one_thread():
    """The torch backend of the kernels (under pytest's TRITON_INTERPRET=1 the interpreted Triton kernels would
    run: minutes per step; the kernel tests cover them) and one intra-op thread (a shared, loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMLATENT_BACKEND", "torch")
        yield
    torch.set_num_threads(threads)


def _config(**changes):
    config = dict(TINY, name="t", **{k: v for k, v in changes.items() if k != "train"})
    config["train"] = dict(TINY["train"], **changes.get("train", {}))
    return mm.ModalMixedConfig(**config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run (40 steps, cached targets) with its final/ folder: the model writes START and sketches."""
    out = tmp_path_factory.mktemp("run")
    config = _config(epochs=10, cache_targets=True, data={"synthetic": {"n_train": 32, "n_eval": 8, "seed": 0,
                                                                        "kinds": ["swap"]}},
                     train={"output_dir": str(out), "lr": 0.02})
    return config, mm.train(config, progress=False), out / "final"


def test_training_decreases_both_losses_and_trains_the_head_with_the_vlm(trained):
    config, result, _ = trained
    text, latent = result["text_loss"], result["latent_loss"]
    assert len(text) == len(latent) == result["steps"] == 40
    assert text[-1] < 0.5 * text[0] and latent[-1] < latent[0]
    losses = [r["loss"] for r in result["history"]["train"]]
    assert losses[-1] < losses[0]
    assert all(abs(l - (t + a)) < 1e-4 for l, t, a in zip(losses, text, latent))  # lambda 1
    model = result["model"]
    vision = model.backbone.vision_tower
    assert not any(p.requires_grad for p in vision.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_cached_targets_equal_encoded_ones(trained):
    config, result, _ = trained
    model, tokenizer, processor = result["model"], result["tokenizer"], result["image_processor"]
    _, records, _ = mm.build_data(config)
    make = mm.collator(config, tokenizer, processor)
    cache = mm.encode_records(model, make, records[:5])
    batch = make(records[:5])
    assert torch.equal(torch.cat([cache[r.id] for r in records[:5]]), mm.sketch_targets(model, batch))


def test_run_folder_round_trip_gives_identical_generations(trained):
    config, result, final = trained
    assert {"config.json", "model.safetensors", mm.HEAD_FILE, mm.SETTINGS_FILE, "word_tokenizer.json",
            "preprocessor_config.json", "run.json", "manifest.json"} <= set(os.listdir(final))
    settings = json.loads((final / mm.SETTINGS_FILE).read_text())
    assert settings["modal_mixed"]["num_latents"] == 9 and settings["head"]["width"] == 32
    records = result["eval_records"]
    before = mm.evaluate(result["model"], result["tokenizer"], result["image_processor"], config, records,
                         ablation=False)
    model, tokenizer, loaded, processor = mm.load_run(str(final))
    assert loaded == config
    after = mm.evaluate(model, tokenizer, processor, loaded, records, ablation=False)
    assert after["outputs"] == before["outputs"]
    assert after["latent_mse"] == before["latent_mse"]
    make = mm.collator(config, tokenizer, processor, prompt_only=True)
    batch = make(records[:4])
    a = mm._generate(result["model"], tokenizer, config, batch, None, None)
    b = mm._generate(model, tokenizer, loaded, batch, None, None)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))


def test_a_corrupt_head_file_is_refused_naming_it(trained, tmp_path):
    import shutil
    _, _, final = trained
    copy = tmp_path / "final"
    shutil.copytree(final, copy)
    with open(copy / mm.HEAD_FILE, "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    with pytest.raises(CheckpointError, match=mm.HEAD_FILE):
        mm.load_run(str(copy))


def test_evaluation_keys_and_the_ablation(trained):
    config, result, _ = trained
    records = result["eval_records"]
    metrics = mm.evaluate(result["model"], result["tokenizer"], result["image_processor"], config, records)
    for key in ("accuracy", "accuracy_stderr", "accuracy_by_kind", "latency_per_sample_s", "tokens_per_answer",
                "latent_mse", "latent_cosine", "latent_mse_of_zeros", "sketches_matched", "sketches_missing",
                "sketches_extra", "ablation", "outputs"):
        assert key in metrics, key
    n = len(records)
    assert metrics["n"] == n == len(metrics["outputs"])
    assert metrics["accuracy"] == sum(o["correct"] for o in metrics["outputs"]) / n
    # a correct answer is a given one; an answer is given exactly when the strict parse reads a letter
    assert metrics["answered"] >= metrics["accuracy"]
    assert metrics["answered"] == sum(strict_answer(o["output"]) is not None for o in metrics["outputs"]) / n
    assert sum(v["n"] for v in metrics["accuracy_by_kind"].values()) == n
    held_out = sum(len(r.sketch_refs) for r in records)
    assert metrics["sketches_matched"] + metrics["sketches_missing"] == held_out
    assert metrics["sketches_matched"] > 0, "the short run writes no sketch: the test needs one"
    assert metrics["latent_mse"] > 0 and -1 <= metrics["latent_cosine"] <= 1
    assert set(metrics["ablation"]) == {"zeros", "noise"}
    for result_ in metrics["ablation"].values():
        assert result_["accuracy_drop"] == pytest.approx(metrics["accuracy"] - result_["accuracy"])
        assert set(result_["accuracy_by_kind"]) == set(metrics["accuracy_by_kind"])
        assert result_["accuracy"] <= result_["answered"] <= 1 and result_["tokens_per_answer"] > 0
    # the ablation feeds other latents back: the generated latents are nonzero, the zeros run's are zero
    model, tokenizer, processor = result["model"], result["tokenizer"], result["image_processor"]
    batch = mm.collator(config, tokenizer, processor, prompt_only=True)(records)
    normal = mm._generate(model, tokenizer, config, batch, None, None)
    zeros = mm._generate(model, tokenizer, config, batch, "zeros", None)
    made = torch.cat([x for x in normal.latents if len(x)])
    assert made.abs().sum() > 0
    assert all(not x.any() for x in zeros.latents)
    lines = mm.summary_lines(metrics)
    assert any("ablation, latents -> zeros" in line for line in lines)
    assert any("held-out sketches" in line for line in lines)


def test_text_modes_train_without_sketches():
    for mode in ("cot", "no_cot"):
        config = _config(mode=mode, epochs=1)
        result = mm.train(config, progress=False)
        assert all(v == 0 for v in result["latent_loss"])
        metrics = mm.evaluate(result["model"], result["tokenizer"], result["image_processor"], config,
                              result["eval_records"][:4])
        assert metrics["ablation"] is None and metrics["latent_mse"] is None and metrics["n"] == 4


def test_resume_refuses_a_changed_key(tmp_path):
    out = tmp_path / "r"
    config = _config(epochs=2, train={"output_dir": str(out)})
    result = mm.train(config, progress=False, until=3)
    assert not result["completed"] and os.path.isdir(out / "checkpoint-3")
    changed = _config(epochs=2, diffusion_weight=0.5, train={"output_dir": str(out)})
    with pytest.raises(ValueError, match="diffusion_weight: 1.0 -> 0.5"):
        mm.train(changed, progress=False, resume=str(out / "checkpoint-3"))
    resumed = mm.train(config, progress=False, resume=str(out / "checkpoint-3"))
    uninterrupted = mm.train(_config(epochs=2), progress=False)
    assert [r["loss"] for r in resumed["history"]["train"]] == [r["loss"] for r in uninterrupted["history"]["train"]]


def test_config_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, method="modal_mixed", pool=[3, 3])))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown keys \['pool'\]"):
        load_config(str(path))
    for changes, needle in (({"pool_grid": [2, 2]}, "pool_grid: \\[2, 2\\] pools to 4 latents"),
                            ({"head": {"widht": 8}}, "head: unknown keys \\['widht'\\]"),
                            ({"head": {"prediction": "velocity"}}, "head.prediction"),
                            ({"sampler": {"schedule": "flow"}}, "sampler.schedule"),
                            ({"mode": "ivtlr"}, "mode: expected one of modal_mixed, cot, no_cot"),
                            ({"diffusion_weight": -1}, "diffusion_weight"),
                            ({"data": {"synthetic": {"kinds": ["rotate"]}}}, "data.synthetic.kinds"),
                            ({"model": {"tiny_qwen2_vl": {"hidden": 30, "heads": 4}}},
                             "model.tiny_qwen2_vl.hidden: 30 is not a multiple"),
                            ({"cache_targets": True, "freeze_vision": False}, "cache_targets"),
                            ({"train": {"lr": 0}}, "train.lr")):
        path.write_text(yaml.safe_dump(dict(TINY, method="modal_mixed", **changes)))
        with pytest.raises(ValueError, match=f"bad.yaml: {needle}"):
            load_config(str(path))
    path.write_text(yaml.safe_dump(dict(TINY, method="chain")))
    with pytest.raises(ValueError, match="method: expected one of ivtlr, modal_mixed"):
        load_config(str(path))


def test_method_key_picks_the_run_kind(tmp_path):
    from mmlatent.train.ivtlr import RunConfig
    ivtlr = dict(name="x", mode="no_cot", model={"tiny_qwen2_vl": {"hidden": 32, "layers": 1, "heads": 2,
                                                                  "kv_heads": 1, "intermediate": 64}})
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(ivtlr))
    assert isinstance(load_config(str(path)), RunConfig)
    path.write_text(yaml.safe_dump(dict(ivtlr, method="ivtlr")))
    assert load_config(str(path)) == RunConfig(**ivtlr)
    path.write_text(yaml.safe_dump(dict(ivtlr, method="ivtlr", head={})))
    with pytest.raises(ValueError, match=r"unknown keys \['head'\]"):
        load_config(str(path))
    for name in ("synthetic-modal-mixed", "synthetic-modal-mixed-cot", "synthetic-modal-mixed-no-cot"):
        config = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
        assert isinstance(config, mm.ModalMixedConfig) and config.name == name


def test_cli_train_then_eval(tmp_path, capsys):
    config = dict(TINY, name="cli", method="modal_mixed", train=dict(TINY["train"], output_dir=str(tmp_path / "r")))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", "--config", str(path), "--report", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "cli: accuracy" in out and "ablation, latents -> zeros" in out
    assert json.loads((tmp_path / "report.json").read_text())["method"] == "modal_mixed"
    assert (tmp_path / "r" / "final" / "eval.json").is_file()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "r" / "final"), "--n", "3",
                     "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["n"] == 3 and report["method"] == "modal_mixed" and set(report["ablation"]) == {"zeros", "noise"}


def test_7b_zebra_config_parses_and_names_the_missing_paths(tmp_path):
    path = os.path.join(ROOT, "configs", "modal-mixed-qwen2_5vl-7b-zebra.yaml")
    with pytest.raises(ValueError, match="model.path: /path/to/Qwen2.5-VL-7B-Instruct is not a model folder"):
        load_config(path)
    raw = read_yaml(path)
    model = tmp_path / "qwen"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = from_mapping(mm.ModalMixedConfig, dict(raw, model={"path": str(model)}), path)
    assert (config.num_latents, config.pool_grid, config.diffusion_weight, config.batch_mul) == (32, [4, 8], 1.0, 4)
    assert config.sketch_size == [448, 448] and config.lora["r"] == 64 and config.train["bf16"] is True
    assert (config.head["width"], config.head["depth"]) == (1024, 3)
    with pytest.raises(FileNotFoundError, match="data.zebra_cot.train: no parquet file or folder at /path/to"):
        mm.build_data(config)


def test_lora_run_folder_is_a_peft_folder_with_the_head_beside_it(tmp_path):
    config = _config(lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                     train={"output_dir": str(tmp_path)})
    result = mm.train(config, progress=False)
    trainable = {n for n, p in result["model"].named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(n.startswith("head.") for n in trainable)
    final = tmp_path / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "base", mm.HEAD_FILE, mm.SETTINGS_FILE} <= set(
        os.listdir(final))
    records = result["eval_records"][:4]
    before = mm.evaluate(result["model"], result["tokenizer"], result["image_processor"], config, records,
                         ablation=False)
    model, tokenizer, loaded, processor = mm.load_run(str(final))
    assert mm.evaluate(model, tokenizer, processor, loaded, records, ablation=False)["outputs"] == before["outputs"]


def test_cli_compare_writes_the_table_rows_and_plot(trained, tmp_path, capsys):
    config, result, final = trained
    prefix = tmp_path / "out" / "cmp"
    assert cli.main(["compare", "--checkpoint", str(final), str(final), "--n", "4", "--out", str(prefix)]) == 0
    written = json.loads((tmp_path / "out" / "cmp.json").read_text())
    assert written["method"] == "modal_mixed" and written["command"].startswith("mmlatent compare")
    rows = written["rows"]
    assert [r["source"] for r in rows] == [str(final)] * 2 and rows[0]["n"] == 4
    direct = mm.evaluate(result["model"], result["tokenizer"], result["image_processor"], config,
                         result["eval_records"][:4])
    assert rows[0]["accuracy"] == rows[1]["accuracy"] == direct["accuracy"]
    assert rows[0]["ablation"]["zeros"]["accuracy"] == direct["ablation"]["zeros"]["accuracy"]
    table = (tmp_path / "out" / "cmp.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith(f"| {config.name} | {final} | 4 |")
    assert (tmp_path / "out" / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_cli_compare_refuses_runs_of_two_methods_before_evaluating(trained, tmp_path, capsys):
    _, _, final = trained
    ivtlr_run = os.path.join(ROOT, "checkpoints", "synthetic-ivtlr", "final")
    assert cli.main(["compare", "--checkpoint", str(final), ivtlr_run, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{ivtlr_run} holds a ivtlr run" in err and "one method" in err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="method: expected one of ivtlr, modal_mixed, grpo, dpmm, got .ppo."):
        method_module("ppo")
