"""Seeded weights for the zoo: the pack's own initializer, so all tests share one."""

import torch
from comfy_bootstrap import load_pack

seeded_init_ = load_pack().demo_models.builtin_models.seeded_init_


def fill_rotary_frequencies_(module: torch.nn.Module) -> None:
    """Rotary embeddings' ``inv_freq``, a checkpoint buffer (torch.empty until loaded: uninitialized memory,
    NaN in some runs), from the formula it was saved from."""
    for child in module.modules():
        inv_freq = getattr(child, "inv_freq", None)
        if type(child).__name__ == "RotaryEmbedding" and isinstance(inv_freq, torch.Tensor):
            dim = 2 * inv_freq.shape[0]
            inv_freq.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))
