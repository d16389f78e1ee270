"""The benchmark harness runs end to end and writes its three result files; memory probes measure real bytes."""
import json

import torch

from mmlatent import bench


def test_bench_tiny_writes_json_markdown_png(tmp_path):
    assert bench.main(["--sizes", "tiny", "--out", str(tmp_path), "--repeats", "2", "--no-memory"]) == 0
    result = json.loads((tmp_path / "kernels-tiny.json").read_text())
    assert (tmp_path / "kernels-tiny.png").stat().st_size > 1000
    table = (tmp_path / "kernels-tiny.md").read_text()
    ops = {r["op"] for r in result["rows"]}
    assert ops == {"attention_with_scores", "row_attention_mass", "select_topk_tokens", "linear_cross_entropy",
                   "linear_log_probs", "ivtlr training step", "ivtlr training step, grad checkpointing",
                   "ivtlr inference (+32 tokens)", "layer_norm_modulate", "diffusion_mse",
                   "diffusion head sample"}
    baselines = [r for r in result["rows"] if r["impl"] != "mmlatent"]
    assert baselines and all(r["speedup_of_mmlatent"] > 0 for r in baselines)
    assert "eager+output_attentions" in table and "sdpa" in table and "torch topk" in table
    assert "logits+F.cross_entropy" in table and "logits+log_softmax" in table
    assert "ivtlr_reference (public code)" in table
    assert "x this floor" in table  # the diffusion row's distance to 50 head forwards


def test_loss_cases_return_the_same_gradients_as_their_baselines():
    for case in bench.cases_for("tiny"):
        if case.op not in ("linear_cross_entropy", "linear_log_probs", "layer_norm_modulate",
                           "diffusion_mse"):
            continue
        args = case.make(torch.device("cpu"), torch.float32)
        ours = case.ours(args)
        for name, baseline in case.baselines.items():
            for a, b in zip(ours, baseline(args)):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (case.shape, name)


def test_cpu_peak_memory_probe_sees_an_allocation():
    size = 8 * 2**20
    peak = bench.peak_memory_here(lambda _: torch.ones(size // 4).sum(), None, torch.device("cpu"))
    assert size * 0.9 <= peak <= size * 3


def test_attention_flops_formula():
    # 1 row, 3 keys, not causal: QK and PV each 3 MACs per head-dim element
    assert bench.attention_flops(1, 1, 1, 3, 4, causal=False) == 2 * 3 * 4 * 2
    # causal, M = N = 2: visible pairs 1 + 2 = 3
    assert bench.attention_flops(1, 1, 2, 2, 1, causal=True) == 2 * 3 * 2


def test_ivtlr_cases_agree_with_their_reference():
    for case in bench.cases_for("tiny"):
        if not case.op.startswith("ivtlr"):
            continue
        args = case.make(torch.device("cpu"), torch.float32)
        ours, theirs = case.ours(args), case.baselines["ivtlr_reference (public code)"](args)
        if isinstance(ours, torch.Tensor):  # generated tokens
            assert torch.equal(ours, theirs) and ours.shape == (2, 32)
        else:  # gradients of the trainable parameters
            assert len(ours) == len(theirs) > 0
            for a, b in zip(ours, theirs):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
