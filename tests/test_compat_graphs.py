"""Block Cache in awkward graph shapes (one patched model in two samplers, bypassed or repeated
Apply, clones), and on cancellation and over many runs (nothing left behind, no memory growth).

Where it is defined, an all-compute schedule must give exactly the output of the same graph without
Block Cache; a caching schedule must cache and keep the other feature working. The ``schedules``
fixture (conftest.py) is (all-compute, caching) from a real profile of the tiny UNet.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.patcher_extension
import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.nodes.nodes_profile import CollectBlockProfile, RecordBlockChanges
from helpers import (
    InterruptAt,
    count_layer_computations,
    has_block_cache,
    live_tensor_bytes,
    run_of,
    runs_holding_tensors,
    sample,
)

WrappersMP = comfy.patcher_extension.WrappersMP


# -- graph shapes -------------------------------------------------------------------------------

def test_one_patched_model_in_two_samplers_gives_the_same_result_twice(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    patched, holder = apply_block_cache(tiny_model, caching)
    first = sample(patched, *conds, latent)
    first_stats = holder.last_run
    second = sample(patched, *conds, latent)
    assert torch.equal(first, second)
    np.testing.assert_array_equal(first_stats.computed, holder.last_run.computed)


def test_bypassed_apply_leaves_no_caching_behind(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    reference = sample(tiny_model, *conds, latent)
    patched, holder = apply_block_cache(tiny_model, caching)
    sample(patched, *conds, latent)
    # The next graph has the Apply node bypassed: the loader's model goes straight to the sampler.
    names = [layer.name for layer in caching.layers]
    with count_layer_computations(tiny_model.model.diffusion_model, names) as counts:
        assert torch.equal(sample(tiny_model, *conds, latent), reference)
    assert all(counts[name] == 8 for name in names)
    assert not has_block_cache(tiny_model)


def test_two_applies_on_clones_of_one_model_do_not_share_state(pack, tiny_model, conds, latent, schedules):
    all_compute, caching = schedules
    exact, exact_holder = apply_block_cache(tiny_model, all_compute)
    cached, cached_holder = apply_block_cache(tiny_model, caching)
    reference = sample(tiny_model, *conds, latent)
    cached_out = sample(cached, *conds, latent)
    assert torch.equal(sample(exact, *conds, latent), reference)
    assert torch.equal(sample(cached, *conds, latent), cached_out)
    assert exact_holder.last_run.reused.sum() == 0 and cached_holder.last_run.reused.sum() > 0
    assert exact_holder is not cached_holder


def test_second_apply_on_a_patched_model_replaces_the_first(pack, tiny_model, conds, latent, schedules, caplog):
    all_compute, caching = schedules
    with caplog.at_level(logging.WARNING):
        twice, holder = apply_block_cache(
            apply_block_cache(tiny_model, caching)[0], all_compute)
    assert torch.equal(sample(twice, *conds, latent), sample(tiny_model, *conds, latent))
    assert holder.last_run.reused.sum() == 0
    assert "Block Cache replaces the Block Cache this model already had" in caplog.text


def test_apply_between_record_and_collect_says_it_replaced_the_recording(pack, tiny_model, conds, latent,
                                                                          schedules, caplog):
    _, caching = schedules
    recorded, recording = RecordBlockChanges.execute(tiny_model).result
    with caplog.at_level(logging.WARNING):
        patched, _ = apply_block_cache(recorded, caching)
    assert "replaces the Block Cache profiler this model already had" in caplog.text
    out = {"samples": sample(patched, *conds, latent)}
    with pytest.raises(RuntimeError, match="profile first, then apply"):
        CollectBlockProfile.execute(recording, out)


# -- cancellation and memory ----------------------------------------------------------------------

def test_interrupt_mid_sampling_leaves_nothing_behind(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    clean, _ = apply_block_cache(tiny_model, caching)
    expected = sample(clean, *conds, latent)
    patched, holder = apply_block_cache(tiny_model, caching)
    interrupted = patched.clone()
    interrupt = InterruptAt(4)
    runs = []

    def keep_run(executor, *args, **kwargs):
        runs.append(run_of(args, kwargs))
        return executor(*args, **kwargs)

    interrupted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_interrupt", interrupt)
    interrupted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_keep_run", keep_run)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(interrupted, *conds, latent)
    assert interrupt.seen == 4 and runs[-1] is not None
    assert not runs_holding_tensors(holder), "the run state must be dropped"
    assert runs[-1].layer_method.cache == {}, "the interrupted run's cached tensors must be freed"
    # The next run with the same patched model is clean: exactly a fresh model's result.
    assert torch.equal(sample(patched, *conds, latent), expected)
    # And the loader's model is unpatched again.
    assert torch.equal(sample(tiny_model, *conds, latent), sample(tiny_model.clone(), *conds, latent))


def test_no_memory_growth_over_twenty_runs(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    patched, holder = apply_block_cache(tiny_model, caching)
    sample(patched, *conds, latent)

    before = live_tensor_bytes()
    peaks = []
    for _ in range(20):
        sample(patched, *conds, latent)
        peaks.append(holder.last_run.figures["cache"].peak_cache_bytes)
    after = live_tensor_bytes()
    assert len(set(peaks)) == 1 and peaks[0] > 0, "every run caches the same amount"
    assert after - before <= 0, f"{after - before} bytes of tensors stayed alive after 20 runs"
