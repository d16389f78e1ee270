"""The `mmlatent` command speaks to people: a user error is one line on stderr and a non-zero exit, checked before
any work starts (a real subprocess, so no traceback can hide); --debug shows the traceback; every option has
help; `mmlatent bench` takes the benchmark's options; eval writes nothing into the checkpoint; the demo finds
the shipped checkpoints from any folder; recover finishes an interrupted checkpoint replacement."""
import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from mmlatent import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "checkpoints", "synthetic-no-cot", "final")
TINY = dict(model={"tiny_qwen2_vl": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64}},
            data={"synthetic": {"n_train": 8, "n_eval": 2, "seed": 0}}, batch_size=8, k=2, max_new_tokens=4,
            mode="no_cot", epochs=1, train={"lr": 0.003, "seed": 0, "progress": False})


def mmlatent(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mmlatent.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _config(tmp_path, **changes):
    config = dict(TINY, **changes)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config) if isinstance(config, dict) else config)
    return path


def _one_line_error(done, *needles):
    assert done.returncode == cli.EXIT_USER_ERROR, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr  # one line, no traceback, no progress noise
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_config_errors_are_one_line(tmp_path):
    _one_line_error(mmlatent("train", "--config", tmp_path / "absent.yaml"), "no such file", "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nepochs: [1,\n")
    _one_line_error(mmlatent("train", "--config", bad), "not valid YAML at line")
    _one_line_error(mmlatent("train", "--config", _config(tmp_path, learning_rate=3)), "unknown keys",
                    "learning_rate")
    _one_line_error(mmlatent("train", "--config", _config(tmp_path, epochs=0)), "epochs", "expected an int in [1,",
                    "got 0")
    _one_line_error(mmlatent("train", "--config", _config(tmp_path, train={"lr": -1})), "train.lr")
    _one_line_error(mmlatent("train", "--config", _config(tmp_path, train={"lrate": 1})), "train: unknown keys",
                    "lrate")
    _one_line_error(mmlatent("train", "--config", _config(tmp_path, model={"llava": {}})), "model: unknown kind",
                    "'llava'", "tiny_qwen2_vl, tiny_chameleon, qwen2_vl_7b_shapes, path")
    _one_line_error(mmlatent("train", "--config", _config(tmp_path, data={"coco": {}})), "data: unknown kind",
                    "synthetic, scienceqa, m3cot")
    _one_line_error(mmlatent("train", "--config", _config(tmp_path, data={"scienceqa": {}})),
                    "data.scienceqa.root: required")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    _one_line_error(mmlatent("train", "--config", tmp_path / "list.yaml"), "must hold a mapping")


def test_argument_errors_are_one_line(tmp_path):
    _one_line_error(mmlatent("eval", "--checkpoint", SHIPPED, "--n", "-1"), "--n", "positive integer")
    _one_line_error(mmlatent("eval", "--checkpoint", SHIPPED, "--n", "two"), "--n")
    _one_line_error(mmlatent("eval", "--checkpoint", tmp_path / "none"), "no such checkpoint folder")
    _one_line_error(mmlatent("frobnicate"), "invalid choice")
    _one_line_error(mmlatent("bench", "--sizes", "huge"), "--sizes")


def test_output_paths_are_checked_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "eval.json"
    _one_line_error(mmlatent("eval", "--checkpoint", SHIPPED, "--out", out), "--out", "cannot", str(blocker))
    config = _config(tmp_path, train=dict(TINY["train"], output_dir=str(blocker / "run")))
    _one_line_error(mmlatent("train", "--config", config), "train.output_dir")
    config = _config(tmp_path)
    _one_line_error(mmlatent("train", "--config", config, "--report", blocker / "r.json"), "--report")
    _one_line_error(mmlatent("demo", "--out", blocker / "demo"), "--out")


def test_debug_shows_the_traceback(tmp_path):
    done = mmlatent("--debug", "train", "--config", tmp_path / "absent.yaml")
    assert done.returncode != 0 and "Traceback" in done.stderr and "FileNotFoundError" in done.stderr


def test_every_option_has_help_and_version_exists():
    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert set(verbs) == {"demo", "train", "eval", "compare", "recover", "bench"}
    for name, verb in [("mmlatent", parser), *verbs.items()]:
        for action in verb._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, (name, action.option_strings)
    from mmlatent import __version__
    done = mmlatent("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"mmlatent {__version__}"


def test_bench_takes_the_benchmarks_options(tmp_path):
    from mmlatent import bench
    bench_options = {s for a in bench.add_arguments(argparse.ArgumentParser())._actions for s in a.option_strings}
    verb = cli.build_parser()._subparsers._group_actions[0].choices["bench"]
    assert bench_options <= {s for a in verb._actions for s in a.option_strings}
    done = mmlatent("bench", "--sizes", "tiny", "--ops", "select", "--repeats", "1", "--no-memory",
                    "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "kernels-tiny-select.json").read_text())["rows"]
    assert rows and all(r["op"].startswith("select") for r in rows)


def test_eval_without_out_writes_nothing_into_the_checkpoint(tmp_path):
    import shutil
    checkpoint = tmp_path / "final"
    shutil.copytree(SHIPPED, checkpoint)
    before = sorted(os.listdir(checkpoint))
    done = mmlatent("eval", "--checkpoint", checkpoint, "--n", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout
    assert sorted(os.listdir(checkpoint)) == before and sorted(os.listdir(tmp_path)) == ["final"]
    done = mmlatent("eval", "--checkpoint", checkpoint, "--n", "2", "--out", tmp_path / "e.json")
    assert done.returncode == 0 and json.loads((tmp_path / "e.json").read_text())["n"] == 2


def test_eval_refuses_a_corrupt_checkpoint_naming_the_file(tmp_path):
    import shutil
    checkpoint = tmp_path / "final"
    shutil.copytree(SHIPPED, checkpoint)
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)
    weights.write_bytes(bytes(data))
    _one_line_error(mmlatent("eval", "--checkpoint", checkpoint), "model.safetensors", "corrupt")


def test_demo_finds_the_shipped_checkpoints_from_any_folder(tmp_path, monkeypatch):
    from mmlatent import demo
    monkeypatch.chdir(tmp_path)
    found = demo.shipped_checkpoints()
    assert os.path.isabs(found)
    assert all(os.path.isdir(os.path.join(found, name, "final")) for name in demo.SHIPPED)
    assert all(os.path.isdir(os.path.join(found, name, stage, "final")) for name in demo.SHIPPED_DPMM
               for stage in ("rationale", "answer"))


def test_recover_finishes_an_interrupted_replacement(tmp_path):
    import shutil
    final = tmp_path / "final"
    shutil.copytree(SHIPPED, str(final) + ".old")  # the state after `final` was moved aside, before the rename
    (tmp_path / "final.tmp").mkdir()  # an incomplete new copy
    done = mmlatent("recover", "--checkpoint", final)
    assert done.returncode == 0 and "complete and verified" in done.stdout, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["final"]
    _one_line_error(mmlatent("recover", "--checkpoint", tmp_path / "other"), "nothing to recover")


def test_train_resume_with_a_changed_config_needs_the_flag(tmp_path):
    out = tmp_path / "run"
    config = _config(tmp_path, epochs=2, data={"synthetic": {"n_train": 16, "n_eval": 2, "seed": 0}},
                     train=dict(TINY["train"], output_dir=str(out), save_every=1))
    assert mmlatent("train", "--config", config).returncode == 0
    changed = _config(tmp_path, epochs=2, data={"synthetic": {"n_train": 16, "n_eval": 2, "seed": 0}},
                      train=dict(TINY["train"], output_dir=str(out), save_every=1, lr=0.03))
    _one_line_error(mmlatent("train", "--config", changed, "--resume", out / "checkpoint-1"),
                    "train.lr: 0.003 -> 0.03", "--allow-config-change")
    done = mmlatent("train", "--config", changed, "--resume", out / "checkpoint-1", "--allow-config-change")
    assert done.returncode == 0, done.stderr
    assert "train.lr changed from 0.003 to 0.03" in done.stderr


def test_bench_errors_are_one_line_and_checked_first(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(mmlatent("bench", "--dtype", "bogus"), "--dtype")
    _one_line_error(mmlatent("bench", "--repeats", "0"), "--repeats", "positive integer")
    _one_line_error(mmlatent("bench", "--sizes", "tiny", "--ops", "zzz"), "--ops", "no benchmark row")
    _one_line_error(mmlatent("bench", "--sizes", "tiny", "--out", blocker / "x"), "--out")
    assert not list(tmp_path.glob("kernels*"))


def test_debug_is_also_taken_after_the_verb(tmp_path):
    done = mmlatent("eval", "--checkpoint", tmp_path / "none", "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr and "CheckpointError" in done.stderr


@pytest.mark.parametrize("model,needle", [
    ({"tiny_qwen2_vl": {"hidden": 1.5}}, "model.tiny_qwen2_vl.hidden"),
    ({"tiny_qwen2_vl": {"layers": "x"}}, "model.tiny_qwen2_vl.layers"),
    ({"tiny_qwen2_vl": {"kv_heads": 0}}, "model.tiny_qwen2_vl.kv_heads"),
    ({"tiny_qwen2_vl": {"hidden": 30}}, "not a multiple of heads"),
    ({"tiny_qwen2_vl": {"width": 3}}, "unknown keys ['width']"),
    ({"tiny_chameleon": {"text_vocab": "x"}}, "model.tiny_chameleon.text_vocab"),
    ({"path": "/nonexistent/model"}, "model.path: /nonexistent/model is not a model folder"),
    ({"path": 5}, "model.path: expected the path"),
])
def test_model_settings_are_checked_naming_the_key(tmp_path, model, needle):
    _one_line_error(mmlatent("train", "--config", _config(tmp_path, model=model)), needle)


@pytest.mark.parametrize("changes,needle", [
    ({"data": {"synthetic": {"image_size": [0, 0]}}}, "data.synthetic.image_size"),
    ({"data": {"synthetic": {"weights": 0}}}, "data.synthetic.weights"),
    ({"data": {"synthetic": {"seed": [1]}}}, "data.synthetic.seed"),
    ({"lora": {"r": "x"}}, "lora.r"),
    ({"lora": {"target_modules": 5}}, "lora.target_modules"),
    ({"lora": {"rank": 4}}, "lora: unknown keys ['rank']"),
    ({"train": {"grad_accum": 10**30}}, "train.grad_accum"),
])
def test_data_lora_and_train_settings_are_checked_naming_the_key(tmp_path, changes, needle):
    _one_line_error(mmlatent("train", "--config", _config(tmp_path, **changes)), needle)


def _local_model_folder(tmp_path):
    """A tiny Qwen2-VL saved with save_pretrained alone (no tokenizer, no image processor), its vocabulary the
    synthetic task's word tokenizer's, so the image ids line up."""
    from mmlatent.data import WordTokenizer, synthetic
    from mmlatent.models.tiny import tiny_qwen2_vl
    folder = tmp_path / "qwen2-vl-tiny"
    tiny_qwen2_vl(vocab=len(WordTokenizer(synthetic.vocabulary())), **TINY["model"]["tiny_qwen2_vl"]).save_pretrained(
        folder)
    return folder


def test_eval_of_a_local_model_run_with_the_word_tokenizer(tmp_path):
    """model.path with synthetic data: the run's tokenizer is the word tokenizer, and eval reads the tokenizer that
    was saved (not a Hugging Face one because the model came from a path: that read failed with KeyError
    'added_tokens')."""
    out = tmp_path / "run"
    config = _config(tmp_path, model={"path": str(_local_model_folder(tmp_path))},
                     train=dict(TINY["train"], output_dir=str(out)))
    done = mmlatent("train", "--config", config)
    assert done.returncode == 0, done.stderr
    assert "word_tokenizer.json" in os.listdir(out / "final")
    done = mmlatent("eval", "--checkpoint", out / "final", "--n", "2")
    assert done.returncode == 0 and "accuracy" in done.stdout, done.stderr


def test_eval_reads_a_first_format_run_of_a_local_model(tmp_path, capsys):
    """The first run format (model.safetensors of the state dict, the word tokenizer as tokenizer.json) of a
    model.path run: the tokenizer is told by its content."""
    from safetensors.torch import save_file

    from mmlatent.train import ivtlr as runs
    from mmlatent.train.checkpoint import write_checkpoint, write_json
    config = runs.RunConfig(**dict(TINY, model={"path": str(_local_model_folder(tmp_path))}))
    tokenizer, _, _ = runs.build_data(config)
    model = runs.build_model(config, len(tokenizer), torch.device("cpu"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    final = str(tmp_path / "old" / "final")
    write_checkpoint(final, {"model.safetensors": lambda path: save_file(state, path),
                             "run.json": lambda path: write_json(path, {"config": dataclasses.asdict(config),
                                                                        "result": {}}),
                             "tokenizer.json": tokenizer.save})
    wrapper, loaded_tokenizer, _, _ = runs.load_run(final)
    assert type(loaded_tokenizer).__name__ == "WordTokenizer" and loaded_tokenizer.tokens == tokenizer.tokens
    assert all(torch.equal(a, b) for a, b in zip(wrapper.vlm.state_dict().values(), state.values()))
    assert cli.main(["eval", "--checkpoint", final, "--n", "2"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_eval_of_a_training_checkpoint_says_what_to_do(tmp_path):
    out = tmp_path / "run"
    config = _config(tmp_path, epochs=2, data={"synthetic": {"n_train": 16, "n_eval": 2, "seed": 0}},
                     train=dict(TINY["train"], output_dir=str(out), save_every=1))
    assert mmlatent("train", "--config", config).returncode == 0
    _one_line_error(mmlatent("eval", "--checkpoint", out / "checkpoint-1"), "a training checkpoint",
                    "mmlatent train --resume")


MODAL_MIXED = dict(name="mm", method="modal_mixed", model=TINY["model"],
                   data={"synthetic": {"n_train": 8, "n_eval": 2, "seed": 0, "kinds": ["swap"]}}, batch_size=8,
                   head={"width": 16, "depth": 1}, sampler={"steps": 2}, max_new_tokens=4,
                   train={"lr": 0.003, "seed": 0, "progress": False})


def test_modal_mixed_config_errors_are_one_line(tmp_path):
    def config(**changes):
        path = tmp_path / "mm.yaml"
        path.write_text(yaml.safe_dump(dict(MODAL_MIXED, **changes)))
        return path
    _one_line_error(mmlatent("train", "--config", config(pool=[3, 3])), "mm.yaml", "unknown keys", "'pool'")
    _one_line_error(mmlatent("train", "--config", config(method="coconut")), "method: expected one of ivtlr, "
                                                                           "modal_mixed", "'coconut'")
    (tmp_path / "a-file").write_text("")
    _one_line_error(mmlatent("train", "--config", config(train={"output_dir": str(tmp_path / "a-file" / "x")})),
                    "train.output_dir")


def test_ivtlr_config_with_method_ivtlr_trains_as_without(tmp_path):
    done = mmlatent("train", "--config", _config(tmp_path, method="ivtlr"))
    assert done.returncode == 0, done.stderr
    assert "lenient, public code's scoring" in done.stdout


def test_eval_dispatches_a_modal_mixed_run_and_refuses_its_corrupt_head(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLATENT_BACKEND", "torch")  # not the interpreted Triton kernels in the subprocess
    out = tmp_path / "run"
    path = tmp_path / "mm.yaml"
    path.write_text(yaml.safe_dump(dict(MODAL_MIXED, train=dict(MODAL_MIXED["train"], output_dir=str(out)))))
    done = mmlatent("train", "--config", path)
    assert done.returncode == 0, done.stderr
    assert "mm: accuracy" in done.stdout and "ablation, latents -> zeros" in done.stdout
    done = mmlatent("eval", "--checkpoint", out / "final", "--n", 2, "--out", tmp_path / "e.json")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["method"] == "modal_mixed" and report["n"] == 2 and "latent_mse" in report
    with open(out / "final" / "diffusion_head.safetensors", "r+b") as f:
        f.seek(64)
        f.write(b"\0\1\2")
    _one_line_error(mmlatent("eval", "--checkpoint", out / "final"), "diffusion_head.safetensors", "corrupt")
