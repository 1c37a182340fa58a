"""MMDiT-style image families: SD3 / SD3.5 and AuraFlow."""

from __future__ import annotations

import torch

from .base import TinyDit

# MMDiT fixes head size 64 and heads = depth: depth 1 is hidden 64, one head; num_blocks sets the
# block count. No num_patches: the pos_embed buffer would be left uninitialized (the seeded init
# sets parameters only), and without it the model uses its fixed sin-cos embedding.
_SD3 = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "num_blocks": 2, "input_size": None,
        "adm_in_channels": 12, "pos_embed_max_size": 4, "pos_embed_scaling_factor": None,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 24, "out_features": 64}},
        "x_block_self_attn_layers": []}


def _pooled(generator: torch.Generator) -> dict:
    return {"pooled_output": torch.randn((1, 12), generator=generator)}


ENTRIES = [
    # The last joint block is pre_only: it returns context None.
    TinyDit("SD3 / SD3.5 (MMDiT)", "sd3", "SD3", _SD3, (1, 16, 8, 8), (6, 24), cond_extras=_pooled),
    # SD3.5 medium: RMS qk norm and a second self-attention on x (dual attention) in block 0.
    TinyDit("SD3 / SD3.5 (MMDiT)", "sd35", "SD3", {**_SD3, "qk_norm": "rms", "x_block_self_attn_layers": [0]},
            (1, 16, 8, 8), (6, 24), cond_extras=_pooled),
    TinyDit("AuraFlow", "auraflow", "AuraFlow",
            {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 32, "n_heads": 2, "global_conddim": 32,
             "cond_seq_dim": 24, "max_seq": 16, "n_double_layers": 2, "n_layers": 4},
            (1, 4, 8, 8), (6, 24)),
]
