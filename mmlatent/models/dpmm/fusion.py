"""MM-CoT's gated cross-attention fusion of image features into text states (``JointEncoder``, applied after the
T5 encoder's final norm), with the gate as one fused op (:func:`mmlatent.kernels.gated_mix`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmlatent.kernels import checks, gated_mix


class GatedFusion(nn.Module):
    """``H_img = image_dense(X)``; ``H_attn = MultiheadAttention(d_model, 1 head)(H, H_img, H_img)``;
    ``gate = sigmoid(gate_dense(cat[H, H_attn]))``; ``out = (1 - gate) * H + gate * H_attn``.

    The parameters are MM-CoT's (``image_dense``, ``mha_layer``, ``gate_dense``: a state dict of its JointEncoder's
    fusion loads by name). The concatenation, gate GEMM, sigmoid and mix are :func:`~mmlatent.kernels.gated_mix`.

    Args:
        d_model: the text states' width.
        feature_dim: the image features' width.
    """

    def __init__(self, d_model: int, feature_dim: int) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.d_model, self.feature_dim = d_model, feature_dim
        self.image_dense = nn.Linear(feature_dim, d_model)
        self.mha_layer = nn.MultiheadAttention(d_model, num_heads=1, batch_first=True)
        self.gate_dense = nn.Linear(2 * d_model, d_model)

    def forward(self, text_states: torch.Tensor, features: torch.Tensor,
                feature_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fuse ``features`` into ``text_states``.

        Args:
            text_states: [B, T, d_model] (the encoder's output).
            features: [B, N, feature_dim] image feature tokens, text_states' dtype.
            feature_mask: None (every feature token attended, as MM-CoT: no key mask), or [B, N] bool, True on the
                tokens to attend; masked tokens get no attention, and a sample with every token masked keeps its
                text states unchanged (there is nothing to attend to).

        Returns:
            [B, T, d_model] in text_states' dtype.
        """
        checks.tensor("text_states", text_states, dims=3, dtypes=checks.FLOAT_DTYPES)
        B, _, d = text_states.shape
        if d != self.d_model:
            raise ValueError(f"text_states: expected width d_model = {self.d_model}, got {d}")
        checks.tensor("features", features, dims=3, device=text_states.device)
        checks.same_dtype("features", features, "text_states", text_states)
        if features.shape[0] != B or features.shape[2] != self.feature_dim:
            raise ValueError(f"features: expected [B = {B}, N, feature_dim = {self.feature_dim}], got "
                             f"{tuple(features.shape)}")
        image = self.image_dense(features)
        if feature_mask is None:
            attended, _ = self.mha_layer(text_states, image, image, need_weights=False)
            return gated_mix(text_states, attended, self.gate_dense.weight, self.gate_dense.bias)
        checks.tensor("feature_mask", feature_mask, dims=2, dtypes=(torch.bool,), device=text_states.device)
        checks.shape("feature_mask", feature_mask, (B, features.shape[1]), "[B, N] like features")
        empty = ~feature_mask.any(dim=1)
        # a fully masked row would make softmax 0/0: give it one key, then keep its text states
        keys_ignored = ~feature_mask & ~empty[:, None]
        attended, _ = self.mha_layer(text_states, image, image, key_padding_mask=keys_ignored, need_weights=False)
        fused = gated_mix(text_states, attended, self.gate_dense.weight, self.gate_dense.bias)
        return torch.where(empty[:, None, None], text_states, fused)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, feature_dim={self.feature_dim}"
