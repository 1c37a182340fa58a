"""Profiling under the sampler a graph already has (Record Block Changes -> any sampler -> Collect
Block Profile), and two-expert models (Wan 2.2) whose experts each sample one segment, recorded or profiled
by Profile Block Changes (Advanced) so that Build Cache Schedule can measure each segment's schedule."""

from __future__ import annotations

import comfy_extras.nodes_custom_sampler as custom
import nodes as comfy_nodes
import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.fidelity import PSNR_CAP_DB
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.replay import HeldOutRuns, profile_again
from comfyui_block_cache.block_caching.schedule import BuildOptions, build_schedule
from comfyui_block_cache.demo_models import builtin_models as builtin
from comfyui_block_cache.nodes.nodes_demo import LoadDemoModel
from comfyui_block_cache.nodes.nodes_profile import (
    CollectBlockProfile,
    ProfileBlockChanges,
    ProfileBlockChangesAdvanced,
    RecordBlockChanges,
)
from comfyui_block_cache.nodes.nodes_schedule import BuildTargetSchedule
from helpers import count_layer_computations, sample

STEPS = 8
CFG = 5.0
SEED = 7


def _record(pack, model):
    return RecordBlockChanges.execute(model).result


def _collect(pack, recording, latent):
    return CollectBlockProfile.execute(recording, latent).result[1]


def _profile_node(pack, model, conds, latent):
    positive, negative = conds
    result = ProfileBlockChanges.execute(model, SEED, STEPS, CFG, "euler", "normal",
                                                                  positive, negative, latent, 1.0).result
    return result[0], result[1]


def _advanced(model, conds, latent, start, end, add_noise=True, seed=SEED):
    positive, negative = conds
    (out,) = comfy_nodes.KSamplerAdvanced().sample(model, "enable" if add_noise else "disable", seed, STEPS, CFG,
                                                   "euler", "normal", positive, negative, latent, start, end,
                                                   "enable" if end < STEPS else "disable")
    return out


def _profile_advanced(model, conds, latent, start, end, add_noise=True, earlier=None, vae=None):
    positive, negative = conds
    return ProfileBlockChangesAdvanced.execute(model, "enable" if add_noise else "disable", SEED, STEPS, CFG, "euler",
                                               "normal", positive, negative, latent, start, end,
                                               "enable" if end < STEPS else "disable", vae=vae, earlier_segment=earlier)


def _assert_same_change(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert np.isfinite(ours).sum() > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_sampler_custom_advanced_gives_the_profile_node_s_profile(pack, tiny_model, conds, latent):
    expected_latent, expected = _profile_node(pack, tiny_model, conds, latent)
    recording_model, recording = _record(pack, tiny_model)
    positive, negative = conds
    (guider,) = custom.CFGGuider.execute(recording_model, positive, negative, CFG).result
    (sigmas,) = custom.BasicScheduler.execute(recording_model, "normal", STEPS, 1.0).result
    (sampler,) = custom.KSamplerSelect.execute("euler").result
    (noise,) = custom.RandomNoise.execute(SEED).result
    out, _ = custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).result
    assert torch.equal(out["samples"], expected_latent["samples"]), "recording changes nothing"
    profile = _collect(pack, recording, out)
    assert profile.grid.same_as(list(expected.grid.taus)) and profile.grid.sampler == "euler"
    assert profile.grid.cfg == CFG and profile.grid.latent_shape == tuple(latent["samples"].shape)
    _assert_same_change(np.array(profile.change), np.array(expected.change))
    assert profile.layer_flops == expected.layer_flops


def test_a_ksampler_advanced_segment_gives_its_part_of_the_profile(pack, tiny_model, conds, latent):
    _, expected = _profile_node(pack, tiny_model, conds, latent)
    first = _advanced(tiny_model, conds, latent, 0, 3)
    recording_model, recording = _record(pack, tiny_model)
    segment = _collect(pack, recording, _advanced(recording_model, conds, first, 3, STEPS, add_noise=False))
    assert segment.grid.steps == STEPS - 3
    assert segment.grid.same_as(list(expected.grid.taus[3:]))
    assert segment.grid.denoise == pytest.approx(expected.grid.taus[3], abs=1e-4)
    # Where they overlap: the segment's steps after its first (which has no step before it to compare).
    _assert_same_change(np.array(segment.change)[:, 1:], np.array(expected.change)[:, 4:])


def test_collect_without_a_run_says_what_to_connect(pack, tiny_model, latent):
    _, recording = _record(pack, tiny_model)
    with pytest.raises(RuntimeError, match="has not sampled"):
        _collect(pack, recording, latent)


def test_two_experts_each_cached_by_the_schedule_of_its_own_segment(pack, conds, latent):
    """Wan 2.2's layout: a high-noise expert samples steps 0-3, a low-noise expert steps 4-7, in two
    KSamplerAdvanced segments. Each is profiled and scheduled on its own segment."""
    high, low = builtin.build_unet_patcher("tiny", seed=0), builtin.build_unet_patcher("tiny", seed=1)
    split = 4
    recording_high, high_recording = _record(pack, high)
    first = _advanced(recording_high, conds, latent, 0, split)
    recording_low, low_recording = _record(pack, low)
    uncached = _advanced(recording_low, conds, first, split, STEPS, add_noise=False)
    profiles = {"high": _collect(pack, high_recording, first), "low": _collect(pack, low_recording, uncached)}
    assert profiles["high"].grid.steps == split and profiles["low"].grid.steps == STEPS - split
    assert profiles["high"].grid.taus[0] == pytest.approx(1.0) and profiles["low"].grid.taus[0] < 0.6
    schedules = {}
    for name, profile in profiles.items():
        schedule = build_schedule(profile, BuildOptions(threshold=10.0, cache_kinds="all"))
        mask = schedule.compute_mask()
        assert mask[:, 0].all() and not mask.all(), f"the {name} expert's schedule caches within its segment"
        schedules[name] = schedule
    cached = {}
    for name, model in (("high", high), ("low", low)):
        cached[name] = apply_block_cache(model, schedules[name])
    names = [layer.name for layer in schedules["high"].layers]
    with count_layer_computations(high.model.diffusion_model, names) as high_counts, \
            count_layer_computations(low.model.diffusion_model, names) as low_counts:
        first_cached = _advanced(cached["high"][0], conds, latent, 0, split)
        out = _advanced(cached["low"][0], conds, first_cached, split, STEPS, add_noise=False)
    for name, counts in (("high", high_counts), ("low", low_counts)):
        stats = cached[name][1].last_run
        assert not stats.figures["cache"].retimed, "each expert runs exactly the segment its schedule was built on"
        expected = schedules[name].compute_mask().sum(axis=1)
        np.testing.assert_array_equal([counts[n] for n in names], expected)
        np.testing.assert_array_equal(stats.computed, expected)
    assert out["samples"].shape == uncached["samples"].shape and torch.isfinite(out["samples"]).all()
    # A segment's schedule on a whole run: outside its segment every layer computes.
    whole, holder = apply_block_cache(low, schedules["low"])
    sample(whole, *conds, latent, steps=STEPS)
    assert holder.last_run.figures["cache"].retimed
    assert (holder.last_run.computed >= split).all(), "the steps before the low-noise segment compute everything"


SPLIT = 3


def test_profile_advanced_samples_like_ksampler_advanced_and_profiles_its_segment(pack, tiny_model, conds, latent):
    """Exactly KSamplerAdvanced's latents, segment by segment, and the profile Record / Collect gives."""
    first = _profile_advanced(tiny_model, conds, latent, 0, SPLIT)
    (first_latent, first_profile, _) = first.result
    assert torch.equal(first_latent["samples"], _advanced(tiny_model, conds, latent, 0, SPLIT)["samples"])
    (last_latent, last_profile, _) = _profile_advanced(tiny_model, conds, first_latent, SPLIT, STEPS, add_noise=False,
                                                       earlier=first_profile).result
    expected_last = _advanced(tiny_model, conds, first_latent, SPLIT, STEPS, add_noise=False)
    assert torch.equal(last_latent["samples"], expected_last["samples"])
    recording_model, recording = _record(pack, tiny_model)
    recorded = _collect(pack, recording, _advanced(recording_model, conds, first_latent, SPLIT, STEPS,
                                                   add_noise=False))
    assert last_profile.grid.steps == STEPS - SPLIT and last_profile.grid.same_as(list(recorded.grid.taus))
    _assert_same_change(np.array(last_profile.change), np.array(recorded.change))
    assert "validation" not in first.ui["text"][0], "a segment that adds noise has held-out seeds of its own"


def test_a_later_segment_is_sampled_again_from_the_earlier_segment_with_another_seed(pack, tiny_model, conds, latent):
    (first_latent, first_profile, _) = _profile_advanced(tiny_model, conds, latent, 0, SPLIT).result
    (_, profile, _) = _profile_advanced(tiny_model, conds, first_latent, SPLIT, STEPS, add_noise=False,
                                        earlier=first_profile).result
    (replay,) = profile.replays
    assert replay.held_out and not replay.other_step_counts
    other_input = _advanced(tiny_model, conds, latent, 0, SPLIT, seed=SEED + 1)
    expected = _advanced(tiny_model, conds, other_input, SPLIT, STEPS, add_noise=False)
    assert torch.equal(replay.sample(tiny_model, seed_offset=1), expected["samples"])
    assert torch.equal(replay.sample(tiny_model), replay.reference), "seed offset 0 is the profiled run"
    with pytest.raises(ValueError, match="its own 5 steps only"):
        replay.sample(tiny_model, steps=4)
    with pytest.raises(ValueError, match="segment of a split run"):
        profile_again(profile, 4)
    # Without the earlier segment's profile another seed samples the same input: the profiled run itself.
    alone = _profile_advanced(tiny_model, conds, first_latent, SPLIT, STEPS, add_noise=False)
    (alone_replay,) = alone.result[1].replays
    assert not alone_replay.held_out and "this very latent" in alone.ui["text"][0]
    assert torch.equal(alone_replay.sample(tiny_model, seed_offset=1), alone_replay.reference)


def test_an_empty_segment_is_refused_before_sampling(pack, tiny_model, conds, latent):
    with pytest.raises(ValueError, match="are no segment to sample"):
        _profile_advanced(tiny_model, conds, latent, 5, 3)


def test_an_earlier_segment_of_another_run_is_refused(pack, tiny_model, conds, latent):
    (first_latent, first_profile, _) = _profile_advanced(tiny_model, conds, latent, 0, SPLIT).result
    with pytest.raises(ValueError, match="not of the run that made this latent"):
        _profile_advanced(tiny_model, conds, {"samples": first_latent["samples"] + 1.0}, SPLIT, STEPS,
                          add_noise=False, earlier=first_profile)


def test_build_measures_each_segment_s_schedule(pack, tiny_model, conds, latent):
    """Build Cache Schedule validates a segment's schedule on other seeds (held-out pictures through the earlier
    segment), and says that fewer steps cannot be compared there."""
    (first_latent, first_profile, _) = _profile_advanced(tiny_model, conds, latent, 0, SPLIT).result
    (_, profile, _) = _profile_advanced(tiny_model, conds, first_latent, SPLIT, STEPS, add_noise=False,
                                        earlier=first_profile).result
    result = BuildTargetSchedule.execute(profile, 2.0, "auto", "all", 1, 0, 0, "measure PSNR", 0.0, "compare")
    schedule, text = result.result[0], result.ui["text"][0]
    assert schedule.grid.steps == STEPS - SPLIT and not schedule.compute_mask().all()
    assert "chosen: " in text and "latent PSNR" in text
    assert "fewer steps were not compared: this profile is of a segment" in text
    assert "validation read the profiled run itself" not in text
    high = BuildTargetSchedule.execute(first_profile, 2.0, "auto", "all", 1, 0, 0, "measure PSNR", 0.0, "compare")
    assert "ends with leftover noise" in high.ui["text"][0], "a noisy segment's latent PSNR is said to read high"
    assert "ends with leftover noise" not in text
    measured = HeldOutRuns(profile.replays).schedule(schedule)
    assert len(measured.pictures) == 1 and 5.0 < measured.mean < 100.0


def test_with_a_vae_the_last_segment_is_measured_on_pictures_and_a_noisy_one_on_latents(pack):
    """The VAE decodes the last segment's held-out runs (pictures are compared); a segment that ends with leftover
    noise keeps comparing latents, and the node says it does not use the VAE there."""
    model, positive, negative, vae = LoadDemoModel.execute("reference", 0, "a small blue ring", "").result
    conds, latent = (positive, negative), {"samples": torch.zeros(1, 3, 32, 32)}
    first = _profile_advanced(model, conds, latent, 0, SPLIT, vae=vae)
    (first_latent, first_profile, _) = first.result
    assert first_profile.replays[0].metric == "latent" and "the VAE is not used" in first.ui["text"][0]
    last = _profile_advanced(model, conds, first_latent, SPLIT, STEPS, add_noise=False, earlier=first_profile, vae=vae)
    (last_latent, last_profile, _) = last.result
    (replay,) = last_profile.replays
    assert replay.metric == "picture" and "the VAE is not used" not in last.ui["text"][0]
    (decoded,) = comfy_nodes.VAEDecode().decode(vae, last_latent)
    pictures, peak = replay.pictures(last_latent["samples"])
    assert peak == 1.0 and torch.equal(pictures, decoded.movedim(-1, 1).float().clamp(0, 1))
    all_compute = build_schedule(last_profile, BuildOptions(threshold=0.0))
    assert HeldOutRuns(last_profile.replays).schedule(all_compute).mean == PSNR_CAP_DB, "all-compute is uncached, exactly"
