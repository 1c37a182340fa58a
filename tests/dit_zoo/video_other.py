"""Other video families: HunyuanVideo, HunyuanVideo 1.5, LTXV, Mochi."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .base import TinyDit

HUNYUAN = "HunyuanVideo / 1.5"

# Every HunyuanVideoParams field is required; head dim 16 = sum(axes_dim).
_HUNYUAN = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 12,
            "context_in_dim": 24, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
            "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 256, "patch_size": [1, 2, 2],
            "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
            "use_cond_type_embedding": False, "vision_in_dim": None}

# HunyuanVideo 1.5: 32-channel latent, patch 1, input = noise 32 + image 32 + mask 1, no pooled vector
# or guidance embedding; ByT5 glyph tokens and SigLIP vision tokens join the text stream. Its
# checkpoint has only double blocks, so the single-block list stays empty here too.
_HUNYUAN15 = {**_HUNYUAN, "in_channels": 65, "out_channels": 32, "vec_in_dim": None, "patch_size": [1, 1, 1],
              "guidance_embed": False, "byt5": True, "use_cond_type_embedding": True, "vision_in_dim": 16,
              "depth_single_blocks": 0}
_HUNYUAN15_LATENT = (1, 32, 3, 6, 6)
# A field newer hosts require, as model_detection sets it for these checkpoints.
_HUNYUAN_FIELDS = {"comfy.ldm.hunyuan_video.model.HunyuanVideoParams": {"meanflow_sum": False}}

# LTXV: the caption projection maps to the inner dim, so cross_attention_dim must equal it (2 x 16).
_LTXV = {"image_model": "ltxv", "in_channels": 128, "num_attention_heads": 2, "attention_head_dim": 16,
         "cross_attention_dim": 32, "caption_channels": 24, "num_layers": 2}

# Mochi's block asserts hidden_size_x * mlp_ratio_x == 1536 * 8, hence the odd ratio.
_MOCHI = {"image_model": "mochi_preview", "depth": 2, "patch_size": 2, "num_heads": 2, "hidden_size_x": 32,
          "hidden_size_y": 32, "mlp_ratio_x": 1536 * 8 / 32, "mlp_ratio_y": 4.0, "learn_sigma": False,
          "in_channels": 12, "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0,
          "patch_embed_bias": True, "posenc_preserve_area": True, "timestep_mlp_bias": True,
          "attend_to_padding": False, "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": 24,
          "t5_token_length": 6, "rope_theta": 10000.0}


def _padded_mask(tokens: int) -> torch.Tensor:
    # T5 masks: the last token is padding, so the masked attention paths run.
    mask = torch.ones((1, tokens), dtype=torch.long)
    mask[:, -1] = 0
    return mask


def _hunyuan_i2v(generator: torch.Generator) -> dict:
    return {"pooled_output": torch.randn((1, 12), generator=generator),
            "concat_latent_image": torch.randn((1, 16, 3, 8, 8), generator=generator)}


@dataclass(frozen=True)
class _GuidedPositive(TinyDit):
    """HunyuanImageToVideo's "v2 (replace)": guiding_frame_index on the positive only, so the
    first frame's tokens get their own modulation (the blocks' modulation_dims path). As in the
    node, cond and uncond then run as separate batch-1 calls; batched, 0.3.75's apply_mod fails
    (m_mult[:, d[2]] drops the token axis)."""

    def conds(self) -> tuple[list, list]:
        positive, negative = super().conds()
        positive[0][1]["guiding_frame_index"] = 0
        return positive, negative


def _hunyuan15(generator: torch.Generator) -> dict:
    return {"pooled_output": None,
            "conditioning_byt5small": torch.randn((1, 3, 1472), generator=generator),
            "clip_vision_output": SimpleNamespace(last_hidden_state=torch.randn((1, 4, 16), generator=generator)),
            "concat_latent_image": torch.randn(_HUNYUAN15_LATENT, generator=generator)}


ENTRIES = [
    TinyDit(HUNYUAN, "hunyuan-video", "HunyuanVideo", _HUNYUAN, (1, 16, 3, 8, 8), (6, 24),
            cond_extras=lambda g: {"pooled_output": torch.randn((1, 12), generator=g)}, host_fields=_HUNYUAN_FIELDS),
    _GuidedPositive(HUNYUAN, "hunyuan-video-i2v", "HunyuanVideoI2V", {**_HUNYUAN, "in_channels": 33}, (1, 16, 3, 8, 8),
            (6, 24), cond_extras=_hunyuan_i2v, host_fields=_HUNYUAN_FIELDS),
    TinyDit(HUNYUAN, "hunyuan-video15", "HunyuanVideo15", _HUNYUAN15, _HUNYUAN15_LATENT, (6, 24),
            cond_extras=_hunyuan15, host_fields=_HUNYUAN_FIELDS),
    TinyDit("LTXV", "ltxv", "LTXV", _LTXV, (1, 128, 2, 4, 4), (6, 24),
            cond_extras=lambda g: {"attention_mask": _padded_mask(6)}),
    TinyDit("Mochi", "mochi", "GenmoMochi", _MOCHI, (1, 12, 3, 8, 8), (6, 24),
            cond_extras=lambda g: {"attention_mask": _padded_mask(6)}),
]
