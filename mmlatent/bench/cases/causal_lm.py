"""``apply_fused_loss`` on a transformers causal LM: one training step, ``model(input_ids=ids, labels=ids).loss``
forward + backward with the gradients of every parameter returned, against the same weights unpatched (transformers'
own loss over the [B, L, V] logits, upcast to float32 by its ForCausalLMLoss). The two models are copies built from
one seeded Qwen2 config, so both rows do the same arithmetic but for the loss."""
from __future__ import annotations

import copy
from typing import List

import torch

from ..case import Call, Case, Inputs, Make
from .inputs import cpu_generator

BASELINE = "model(labels=).loss (transformers)"


def _causal_lm_inputs(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                      batch: int, length: int) -> Make:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from mmlatent.models import apply_fused_loss
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             tie_word_embeddings=False, use_cache=False)
        plain = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
        patched = apply_fused_loss(copy.deepcopy(plain))
        ids = torch.randint(0, vocab, (batch, length), generator=cpu_generator()).to(device)
        return dict(models={"mmlatent": patched, "plain": plain}, input_ids=ids)
    return make


def _train_step(which: str) -> Call:
    def step(a: Inputs) -> object:
        model = a["models"][which]
        loss = model(input_ids=a["input_ids"], labels=a["input_ids"]).loss
        return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return step


def causal_lm_case(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, batch: int,
                   length: int) -> Case:
    shape = f"Qwen2 h{hidden} L{layers} H{heads} KV{kv_heads} V{vocab} B{batch} x {length} tokens"
    return Case("apply_fused_loss training step", shape,
                _causal_lm_inputs(hidden, layers, heads, kv_heads, intermediate, vocab, batch, length),
                _train_step("mmlatent"), {BASELINE: _train_step("plain")})


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":
        return [causal_lm_case(32, 1, 4, 2, 64, 500, 2, 32)]
    if sizes == "gpu":  # Qwen2-0.5B's shapes
        return [causal_lm_case(896, 24, 14, 2, 4864, 151936, 2, 2048)]
    return [causal_lm_case(256, 2, 4, 2, 704, 32000, 2, 1024)]
