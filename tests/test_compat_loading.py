"""Block Cache under the ways ComfyUI loads and moves a model: low-VRAM partial loading with lowvram
weight patches, clones on another copy of the model, models moved between dtypes and devices.

Where it is defined, an all-compute schedule must give exactly the output of the same graph without
Block Cache; a caching schedule must cache and keep the other feature working. The ``schedules``
fixture (conftest.py) is (all-compute, caching) from a real profile of the tiny UNet.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import numpy as np
import torch
from comfy_bootstrap import load_pack
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.schedule import all_compute_schedule
from comfyui_block_cache.demo_models.builtin_models import build_unet_patcher
from helpers import (
    live_tensor_bytes,
    patched_layers,
    run_of,
    runs_holding_tensors,
    sample,
    with_lora,
)

WrappersMP = comfy.patcher_extension.WrappersMP


# -- low VRAM: partial loading, lowvram weight patches ------------------------------------------------

def _partially_loaded(model, record):
    """A clone whose weights are loaded partially for sampling, as under --lowvram: after ComfyUI's
    own load, everything is unloaded (ModelPatcher.partially_unload) and a third of the weights is
    loaded back (ModelPatcher.partially_load); the rest run through comfy.ops' cast-weights path, with
    weight patches (LoRA) applied per call by LowVramPatch. On a CPU the devices are the same, but
    every code path of the partial load runs."""
    partial = model.clone()

    def wrapper(executor, model_patcher, *args, **kwargs):
        out = executor(model_patcher, *args, **kwargs)
        size = model_patcher.model_size()
        model_patcher.partially_unload(model_patcher.offload_device, size)
        model_patcher.partially_load(model_patcher.load_device, size // 3)
        inner = model_patcher.model
        record.update(lowvram=inner.model_lowvram, lowvram_patches=inner.lowvram_patch_counter,
                      loaded=inner.model_loaded_weight_memory, size=size,
                      object_patched=bool(patched_layers(inner)))
        return out

    partial.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, "test_partial_load", wrapper)
    return partial


def test_partial_loading_with_lowvram_patches(pack, tiny_model, conds, latent, schedules):
    all_compute, caching = schedules
    record = {}
    full_reference = sample(with_lora(tiny_model), *conds, latent)
    reference = sample(_partially_loaded(with_lora(tiny_model), record), *conds, latent)
    assert record["lowvram"] and record["lowvram_patches"] > 0 and 0 < record["loaded"] < record["size"]
    assert not record["object_patched"]
    # ComfyUI's lowvram path computes the same LoRA weights per call: bit-identical here.
    assert torch.equal(reference, full_reference)

    record.clear()
    exact, _ = apply_block_cache(_partially_loaded(with_lora(tiny_model), record), all_compute)
    assert torch.equal(sample(exact, *conds, latent), reference)
    assert record["lowvram"] and record["object_patched"], "our layer patches survive partially_load"

    full_cached, full_holder = apply_block_cache(with_lora(tiny_model), caching)
    expected = sample(full_cached, *conds, latent)
    assert full_holder.last_run.reused.sum() > 0
    # Caching, with Apply before the partial-load clone and after it: the fully loaded result, the same counts.
    applied, applied_holder = apply_block_cache(with_lora(tiny_model), caching)
    for model, holder in ((_partially_loaded(applied, record), applied_holder),
                          apply_block_cache(_partially_loaded(with_lora(tiny_model), record),
                                                               caching)):
        record.clear()
        assert torch.equal(sample(model, *conds, latent), expected)
        assert record["lowvram"] and record["lowvram_patches"] > 0 and record["object_patched"]
        np.testing.assert_array_equal(holder.last_run.computed, full_holder.last_run.computed)
        np.testing.assert_array_equal(holder.last_run.reused, full_holder.last_run.reused)
    # Afterwards the loader's model loads fully again, without lowvram casts or our patches.
    assert torch.equal(sample(tiny_model, *conds, latent), sample(tiny_model.clone(), *conds, latent))
    assert not tiny_model.model.model_lowvram and not patched_layers(tiny_model.model)
    assert not any(hasattr(m, "prev_comfy_cast_weights") for m in tiny_model.model.modules())


# -- a model moved between dtypes / devices between runs ---------------------------------------------

def _move(model_patcher, dtype):
    """Moves the model's weights to ``dtype`` the way its dtype is read back (BaseModel.get_dtype)."""
    diffusion_model = model_patcher.model.diffusion_model
    diffusion_model.to(dtype)
    diffusion_model.dtype = dtype


def _on_a_copy_of_the_model(patcher):
    """A clone on another copy of the model, as deepclone_multigpu makes one (a fresh model from the
    loader), with its weights changed slightly so that the copy's layers and the original's give
    different pictures."""
    comfy.model_management.unload_all_models()  # the model's modules without any patch applied
    moved = patcher.clone()
    moved.model = load_pack().demo_models.builtin_models.build_unet_patcher("tiny", seed=0).model
    with torch.no_grad():
        for parameter in moved.model.diffusion_model.parameters():
            parameter.mul_(1.01)
    return moved


def test_clone_on_another_copy_of_the_model_runs_its_own_layers(pack, tiny_model, conds, latent, schedules, caplog):
    """The object patches travel with such a clone; each must run the layer of the model it is called on."""
    _, caching = schedules
    all_compute = all_compute_schedule(caching.block_map, caching.grid)
    exact, _ = apply_block_cache(tiny_model, all_compute)
    with caplog.at_level(logging.INFO):
        out = sample(_on_a_copy_of_the_model(exact), *conds, latent)
    assert "runs on another copy of the model" in caplog.text
    assert torch.equal(out, sample(_on_a_copy_of_the_model(tiny_model), *conds, latent))
    patched, holder = apply_block_cache(tiny_model, caching)
    expected = sample(patched, *conds, latent)
    reused = holder.last_run.reused.sum()
    assert reused > 0
    moved = sample(_on_a_copy_of_the_model(patched), *conds, latent)
    assert holder.last_run.reused.sum() == reused, "the copy caches by the same schedule"
    assert not torch.equal(moved, expected), "the copy's own layers computed, not the original's"
    assert torch.equal(sample(patched, *conds, latent), expected), "the original is untouched"


def test_model_moved_between_dtypes_and_devices_between_runs(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    patched, holder = apply_block_cache(tiny_model, caching)
    first = sample(patched, *conds, latent)
    first_stats = holder.last_run
    # Offloaded between runs (the loader detaches it to the offload device, as when another model loads).
    patched.detach()
    assert torch.equal(sample(patched, *conds, latent), first)
    # The weights moved to float64 between runs: the run caches float64 tensors from scratch and
    # gives exactly what the same schedule gives on a model made in float64.
    _move(tiny_model, torch.float64)
    try:
        out64 = sample(patched, *conds, latent)
        assert holder.last_run.figures["cache"].peak_cache_bytes == 2 * first_stats.figures["cache"].peak_cache_bytes, "float64 cache, fresh"
    finally:
        _move(tiny_model, torch.float32)
    np.testing.assert_array_equal(holder.last_run.computed, first_stats.computed)
    model64 = build_unet_patcher("tiny", seed=0, dtype=torch.float64)
    patched64, _ = apply_block_cache(model64, caching)
    assert torch.equal(out64, sample(patched64, *conds, latent))
    # Back in float32: the first run's result again; no state carried over, nothing left alive.
    before = live_tensor_bytes()
    assert torch.equal(sample(patched, *conds, latent), first)
    assert not runs_holding_tensors(holder) and holder.last_run.cache_resets == 0
    assert live_tensor_bytes() - before <= 0


def test_latent_dtype_change_inside_a_run_resets_the_cache(pack, tiny_model, conds, latent, schedules):
    """A PREDICT_NOISE wrapper outside ours hands the model a float64 latent from the 4th evaluation
    on: the latent signature changes once, the cache is dropped and every layer computes there."""
    _, caching = schedules
    seen = []

    def to_float64_later(executor, x, *args, **kwargs):
        seen.append(x.dtype)
        if len(seen) >= 4:
            return executor(x.to(torch.float64), *args, **kwargs).to(x.dtype)
        return executor(x, *args, **kwargs)

    outer = tiny_model.clone()
    outer.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "test_float64", to_float64_later)
    patched, holder = apply_block_cache(outer, caching)
    computed_per_evaluation = []

    def record(executor, *args, **kwargs):
        stats = run_of(args, kwargs).stats
        before = stats.computed.copy()
        out = executor(*args, **kwargs)
        computed_per_evaluation.append(stats.computed - before)
        return out

    patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "test_record", record)
    out = sample(patched, *conds, latent)
    stats = holder.last_run
    assert torch.isfinite(out).all() and stats.cache_resets == 1 and stats.reused.sum() > 0
    layers = len(caching.layers)
    assert (computed_per_evaluation[3] == 1).all() and computed_per_evaluation[3].sum() == layers
    plain, plain_holder = apply_block_cache(tiny_model, caching)
    sample(plain, *conds, latent)
    assert stats.computed.sum() > plain_holder.last_run.computed.sum(), "the reset recomputed cached layers"
