"""Tiny transformers causal LMs built from their configs, their batches, and the probes the loss tests share."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_causal_lm(name):
    """"qwen2", or "gemma2-softcap" (final logit soft-capping at 5), seeded."""
    torch.manual_seed(0)
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**TINY))
    return Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=5.0))


def left_padded_batch(vocab=97, B=3, L=13, seed=1):
    """(inputs, labels): left padding in two rows, and a row whose prompt carries no loss."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (B, L), generator=g)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[0, :4] = 0
    attention_mask[2, :1] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[1, :5] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask), labels


def rel_err(a, e):
    a, e = a.detach().double(), e.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


class LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any aten op creates (bytes, because the Triton interpreter stages
    kernel arguments as byte tensors)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out
