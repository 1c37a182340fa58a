"""Video families new in ComfyUI 0.33: LTX-2 (audio-video), CogVideoX, Kandinsky 5, MiniMax H3.

* LTX-2 (``LTXAVModel``, a subclass of LTXV's ``LTXVModel``): its own family entry, so the map names
  it rather than LTXV. Each ``BasicAVTransformerBlock`` takes the ``(video, audio)`` token streams as
  ONE tuple argument ``x`` and returns them updated (in place) as a tuple.
* CogVideoX (T2V, I2V, Inpaint configs): ``blocks`` of ``CogVideoXBlock`` returning
  ``(hidden_states, encoder_hidden_states)``.
* Kandinsky 5 (video, and Kandinsky5Image on the same diffusion model class): the text encoder
  blocks (timestep-modulated, so they change every step) then the visual decoder blocks.
* MiniMax H3: one packed ``[text | audio | video]`` token sequence through ``blocks`` of
  ``DiTBlock``; the model runs batch 1 only, so its stream is 2-D (tokens, hidden): cond and uncond
  always come as separate calls (their per-cond packed layouts never concatenate).

Audio-video latents: a real run hands the sampler a NestedTensor (video, audio), which ComfyUI packs
into one flat ``[batch, 1, n]`` latent and describes by a ``latent_shapes`` model cond. The entries
give the sampler that packed latent themselves, with ``latent_shapes`` in the conditioning, so the
model sees exactly what it sees in a real run while the test helpers get a plain tensor back. (The
sampler's own ``latent_shapes`` is then one shape, so MiniMax H3 carries its audio unscaled: an
audio scale outside the blocks.)

Refused (tests/test_refused_video.py): SeedVR2, a one-step model (nothing to reuse across steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import TinyDit

SINCE = "0.33.0"

LTX2 = "LTX-2 (audio-video)"
COGVIDEOX = "CogVideoX"
KANDINSKY5 = "Kandinsky 5"
MINIMAX_H3 = "MiniMax H3 (audio-video)"


@dataclass(frozen=True)
class _PackedAV(TinyDit):
    """An audio-video entry: ``latent_shape`` is the packed (video, audio) pair's, ``[1, 1, n]``; the
    conditioning's ``latent_shapes`` says the parts."""

    def latent(self, batch: int = 1) -> dict[str, torch.Tensor]:
        # Not all zeros: ComfyUI widens an empty latent to the latent format's channels.
        generator = torch.Generator().manual_seed(0)
        return {"samples": 0.5 * torch.randn((batch, *self.latent_shape[1:]), generator=generator)}


def _packed(*shapes: tuple[int, ...]) -> tuple[int, int, int]:
    return (1, 1, sum(math.prod(shape[1:]) for shape in shapes))


def _latent_shapes(*shapes: tuple[int, ...]) -> list[torch.Size]:
    return [torch.Size(shape) for shape in shapes]


# LTX-2: video 2 x 16 = 32 wide (cross_attention_dim = its inner dim, as the caption projection maps
# to it), audio 2 x 8 = 16 wide. The context is the text encoder's already processed embeddings
# (video and audio halves, 2 x caption_channels), which preprocess_text_embeds passes on as they are;
# the text connectors it would otherwise run (3840 wide by default) are made small all the same.
_LTX2 = {"image_model": "ltxav", "in_channels": 128, "audio_in_channels": 128, "num_attention_heads": 2,
         "attention_head_dim": 16, "cross_attention_dim": 32, "audio_num_attention_heads": 2,
         "audio_attention_head_dim": 8, "audio_cross_attention_dim": 16, "caption_channels": 24, "num_layers": 2,
         "connector_attention_head_dim": 8, "connector_num_attention_heads": 3, "connector_num_layers": 1}
_LTX2_VIDEO = (1, 128, 2, 4, 4)
_LTX2_AUDIO = (1, 8, 5, 16)  # 8 audio channels x 16 frequency bins, 5 latent frames


def _ltx2(generator: torch.Generator) -> dict:
    return {"attention_mask": _padded_mask(6), "latent_shapes": _latent_shapes(_LTX2_VIDEO, _LTX2_AUDIO),
            "frame_rate": 24}


def _padded_mask(tokens: int) -> torch.Tensor:
    mask = torch.ones((1, tokens), dtype=torch.long)
    mask[:, -1] = 0
    return mask


# CogVideoX: head dim 16 (the rope splits it 4 / 6 / 6), 32 wide, time embedding 32.
_COG = {"image_model": "cogvideox", "num_attention_heads": 2, "attention_head_dim": 16, "time_embed_dim": 32,
        "text_embed_dim": 24, "num_layers": 2, "in_channels": 16, "out_channels": 16, "patch_size": 2,
        "sample_width": 16, "sample_height": 16, "sample_frames": 9}
_COG_VIDEO = (1, 16, 3, 8, 8)
# CogVideoX-2b: 3-D sincos positions (a third of the width for time, a third each for height and
# width: 3 heads of 16), no rope.
_COG_T2V = {**_COG, "num_attention_heads": 3, "use_rotary_positional_embeddings": False,
            "use_learned_positional_embeddings": False}
# CogVideoX 1.5 I2V: patch 2 x 2 x 2 (a linear patch embedding), rope, the OFS embedding.
_COG_I2V = {**_COG, "in_channels": 32, "patch_size_t": 2, "ofs_embed_dim": 32,
            "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": False}
# CogVideoX-Fun inpainting: 16 latent + 32 reference/mask channels, rope.
_COG_INPAINT = {**_COG, "in_channels": 48, "use_rotary_positional_embeddings": True,
                "use_learned_positional_embeddings": False}


def _cog_reference(generator: torch.Generator) -> dict:
    return {"concat_latent_image": torch.randn(_COG_VIDEO, generator=generator)}


# Kandinsky 5: head dim 16 = sum(axes_dims). The visual embedding takes the 2 x 2 patch of
# latent 16 + concat 17 (zeros and the mask) channels for video, of the 16 latent channels for images.
_KANDINSKY = {"image_model": "kandinsky5", "in_visual_dim": 16, "out_visual_dim": 16, "in_text_dim": 24,
              "in_text_dim2": 12, "time_dim": 32, "model_dim": 32, "ff_dim": 64, "patch_size": (1, 2, 2),
              "num_text_blocks": 2, "num_visual_blocks": 2, "axes_dims": (4, 6, 6)}


def _kandinsky(generator: torch.Generator) -> dict:
    return {"pooled_output": torch.randn((1, 12), generator=generator)}


def _kandinsky_i2v(generator: torch.Generator) -> dict:
    # The start frame, written over the first latent frame before the blocks.
    return {**_kandinsky(generator), "time_dim_replace": torch.randn((1, 16, 1, 8, 8), generator=generator)}


# MiniMax H3: 32 wide, head dim 16 of which the rope turns 12 (3 axes x 2 frequencies x 2).
_MINIMAX = {"image_model": "minimax_h3", "hidden_size": 32, "num_layers": 2, "token_refiner_num_layers": 1,
            "num_attention_heads": 2, "attention_head_dim": 16, "ffn_hidden_size": 64, "text_dim": 24,
            "timestep_input_dim": 32, "time_embed_hidden_size": 32, "time_embed_dim": 32,
            "rope_inv_freq_len": 2}
_MINIMAX_VIDEO = (1, 24, 2, 4, 4)
_MINIMAX_AUDIO = (1, 32, 2, 4)  # 32 channels x 2 stereo channels x 4 latent frames


def _minimax_model(model_config):
    model = model_config.get_model({}, "")
    inv_freq = model.diffusion_model.rope.inv_freq  # a checkpoint buffer, left empty at construction
    inv_freq.copy_(1.0 / (10000.0 ** (torch.arange(inv_freq.numel(), dtype=torch.float32) / inv_freq.numel())))
    return model


def _minimax(generator: torch.Generator) -> dict:
    return {"latent_shapes": _latent_shapes(_MINIMAX_VIDEO, _MINIMAX_AUDIO)}


ENTRIES = [
    _PackedAV(LTX2, "ltx2-av", "LTXAV", _LTX2, _packed(_LTX2_VIDEO, _LTX2_AUDIO), (6, 48), cond_extras=_ltx2,
              since=SINCE),
    # Video only: the audio stream is empty (0 tokens), the blocks update the video alone.
    TinyDit(LTX2, "ltx2-av-video-only", "LTXAV", _LTX2, _LTX2_VIDEO, (6, 48),
            cond_extras=lambda g: {"attention_mask": _padded_mask(6)}, since=SINCE),
    TinyDit(COGVIDEOX, "cogvideox-t2v", "CogVideoX_T2V", _COG_T2V, _COG_VIDEO, (6, 24), since=SINCE),
    TinyDit(COGVIDEOX, "cogvideox15-i2v", "CogVideoX_I2V", _COG_I2V, _COG_VIDEO, (6, 24),
            cond_extras=_cog_reference, since=SINCE),
    TinyDit(COGVIDEOX, "cogvideox-inpaint", "CogVideoX_Inpaint", _COG_INPAINT, _COG_VIDEO, (6, 24),
            cond_extras=_cog_reference, since=SINCE),
    TinyDit(KANDINSKY5, "kandinsky5-t2v", "Kandinsky5", {**_KANDINSKY, "visual_embed_dim": 4 * 33},
            (1, 16, 3, 8, 8), (6, 24), cond_extras=_kandinsky, since=SINCE),
    TinyDit(KANDINSKY5, "kandinsky5-i2v", "Kandinsky5", {**_KANDINSKY, "visual_embed_dim": 4 * 33},
            (1, 16, 3, 8, 8), (6, 24), cond_extras=_kandinsky_i2v, since=SINCE),
    TinyDit(KANDINSKY5, "kandinsky5-image", "Kandinsky5Image", {**_KANDINSKY, "visual_embed_dim": 4 * 16},
            (1, 16, 8, 8), (6, 24), cond_extras=_kandinsky, since=SINCE),
    _PackedAV(MINIMAX_H3, "minimax-h3", "MiniMaxH3", _MINIMAX, _packed(_MINIMAX_VIDEO, _MINIMAX_AUDIO), (6, 24),
              cond_extras=_minimax, make_model=_minimax_model, since=SINCE),
]
