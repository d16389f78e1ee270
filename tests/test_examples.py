"""The runnable examples: each runs as a user runs it (its own process), and what it reports holds."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mmlatent.train.loop import batch_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it on a CPU: the torch backend
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_train_causal_lm_learns_and_resumes_exactly(tmp_path):
    full = run_example("train_causal_lm.py", "--steps", "16", "--no-progress", "--output-dir", str(tmp_path / "a"),
                       "--save-every", "8", cwd=tmp_path)
    assert full["last_loss"] < 0.7 * full["first_loss"]
    assert full["median_tokens_per_s"] > 0
    resumed = run_example("train_causal_lm.py", "--steps", "16", "--no-progress",
                          "--resume", str(tmp_path / "a" / "checkpoint-8"), cwd=tmp_path)
    assert resumed["steps"] == 16 and resumed["last_loss"] == pytest.approx(full["last_loss"], rel=1e-6)


def test_batch_tokens_counts_a_plain_causal_lm_batch():
    ids = torch.ones(3, 7, dtype=torch.long)
    assert batch_tokens({"input_ids": ids, "labels": ids}) == 21
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :4] = 0
    assert batch_tokens({"input_ids": ids, "attention_mask": mask}) == 17
    assert batch_tokens({"labels": ids}) == 21
    assert batch_tokens({"pixel_values": torch.zeros(2, 3)}) == 0
