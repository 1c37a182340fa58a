"""The TinyDit description: a ComfyUI model config, a tiny unet_config, and its conditioning."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TinyDit:
    """A tiny instance of one family, made exactly as a checkpoint loader makes the real one:
    ``comfy.supported_models.<config>(unet_config).get_model(...)`` in a ModelPatcher."""

    family: str  # the DitFamily.name it exercises (or "generic (...)" for the fallback)
    variant: str  # test id, e.g. "flux-dev"
    config: str  # class name in comfy.supported_models
    unet_config: dict[str, Any]
    latent_shape: tuple[int, ...]  # batch 1; 4-D images, 5-D video
    context: tuple[int, int]  # (tokens, dim) of the cross-attention conditioning
    # Extra conditioning entries (pooled_output, guidance, ...), made from a seeded generator.
    cond_extras: Callable[[torch.Generator], dict[str, Any]] = field(default=lambda g: {})
    cfg: float = 4.0
    # Max abs difference allowed between an all-compute schedule and no patch; 0 means bit-identical.
    tolerance: float = 0.0
    tolerance_reason: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra get_model arguments
    # Hook for configs whose get_model needs more than ({}, ""): returns the BaseModel.
    make_model: Callable[[Any], Any] | None = None
    # Block lists that see the same input at every step (text refiners without timestep modulation):
    # the profile must measure them as exactly unchanged, and every other block as changed.
    static_blocks: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.variant

    def build(self, seed: int = 0) -> Any:
        import comfy.model_management
        import comfy.model_patcher
        import comfy.supported_models

        from .base_init import seeded_init_

        model_config = getattr(comfy.supported_models, self.config)(dict(self.unet_config))
        model_config.set_inference_dtype(torch.float32, None)
        model = self.make_model(model_config) if self.make_model else model_config.get_model({}, "",
                                                                                             **self.model_kwargs)
        seeded_init_(model.diffusion_model, seed)
        model.diffusion_model.to(torch.float32)
        device = comfy.model_management.get_torch_device()
        return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                                offload_device=comfy.model_management.unet_offload_device())

    def conditioning(self, prompt: str) -> list:
        seed = int.from_bytes(hashlib.sha256(f"{self.variant}|{prompt}".encode()).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        tokens, dim = self.context
        context = torch.randn((1, tokens, dim), generator=generator)
        return [[context, dict(self.cond_extras(generator))]]

    def conds(self) -> tuple[list, list]:
        return self.conditioning("a red square"), self.conditioning("blurry")

    def latent(self, batch: int = 1) -> dict[str, torch.Tensor]:
        return {"samples": torch.zeros((batch, *self.latent_shape[1:]))}
