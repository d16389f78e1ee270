"""DPMM-CoT runs from configs: both stages and the three variants on the embedded task (the answer run reading the
rationale run's generated rationales), the translation task on fixture Multi30K files, saving and loading, bit-exact
resume, the CLI, and config errors that name the key."""
import os

import numpy as np
import pytest
import torch

from mmlatent.train import dpmm

TINY = {"tiny": {"t5": {"d_model": 32, "layers": 1, "heads": 2, "d_ff": 64}, "vae": {"block_out_channels": [32, 32]},
                 "unet": {"block_out_channels": [32, 32]}}}


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch, one_thread):
    monkeypatch.setenv("MMLATENT_BACKEND", "torch")  # the interpreted Triton kernels would take minutes a step


def config(out, **changes):
    train = dict(dict(lr=3e-3, max_steps=4, seed=0, progress=False, output_dir=str(out)), **changes.pop("train", {}))
    options = dict(name="t", model=TINY, data={"synthetic": {"n_train": 32, "n_eval": 8, "seed": 0}}, batch_size=8,
                   max_new_tokens=16, eval_samples=4)
    return dpmm.DPMMConfig(train=train, **dict(options, **changes))


@pytest.mark.parametrize("variant", dpmm.VARIANTS)
def test_both_stages_run_and_the_answer_run_reads_the_generated_rationales(variant, tmp_path):
    first = config(tmp_path / "r", variant=variant)
    result = dpmm.train(first, progress=False)
    metrics = dpmm.evaluate_result(result, first)
    assert {"rouge_l", "bleu1", "bleu4"} <= set(metrics) and metrics["n"] == 8
    rationales = dpmm.read_rationales(str(tmp_path / "r" / dpmm.RATIONALES_FILE))
    assert sorted(rationales) == sorted(r.id for r in result["eval_records"])
    second = config(tmp_path / "a", variant=variant, stage="answer", rationales=metrics["rationales_file"])
    answer = dpmm.evaluate_result(dpmm.train(second, progress=False), second)
    assert answer["rationales_source"] == metrics["rationales_file"]
    assert set(answer["breakdown"]) <= {"NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"}
    assert 0.0 <= answer["accuracy"] <= 1.0 and "accuracy_random_fallback" in answer
    # the saved run loads and evaluates to the same outputs
    model, tokenizer, loaded, _ = dpmm.load_run(str(tmp_path / "a" / "final"))
    assert loaded.variant == variant and loaded.rationales == metrics["rationales_file"]
    _, _, records = dpmm.build_data(loaded)
    again = dpmm.evaluate(model, tokenizer, None, loaded, records)
    assert again["outputs"] == answer["outputs"] and again["accuracy"] == answer["accuracy"]


def test_only_the_dpmm_variant_trains_a_unet_and_has_a_diffusion_loss(tmp_path):
    result = dpmm.train(config(tmp_path, variant="dpmm"), progress=False)
    assert all(v > 0 for v in result["diffusion_loss"])
    assert result["model"].unet.conv_in.weight.requires_grad and not any(
        p.requires_grad for p in result["model"].vae.parameters())  # cached latents: the VAE is frozen
    control = dpmm.train(config(tmp_path / "c", variant="fixed_features"), progress=False)
    assert all(v == 0 for v in control["diffusion_loss"]) and not hasattr(control["model"], "unet")


def test_a_missing_rationale_names_the_record(tmp_path):
    from mmlatent.train.checkpoint import write_json
    path = str(tmp_path / "rationales.json")
    write_json(path, {"rationales": {"nobody": "x"}})
    run = config(tmp_path / "a", stage="answer", rationales=path)
    result = dpmm.train(run, progress=False)
    with pytest.raises(ValueError, match="has no rationale for record 'test-0-0'"):
        dpmm.evaluate_result(result, run)


def test_resume_is_bit_exact(tmp_path):
    whole = dpmm.train(config(tmp_path / "w", train={"max_steps": 4}), progress=False)
    stopped = dpmm.train(config(tmp_path / "s", train={"max_steps": 4}), progress=False, until=2)
    resumed = dpmm.train(config(tmp_path / "s", train={"max_steps": 4}), progress=False, resume=stopped["checkpoint"])
    assert [s["loss"] for s in resumed["history"]["train"]] == [s["loss"] for s in whole["history"]["train"]]
    for a, b in zip(resumed["model"].state_dict().values(), whole["model"].state_dict().values()):
        assert torch.equal(a, b)


def _multi30k(root, images):
    import gzip

    from PIL import Image
    raw, splits = root / "data" / "task1" / "raw", root / "data" / "task1" / "image_splits"
    raw.mkdir(parents=True)
    splits.mkdir(parents=True)
    images.mkdir()
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    german = {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb"}
    for split, n in (("train", 24), ("val", 6)):
        lines = {"en": [], "de": [], "img": []}
        for i in range(n):
            colour = colours[int(rng.integers(4))]
            lines["en"].append(f"A {colour} square .")
            lines["de"].append(f"Ein {german[colour]} Quadrat .")
            name = f"{split}{i}.png"
            Image.fromarray(np.full((16, 16, 3), 40 * i % 255, dtype=np.uint8)).save(images / name)
            lines["img"].append(name)
        for lang in ("en", "de"):
            with gzip.open(raw / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(lines[lang]) + "\n")
        (splits / f"{split}.txt").write_text("\n".join(lines["img"]) + "\n")


def _hf_t5_folder(path, words):
    """A tiny T5 saved with a Hugging Face tokenizer (a word tokenizer's, as transformers writes it)."""
    from mmlatent.data.tokenizer import WordTokenizer
    from mmlatent.models import tiny
    tokenizer = WordTokenizer(words, cased=True).to_hf()
    t5 = tiny.tiny_t5(vocab=len(tokenizer), d_model=32, layers=1, heads=2, d_ff=64)
    t5.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_the_translation_task_runs_on_multi30k_files(tmp_path):
    _multi30k(tmp_path / "multi30k", tmp_path / "flickr")
    t5 = _hf_t5_folder(tmp_path / "t5", "A Ein square Quadrat . red green blue yellow rot grün blau gelb".split())
    vae, unet = tmp_path / "vae", tmp_path / "unet"
    from mmlatent.models import tiny
    tiny.tiny_vae(block_out_channels=(32, 32)).save_pretrained(vae)
    tiny.tiny_unet(cross_attention_dim=32, block_out_channels=(32, 32)).save_pretrained(unet)
    run = config(tmp_path / "out", task="translation", model={"path": {"t5": t5, "vae": str(vae), "unet": str(unet)}},
                 data={"multi30k": {"root": str(tmp_path / "multi30k"), "train": "train", "eval": "val",
                                    "image_root": str(tmp_path / "flickr")}})
    result = dpmm.train(run, progress=False)
    metrics = dpmm.evaluate_result(result, run)
    assert metrics["task"] == "translation" and 0.0 <= metrics["bleu"] <= 100.0 and metrics["n"] == 6
    model, tokenizer, loaded, _ = dpmm.load_run(result["checkpoint"])
    assert isinstance(tokenizer, dpmm.TextTokenizer) and len(tokenizer) == len(result["tokenizer"])


def test_the_cli_trains_both_stages_and_evaluates(tmp_path, capsys):
    import yaml

    from mmlatent import cli
    first = dict(name="cli-r", method="dpmm", model=TINY, data={"synthetic": {"n_train": 32, "n_eval": 8}},
                 batch_size=8, max_new_tokens=12, train=dict(lr=3e-3, max_steps=2, output_dir=str(tmp_path / "r")))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(first))
    assert cli.main(["train", "--config", str(tmp_path / "r.yaml")]) == 0
    second = dict(first, name="cli-a", stage="answer", rationales=str(tmp_path / "r" / "rationales.json"),
                  train=dict(first["train"], output_dir=str(tmp_path / "a")))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(second))
    assert cli.main(["train", "--config", str(tmp_path / "a.yaml")]) == 0
    out = capsys.readouterr().out
    assert "cli-r (dpmm, scienceqa, rationale): ROUGE-L" in out and "cli-a (dpmm, scienceqa, answer): accuracy" in out
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "a" / "final"), "--n", "4"]) == 0


def test_config_errors_name_the_key(tmp_path):
    for changes, needle in (({"variant": "clip"}, "variant: expected one of dpmm, fixed_features, text_only"),
                            ({"stage": "all"}, "stage: expected one of rationale, answer, both"),
                            ({"task": "translation"}, "data: synthetic data for task 'translation'"),
                            ({"model": {"tiny": {"clip": {}}}}, "model.tiny: expected a mapping of t5, vae, unet"),
                            ({"model": {"tiny": {"t5": {"width": 3}}}}, "model.tiny.t5: expected some of"),
                            ({"model": {"path": {"t5": str(tmp_path)}}}, "model.path.t5: .* is not a local model"),
                            ({"data": {"scienceqa": {}}}, "data.scienceqa.root: required"),
                            ({"image_size": 0}, "image_size")):
        with pytest.raises(ValueError, match=needle):
            config(tmp_path, **changes)
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(ValueError, match="rationales: only an answer run"):
        config(tmp_path, rationales=str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match="is not a rationales file"):
        dpmm.read_rationales(str(tmp_path / "r.json"))
    with pytest.raises(FileNotFoundError, match="rationales: no file at .*none.json"):
        dpmm.train(config(tmp_path, stage="answer", rationales=str(tmp_path / "none.json")), progress=False)
    assert not os.path.exists(tmp_path / "final")


def test_the_paper_sized_configs_parse_and_name_the_missing_paths(tmp_path):
    from mmlatent.train.methods import from_mapping, load_config, read_yaml
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("dpmm-cot-base-scienceqa.yaml", "dpmm-cot-base-scienceqa-answer.yaml"):
        path = os.path.join(root, "configs", name)
        with pytest.raises(ValueError, match="model.path.t5: '/path/to/flan-alpaca-base' is not a local model"):
            load_config(path)
        raw = read_yaml(path)
        folder = tmp_path / "model"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
        parsed = from_mapping(dpmm.DPMMConfig, dict(raw, model={"path": {p: str(folder) for p in ("t5", "vae",
                                                                                                   "unet")}}), path)
        assert parsed.feature_blocks == ["mid"] and parsed.image_size == 256 and parsed.train["lr"] == 8e-5
        assert parsed.cache_latents is False and parsed.batch_size == 8


def test_stage_both_trains_the_rationale_run_then_the_answer_run_on_its_rationales(tmp_path):
    run = config(tmp_path, stage="both")
    result = dpmm.train(run, progress=False)
    metrics = dpmm.evaluate_result(result, run)
    first, second = dpmm.stage_configs(run)
    assert (tmp_path / "rationale" / "final").is_dir() and (tmp_path / "answer" / "final").is_dir()
    assert metrics["rationales_source"] == second.rationales == str(tmp_path / "rationale" / dpmm.RATIONALES_FILE)
    assert set(metrics["rationale_scores"]) == {"rouge_l", "bleu1", "bleu4"}
    assert any("its rationales: ROUGE-L" in line for line in dpmm.summary_lines(metrics))
    _, _, loaded, _ = dpmm.load_run(str(tmp_path / "answer" / "final"))
    assert loaded.stage == "answer" and loaded.name == "t-answer"
    with pytest.raises(ValueError, match="stage: both .* needs task scienceqa and train.output_dir"):
        config(None, stage="both", train={"output_dir": None})
    with pytest.raises(ValueError, match="resume: a stage: both run is two runs"):
        dpmm.train(run, progress=False, until=1)


def test_the_demo_evaluates_the_shipped_runs_on_their_own_rationales(tmp_path, monkeypatch):
    from mmlatent import demo
    monkeypatch.chdir(tmp_path)  # the shipped answer runs name their rationales relative to the repository
    monkeypatch.setattr(demo, "DPMM_EVAL_N", 4)
    rows = demo.dpmm_part(str(tmp_path), demo.shipped_checkpoints())
    assert [r["variant"] for r in rows] == ["text_only", "fixed_features", "dpmm"]
    assert all(r["n"] == 4 and r["rationales_source"].endswith("rationales.json") for r in rows)
    assert "| synthetic-dpmm-cot-answer | dpmm |" in (tmp_path / "demo-dpmm.md").read_text()


def test_the_shipped_configs_differ_only_in_name_variant_and_output_dir():
    from dataclasses import asdict

    from mmlatent.train.methods import load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    configs = {name: asdict(load_config(os.path.join(root, "configs", f"{name}.yaml")))
               for name in ("synthetic-dpmm-cot", "synthetic-dpmm-cot-fixed-features", "synthetic-dpmm-cot-text-only")}
    assert {c["variant"] for c in configs.values()} == set(dpmm.VARIANTS)
    assert all(c["stage"] == "both" and c["train"]["output_dir"] == f"checkpoints/{name}" for name, c in
               configs.items())
    def shared(c):
        c = dict(c, train={k: v for k, v in c["train"].items() if k != "output_dir"})
        return repr({k: v for k, v in c.items() if k not in ("name", "variant")})
    assert len({shared(c) for c in configs.values()}) == 1
