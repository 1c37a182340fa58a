"""Video, audio and 3-D families: Cosmos, Cosmos-Predict2, Stable Audio, Hunyuan3D 2.0/2.1, ACE-Step."""

from __future__ import annotations

import torch

from .base import TinyDit

# Cosmos 1 as model_detection configures it (blocks in an nn.ModuleDict, THWBD token layout).
_COSMOS = {"image_model": "cosmos", "max_img_h": 16, "max_img_w": 16, "max_frames": 4, "out_channels": 16,
           "patch_spatial": 2, "patch_temporal": 1, "model_channels": 32, "block_config": "FA-CA-MLP",
           "num_blocks": 2, "num_heads": 2, "mlp_ratio": 2.0, "crossattn_emb_channels": 24,
           "concat_padding_mask": True, "pos_emb_cls": "rope3d", "pos_emb_learnable": False,
           "pos_emb_interpolation": "crop", "block_x_format": "THWBD", "affline_emb_norm": True,
           "use_adaln_lora": True, "adaln_lora_dim": 8, "extra_per_block_abs_pos_emb": True,
           "extra_per_block_abs_pos_emb_type": "learnable"}

_PREDICT2 = {"image_model": "cosmos_predict2", "max_img_h": 16, "max_img_w": 16, "max_frames": 4,
             "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 32, "num_blocks": 2,
             "num_heads": 2, "mlp_ratio": 2.0, "crossattn_emb_channels": 24, "concat_padding_mask": True,
             "pos_emb_cls": "rope3d", "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1,
             "max_fps": 30, "use_adaln_lora": True, "adaln_lora_dim": 8}

# seconds_start/seconds_total embedders are fixed at 768 wide, so are the text tokens and global cond.
# Cross-attention keys come from the 768-wide prompt tokens in heads of embed_dim / num_heads (64 here, as in
# the real model): newer hosts run them as grouped heads, so the query heads (768 / 64) must be a multiple.
_STABLE_AUDIO = {"audio_model": "dit1.0", "io_channels": 64, "embed_dim": 768, "depth": 2, "num_heads": 12,
                 "cond_token_dim": 768, "global_cond_dim": 1536, "project_cond_tokens": False,
                 "transformer_type": "continuous_transformer"}

_HUNYUAN3D = {"image_model": "hunyuan3d2", "in_channels": 64, "context_in_dim": 24, "hidden_size": 32,
              "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "qkv_bias": True,
              "guidance_embed": True}

# depth 3: block 2 takes block 0's output as a skip input, and is a MoE block.
_HUNYUAN3D_21 = {"image_model": "hunyuan3d2_1", "in_channels": 64, "context_dim": 24, "hidden_size": 32,
                 "mlp_ratio": 2.0, "num_heads": 2, "depth": 3, "qkv_bias": False, "num_moe_layers": 1,
                 "num_experts": 2, "moe_top_k": 1, "guidance_cond_proj_dim": None}

# The lyric encoder's width (1024) and the speaker embedding (512) are fixed by the model.
_ACE = {"audio_model": "ace", "in_channels": 8, "out_channels": 8, "num_layers": 2, "num_attention_heads": 2,
        "attention_head_dim": 16, "mlp_ratio": 2.0, "max_position": 64, "text_embedding_dim": 24,
        "ssl_latent_dims": [16, 16], "lyric_encoder_vocab_size": 32, "lyric_hidden_size": 1024,
        "patch_size": [16, 1], "max_height": 16, "max_width": 64}


def _stable_audio_model(model_config):
    import comfy.ldm.audio.embedders
    import comfy.model_base

    from .base_init import fill_rotary_frequencies_, seeded_init_

    # get_model loads these embedders from the checkpoint (ComfyUI's ops leave them uninitialized).
    weights = []
    for seed in (1, 2):
        embedder = comfy.ldm.audio.embedders.NumberConditioner(768, min_val=0, max_val=512)
        seeded_init_(embedder, seed)
        weights.append(embedder.state_dict())
    model = comfy.model_base.StableAudio1(model_config, seconds_start_embedder_weights=weights[0],
                                          seconds_total_embedder_weights=weights[1])
    fill_rotary_frequencies_(model.diffusion_model)
    return model


def _lyrics(generator: torch.Generator) -> dict:
    return {"conditioning_lyrics": torch.randint(0, 32, (1, 5), generator=generator)}


ENTRIES = [
    # One latent frame with CFG: T is dim 0 of Cosmos 1 block tokens, so only caching along the
    # batch dim (3) can keep cond and uncond apart.
    TinyDit("Cosmos", "cosmos-t2v", "CosmosT2V", {**_COSMOS, "in_channels": 16}, (1, 16, 1, 8, 8), (6, 24)),
    TinyDit("Cosmos", "cosmos-i2v", "CosmosI2V", {**_COSMOS, "in_channels": 17}, (1, 16, 2, 8, 8), (6, 24)),
    TinyDit("Cosmos-Predict2", "cosmos-p2-t2i", "CosmosT2IPredict2", {**_PREDICT2, "in_channels": 16},
            (1, 16, 1, 8, 8), (6, 24)),
    TinyDit("Cosmos-Predict2", "cosmos-p2-i2v", "CosmosI2VPredict2",
            {**_PREDICT2, "in_channels": 17, "extra_per_block_abs_pos_emb": True}, (1, 16, 2, 8, 8), (6, 24)),
    TinyDit("Stable Audio", "stable-audio", "StableAudio", _STABLE_AUDIO, (1, 64, 8), (4, 768),
            cond_extras=lambda g: {"seconds_start": 0, "seconds_total": 1}, make_model=_stable_audio_model),
    TinyDit("Hunyuan3D 2.0", "hunyuan3d-2", "Hunyuan3Dv2", _HUNYUAN3D, (1, 64, 8), (6, 24)),
    # Needs batched CFG (cfg > 1): it swaps the halves of the context batch.
    TinyDit("Hunyuan3D 2.1", "hunyuan3d-21", "Hunyuan3Dv2_1", _HUNYUAN3D_21, (1, 64, 8), (6, 24)),
    TinyDit("ACE-Step", "ace-step", "ACEStep", _ACE, (1, 8, 16, 4), (6, 24), cond_extras=_lyrics),
]
