"""The transformer reference model: a small trained text-to-image Flux made of ComfyUI's own classes.

The diffusion model is ComfyUI's ``comfy.ldm.flux.model.Flux`` (double-stream and
single-stream blocks, RoPE over the patch grid) inside a ``comfy.model_base.Flux`` made by
``comfy.supported_models.Flux``, so it samples with Flux's flow matching and time shift
(``ModelSamplingFlux``) and patches, profiles and caches exactly as a Flux checkpoint does.
It works in pixel space (3 channels, 32x32, values in [-1, 1], 2x2 patches: 256 image
tokens), trained on the same captioned shapes as the UNet reference (``reference_data``).
Its text encoder is the UNet reference's token encoder design with its own weights: the
token sequence is Flux's ``context``, their mean the pooled ``y``. No guidance embedding:
it samples with classifier-free guidance against the empty prompt.
``scripts/train_reference_dit.py`` trains both; the weights ship in ``models/reference_dit/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import reference_data
from .host_compat import flux_config, weights_at_construction
from .reference_model import CONTEXT_DIM, load_weights, pixel_latent_format, pixel_space_vae, read_weights, tokenize

logger = logging.getLogger(__name__)

WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "models" / "reference_dit" / "reference_dit.safetensors"
RESOLUTION = reference_data.SIZE

# What model_detection would read off the state dict of a Flux checkpoint of this shape.
UNET_CONFIG: dict[str, Any] = {
    "image_model": "flux", "in_channels": 3, "out_channels": 3, "patch_size": 4,
    "hidden_size": 128, "num_heads": 4, "axes_dim": [8, 12, 12], "theta": 10000, "mlp_ratio": 4.0,
    "depth": 3, "depth_single_blocks": 6, "qkv_bias": True, "guidance_embed": False,
    "context_in_dim": CONTEXT_DIM, "vec_in_dim": CONTEXT_DIM,
}


def build_base_model(dtype: torch.dtype = torch.float32) -> Any:
    """The Flux ``BaseModel`` with the reference transformer and pixel-space latent format (no weights)."""
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(flux_config(UNET_CONFIG))
    # Pixel space: 3 channels, no scaling (Flux's own latent format expects 16 VAE channels); an
    # EmptyLatentImage keeps its 1/8 size on every host (see reference_model.pixel_latent_format).
    model_config.latent_format = pixel_latent_format()
    model_config.set_inference_dtype(dtype, None)
    with weights_at_construction():
        return model_config.get_model({}, "")


def pooled(context: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Flux's pooled vector ``y``: the mean of the encoded tokens that are not padding."""
    mask = (ids != 0).unsqueeze(-1).to(context.dtype)
    return (context * mask).sum(1) / mask.sum(1)


def load_state(path: Path | str = WEIGHTS_PATH) -> dict[str, torch.Tensor]:
    return read_weights(path, "scripts/train_reference_dit.py")


class ReferenceDit:
    """The loaded reference transformer: MODEL, text encoder and VAE, as a checkpoint loader gives them."""

    def __init__(self, path: Path | str = WEIGHTS_PATH, dtype: torch.dtype = torch.float32) -> None:
        self.patcher, self.text_encoder = load_weights(build_base_model(dtype), load_state(path), dtype)
        self.vae = pixel_space_vae()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context B x tokens x dim, pooled B x dim) for ``prompts``."""
        ids = tokenize(prompts)
        context = self.text_encoder(ids)
        return context, pooled(context, ids)

    def conditioning(self, prompt: str) -> list:
        """ComfyUI CONDITIONING for ``prompt``: [[context, {"pooled_output": y}]], as Flux's text encoders give."""
        return self.conditioning_batch([prompt])

    def conditioning_batch(self, prompts: list[str]) -> list:
        """One CONDITIONING entry for a batch of latents, one prompt per latent."""
        context, y = self.encode(prompts)
        return [[context, {"pooled_output": y}]]


_CACHE: dict[tuple[str, torch.dtype], ReferenceDit] = {}


def load_reference_dit(path: Path | str = WEIGHTS_PATH, dtype: torch.dtype = torch.float32) -> ReferenceDit:
    """The reference transformer; loaded once per path (callers clone the patcher before patching it)."""
    key = (str(Path(path).resolve()), dtype)
    if key not in _CACHE:
        _CACHE[key] = ReferenceDit(path, dtype)
    return _CACHE[key]


def empty_latent(batch_size: int = 1, resolution: int = RESOLUTION) -> dict[str, torch.Tensor]:
    """An empty LATENT for the pixel-space model (3 channels at full resolution)."""
    return {"samples": torch.zeros(batch_size, 3, resolution, resolution)}
