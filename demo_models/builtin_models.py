"""Built-in models made from ComfyUI's own classes, with seeded weights.

No diffusion weights can be downloaded where this pack is developed, so the demo and
the tests build SD-layout UNets from ``comfy.supported_models`` configs directly:
the same ``BaseModel``/``UNetModel``/``ModelPatcher`` objects a checkpoint loader
returns, at a size that runs on a CPU.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from .host_compat import core_patcher, weights_at_construction

# Full-size UNet configs as ComfyUI's model detection produces them (comfy/model_detection.py).
_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "use_temporal_attention": False, "use_temporal_resblock": False}
FULL_UNET_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "SD15": ("SD15", {**_COMMON, "adm_in_channels": None, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
                      "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
                      "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
                      "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}),
    "SD21": ("SD20", {**_COMMON, "adm_in_channels": None, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
                      "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
                      "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 1024,
                      "num_head_channels": 64, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}),
    "SDXL": ("SDXL", {**_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "model_channels": 320,
                      "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
                      "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
                      "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}),
    "SDXLRefiner": ("SDXLRefiner", {**_COMMON, "num_classes": "sequential", "adm_in_channels": 2560,
                                    "model_channels": 384, "num_res_blocks": [2, 2, 2, 2],
                                    "transformer_depth": [0, 0, 4, 4, 4, 4, 0, 0], "channel_mult": [1, 2, 4, 4],
                                    "transformer_depth_middle": 4, "use_linear_in_transformer": True,
                                    "context_dim": 1280, "num_head_channels": 64,
                                    "transformer_depth_output": [0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0]}),
}

# Small SD1.5-layout UNets (ResBlocks, SpatialTransformers with cross-attention, down/upsampling).
SMALL_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # For unit tests: a few milliseconds per step.
    "tiny": {**_COMMON, "adm_in_channels": None, "model_channels": 32, "num_res_blocks": [1, 1],
             "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
             "use_linear_in_transformer": False, "context_dim": 32, "num_heads": 4, "num_head_channels": -1,
             "transformer_depth_output": [1, 1, 1, 1]},
    # For the demo and the server test: SD1.5's layout at a fifth of its width.
    "small": {**_COMMON, "adm_in_channels": None, "model_channels": 64, "num_res_blocks": [2, 2, 2],
              "transformer_depth": [1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4], "transformer_depth_middle": 1,
              "use_linear_in_transformer": False, "context_dim": 64, "num_heads": 4, "num_head_channels": -1,
              "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0, 0]},
}


def _config_class(name: str) -> type:
    import comfy.supported_models

    return getattr(comfy.supported_models, name)


def seeded_init_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic weights that keep activations in range: fan-in scaled normals, unit norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif param.ndim <= 1:  # GroupNorm / LayerNorm scales, scalar gates
                param.fill_(1.0)
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))


def build_unet_patcher(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ModelPatcher around an SD1.5-type ``BaseModel`` with a small UNet and seeded weights."""
    import comfy.model_management
    import comfy.model_patcher

    unet_config = dict(SMALL_UNET_CONFIGS[size])
    model_config = _config_class("SD15")(unet_config)
    # SD15 fills in its own head count; keep the small one.
    model_config.unet_config.update(num_heads=unet_config["num_heads"], num_head_channels=unet_config["num_head_channels"])
    model_config.set_inference_dtype(dtype, None)
    with weights_at_construction():
        model = model_config.get_model({}, "")
    seeded_init_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    device = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    return core_patcher(model, device, offload)


def build_full_unet(name: str, device: str = "meta") -> tuple[torch.nn.Module, str]:
    """A full-size UNet of ``name`` (SD15, SD21, SDXL, SDXLRefiner); on the meta device by default."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config_name, unet_config = FULL_UNET_CONFIGS[name]
    model = UNetModel(**unet_config, dtype=torch.float32, device=device, operations=comfy.ops.disable_weight_init)
    return model, config_name


def context_dim_of(model_patcher: Any) -> int:
    return int(model_patcher.model.model_config.unet_config["context_dim"])


def prompt_conditioning(prompt: str, context_dim: int, tokens: int = 77) -> list:
    """CONDITIONING for the built-in models: a context seeded by the prompt text.

    The built-in models have no text encoder; the prompt only picks a reproducible context.
    """
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn((1, tokens, context_dim), generator=generator)
    return [[context, {}]]
