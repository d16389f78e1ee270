"""Float64 dense oracles (they build the full score matrix, so keep shapes small) and tolerance helpers."""

import torch


def dense_attention64(q, k, v, *, causal, key_valid, scale):
    """Returns (o, lse, p) in float64; p [B, Hq, M, N]; rows with no valid key: o = 0, lse = -inf, p = 0."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kk = k.double().repeat_interleave(G, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    allowed = torch.ones(B, 1, M, N, dtype=torch.bool)
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :]
    if causal:
        rows = torch.arange(M)[:, None] + (N - M)
        allowed &= (torch.arange(N)[None, :] <= rows)[None, None]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    o = None if v is None else p @ v.double().repeat_interleave(G, dim=1)
    return o, lse, p


def image_mass64(p_row, image_index):
    """p_row [B, Hq, N] float64 -> [B, Ni] mass summed over heads, 0 at padding slots."""
    safe = image_index.clamp(min=0)
    mass = torch.gather(p_row.sum(1), 1, safe)
    return torch.where(image_index < 0, torch.zeros_like(mass), mass)


def plain_attention(q, k, v, *, causal, key_valid, scale):
    """The same attention done by plain PyTorch in the inputs' dtype: the error budget of low precision."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    s = (q @ kk.transpose(-1, -2)) * scale
    allowed = torch.ones(B, 1, M, N, dtype=torch.bool)
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :]
    if causal:
        allowed &= (torch.arange(N)[None, :] <= torch.arange(M)[:, None] + (N - M))[None, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return p @ vv


def max_err(a, b) -> float:
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_fp32(actual, expected, rtol=1e-5, atol=1e-6, what=""):
    """1e-5 relative (docs/design.md, "Numerics and tolerances"), with a small atol for values near zero;
    matching infinities agree."""
    a, e = actual.double(), expected.double()
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    bad = ~both_inf & ((a - e).abs() > atol + rtol * e.abs())
    assert not bool(bad.any()), f"{what}: max error {max_err(a, e):.3g} (rtol {rtol}, atol {atol})"


def assert_within_torch_error(actual, expected64, torch_result, atol, what=""):
    """Low precision: error at most 2x that of plain PyTorch in the same dtype, plus a small atol."""
    ours, theirs = max_err(actual, expected64), max_err(torch_result, expected64)
    assert ours <= 2 * theirs + atol, f"{what}: error {ours:.3g} > 2 x torch's {theirs:.3g} + {atol}"


def padded_key_valid(B, N, generator=None):
    """Padding at both ends: row 0 left-padded, row 1 right-padded, others random holes (last key kept valid)."""
    valid = torch.rand(B, N, generator=generator) > 0.15
    valid[:, -1] = True
    if B > 0 and N > 3:
        valid[0, : N // 3] = False
    if B > 1 and N > 3:
        valid[1, N - N // 3: N - 1] = False
    return valid


def image_index_for(B, N, Ni, generator=None):
    """[B, Ni] int64 distinct key positions per row, padded with -1 at both ends of the slot axis."""
    rows = []
    for b in range(B):
        count = min(N, Ni)
        pos = torch.randperm(N, generator=generator)[:count].sort().values
        row = torch.full((Ni,), -1, dtype=torch.int64)
        lead = 1 if (b % 2 == 0 and Ni > count) else 0
        row[lead: lead + count] = pos
        if b % 2 == 1 and Ni > 2:
            row[0] = -1
            row[-1] = -1
        rows.append(row)
    return torch.stack(rows)


LOW_PRECISION_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ------------------------------------------------------------------------------------------------ diffusion family

def layer_norm_modulate64(x, shift, scale, eps):
    """LayerNorm over the last dimension (biased variance, no affine) * (1 + scale) + shift, from the formula, in
    float64; differentiable by autograd."""
    x, shift, scale = x.double(), shift.double(), scale.double()
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * (1 + scale) + shift


def plain_layer_norm_modulate(x, shift, scale, eps):
    """The unfused torch expression in the inputs' dtype (each op rounds): the error budget of low precision."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


def plain_diffusion_mse(pred, x0, noise, goal_x0, goal_noise, coef):
    """The unfused torch expression of the row-weighted MSE (float32 math, the target stored), differentiated by
    autograd: the error budget the fused loss is held to."""
    goal = goal_x0[:, None] * x0.to(torch.float32) + goal_noise[:, None] * noise.to(torch.float32)
    return (coef * (pred.to(torch.float32) - goal).square().mean(dim=1)).sum()


def gated_mix64(text, attended, weight, bias):
    """MM-CoT's gate (JointEncoder, model.py L293-295) in float64: sigmoid(Linear(2d, d)(cat[H, H_attn])) mixes
    the text states and the attended image features."""
    text, attended, weight = text.double(), attended.double(), weight.double()
    logits = torch.cat([text, attended], dim=-1) @ weight.T
    if bias is not None:
        logits = logits + bias.double()
    gate = torch.sigmoid(logits)
    return (1 - gate) * text + gate * attended


def plain_gated_mix(text, attended, weight, bias):
    """The unfused torch expression of the same gate in the inputs' dtype (concat, Linear, sigmoid, mix)."""
    gate = torch.sigmoid(torch.nn.functional.linear(torch.cat([text, attended], dim=-1), weight, bias))
    return (1 - gate) * text + gate * attended


def geglu64(gate, up, approximate):
    """gelu(gate) * up in float64, the GELU written out: erf's 0.5 x (1 + erf(x / sqrt 2)) or the tanh form
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (Hendrycks and Gimpel; transformers' gelu_new)."""
    x = gate.double()
    if approximate == "tanh":
        gelu = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    else:
        gelu = 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))
    return gelu * up.double()


def plain_geglu(gate, up, approximate):
    """The unfused torch expression in the inputs' dtype, as transformers' T5 feed-forward writes it."""
    return torch.nn.functional.gelu(gate, approximate=approximate) * up


def rms_norm64(x, weight, eps):
    """T5LayerNorm's formula in float64: weight * x / sqrt(mean(x^2) + eps), no mean subtracted, no bias."""
    x = x.double()
    return weight.double() * x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)


def plain_rms_norm(x, weight, eps):
    """transformers' T5LayerNorm.forward, transcribed, in the inputs' dtype."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        hidden = hidden.to(weight.dtype)
    return weight * hidden


def denoise_step64(x, model_out, table, steps, clip, noise, cfg_scale):
    """One sampler step in float64: x [R, C], model_out [R, C] (or [2R, C] with cfg_scale), table [S, 6] of
    (cx, co, px, po, c0, sigma), steps [R] each row's step, noise [R, C] or None. Returns the new x."""
    R = x.shape[0]
    out = model_out.double()
    if cfg_scale is not None:
        out = out[R:] + cfg_scale * (out[:R] - out[R:])
    cx, co, px, po, c0, sigma = (c[:, None] for c in table.double()[steps.long()].unbind(dim=1))
    xd = x.double()
    new = cx * xd + co * out
    if clip is not None:
        new = new + c0 * (px * xd + po * out).clamp(-clip, clip)
    if noise is not None:
        new = new + sigma * noise.double()
    return new
