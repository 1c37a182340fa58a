"""The video reference model: a small trained text-to-video Wan made of ComfyUI's own classes.

The diffusion model is ComfyUI's ``comfy.ldm.wan.model.WanModel`` (WanAttentionBlocks: self-attention
with 3D RoPE over frames x rows x columns, cross-attention to the text, a feed-forward) inside a
``comfy.model_base.WAN21`` made by ``comfy.supported_models.WAN21_T2V``, so it samples with Wan's
flow matching (``ModelSamplingDiscreteFlow``, shift 8) and patches, profiles and caches exactly as a
Wan 2.1 checkpoint does. It works in pixel space: clips of ``FRAMES`` frames at 32x32 (3 channels,
values in [-1, 1], 1x4x4 patches: 512 tokens), trained on the captioned moving shapes of
``reference_clips``. An empty latent from EmptyHunyuanLatentVideo at 256x256 and length 29 is
its 8 x 32 x 32 (channels, 1/8 size and Wan's 4x frame compression line up). Its VAE is ComfyUI's
pixel-space VAE read as video, so VAE Decode gives the frames as a batch of IMAGEs.
``scripts/train_reference_video.py`` trains it; the weights ship in ``models/reference_video/``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from . import reference_clips, reference_data
from .host_compat import weights_at_construction
from .reference_model import (
    CONTEXT_DIM,
    VOCABULARY,
    load_weights,
    pixel_latent_format_class,
    pixel_space_vae,
    read_weights,
    tokenize,
)

WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "models" / "reference_video" / "reference_video.safetensors"
RESOLUTION = reference_data.SIZE
FRAMES = reference_clips.FRAMES
VIDEO_VOCABULARY: tuple[str, ...] = (*VOCABULARY, *(w for w in reference_clips.WORDS if w not in VOCABULARY))

# What model_detection would read off the state dict of a Wan 2.1 T2V checkpoint of this shape.
UNET_CONFIG: dict[str, Any] = {
    "image_model": "wan2.1", "model_type": "t2v", "dim": 96, "ffn_dim": 256, "num_heads": 4, "num_layers": 6,
    "text_dim": CONTEXT_DIM, "freq_dim": 64, "patch_size": (1, 4, 4), "in_dim": 3, "out_dim": 3,
    "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}


@functools.cache
def _video_latent_format_class() -> type:
    class ReferencePixelVideo(pixel_latent_format_class()):
        latent_dimensions = 3  # B x C x T x H x W, as Wan's own latent format
        temporal_downscale_ratio = 4  # what EmptyHunyuanLatentVideo assumes: length 29 -> 8 frames

    return ReferencePixelVideo


def build_base_model(dtype: torch.dtype = torch.float32) -> Any:
    """The WAN21 ``BaseModel`` with the reference transformer and a pixel-space video latent (no weights)."""
    import comfy.supported_models

    model_config = comfy.supported_models.WAN21_T2V(dict(UNET_CONFIG))
    model_config.latent_format = _video_latent_format_class()()
    model_config.set_inference_dtype(dtype, None)
    with weights_at_construction():
        return model_config.get_model({}, "")


def pixel_space_video_vae() -> Any:
    """ComfyUI's pixel-space VAE, decoding 5D latents as video (every frame, not the first only)."""
    vae = pixel_space_vae()
    vae.latent_dim = 3
    return vae


def load_state(path: Path | str = WEIGHTS_PATH) -> dict[str, torch.Tensor]:
    return read_weights(path, "scripts/train_reference_video.py")


class ReferenceVideo:
    """The loaded reference video model: MODEL, text encoder and VAE, as a checkpoint loader gives them."""

    def __init__(self, path: Path | str = WEIGHTS_PATH, dtype: torch.dtype = torch.float32) -> None:
        self.patcher, self.text_encoder = load_weights(build_base_model(dtype), load_state(path), dtype,
                                                       VIDEO_VOCABULARY)
        self.vae = pixel_space_video_vae()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(tokenize(prompts, VIDEO_VOCABULARY))

    def conditioning(self, prompt: str) -> list:
        """ComfyUI CONDITIONING for ``prompt``: [[context (1 x tokens x dim), {}]], as Wan's text encoder gives."""
        return self.conditioning_batch([prompt])

    def conditioning_batch(self, prompts: list[str]) -> list:
        """One CONDITIONING entry for a batch of latents, one prompt per latent."""
        return [[self.encode(prompts), {}]]


_CACHE: dict[tuple[str, torch.dtype], ReferenceVideo] = {}


def load_reference_video(path: Path | str = WEIGHTS_PATH, dtype: torch.dtype = torch.float32) -> ReferenceVideo:
    """The reference video model; loaded once per path (callers clone the patcher before patching it)."""
    key = (str(Path(path).resolve()), dtype)
    if key not in _CACHE:
        _CACHE[key] = ReferenceVideo(path, dtype)
    return _CACHE[key]


def empty_latent(batch_size: int = 1, frames: int = FRAMES, resolution: int = RESOLUTION) -> dict[str, torch.Tensor]:
    """An empty LATENT for the pixel-space video model (3 channels, every frame, full resolution)."""
    return {"samples": torch.zeros(batch_size, 3, frames, resolution, resolution)}
