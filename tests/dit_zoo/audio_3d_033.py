"""Audio and 3-D families new in ComfyUI 0.33: ACE-Step 1.5, MiniMax Music 3 (also on its windowed
path), Stable Audio 3 (the Stable Audio family's AudioDiffusionTransformer, with the SA3 options),
TRELLIS.2 (its dense structure stage) and TripoSplat.

Two entries cannot be shrunk through the config alone. MiniMax Music 3 fixes every size in code: it
is built the loader's way on the meta device and its modules are replaced by tiny ones of the same
classes. TRELLIS.2's structure model always runs 4096 voxel tokens, and its config fixes 12 heads:
the tiny one gets a single head, so its attention stays affordable on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import TinyDit

_SINCE = "0.33.0"

# ACE-Step 1.5. Detection reads the widths; head_dim (128), the KV heads and the encoder depths are
# constructor defaults, made small here. The silence latent the model pads with is 64 channels, so
# the latent (and the acoustic dims) stay 64; in_channels = noise 64 + source latent 64 + mask 64.
# Even layers use sliding-window self-attention (window 4 of the 8 patch tokens here).
_ACE15 = {"audio_model": "ace1.5", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 1,
          "head_dim": 16, "encoder_hidden_size": 32, "encoder_num_heads": 2, "encoder_intermediate_size": 64,
          "num_dit_layers": 2, "num_lyric_layers": 1, "num_timbre_layers": 1, "num_tokenizer_layers": 1,
          "text_hidden_dim": 24, "fsq_dim": 32, "fsq_levels": [4, 4], "sliding_window": 4}


def _ace15_lyrics(generator: torch.Generator) -> dict:
    # Lyrics arrive as text-encoder hidden states (text_hidden_dim wide), not token ids.
    return {"conditioning_lyrics": torch.randn((1, 5, 24), generator=generator)}


# Stable Audio 3 as model_detection configures it: shared global-cond embedder (adaLN), RMS norms,
# differential attention with RMS qk-norm, memory tokens, exponential timestep features, and the
# inpainting input (mask 1 + latent 256 channels) as local additive conditioning in every block. The
# seconds_total embedder and the text tokens are 768 wide in the model's code; the latent is 256 channels.
# One head of 64: the rotary embedding turns max(head / 2, 32) dims.
_STABLE_AUDIO3 = {"audio_model": "dit1.0", "global_cond_dim": 768, "project_cond_tokens": True, "embed_dim": 64,
                  "num_memory_tokens": 2, "attn_kwargs": {"qk_norm": "rms", "differential": True},
                  "norm_type": "rms_norm", "num_heads": 1, "timestep_features_type": "expo", "io_channels": 256,
                  "input_concat_dim": 0, "local_add_cond_dim": 257, "global_cond_shared_embed": True,
                  "global_cond_type": "adaLN", "depth": 2}


def _stable_audio3_model(model_config):
    import comfy.ldm.audio.embedders
    import comfy.model_base

    from .base_init import fill_rotary_frequencies_, seeded_init_

    # get_model loads the seconds_total embedder and the prompt padding embedding from the checkpoint.
    embedder = comfy.ldm.audio.embedders.NumberConditioner(768, min_val=0, max_val=384, fourier_features_type="expo")
    seeded_init_(embedder, 1)
    padding = torch.randn((768,), generator=torch.Generator().manual_seed(2))
    model = comfy.model_base.StableAudio3(model_config, seconds_total_embedder_weights=embedder.state_dict(),
                                          padding_embedding=padding)
    fill_rotary_frequencies_(model.diffusion_model)
    return model


# MiniMax Music 3: every size is fixed in comfy/ldm/minimax_music/dit.py (2048 wide, 36 blocks, an
# 8 x 4096 conditioning stack); checkpoint detection gives no config at all. The tiny model keeps the
# classes, the conditioning stack and the 128-channel latent, and narrows the rest.
_MINIMAX_WIDTH = 32
_MINIMAX_COND = 16  # channels of the aligned condition (2048 in the model)


def _minimax_music3_model(model_config):
    import comfy.ldm.minimax_music.dit as dit
    import comfy.model_base
    import comfy.ops
    from torch import nn

    from .base_init import fill_rotary_frequencies_

    ops = comfy.ops.disable_weight_init
    model = comfy.model_base.MiniMaxMusic3(model_config, device=torch.device("meta"))
    dm = model.diffusion_model
    width, cond, latent = _MINIMAX_WIDTH, _MINIMAX_COND, 128
    full = 2 * latent + cond  # noise, zeros, condition
    dm.latent_conditioners = nn.Sequential(ops.Conv1d(4096, cond, kernel_size=3, padding=1))
    dm.cond_layer_logits = nn.Parameter(torch.empty(8))
    dm.cond_layer_scale = nn.Parameter(torch.empty(1))
    diffusion = dm.diffusion_transformer
    diffusion.timestep_features = dit.FourierFeatures(1, 256, None, None)
    diffusion.to_timestep_embed = nn.Sequential(ops.Linear(256, width), nn.SiLU(), ops.Linear(width, width))
    diffusion.preprocess_conv = ops.Conv1d(full, full, 1, bias=False)
    diffusion.postprocess_conv = ops.Conv1d(latent, latent, 1, bias=False)
    transformer = diffusion.transformer
    transformer.project_in = ops.Linear(full, width, bias=False)
    transformer.project_out = ops.Linear(width, latent, bias=False)
    # Head size 16, of which 8 dims rotate (the model: 64 and 32).
    transformer.rotary_pos_emb = dit.RotaryEmbedding(8, None, None)
    transformer.layers = nn.ModuleList([dit.TransformerBlock(width, 16, 2 * width, None, None, ops)
                                        for _ in range(2)])
    # Checkpoint buffers (torch.empty until loaded): the layer-norm betas and the rotary frequencies.
    for module in dm.modules():
        if isinstance(module, dit.LayerNorm):
            module.beta.zero_()
    fill_rotary_frequencies_(transformer)
    left = [name for name, tensor in [*dm.named_parameters(), *dm.named_buffers()] if tensor.is_meta]
    assert not left, f"modules left on the meta device: {left}"
    dm.requires_grad_(False)
    return model


def _minimax_conds(generator: torch.Generator) -> dict:
    # MiniMaxMusic3 conditioning node: a scale per batch item, (B, 1, 1).
    return {"conditioning_scale": torch.ones((1, 1, 1))}


# TRELLIS.2: one diffusion model holds the dense structure model (a 16^3 voxel grid: 4096 tokens,
# fixed in the model's code) and the sparse shape / texture models (SparseTensor tokens). The
# structure stage samples the 32-channel 16^3 latent of EmptyTrellis2LatentStructure; "embeds" is
# required on every stage.
_TRELLIS2 = {"image_model": "trellis2", "resolution": 32, "init_txt_model": False, "txt_only": False,
             "model_channels": 32, "cond_channels": 24, "num_blocks": 2, "mlp_ratio": 2.0}


def _trellis2_model(model_config):
    import comfy.model_base

    # The config fixes 12 heads (unet_extra_config). Over 4096 tokens each head costs a 4096 x 4096
    # attention (seconds on CPU), so the tiny model has one head of 32.
    model_config.unet_config["num_heads"] = 1
    return comfy.model_base.Trellis2(model_config)


def _trellis2_conds(generator: torch.Generator) -> dict:
    return {"embeds": torch.randn((1, 6, 24), generator=generator)}


# TripoSplat: 16 latent tokens (8192 in the model) of 16 channels, a 5-channel camera token, head size 16.
_TRIPOSPLAT = {"image_model": "triposplat", "q_token_length": 16, "model_channels": 32, "cond_channels": 24,
               "num_blocks": 2, "num_refiner_blocks": 2, "num_head_channels": 16, "cond2_channels": 8,
               "mlp_ratio": 2}
_TRIPOSPLAT_SHAPES = [torch.Size([1, 16, 16]), torch.Size([1, 1, 5])]


def _triposplat_conds(generator: torch.Generator) -> dict:
    # The Flux2 VAE reference latent (128 channels in the model), added to the image tokens, and the
    # nested latent's shapes, as the sampler passes them for a NestedTensor latent.
    return {"reference_latents": [torch.randn((1, 8, 2, 2), generator=generator)],
            "latent_shapes": _TRIPOSPLAT_SHAPES}


@dataclass(frozen=True)
class _PackedNestedLatent(TinyDit):
    """TripoSplat samples a NestedTensor (latent tokens + camera token), which the sampler packs into
    one flat (B, 1, N) tensor and unpacks for the model by ``latent_shapes``. The tests compare
    plain tensors, so the latent here is that packed tensor and ``latent_shapes`` rides in the
    conditioning. It is not all zeros, or KSampler's empty-latent fix (skipped only for a
    NestedTensor) would widen it to 16 channels; at denoise 1 the first sigma of this flow model is 1,
    so the latent's values never reach the output."""

    def latent(self, batch: int = 1) -> dict[str, torch.Tensor]:
        size = sum(math.prod(shape[1:]) for shape in _TRIPOSPLAT_SHAPES)
        return {"samples": torch.full((batch, 1, size), 0.5)}


ENTRIES = [
    TinyDit("ACE-Step 1.5", "ace-step15", "ACEStep15", _ACE15, (1, 64, 16), (6, 24), cond_extras=_ace15_lyrics,
            since=_SINCE),
    TinyDit("MiniMax Music 3", "minimax-music3", "MiniMaxMusic3", {"audio_model": "minimax_music3"},
            (1, 128, 8), (2, 8 * 4096), cond_extras=_minimax_conds, make_model=_minimax_music3_model, since=_SINCE),
    # Over 689 latent frames the model runs its transformer on overlapping windows (here 2): every
    # block runs twice per model call, each occurrence with its own cache.
    TinyDit("MiniMax Music 3", "minimax-music3-windows", "MiniMaxMusic3", {"audio_model": "minimax_music3"},
            (1, 128, 700), (2, 8 * 4096), cond_extras=_minimax_conds, make_model=_minimax_music3_model,
            since=_SINCE),
    TinyDit("Stable Audio", "stable-audio3", "StableAudio3", _STABLE_AUDIO3, (1, 256, 8), (4, 768),
            cond_extras=lambda g: {"seconds_total": 1}, make_model=_stable_audio3_model, since=_SINCE),
    TinyDit("TRELLIS.2 (structure stage)", "trellis2-structure", "Trellis2", _TRELLIS2, (1, 32, 16, 16, 16), (6, 24),
            cond_extras=_trellis2_conds, make_model=_trellis2_model, since=_SINCE),
    # The context refiner sees only the image tokens, no timestep: the same input at every step.
    _PackedNestedLatent("TripoSplat", "triposplat", "TripoSplat", _TRIPOSPLAT, (1, 1, 261), (6, 24),
                        cond_extras=_triposplat_conds, static_blocks=("context_refiner",), since=_SINCE),
]
