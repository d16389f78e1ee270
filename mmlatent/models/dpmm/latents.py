"""VAE latents computed once: with a frozen VAE, a run reads each image's latents from a safetensors file keyed by
record id instead of running the VAE encoder every step."""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

LATENTS_FORMAT = "mmlatent-vae-latents"
Images = Union[Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]]


def _check_image(record_id: Any, image: Any) -> torch.Tensor:
    if not isinstance(record_id, str) or not record_id:
        raise ValueError(f"images: record ids must be non-empty strings, got {record_id!r}")
    if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        got = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"images[{record_id!r}]: expected a float [3, H, W] tensor in [-1, 1], got {got}")
    if image.numel() and (float(image.min()) < -1.001 or float(image.max()) > 1.001):
        raise ValueError(f"images[{record_id!r}]: values in [{float(image.min()):.3g}, {float(image.max()):.3g}]; "
                         f"expected [-1, 1] (scale 0-255 or 0-1 images first)")
    return image


@torch.no_grad()
def cache_latents(vae: nn.Module, images: Images, path: str, *, scale: Optional[float] = None, batch_size: int = 16,
                  progress: bool = True) -> str:
    """Write every image's VAE latents to ``path`` (safetensors), keyed by record id.

    Args:
        vae: a diffusers ``AutoencoderKL``.
        images: {record id: [3, H, W] float in [-1, 1]} or (record id, image) pairs; consecutive images of one
            size are encoded together.
        path: the file to write (atomically: a crash leaves the old file or none, never half of one).
        scale: the latents are the posterior's mean times ``scale`` (None: ``vae.config.scaling_factor``), which
            is what :class:`~mmlatent.models.DPMMCoT` takes as ``latents``; the file records it.
        batch_size: images per VAE call.

    Returns:
        ``path``. :func:`load_latents` reads it back.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    scale = float(vae.config.scaling_factor if scale is None else scale)
    if not scale > 0:
        raise ValueError(f"scale: expected a positive number, got {scale}")
    pairs = list(images.items() if isinstance(images, Mapping) else images)
    seen: Dict[str, int] = {}
    for index, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"images: item {index} is not a (record id, image) pair")
        _check_image(*pair)
        if pair[0] in seen:
            raise ValueError(f"images: record id {pair[0]!r} appears twice (items {seen[pair[0]]} and {index})")
        seen[pair[0]] = index
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out: Dict[str, torch.Tensor] = {}
    batches: List[List[Tuple[str, torch.Tensor]]] = []
    for pair in pairs:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1].shape == pair[1].shape:
            batches[-1].append(pair)
        else:
            batches.append([pair])
    for batch in tqdm(batches, desc="VAE latents", disable=not progress, unit="batch"):
        pixels = torch.stack([image for _, image in batch]).to(device=device, dtype=dtype)
        latents = (vae.encode(pixels).latent_dist.mean * scale).float().cpu()
        for (record_id, _), latent in zip(batch, latents):
            out[record_id] = latent.contiguous()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.partial"
    save_file(out, partial, metadata={"format": LATENTS_FORMAT, "scale": repr(scale), "count": str(len(out))})
    os.replace(partial, path)
    return path


def load_latents(path: str, *, scale: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """{record id: [C, h, w] float32} from a file :func:`cache_latents` wrote; with ``scale``, a file written at
    another scale is refused (its latents would enter the UNet at the wrong magnitude)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no latents file at {path}")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != LATENTS_FORMAT:
        raise ValueError(f"path: {path} is not a latents file written by cache_latents (format "
                         f"{metadata.get('format')!r})")
    written = float(metadata["scale"])
    if scale is not None and abs(written - scale) > 1e-9 * max(1.0, abs(scale)):
        raise ValueError(f"scale: {path} holds latents at scale {written}, the model expects {scale}")
    latents = load_file(path)
    if len(latents) != int(metadata.get("count", len(latents))):
        raise ValueError(f"path: {path} holds {len(latents)} latents, its metadata says {metadata['count']}")
    return latents


__all__ = ["cache_latents", "load_latents", "LATENTS_FORMAT"]
