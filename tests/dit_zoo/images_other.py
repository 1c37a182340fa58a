"""Other image DiT families: PixArt, HunyuanDiT, Lumina2 / Z-Image, HiDream, Qwen-Image, OmniGen2,
Chroma / Chroma Radiance, and the Flux variants Kontext and Flux.2."""

from __future__ import annotations

import torch

from .base import FLUX_FIELDS, FLUX_PARAMS, TinyDit

_FLUX_FAMILY = "Flux (dev, schnell, Kontext, Flux.2)"
# Head size 16 everywhere: rope axes sum to it.
_AXES3 = [4, 6, 6]


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


def _hydit_conds(generator: torch.Generator) -> dict:
    # CLIP mask over the 6 context tokens and the mT5 stream with its mask; a padded last token
    # exercises the model's learned padding.
    mask = torch.ones((1, 6))
    mask[:, -1] = 0
    return {"attention_mask": mask, "conditioning_mt5xl": _randn(generator, 1, 5, 32),
            "attention_mask_mt5xl": torch.ones((1, 5))}


_HYDIT = {"input_size": (8, 8), "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 4, "num_heads": 2,
          "mlp_ratio": 2.0, "text_states_dim": 24, "text_states_dim_t5": 32, "text_len": 6, "text_len_t5": 5}

# PixArt's pos-embed base size is round(side / 64) * 64 // patch: a latent side under 48 divides by
# zero. A 64x64 latent in 8x8 patches keeps it at 8x8 tokens.
_PIXART = {"patch_size": 8, "in_channels": 4, "hidden_size": 48, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
           "caption_channels": 24, "model_max_length": 6, "input_size": 64}

_LUMINA = {"patch_size": 2, "in_channels": 16, "dim": 32, "n_layers": 2, "n_refiner_layers": 2, "n_heads": 2,
           "n_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": 4.0, "qk_norm": True, "cap_feat_dim": 24,
           "axes_dims": _AXES3, "axes_lens": [64, 64, 64], "rope_theta": 10000.0}

# Z-Image's timestep embedding is 256 wide and its blocks' adaLN reads min(dim, 256): dim must be 256 at least.
_ZIMAGE = {**_LUMINA, "dim": 256, "n_kv_heads": 2, "axes_dims": [32, 48, 48], "ffn_dim_multiplier": 8.0 / 3.0,
           "rope_theta": 256.0,
           "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}

# Two llama layers in the conditioning; each of the 2 + 2 blocks reads one of them.
_HIDREAM = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2, "num_single_layers": 2,
            "attention_head_dim": 16, "num_attention_heads": 2, "caption_channels": [24, 20], "text_emb_dim": 12,
            "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [8, 4, 4],
            "max_resolution": [8, 8], "llama_layers": [0, 1, 0, 1]}


def _hidream_conds(generator: torch.Generator) -> dict:
    return {"pooled_output": _randn(generator, 1, 12), "conditioning_llama3": _randn(generator, 1, 2, 5, 20)}


_QWEN = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 24, "axes_dims_rope": _AXES3}

_OMNIGEN2 = {"patch_size": 2, "in_channels": 16, "hidden_size": 32, "num_layers": 2, "num_refiner_layers": 2,
             "num_attention_heads": 2, "num_kv_heads": 1, "multiple_of": 16, "axes_dim_rope": _AXES3,
             "axes_lens": [64, 64, 64], "text_feat_dim": 24, "timestep_scale": 1000.0}


def _reference(generator: torch.Generator, channels: int = 16, size: int = 8, **extras) -> dict:
    return {"reference_latents": [_randn(generator, 1, channels, size, size)], **extras}


def _omnigen2_conds(generator: torch.Generator) -> dict:
    # OmniGen2 takes num_tokens from the attention mask only (all ones: no mask cond of its own);
    # an integer mask, as the text encoder gives, so num_tokens is an int.
    return _reference(generator, attention_mask=torch.ones((1, 6), dtype=torch.long))


def _no_pooled(generator: torch.Generator, **extras) -> dict:
    # T5-only models: the text encoder's pooled output is None (Flux's encode_adm reads the key).
    return {"pooled_output": None, **extras}


_CHROMA = {"in_channels": 64, "out_channels": 64, "context_in_dim": 24, "hidden_size": 32, "mlp_ratio": 2.0,
           "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": _AXES3, "theta": 10000,
           "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 32, "hidden_dim": 32, "n_layers": 1}

# Pixel space: 3 channels in 16x16 patches, so a 32x32 image is 2x2 tokens; NeRF tiling off.
_RADIANCE = {**_CHROMA, "in_channels": 3, "out_channels": 3, "patch_size": 16, "nerf_hidden_size": 16,
             "nerf_mlp_ratio": 2, "nerf_depth": 2, "nerf_max_freqs": 4, "nerf_tile_size": 0,
             "nerf_final_head_type": "linear", "nerf_embedder_dtype": torch.float32}

_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 32,
         "num_heads": 2, "axes_dim": _AXES3, "mlp_ratio": 2.0, "theta": 10000, "qkv_bias": True,
         "context_in_dim": 24, "vec_in_dim": 12, "depth": 2, "depth_single_blocks": 2, "guidance_embed": True}

# Flux.2 as model_detection makes it: global modulation, no pooled vector, patch 1 on 128 channels.
_FLUX2 = {**_FLUX, "image_model": "flux2", "in_channels": 128, "out_channels": 128, "patch_size": 1,
          "axes_dim": [4, 4, 4, 4], "theta": 2000, "mlp_ratio": 3.0, "vec_in_dim": None, "global_modulation": True,
          "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False, "default_ref_method": "index",
          "ref_index_scale": 10.0}

# Fields newer hosts require, as model_detection sets them for these checkpoints.
_CHROMA_FIELDS = {"comfy.ldm.chroma.model.ChromaParams": {"txt_ids_dims": [], "vec_in_dim": None}}
_RADIANCE_FIELDS = {"comfy.ldm.chroma_radiance.model.ChromaRadianceParams": {
    "txt_ids_dims": [], "vec_in_dim": None, "use_x0": False, "use_sequential_txt_ids": False}}


ENTRIES = [
    TinyDit("PixArt", "pixart-alpha", "PixArtAlpha", {**_PIXART, "image_model": "pixart_alpha",
                                                      "micro_condition": True}, (1, 4, 64, 64), (6, 24)),
    TinyDit("PixArt", "pixart-sigma", "PixArtSigma", {**_PIXART, "image_model": "pixart_sigma",
                                                      "micro_condition": False}, (1, 4, 64, 64), (6, 24)),
    # depth 4: block 3 takes block 0's output as its long skip connection.
    TinyDit("HunyuanDiT", "hydit", "HunyuanDiT", {**_HYDIT, "image_model": "hydit"}, (1, 4, 8, 8), (6, 24),
            cond_extras=_hydit_conds),
    TinyDit("HunyuanDiT", "hydit1", "HunyuanDiT1", {**_HYDIT, "image_model": "hydit1", "size_cond": True,
                                                    "use_style_cond": True},
            (1, 4, 8, 8), (6, 24), cond_extras=_hydit_conds),
    # The context refiner has no timestep modulation: its input and output are the same every step.
    TinyDit("Lumina2 / Z-Image", "lumina2", "Lumina2", {**_LUMINA, "image_model": "lumina2"}, (1, 16, 8, 8), (6, 24),
            static_blocks=("context_refiner",)),
    TinyDit("Lumina2 / Z-Image", "z-image", "ZImage", {**_ZIMAGE, "image_model": "lumina2"}, (1, 16, 8, 8), (6, 24),
            static_blocks=("context_refiner",)),
    TinyDit("HiDream", "hidream", "HiDream", {**_HIDREAM, "image_model": "hidream"}, (1, 16, 8, 8), (6, 24),
            cond_extras=_hidream_conds),
    TinyDit("Qwen-Image", "qwen-image", "QwenImage", {**_QWEN, "image_model": "qwen_image"}, (1, 16, 1, 8, 8),
            (6, 24)),
    # A reference image runs the ref_image_refiner blocks too.
    TinyDit("OmniGen2", "omnigen2", "Omnigen2", {**_OMNIGEN2, "image_model": "omnigen2"}, (1, 16, 8, 8), (6, 24),
            cond_extras=_omnigen2_conds, static_blocks=("context_refiner",)),
    TinyDit("Chroma", "chroma", "Chroma", {**_CHROMA, "image_model": "chroma"}, (1, 16, 8, 8), (6, 24),
            cond_extras=_no_pooled, host_fields=_CHROMA_FIELDS),
    TinyDit("Chroma Radiance", "chroma-radiance", "ChromaRadiance", {**_RADIANCE, "image_model": "chroma_radiance"},
            (1, 3, 32, 32), (6, 24), cond_extras=_no_pooled, host_fields=_RADIANCE_FIELDS),
    TinyDit(_FLUX_FAMILY, "flux-kontext", "Flux", _FLUX, (1, 16, 8, 8), (6, 24),
            cond_extras=lambda g: _reference(g, pooled_output=_randn(g, 1, 12), guidance=2.5), host_fields=FLUX_FIELDS),
    TinyDit(_FLUX_FAMILY, "flux2", "Flux2", _FLUX2, (1, 128, 4, 4), (6, 24),
            cond_extras=lambda g: _reference(g, channels=128, size=4, pooled_output=None, guidance=4.0),
            host_fields={FLUX_PARAMS: {"txt_ids_dims": [3]}}),
]
