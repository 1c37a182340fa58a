"""Block Cache on every DiT family: real ComfyUI model classes, tiny configs, seeded weights, CPU.

For each family in the zoo (tests/dit_zoo):
1. an all-compute schedule is bit-identical to the unpatched model;
2. the real block computations match the schedule;
3. a caching schedule runs through ``comfy.sample`` and the model is restored afterwards;
4. profile -> schedule -> apply works.
"""

from __future__ import annotations

import dataclasses

import comfy.sample
import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.schedule import BuildOptions, all_compute_schedule, build_schedule
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from comfyui_block_cache.runtime.run import LayerForward
from comfyui_block_cache.schedule_files.schema import schedule_from_json, schedule_to_json
from dit_zoo import ZOO, zoo_params
from helpers import count_layer_computations, profile_by_sampling, runs_holding_tensors, sample, split_cond_calls

STEPS = 4


@pytest.fixture(scope="module")
def profiled(pack):
    """Per zoo entry: (model, conds, reference output, profile); built once per module."""
    cache: dict[str, tuple] = {}

    def get(entry):
        if entry.id not in cache:
            model = entry.build(seed=0)
            conds = entry.conds()
            latent = entry.latent()
            reference = sample(model, *conds, latent, steps=STEPS, cfg=entry.cfg)
            profile, profiled_out = profile_by_sampling(pack, model, conds, latent, steps=STEPS, cfg=entry.cfg)
            cache[entry.id] = (model, conds, reference, profile, profiled_out)
        return cache[entry.id]

    return get


def alternating_schedule(pack, profile):
    """Every block reuses at every other step (first step computed), so something is always cached."""
    all_compute = all_compute_schedule(profile.block_map, profile.grid, profile.layer_flops,
                                                          profile.total_flops)
    layers = tuple(
        dataclasses.replace(layer, compute=tuple(step == 0 or (step + index) % 2 == 0
                                                 for step in range(profile.grid.steps)))
        for index, layer in enumerate(all_compute.layers)
    )
    return dataclasses.replace(all_compute, layers=layers)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, entry) -> None:
    if entry.tolerance == 0.0:
        assert torch.equal(actual, expected), f"max diff {(actual - expected).abs().max():.3g}"
    else:
        assert (actual - expected).abs().max() <= entry.tolerance, entry.tolerance_reason


@pytest.mark.parametrize("entry", zoo_params())
def test_block_map_names_the_family(pack, entry, profiled):
    model, *_ = profiled(entry)
    block_map = block_map_for_patcher(model)
    assert block_map.family == entry.family
    assert block_map.layers and all(layer.kind.value == "transformer" for layer in block_map.layers)


@pytest.mark.parametrize("entry", zoo_params())
def test_profile_is_the_unpatched_output_and_measures_every_block(pack, entry, profiled):
    _, _, reference, profile, profiled_out = profiled(entry)
    assert_close(profiled_out, reference, entry)
    change = np.array(profile.change, dtype=float)
    assert change.shape == (len(profile.block_map.layers), STEPS)
    static = np.array([layer.stage in entry.static_blocks for layer in profile.block_map.layers])
    assert np.isnan(change[:, 0]).all() and np.isfinite(change[:, 1:]).all()
    assert (change[~static, 1:] > 0).all() and (change[static, 1:] == 0).all()
    assert profile.total_flops > sum(profile.layer_flops) > 0 and min(profile.layer_flops) > 0


@pytest.mark.parametrize("entry", zoo_params())
def test_all_compute_schedule_is_bit_identical(pack, entry, profiled):
    model, conds, reference, profile, _ = profiled(entry)
    schedule = all_compute_schedule(profile.block_map, profile.grid)
    patched, holder = apply_block_cache(model, schedule)
    assert_close(sample(patched, *conds, entry.latent(), steps=STEPS, cfg=entry.cfg), reference, entry)
    assert holder.last_run.reused.sum() == 0 and holder.last_run.computed.sum() > 0


@pytest.mark.parametrize("entry", zoo_params())
def test_real_block_computations_match_the_schedule(pack, entry, profiled):
    model, conds, reference, profile, _ = profiled(entry)
    schedule = alternating_schedule(pack, profile)
    patched, holder = apply_block_cache(model, schedule)
    names = [layer.name for layer in schedule.layers]
    with count_layer_computations(model.model.diffusion_model, names) as counts:
        out = sample(patched, *conds, entry.latent(), steps=STEPS, cfg=entry.cfg)
    counted = np.array([counts[name] for name in names])
    calls_per_evaluation = (holder.last_run.computed + holder.last_run.reused) // STEPS
    np.testing.assert_array_equal(counted, schedule.compute_mask().sum(axis=1) * calls_per_evaluation)
    np.testing.assert_array_equal(counted, holder.last_run.computed)
    assert holder.last_run.reused.sum() > 0
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


@pytest.mark.parametrize("entry", zoo_params())
def test_caching_run_through_comfy_sample_restores_the_model(pack, entry, profiled):
    model, conds, reference, profile, _ = profiled(entry)
    patched, holder = apply_block_cache(model, alternating_schedule(pack, profile))
    latent = entry.latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, 7)
    positive, negative = conds
    out = comfy.sample.sample(patched, noise, STEPS, entry.cfg, "euler", "normal", positive, negative, latent,
                              seed=7)
    assert torch.isfinite(out).all() and holder.last_run.reused.sum() > 0 and not runs_holding_tensors(holder)
    # ComfyUI keeps object patches applied while the patched clone stays loaded; loading the
    # original model unpatches it. Then no forward of ours may remain, and the output is as before.
    assert_close(sample(model, *conds, entry.latent(), steps=STEPS, cfg=entry.cfg), reference, entry)
    diffusion_model = model.model.diffusion_model
    for layer in holder.block_map.layers:
        patched_forward = diffusion_model.get_submodule(layer.name).__dict__.get("forward")
        assert not isinstance(patched_forward, LayerForward), layer.name


@pytest.mark.parametrize("entry", zoo_params())
def test_profile_build_apply(pack, entry, profiled):
    model, conds, reference, profile, _ = profiled(entry)
    options = BuildOptions(threshold=10.0, cache_kinds="attention")
    schedule = build_schedule(profile, options)
    mask = schedule.compute_mask()
    assert mask[:, 0].all() and not mask.all()
    restored = schedule_from_json(schedule_to_json(schedule))
    patched, holder = apply_block_cache(model, restored)
    out = sample(patched, *conds, entry.latent(), steps=STEPS, cfg=entry.cfg)
    assert torch.isfinite(out).all()
    calls_per_evaluation = (holder.last_run.computed + holder.last_run.reused) // STEPS
    np.testing.assert_array_equal(holder.last_run.computed, mask.sum(axis=1) * calls_per_evaluation)
    assert holder.last_run.reused.sum() > 0


# The properties below hold for every family; they run on a few representative ones to keep CI fast.
REPRESENTATIVE = [e for e in ZOO if e.id in {"flux-dev", "wan21-t2v", "sd3", "qwen-image", "hunyuan-video"}]


@pytest.mark.parametrize("entry", REPRESENTATIVE, ids=lambda e: e.id)
def test_batch_of_two(pack, entry, profiled):
    model, conds, _, profile, _ = profiled(entry)
    latent = entry.latent(batch=2)
    reference = sample(model, *conds, latent, steps=STEPS, cfg=entry.cfg)
    all_compute = all_compute_schedule(profile.block_map, profile.grid)
    patched, _ = apply_block_cache(model, all_compute)
    assert_close(sample(patched, *conds, latent, steps=STEPS, cfg=entry.cfg), reference, entry)
    cached, holder = apply_block_cache(model, alternating_schedule(pack, profile))
    out = sample(cached, *conds, latent, steps=STEPS, cfg=entry.cfg)
    assert out.shape[0] == 2 and torch.isfinite(out).all() and holder.last_run.reused.sum() > 0


@pytest.mark.parametrize("entry", [e for e in REPRESENTATIVE if e.cfg > 1.0], ids=lambda e: e.id)
def test_cfg_split_and_batched_make_the_same_decisions(pack, entry, profiled):
    model, conds, _, profile, _ = profiled(entry)
    schedule = alternating_schedule(pack, profile)
    batched, batched_holder = apply_block_cache(model, schedule)
    batched_out = sample(batched, *conds, entry.latent(), steps=STEPS, cfg=entry.cfg)
    split, split_holder = apply_block_cache(model, schedule)
    split_cond_calls(split)
    split_out = sample(split, *conds, entry.latent(), steps=STEPS, cfg=entry.cfg)
    np.testing.assert_array_equal(split_holder.last_run.computed, 2 * batched_holder.last_run.computed)
    np.testing.assert_array_equal(split_holder.last_run.reused, 2 * batched_holder.last_run.reused)
    # Batch 1 and batch 2 kernels round differently on CPU; compare with the uncached split/batched gap.
    uncached_split = model.clone()
    split_cond_calls(uncached_split)
    gap = (sample(uncached_split, *conds, entry.latent(), steps=STEPS, cfg=entry.cfg)
           - sample(model, *conds, entry.latent(), steps=STEPS, cfg=entry.cfg)).abs().max()
    assert (split_out - batched_out).abs().max() <= max(10 * float(gap), 1e-5)
