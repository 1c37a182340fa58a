"""Wan families: Wan 2.1 T2V/I2V, Wan 2.2 TI2V 5B, VACE and the WanModel subclasses."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .base import TinyDit

WAN = "Wan 2.1 / 2.2"
VACE = "Wan 2.1 / 2.2 VACE"

# Head dim 16: the rope axes split it as [8, 4, 4].
_WAN = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 24, "freq_dim": 32,
        "patch_size": (1, 2, 2), "in_dim": 16, "out_dim": 16, "window_size": (-1, -1), "qk_norm": True,
        "cross_attn_norm": True, "eps": 1e-6}
_VIDEO = (1, 16, 3, 8, 8)


def _i2v(generator: torch.Generator) -> dict:
    # A CLIP vision output (only penultimate_hidden_states is read; 4 tokens instead of 257)
    # and the encoded start image that concat_cond stacks with the mask.
    clip = SimpleNamespace(penultimate_hidden_states=torch.randn((1, 4, 1280), generator=generator))
    return {"clip_vision_output": clip, "concat_latent_image": torch.randn(_VIDEO, generator=generator)}


def _vace(generator: torch.Generator) -> dict:
    # Two control videos: vace_blocks run once per video in every model call.
    frames = [torch.randn((1, 16 * 2, *_VIDEO[2:]), generator=generator) for _ in range(2)]
    return {"vace_frames": frames, "vace_strength": [1.0, 0.5]}


def _camera(generator: torch.Generator) -> dict:
    # Plucker embeddings at pixel resolution (24 channels, 8x the latent), per latent frame.
    return {"camera_conditions": torch.randn((1, 24, _VIDEO[2], 64, 64), generator=generator)}


def _s2v(generator: torch.Generator) -> dict:
    # Audio features: [batch, encoder layers 25, dim 1024, 4 per latent frame].
    return {"audio_embed": torch.randn((1, 25, 1024, 4 * _VIDEO[2]), generator=generator) * 0.1}


def _humo(generator: torch.Generator) -> dict:
    # Whisper features per latent frame: [batch, frames, window 8, layers 5, 1280].
    return {"audio_embed": torch.randn((1, _VIDEO[2], 8, 5, 1280), generator=generator) * 0.1}


def _animate(generator: torch.Generator) -> dict:
    return {**_i2v(generator), "pose_video_latent": torch.randn(_VIDEO, generator=generator)}


ENTRIES = [
    TinyDit(WAN, "wan21-t2v", "WAN21_T2V", {**_WAN, "image_model": "wan2.1", "model_type": "t2v"}, _VIDEO, (5, 24)),
    TinyDit(WAN, "wan21-i2v", "WAN21_I2V", {**_WAN, "image_model": "wan2.1", "model_type": "i2v", "in_dim": 36},
            _VIDEO, (5, 24), cond_extras=_i2v),
    TinyDit(WAN, "wan22-ti2v", "WAN22_T2V",
            {**_WAN, "image_model": "wan2.1", "model_type": "t2v", "in_dim": 48, "out_dim": 48},
            (1, 48, 3, 8, 8), (5, 24)),
    # vace_in_dim: 16 * 2 latent channels + 64 mask channels, as WAN21_Vace.extra_conds makes them.
    TinyDit(VACE, "wan21-vace", "WAN21_Vace",
            {**_WAN, "image_model": "wan2.1", "model_type": "vace", "vace_layers": 2, "vace_in_dim": 96},
            _VIDEO, (5, 24), cond_extras=_vace),
    TinyDit(WAN, "wan22-camera", "WAN22_Camera", {**_WAN, "image_model": "wan2.1", "model_type": "camera_2.2",
                                                "in_dim": 36}, _VIDEO, (5, 24), cond_extras=_camera),
    # Audio injected after blocks 0 and 1 (in place on the block's output).
    TinyDit(WAN, "wan22-s2v", "WAN22_S2V", {**_WAN, "image_model": "wan2.1", "model_type": "s2v",
                                          "audio_inject_layers": [0, 1]}, _VIDEO, (5, 24), cond_extras=_s2v),
    TinyDit(WAN, "wan21-humo", "WAN21_HuMo", {**_WAN, "image_model": "wan2.1", "model_type": "humo"},
            _VIDEO, (5, 24), cond_extras=_humo),
    # No face video: its StyleGAN motion encoder runs on 512px crops, far too slow here.
    TinyDit(WAN, "wan22-animate", "WAN22_Animate", {**_WAN, "image_model": "wan2.1", "model_type": "animate",
                                                  "in_dim": 36}, _VIDEO, (5, 24), cond_extras=_animate),
]
