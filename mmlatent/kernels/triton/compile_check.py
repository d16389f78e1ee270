"""Compiles every shipped Triton kernel configuration for Hopper (sm_90a) with no GPU, and reports registers,
spills and shared memory from ptxas.

    python -m mmlatent.kernels.triton.compile_check [--json FILE]

Exit status 1 when any configuration fails to compile, spills registers or exceeds the shared-memory limit.
Run it in a fresh process: TRITON_INTERPRET must be 0 when the kernel modules are imported.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmlatent.kernels.triton import attention, diffusion_loss, losses, modulation, sampler, selection  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # bytes a Hopper thread block may use
HEAD_DIMS = (64, 80, 128, 256)


def _attention_case(cfg_name, head_dim, dtype, has_v):
    cfg = attention.ATTENTION_CONFIGS[cfg_name]
    ptr = f"*{dtype}"
    ints = ["stride_qb", "stride_qh", "stride_qm", "stride_qd", "stride_kb", "stride_kh", "stride_kn", "stride_kd",
            "stride_vb", "stride_vh", "stride_vn", "stride_vd", "stride_validb", "stride_os", "stride_ob",
            "stride_oh", "stride_om", "stride_ls", "stride_lb", "stride_lh", "stride_rb", "stride_rh",
            "Hkv", "M", "N", "G", "score_row", "keys_per_split"]
    signature = {"Q": ptr, "K": ptr, "V": ptr, "KeyValid": "*u8", "O": ptr, "LSE": "*fp32", "RowLogits": "*fp32"}
    signature.update({name: "i32" for name in ints})
    signature["qk_scale"] = "fp32"
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_V=has_v, HAS_KEY_VALID=True,
                      CAUSAL=has_v, STORE_ROW=True, UPCAST_DOT=False)
    for name in constexprs:
        signature[name] = "constexpr"
    signature, constexprs, attrs = _runtime_specialization(
        signature, constexprs, unit=("stride_qd", "stride_kd", "stride_vd"),
        aligned=("Q", "K", "V", "KeyValid", "O", "LSE", "RowLogits", "stride_qb", "stride_qh", "stride_qm",
                 "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh", "stride_vn", "stride_ob",
                 "stride_oh", "stride_om", "stride_rb", "stride_rh") if head_dim % 16 == 0 else
                ("Q", "K", "V", "KeyValid", "O", "LSE", "RowLogits"))
    name = f"attention[{cfg_name}] D={head_dim} {dtype} {'qkv' if has_v else 'qk-only'}"
    return name, attention._attention_fwd, signature, constexprs, cfg, attrs


def _selection_case(cfg_name, ni, score_dtype, embed_dtype):
    cfg = selection.SELECTION_CONFIGS[cfg_name]
    signature = {"Scores": f"*{score_dtype}", "Valid": "*u8", "Exclude": "*u8", "Embeds": f"*{embed_dtype}",
                 "Idx": "*i64", "Gathered": f"*{embed_dtype}"}
    signature.update({n: "i32" for n in ["Ni", "k", "Dm", "stride_sb", "stride_vb", "stride_xb", "stride_eb",
                                         "stride_en", "stride_gb", "stride_gk"]})
    constexprs = dict(HAS_VALID=True, HAS_EXCLUDE=True, HAS_EMBEDS=True, BY_POSITION=True,
                      BLOCK_NI=ni, BLOCK_K=64, BLOCK_D=cfg["BLOCK_D"])
    for name in constexprs:
        signature[name] = "constexpr"
    signature, constexprs, attrs = _runtime_specialization(
        signature, constexprs, aligned=("Scores", "Valid", "Exclude", "Embeds", "Idx", "Gathered"))
    return (f"select_topk[{cfg_name}] scores={score_dtype} embeds={embed_dtype}", selection._select_topk,
            signature, constexprs, dict(num_warps=cfg["num_warps"], num_stages=1), attrs)


def _loss_case(dtype, kind, softcap, compute_values, write_grad):
    cfg = losses.LOSS_CONFIGS["v4096"]
    signature = {"Logits": f"*{dtype}", "Targets": "*i64", "Coef": "*fp32", "Values": "*fp32", "LSE": "*fp32",
                 "V": "i32", "stride_row": "i32", "stride_coef": "i32", "label_smoothing": "fp32", "softcap": "fp32",
                 "inv_temperature": "fp32"}
    constexprs = dict(KIND=kind, HAS_SOFTCAP=softcap, COMPUTE_VALUES=compute_values, WRITE_GRAD=write_grad,
                      BLOCK_V=cfg["BLOCK_V"], EMULATE_BF16_RTNE=False)
    for name in constexprs:
        signature[name] = "constexpr"
    signature, constexprs, attrs = _runtime_specialization(
        signature, constexprs, aligned=("Logits", "Targets", "Coef", "Values", "LSE", "stride_row"))
    what = ("ce" if kind == losses.KIND_CE else "logp") + ("+softcap" if softcap else "")
    passes = "+".join(p for p, on in (("values", compute_values), ("grad", write_grad)) if on)
    return (f"softmax_loss_rows[v4096] {dtype} {what} {passes}", losses._softmax_loss_rows, signature, constexprs,
            dict(num_warps=cfg["num_warps"], num_stages=1), attrs)


def _loss_cases():
    for dtype in ("bf16", "fp16", "fp32"):
        yield _loss_case(dtype, losses.KIND_CE, False, True, True)  # scalar cross-entropy: forward with gradient
    yield _loss_case("bf16", losses.KIND_CE, True, True, True)
    yield _loss_case("bf16", losses.KIND_CE, False, True, False)  # evaluation, or reduction="none" forward
    yield _loss_case("bf16", losses.KIND_LOGP, False, True, False)  # linear_log_probs forward
    yield _loss_case("bf16", losses.KIND_LOGP, False, False, True)  # its recomputing backward


def _sampler_cases():
    cfg = sampler.STEP_CONFIGS["c1024"]
    for out_dtype, per_row, cfg_on, clip, noise in (("bf16", True, True, True, True), ("fp32", False, False, False,
                                                                                         False)):
        signature = {"X": "*fp32", "Out": f"*{out_dtype}", "Noise": "*fp32", "Table": "*fp32", "Steps": "*i32",
                     "C": "i32", "R": "i32", "stride_x": "i32", "stride_o": "i32", "stride_n": "i32",
                     "step_scalar": "i32", "cfg_scale": "fp32", "clip": "fp32"}
        constexprs = dict(PER_ROW_STEP=per_row, HAS_CFG=cfg_on, HAS_CLIP=clip, HAS_NOISE=noise,
                          BLOCK_C=cfg["BLOCK_C"])
        for name in constexprs:
            signature[name] = "constexpr"
        signature, constexprs, attrs = _runtime_specialization(
            signature, constexprs, aligned=("X", "Out", "Noise", "Table", "Steps", "stride_x", "stride_o",
                                            "stride_n"))
        label = f"denoise_step[c1024] out={out_dtype} " + ("ragged+cfg+clip+noise" if per_row else "plain")
        yield label, sampler._denoise_step, signature, constexprs, dict(num_warps=cfg["num_warps"],
                                                                        num_stages=1), attrs


def _modulation_cases():
    for cfg_name, cfg in modulation.MODULATION_CONFIGS.items():
        for dtype in ("bf16", "fp32") if cfg_name == "w1024" else ("bf16",):
            ptr = f"*{dtype}"
            forward = {"X": ptr, "Shift": ptr, "Scale": ptr, "Y": ptr, "Mean": "*fp32", "Rstd": "*fp32", "W": "i32",
                       "stride_x": "i32", "stride_shift": "i32", "stride_scale": "i32", "stride_y": "i32",
                       "eps": "fp32"}
            backward = {"DY": ptr, "X": ptr, "Scale": ptr, "Mean": "*fp32", "Rstd": "*fp32", "DX": ptr,
                        "DScale": ptr, "W": "i32", "stride_dy": "i32", "stride_x": "i32", "stride_scale": "i32",
                        "stride_dx": "i32", "stride_dscale": "i32"}
            for direction, fn, signature in (("fwd", modulation._layer_norm_modulate_fwd, forward),
                                              ("bwd", modulation._layer_norm_modulate_bwd, backward)):
                constexprs = dict(BLOCK_W=cfg["BLOCK_W"], EMULATE_BF16_RTNE=False)
                for name in constexprs:
                    signature[name] = "constexpr"
                signature, constexprs, attrs = _runtime_specialization(
                    signature, constexprs, aligned=tuple(n for n, t in signature.items() if t.startswith("*"))
                    + tuple(n for n in signature if n.startswith("stride")))
                yield (f"layer_norm_modulate_{direction}[{cfg_name}] {dtype}", fn, signature, constexprs,
                       dict(num_warps=cfg["num_warps"], num_stages=1), attrs)


def _diffusion_mse_cases():
    cfg = diffusion_loss.MSE_CONFIGS["c4096"]
    for pred_dtype, data_dtype, write_grad in (("bf16", "fp32", True), ("bf16", "bf16", True),
                                               ("fp32", "fp32", False)):
        grad_dtype = "fp32" if "fp32" in (pred_dtype, data_dtype) else "bf16"
        signature = {"Pred": f"*{pred_dtype}", "X0": f"*{data_dtype}", "Noise": f"*{data_dtype}", "GoalX0": "*fp32",
                     "GoalNoise": "*fp32", "Coef": "*fp32", "RowError": "*fp32", "Grad": f"*{grad_dtype}",
                     "C": "i32", "stride_p": "i32", "stride_x": "i32", "stride_n": "i32", "stride_g": "i32"}
        constexprs = dict(WRITE_GRAD=write_grad, BLOCK_C=cfg["BLOCK_C"], EMULATE_BF16_RTNE=False)
        for name in constexprs:
            signature[name] = "constexpr"
        signature, constexprs, attrs = _runtime_specialization(
            signature, constexprs, aligned=("Pred", "X0", "Noise", "GoalX0", "GoalNoise", "Coef", "RowError", "Grad",
                                            "C", "stride_p", "stride_x", "stride_n", "stride_g"))
        yield (f"diffusion_mse[c4096] pred={pred_dtype} x0={data_dtype}{' +grad' if write_grad else ''}",
               diffusion_loss._diffusion_mse_rows, signature, constexprs,
               dict(num_warps=cfg["num_warps"], num_stages=1), attrs)


def _helper_cases():
    yield ("combine_splits D=128", attention._combine_splits,
           {"PartO": "*fp32", "PartLSE": "*fp32", "O": "*bf16", "LSE": "*fp32", "S": "i32",
            "split_stride_o": "i32", "split_stride_lse": "i32", "HEAD_DIM": "constexpr", "BLOCK_S": "constexpr",
            "BLOCK_D": "constexpr", "HAS_V": "constexpr"},
           dict(HEAD_DIM=128, BLOCK_S=attention.MAX_SPLITS, BLOCK_D=128, HAS_V=True), dict(num_warps=4, num_stages=1),
           None)
    sig = {"RowLogits": "*fp32", "RowLSE": "*fp32", "ImageIndex": "*i64", "Out": "*fp32"}
    sig.update({n: "i32" for n in ["Hq", "Ni", "key_limit"]})
    sig["weight"] = "fp32"
    sig.update({n: "i32" for n in ["stride_rb", "stride_rh", "stride_lb", "stride_lh", "stride_ib", "stride_outb"]})
    sig["BLOCK_I"] = "constexpr"
    yield ("accumulate_image_mass", attention._accumulate_image_mass, sig, dict(BLOCK_I=256),
           dict(num_warps=4, num_stages=1), None)


def all_cases():
    for cfg_name, cfg in attention.ATTENTION_CONFIGS.items():
        lo, hi = cfg["head_dims"]
        for head_dim in (d for d in HEAD_DIMS if lo <= d <= hi):
            yield _attention_case(cfg_name, head_dim, "bf16", True)
            if head_dim == 128:
                yield _attention_case(cfg_name, head_dim, "fp16", True)
            if cfg["BLOCK_M"] == 16:  # row_attention_mass: one row, no V
                yield _attention_case(cfg_name, head_dim, "bf16", False)
    for cfg_name, ni in (("ni1024", 1024), ("ni4096", 4096), ("ni8192", 8192)):
        yield _selection_case(cfg_name, ni, "fp32", "bf16")
    yield _selection_case("ni4096", 4096, "bf16", "fp32")
    yield from _loss_cases()
    yield from _sampler_cases()
    yield from _modulation_cases()
    yield from _diffusion_mse_cases()
    yield from _helper_cases()


def _runtime_specialization(signature, constexprs, unit=(), aligned=()):
    """What Triton's launcher does for real inputs: integer arguments equal to 1 become constants, and pointers and
    integers divisible by 16 are marked so (vectorised, aligned accesses). Compiling without this would measure a
    kernel that never runs."""
    for name in unit:
        signature[name] = "constexpr"
        constexprs[name] = 1
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in names}
    return signature, constexprs, attrs


def compile_for_hopper(fn, signature, constexprs, options, attrs=None):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs or {})
    compiled = triton.compile(src, target=HOPPER, options={k: v for k, v in options.items()
                                                           if k in ("num_warps", "num_stages")})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
        ptx_path = f.name
    try:
        log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx_path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(ptx_path)
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    spill_loads = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    return dict(registers=registers, spill_stores=spill_stores, spill_loads=spill_loads,
                shared_bytes=int(compiled.metadata.shared))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    report, failures = [], 0
    for name, fn, signature, constexprs, options, attrs in all_cases():
        t0 = time.perf_counter()
        try:
            row = dict(kernel=name, **compile_for_hopper(fn, signature, constexprs, options, attrs))
            row["ok"] = row["spill_stores"] == 0 and row["spill_loads"] == 0 and row["shared_bytes"] <= SHARED_LIMIT
        except Exception as err:  # a compile error is a failed row, reported with the others
            row = dict(kernel=name, ok=False, error=f"{type(err).__name__}: {err}"[:500])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        failures += not row["ok"]
        report.append(row)
        detail = row.get("error") or (f"{row['registers']} regs, spills {row['spill_stores']}/{row['spill_loads']} B, "
                                      f"smem {row['shared_bytes']} B")
        print(f"{'ok ' if row['ok'] else 'BAD'} {name}: {detail} ({row['seconds']} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{len(report) - failures}/{len(report)} configurations compile for sm_90a without spills")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
