"""Block Cache under ComfyUI's native multi-GPU (comfy/multigpu.py, after 0.3.75).

A model gets a deep clone per extra device (``deepclone_multigpu``: a fresh model from its loader);
each evaluation's conds are split over the devices and run in one thread per device, each on its
own model. Here the two "devices" are the CPU twice (``cpu`` and ``cpu:0`` are distinct devices to
ComfyUI), so ComfyUI's own scheduler, thread pool and clones run for real. One sampling run has one
run context; every thread's model calls keep their own scope, and the cache keeps each cond apart.
"""

from __future__ import annotations

import threading

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import numpy as np
import pytest
import torch
from helpers import count_layer_computations, profile_schedules, sample, split_cond_calls

if not hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu"):
    pytest.skip("this ComfyUI has no native multi-GPU (deepclone_multigpu came after 0.3.75)", allow_module_level=True)

import comfy.multigpu  # noqa: E402
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.demo_models.builtin_models import build_unet_patcher

SECOND_DEVICE = torch.device("cpu", 0)


@pytest.fixture
def model(pack):
    comfy.model_management.unload_all_models()
    build = build_unet_patcher
    patcher = build("tiny", seed=0)
    patcher.cached_patcher_init = (build, ("tiny", 0))  # what a core loader registers for deep clones
    return patcher


def on_two_devices(model):
    """``create_multigpu_deepclones`` for one extra device (it only looks for GPUs itself)."""
    model = model.clone()
    extra = model.deepclone_multigpu(new_load_device=SECOND_DEVICE)
    extra.is_multigpu_base_clone = True
    model.set_additional_models("multigpu", [extra])
    model.match_multigpu_clones()
    comfy.multigpu.GPUOptionsGroup().register(model)
    return model


@pytest.fixture
def threads_and_models(monkeypatch):
    """The (thread, model) pairs that ran model calls."""
    seen: set[tuple[int, int]] = set()
    apply_model = comfy.model_base.BaseModel.apply_model

    def spy(self, *args, **kwargs):
        seen.add((threading.get_ident(), id(self)))
        return apply_model(self, *args, **kwargs)

    monkeypatch.setattr(comfy.model_base.BaseModel, "apply_model", spy)
    return seen


def test_all_compute_on_two_devices_is_the_uncached_run(pack, model, conds, latent, threads_and_models):
    all_compute, _ = profile_schedules(pack, model, conds, latent)
    threads_and_models.clear()
    reference = sample(on_two_devices(model), *conds, latent)
    assert len(threads_and_models) == 2 and len({m for _, m in threads_and_models}) == 2, "two threads, two models"
    patched, holder = apply_block_cache(model, all_compute)
    assert torch.equal(sample(on_two_devices(patched), *conds, latent), reference)
    assert holder.last_run.reused.sum() == 0 and holder.last_run.computed.sum() > 0


def test_caching_on_two_devices_is_caching_with_one_call_per_cond(pack, model, conds, latent, threads_and_models):
    """Cond and uncond run in two threads on two models: the cache keeps each cond's own residuals, so the
    result is that of one device calling the model once per cond, bit for bit, with the same counts."""
    _, caching = profile_schedules(pack, model, conds, latent)
    one_device, one_holder = apply_block_cache(model, caching)
    split_cond_calls(one_device)
    expected = sample(one_device, *conds, latent)

    patched, holder = apply_block_cache(model, caching)
    two_devices = on_two_devices(patched)
    threads_and_models.clear()
    names = [layer.name for layer in caching.layers]
    extra_model = two_devices.get_additional_models_with_key("multigpu")[0].model
    with count_layer_computations(model.model.diffusion_model, names) as first, \
            count_layer_computations(extra_model.diffusion_model, names) as second:
        out = sample(two_devices, *conds, latent)
    assert torch.equal(out, expected)
    np.testing.assert_array_equal(holder.last_run.computed, one_holder.last_run.computed)
    np.testing.assert_array_equal(holder.last_run.reused, one_holder.last_run.reused)
    both = np.array([first[name] + second[name] for name in names])
    np.testing.assert_array_equal(both, holder.last_run.computed)
    assert all(first[name] > 0 and second[name] > 0 for name in names), "each device computed its cond"
    assert holder.last_run.reused.sum() > 0
    assert len(threads_and_models) == 2, "two threads, each on its own model"
