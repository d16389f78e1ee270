"""The training loop: it learns, checkpoints atomically, and an interrupted-and-resumed run ends with exactly the
parameters of an uninterrupted one."""
import os

import pytest
import torch

import fault_injection
from mmlatent.train import EpochBatches, TrainConfig, warmup_cosine
from mmlatent.train.checkpoint import CheckpointError


def make_run(tmp_path, max_steps):
    return fault_injection.make_run(str(tmp_path), max_steps=max_steps)


def test_resumed_run_ends_with_the_same_parameters(tmp_path):
    model_a, trainer_a = make_run(tmp_path / "a", 10)
    trainer_a.fit()
    model_b, trainer_b = make_run(tmp_path / "b", 10)
    trainer_b.fit(until=4)  # interrupted after 4 of 10 steps
    path = trainer_b.save(str(tmp_path / "b" / "checkpoint-4"))
    torch.manual_seed(123)  # whatever the process did in between
    model_c, trainer_c = make_run(tmp_path / "c", 10)
    trainer_c.resume(path)
    trainer_c.fit()
    for (name, a), (_, c) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(a, c), name
    assert [r["loss"] for r in trainer_a.history["train"]] == [r["loss"] for r in trainer_c.history["train"]]
    assert trainer_a.history["train"][-1]["loss"] < trainer_a.history["train"][0]["loss"]  # it learns


def test_checkpoint_is_complete_or_absent(tmp_path):
    _, trainer = make_run(tmp_path, 2)
    trainer.fit()
    path = trainer.save(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(path)) == ["manifest.json", "model.safetensors", "optimizer.safetensors",
                                        "rng.safetensors", "trainer.json"]
    assert not os.path.exists(path + ".tmp") and not os.path.exists(path + ".old")
    os.remove(os.path.join(path, "rng.safetensors"))
    with pytest.raises(CheckpointError, match="rng.safetensors: listed in manifest.json but missing"):
        trainer.resume(path)


def test_schedule_and_bad_config():
    assert warmup_cosine(0, 4, 100, 0.0) == 0.25 and warmup_cosine(3, 4, 100, 0.0) == 1.0
    assert abs(warmup_cosine(100, 4, 100, 0.1) - 0.1) < 1e-12
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatches([1, 2], 3, lambda r, e: r)
