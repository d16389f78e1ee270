"""Checkpoints never lose a run and never load a corrupt one: saves killed (SIGKILL, in a real subprocess) at every
stage, also while an older checkpoint of the same name is replaced; content hashes; errors naming the file;
resume refusing a changed config; bit-exact resume at every step of an IVT-LR curriculum; reproducible runs."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fault_injection import make_run
from mmlatent.train import checkpoint as ckpt
from mmlatent.train.checkpoint import CheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "fault_injection.py")


def _child(out_dir, phase, kill_at):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, CHILD, str(out_dir), phase, str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=120)


def _weights_after(steps):
    model, trainer = make_run()
    trainer.fit(until=steps)
    return {n: p.detach().clone() for n, p in trainer.named_params}


def _loaded_weights(directory):
    path = ckpt.resolve_checkpoint(directory)
    return ckpt.load_tensors(path, "model.safetensors")


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("phase", ["first", "replace"])
def test_save_killed_at_every_stage_leaves_a_complete_checkpoint(tmp_path, phase):
    counted = _child(tmp_path / "count", phase, -1)
    assert counted.returncode == 0, counted.stderr
    calls = int(counted.stdout.split()[-1])
    assert calls >= 12  # writes, fsyncs, the manifest, the renames and the clean-up are all separate stages
    old, new = _weights_after(2), _weights_after(3)
    survivors = set()
    with ThreadPoolExecutor(2) as pool:  # two killed processes at a time: one per core
        runs = list(pool.map(lambda k: _child(tmp_path / f"kill{k}", phase, k), range(calls)))
    for kill_at, done in enumerate(runs):
        out = tmp_path / f"kill{kill_at}"
        assert done.returncode == -signal.SIGKILL, (kill_at, done.stderr)
        directory = str(out / "ckpt")
        if phase == "first" and not any(os.path.isdir(directory + s) and os.path.exists(
                os.path.join(directory + s, ckpt.MANIFEST)) for s in ("", ".tmp", ".old")):
            with pytest.raises(CheckpointError):  # killed before the first checkpoint was complete: none claimed
                ckpt.resolve_checkpoint(directory)
            survivors.add("none")
            continue
        weights = _loaded_weights(directory)
        which = "new" if _same(weights, new) else "old" if _same(weights, old) else "neither"
        assert which != "neither", kill_at
        assert phase == "replace" or which == "new"
        survivors.add(which)
        # resume reads whichever copy survived, and recovery puts it in place and removes the leftovers
        _, trainer = make_run()
        trainer.resume(directory)
        assert trainer.step == (3 if which == "new" else 2)
        ckpt.recover_checkpoint(directory)
        assert sorted(os.listdir(out)) == ["ckpt"]
        assert _same(ckpt.load_tensors(directory, "model.safetensors"), weights)
    # the enumeration really reached both sides of the replacement
    assert survivors == ({"old", "new"} if phase == "replace" else {"none", "new"})


def test_training_process_killed_at_random_times_resumes_exactly(tmp_path):
    """A real training process saving every step is SIGKILLed at random instants; every checkpoint it left is
    complete and verified, and resuming the newest one ends with the weights of an uninterrupted run."""
    steps = 30
    _, reference = make_run(max_steps=steps)
    reference.fit()
    expected = {n: p.detach().clone() for n, p in reference.named_params}
    rng = random.Random(0)
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for trial in range(3):
        out = tmp_path / f"run{trial}"
        child = subprocess.Popen([sys.executable, CHILD, str(out), "long", str(steps)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-2").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        names = {name.split(".")[0] for name in os.listdir(out) if name.startswith("checkpoint-")}
        loadable = {int(n.split("-")[1]) for n in names if _loadable(out / n)}
        assert loadable, child.stderr.read()
        unfinished = names - {f"checkpoint-{s}" for s in loadable}
        assert len(unfinished) <= 1  # only the save in flight, which never shows under its final name
        assert not any(os.path.exists(out / n) for n in unfinished)
        newest = max(loadable)
        model, trainer = make_run(max_steps=steps)
        trainer.resume(str(out / f"checkpoint-{newest}"))
        trainer.fit()
        assert _same({n: p.detach() for n, p in trainer.named_params}, expected), (trial, newest)


def _loadable(path):
    try:
        ckpt.resolve_checkpoint(str(path))
        return True
    except CheckpointError:
        return False


# ----------------------------------------------------------------------------------------- corrupt files


@pytest.fixture
def saved(tmp_path):
    _, trainer = make_run()
    trainer.fit(until=2)
    return trainer.save(str(tmp_path / "ckpt"))


def test_flipped_bytes_are_refused_naming_the_file(saved):
    path = os.path.join(saved, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) - 1000, len(data)):  # 1000 bytes of tensor data: still a valid safetensors file
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert ckpt.load_tensors(saved, "model.safetensors")  # the file parses: only the hash can tell
    _, trainer = make_run()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: content differs from the manifest"):
        trainer.resume(saved)


def test_truncated_and_missing_files_are_refused_naming_the_file(saved):
    path = os.path.join(saved, "optimizer.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)
    _, trainer = make_run()
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: \d+ bytes where the manifest records"):
        trainer.resume(saved)
    os.remove(os.path.join(saved, ckpt.MANIFEST))
    with pytest.raises(CheckpointError, match="no manifest.json"):
        trainer.resume(saved)


@pytest.mark.parametrize("name", ["trainer.json", "model.safetensors"])
def test_truncated_file_with_a_matching_manifest_names_the_file(saved, name):
    """A file damaged before the manifest was computed (e.g. copied from a torn download and re-hashed)."""
    path = os.path.join(saved, name)
    os.truncate(path, os.path.getsize(path) // 2)
    ckpt.write_manifest(saved)
    _, trainer = make_run()
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', chr(92) + '.')}: not (valid JSON|a readable "
                                              rf"safetensors file)"):
        trainer.resume(saved)


def test_parameter_shape_mismatch_names_the_parameter_and_both_shapes(saved):
    from torch import nn
    model, trainer = make_run()
    model[0] = nn.Linear(4, 32)  # another width than the checkpoint's 64
    model[3] = nn.Linear(32, 1)
    trainer.__init__(model, trainer.loss_fn, trainer.batches, trainer.config)
    with pytest.raises(CheckpointError, match=r"0\.weight has shape \[64, 4\] in the checkpoint but \[32, 4\]"):
        trainer.resume(saved)


def test_nothing_is_changed_by_a_refused_resume(saved):
    model, trainer = make_run()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    os.truncate(os.path.join(saved, "rng.safetensors"), 10)
    with pytest.raises(CheckpointError):
        trainer.resume(saved)
    assert _same(before, {n: p.detach() for n, p in model.named_parameters()}) and trainer.step == 0


# ----------------------------------------------------------------------------------------- config on resume


def test_resume_refuses_a_changed_config_listing_the_keys(saved, caplog):
    _, trainer = make_run(lr=0.3)
    with pytest.raises(ValueError, match=r"differs in train\.lr: 0\.03 -> 0\.3.*--allow-config-change"):
        trainer.resume(saved)
    assert trainer.step == 0
    with caplog.at_level("WARNING", logger="mmlatent"):
        trainer.resume(saved, allow_config_change=True)
    assert "train.lr changed from 0.03 to 0.3" in caplog.text
    factor = trainer._lr_factor(trainer.step)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * factor)
    trainer.fit(until=3)  # the schedule continues from the new base learning rate
    assert trainer.history["train"][-1]["lr"] == pytest.approx(0.3 * trainer._lr_factor(3))


def test_result_neutral_keys_do_not_block_a_resume(saved, tmp_path):
    _, trainer = make_run(output_dir=str(tmp_path / "elsewhere"), save_every=5)
    trainer.resume(saved)  # output folder and save interval cannot change the weights
    assert trainer.step == 2


# ----------------------------------------------------------------------------------------- IVT-LR runs


TINY = dict(model={"tiny_qwen2_vl": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64}},
            data={"synthetic": {"n_train": 16, "n_eval": 4, "seed": 0}}, batch_size=8, k=2, max_new_tokens=4,
            train={"lr": 0.003, "warmup_steps": 1, "clip": 1.0, "seed": 0, "progress": False})


def _run_config(tmp_path, **changes):
    from mmlatent.train import ivtlr as runs
    train_extra = changes.pop("train_extra", {})
    options = dict(TINY, name="t", mode="ivtlr", epochs=4, epochs_per_stage=1, reset_optimizer_per_stage=True)
    options.update(changes)
    options["train"] = dict(options["train"], output_dir=str(tmp_path), **train_extra)
    return runs.RunConfig(**options)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_ivtlr_run_interrupted_at_any_step_resumes_bit_exactly(tmp_path):
    """2 steps per epoch, a stage per epoch and the optimizer reset at each stage (the public ScienceQA recipe):
    one run saving after every step, resumed from each of those checkpoints, ends with the uninterrupted weights."""
    from mmlatent.train import ivtlr as runs
    whole = runs.train(_run_config(tmp_path / "whole"), progress=False)
    expected = _trainable(whole["model"])
    steps = whole["steps"]
    assert steps == 8
    interrupted = _run_config(tmp_path / "cut", train_extra={"save_every": 1})
    first = runs.train(interrupted, progress=False, until=steps - 1)
    assert not first["completed"] and not os.path.exists(tmp_path / "cut" / "final")  # only a finished run
    for step in range(1, steps):
        resumed = runs.train(interrupted, progress=False, resume=str(tmp_path / "cut" / f"checkpoint-{step}"))
        assert resumed["completed"]
        got = _trainable(resumed["model"])
        assert _same(got, expected), f"resumed from step {step}"


def test_run_stopped_by_until_writes_no_final(tmp_path):
    from mmlatent.train import ivtlr as runs
    result = runs.train(_run_config(tmp_path, epochs=2), progress=False, until=2)
    assert not result["completed"] and sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    with pytest.raises(CheckpointError):
        runs.load_run(str(tmp_path / "final"))


def test_ivtlr_resume_refuses_a_changed_run_config(tmp_path):
    from mmlatent.train import ivtlr as runs
    runs.train(_run_config(tmp_path, epochs=2), progress=False, until=2)
    changed = _run_config(tmp_path, epochs=2, batch_size=4, mode="cot")
    with pytest.raises(ValueError, match=r"differs in batch_size: 8 -> 4; mode: \"ivtlr\" -> \"cot\""):
        runs.train(changed, progress=False, resume=str(tmp_path / "checkpoint-2"))


def test_load_run_errors_name_the_file_and_parameter(tmp_path):
    from mmlatent.train import ivtlr as runs
    runs.train(_run_config(tmp_path, epochs=1, mode="no_cot"), progress=False)
    final = str(tmp_path / "final")
    run = json.load(open(os.path.join(final, "run.json")))
    run["result"]["name"] = "edited"
    json.dump(run, open(os.path.join(final, "run.json"), "w"))
    with pytest.raises(CheckpointError, match=r"run\.json: \d+ bytes where the manifest records"):
        runs.load_run(final)
    config = json.load(open(os.path.join(final, "config.json")))
    config["text_config"]["intermediate_size"] = 48
    json.dump(config, open(os.path.join(final, "config.json"), "w"))
    ckpt.write_manifest(final)  # deliberate edits, re-hashed: now the shapes disagree
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor \S*mlp\.\w+_proj\.weight has shape "
                                              r"\[\d+, \d+\] in the checkpoint but \[\d+, \d+\] in the model"):
        runs.load_run(final)


def _two_runs_identical(tmp_path, config_for):
    from mmlatent.train import ivtlr as runs
    weights = []
    for name in ("a", "b"):
        torch.manual_seed(1234 if name == "a" else 4321)  # whatever the process did before must not matter
        random.seed(name)
        result = runs.train(config_for(tmp_path / name), progress=False)
        weights.append({k: v.detach().clone() for k, v in result["model"].state_dict().items()})
    assert _same(*weights)


@pytest.mark.parametrize("mode,no_image", [("no_cot", False), ("cot", False), ("ivtlr", False), ("ivtlr", True)])
def test_synthetic_runs_are_reproducible_from_their_seed(tmp_path, mode, no_image):
    _two_runs_identical(tmp_path, lambda out: _run_config(out, mode=mode, no_image=no_image, epochs=2,
                                                          data={"synthetic": {"n_train": 8, "n_eval": 2}}))


def test_chameleon_run_is_reproducible_from_its_seed(tmp_path):
    model = {"tiny_chameleon": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64}}
    _two_runs_identical(tmp_path, lambda out: _run_config(out, model=model, epochs=2,
                                                          data={"synthetic": {"n_train": 8, "n_eval": 2}}))


def test_local_checkpoint_with_lora_is_reproducible_from_its_seed(tmp_path):
    """A model loaded from a path with LoRA: the adapters are initialised after the run is seeded."""
    from test_train_ivtlr import local_qwen2_vl_checkpoint
    checkpoint, data = local_qwen2_vl_checkpoint(tmp_path)
    spec = {"scienceqa": {"root": str(data), "train_split": "train", "eval_split": "train"}}
    _two_runs_identical(tmp_path, lambda out: _run_config(
        out, model={"path": str(checkpoint)}, data=spec, batch_size=2, epochs=2, k=1,
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}))


# ----------------------------------------------------------------------------------------- altered manifests


def _edit_manifest(directory, edit):
    path = os.path.join(directory, ckpt.MANIFEST)
    manifest = json.load(open(path))
    edit(manifest["files"])
    json.dump(manifest, open(path, "w"))


def test_a_file_left_out_of_the_manifest_is_refused(saved):
    _edit_manifest(saved, lambda files: files.pop("model.safetensors"))
    _, trainer = make_run()
    with pytest.raises(CheckpointError, match=r"does not list model\.safetensors"):
        trainer.resume(saved)
    _edit_manifest(saved, lambda files: files.clear())
    with pytest.raises(CheckpointError, match="does not list"):
        trainer.resume(saved)


@pytest.mark.parametrize("entry", [7, {"size": 1}, {"bytes": "1", "sha256": "x"}])
def test_a_malformed_manifest_entry_names_the_entry(saved, entry):
    _edit_manifest(saved, lambda files: files.update({"trainer.json": entry}))
    with pytest.raises(CheckpointError, match=r"manifest\.json: entry 'trainer\.json' is not a file name"):
        ckpt.verify_checkpoint(saved)


@pytest.mark.parametrize("edit", [lambda s: s.update(step="x"), lambda s: s.update(data={}),
                                  lambda s: s.update(optimizer={}), lambda s: s.update(scheduler=5),
                                  lambda s: s.update(python_rng=[1]), lambda s: s.clear()])
def test_bad_trainer_state_is_refused_naming_the_file_and_changes_nothing(saved, edit):
    path = os.path.join(saved, "trainer.json")
    state = json.load(open(path))
    edit(state)
    json.dump(state, open(path, "w"))
    ckpt.write_manifest(saved)  # a matching manifest: only the content check can tell
    model, trainer = make_run()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=r"trainer\.json"):
        trainer.resume(saved)
    assert _same(before, {n: p.detach() for n, p in model.named_parameters()}) and trainer.step == 0


def test_recover_keeps_the_siblings_of_a_damaged_folder(saved):
    import shutil
    shutil.copytree(saved, saved + ".old")
    os.truncate(os.path.join(saved, "model.safetensors"), 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.recover_checkpoint(saved)
    assert os.path.isdir(saved + ".old")  # possibly the only good copy: never deleted before DIR is verified
    _, trainer = make_run()
    trainer.fit(until=3)
    trainer.save(saved)  # a new save replaces the damaged folder and only then drops the old copy
    assert sorted(os.listdir(os.path.dirname(saved))) == ["ckpt"]
    ckpt.verify_checkpoint(saved)
