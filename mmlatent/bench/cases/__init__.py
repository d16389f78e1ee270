"""The benchmark's cases, one module per op family (attention, selection, losses, diffusion), per method
(diffusion_head, ivtlr, modal_mixed, grpo, dpmm) and per Hugging Face integration (causal_lm). Each module has
``cases(sizes) -> List[Case]`` for every shape set of ``SIZES`` but "demo"; adding a case is a constructor call in
its module's ``cases``, and a new module is one entry of ``FAMILIES``."""
from __future__ import annotations

from typing import Dict, List, Tuple

from ..case import Case
from . import attention, causal_lm, diffusion, diffusion_head, dpmm, grpo, ivtlr, losses, modal_mixed, selection

# default: the CPU set (what `make bench` runs); gpu: real sizes; tiny: every op and baseline in seconds on a CPU
# (the smoke test); demo: the rows of the CPU set that `make demo` shows (DEMO_ROWS).
SIZES = ("default", "tiny", "gpu", "demo")

# Table order: the ops from the lowest level up, then the methods built on them (the default set's rows keep the
# order of the committed CPU results; later families come last, so earlier rows keep their indices).
FAMILIES = (attention, selection, losses, diffusion, ivtlr, diffusion_head, causal_lm, modal_mixed, grpo, dpmm)

# The CPU-size rows where the implementation decides the outcome, and what each shows. At the tiny sizes fixed
# per-call overhead dominates and every fused op looks slower than its baseline, so the demo shows these instead.
DEMO_ROWS: Dict[Tuple[str, str], str] = {
    ("attention_with_scores", "B1 Hq16 Hkv4 M1 N4096 D64 Ni1024"):
        "one decoding row over a 4096-token cache: the image-token attention mass comes out of the attention pass "
        "itself, where eager attention must write every probability; sdpa is the floor that returns no mass",
    ("row_attention_mass", "B2 Hq16 Hkv4 N4096 D64 Ni1024"):
        "the last row's image-token mass from the KV cache alone, without a [B, H, 1, N] probability tensor",
    ("select_topk_tokens", "B2 Ni4096 k64 Dm1024"):
        "top-k, exclusion update and the gather of the chosen embeddings in one call instead of four",
    ("linear_cross_entropy", "T2048 H256 V32000 trainable head"):
        "the [2048, 32000] logits (and their float32 copy and gradient) are never built",
    ("apply_fused_loss training step", "Qwen2 h256 L2 H4 KV2 V32000 B2 x 1024 tokens"):
        "model(**batch, labels=labels).loss on an unmodified transformers model, patched by one call",
    ("ivtlr training step", "Qwen2-VL h256 L4 H8 KV2 V8192 B2 k32 3 latent steps"):
        "IVT-LR's public algorithm, same loss and gradients: a KV-cached rollout instead of one full pass per step",
    ("ivtlr inference (+32 tokens)", "Qwen2-VL h256 L4 H8 KV2 V8192 B2 k32 3 latent steps"):
        "three latent steps and 32 new tokens, over a KV cache with no attention matrix",
    ("diffusion head sample", "8 segments x 32 rows C512 width256 depth3 50 DDIM steps"):
        "every segment of a batch denoised at once with fused steps, against one diffusers loop per segment",
}


def cases_for(sizes: str) -> List[Case]:
    """Every case of the shape set ``sizes`` (one of ``SIZES``), in table order; indices into this list name a
    case across processes (the CPU memory probe), so it is rebuilt the same way each time."""
    if sizes not in SIZES:
        raise ValueError(f"sizes: expected one of {', '.join(SIZES)}, got {sizes!r}")
    if sizes == "demo":
        return [case for case in cases_for("default") if (case.op, case.shape) in DEMO_ROWS]
    return [case for family in FAMILIES for case in family.cases(sizes)]


__all__ = ["SIZES", "FAMILIES", "DEMO_ROWS", "cases_for"]
