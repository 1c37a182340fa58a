"""Models of ComfyUI 0.33 that Block Cache refuses because they are not diffusion models.

RT-DETR v4 (object detector), SAM 3 / SAM 3.1 (segmenter) and Depth Anything 3 (depth estimator)
load as a MODEL, but their nodes run them once per image: no sampler, no steps, so nothing a block
cache could reuse. Their sizes are fixed in code (SAM 3 alone is about 500M parameters), so each is
built exactly as a checkpoint loader builds it (``comfy.supported_models.<config>(unet_config)
.get_model``, with the unet_config model_detection gives), on the meta device: the real classes and
module tree, no weights in memory, nothing run. Block Cache looks only at the model's classes, so it
refuses them before touching a weight.
"""

from __future__ import annotations

import logging

import pytest
import torch
from comfyui_block_cache.block_caching.patching import attach_profiler
from comfyui_block_cache.block_caching.schedule import all_compute_schedule
from comfyui_block_cache.block_maps import dit_families as families
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from comfyui_block_cache.errors import UnsupportedModelError
from comfyui_block_cache.nodes.nodes_apply import ApplyBlockCache
from dit_zoo import TinyDit
from helpers import profile_by_sampling

_SINCE = "0.33.0"

# config name in comfy.supported_models -> (unet_config as model_detection gives it, diffusion model class,
# what the reason names it).
MODELS = {
    "RT_DETR_v4": ({"image_model": "RT_DETR_v4", "enc_h": 256}, "comfy.ldm.rt_detr.rtdetr_v4.RTv4",
                   "object detector"),
    "SAM3": ({"image_model": "SAM3"}, "comfy.ldm.sam3.detector.SAM3Model", "segmenter"),
    "SAM31": ({"image_model": "SAM31"}, "comfy.ldm.sam3.detector.SAM3Model", "segmenter"),
    # The smallest preset (ViT-S backbone, mono DPT head), as detection configures it.
    "DepthAnything3": ({"image_model": "DepthAnything3", "backbone_name": "vits", "alt_start": -1, "rope_start": -1,
                        "qknorm_start": -1, "cat_token": False, "head_dim_in": 384, "head_features": 64,
                        "head_out_channels": [48, 96, 192, 384], "head_type": "dpt", "head_output_dim": 2,
                        "head_use_sky_head": True, "out_layers": [5, 7, 9, 11], "has_cam_enc": False,
                        "has_cam_dec": False},
                       "comfy.ldm.depth_anything_3.model.DepthAnything3Net", "depth estimator"),
}


def _build_on_meta(config_name: str):
    """A ModelPatcher around the model built as the loader builds it, on the meta device."""
    import comfy.model_patcher
    import comfy.supported_models

    unet_config, _, _ = MODELS[config_name]
    # The zoo's host check: skipped, saying so, on a ComfyUI older than the config; an error on a newer one.
    missing = TinyDit("refused", config_name, config_name, unet_config, (), (0, 0), since=_SINCE).missing_on_host()
    if missing:
        pytest.skip(missing)
    model_config = getattr(comfy.supported_models, config_name)(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=torch.device("meta"))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.mark.parametrize("config_name", list(MODELS))
def test_refused_as_not_a_diffusion_model(pack, config_name):
    model = _build_on_meta(config_name)
    _, class_name, kind = MODELS[config_name]
    diffusion_model = model.get_model_object("diffusion_model")
    assert f"{type(diffusion_model).__module__}.{type(diffusion_model).__qualname__}" == class_name
    refusal = families.refusal_of(diffusion_model)
    assert refusal == families.REFUSED_MODELS[class_name]
    reason = refusal.reason
    assert reason.startswith("not a diffusion model") and kind in reason and "never by a sampler" in reason
    with pytest.raises(UnsupportedModelError) as raised:
        block_map_for_patcher(model)
    message = str(raised.value)
    assert reason in message and type(diffusion_model).__name__ in message and f"model type {config_name}" in message
    # The message is the refusal alone, not the unknown-family search (no list of supported families).
    assert "Supported families" not in message
    with pytest.raises(UnsupportedModelError):
        attach_profiler(model)


def test_apply_node_says_why_and_returns_the_model(pack, tiny_model, conds, latent, caplog):
    """Apply Block Cache does not stop the graph: it hands the model back unpatched, saying why."""
    model = _build_on_meta("RT_DETR_v4")
    # Any schedule: the model is refused before the schedule is looked at.
    profile, _ = profile_by_sampling(pack, tiny_model, conds, latent, steps=2)
    schedule = all_compute_schedule(profile.block_map, profile.grid)
    with caplog.at_level(logging.WARNING):
        output = ApplyBlockCache.execute(model, schedule)
    (returned,) = output.result
    text = output.ui["text"][0]
    assert returned is model and not model.object_patches
    for message in (text, caplog.text):
        assert "Block Cache is OFF for this model" in message
        assert "RTv4 (model type RT_DETR_v4) is not cached: not a diffusion model" in message
        assert "object detector" in message
