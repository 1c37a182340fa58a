"""The TinyDit description: a ComfyUI model config, a tiny unet_config, and its conditioning."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def host_version() -> tuple[int, ...]:
    """The running ComfyUI's version (0.0.0 for a tree without comfyui_version.py)."""
    try:
        import comfyui_version
    except ImportError:
        return (0, 0, 0)
    return _version(comfyui_version.__version__)


FLUX_PARAMS = "comfy.ldm.flux.model.FluxParams"
# What model_detection gives a plain Flux checkpoint on hosts that have the field.
FLUX_FIELDS = {FLUX_PARAMS: {"txt_ids_dims": []}}


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
    # Params fields that newer hosts require (model_detection fills them from the checkpoint), per
    # params dataclass: added only where the host's class declares them.
    host_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The ComfyUI release that added the family ("" for those 0.3.75 has): on an older host the
    # entry is skipped, saying so; on this release or newer a missing config fails instead.
    since: str = ""

    @property
    def id(self) -> str:
        return self.variant

    def missing_on_host(self) -> str | None:
        """Why this host cannot build the entry (a release older than the family), or None.

        Raises when the host is as new as ``since`` and still lacks the config: a typo, not an old host.
        """
        import comfy.supported_models

        if hasattr(comfy.supported_models, self.config):
            return None
        host = host_version()
        if self.since and host < _version(self.since):
            return (f"ComfyUI {'.'.join(map(str, host))} has no supported_models.{self.config}: that model config "
                    f"came with ComfyUI {self.since}")
        raise AttributeError(f"{self.id}: comfy.supported_models has no {self.config} on ComfyUI "
                             f"{'.'.join(map(str, host))}")

    def build(self, seed: int = 0) -> Any:
        import comfy.model_management
        import comfy.model_patcher
        import comfy.supported_models
        from comfy_bootstrap import load_pack

        from .base_init import seeded_init_

        unet_config = dict(self.unet_config)
        for params, defaults in self.host_fields.items():
            unet_config = load_pack().demo_models.host_compat.with_host_fields(unet_config, params, defaults)
        model_config = getattr(comfy.supported_models, self.config)(unet_config)
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
