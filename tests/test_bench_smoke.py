"""The benchmark harness runs end to end and writes its three result files; memory probes measure real bytes."""
import ast
import json
import pathlib

import pytest
import torch

import mmlatent.kernels
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
                   "diffusion head sample", "apply_fused_loss training step", "modal-mixed SFT step",
                   "modal-mixed generate", "grpo loss + backward", "dpmm training step", "dpmm generation features",
                   "gated_mix", "geglu", "rms_norm", "denoise_step_", "select_image_tokens"}
    baselines = [r for r in result["rows"] if r["impl"] != "mmlatent"]
    assert baselines and all(r["speedup_of_mmlatent"] > 0 for r in baselines)
    assert "eager+output_attentions" in table and "sdpa" in table and "torch topk" in table
    assert "logits+F.cross_entropy" in table and "logits+log_softmax" in table
    assert "ivtlr_reference (public code)" in table
    assert "x this floor" in table  # the diffusion row's distance to 50 head forwards
    assert "mmlatent vs logits+F.cross_entropy: " in table  # every baseline read in one line


def test_demo_rows_are_cpu_set_rows_with_a_reading():
    """Each row the demo shows is a row of the default CPU set (a renamed case must rename its demo entry), and the
    reading of a row says faster or slower and leaner or heavier from its ratios."""
    demo = bench.cases_for("demo")
    assert {(c.op, c.shape) for c in demo} == set(bench.DEMO_ROWS)
    assert len(demo) == len(bench.DEMO_ROWS)
    row = dict(impl="eager", speedup_of_mmlatent=0.5, memory_ratio_of_mmlatent=0.25)
    assert bench.reading(row) == "mmlatent vs eager: 2.00x slower, 4.0x less peak memory"
    assert bench.reading(dict(impl="x", speedup_of_mmlatent=3.0)) == "mmlatent vs x: 3.00x faster"


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
    # above glibc's largest dynamic mmap threshold (32 MiB): always fresh pages, whatever earlier tests in this
    # process freed (an 8 MiB block could reuse heap pages that are already resident and add no RSS)
    size = 64 * 2**20
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


def test_modal_mixed_cases_agree_with_their_baselines():
    """The SFT step's loss and gradients equal the naive step's (same diffusion draws); generation writes the
    forced plan, ids equal to the reference loop's and latents within float tolerance; the floor runs."""
    from mmlatent.bench.cases import modal_mixed
    cases = [case for case in bench.cases_for("tiny") if case.op.startswith("modal-mixed")]
    assert [case.op for case in cases] == ["modal-mixed SFT step", "modal-mixed generate"]
    sft, generate = cases
    args = sft.make(torch.device("cpu"), torch.float32)
    (loss, grads), (naive_loss, naive_grads) = sft.ours(args), sft.baselines[modal_mixed.NAIVE_STEP](args)
    assert torch.allclose(loss, naive_loss, rtol=1e-5)
    assert len(grads) == len(naive_grads) > 0 and all(g is not None for g in grads)
    for a, b in zip(grads, naive_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    args = generate.make(torch.device("cpu"), torch.float32)
    ours, reference = generate.ours(args), generate.baselines[modal_mixed.REFERENCE](args)
    K = args["K"]
    assert ours.sequences.tolist() == [modal_mixed.plan(K)] * args["prompts"]["input_ids"].shape[0]
    assert torch.equal(ours.sequences, reference.sequences)
    for a, b in zip(ours.latents, reference.latents):
        assert a.shape == (modal_mixed.SKETCHES, K, args["model"].hidden_size) and a.abs().max() > 0
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert generate.baselines[modal_mixed.FLOOR](args).shape[0] == args["prompts"]["input_ids"].shape[0]


def test_grpo_case_agrees_with_the_trl_style_step():
    """Log-probs through linear_log_probs and TRL's logits + selective_log_softmax give the same loss and
    gradients."""
    from mmlatent.bench.cases import grpo
    case, = [case for case in bench.cases_for("tiny") if case.op == "grpo loss + backward"]
    args = case.make(torch.device("cpu"), torch.float32)
    (loss, grads), (naive_loss, naive_grads) = case.ours(args), case.baselines[grpo.NAIVE](args)
    assert torch.allclose(loss, naive_loss, rtol=1e-5, atol=1e-7)
    assert len(grads) == len(naive_grads) > 0 and all(g is not None for g in grads)
    for a, b in zip(grads, naive_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="CUDA"):
        grpo.cases("gpu")[0].make(torch.device("cpu"), torch.bfloat16)


def test_dpmm_cases_agree_with_their_baselines():
    """The DPMM-CoT training step (cached latents, fused gate, loss without logits) and the naive step give the
    same loss and gradients; one batched UNet call gives the per-timestep loop's features; gated_mix gives the
    unfused gate's gradients; the Base-shape rows refuse a CPU."""
    from mmlatent.bench.cases import dpmm
    cases = {case.op: case for case in bench.cases_for("tiny") if case.op in ("dpmm training step",
                                                                            "dpmm generation features", "gated_mix")}
    step = cases["dpmm training step"]
    (loss, grads), (naive_loss, naive_grads) = (step.ours(step.make(torch.device("cpu"), torch.float32)),
                                                step.baselines[dpmm.NAIVE_STEP](step.make(torch.device("cpu"),
                                                                                          torch.float32)))
    assert torch.allclose(loss, naive_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(naive_grads) > 0
    for a, b in zip(grads, naive_grads):
        assert a is not None and b is not None and torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    features = cases["dpmm generation features"]
    args = features.make(torch.device("cpu"), torch.float32)
    torch.testing.assert_close(features.ours(args), features.baselines[dpmm.PER_TIMESTEP](args), rtol=1e-5,
                               atol=1e-5)
    gate = cases["gated_mix"]
    for a, b in zip(gate.ours(gate.make(torch.device("cpu"), torch.float32)),
                    gate.baselines[dpmm.UNFUSED_GATE](gate.make(torch.device("cpu"), torch.float32))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for op, baseline in (("geglu", dpmm.TRANSFORMERS_GEGLU), ("rms_norm", dpmm.TRANSFORMERS_NORM)):
        layer = next(case for case in bench.cases_for("tiny") if case.op == op)
        for a, b in zip(layer.ours(layer.make(torch.device("cpu"), torch.float32)),
                        layer.baselines[baseline](layer.make(torch.device("cpu"), torch.float32))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="CUDA"):
        dpmm.cases("gpu")[0].make(torch.device("cpu"), torch.bfloat16)


def test_modal_mixed_gpu_cases_build_nothing_on_a_cpu():
    """The Qwen2.5-VL-7B-shape rows are Case records until a run makes their inputs, and they refuse a CPU."""
    from mmlatent.bench.cases import modal_mixed
    cases = modal_mixed.cases("gpu")
    assert [case.op for case in cases] == ["modal-mixed SFT step", "modal-mixed generate"]
    assert "LoRA r64" in cases[0].shape and "7B" in cases[1].shape
    for case in cases:
        with pytest.raises(RuntimeError, match="CUDA"):
            case.make(torch.device("cpu"), torch.bfloat16)


def test_bench_uses_only_public_kernel_names():
    for source in pathlib.Path(bench.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmlatent.kernels"):
                assert node.module == "mmlatent.kernels", (source, node.module)
                assert {a.name for a in node.names} <= set(mmlatent.kernels.__all__), source


def test_unknown_sizes_and_implementations_are_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="sizes"):
        bench.cases_for("huge")
    case = bench.cases_for("tiny")[0]
    assert bench.implementation(case, "mmlatent") is case.ours
    with pytest.raises(ValueError, match="name: .*sdpa"):
        bench.implementation(case, "no such baseline")


def test_hardware_rates_hold_the_formulas_against_the_ceilings():
    # 2 * 3 GEMMs * T H V FLOPs for a trainable head
    assert bench.linear_head_flops(2, 3, 5, trainable_head=True) == 2 * 3 * 2 * 3 * 5
    rates = bench.hardware_rates(flops=790e12, bytes_moved=4.3e12, seconds=1.0, device="nvidia-h200")
    assert rates == {"tflops": 790.0, "fraction_of_bf16_ceiling": 1.0, "gbps": 4300.0, "fraction_of_hbm": 1.0}
    assert "fraction_of_hbm" not in bench.hardware_rates(0.0, 1e9, 1.0, "cpu-2core")
