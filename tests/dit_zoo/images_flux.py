"""Flux-layout families: Flux dev/schnell/Kontext."""

from __future__ import annotations

import torch

from .base import FLUX_FIELDS, TinyDit

_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 32,
         "num_heads": 2, "axes_dim": [4, 6, 6], "mlp_ratio": 2.0, "theta": 10000, "qkv_bias": True,
         "context_in_dim": 24, "vec_in_dim": 12, "depth": 2, "depth_single_blocks": 2}


def _pooled(generator: torch.Generator, guidance: float | None = 3.5) -> dict:
    extras = {"pooled_output": torch.randn((1, 12), generator=generator)}
    if guidance is not None:
        extras["guidance"] = guidance
    return extras


ENTRIES = [
    TinyDit("Flux (dev, schnell, Kontext, Flux.2)", "flux-dev", "Flux", {**_FLUX, "guidance_embed": True},
            (1, 16, 8, 8), (6, 24), cond_extras=_pooled, host_fields=FLUX_FIELDS),
    TinyDit("Flux (dev, schnell, Kontext, Flux.2)", "flux-schnell", "FluxSchnell", {**_FLUX, "guidance_embed": False},
            (1, 16, 8, 8), (6, 24), cond_extras=lambda g: _pooled(g, None), cfg=1.0, host_fields=FLUX_FIELDS),
]
