"""Block Cache on real ComfyUI UNets: exactness, counts, CFG, state, re-timing."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.plan import stores_for
from comfyui_block_cache.block_caching.schedule import BuildOptions, all_compute_schedule, build_schedule
from comfyui_block_cache.demo_models.builtin_models import build_unet_patcher, prompt_conditioning
from comfyui_block_cache.nodes.nodes_profile import ProfileBlockChanges
from comfyui_block_cache.runtime.run import RunContext
from helpers import (
    count_layer_computations,
    expected_computations,
    has_block_cache,
    profile_by_sampling,
    record_evaluation_sigmas,
    runs_holding_tensors,
    sample,
    split_cond_calls,
)

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2s_ancestral", "dpmpp_sde", "ddim",
            "uni_pc", "lcm"]


def profile_and_build(pack, model, conds, latent, *, steps=8, sampler="euler", threshold=0.5, kinds="all"):
    profile, _ = profile_by_sampling(pack, model, conds, latent, steps=steps, sampler=sampler)
    options = BuildOptions(threshold=threshold, cache_kinds=kinds)
    return profile, build_schedule(profile, options)


@pytest.fixture
def built(pack, tiny_model, conds, latent):
    return profile_and_build(pack, tiny_model, conds, latent)


def test_only_computations_a_reuse_can_read_are_stored(pack, tiny_model, conds, latent, built):
    """All-compute steps pay nothing for caching: a one-evaluation sampler stores a layer's output only
    where the plan reuses it before the next computation (the last order + 1 before a reuse)."""
    _, schedule = built
    mask = schedule.compute_mask()
    assert not mask.all() and mask[:, 1:].any(), "the schedule must cache and compute after step 0"
    expected = stores_for(mask, tuple(layer.forecast_order for layer in schedule.layers))
    # order 0: exactly the computations followed by a reuse at the next step
    assert all(layer.forecast_order == 0 for layer in schedule.layers)
    following_reuse = mask & np.concatenate([~mask[:, 1:], np.zeros((mask.shape[0], 1), dtype=bool)], axis=1)
    np.testing.assert_array_equal(expected, following_reuse)
    all_compute = all_compute_schedule(schedule.block_map, schedule.grid)
    patched, holder = apply_block_cache(tiny_model, all_compute)
    sample(patched, *conds, latent)
    assert holder.last_run.figures["cache"].stores == 0 and holder.last_run.figures["cache"].peak_cache_bytes == 0
    patched, holder = apply_block_cache(tiny_model, schedule)
    sample(patched, *conds, latent)
    assert holder.last_run.figures["cache"].stores == int(expected.sum()) < int((mask & ~mask.all(1, keepdims=True)).sum())
    # Heun evaluates a step twice and reuses there: everything reusable is kept, as before.
    patched, holder = apply_block_cache(tiny_model, schedule)
    sample(patched, *conds, latent, sampler="heun")
    assert holder.last_run.figures["cache"].stores > int(expected.sum())


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "uni_pc"])
def test_all_compute_schedule_is_bit_identical(pack, tiny_model, conds, latent, built, sampler):
    _, schedule = built
    all_compute = all_compute_schedule(schedule.block_map, schedule.grid)
    reference = sample(tiny_model, *conds, latent, sampler=sampler)
    patched, holder = apply_block_cache(tiny_model, all_compute)
    assert torch.equal(sample(patched, *conds, latent, sampler=sampler), reference)
    assert holder.last_run.reused.sum() == 0 and holder.last_run.computed.sum() > 0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_real_computations_match_schedule(pack, tiny_model, conds, latent, built, sampler):
    _, schedule = built
    assert not schedule.compute_mask().all(), "the schedule must cache something for this test to mean anything"
    patched, holder = apply_block_cache(tiny_model, schedule)
    eval_sigmas = record_evaluation_sigmas(patched)
    names = [layer.name for layer in schedule.layers]
    diffusion_model = tiny_model.model.diffusion_model
    with count_layer_computations(diffusion_model, names) as counts:
        sample(patched, *conds, latent, sampler=sampler)
    counted = np.array([counts[n] for n in names])
    expected = expected_computations(schedule, tiny_model, eval_sigmas, holder.last_sample_sigmas)
    np.testing.assert_array_equal(counted, expected)
    np.testing.assert_array_equal(counted, holder.last_run.computed)
    assert holder.last_run.evaluations == len(eval_sigmas)
    if sampler in ("euler", "ddim", "dpmpp_2m", "euler_ancestral", "lcm"):
        # one evaluation per step on the schedule's own grid: exactly the mask
        np.testing.assert_array_equal(counted, schedule.compute_mask().sum(axis=1))


def test_cfg_batched_and_split_agree(pack, tiny_model, conds, latent, built):
    _, schedule = built
    batched_model, batched_holder = apply_block_cache(tiny_model, schedule)
    batched = sample(batched_model, *conds, latent)
    split_model, split_holder = apply_block_cache(tiny_model, schedule)
    split_cond_calls(split_model)
    split = sample(split_model, *conds, latent)
    # Same decisions; each call carries one chunk, so twice the layer calls.
    np.testing.assert_array_equal(split_holder.last_run.computed, 2 * batched_holder.last_run.computed)
    np.testing.assert_array_equal(split_holder.last_run.reused, 2 * batched_holder.last_run.reused)
    # CPU kernels round differently at batch 1 and 2, so ComfyUI itself is not bit-identical between
    # split and batched CFG; caching must add no difference beyond that baseline.
    uncached = sample(tiny_model, *conds, latent)
    uncached_split_model = tiny_model.clone()
    split_cond_calls(uncached_split_model)
    baseline = (sample(uncached_split_model, *conds, latent) - uncached).abs().max()
    assert (split - batched).abs().max() <= 2 * baseline + 1e-6
    assert (batched - uncached).abs().max() > 100 * baseline, "caching must change the output, or this is empty"


def test_cfg_conds_of_different_lengths_split_naturally(pack, tiny_model, latent, built):
    """Conds of lengths ComfyUI cannot concatenate (77 vs 78 tokens) go in separate calls."""
    _, schedule = built
    prompt = prompt_conditioning
    positive, negative = prompt("a", 32, tokens=77), prompt("b", 32, tokens=78)
    patched, holder = apply_block_cache(tiny_model, schedule)
    out = sample(patched, positive, negative, latent)
    assert torch.isfinite(out).all()
    np.testing.assert_array_equal(holder.last_run.computed, 2 * schedule.compute_mask().sum(axis=1))


def test_nothing_left_after_sampling(pack, tiny_model, conds, latent, built):
    _, schedule = built
    fresh = build_unet_patcher("tiny", seed=0)
    reference = sample(fresh, *conds, latent)
    patched, holder = apply_block_cache(tiny_model, schedule)
    sample(patched, *conds, latent)
    assert not runs_holding_tensors(holder), "the run state (and every cached tensor) is freed at the end of the run"
    assert not has_block_cache(tiny_model), "the input model is never patched"
    # Sampling the original model unloads the patched clone, which puts every layer's own forward back
    # (ComfyUI restores the bound method it backed up), and the output is bit-identical to a fresh model's.
    assert torch.equal(sample(tiny_model, *conds, latent), reference)
    diffusion_model = tiny_model.model.diffusion_model
    for layer in schedule.layers:
        module = diffusion_model.get_submodule(layer.name)
        left = vars(module).get("forward")
        assert left is None or (left.__self__ is module and left.__func__ is type(module).forward), layer.name


def test_interrupted_run_frees_state(pack, tiny_model, conds, latent, built):
    import comfy.model_management

    _, schedule = built
    patched, holder = apply_block_cache(tiny_model, schedule)
    calls = {"n": 0}

    def interrupt(executor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise comfy.model_management.InterruptProcessingException()
        return executor(*args, **kwargs)

    import comfy.patcher_extension

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_interrupt", interrupt)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(patched, *conds, latent)
    assert not runs_holding_tensors(holder)
    clean_model, clean_holder = apply_block_cache(tiny_model, schedule)
    first = sample(clean_model, *conds, latent)
    second = sample(clean_model, *conds, latent)
    assert torch.equal(first, second), "the next runs start clean"


def test_resolution_and_batch_changes_between_runs(pack, tiny_model, conds, built):
    _, schedule = built
    patched, holder = apply_block_cache(tiny_model, schedule)
    for shape in [(1, 4, 16, 16), (2, 4, 16, 16), (1, 4, 24, 16), (1, 4, 16, 16)]:
        latent = {"samples": torch.zeros(shape)}
        out = sample(patched, *conds, latent)
        assert out.shape == shape and torch.isfinite(out).all()
        assert holder.last_run.reused.sum() > 0
    # the same inputs as the first run give the first run's output again: no stale cache
    again = sample(patched, *conds, {"samples": torch.zeros(1, 4, 16, 16)})
    fresh_model, _ = apply_block_cache(tiny_model, schedule)
    assert torch.equal(again, sample(fresh_model, *conds, {"samples": torch.zeros(1, 4, 16, 16)}))


def test_latent_change_inside_a_run_resets_cache(pack, tiny_model, conds, latent, built):
    _, schedule = built
    _, holder = apply_block_cache(tiny_model, schedule)
    sigmas = torch.linspace(14.6, 0.0, schedule.grid.steps + 1)
    run = RunContext(holder, tiny_model.get_model_object("model_sampling"), sigmas)
    run.begin_evaluation(torch.zeros(2, 4, 16, 16), sigmas[:1])
    run.end_evaluation()
    run.layer_method.cache[(0, None)] = object()
    run.begin_evaluation(torch.zeros(2, 4, 8, 8), sigmas[1:2])
    assert run.layer_method.cache == {} and run.stats.cache_resets == 1
    assert run.computes.all(), "after a reset everything computes"
    run.close()


def test_ksampler_advanced_start_end_steps(pack, tiny_model, conds, latent, built):
    _, schedule = built
    patched, holder = apply_block_cache(tiny_model, schedule)
    start = sample(patched, *conds, latent, steps=8, start_step=0, last_step=4, force_full_denoise=False)
    assert holder.last_run.steps == 4
    end = sample(patched, *conds, {"samples": start}, steps=8, start_step=4, last_step=8, disable_noise=True)
    assert holder.last_run.steps == 4 and holder.last_run.reused.sum() > 0
    assert torch.isfinite(end).all()
    # The second half's first evaluation computes everything (nothing cached yet), then follows the schedule.
    assert (holder.last_run.computed >= 1).all()


@pytest.mark.parametrize(("steps", "sampler"), [(30, "euler"), (20, "heun"), (12, "dpmpp_2m")])
def test_retiming_other_steps_and_samplers(pack, tiny_model, conds, latent, caplog, steps, sampler):
    _, schedule = profile_and_build(pack, tiny_model, conds, latent, steps=20)
    patched, holder = apply_block_cache(tiny_model, schedule)
    eval_sigmas = record_evaluation_sigmas(patched)
    names = [layer.name for layer in schedule.layers]
    with caplog.at_level(logging.INFO), count_layer_computations(tiny_model.model.diffusion_model, names) as counts:
        out = sample(patched, *conds, latent, steps=steps, sampler=sampler)
    assert torch.isfinite(out).all()
    assert holder.last_run.figures["cache"].retimed
    assert sum("re-timed onto" in r.message for r in caplog.records) == 1
    np.testing.assert_array_equal([counts[n] for n in names], expected_computations(schedule, tiny_model, eval_sigmas, holder.last_sample_sigmas))
    assert holder.last_run.reused.sum() > 0


def test_profile_latent_equals_ksampler(pack, tiny_model, conds, latent):
    import nodes as comfy_nodes

    positive, negative = conds
    batch = {"samples": torch.zeros(2, 4, 16, 16)}
    (ksampler_latent,) = comfy_nodes.KSampler().sample(tiny_model, 3, 6, 4.0, "dpmpp_2m", "karras", positive,
                                                       negative, batch, denoise=1.0)
    node = ProfileBlockChanges
    result = node.execute(tiny_model, 3, 6, 4.0, "dpmpp_2m", "karras", positive, negative, batch, 1.0)
    latent_out, profile, heatmap = result.result
    assert torch.equal(latent_out["samples"], ksampler_latent["samples"])
    assert profile.sample_count == 4  # 2 images x cond/uncond
    assert profile.grid.steps == 6 and profile.grid.sampler == "dpmpp_2m"
    assert all(np.isnan(row[0]) for row in profile.change)
    assert all(np.isfinite(row[1:]).all() and min(row[1:]) >= 0 for row in profile.change)
    assert profile.total_flops > sum(profile.layer_flops) > 0
    assert heatmap.ndim == 4 and heatmap.shape[-1] == 3


def test_block_cache_chains_with_existing_object_patch(pack, tiny_model, conds, latent, built):
    _, schedule = built
    name = schedule.layers[1].name
    key = f"diffusion_model.{name}.forward"
    calls = {"n": 0}
    original = tiny_model.get_model_object(key)

    def other_pack_forward(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    other = tiny_model.clone()
    other.add_object_patch(key, other_pack_forward)
    patched, holder = apply_block_cache(other, schedule)
    sample(patched, *conds, latent)
    assert calls["n"] == holder.last_run.computed[1] > 0
