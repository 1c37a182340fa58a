"""Image DiT families new in ComfyUI 0.33: Lens, Ideogram 4, Krea 2, Mage-Flow, Boogu-Image, JoyImage,
ERNIE-Image, PixelDiT / PiD; and the new configs on mapped families: Anima (Cosmos-Predict2), LongCat-Image
(Flux) and Z-Image pixel space (Lumina2 / Z-Image). HiDream-O1 is refused (tests/test_refused_images.py).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import FLUX_PARAMS, TinyDit

SINCE = "0.33.0"
_FLUX_FAMILY = "Flux (dev, schnell, Kontext, Flux.2)"
# Head size 16 everywhere: rope axes sum to it.
_AXES3 = [4, 6, 6]


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


def _padded_mask(tokens: int = 6) -> torch.Tensor:
    # Text-encoder masks: the last token is padding, so the masked attention paths run.
    mask = torch.ones((1, tokens), dtype=torch.long)
    mask[:, -1] = 0
    return mask


def _overriding(**unet_config: Any):
    """A make_model for configs whose ``unet_extra_config`` writes the full-size dims over the tiny ones
    (``supported_models_base.BASE.__init__``): put the tiny ones back, then ``get_model`` as the loader does."""

    def make_model(model_config):
        model_config.unet_config.update(unet_config)
        return model_config.get_model({}, "")

    return make_model


# Anima: a Cosmos-Predict2 MiniTrainDIT with an LLM adapter (fixed at 1024 wide, 6 layers) that maps
# Qwen3 0.6B hidden states and T5 token ids to the 1024-wide cross-attention context (padded to 512
# tokens). Under inference mode it runs in extra_conds, once per prompt; here (no inference mode) in
# forward, before the DiT blocks, on the text alone: either way its blocks are not cached.
_ANIMA = {"image_model": "anima", "max_img_h": 16, "max_img_w": 16, "max_frames": 4, "in_channels": 16,
          "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 32, "num_blocks": 2,
          "num_heads": 2, "mlp_ratio": 2.0, "crossattn_emb_channels": 1024, "concat_padding_mask": True,
          "pos_emb_cls": "rope3d", "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1,
          "max_fps": 30, "use_adaln_lora": True, "adaln_lora_dim": 8}


def _anima_conds(generator: torch.Generator) -> dict:
    return {"t5xxl_ids": torch.randint(0, 32128, (5,), generator=generator), "t5xxl_weights": torch.ones(5)}


# LongCat-Image: Flux without pooled vector or guidance embedding; model_detection gives it
# txt_ids_dims [1, 2] (text positions on both spatial rope axes) and model_base shifts the image
# positions past the text (rope_options).
_LONGCAT = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 32,
            "num_heads": 2, "axes_dim": _AXES3, "mlp_ratio": 2.0, "theta": 10000, "qkv_bias": True,
            "context_in_dim": 24, "vec_in_dim": None, "depth": 2, "depth_single_blocks": 2, "guidance_embed": False}

# Z-Image pixel space: Z-Image's NextDiT on raw RGB in 4x4 patches, its final layer replaced by a
# per-patch MLP decoder (dec_net: small next to the backbone, it always runs). Z-Image's adaLN reads
# min(dim, 256), so dim is 256 here too.
_ZIMAGE_PIXEL = {"image_model": "zimage_pixel", "patch_size": 4, "in_channels": 3, "dim": 256, "n_layers": 2,
                 "n_refiner_layers": 2, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16,
                 "ffn_dim_multiplier": 8.0 / 3.0, "qk_norm": True, "cap_feat_dim": 24, "axes_dims": [32, 48, 48],
                 "axes_lens": [64, 64, 64], "rope_theta": 256.0, "z_image_modulation": True, "time_scale": 1000.0,
                 "pad_tokens_multiple": 32, "decoder_in_channels": 48, "decoder_hidden_size": 16,
                 "decoder_num_res_blocks": 2, "decoder_max_freqs": 4}

# Lens: dual-stream MMDiT on the 128-channel Flux.2 latent (no patchify in the model); the text is
# two encoder layers side by side (multi-layer feature), 12 wide each.
_LENS = {"image_model": "lens", "in_channels": 128, "out_channels": 32, "num_layers": 2, "attention_head_dim": 16,
         "num_attention_heads": 2, "enc_hidden_dim": 12, "axes_dims_rope": _AXES3,
         "multi_layer_encoder_feature": True, "selected_layer_index": (0, 1)}

# Ideogram 4: single stream over [text ; image] tokens, interleaved MRoPE (sections sum to head/2).
_IDEOGRAM4 = {"image_model": "ideogram4", "in_channels": 128, "num_layers": 2, "num_attention_heads": 2,
              "attention_head_dim": 16, "intermediate_size": 64, "adaln_dim": 16, "llm_features_dim": 24,
              "rope_theta": 10000, "mrope_section": [4, 2, 2], "norm_eps": 1e-5}

# Krea 2: single stream; its text fusion adapter (2 + 2 blocks on 2 stacked text-encoder layers, no
# timestep) is small and runs inside the model's txtfusion module, not as a cached block list.
_KREA2 = {"image_model": "krea2", "features": 32, "tdim": 32, "txtdim": 16, "heads": 2, "kvheads": 1,
          "multiplier": 2, "layers": 2, "patch": 2, "channels": 16, "txtlayers": 2, "txtheads": 2, "txtkvheads": 2}


def _krea2_conds(generator: torch.Generator) -> dict:
    # An edit reference with its own zero-timestep modulation (the blocks' timestep_zero_index path).
    return {"reference_latents": [_randn(generator, 1, 16, 1, 8, 8)],
            "reference_latents_method": "index_timestep_zero"}


# Mage-Flow: Qwen-Image's double-stream blocks on the 128-channel Flux.2 latent, patch 1.
_MAGE_FLOW = {"image_model": "mage_flow", "in_channels": 128, "out_channels": 128, "num_layers": 2,
              "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 24,
              "axes_dims_rope": _AXES3}

# Boogu-Image: OmniGen2's refiners and single-stream layers with a double-stream stage between them.
_BOOGU = {"image_model": "boogu", "patch_size": 2, "in_channels": 16, "hidden_size": 32, "num_layers": 2,
          "num_double_stream_layers": 2, "num_refiner_layers": 2, "num_attention_heads": 2, "num_kv_heads": 1,
          "multiple_of": 16, "axes_dim_rope": _AXES3, "axes_lens": [64, 64, 64], "instruction_feat_dim": 24,
          "timestep_scale": 1000.0}


def _boogu_conds(generator: torch.Generator) -> dict:
    # As OmniGen2: num_tokens from the (integer, all ones) mask; a reference image runs ref_image_refiner.
    return {"reference_latents": [_randn(generator, 1, 16, 8, 8)],
            "attention_mask": torch.ones((1, 6), dtype=torch.long)}


# JoyImage: double-stream blocks; its unet_extra_config sets the full-size rope (theta, 128-wide head).
_JOYIMAGE = {"image_model": "joyimage", "patch_size": [1, 2, 2], "in_channels": 16, "hidden_size": 32,
             "num_attention_heads": 2, "text_dim": 24, "mlp_width_ratio": 2.0, "num_layers": 2,
             "rope_dim_list": [4, 6, 6], "theta": 256}

# ERNIE-Image: single stream over [image ; text], shared adaLN modulation passed to every block.
_ERNIE = {"image_model": "ernie", "hidden_size": 32, "num_attention_heads": 2, "num_layers": 2,
          "ffn_hidden_size": 64, "in_channels": 128, "out_channels": 128, "patch_size": 1, "text_in_dim": 24,
          "rope_axes_dim": (4, 6, 6)}

# PixelDiT: pixel space, MMDiT patch blocks on 4x4 patches, then pixel blocks (per-pixel adaLN, attention
# over the patches through a compressed token).
_PIXELDIT = {"image_model": "pixeldit_t2i", "in_channels": 3, "num_groups": 2, "hidden_size": 32,
             "pixel_hidden_size": 8, "pixel_attn_hidden_size": 16, "pixel_num_groups": 2, "patch_depth": 2,
             "pixel_depth": 2, "patch_size": 4, "txt_embed_dim": 24, "txt_max_length": 8}

# PiD: PixelDiT with a low-quality latent branch gated into every second patch block (here block 0).
_PID = {**_PIXELDIT, "image_model": "pid", "lq_latent_channels": 16, "lq_hidden_dim": 8, "lq_num_res_blocks": 1,
        "lq_interval": 2, "sr_scale": 4, "latent_spatial_down_factor": 8, "rope_ref_h": 16, "rope_ref_w": 16}


def _pid_conds(generator: torch.Generator) -> dict:
    return {"attention_mask": _padded_mask(), "lq_latent": _randn(generator, 1, 16, 2, 2),
            "degrade_sigma": torch.tensor([0.3])}


ENTRIES = [
    TinyDit("Cosmos-Predict2", "anima", "Anima", _ANIMA, (1, 16, 1, 8, 8), (6, 1024), cond_extras=_anima_conds,
            since=SINCE),
    TinyDit(_FLUX_FAMILY, "longcat-image", "LongCatImage", _LONGCAT, (1, 16, 8, 8), (6, 24),
            host_fields={FLUX_PARAMS: {"txt_ids_dims": [1, 2]}}, since=SINCE),
    # Z-Image's context refiner has no timestep modulation: the same input and output every step.
    TinyDit("Lumina2 / Z-Image", "z-image-pixel", "ZImagePixelSpace", _ZIMAGE_PIXEL, (1, 3, 16, 16), (6, 24),
            static_blocks=("context_refiner",), since=SINCE),
    TinyDit("Lens", "lens", "Lens", _LENS, (1, 128, 4, 4), (6, 24),
            cond_extras=lambda g: {"attention_mask": _padded_mask()}, since=SINCE),
    TinyDit("Ideogram 4", "ideogram4", "Ideogram4", _IDEOGRAM4, (1, 128, 4, 4), (6, 24),
            cond_extras=lambda g: {"attention_mask": _padded_mask()}, make_model=_overriding(**_IDEOGRAM4),
            since=SINCE),
    TinyDit("Krea 2", "krea2", "Krea2", _KREA2, (1, 16, 1, 8, 8), (6, 32), cond_extras=_krea2_conds, since=SINCE),
    TinyDit("Mage-Flow", "mage-flow", "MageFlow", _MAGE_FLOW, (1, 128, 4, 4), (6, 24),
            cond_extras=lambda g: {"attention_mask": _padded_mask()}, since=SINCE),
    TinyDit("Boogu-Image", "boogu", "Boogu", _BOOGU, (1, 16, 8, 8), (6, 24), cond_extras=_boogu_conds,
            static_blocks=("context_refiner",), since=SINCE),
    TinyDit("JoyImage", "joyimage", "JoyImage", _JOYIMAGE, (1, 16, 1, 8, 8), (6, 24),
            cond_extras=lambda g: {"reference_latents": [_randn(g, 1, 16, 1, 8, 8)]},
            make_model=_overriding(**_JOYIMAGE), since=SINCE),
    TinyDit("ERNIE-Image", "ernie-image", "ErnieImage", _ERNIE, (1, 128, 4, 4), (6, 24), since=SINCE),
    TinyDit("PixelDiT / PiD", "pixeldit-t2i", "PixelDiTT2I", _PIXELDIT, (1, 3, 16, 16), (6, 24),
            cond_extras=lambda g: {"attention_mask": _padded_mask()}, since=SINCE),
    TinyDit("PixelDiT / PiD", "pid", "PiD", _PID, (1, 3, 16, 16), (6, 24), cond_extras=_pid_conds, since=SINCE),
]
