"""Image models of ComfyUI 0.33 that Block Cache refuses, with the reason the node and the log give.

HiDream-O1 keeps a key/value cache of the prompt in its decoder layers across sampling steps and runs;
a layer served from Block Cache's cache would leave that prompt cache wrong, so the model samples uncached.
"""

from __future__ import annotations

import importlib

import pytest
from comfyui_block_cache.block_caching.patching import attach_profiler
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from comfyui_block_cache.errors import UnsupportedModelError
from dit_zoo import TinyDit, zoo_params

# Qwen3-VL text decoder and vision tower cut down to 2 layers / 1 block; the 32x32 RGB patch embedding is
# fixed by the model.
_HIDREAM_O1 = {"image_model": "hidream_o1",
               "text_config_overrides": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                         "head_dim": 16, "rope_dims": [4, 2, 2]},
               "vision_config_overrides": {"hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "depth": 1,
                                           "patch_size": 4, "num_position_embeddings": 16}}

REFUSED = [
    TinyDit("refused (HiDreamO1Transformer)", "hidream-o1", "HiDreamO1", _HIDREAM_O1, (1, 3, 32, 32), (6, 24),
            since="0.33.0"),
]
# What each refusal must say, in the user's words (a part of the reason).
EXPECTED_REASON = {"hidream-o1": "key/value cache of the prompt"}
MODEL_CLASS = {"hidream-o1": "HiDreamO1Transformer"}


def _families(pack):
    return importlib.import_module(f"{pack.__name__}.block_maps.dit_families")


@pytest.mark.parametrize("entry", zoo_params(REFUSED))
def test_refused_model_names_its_reason(pack, entry):
    model = entry.build(seed=0)
    diffusion_model = model.model.diffusion_model
    model_class = MODEL_CLASS[entry.id]
    assert type(diffusion_model).__name__ == model_class
    refusal = _families(pack).refusal_of(diffusion_model)
    assert refusal is not None and EXPECTED_REASON[entry.id] in refusal.reason
    reason = refusal.reason
    with pytest.raises(UnsupportedModelError) as error:
        block_map_for_patcher(model)
    message = str(error.value)
    assert f"{model_class} (model type {entry.config}) is not cached" in message and reason in message
    # The node's path (the profiler and the cache attach through the block map) says the same.
    with pytest.raises(UnsupportedModelError, match="key/value cache"):
        attach_profiler(model)


@pytest.mark.parametrize("entry", zoo_params(REFUSED))
def test_refused_model_is_not_mapped(pack, entry):
    families = _families(pack)
    diffusion_model = entry.build(seed=0).model.diffusion_model
    assert families.family_of(diffusion_model) is None
    qualified = f"{type(diffusion_model).__module__}.{type(diffusion_model).__qualname__}"
    assert qualified in families.REFUSED_MODELS
