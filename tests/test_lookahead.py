"""Step lookahead (block_caching/lookahead.py) on the trained transformer reference model: exactness, what it
runs, its figures, its refusals, and its schedule files."""

from __future__ import annotations

import dataclasses
import importlib
import logging

import comfy.patcher_extension
import pytest
import torch
from comfy_bootstrap import PACK_MODULE
from comfyui_block_cache.block_caching.lookahead import lookahead_runs_with, lookahead_schedule
from comfyui_block_cache.block_caching.patching import apply_block_cache, attach_profiler, collect_profile
from comfyui_block_cache.block_caching.replay import HeldOutValidation, Measurement
from comfyui_block_cache.block_caching.run_summary import run_speedup_estimate
from comfyui_block_cache.block_caching.target_build import ExpectedPsnr, TargetBuild, TargetOptions
from comfyui_block_cache.block_caching.target_ladder import evenly_spread_steps
from comfyui_block_cache.block_caching.target_lookahead import (
    EQUAL_COST,
    LOOKAHEAD_READS_HIGH_DB,
    choose_lookahead,
    ladder_placements,
)
from comfyui_block_cache.block_caching.target_schedule import build_target_schedule
from comfyui_block_cache.errors import ScheduleFormatError, ScheduleMismatchError
from comfyui_block_cache.nodes.nodes_apply import ApplyBlockCache
from comfyui_block_cache.nodes.nodes_profile import ProfileBlockChanges
from comfyui_block_cache.nodes.nodes_schedule import BuildTargetSchedule
from comfyui_block_cache.schedule_files.schema import (
    schedule_from_dict,
    schedule_from_json,
    schedule_to_dict,
    schedule_to_json,
)
from helpers import count_layer_computations, sample

reference_dit = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_dit")
reference_data = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_data")

STEPS = 6
PLANNED = (0, 3, 5)


@pytest.fixture(scope="module")
def reference():
    return reference_dit.load_reference_dit()


@pytest.fixture(scope="module")
def run(pack, reference):
    conds = reference.conditioning_batch(reference_data.benchmark_prompts(2, seed=77)), reference.conditioning("")
    latent = reference_dit.empty_latent(2)
    plain = sample(reference.patcher, *conds, latent, steps=STEPS, scheduler="simple", seed=5)
    profiling, holder = attach_profiler(reference.patcher)
    sample(profiling, *conds, latent, steps=STEPS, scheduler="simple", seed=5)
    profile = collect_profile(holder, reference.patcher, scheduler="simple")
    return conds, latent, plain, profile


def by_hand(model, planned: tuple[int, ...]):
    """The lookahead written out apart from the pack: a PREDICT_NOISE wrapper on the sigmas it is called with."""
    state: dict = {}

    def predict_noise(executor, x, timestep, model_options, seed):
        sigmas = [float(v) for v in model_options["transformer_options"]["sample_sigmas"]]
        sigma = float(timestep.reshape(-1)[0])
        step = min(range(len(sigmas) - 1), key=lambda i: abs(sigmas[i] - sigma))
        known, ahead = state.get("known"), state.get("ahead")
        if ahead is None and (known is None or step in planned):
            denoised = executor(x, timestep, model_options, seed)
            state["known"] = (step, sigma, (x - denoised) / sigma, denoised)
            return denoised
        if ahead is None:
            target = next((p for p in planned if p > step), len(sigmas) - 2)
            predicted = x + (sigmas[target] - sigma) * known[2]
            denoised = executor(predicted, torch.full_like(timestep, sigmas[target]), model_options, seed)
            ahead = state["ahead"] = (target, sigmas[target], (predicted - denoised) / sigmas[target], denoised)
        if step >= ahead[0]:
            state["known"], state["ahead"] = ahead, None
            return ahead[3]
        share = (sigma - known[1]) / (ahead[1] - known[1])
        return known[3] + share * (ahead[3] - known[3])

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "by_hand", predict_noise)
    return patched


def test_every_step_planned_is_the_uncached_model_bit_for_bit(pack, reference, run):
    conds, latent, plain, profile = run
    patched, holder = apply_block_cache(reference.patcher, lookahead_schedule(profile, tuple(range(STEPS))))
    assert torch.equal(sample(patched, *conds, latent, steps=STEPS, scheduler="simple", seed=5), plain)
    figures = holder.last_run.figures["lookahead"]
    assert figures.model_calls == STEPS and figures.interpolated == 0 and not figures.off
    assert holder.last_run.unevaluated == 0


# cfg 1, as Flux dev runs: ComfyUI skips the negative prompt, so each model call is the positive batch alone.
@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_runs_the_model_at_the_planned_steps_only_and_interpolates_the_rest(pack, reference, run, cfg):
    conds, latent, plain, profile = run
    if cfg != 5.0:  # the fixture's uncached run is at the default cfg
        plain = sample(reference.patcher, *conds, latent, steps=STEPS, cfg=cfg, scheduler="simple", seed=5)
    schedule = lookahead_schedule(profile, PLANNED)
    assert schedule.estimated_speedup == pytest.approx(STEPS / len(PLANNED))
    assert schedule.evaluated_mask().sum(axis=0).astype(bool).tolist() == [s in PLANNED for s in range(STEPS)]
    patched, holder = apply_block_cache(reference.patcher, schedule)
    names = [layer.name for layer in schedule.layers]
    with count_layer_computations(reference.patcher.model.diffusion_model, names) as counts:
        out = sample(patched, *conds, latent, steps=STEPS, cfg=cfg, scheduler="simple", seed=5)
    assert {counts[name] for name in names} == {len(PLANNED)}  # cond and uncond (if any) run as one batch
    expected = sample(by_hand(reference.patcher, PLANNED), *conds, latent, steps=STEPS, cfg=cfg, scheduler="simple",
                      seed=5)
    assert torch.equal(out, expected)
    assert not torch.equal(out, plain)
    stats = holder.last_run
    assert stats.evaluations == STEPS and stats.unevaluated == STEPS - len(PLANNED)
    figures = stats.figures["lookahead"]
    assert figures.model_calls == len(PLANNED) and figures.interpolated == STEPS - len(PLANNED)
    assert sorted(figures.evaluated_steps) == list(PLANNED)
    assert run_speedup_estimate(holder, stats) == pytest.approx(STEPS / len(PLANNED))


def test_a_sampler_that_evaluates_twice_per_step_computes_every_step_and_says_so(pack, reference, run, caplog):
    conds, latent, _, profile = run
    plain = sample(reference.patcher, *conds, latent, steps=STEPS, scheduler="simple", seed=5, sampler="heun")
    patched, holder = apply_block_cache(reference.patcher, lookahead_schedule(profile, PLANNED))
    with caplog.at_level(logging.WARNING):
        out = sample(patched, *conds, latent, steps=STEPS, scheduler="simple", seed=5, sampler="heun")
    assert torch.equal(out, plain)
    assert "heun" in holder.last_run.figures["lookahead"].off
    assert any("lookahead off" in record.getMessage() for record in caplog.records)


def test_another_step_count_moves_the_planned_steps_keeping_their_density(pack, reference, run):
    conds, latent, _, profile = run
    patched, holder = apply_block_cache(reference.patcher, lookahead_schedule(profile, PLANNED))
    sample(patched, *conds, latent, steps=2 * STEPS, scheduler="simple", seed=5)
    figures = holder.last_run.figures["lookahead"]
    assert figures.planned[0] == 0 and len(figures.planned) == 2 * len(PLANNED)
    assert figures.model_calls == len(figures.planned) and not figures.off


def test_schedule_file_round_trip_and_refusals(pack, run):
    profile = run[3]
    schedule = lookahead_schedule(profile, PLANNED)
    document = schedule_to_dict(schedule)
    assert document["version"] == 4 and document["lookahead_steps"] == list(PLANNED)
    assert document["estimate"]["computed"] == len(PLANNED) * len(schedule.layers)
    loaded = schedule_from_json(schedule_to_json(schedule))
    assert loaded.lookahead_steps == PLANNED and loaded.fingerprint == schedule.fingerprint
    assert loaded.fingerprint != lookahead_schedule(profile, tuple(range(STEPS))).fingerprint
    for steps in ([1, 3], [0, 3, 3], [0, STEPS], []):
        with pytest.raises(ScheduleFormatError, match="lookahead_steps"):
            schedule_from_dict({**document, "lookahead_steps": steps})
    reusing = dataclasses.replace(schedule, layers=(dataclasses.replace(schedule.layers[0], compute=(
        True, False, *([True] * (STEPS - 2)))), *schedule.layers[1:]))
    with pytest.raises(ScheduleFormatError, match="computes every layer"):
        schedule_from_dict(schedule_to_dict(reusing))
    with pytest.raises(ScheduleMismatchError, match="lookahead"):
        apply_block_cache(None, reusing)
    with pytest.raises(ValueError, match="increase from 0"):
        lookahead_schedule(profile, (1, 4))


class FakeRuns:
    """Held-out runs whose readings are set per schedule: a lookahead of n model calls reads ``of_count(n)``, or
    ``of_steps(planned)`` where given, once the builder has lowered it by what held-out seeds read too high (the
    run reads it ``reads_high`` higher)."""

    def __init__(self, of_count, cache_reading: float = 31.0, of_steps=None,
                 reads_high: float = LOOKAHEAD_READS_HIGH_DB) -> None:
        self.of_count = of_count
        self.of_steps = of_steps
        self.reads_high = reads_high
        self.cache_reading = cache_reading
        self.planned: list[tuple[int, ...]] = []
        self.fewer: list[int] = []

    @property
    def measured(self) -> list[int]:
        return [len(planned) for planned in self.planned]

    def schedule(self, schedule):
        planned = schedule.lookahead_steps
        self.planned.append(planned)
        reading = self.of_steps(planned) if self.of_steps else self.of_count(len(planned))
        return Measurement((reading + self.reads_high,) * 4, min_sd=0.0)

    def fewer_steps(self, steps):
        self.fewer.append(steps)
        return Measurement((29.0,) * 4, min_sd=0.0)


def cache_schedule(profile, speedup: float, psnr: float | None, values: tuple[float, ...] = ()):
    """A cache schedule for ``speedup`` whose build records ``psnr`` (and ``values``) as measured on both seeds."""
    schedule = build_target_schedule(profile, TargetOptions(speedup=speedup))
    build = TargetBuild.of(schedule)
    measured = None if psnr is None else ExpectedPsnr(psnr, psnr - 1, psnr + 1, 8, values)
    return dataclasses.replace(schedule, builder=dataclasses.replace(build, expected_psnr=measured).to_json())


def validation_of(first, second):
    return HeldOutValidation(first, second, "picture")


def placements(cache, count: int) -> list[tuple[int, ...]]:
    """The lookahead steps of ``count`` calls the builder measures: the even spread, then the ladder's others."""
    even = evenly_spread_steps(STEPS, count)
    return [even, *(p for p in ladder_placements(STEPS, count, TargetBuild.of(cache)) if p != even)]


def test_the_builder_walks_lookahead_counts_up_to_the_floor_while_faster_than_the_cache(pack, run):
    profile = dataclasses.replace(run[3], grid=dataclasses.replace(run[3].grid, sampler="euler"))
    cache = cache_schedule(profile, 1.5, 31.0)
    # The reading grows with the model calls: 2 calls 20 dB, 3 calls 32 dB.
    first, second = FakeRuns(lambda n: {2: 20.0, 3: 32.0}.get(n, 40.0)), FakeRuns(lambda n: 32.0)
    options = TargetOptions(speedup=3.0, min_psnr=30.0)
    schedule, lines = choose_lookahead(profile, options, validation_of(first, second), cache, True)
    assert first.planned == [*placements(cache, 2), *placements(cache, 3)], "each count's placements, once each"
    assert len(placements(cache, 3)) == 2 and second.measured == [3], "the second seed reads what passed the first"
    assert schedule.lookahead_steps == evenly_spread_steps(STEPS, 3) == (0, 2, 5), "a tie keeps the even spread"
    build = TargetBuild.of(schedule)
    assert build.lookahead.steps == (0, 2, 5) and build.lookahead.instead_of_speedup == cache.estimated_speedup
    assert build.expected_psnr.mean == pytest.approx(32.0) and build.expected_psnr.pictures == 8
    assert second.fewer == [3] and build.fewer_steps.steps == 3 and not build.fewer_steps.better
    assert any(line.startswith("USING LOOKAHEAD: lookahead at 3 of 6 steps") for line in lines)
    assert lookahead_schedule(profile, (0, 2, 5)).fingerprint == schedule.fingerprint
    # Below the floor down to the cache's own cost: the cache stays, and the lines say what was tried.
    first = FakeRuns(lambda n: 20.0)
    kept, lines = choose_lookahead(profile, options, validation_of(first, FakeRuns(lambda n: 20.0)), cache, True)
    walked = [n for n in range(2, STEPS) if STEPS / n >= EQUAL_COST * cache.estimated_speedup]
    assert len(walked) >= 2 and kept is cache, "no slower than the cache's cost"
    assert first.planned == [planned for n in walked for planned in placements(cache, n)]
    assert sum(line.startswith("tried: lookahead") for line in lines) == len(walked) and "kept Block" in lines[-1]


def test_of_each_count_the_placement_the_held_out_seed_reads_higher_is_taken(pack, run):
    profile = dataclasses.replace(run[3], grid=dataclasses.replace(run[3].grid, sampler="euler"))
    cache = cache_schedule(profile, 1.5, 31.0)
    even, ladder = placements(cache, 3)
    assert ladder == tuple(sorted({0, *ladder, STEPS - 1})), "the ladder's steps run the first and last steps"
    first = FakeRuns(None, of_steps=lambda planned: 33.0 if planned == ladder else 31.0)
    options = TargetOptions(speedup=2.0, min_psnr=30.0)
    schedule, lines = choose_lookahead(profile, options, validation_of(first, FakeRuns(lambda n: 33.0)), cache, False)
    assert schedule.lookahead_steps == ladder and TargetBuild.of(schedule).lookahead.steps == ladder
    tried = next(line for line in lines if line.startswith("tried: lookahead at 3 of 6"))
    assert f"at the ladder's steps, 33.0 dB on both held-out seeds less {LOOKAHEAD_READS_HIGH_DB:g} dB" in tried
    assert "(held-out seed: steps spread evenly 31.0 dB, the ladder's steps 33.0 dB)" in tried
    # Read as measured, the lookahead would hold the floor; lowered by what held-out seeds read too high, not.
    assert LOOKAHEAD_READS_HIGH_DB > 0.5
    unlowered = FakeRuns(lambda n: 30.5, reads_high=0.0)
    kept, _ = choose_lookahead(profile, options, validation_of(unlowered, unlowered), cache, False)
    assert kept is cache and unlowered.measured


def test_without_a_floor_the_target_cost_lookahead_is_taken_only_when_measured_closer(pack, run):
    profile = dataclasses.replace(run[3], grid=dataclasses.replace(run[3].grid, sampler="euler"))
    cache = cache_schedule(profile, 2.0, 31.0)
    options = TargetOptions(speedup=2.0)
    for reading, taken in ((35.0, True), (28.0, False)):
        first = FakeRuns(lambda n, r=reading: r)
        schedule, _ = choose_lookahead(profile, options, validation_of(first, FakeRuns(lambda n, r=reading: r)),
                                       cache, False)
        assert first.planned == placements(cache, 3) and (schedule is not cache) == taken
        assert TargetBuild.of(schedule).fewer_steps is None or not taken
    # At about the cache's cost a higher mean is not enough: the paired gain must exceed the pictures' noise.
    values = (27.0, 35.0) * 4
    noisy = cache_schedule(profile, 2.0, 31.0, values)
    assert EQUAL_COST * STEPS / 3 < noisy.estimated_speedup, "3 model calls are not clearly faster than the cache"
    for pictures, taken in (((31.5,) * 8, False), ((36.0,) * 8, True)):
        runs = FakeRuns(lambda n, p=pictures: p[0])
        schedule, lines = choose_lookahead(profile, options, validation_of(runs, FakeRuns(lambda n, p=pictures: p[0])),
                                           noisy, False)
        assert (schedule is not noisy) == taken, lines
    assert "not clearly closer" in choose_lookahead(
        profile, options, validation_of(FakeRuns(lambda n: 31.5), FakeRuns(lambda n: 31.5)), noisy, False)[1][-1]
    heun = dataclasses.replace(profile, grid=dataclasses.replace(profile.grid, sampler="heun"))
    kept, lines = choose_lookahead(heun, options, validation_of(FakeRuns(lambda n: 99.0), FakeRuns(lambda n: 99.0)),
                                   cache, False)
    assert kept is cache and "heun" in lines[0] and "not tried" in lines[0]
    assert [lookahead_runs_with(name) for name in ("ddim", "uni_pc", "euler", "heun", "euler_cfg_pp")] == [
        True, True, True, False, False], "KSampler's names as a profile records them"


def test_build_node_measures_the_lookahead_beside_the_cache_and_says_which_it_outputs(pack, reference):
    positive = reference.conditioning_batch(reference_data.benchmark_prompts(1, seed=55))
    negative = reference.conditioning("")
    latent = reference_dit.empty_latent(1)
    _, profile, _ = ProfileBlockChanges.execute(reference.patcher, 3, 8, 5.0, "euler", "simple", positive, negative,
                                                latent, 1.0).result
    result = BuildTargetSchedule.execute(profile, 2.0, "auto", "all", 1, 0, 0, "measure PSNR", 0.0, "compare",
                                         "use when better")
    schedule, _, document, steps = result.result
    text = result.ui["text"][0]
    assert "tried: lookahead at 4 of 8 steps (2.00x) at " in text and steps == 8
    assert bool(schedule.lookahead_steps) == ("USING LOOKAHEAD" in text) == ('"lookahead_steps"' in document)
    if schedule.lookahead_steps:
        assert text.splitlines()[1].startswith("lookahead: the model runs at steps")
    assert "estimated speed-up" in text.splitlines()[0]
    patched = ApplyBlockCache.execute(reference.patcher, schedule).result[0]
    sample(patched, positive, negative, latent, steps=8, scheduler="simple", seed=9)
    off = BuildTargetSchedule.execute(profile, 2.0, "auto", "all", 1, 0, 0, "measure PSNR", 0.0, "off", "off")
    assert "lookahead" not in off.ui["text"][0] and not off.result[0].lookahead_steps
    unvalidated = BuildTargetSchedule.execute(profile, 2.0, "auto", "all", 1, 0, 0, "off", 0.0)
    assert "lookahead not tried: it needs validation" in unvalidated.ui["text"][0]
