"""Where every token of every sample goes in IVT-LR's assembled sequence, and what the passes of one call share.

Sample b's assembled sequence is its input row (left padding included) with k embeddings inserted before each of
its n_b latent tokens; rows are left-padded to the longest (S + max_b n_b * k). "linear" positions are the column
index in that layout (IVT-LR's arange over the padded sequence, copied to the three M-RoPE rows); "mrope" keeps
the model's own 3-D positions of the original tokens, shifted by the insertions before them, the inserted
embeddings counting as text tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from ..backbones import VLMBackbone

POSITION_MODES = ("linear", "mrope")


class LayoutPlan:
    """Where every token of every sample goes in the assembled layout (the definition both paths share)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, latent_id: int, image_id: int,
                 k: int) -> None:
        B, S = input_ids.shape
        device = input_ids.device
        self.k = k
        # Host sync, one per call: the layout is Python control flow (each sample's segments and step count
        # decide the slices every pass reads), so the ids and the mask are read on the host once and every index
        # below is planned there; the device receives the finished index tensors in one copy each.
        ids, mask = torch.stack([input_ids, attention_mask.to(input_ids.dtype)]).cpu().unbind(0)
        mask = mask.bool()
        is_latent = (ids == latent_id) & mask
        is_image = (ids == image_id) & mask
        self.latents = [row.nonzero().squeeze(1).tolist() for row in is_latent]
        self.images = [row.nonzero().squeeze(1).tolist() for row in is_image]
        counts = [len(c) for c in self.latents]
        self.num_steps = max(counts, default=0)
        for b in range(B):
            if self.num_steps and counts[b] == 0:
                raise ValueError(f"input_ids: sample {b} has no latent token (id {latent_id}) while the batch asks "
                                 f"for latent steps (sample {counts.index(self.num_steps)} has {self.num_steps})")
            if counts[b] and not self.images[b]:
                raise ValueError(f"input_ids: sample {b} has latent tokens but no image token (id {image_id}); "
                                 f"IVT-LR selects image tokens at every latent step")
            if counts[b] and self.images[b][-1] > self.latents[b][0]:
                raise ValueError(f"input_ids: sample {b} has image tokens after its first latent token; IVT-LR "
                                 f"selects among the image tokens that precede the latent steps")
            if len(self.images[b]) < counts[b] * k:
                raise ValueError(f"input_ids: sample {b} has {len(self.images[b])} image tokens, fewer than the "
                                 f"{counts[b] * k} its {counts[b]} latent steps select (k = {k} new tokens each)")
        self.counts = counts
        self.length = S + self.num_steps * k
        # embeddings inserted at or before each original column (each latent token is shifted by its own k)
        inserted_before = torch.cumsum(is_latent.long(), dim=1) * k  # [B, S]
        pad = torch.tensor([(self.num_steps - n) * k for n in counts])
        orig_to_asm = torch.arange(S)[None] + inserted_before + pad[:, None]  # [B, S]
        valid = torch.zeros(B, self.length, dtype=torch.bool)
        valid.scatter_(1, orig_to_asm, mask)
        inserted = torch.zeros(B, self.length, dtype=torch.bool)  # inserted or latent columns
        self.latent_columns = [orig_to_asm[b, self.latents[b]].tolist() for b in range(B)]
        # step boundaries: sample b selects for latent j after reading columns [0, starts[b][j])
        self.starts = [[c - k for c in self.latent_columns[b]] for b in range(B)]
        for b in range(B):
            for latent_col in self.latent_columns[b]:
                inserted[b, latent_col - k: latent_col + 1] = True
                valid[b, latent_col - k: latent_col] = True
        self.inserted_before = inserted_before.to(device)
        self.orig_to_asm = orig_to_asm.to(device)
        self.valid, self.inserted = valid.to(device), inserted.to(device)
        # the samples that take each latent step, as device index tensors (sliced from one copy)
        active = [[b for b in range(B) if counts[b] > step] for step in range(self.num_steps)]
        flat = torch.tensor([b for rows in active for b in rows], dtype=torch.long).to(device)
        self.active_rows = list(torch.split(flat, [len(rows) for rows in active])) if active else []

    def image_columns(self, b: int) -> torch.Tensor:
        return self.orig_to_asm[b, self.images[b]]

    def latent_column(self, b: int, step: int) -> int:
        return self.latent_columns[b][step]

    def positions(self, mode: str, backbone: VLMBackbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """[R, B, S_asm] positions (R = 1 for linear, 3 for mrope)."""
        B = input_ids.shape[0]
        if mode == "linear":
            return torch.arange(self.length, device=input_ids.device).expand(1, B, self.length).clone()
        original = backbone.model_positions(input_ids, attention_mask, image_grid_thw)  # [3, B, S]
        out = torch.ones(original.shape[0], B, self.length, dtype=original.dtype, device=original.device)
        out.scatter_(2, self.orig_to_asm[None].expand_as(original), original + self.inserted_before[None])
        # each inserted run continues from its latent token's position, as text tokens: gathered on the device in
        # one indexing op (no host read of the positions)
        pairs = [(b, col) for b in range(B) for col in self.latent_columns[b]]
        if pairs:
            rows = torch.tensor([b for b, _ in pairs], device=out.device)
            latent = torch.tensor([col for _, col in pairs], device=out.device)
            offsets = torch.arange(-self.k, 0, device=out.device)
            # the latent token is text: its three M-RoPE rows hold one position, row 0's
            out[:, rows[:, None], latent[:, None] + offsets] = out[0, rows, latent][:, None] + offsets
        return out


@dataclass
class PreparedInputs:
    """What every pass of one call shares, named: the layout, the original tokens' layer-0 inputs (differentiable),
    the assembled positions and the assembled inputs being filled in by the rollout.

    plan: the :class:`LayoutPlan`; embeds: [B, S, D] token and image embeddings of ``input_ids`` (with grad);
    positions: [R, B, S_asm] (R = 1 linear, 3 mrope); filled: [B, S_asm, D] detached assembled inputs: the
    original tokens' embeddings, then the inserted image embeddings and latent states as the rollout picks them.
    """

    plan: LayoutPlan
    embeds: torch.Tensor
    positions: torch.Tensor
    filled: torch.Tensor


def left_pad(rows: List[torch.Tensor], length: int, fill: Union[int, float, bool] = 0) -> torch.Tensor:
    """Stacks rows [n_i, ...] into [B, length, ...], each right-aligned (padding at the front)."""
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        if r.shape[0]:
            out[i, length - r.shape[0]:] = r
    return out


def assemble_with_grad(inputs: PreparedInputs) -> torch.Tensor:
    """[B, S_asm, D]: the original tokens' embeddings (differentiable) at their columns, the detached inserted
    embeddings and latent states elsewhere (``filled``)."""
    plan, embeds, filled = inputs.plan, inputs.embeds, inputs.filled
    B, S, D = embeds.shape
    placed = embeds.new_zeros(B, plan.length, D).scatter(1, plan.orig_to_asm[..., None].expand(B, S, D), embeds)
    return torch.where(plan.inserted[..., None], filled, placed)


def assembled_labels(plan: LayoutPlan, labels: torch.Tensor) -> torch.Tensor:
    out = labels.new_full((labels.shape[0], plan.length), -100)
    return out.scatter(1, plan.orig_to_asm, labels)


__all__ = ["LayoutPlan", "PreparedInputs", "POSITION_MODES", "left_pad", "assemble_with_grad", "assembled_labels"]
