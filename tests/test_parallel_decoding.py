"""Faster Diffusion's parallel decoding, on the tiny SD1.5-layout UNet and real ComfyUI sampling.

The reference for every comparison is *sequential* encoder propagation with conv_in reused as in
parallel decoding (``ParallelDecoding(batched=False)``): the same computation, one step at a time.
Batched and sequential decoder passes differ only by float rounding of batch-size dependent kernels
(fp32, CPU), which the solver carries on; the tolerance is a maximum absolute difference of 1e-4 of
the output's largest magnitude (measured: at most 1.5e-6 of it on the tiny UNet over 8 steps, 1.3e-5
on the reference model over 20 dpmpp_2m steps).
"""

from __future__ import annotations

import importlib
import logging

import comfy.model_management
import comfy.patcher_extension
import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.schedule import all_compute_schedule
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from comfyui_block_cache.demo_models.reference_model import empty_latent, load_reference_model
from comfyui_block_cache.faster_diffusion import schedule as fd
from comfyui_block_cache.faster_diffusion.noise_injection import NoiseInjection
from comfyui_block_cache.faster_diffusion.schedule import grid_for_model
from comfyui_block_cache.nodes.nodes_apply import ApplyBlockCache
from comfyui_block_cache.runtime.run import ExtensionLayerForward
from helpers import (
    InterruptAt,
    count_layer_computations,
    record_evaluation_sigmas,
    run_of,
    runs_holding_tensors,
    sample,
    split_cond_calls,
)

RELATIVE_TOLERANCE = 1e-4
CONV_IN_KEY = "diffusion_model.input_blocks.0.0.forward"
KEYS = (0, 4)  # 8 steps: the encoder runs at steps 0 and 4; steps 1-3 and 5-7 are decoded in two batches


@pytest.fixture(scope="module")
def pd(pack):
    return importlib.import_module(f"{pack.__name__}.faster_diffusion.parallel_decoding")


def _schedule(pack, model, steps=8, sampler="euler", keys=KEYS):
    grid = fd.grid_for_model(model, steps, sampler, "normal")
    block_map = block_map_for_patcher(model)
    options = fd.FasterDiffusionOptions(key_steps="custom", custom_key_steps=keys)
    return fd.build_faster_diffusion_schedule(block_map, grid, options)


def _apply(pack, pd, model, schedule, **config):
    patched, holder = apply_block_cache(
        model, schedule, options=[pd.ParallelDecoding(enabled=True, **config)])
    return patched, holder, pd.installed_on(holder)


def _assert_close(actual, expected):
    scale = float(expected.abs().max())
    difference = float((actual - expected).abs().max())
    assert torch.isfinite(actual).all()
    assert difference <= RELATIVE_TOLERANCE * scale, (difference, scale)


class _UNetPasses:
    """Real UNet passes: the rows of every call of the output head, which every real pass runs."""

    def __init__(self, model):
        self.rows: list[int] = []
        self._handle = model.model.diffusion_model.out.register_forward_pre_hook(
            lambda _module, args: self.rows.append(int(args[0].shape[0])))

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self._handle.remove()


# -- (1) parallel equals sequential -----------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_parallel_equals_sequential_encoder_propagation(pack, pd, tiny_model, conds, latent, sampler):
    schedule = _schedule(pack, tiny_model, sampler=sampler)
    sequential, seq_holder, _ = _apply(pack, pd, tiny_model, schedule, batched=False)
    parallel, par_holder, decoder = _apply(pack, pd, tiny_model, schedule)
    expected = sample(sequential, *conds, latent, sampler=sampler)
    with _UNetPasses(tiny_model) as passes:
        out = sample(parallel, *conds, latent, sampler=sampler)
    _assert_close(out, expected)
    assert passes.rows == [2, 6, 2, 6]  # cond+uncond; key step, then the next 3 steps as one batch
    stats = decoder.last_stats
    assert (stats.batched_calls, stats.served, stats.sequential, stats.unused) == (2, 4, 0, 0)
    # the run summary counts layer evaluations per step, exactly as sequentially
    np.testing.assert_array_equal(par_holder.last_run.computed, seq_holder.last_run.computed)
    np.testing.assert_array_equal(par_holder.last_run.reused, seq_holder.last_run.reused)
    # conv_in reuse is what makes the decoder independent of x_t: without it the output differs
    plain, _ = apply_block_cache(tiny_model, schedule)
    assert not torch.allclose(sample(plain, *conds, latent, sampler=sampler), expected, rtol=0, atol=1e-3)


def test_split_cfg_and_batch_of_two(pack, pd, tiny_model, conds):
    """cond and uncond in separate model calls, two latents: each call stashes and serves its own chunks."""
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    schedule = _schedule(pack, tiny_model)
    sequential, _, _ = _apply(pack, pd, tiny_model, schedule, batched=False)
    parallel, _, decoder = _apply(pack, pd, tiny_model, schedule)
    batched, _, _ = _apply(pack, pd, tiny_model, schedule)
    split_cond_calls(sequential)
    split_cond_calls(parallel)
    expected = sample(sequential, *conds, latent)
    with _UNetPasses(tiny_model) as passes:
        out = sample(parallel, *conds, latent)
    _assert_close(out, expected)
    assert passes.rows == [2, 2, 6, 6, 2, 2, 6, 6]  # per cond chunk: key step, one batch of 3 steps
    assert decoder.last_stats.served == 8
    _assert_close(sample(batched, *conds, latent), expected)  # CFG batched in one call: the same


def test_max_steps_splits_the_batches(pack, pd, tiny_model, conds, latent):
    schedule = _schedule(pack, tiny_model)
    sequential, _, _ = _apply(pack, pd, tiny_model, schedule, batched=False)
    capped, _, decoder = _apply(pack, pd, tiny_model, schedule, max_steps=2)
    with _UNetPasses(tiny_model) as passes:
        out = sample(capped, *conds, latent)
    _assert_close(out, sample(sequential, *conds, latent))
    assert passes.rows == [2, 4, 2, 2, 4, 2]  # steps 1-2 batched, 3 alone; 5-6 batched, 7 alone
    assert decoder.last_stats.batch_sizes == [4, 2, 4, 2]


def test_batches_are_capped_by_free_memory(pack, pd, tiny_model, conds, latent, monkeypatch, caplog):
    """With room for one extra step's rows in ComfyUI's free-memory estimate, every batched call holds two
    steps, as with max_steps 2, and the log says so."""
    schedule = _schedule(pack, tiny_model)
    sequential, _, _ = _apply(pack, pd, tiny_model, schedule, batched=False)
    parallel, _, decoder = _apply(pack, pd, tiny_model, schedule)
    rows_memory = tiny_model.model.memory_required([2, *latent["samples"].shape[1:]])
    free = 1.5 * rows_memory / 0.8

    def get_free_memory(device=None, torch_free_too=False):
        return (free, free) if torch_free_too else free

    monkeypatch.setattr(comfy.model_management, "get_free_memory", get_free_memory)
    with caplog.at_level(logging.INFO), _UNetPasses(tiny_model) as passes:
        out = sample(parallel, *conds, latent)
    _assert_close(out, sample(sequential, *conds, latent))
    assert passes.rows == [2, 4, 2, 2, 4, 2]
    assert decoder.last_stats.batch_sizes == [4, 2, 4, 2] and decoder.last_stats.memory_capped == 2
    assert "capped at 2 steps (4 rows) to fit the free memory" in caplog.text


def test_reference_model_parallel_equals_sequential(pack, pd):
    """The trained reference model (real weights), paper DPM-Solver keys on 20 dpmpp_2m steps."""
    reference = load_reference_model()
    model = reference.patcher.clone()
    grid = fd.grid_for_model(model, 20, "dpmpp_2m", "karras")
    schedule = fd.build_faster_diffusion_schedule(block_map_for_patcher(model), grid)
    assert schedule.builder["key_steps"] == [0, 1, 2, 3, 5, 10, 15]
    positive = [[reference.encode(["a large red circle at center on a blue background",
                                   "a small green square at top left on a white striped background"]), {}]]
    negative = reference.conditioning("")
    latent = empty_latent(2)
    sequential, _, _ = _apply(pack, pd, model, schedule, batched=False)
    parallel, _, decoder = _apply(pack, pd, model, schedule)
    kwargs = dict(steps=20, sampler="dpmpp_2m", scheduler="karras")
    expected = sample(sequential, positive, negative, latent, **kwargs)
    with _UNetPasses(model) as passes:
        out = sample(parallel, positive, negative, latent, **kwargs)
    _assert_close(out, expected)
    # 7 key steps; the gaps 4, 6-9, 11-14 and 16-19 are one batch each (x 4 rows: 2 latents x cond/uncond)
    assert passes.rows == [4, 4, 4, 4, 4, 4, 16, 4, 16, 4, 16]
    assert decoder.last_stats.served == 20 - 7 - 4


def test_with_noise_injection(pack, pd, tiny_model, conds, latent):
    """Stashed outputs are the diffusion model's (eps), turned into denoised with the latent each step
    arrives with, so prior noise injection still reaches the solver."""
    schedule = _schedule(pack, tiny_model)
    injection = NoiseInjection(alpha=0.05, tau_cutoff=0.5)
    outputs = {}
    for label, config in (("sequential", {"batched": False}), ("parallel", {})):
        patched, holder = apply_block_cache(
            tiny_model, schedule, options=[injection, pd.ParallelDecoding(enabled=True, **config)])
        decoder = pd.installed_on(holder)
        outputs[label] = sample(patched, *conds, latent)
        assert holder.last_run.figures["noise injection"] == [4, 5, 6, 7]
    _assert_close(outputs["parallel"], outputs["sequential"])
    assert decoder.last_stats.served == 4
    plain, _, _ = _apply(pack, pd, tiny_model, schedule)
    assert not torch.allclose(sample(plain, *conds, latent), outputs["parallel"], rtol=0, atol=1e-3)


def test_another_diffusion_model_wrapper_inside_is_not_given_a_batch(pack, pd, tiny_model, conds, latent):
    schedule = _schedule(pack, tiny_model)
    sequential, _, _ = _apply(pack, pd, tiny_model, schedule, batched=False)
    parallel, _, decoder = _apply(pack, pd, tiny_model, schedule)
    rows = []

    def inner(executor, *args, **kwargs):
        rows.append(int(args[0].shape[0]))
        return executor(*args, **kwargs)

    parallel.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_inner", inner)
    _assert_close(sample(parallel, *conds, latent), sample(sequential, *conds, latent))
    assert rows == [2] * 8 and decoder.last_stats.fallback_reasons == {"inner wrapper": 6}


# -- (2) samplers that evaluate between the schedule's sigmas --------------------------------------------

@pytest.mark.parametrize("sampler", ["dpm_2", "dpmpp_sde"])
def test_midpoint_evaluations_fall_back_to_sequential(pack, pd, tiny_model, conds, latent, sampler, caplog):
    schedule = _schedule(pack, tiny_model, sampler=sampler)
    sequential, _, _ = _apply(pack, pd, tiny_model, schedule, batched=False)
    parallel, _, decoder = _apply(pack, pd, tiny_model, schedule)
    sigmas = record_evaluation_sigmas(parallel)
    expected = sample(sequential, *conds, latent, sampler=sampler)
    with caplog.at_level(logging.INFO), _UNetPasses(tiny_model) as passes:
        out = sample(parallel, *conds, latent, sampler=sampler)
    _assert_close(out, expected)
    stats = decoder.last_stats
    known = set(decoder.last_run.sample_sigmas)
    off_schedule = [s for s in sigmas if not any(abs(s - k) <= 1e-5 * k for k in known)]
    assert off_schedule and stats.fallback_reasons == {"sigma off the schedule": stats.sequential}
    key_evaluations = len(passes.rows) - stats.batched_calls - stats.sequential
    assert stats.sequential + stats.served + stats.batched_calls + key_evaluations == len(sigmas)
    assert stats.batched_calls >= 2 and stats.served > 0
    assert sum("not a step of the schedule" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_heun_evaluates_schedule_sigmas_twice_and_is_served(pack, pd, tiny_model, conds, latent):
    """Heun (s_churn 0) evaluates sigma_i and then sigma_{i+1}: both are schedule sigmas, so even its
    corrector evaluations come from the stash, and the key step's own output serves its repeat."""
    schedule = _schedule(pack, tiny_model, sampler="heun")
    sequential, _, _ = _apply(pack, pd, tiny_model, schedule, batched=False)
    parallel, _, decoder = _apply(pack, pd, tiny_model, schedule)
    sigmas = record_evaluation_sigmas(parallel)
    expected = sample(sequential, *conds, latent, sampler="heun")
    with _UNetPasses(tiny_model) as passes:
        out = sample(parallel, *conds, latent, sampler="heun")
    _assert_close(out, expected)
    assert len(sigmas) == 15 and passes.rows == [2, 6, 2, 6]
    assert (decoder.last_stats.served, decoder.last_stats.sequential) == (11, 0)


# -- (3) batching really happened -----------------------------------------------------------------------

def test_layer_computations_prove_batching(pack, pd, tiny_model, conds, latent):
    schedule = _schedule(pack, tiny_model)
    names = [layer.name for layer in schedule.layers]
    stages = {spec.name: spec.stage for spec in schedule.block_map.layers}
    counts = {}
    for label, config in (("sequential", {"batched": False}), ("parallel", {})):
        patched, _, _ = _apply(pack, pd, tiny_model, schedule, **config)
        with count_layer_computations(tiny_model.model.diffusion_model, names) as seen:
            sample(patched, *conds, latent)
        counts[label] = {name: seen[name] for name in names}
    for name in names:
        if stages[name] == "output":
            assert counts["sequential"][name] == 8 and counts["parallel"][name] == 4, name  # 2 keys + 2 batches
        else:
            assert counts["sequential"][name] == counts["parallel"][name] == len(KEYS), name


def test_conv_in_runs_only_at_key_steps(pack, pd, tiny_model, conds, latent):
    conv_in = tiny_model.model.diffusion_model.input_blocks[0][0]
    schedule = _schedule(pack, tiny_model)
    for config, reused in (({"batched": False}, 6), ({}, 2)):  # sequential: 6 non-key steps; parallel: 2 batches
        patched, _, decoder = _apply(pack, pd, tiny_model, schedule, **config)
        with _CountConv(conv_in) as computed:
            sample(patched, *conds, latent)
        assert computed.calls == len(KEYS), config
        assert decoder.last_stats.conv_in_reused == reused, config


class _CountConv:
    """Counts real computations of a conv: its ``_conv_forward``, wrapped on this instance for the test."""

    def __init__(self, conv):
        self.conv, self.calls = conv, 0

    def __enter__(self):
        original = self.conv._conv_forward

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        self.conv._conv_forward = counted
        return self

    def __exit__(self, *_):
        del self.conv._conv_forward


# -- (4) nothing left behind ----------------------------------------------------------------------------

def _assert_unpatched(model, pd, conds, latent):
    """The loader's model carries nothing of ours, and once it is used again (ComfyUI then unpatches the
    clone it had loaded) its conv_in and layers run their own forward."""
    assert CONV_IN_KEY not in model.object_patches and not model.object_patches
    assert not model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "block_cache")
    out = sample(model, *conds, latent)
    unet = model.model.diffusion_model
    # ComfyUI restores an object patch by setting the attribute back: the module's own bound forward.
    for module in (unet.input_blocks[0][0], *unet.modules()):
        forward = vars(module).get("forward")
        assert forward is None or getattr(forward, "__self__", None) is module, (module, forward)
    assert torch.equal(out, sample(model.clone(), *conds, latent))


def test_nothing_survives_a_run(pack, pd, tiny_model, conds, latent):
    schedule = _schedule(pack, tiny_model)
    parallel, holder, decoder = _apply(pack, pd, tiny_model, schedule)
    out = sample(parallel, *conds, latent)
    assert decoder.last_stats.peak_stash_bytes == 3 * 2 * 4 * 16 * 16 * 4  # 3 steps x cond/uncond x fp32 latent
    finished = decoder.last_run
    assert finished.stash == {} and finished.conv_in_cache == {} and finished.stash_bytes == 0
    assert not finished.active and not runs_holding_tensors(holder)
    _assert_unpatched(tiny_model, pd, conds, latent)
    assert torch.equal(sample(parallel, *conds, latent), out)  # a second run is the same


def test_interrupt_mid_sampling_leaves_no_stash(pack, pd, tiny_model, conds, latent):
    schedule = _schedule(pack, tiny_model)
    parallel, holder, decoder = _apply(pack, pd, tiny_model, schedule)
    expected = sample(parallel, *conds, latent)
    interrupted = parallel.clone()
    interrupt = InterruptAt(4)  # after the batch of steps 1-3 was made at evaluation 2
    stash_sizes = []

    def watch(executor, *args, **kwargs):
        stash_sizes.append(len(run_of(args, kwargs).extension_methods[decoder].stash))
        return executor(*args, **kwargs)

    interrupted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_watch", watch)
    interrupted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_interrupt", interrupt)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(interrupted, *conds, latent)
    assert interrupt.seen == 4 and stash_sizes[-1] > 0, "the stash held steps when the run was interrupted"
    finished = decoder.last_run
    assert finished.stash == {} and finished.conv_in_cache == {} and not finished.active
    assert not runs_holding_tensors(holder)
    assert torch.equal(sample(parallel, *conds, latent), expected)  # the next run is a fresh one
    _assert_unpatched(tiny_model, pd, conds, latent)


# -- option handling ---------------------------------------------------------------------------------------

def test_not_applicable_to_block_caching_schedules(pack, pd, tiny_model, conds, latent, caplog):
    block_map = block_map_for_patcher(tiny_model)
    grid = grid_for_model(tiny_model, 8, "euler", "normal")
    schedule = all_compute_schedule(block_map, grid)
    with caplog.at_level(logging.INFO):
        result, holder = apply_block_cache(
            tiny_model, schedule, options=[pd.ParallelDecoding(enabled=True)])
    assert pd.installed_on(holder) is None
    assert any("parallel decoding was requested but does not apply" in r.getMessage() for r in caplog.records)
    assert not result.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "block_cache")
    assert CONV_IN_KEY not in result.object_patches
    assert torch.equal(sample(result, *conds, latent), sample(tiny_model, *conds, latent))
    shown = ApplyBlockCache.execute(tiny_model, schedule, parallel_decoding=True).ui["text"][0]
    assert "parallel decoding was requested but does not apply" in shown, "the node says so, not only the log"


def test_apply_node_option_is_off_by_default_and_a_second_apply_removes_it(pack, pd, tiny_model, conds, latent):
    node = ApplyBlockCache
    inputs = {i.id: i for i in node.define_schema().inputs}
    assert inputs["parallel_decoding"].default is False and "UNet" in inputs["parallel_decoding"].tooltip
    schedule = _schedule(pack, tiny_model)
    (default,) = node.execute(tiny_model, schedule).result
    assert not default.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "block_cache")
    (on,) = node.execute(tiny_model, schedule, parallel_decoding=True).result
    assert on.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "block_cache")
    assert isinstance(on.object_patches[CONV_IN_KEY], ExtensionLayerForward)
    (again,) = node.execute(on, schedule).result  # a second Apply without the option
    assert not again.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "block_cache")
    assert CONV_IN_KEY not in again.object_patches
    assert torch.equal(sample(again, *conds, latent), sample(default, *conds, latent))
    with pytest.raises(ValueError, match="max_steps"):
        pd.ParallelDecoding(enabled=True, max_steps=-1).validate()
