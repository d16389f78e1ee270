"""DPMM-CoT's loss pieces against a plain composition of the transformers / diffusers modules on the same inputs and
noise (float64), zero features for image-less samples, generation's one batched UNet call against one call per
timestep, cached latents, and bad input."""
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from mmlatent.models import DPMMCoT, cache_latents, load_latents, tiny

from test_gated_fusion import joint_encoder_fusion


@pytest.fixture
def model(use_backend):
    use_backend("torch")  # float64 throughout: the torch backend
    torch.manual_seed(0)
    m = DPMMCoT(tiny.tiny_t5(), tiny.tiny_vae(), tiny.tiny_unet(), feature_blocks=("mid", "up.0"),
                feature_timesteps=(0, 10, 500, 999))
    return m.double()


def batch(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 200, (B, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = torch.randint(6, 200, (B, 6), generator=g)
    labels[1, 4:] = -100
    pixels = (torch.rand(B, 3, 32, 32, generator=g) * 2 - 1).double()
    noise = torch.randn(B, 4, 16, 16, generator=g).double()
    timesteps = torch.tensor([3, 500, 998])[:B]
    return ids, mask, labels, pixels, noise, timesteps


def plain_features(m, z_t, t, states, mask):
    """The UNet's prediction and its feature blocks' outputs by forward hooks, as diffusers exposes them."""
    captured = {}
    hooks = [m.unet.mid_block.register_forward_hook(lambda _m, _a, out: captured.__setitem__("mid", out)),
             m.unet.up_blocks[0].register_forward_hook(lambda _m, _a, out: captured.__setitem__("up.0", out))]
    try:
        pred = m.unet(z_t, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
    finally:
        for h in hooks:
            h.remove()
    tokens = [torch.cat([captured[name].flatten(2).transpose(1, 2),  # each map's positions' codes appended
                         codes(*captured[name].shape[2:], m.feature_positions).expand(z_t.shape[0], -1, -1)], dim=2)
              for name in ("mid", "up.0")]
    return pred, torch.cat(tokens, dim=1)


def codes(h, w, channels):
    """MAE's 2-D sine-cosine position codes from their formula, float64: row then column, sin then cos."""
    k = torch.arange(channels // 4, dtype=torch.float64)
    omega = 1.0 / 10000 ** (k / (channels // 4))
    out = torch.zeros(h * w, channels, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            out[i * w + j] = torch.cat([torch.sin(i * omega), torch.cos(i * omega), torch.sin(j * omega),
                                        torch.cos(j * omega)])
    return out


def test_the_loss_equals_a_plain_composition_of_the_modules(model):
    m = model
    ids, mask, labels, pixels, noise, timesteps = batch()
    has_image = torch.tensor([True, False, True])
    out = m(ids, mask, labels, pixel_values=pixels, has_image=has_image, noise=noise, timesteps=timesteps)

    rows = torch.tensor([0, 2])
    states = m.t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    z0 = m.vae.encode(pixels[rows]).latent_dist.mean * 0.18215
    z_t = m.noise_scheduler.add_noise(z0, noise[rows], timesteps[rows])
    pred, tokens = plain_features(m, z_t, timesteps[rows], states[rows], mask[rows])
    diffusion = torch.nn.functional.mse_loss(pred, noise[rows])
    features = torch.zeros(3, tokens.shape[1], tokens.shape[2], dtype=torch.float64)
    features[rows] = tokens  # the image-less question: zero features, as MM-CoT gives it
    fused = joint_encoder_fusion(m.fusion, states, features)
    text = m.t5(encoder_outputs=BaseModelOutput(last_hidden_state=fused), attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out.diffusion_loss.double(), diffusion, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.text_loss.double(), text, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss.double(), text + diffusion, rtol=1e-6, atol=1e-7)
    # every piece trains: the UNet through both losses, the fusion and T5 through the text loss
    out.loss.backward()
    for name in ("unet.mid_block", "fusion.gate_dense", "t5.decoder", "t5.encoder"):
        grads = [p.grad for n, p in m.named_parameters() if n.startswith(name)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_cached_latents_equal_the_live_encoder(model, tmp_path):
    m = model
    ids, mask, labels, pixels, noise, timesteps = batch()
    path = cache_latents(m.vae, {f"r{i}": pixels[i] for i in range(3)}, str(tmp_path / "latents.safetensors"),
                         batch_size=2, progress=False)
    cached = load_latents(path, scale=m.latent_scale)
    latents = torch.stack([cached[f"r{i}"] for i in range(3)]).double()
    live = m(ids, mask, labels, pixel_values=pixels, noise=noise, timesteps=timesteps)
    again = m(ids, mask, labels, latents=latents, noise=noise, timesteps=timesteps)
    # the file holds float32: the same loss to float32's rounding
    torch.testing.assert_close(again.loss, live.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scale: .* holds latents at scale 0.18215, the model expects 0.5"):
        load_latents(path, scale=0.5)


def test_a_batch_without_images_has_zero_diffusion_loss_and_zero_features(model):
    m = model
    ids, mask, labels, *_ = batch()
    out = m(ids, mask, labels)
    assert out.diffusion_loss.item() == 0.0
    states = m.t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    fused = joint_encoder_fusion(m.fusion, states, torch.zeros(3, 1, m.feature_dim, dtype=torch.float64))
    text = m.t5(encoder_outputs=BaseModelOutput(last_hidden_state=fused), attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out.text_loss.double(), text, rtol=1e-6, atol=1e-7)


def test_generation_fuses_the_average_over_feature_timesteps_of_one_batched_unet_call(model):
    m = model.eval()
    ids, mask, _, pixels, _, _ = batch()
    has_image = torch.tensor([True, False, True])
    rows = torch.tensor([0, 2])
    calls = []
    handle = m.unet.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    try:
        fused = m.fused_states(ids, mask, pixel_values=pixels, has_image=has_image)
    finally:
        handle.remove()
    assert calls == [2 * 4]  # ONE UNet call: 2 images x 4 timesteps
    with torch.no_grad():
        states = m.t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        z0 = m.vae.encode(pixels[rows]).latent_dist.mean * 0.18215
        per_timestep = []
        for t in (0, 10, 500, 999):
            steps = torch.full((2,), t)
            z_t = m.noise_scheduler.add_noise(z0, torch.zeros_like(z0), steps)
            per_timestep.append(plain_features(m, z_t, steps, states[rows], mask[rows])[1])
        features = torch.zeros(3, per_timestep[0].shape[1], m.feature_dim, dtype=torch.float64)
        features[rows] = torch.stack(per_timestep).mean(0)
        expected = joint_encoder_fusion(m.fusion, states, features)
    torch.testing.assert_close(fused, expected, rtol=1e-9, atol=1e-10)
    generated = m.generate(ids, mask, pixel_values=pixels, has_image=has_image, max_new_tokens=5, do_sample=False)
    reference = m.t5.generate(encoder_outputs=BaseModelOutput(last_hidden_state=expected), attention_mask=mask,
                              max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, reference)


def test_a_cross_attention_projection_is_added_when_the_widths_differ(use_backend):
    use_backend("torch")
    m = DPMMCoT(tiny.tiny_t5(d_model=64), tiny.tiny_vae(), tiny.tiny_unet(cross_attention_dim=32))
    assert isinstance(m.cross_attention_proj, torch.nn.Linear) and m.cross_attention_proj.out_features == 32
    ids, mask, labels, pixels, *_ = batch()
    out = m(ids, mask, labels, pixel_values=pixels.float())
    assert torch.isfinite(out.loss) and out.diffusion_loss > 0


def test_bad_input_names_the_argument(model):
    m = model
    ids, mask, labels, pixels, noise, timesteps = batch()
    with pytest.raises(ValueError, match="has_image: True for 2 samples, but neither pixel_values nor latents"):
        m(ids, mask, labels, has_image=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="latents: expected \\[B = 3, C = 4, h, w\\]"):
        m(ids, mask, labels, latents=torch.zeros(3, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="pixel_values: expected \\[B = 3, 3, H, W\\]"):
        m(ids, mask, labels, pixel_values=pixels[:2])
    with pytest.raises(ValueError, match="pixel_values, latents: give one"):
        m(ids, mask, labels, pixel_values=pixels, latents=torch.zeros(3, 4, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="timesteps: expected values in \\[0, 1000\\)"):
        m(ids, mask, labels, pixel_values=pixels, noise=noise, timesteps=torch.tensor([0, 1, 1000]))
    with pytest.raises(ValueError, match="noise: expected"):
        m(ids, mask, labels, pixel_values=pixels, noise=noise[:, :2])
    with pytest.raises(ValueError, match="features: expected \\[B = 3, N, feature_dim = 80\\]"):
        m.fusion(torch.zeros(3, 4, 64, dtype=torch.float64), torch.zeros(3, 2, 32, dtype=torch.float64))
    unet, t5, vae = m.unet, m.t5, m.vae
    with pytest.raises(ValueError, match="feature_blocks: \\['mid', 'up.1'\\] have different channel widths"):
        DPMMCoT(t5, vae, unet, feature_blocks=("mid", "up.1"))
    with pytest.raises(ValueError, match="feature_blocks: 'up.7', but the UNet has 2 up blocks"):
        DPMMCoT(t5, vae, unet, feature_blocks=("up.7",))
    with pytest.raises(ValueError, match="feature_timesteps: expected ints in \\[0, 1000\\)"):
        DPMMCoT(t5, vae, unet, feature_timesteps=(1000,))


def test_cache_latents_refuses_bad_images(tmp_path):
    vae = tiny.tiny_vae()
    path = str(tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match="images\\['a'\\]: values in \\[0, 255\\]"):
        cache_latents(vae, {"a": torch.full((3, 8, 8), 255.0).index_fill_(1, torch.tensor([0]), 0)}, path,
                      progress=False)
    with pytest.raises(ValueError, match="record id 'a' appears twice"):
        cache_latents(vae, [("a", torch.zeros(3, 8, 8)), ("a", torch.zeros(3, 8, 8))], path, progress=False)
    with pytest.raises(ValueError, match="images\\['b'\\]: expected a float \\[3, H, W\\]"):
        cache_latents(vae, {"b": torch.zeros(8, 8)}, path, progress=False)
    import os
    assert not os.path.exists(path)  # nothing half-written


def test_the_fixed_feature_and_text_only_controls_equal_plain_compositions(use_backend):
    """FusedT5: MM-CoT's T5 with fixed features (here the VAE latents as tokens), and plain T5 without."""
    from mmlatent.models import FusedT5, latent_tokens
    use_backend("torch")
    ids, mask, labels, pixels, *_ = batch()
    t5, vae = tiny.tiny_t5().double(), tiny.tiny_vae().double()
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * 0.18215
    features = latent_tokens(latents)
    assert features.shape == (3, 16 * 16, 4)
    fused_t5 = FusedT5(t5, feature_dim=4).double()
    out = fused_t5(ids, mask, labels, features=features)
    states = t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    fused = joint_encoder_fusion(fused_t5.fusion, states, features)
    text = t5(encoder_outputs=BaseModelOutput(last_hidden_state=fused), attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out.loss.double(), text, rtol=1e-6, atol=1e-7)
    plain = FusedT5(t5)
    torch.testing.assert_close(plain(ids, mask, labels).loss.double(),
                               t5(input_ids=ids, attention_mask=mask, labels=labels).loss, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="features: this model is text-only"):
        plain(ids, mask, labels, features=features)
    with pytest.raises(ValueError, match="features: required"):
        fused_t5(ids, mask, labels)


def test_position_codes_follow_the_formula_and_are_appended_to_the_features():
    from mmlatent.models.dpmm.model import sincos_positions, with_positions
    torch.testing.assert_close(sincos_positions(3, 5, 8, dtype=torch.float64), codes(3, 5, 8), rtol=0, atol=1e-12)
    maps = torch.randn(2, 6, 3, 5)
    tokens = with_positions(maps, 8)
    assert tokens.shape == (2, 15, 14)
    assert torch.equal(tokens[..., :6], maps.flatten(2).transpose(1, 2))
    assert torch.equal(with_positions(maps, 0), maps.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="feature_positions: expected a multiple of 4"):
        DPMMCoT(tiny.tiny_t5(), tiny.tiny_vae(), tiny.tiny_unet(), feature_positions=6)
