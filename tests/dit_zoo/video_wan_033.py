"""Wan variants new in ComfyUI 0.33: FlowRVS, SCAIL, SCAIL-2 and WanDancer.

All four keep WanModel's ``blocks`` list of WanAttentionBlocks, called as
``block(x, e=..., freqs=..., context=..., context_img_len=..., transformer_options=...)``, so they
match the "Wan 2.1 / 2.2" family through the MRO. Their extra streams are concatenated to ``x``
before the blocks (SCAIL's pose tokens, its reference frame) or injected after a block, outside
it (WanDancer's music injector, like S2V's audio injector).

Refused (tests/test_refused_wan.py): WAN21_CausalAR (its blocks write a KV cache that later frame
blocks read) and WAN_Animate2 (its blocks run through forward_gen/forward_pose, never forward).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .base import TinyDit
from .video_wan import _VIDEO, _WAN, WAN

SINCE = "0.33.0"


def _clip(generator: torch.Generator, tokens: int = 4) -> SimpleNamespace:
    # A CLIP vision output: only penultimate_hidden_states is read (4 tokens instead of 257).
    return SimpleNamespace(penultimate_hidden_states=torch.randn((1, tokens, 1280), generator=generator))


def _scail(generator: torch.Generator) -> dict:
    # One reference frame (stacked before the video on the time axis, 16 latent + 4 ones = in_dim 20)
    # and a pose video at full latent resolution (its tokens follow the video's in the sequence).
    return {"clip_vision_output": _clip(generator),
            "reference_latents": [torch.randn((1, 16, 1, *_VIDEO[3:]), generator=generator)],
            "pose_video_latent": torch.randn(_VIDEO, generator=generator)}


def _scail2(generator: torch.Generator) -> dict:
    # SCAIL-2 adds 28-channel identity masks as [batch, frames, 28, h, w]: one per pose frame, and one
    # per reference frame followed by one per video frame. ref_mask_flag False: replacement mode.
    frames = _VIDEO[2]
    return {**_scail(generator),
            "driving_mask_28ch": (torch.rand((1, frames, 28, *_VIDEO[3:]), generator=generator) > 0.5).float(),
            "ref_mask_28ch": (torch.rand((1, 1 + frames, 28, *_VIDEO[3:]), generator=generator) > 0.5).float(),
            "ref_mask_flag": False}


def _dancer(fps: float):
    def extras(generator: torch.Generator) -> dict:
        # Music features [batch, audio frames, 35] (the music encoder interpolates them to 8 per
        # latent frame), a start image and the CLIP vision outputs of the start and reference images.
        return {"clip_vision_output": _clip(generator), "clip_vision_output_ref": _clip(generator, 3),
                "concat_latent_image": torch.randn(_VIDEO, generator=generator),
                "audio_embed": torch.randn((1, 4 * _VIDEO[2], 35), generator=generator), "fps": fps,
                "audio_inject_scale": 1.0}
    return extras


# The music encoder at 32 wide instead of 256; music injected after blocks 0 and 1.
_DANCER = {**_WAN, "image_model": "wan2.1", "model_type": "wandancer", "in_dim": 36, "audio_inject_layers": [0, 1],
           "music_dim": 32, "music_latent_dim": 32, "music_heads": 2}

ENTRIES = [
    # Image-to-image flow (video -> mask): the model's output is the denoised latent itself.
    TinyDit(WAN, "wan21-flowrvs", "WAN21_FlowRVS", {**_WAN, "image_model": "wan2.1", "model_type": "flow_rvs"},
            _VIDEO, (5, 24), since=SINCE),
    TinyDit(WAN, "wan21-scail", "WAN21_SCAIL", {**_WAN, "image_model": "wan2.1", "model_type": "scail", "in_dim": 20},
            _VIDEO, (5, 24), cond_extras=_scail, since=SINCE),
    TinyDit(WAN, "wan21-scail2", "WAN21_SCAIL2",
            {**_WAN, "image_model": "wan2.1", "model_type": "scail2", "in_dim": 20},
            _VIDEO, (5, 24), cond_extras=_scail2, since=SINCE),
    # 30 fps: patch_embedding and head; other rates: patch_embedding_global and head_global.
    TinyDit(WAN, "wan22-wandancer", "WAN22_WanDancer", _DANCER, _VIDEO, (5, 24), cond_extras=_dancer(30.0),
            since=SINCE),
    TinyDit(WAN, "wan22-wandancer-15fps", "WAN22_WanDancer", _DANCER, _VIDEO, (5, 24), cond_extras=_dancer(15.0),
            since=SINCE),
]
