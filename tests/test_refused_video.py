"""Video models of ComfyUI 0.33 that Block Cache refuses, built tiny as a checkpoint loader builds them.

* SeedVR2 (NaDiT): a one-step video restoration model. Block Cache reuses a block's output of one
  sampling step at later steps; in one step there is no later step to reuse it at.
"""

from __future__ import annotations

import pytest
import torch
from dit_zoo import TinyDit
from helpers import assert_refused, build_or_skip, sample

# 32 wide (2 heads of 16); every block keeps separate video/text weights (mm_layers = num_layers).
_SEEDVR2 = {"image_model": "seedvr2", "vid_dim": 32, "heads": 2, "head_dim": 16, "num_layers": 2, "mm_layers": 2,
            "txt_in_dim": 24, "rope_dim": 8, "norm_eps": 1e-5, "mlp_type": "normal"}
_VIDEO = (1, 16, 1, 8, 8)


def _condition(generator: torch.Generator) -> dict:
    # What SeedVR2Conditioning makes: the low-quality video's latent and a mask channel of ones.
    return {"condition": torch.cat([torch.randn(_VIDEO, generator=generator), torch.ones((1, 1, *_VIDEO[2:]))], 1)}


SEEDVR2 = TinyDit("SeedVR2 (refused)", "seedvr2", "SeedVR2", _SEEDVR2, _VIDEO, (6, 24), cond_extras=_condition,
                  cfg=1.0, since="0.33.0")

REFUSED = {SEEDVR2.id: "comfy.ldm.seedvr.model.NaDiT"}


@pytest.mark.parametrize("entry", [SEEDVR2], ids=lambda e: e.id)
def test_refused_with_its_reason(pack, entry):
    reason = assert_refused(pack, build_or_skip(entry), REFUSED[entry.id])
    assert "one sampling step" in reason


def test_seedvr2_samples_uncached_in_one_step():
    """The refused model still samples as ComfyUI runs it: one step, the fixed positive embedding."""
    model = build_or_skip(SEEDVR2)
    positive, negative = SEEDVR2.conds()
    out = sample(model, positive, negative, SEEDVR2.latent(), steps=1, cfg=1.0)
    assert out.shape == _VIDEO and torch.isfinite(out).all()
