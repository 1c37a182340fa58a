"""The speed-up target builder: its search is exact, its schedules reach the target, and the node works."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import pytest
import torch
from comfyui_block_cache.block_caching import replay as replay_module
from comfyui_block_cache.block_caching import target_build, target_floor, target_ladder
from comfyui_block_cache.block_caching import target_schedule as target
from comfyui_block_cache.block_caching.profile import merge_profiles
from comfyui_block_cache.block_caching.replay import HeldOutRuns
from comfyui_block_cache.block_caching.schedule import all_compute_schedule
from comfyui_block_cache.block_caching.target_build import TargetOptions
from comfyui_block_cache.block_caching.target_outcome import FEWER_STEPS_CHOICES, build_for_node
from comfyui_block_cache.block_caching.target_schedule import build_combined_schedule, build_target_schedule
from comfyui_block_cache.block_maps.block_map import ReuseMode
from comfyui_block_cache.demo_models.builtin_models import build_unet_patcher, prompt_conditioning
from comfyui_block_cache.errors import ScheduleBuildError
from comfyui_block_cache.nodes.frontend import ladder_payload
from comfyui_block_cache.nodes.nodes_apply import ApplyBlockCache
from comfyui_block_cache.nodes.nodes_profile import ProfileBlockChanges
from comfyui_block_cache.nodes.nodes_schedule import BuildTargetSchedule
from comfyui_block_cache.schedule_files.schema import (
    profile_from_dict,
    profile_to_dict,
    schedule_from_json,
    schedule_to_json,
)
from helpers import profile_by_sampling


class TableModel:
    """An error model with arbitrary (seeded) errors per (step, history): the search must be exact on any."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.values: dict[tuple[int, tuple[int, ...]], float] = {}

    def error(self, step: int, history: tuple[int, ...]) -> float:
        key = (step, history)
        if key not in self.values:
            self.values[key] = self.rng.choice([0.0, 0.5, 1.0, self.rng.random(), self.rng.expovariate(0.3)])
        return self.values[key]


def brute_force(model: TableModel, steps: int, order: int, forced: list[bool], max_gap: int) -> dict[int, float]:
    best: dict[int, float] = {}
    for size in range(1, steps + 1):
        for rest in itertools.combinations(range(1, steps), size - 1):
            chosen = (0, *rest)
            if any(forced[s] and s not in chosen for s in range(steps)):
                continue
            gaps = [b - a for a, b in zip(chosen, (*chosen[1:], steps), strict=True)]
            if max(gaps) > max_gap:
                continue
            cost = 0.0
            for s in range(steps):
                if s in chosen:
                    continue
                history = tuple(c for c in reversed(chosen) if c < s)[: order + 1]
                cost += model.error(s, history)
            best[size] = min(best.get(size, math.inf), cost)
    return best


@pytest.mark.parametrize("seed,steps,order,first,last,max_gap", [
    (0, 7, 0, 1, 0, 7), (1, 8, 1, 1, 0, 3), (2, 8, 2, 2, 1, 4), (3, 9, 1, 1, 2, 9), (4, 6, 2, 1, 0, 2),
])
def test_search_finds_the_least_error_for_every_count(pack, seed, steps, order, first, last, max_gap):
    model = TableModel(seed)
    forced = [s < first or s >= steps - last for s in range(steps)]
    found = target_ladder.best_schedules(model, steps, order, forced, max_gap)
    expected = brute_force(model, steps, order, forced, max_gap)
    assert set(found) == set(expected)
    for count, (cost, chosen) in found.items():
        assert cost == pytest.approx(expected[count], abs=1e-12), count
        assert len(chosen) == count and chosen[0] == 0 and list(chosen) == sorted(set(chosen))
        assert all(s in chosen for s in range(steps) if forced[s])


@pytest.fixture(scope="module")
def profiled(pack):
    model = build_unet_patcher("tiny", seed=0)
    prompt = prompt_conditioning
    conds = prompt("a red square", 32), prompt("blurry", 32)
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    profile, _ = profile_by_sampling(pack, model, conds, latent, steps=12)
    return model, conds, latent, profile


def test_profile_trajectory_and_step_weights(profiled):
    *_, profile = profiled
    trajectory = profile.trajectory
    assert trajectory is not None and len(trajectory.step_weights) == 12
    assert all(w > 0 for w in trajectory.step_weights)
    for sketch, norms in zip(trajectory.sketches, trajectory.output_norms, strict=True):
        # 12 steps x (2 pictures x cond/uncond) samples; tiny layers are kept whole
        assert sketch.shape[:2] == (12, 4) and norms.shape == (12, 4) and (norms > 0).all()


@pytest.mark.parametrize("speedup", [1.0, 1.5, 2.5, 4.0])
def test_schedules_reach_the_target_and_compute_in_step(pack, profiled, speedup):
    *_, profile = profiled
    schedule = target.build_target_schedule(profile, target_build.TargetOptions(speedup=speedup))
    assert schedule.flop_fraction <= 1.0 / speedup + 1e-9
    builder = schedule.builder
    assert builder["method"] == "speedup_target" and builder["reached"]
    text = schedule_to_json(schedule)
    assert schedule_from_json(text).layers == schedule.layers
    assert schedule_from_json(text).builder == json.loads(json.dumps(builder)), "the builder's record round-trips"
    if speedup == 1.0:
        assert schedule.compute_mask().all()
        return
    steps = schedule.grid.steps
    full = tuple(s in builder["compute_steps"] for s in range(steps))
    partial = builder["chosen_partial"]
    cached = [i for i, layer in enumerate(schedule.layers) if layer.name in builder["cached_layers"]]
    for index in cached:
        # Every cached layer computes at the rung's steps; a fine rung's partial layers skip its one step.
        expected = list(full)
        if partial is not None and index in partial["layers"]:
            expected[partial["step"]] = False
        assert schedule.layers[index].compute == tuple(expected), schedule.layers[index].name
        assert schedule.layers[index].forecast_order == builder["chosen_order"]
    assert all(all(layer.compute) for i, layer in enumerate(schedule.layers) if i not in cached)
    # The slowest rung that still reaches the target: every slower rung of the ladder misses it.
    slower = [r for r in builder["ladder"] if r["flop_fraction"] > schedule.flop_fraction + 1e-12]
    assert all(r["flop_fraction"] > 1.0 / speedup for r in slower)


def test_fine_rungs_lie_between_the_whole_step_rungs(pack, profiled):
    """Each fine rung reuses a run of neighbouring cached layers at one unforced compute step of a whole-step
    rung: its FLOPs lie between that rung's and one step fewer, and it keeps the gap limit."""
    *_, profile = profiled
    options = target_build.TargetOptions(always_compute_first=2, max_consecutive_reuse=3)
    found = target_ladder.search(profile, options)
    whole = target_ladder.whole_step_ladder(found, profile)
    ladder = target_ladder.ladder_of(found, profile)
    fine = [rung for rung in ladder if rung.partial is not None]
    assert fine and len(ladder) == len(whole) + len(fine)
    assert [r.flop_fraction for r in ladder] == sorted(r.flop_fraction for r in ladder)
    by_count = {rung.computes: rung for rung in whole}
    # One step of every cached layer: computing at step 0 only leaves steps - 1 of them out.
    first_step_only = target_ladder.Rung(1, (0,), 0, 0.0, 0.0)
    only_first = target_ladder.with_flop_fraction(profile, found.layers, first_step_only).flop_fraction
    step_share = (1.0 - only_first) / (profile.grid.steps - 1)
    sizes = {len(rung.partial.layers) for rung in fine}
    assert sizes <= {round(len(found.layers) / 3), round(2 * len(found.layers) / 3)}
    for rung in fine:
        base = by_count[rung.computes]
        assert rung.steps == base.steps and rung.order == base.order
        assert base.flop_fraction - step_share - 1e-12 < rung.flop_fraction < base.flop_fraction
        assert rung.partial.step in base.steps and not found.forced[rung.partial.step]
        window = rung.partial.layers
        # Only layers that reuse their residual: one reused whole would discard what was computed before it.
        assert all(ReuseMode.RESIDUAL in profile.block_map.layers[i].reuse_modes for i in window)
        assert list(window) == found.layers[found.layers.index(window[0]):found.layers.index(window[0]) + len(window)]
        schedule = target_ladder.rung_schedule(profile, found.layers, rung, {})
        assert schedule.flop_fraction == pytest.approx(rung.flop_fraction, abs=1e-12)
        for index in window:
            row = schedule.layers[index].compute
            gaps = [b - a for a, b in itertools.pairwise([s for s, c in enumerate(row) if c] + [len(row)])]
            assert max(gaps) <= found.max_gap



def test_options_shape_the_schedule(pack, profiled):
    *_, profile = profiled
    build = target.build_target_schedule
    protected = build(profile, target_build.TargetOptions(speedup=2.0, always_compute_first=3, always_compute_last=2))
    steps = protected.builder["compute_steps"]
    assert {0, 1, 2, 10, 11} <= set(steps)
    capped = build(profile, target_build.TargetOptions(speedup=2.0, max_consecutive_reuse=1))
    chosen = capped.builder["compute_steps"]
    assert max(b - a for a, b in zip(chosen, [*chosen[1:], 12], strict=True)) <= 2
    zero = build(profile, target_build.TargetOptions(speedup=2.0, forecast_order=0))
    assert zero.builder["chosen_order"] == 0
    attention = build(profile, target_build.TargetOptions(speedup=1.2, cache_kinds="attention"))
    kinds = {layer.kind.value for layer in attention.layers if not all(layer.compute)}
    assert kinds <= {"attention"}
    impossible = build(profile, target_build.TargetOptions(speedup=10.0, cache_kinds="attention"))
    assert not impossible.builder["reached"]
    for bad in (dict(speedup=0.5), dict(speedup=math.nan), dict(forecast_order=3), dict(cache_kinds="lstm")):
        with pytest.raises(ValueError):
            build(profile, target_build.TargetOptions(**bad))


def test_a_profile_without_trajectory_says_what_to_do(pack, profiled):
    import dataclasses

    *_, profile = profiled
    loaded = profile_from_dict(json.loads(json.dumps(profile_to_dict(profile))))
    assert loaded.trajectory is None
    with pytest.raises(ScheduleBuildError, match="Profile again"):
        build_target_schedule(loaded, TargetOptions())
    merged = merge_profiles([profile, dataclasses.replace(profile)])
    assert merged.trajectory.sketches[0].shape[1] == 2 * profile.trajectory.sketches[0].shape[1]


def test_build_node_sends_the_ladder_and_applies(pack, profiled):
    from helpers import sample

    model, conds, latent, profile = profiled
    node = BuildTargetSchedule
    result = node.execute(profile, 2.0, "auto", "all", 1, 0, 0)
    schedule, picture, text, steps = result.result
    ui = result.ui
    ladder = ui["block_cache_ladder"][0]
    assert steps == profile.grid.steps  # this profile cannot be replayed: nothing was compared
    assert "uncached steps" in ui["text"][0] and picture.shape[0] == 1
    assert json.loads(text)["layers"][0]["forecast_order"] in (0, 1, 2)
    assert len(ladder["cached"]) == len(schedule.layers) and ladder["options"]["speedup_target"] == 2.0
    patched = ApplyBlockCache.execute(model, schedule).result[0]
    out = sample(patched, *conds, latent, steps=12)
    assert torch.isfinite(out).all()


def test_the_evenly_spaced_candidate_computes_the_first_and_the_last_step(pack, profiled):
    *_, profile = profiled
    steps = profile.grid.steps
    found = target_ladder.search(profile, target_build.TargetOptions())
    for count in range(3, steps):
        even = [rung for label, rung in target_ladder.candidates(found, profile, count) if label.startswith("evenly")]
        for rung in even:
            spacing = [b - a for a, b in zip(rung.steps, rung.steps[1:], strict=False)]
            assert rung.steps[0] == 0 and rung.steps[-1] == steps - 1 and len(set(rung.steps)) == count
            assert max(spacing) - min(spacing) <= 1, rung.steps
    assert any(label.startswith("evenly") for label, _ in target_ladder.candidates(found, profile, steps // 2))


def test_measured_choice_takes_the_best_candidate_of_equal_cost(pack, profiled, monkeypatch):
    *_, profile = profiled
    scores = {}
    # Step weights of a few times' spread, as the SD and Flux samplers give, and no damped forecast: 'measure
    # PSNR' measures one schedule.
    monkeypatch.setattr(target, "EVEN_WEIGHTS_MIN_SPREAD", math.inf)
    monkeypatch.setattr(target, "DAMPED_FORECAST", 1.0)

    def measure(schedule):
        scores[schedule_key(schedule)] = 30.0 + len(scores) * 0.5  # each later candidate scores higher
        return scores[schedule_key(schedule)]

    speedup = _whole_rung_speedup(profile)
    validated = target.build_target_schedule(profile, target_build.TargetOptions(speedup=speedup), measure)
    assert validated.builder["chosen_by"] == "predicted" and len(validated.builder["measured"]) == 1
    assert validated.layers == target.build_target_schedule(profile, target_build.TargetOptions(speedup=speedup)).layers
    scores.clear()
    schedule = target.build_target_schedule(profile, target_build.TargetOptions(speedup=speedup, forecast_order=1),
                                            measure, choose_by_measure=True)
    builder = schedule.builder
    tried = builder["measured"]
    assert builder["chosen_by"] == "measured" and len(tried) == len(scores) >= 2
    assert {len(t["steps"]) for t in tried} == {len(builder["compute_steps"])}, "candidates cost the same"
    assert any(t["label"].startswith("evenly spaced") for t in tried)
    assert not any(t["as_is_layers"] for t in tried), "an asked forecast order is kept on every layer"
    best = max(tried, key=lambda t: t["measured_psnr"])
    assert builder["compute_steps"] == best["steps"] and builder["chosen_order"] == best["order"]
    # The preview's rung at this cost is the measured choice.
    ladder = ladder_payload(schedule)
    rung = next(r for r in ladder["rungs"] if r["computes"] == len(best["steps"]) and r["partial"] is None)
    assert rung["steps"] == best["steps"] and rung["order"] == best["order"]


def schedule_key(schedule) -> tuple:
    """A schedule's compute steps and its cached layers' forecast orders."""
    reused = [layer for layer in schedule.layers if not all(layer.compute)]
    steps = tuple(s for s, c in enumerate(reused[0].compute) if c)
    return steps, tuple(layer.forecast_order for layer in reused)


def _whole_rung_speedup(profile) -> float:
    """A target exactly at a whole-step rung's cost (a fine rung's choice is not compared with others)."""
    ladder, _, _ = target_ladder.build_ladder(profile, target_build.TargetOptions())
    return 1.0 / next(r for r in ladder if r.partial is None and 1.8 < 1.0 / r.flop_fraction < 3.0).flop_fraction


def test_measured_choice_reuses_a_third_of_the_layers_as_is_only_where_clearly_better(pack, profiled):
    """With an 'auto' order, 'choose by measured PSNR' also measures the kept schedule with order 0 on the first
    third, the last third and all of the cached layers; one replaces it only where its per-picture gain is
    above the pictures' noise (a paired comparison), and the schedule, the JSON and the preview say which."""
    from comfyui_block_cache.block_caching.replay import Measurement

    *_, profile = profiled
    speedup = _whole_rung_speedup(profile)
    plain = target.build_target_schedule(profile, target_build.TargetOptions(speedup=speedup), lambda s: 30.0,
                                         choose_by_measure=True)
    cached = [i for i, layer in enumerate(plain.layers) if not all(layer.compute)]
    third = len(cached) // 3
    assert third >= 1
    base_order = plain.builder["chosen_order"]

    def scored(gains_by_group):
        """A measure: 4 pictures at 30 dB, plus per-picture gains for the variants named (by their as-is layers)."""
        groups = {"first": cached[:third], "last": cached[-third:], "all": cached}

        def measure(schedule):
            as_is = [i for i in cached if schedule.layers[i].forecast_order == 0]
            name = next((n for n, layers in groups.items() if as_is and as_is == layers), None)
            return Measurement(tuple(30.0 + g for g in gains_by_group.get(name, (0.0,) * 4)))
        return measure

    # Last third: +2 dB on every picture (clearly better); all: +3 dB on average, but noise (+9, -3, +9, -3).
    schedule = target.build_target_schedule(
        profile, target_build.TargetOptions(speedup=speedup),
        scored({"last": (2.0,) * 4, "all": (9.0, -3.0, 9.0, -3.0)}),
        choose_by_measure=True)
    builder = schedule.builder
    assert builder["chosen_as_is_layers"] == cached[-third:]
    assert [schedule.layers[i].forecast_order for i in cached] == [base_order] * (len(cached) - third) + [0] * third
    variants = [t for t in builder["measured"] if t["as_is_layers"]]
    assert [t["as_is_layers"] for t in variants] == [cached[:third], cached[-third:], cached]
    assert all(t["steps"] == builder["compute_steps"] and t["order"] == base_order for t in variants)
    assert builder["expected_psnr"]["mean"] == 32.0
    assert target_build.TargetBuild.of(schedule_from_json(schedule_to_json(schedule))).chosen_as_is_layers == tuple(
        cached[-third:])
    payload = ladder_payload(schedule)
    rung = next(r for r in payload["rungs"] if r["computes"] == len(builder["compute_steps"]) and not r["partial"])
    assert rung["as_is_layers"] == cached[-third:]
    assert sum(1 for m in payload["measured"] if m["as_is_layers"] == cached[-third:]) == 1
    # Only noise: the schedule keeps its order on every layer.
    noisy = target.build_target_schedule(profile, target_build.TargetOptions(speedup=speedup),
                                         scored({"all": (9.0, -3.0, 9.0, -3.0)}), choose_by_measure=True)
    assert noisy.builder["chosen_as_is_layers"] == [] and noisy.layers == plain.layers
    assert [t["label"].endswith("within the pictures' noise)") for t in noisy.builder["measured"]][-3:] == [
        False, False, True]
    # A variant that clearly beats the search's own schedule carries the floor: the search's own reads
    # below it (30 dB, range 28.5-31.5), the variant above (35 dB).
    floored = target.build_target_schedule(
        profile, target_build.TargetOptions(speedup=speedup, min_psnr=31.0), scored({"last": (5.0,) * 4}),
        choose_by_measure=True)
    assert floored.builder["stepped_down_from"] is None and floored.builder["chosen_as_is_layers"] == cached[-third:]
    assert floored.builder["expected_psnr"]["mean"] == 35.0
    # Within the noise it does not: the floor steps down.
    floored = target.build_target_schedule(
        profile, target_build.TargetOptions(speedup=speedup, min_psnr=31.0), scored({"all": (9.0, -3.0, 9.0, -3.0)}),
        choose_by_measure=True)
    assert floored.builder["stepped_down_from"] is not None


def test_a_second_seed_checks_what_the_first_chose(pack, profiled):
    """The pictures that chose a schedule read it high, so a schedule whose range reaches the floor is measured
    on a second held-out seed too, and holds the floor only where both seeds' pictures together do; that pooled
    reading is what the schedule records. The second seed is not sampled for a schedule that fails on the first."""
    from comfyui_block_cache.block_caching.replay import Measurement

    *_, profile = profiled
    speedup = _whole_rung_speedup(profile)
    options = target_build.TargetOptions(speedup=speedup, min_psnr=31.0)
    plain = target.build_target_schedule(profile, options, lambda s: Measurement((36.0,) * 4))
    count = len(plain.builder["compute_steps"])
    assert plain.builder["stepped_down_from"] is None, "36 dB on the first seed alone holds 31"
    checked = []

    def second(schedule):
        checked.append(schedule)
        computes = max(sum(layer.compute) for layer in schedule.layers if not all(layer.compute))
        return Measurement((28.0 if computes <= count else 36.0,) * 4)

    schedule = target.build_target_schedule(profile, options, lambda s: Measurement((36.0,) * 4), confirm=second)
    builder = schedule.builder
    assert builder["stepped_down_from"] is not None and len(builder["compute_steps"]) > count
    assert builder["expected_psnr"]["mean"] == 36.0 and builder["expected_psnr"]["pictures"] == 8
    seconds = [t for t in builder["measured"] if t["seeds"] == 2]
    assert len(seconds) == len(checked) >= 2 and seconds[-1]["steps"] == builder["compute_steps"]
    assert seconds[0]["measured_psnr"] == 32.0, "both seeds' pictures: 4 at 36 dB, 4 at 28"
    first_seed = [t["label"] for t in builder["measured"] if t["seeds"] == 1]
    assert all(t["label"] in first_seed for t in seconds), "each second-seed reading is named as the schedule it checks"
    # Fewer steps are compared with the schedule on the same (second seed's) pictures, not on the reading that chose.
    compared = target.build_target_schedule(profile, options, lambda s: Measurement((36.0,) * 4), confirm=second,
                                            fewer_steps=lambda n: Measurement((35.0,) * 4))
    versus = compared.builder["fewer_steps"]
    assert versus["schedule_psnr"] == 36.0 and not versus["better"]
    # A schedule that misses the floor on the first seed is not sampled on the second.
    checked.clear()
    target.build_target_schedule(profile, options, lambda s: Measurement((20.0,) * 4), confirm=second)
    assert checked == []
    # Without a floor the choice is still read on both seeds: once.
    free = target.build_target_schedule(profile, dataclasses.replace(options, min_psnr=0.0),
                                        lambda s: Measurement((36.0,) * 4), confirm=second)
    assert len(checked) == 1 and free.builder["expected_psnr"]["mean"] == 32.0
    assert free.builder["compute_steps"] == plain.builder["compute_steps"]


def test_a_paired_gain_beats_only_above_its_noise(pack):
    from comfyui_block_cache.block_caching.replay import Measurement

    base = Measurement((30.0, 25.0, 40.0, 35.0))
    assert Measurement((31.0, 26.0, 41.0, 36.0)).beats(base)  # +1 on every picture: no noise
    assert not Measurement((38.0, 20.0, 48.0, 30.0)).beats(base)  # +1.5 on average, +8 / -5 alternating
    assert not base.beats(base)
    with pytest.raises(ValueError):
        Measurement((31.0,)).beats(base)  # not the same pictures
    # One picture cannot show its noise: the gain must exceed the least spread taken (3 dB), or any gain
    # where it is known exactly.
    assert not Measurement((32.0,)).beats(Measurement((30.0,)))
    assert Measurement((34.0,)).beats(Measurement((30.0,)))
    assert Measurement((30.5,), min_sd=0.0).beats(Measurement((30.0,), min_sd=0.0))


def _computes(schedule) -> int:
    rows = [layer.compute for layer in schedule.layers if not all(layer.compute)]
    return sum(rows[0]) if rows else len(schedule.layers[0].compute)


def test_quality_floor_steps_down_to_the_fastest_rung_that_reaches_it(pack, profiled, monkeypatch):
    """A schedule measured below min_psnr is replaced by the fastest slower rung that reaches it, found by a scan
    of the next rungs and a bisection; a floor nothing reaches computes everything; 0 keeps the target's choice."""
    *_, profile = profiled
    measured = []
    monkeypatch.setattr(target, "EVEN_WEIGHTS_MIN_SPREAD", 1.0)  # every rung measured twice
    monkeypatch.setattr(target, "DAMPED_FORECAST", 1.0)  # and only twice

    def measure(schedule):  # fidelity grows with the compute steps: 2 dB per step
        measured.append(_computes(schedule))
        return 2.0 * _computes(schedule)

    plain = target.build_target_schedule(profile, target_build.TargetOptions(speedup=2.0), measure)
    chosen = len(plain.builder["compute_steps"])
    assert 2.0 * chosen < 20.0 and plain.builder["stepped_down_from"] is None
    ladder, _, _ = target_ladder.build_ladder(profile, target_build.TargetOptions(speedup=2.0))
    slower = [rung.computes for rung in ladder if rung.computes > chosen]
    measured.clear()
    floored = target.build_target_schedule(profile, target_build.TargetOptions(speedup=2.0, min_psnr=20.0), measure)
    builder = floored.builder
    assert len(builder["compute_steps"]) == min(c for c in slower if 2.0 * c >= 20.0) == 10
    assert builder["stepped_down_from"]["computes"] == chosen
    assert floored.estimated_speedup < plain.estimated_speedup
    # The target's own and its evenly weighted twin, a bisection over the search's own schedules, then the rung
    # found and FLOOR_REFINE_ABOVE faster ones with their twins (the same cost, so the same PSNR here).
    window = target_floor.FLOOR_REFINE_ABOVE + 1
    assert len(measured) <= 2 + math.ceil(math.log2(len(slower) + 1)) + 2 * window
    assert measured[1] == measured[0] and [t["label"] for t in builder["measured"]][1].startswith("every step")
    assert [t["measured_psnr"] for t in builder["measured"]] == [2.0 * c for c in measured]
    unreachable = target.build_target_schedule(profile, target_build.TargetOptions(speedup=2.0, min_psnr=59.0), measure)
    assert unreachable.compute_mask().all() and unreachable.builder["stepped_down_from"] is not None
    with pytest.raises(ValueError, match="min_psnr"):
        target_build.TargetOptions(min_psnr=-1.0).validate()


def test_with_choose_the_floor_steps_down_to_the_best_candidate_of_each_rung(pack, profiled, monkeypatch):
    """'choose by measured PSNR' probes each slower rung with its equal-cost candidates: where evenly spread
    steps clearly beat the search's (+8 dB on every picture), the floor stops at a faster rung."""
    from comfyui_block_cache.block_caching.replay import Measurement

    *_, profile = profiled
    steps = profile.grid.steps
    monkeypatch.setattr(target, "DAMPED_FORECAST", 1.0)  # no damped schedules (evenly spread too) on either path

    def measure(schedule):  # 2 dB per compute step, +8 where the steps are spread evenly to the last
        count = _computes(schedule)
        row = next((layer.compute for layer in schedule.layers if not all(layer.compute)), (True,) * steps)
        even = {round(i * (steps - 1) / (count - 1)) for i in range(count)} if count > 1 else {0}
        computed = {s for s, c in enumerate(row) if c}
        return Measurement((2.0 * count + (8.0 if computed == even else 0.0),) * 4)

    options = target_build.TargetOptions(speedup=2.5, min_psnr=20.0, forecast_order=1)
    plain = target.build_target_schedule(profile, options, measure)
    chosen = target.build_target_schedule(profile, options, measure, choose_by_measure=True)
    assert plain.builder["stepped_down_from"] is not None and chosen.builder["stepped_down_from"] is not None
    computes = len(chosen.builder["compute_steps"])
    assert computes < len(plain.builder["compute_steps"])
    assert chosen.builder["expected_psnr"]["low"] >= 20.0 > 2.0 * computes
    assert chosen.builder["compute_steps"] == [round(i * (steps - 1) / (computes - 1)) for i in range(computes)]
    assert any(t["label"].startswith("stepped down") and "evenly spaced" in t["label"]
               for t in chosen.builder["measured"])
    # Choosing among candidates, it keeps to the whole-step rungs: fine rungs have no equal-cost candidates.
    assert any(rung.get("partial") for rung in plain.builder["ladder"])
    assert not any(rung.get("partial") for rung in chosen.builder["ladder"])


def test_the_evenly_weighted_search_stands_in_where_it_clearly_beats(pack, profiled, monkeypatch):
    """Where the step weights span more than EVEN_WEIGHTS_MIN_SPREAD, the schedule of the same cost searched with
    every step weighted alike is measured too and, where it is clearly better, kept; below the floor it carries
    it (no step down). Where it is not clearly better the search's own stands; with weights of less spread it
    costs no sampling."""
    from comfyui_block_cache.block_caching.replay import Measurement

    *_, profile = profiled
    steps = profile.grid.steps
    monkeypatch.setattr(target, "DAMPED_FORECAST", 1.0)  # the evenly weighted search alone
    options = target_build.TargetOptions(speedup=2.5, min_psnr=25.0, forecast_order=1)
    found = target_ladder.search(profile, options)
    even = target_ladder.search(profile, options, even_step_weights=True)
    assert set(even.model.weights) == {sum(found.model.weights) / steps}
    spread = target_ladder.step_weight_spread(found.model.weights)
    assert spread > 1.0
    rung = target_ladder.choose_rung(target_ladder.ladder_of(found, profile), options.speedup)
    assert rung.partial is None, "the fixture's target rung is a whole-step one"
    even_steps = even.per_order[1][rung.computes][1]
    assert even_steps != rung.steps, "the fixture's step weights change the search's choice"

    def measure(schedule):  # 20 dB, +8 on every picture for the evenly weighted search's compute steps
        row = next(layer.compute for layer in schedule.layers if not all(layer.compute))
        computed = tuple(s for s, c in enumerate(row) if c)
        return Measurement(((28.0 if computed == even_steps else 20.0),) * 4)

    monkeypatch.setattr(target, "EVEN_WEIGHTS_MIN_SPREAD", spread * 2)  # weights of little spread: not tried
    untried = target.build_target_schedule(profile, options, measure)
    assert untried.builder["stepped_down_from"] is not None
    assert not any("weighted alike" in t["label"] for t in untried.builder["measured"])
    assert any("weighted alike was not tried" in note for note in untried.builder["notes"])
    monkeypatch.setattr(target, "EVEN_WEIGHTS_MIN_SPREAD", spread / 2)  # as a strong time shift spreads them
    built = target.build_target_schedule(profile, options, measure)
    builder = built.builder
    assert builder["stepped_down_from"] is None and tuple(builder["compute_steps"]) == even_steps
    assert [t["label"] for t in builder["measured"]] == ["searched, order 1", "every step weighted alike, order 1"]
    assert builder["chosen_by"] == "measured" and builder["expected_psnr"]["mean"] == 28.0
    assert built.estimated_speedup >= options.speedup
    shown = next(r for r in ladder_payload(built)["rungs"] if r["computes"] == rung.computes and not r["partial"])
    assert tuple(shown["steps"]) == even_steps, "the node's preview shows the schedule it chose at that cost"
    # Above the floor too it is measured, and kept where clearly better.
    above = target.build_target_schedule(profile, dataclasses.replace(options, min_psnr=15.0), measure)
    assert len(above.builder["measured"]) == 2 and tuple(above.builder["compute_steps"]) == even_steps
    # Where it is no better the search's own schedule stands.
    level = target.build_target_schedule(profile, dataclasses.replace(options, min_psnr=15.0),
                                         lambda schedule: Measurement((26.0, 24.0, 27.0, 25.0)))
    assert tuple(level.builder["compute_steps"]) == rung.steps and level.builder["chosen_by"] == "predicted"
    assert [t["label"] for t in level.builder["measured"]][:2] == [
        "searched, order 1", "every step weighted alike, order 1"]
    # Within the noise but below the floor, the one that holds the floor is kept: no step down.

    noisy_gain, own_reading = Measurement((28.0, 24.0, 28.0, 24.0)), Measurement((25.0,) * 4)
    assert not noisy_gain.beats(own_reading) and noisy_gain.low > own_reading.low

    def noisy(schedule):  # the evenly weighted search's +1 dB on average, too noisy to beat the search's own
        row = next(layer.compute for layer in schedule.layers if not all(layer.compute))
        computed = tuple(s for s, c in enumerate(row) if c)
        return noisy_gain if computed == even_steps else own_reading

    floor = (noisy_gain.low + own_reading.low) / 2
    held = target.build_target_schedule(profile, dataclasses.replace(options, min_psnr=floor), noisy)
    assert held.builder["stepped_down_from"] is None and tuple(held.builder["compute_steps"]) == even_steps
    assert held.builder["measured"][1]["label"].endswith("(closer, but within the pictures' noise)")
    above_floor = target.build_target_schedule(profile, dataclasses.replace(options, min_psnr=15.0), noisy)
    assert tuple(above_floor.builder["compute_steps"]) == rung.steps, "above the floor the noise rule stands"


def test_on_a_video_latent_the_evenly_weighted_search_is_taken_unmeasured_and_measured_at_any_spread(
        pack, profiled, monkeypatch):
    """On a video latent (frames > 1) the evenly weighted search's schedule of the target's cost is taken where
    nothing can be measured (a Record Block Changes profile: Wan 2.2's two experts), said in the notes and shown
    in the ladder preview; with a measure it is measured whatever the weights' spread. Image latents and
    one-frame latents are left as they were."""
    *_, profile = profiled
    monkeypatch.setattr(target, "DAMPED_FORECAST", 1.0)  # the evenly weighted search alone
    monkeypatch.setattr(target, "EVEN_WEIGHTS_MIN_SPREAD", math.inf)  # as a split run's segment: little spread
    options = target_build.TargetOptions(speedup=2.5, forecast_order=1)
    found = target_ladder.search(profile, options)
    rung = target_ladder.choose_rung(target_ladder.ladder_of(found, profile), options.speedup)
    even = target_ladder.alternative_rungs(profile, options, found, "even", even_step_weights=True)(rung)[0][1]
    assert even.steps != rung.steps, "the fixture's step weights change the search's choice"
    batch, channels, height, width = profile.grid.latent_shape
    assert profile.grid.latent_shape == (2, 4, 16, 16)

    def with_shape(shape):
        return dataclasses.replace(profile, grid=dataclasses.replace(profile.grid, latent_shape=shape))

    for image in (profile, with_shape((batch, channels, 1, height, width))):
        build = build_target_schedule(image, options).builder
        assert tuple(build["compute_steps"]) == rung.steps and build["chosen_by"] == "predicted"
        assert not any("video latent" in note for note in build["notes"])
    video = with_shape((batch, channels, 8, height, width))
    built = build_target_schedule(video, options)
    build = built.builder
    assert tuple(build["compute_steps"]) == even.steps and build["chosen_by"] == target.VIDEO_RULE
    assert build["measured"] == [] and any("video latent" in note for note in build["notes"])
    assert built.estimated_speedup == pytest.approx(1.0 / even.flop_fraction)
    shown = next(r for r in ladder_payload(built)["rungs"] if r["computes"] == even.computes and not r["partial"])
    assert tuple(shown["steps"]) == even.steps, "the node's preview shows the schedule it took at that cost"
    measured = build_target_schedule(video, options, lambda schedule: replay_module.Measurement((30.0,) * 4))
    assert [t["label"] for t in measured.builder["measured"]] == [
        "searched, order 1", "every step weighted alike, order 1"]
    assert not any("was not tried" in note for note in measured.builder["notes"])


def test_a_damped_forecast_stands_in_where_predicted_and_measured_better(pack, profiled, monkeypatch):
    """Where the error model predicts the search for a damped forecast better at a rung's cost, that schedule is
    measured too and kept where clearly better: its layers are damped, the file says so (version 3) and reads
    back the same. Level, the plain schedule stands (version 2); predicted no better, nothing more is sampled."""
    from comfyui_block_cache.block_caching.replay import Measurement

    *_, profile = profiled
    monkeypatch.setattr(target, "EVEN_WEIGHTS_MIN_SPREAD", math.inf)  # the damped search alone
    options = target_build.TargetOptions(speedup=2.5, min_psnr=15.0, forecast_order=1)
    found = target_ladder.search(profile, options)
    rung = target_ladder.choose_rung(target_ladder.ladder_of(found, profile), options.speedup)
    damped = target_ladder.alternative_rungs(profile, options, found, "damped", damping=target.DAMPED_FORECAST,
                                             if_predicted_better=True)
    offered = damped(rung)
    assert offered, "the fixture's error model predicts the damped forecast better at the target's cost"
    assert all(r.damping == target.DAMPED_FORECAST and r.error < rung.error and r.computes == rung.computes
               for _, r in offered)
    assert damped(dataclasses.replace(rung, error=0.0)) == [], "predicted no better: not offered"

    def measure(schedule):  # +8 dB on every picture where the reused layers' forecasts are damped
        reused = [layer for layer in schedule.layers if not all(layer.compute)]
        return Measurement(((28.0 if reused[0].forecast_damping < 1.0 else 20.0),) * 4)

    built = target.build_target_schedule(profile, options, measure)
    builder = built.builder
    assert [t["label"] for t in builder["measured"]] == [
        "searched, order 1", f"searched for a forecast damped to {target.DAMPED_FORECAST:g}, order 1",
        f"steps spread evenly, forecast damped to {target.DAMPED_FORECAST:g}, order 1"]
    spread = builder["measured"][2]
    assert spread["steps"] == list(target_ladder.evenly_spread_steps(profile.grid.steps, rung.computes))
    assert spread["damping"] == target.DAMPED_FORECAST
    assert builder["chosen_damping"] == target.DAMPED_FORECAST and builder["chosen_by"] == "measured"
    # The preview tells readings apart by damping too (js/block_cache.js): schedules of equal steps can differ in it.
    payload = ladder_payload(built)
    assert [m["damping"] for m in payload["measured"]] == [1.0, target.DAMPED_FORECAST, target.DAMPED_FORECAST]
    (shown,) = [r for r in payload["rungs"] if r["steps"] == builder["compute_steps"] and r["partial"] is None]
    assert shown["damping"] == target.DAMPED_FORECAST
    reused = [layer for layer in built.layers if not all(layer.compute)]
    assert reused and {layer.forecast_damping for layer in reused} == {target.DAMPED_FORECAST}
    assert {layer.forecast_damping for layer in built.layers if all(layer.compute)} <= {1.0}
    document = json.loads(schedule_to_json(built))
    written = [layer["forecast_damping"] for layer in document["layers"] if "forecast_damping" in layer]
    assert document["version"] == 3 and written == [target.DAMPED_FORECAST] * len(reused)
    again = schedule_from_json(schedule_to_json(built))
    assert again.layers == built.layers and again.fingerprint == built.fingerprint
    level = target.build_target_schedule(profile, options, lambda schedule: Measurement((26.0, 24.0, 27.0, 25.0)))
    assert level.builder["chosen_damping"] == 1.0 and json.loads(schedule_to_json(level))["version"] == 2
    assert len(level.builder["measured"]) == 3
    monkeypatch.setattr(target, "DAMPED_FORECAST", 1.0)  # predicted exactly as the plain forecast: not offered
    floored = target.build_target_schedule(profile, dataclasses.replace(options, min_psnr=29.0), measure)
    assert not any("damped" in t["label"] for t in floored.builder["measured"])
    assert any("damped to 1 was not tried" in note for note in floored.builder["notes"])
    asked = target.build_target_schedule(profile, dataclasses.replace(options, forecast_order=2, min_psnr=29.0),
                                         measure)
    assert not any("damped" in t["label"] for t in asked.builder["measured"]), "an asked order is kept"
    assert any("order 2 was asked for" in note for note in asked.builder["notes"])


def test_the_floor_bisects_the_searched_schedules_then_tries_the_others_near_the_rung_found(pack, profiled):
    """The bisection measures one schedule of each rung it probes, once; then the rung it found and
    FLOOR_REFINE_ABOVE faster ones are probed with their other schedules, fastest first, and the first whose kept
    schedule reaches the floor is taken. Farther up, the others are not tried."""
    from comfyui_block_cache.block_caching.replay import Measurement

    *_, profile = profiled
    steps = profile.grid.steps
    ladder, _, _ = target_ladder.build_ladder(profile, target_build.TargetOptions())
    whole = [rung for rung in ladder if rung.partial is None]
    fastest = min(whole, key=lambda rung: rung.flop_fraction)
    slower = sorted((r for r in whole if r.flop_fraction > fastest.flop_fraction and r.computes < steps),
                    key=lambda rung: rung.flop_fraction)
    assert len(slower) >= 6
    refine = target_floor.FLOOR_REFINE_ABOVE
    boundary = refine + 2  # the searched schedules reach the floor from here on
    owns, others = [], []

    def probe_own(rung):
        owns.append(rung)
        return rung, Measurement((40.0 if slower.index(rung) >= boundary else 20.0,) * 4)

    def probe_others(reaching):
        def probe(rung):
            others.append(rung)
            return rung, Measurement((40.0 if slower.index(rung) in reaching else 20.0,) * 4)
        return probe

    kept, value = target_floor.step_down_to_floor(whole, fastest, target_floor.reaches(30.0), steps, probe_own)
    assert kept is slower[boundary] and value.mean == 40.0
    assert len(owns) <= math.ceil(math.log2(len(slower) + 1)) + 1
    # Another schedule reaches the floor at each of the two rungs above the boundary: the faster is taken.
    kept, _ = target_floor.step_down_to_floor(whole, fastest, target_floor.reaches(30.0), steps, probe_own, probe_others({1, 2, 3}),
                                              refine=refine)
    assert kept is slower[boundary - refine] and others == [slower[boundary - refine]]
    others.clear()
    kept, _ = target_floor.step_down_to_floor(whole, fastest, target_floor.reaches(30.0), steps, probe_own, probe_others({0}), refine=refine)
    assert kept is slower[boundary], "out of the window: not tried"
    assert others == slower[boundary - refine:boundary + 1]
    # Where no rung's own schedule reaches it, the slowest rungs' others are still tried.
    owns.clear()
    others.clear()
    last = len(slower) - 1
    def below(rung):
        return rung, Measurement((20.0,) * 4)

    kept, value = target_floor.step_down_to_floor(whole, fastest, target_floor.reaches(30.0), steps, below, probe_others({last}),
                                                  refine=refine)
    assert kept is slower[last] and others == slower[len(slower) - refine:]
    assert target_floor.step_down_to_floor(whole, fastest, target_floor.reaches(30.0), steps, below, probe_others(set()),
                                           refine=refine) == (None, None)


def test_a_faster_target_never_steps_down_to_a_slower_rung(pack, profiled):
    """Where fidelity does not grow with the cost (the rungs' schedules come from different searches), the step
    down from a faster rung still lands on a rung at least as fast as from a slower one: the bisection runs over
    the whole ladder for every target, so the probes agree wherever both targets can measure them."""
    from comfyui_block_cache.block_caching.replay import Measurement

    *_, profile = profiled
    steps = profile.grid.steps
    ladder, _, _ = target_ladder.build_ladder(profile, target_build.TargetOptions())
    ordered = sorted((rung for rung in ladder if rung.computes < steps), key=lambda rung: rung.flop_fraction)
    assert len(ordered) >= 12
    generator = random.Random(5)
    for _ in range(20):
        reaching = {i for i in range(len(ordered)) if generator.random() < 0.4}

        def probe(rung, reaching=reaching):
            return rung, Measurement((40.0 if ordered.index(rung) in reaching else 20.0,) * 4)

        landed = []
        for start in ordered[:-1]:
            kept, _ = target_floor.step_down_to_floor(ladder, start, target_floor.reaches(30.0), steps, probe,
                                                      probe, refine=target_floor.FLOOR_REFINE_ABOVE)
            assert kept is None or (kept.flop_fraction > start.flop_fraction and ordered.index(kept) in reaching)
            landed.append(len(ordered) if kept is None else ordered.index(kept))
        assert landed == sorted(landed), f"a faster target landed slower: {landed} for {sorted(reaching)}"


def test_the_floor_probes_each_rung_with_the_preferred_search_first(pack, profiled, monkeypatch):
    """The step down probes a rung with the damped search's schedule where the error model offers it there (the
    search's own elsewhere), one measurement per rung that holds the floor, and pairs it with the search's own
    only where it misses or near the rung it finds."""
    from comfyui_block_cache.block_caching.replay import Measurement

    *_, profile = profiled
    monkeypatch.setattr(target, "EVEN_WEIGHTS_MIN_SPREAD", math.inf)  # the damped search alone
    monkeypatch.setattr(target_floor, "FLOOR_REFINE_ABOVE", 0)
    measured = []

    def measure(schedule):  # 2 dB per compute step, +6 where the reused layers' forecasts are damped
        reused = [layer for layer in schedule.layers if not all(layer.compute)]
        damped = bool(reused) and reused[0].forecast_damping < 1.0
        measured.append((_computes(schedule), damped))
        return Measurement((2.0 * _computes(schedule) + (6.0 if damped else 0.0),) * 4)

    options = target_build.TargetOptions(speedup=2.5, min_psnr=22.0, forecast_order=1)
    built = target.build_target_schedule(profile, options, measure)
    builder = built.builder
    assert builder["stepped_down_from"] is not None and builder["chosen_damping"] == target.DAMPED_FORECAST
    assert measured[:2] == [(measured[0][0], False), (measured[0][0], True)], "the target's own, then damped"
    assert builder["expected_psnr"]["low"] >= 22.0 > 2.0 * len(builder["compute_steps"])
    stepped = [t for t in builder["measured"] if t["label"].startswith("stepped")]
    rungs = [t["label"][len("stepped down, "):].split(": ")[0] for t in stepped]
    damped_at = {rung: t for rung, t in zip(rungs, stepped, strict=True) if t["damping"] < 1.0}
    own_at = {rung for rung, t in zip(rungs, stepped, strict=True) if t["damping"] == 1.0}
    passing = {rung for rung, t in damped_at.items() if t["expected_low"] >= 22.0}
    assert damped_at and passing, "the bisection measures the damped search's schedules"
    assert len(passing & own_at) <= 1, "where the damped one holds the floor, the search's own only at the rung found"
    first_at: dict[str, float] = {}
    for rung, t in zip(rungs, stepped, strict=True):
        first_at.setdefault(rung, t["damping"])
    assert all(first_at[rung] < 1.0 for rung in own_at & set(damped_at)), "a damped schedule offered is probed first"
    assert len(builder["measured"]) == len(measured), "each schedule measured once"


@pytest.fixture
def profiled_by_node(pack):
    """A tiny UNet, and the output and profile of Profile Block Changes on it (10 euler steps)."""
    model = build_unet_patcher("tiny", seed=0)
    prompt = prompt_conditioning
    positive, negative = prompt("a red square", 32), prompt("blurry", 32)
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    node = ProfileBlockChanges
    out, profile, _ = node.execute(model, 3, 10, 5.0, "euler", "normal", positive, negative, latent, 1.0).result
    return model, out, profile


def test_profile_node_replays_its_run_exactly_and_measures(pack, profiled_by_node):
    """The Profile node's replay samples the profiled run again: with an all-compute schedule it gives the
    profiled output bit for bit (PSNR capped at 100), a caching schedule scores less; the Build node
    reports what it measured."""
    model, out, profile = profiled_by_node
    (replay,) = profile.replays
    assert torch.equal(replay.reference, out["samples"])
    assert torch.equal(replay.sample(model), out["samples"]), "the replay is the profiled run"
    measure = HeldOutRuns(profile.replays).schedule
    all_compute = all_compute_schedule(profile.block_map, profile.grid)
    assert measure(all_compute).pictures == (100.0,), "on the held-out seed too, all-compute is the uncached run"
    cached = build_target_schedule(profile, TargetOptions(speedup=2.5))
    measured = measure(cached)
    assert 5.0 < measured.mean < 100.0 and measured.low < measured.mean < measured.high
    result = BuildTargetSchedule.execute(profile, 2.5, "auto", "all", 1, 0, 0,
                                                                    "measure PSNR", 0.0)
    text = result.ui["text"][0]
    assert "chosen: " in text and "dB against uncached" in text and "expected" in text
    # Without a floor the choice is read on a second seed too: one "checked" line, named as the chosen schedule.
    (chosen_line,) = [line for line in text.splitlines() if line.startswith("chosen: ")]
    (checked_line,) = [line for line in text.splitlines() if line.startswith("checked: ")]
    assert checked_line.split(" PSNR ")[0][len("checked: "):] == chosen_line.split(" PSNR ")[0][len("chosen: "):]
    assert "and a second one, which did not choose it" in checked_line
    versus = result.result[0].builder["fewer_steps"]
    assert versus["steps"] == round(10 / result.result[0].estimated_speedup)
    assert ("better than fewer steps" in text) != versus["better"] and result.result[3] == 10
    chosen = BuildTargetSchedule.execute(profile, 2.5, "auto", "all", 1, 0, 0, "choose by measured PSNR", 0.0, "off")
    schedule, text = chosen.result[0], chosen.ui["text"][0]
    lines = text.splitlines()
    assert sum(line.startswith("chosen: ") for line in lines) == 1
    assert len([line for line in lines if ", order 0 on the " in line]) == 3, text
    as_is = schedule.builder["chosen_as_is_layers"]
    assert [schedule.layers[i].forecast_order for i in as_is] == [0] * len(as_is)
    assert ("reused as they are) on " in text) == bool(as_is)
    merged = merge_profiles([profile, profile])
    assert len(merged.replays) == 2
    loaded = profile_from_dict(profile_to_dict(profile))
    assert loaded.replays == () and loaded.trajectory is None


def test_best_choice_takes_the_fastest_above_the_floor_then_the_best_measured(pack):
    choice = target.SamplingChoice

    def choices(*rows):
        return [choice(label, 20, None, speedup, mean, low) for label, speedup, mean, low in rows]

    # A 2.25x target that the floor stepped down: none reaches it, so the fastest above the floor.
    rows = choices(("cache", 1.66, 33.0, 31.0), ("fewer", 1.67, 34.0, 32.0), ("both", 2.0, 31.5, 30.2))
    assert target.best_choice(rows, 2.25, 30.0).label == "both"
    assert target.best_choice(rows, 2.25, 31.0).label == "fewer", "both is below the floor; fewer is as fast, better"
    assert target.best_choice(rows, 2.25, 40.0).label == "both", "none reaches the floor: the fastest"
    # Every choice reaches the target: the best measured, however much faster another is.
    rows = choices(("cache", 3.15, 41.6, 38.6), ("fewer", 3.33, 25.3, 22.3), ("both", 3.25, 32.5, 29.5))
    assert target.best_choice(rows, 2.5, 0.0).label == "cache"
    assert [target.combined_step_count(20, s) for s in (1.0, 2.0, 2.25, 4.0)] == [19, 14, 13, 10]
    assert target.combined_step_count(3, 100.0) == 2


def test_fewer_steps_with_the_cache_are_profiled_and_measured_on_the_profiled_count(pack, profiled_by_node):
    """profile_again profiles the replayed run at another step count and keeps the replays; a schedule for
    those steps is measured against the profiled count's uncached pictures (an all-compute one exactly as
    uncached fewer steps); the Build node's fourth fewer_steps mode builds the combination and outputs
    the chosen one's step count with a schedule built for it."""
    _, _, profile = profiled_by_node
    fewer = replay_module.profile_again(profile, 6)
    assert fewer.grid.steps == 6 and fewer.replays == profile.replays
    assert fewer.grid.sampler == "euler" and fewer.grid.cfg == profile.grid.cfg
    runs = replay_module.HeldOutRuns(profile.replays)
    all_compute = all_compute_schedule(fewer.block_map, fewer.grid)
    assert runs.schedule(all_compute).pictures == runs.fewer_steps(6).pictures
    with pytest.raises(ValueError, match="cannot sample its run again"):
        replay_module.profile_again(profile_from_dict(
            profile_to_dict(profile)), 6)
    modes = FEWER_STEPS_CHOICES
    result = BuildTargetSchedule.execute(profile, 2.5, "auto", "all", 1, 0, 0,
                                                                    "measure PSNR", 0.0, modes[3])
    schedule, _, _, steps = result.result
    text = result.ui["text"][0]
    fewer_count = round(10 * BuildTargetSchedule.execute(profile, 2.5, "auto", "all", 1, 0, 0, "measure PSNR",
                                                         0.0).result[0].flop_fraction)
    assert text.count("CHOSEN: ") == 1 and "Block Cache at 6 steps" in text
    assert f"uncached at {fewer_count} steps" in text
    assert schedule.grid.steps == steps, "the schedule is built for the step count it outputs"
    combined = build_combined_schedule(
        profile, TargetOptions(speedup=2.5),
        lambda count: replay_module.profile_again(profile, count), runs.schedule)
    info = combined.builder["combined"]
    assert combined.grid.steps == info["steps"] == 6 and info["profiled_steps"] == 10
    assert info["speedup"] == pytest.approx(10 * combined.estimated_speedup / 6)
    with pytest.raises(ValueError, match="fewer_steps one of"):
        build_for_node(profile, TargetOptions(speedup=2.5), "measure PSNR", "always")
