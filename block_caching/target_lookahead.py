"""Step lookahead as Build Cache Schedule's measured alternative to the cache's own schedule.

Which steps the model runs at: of each count, the steps spread evenly from the first to the last and the
ladder's searched compute steps of that count (the last step added), the one the held-out seed reads higher
(on the Flux reference neither placement kept more at every count, docs/speedup-target.md#step-lookahead).
How many: the most that reach the speed-up target, and with a quality floor one more at a time until one
holds it on both held-out seeds, while that is still about as fast as the cache's schedule (``EQUAL_COST``).
Every lookahead reading is lowered by what held-out seeds read lookaheads too high (``LOOKAHEAD_READS_HIGH_DB``).
``best_choice`` takes the faster of the two above the floor, at the target's cost the one measured closer; at
about the cache's cost the lookahead must be clearly closer (a paired gain above the pictures' noise), since on
the Flux reference the two kept about the same there.
"""

from __future__ import annotations

import dataclasses
import math

from .lookahead import lookahead_runs_with, lookahead_schedule
from .profile import BlockProfile
from .replay import HeldOutValidation, Measurement
from .schedule import CacheSchedule
from .target_build import ExpectedPsnr, FewerStepsComparison, LookaheadChosen, TargetBuild, TargetOptions
from .target_ladder import evenly_spread_steps
from .target_schedule import SamplingChoice, best_choice

# Lookahead schedules are measured while they are at least this share as fast as the cache's schedule: at
# nearly equal cost the closer one is worth having.
EQUAL_COST = 0.95
# How much higher the held-out seeds read a lookahead than unseen prompts do, on average over the reference
# models (Flux 20 and 28 steps, UNet 20; 1.5-3.4x): 1.28 dB against set A, 1.37 against set B, where the cache's
# schedules read -1.1 to +2.0 (docs/benchmark/unseen#what-to-interpolate). Its readings are lowered by it.
LOOKAHEAD_READS_HIGH_DB = 1.3


def choose_lookahead(profile: BlockProfile, options: TargetOptions, validation: HeldOutValidation,
                     schedule: CacheSchedule, compare_fewer_steps: bool) -> tuple[CacheSchedule, list[str]]:
    """``schedule`` (the validated cache schedule) or a step lookahead measured better (as ``best_choice``
    judges), and the lines that say what was measured, or why nothing was."""
    steps = profile.grid.steps
    if not lookahead_runs_with(profile.grid.sampler):
        return schedule, [f"lookahead not tried: the sampler {profile.grid.sampler or '(unknown)'} evaluates the "
                          "model more than once per step or reads more than its output."]
    if steps < 3:
        return schedule, [f"lookahead not tried: {steps} steps are too few to leave one out."]
    build = TargetBuild.of(schedule)
    cache = _cache_choice(schedule, build)
    choices = [cache]
    lines: list[str] = []
    measurements: dict[int, Measurement] = {}  # per count, of both seeds where the first reached the floor
    seconds: dict[int, Measurement] = {}
    first = max(2, math.floor(steps / options.speedup + 1e-9))  # the most model calls that reach the target
    for count in range(first, steps):
        speedup = steps / count
        if count > first and (not options.min_psnr or speedup < EQUAL_COST * cache.speedup):
            break
        placement, candidate, measured, readings_note = _closer_placement(profile, validation, build, count)
        if measured.low >= options.min_psnr:
            seconds[count] = _lowered(validation.second.schedule(candidate))
            measured = dataclasses.replace(measured, pictures=measured.pictures + seconds[count].pictures)
        measurements[count] = measured
        label = f"lookahead at {count} of {steps} steps"
        choices.append(SamplingChoice(label, steps, candidate, speedup, measured.mean, measured.low))
        lines.append(f"tried: {label} ({speedup:.2f}x) at {placement}, {measured.mean:.1f} dB on "
                     f"{'both held-out seeds' if count in seconds else 'the held-out seed'} less "
                     f"{LOOKAHEAD_READS_HIGH_DB:g} dB, expected {measured.low:.1f}-{measured.high:.1f} dB on other "
                     "prompts" + readings_note)
        if options.min_psnr and measured.low >= options.min_psnr:
            break
    best = best_choice(choices, options.speedup, options.min_psnr)
    if best is cache:
        return schedule, [*lines, f"kept {cache.label}: no lookahead was faster above the floor, or closer at "
                                  "the target's cost."]
    count = len(best.schedule.lookahead_steps)
    measured = measurements[count]
    if best.speedup * EQUAL_COST < cache.speedup and not _clearly_closer(measured, build):
        return schedule, [*lines, f"kept {cache.label}: {best.label} ({best.speedup:.2f}x) is about as fast and not "
                                  "clearly closer (its pictures' gain is within their noise)."]
    both = ExpectedPsnr(measured.mean, measured.low, measured.high, len(measured.pictures), measured.pictures)
    versus = None
    if compare_fewer_steps and count in seconds:
        fewer = validation.second.fewer_steps(count)
        versus = FewerStepsComparison(count, steps / count, fewer.mean, fewer.low, fewer.high,
                                      fewer.mean >= seconds[count].mean, seconds[count].mean)
    chosen = dataclasses.replace(
        build, lookahead=LookaheadChosen(best.schedule.lookahead_steps, cache.speedup,
                                         None if cache.mean >= 100.0 else cache.mean),
        expected_psnr=both, fewer_steps=versus, reached=best.speedup >= options.speedup - 1e-9, chosen_by="measured")
    lines.append(f"USING LOOKAHEAD: {best.label} ({best.speedup:.2f}x, {best.mean:.1f} dB) instead of "
                 f"{cache.label}.")
    return dataclasses.replace(best.schedule, builder=chosen.to_json()), lines


def rung_lookahead_steps(compute_steps: tuple[int, ...], steps: int) -> tuple[int, ...]:
    """A whole-step rung's compute steps as lookahead steps: the first and last steps added (a lookahead runs the
    model at both anyway)."""
    return tuple(sorted({0, *compute_steps, steps - 1}))


def ladder_placements(steps: int, count: int, build: TargetBuild) -> list[tuple[int, ...]]:
    """The lookahead steps of ``count`` model calls the ladder offers (``rung_lookahead_steps`` of each whole-step
    rung), those that come to ``count``."""
    found = {rung_lookahead_steps(rung.steps, steps) for rung in build.ladder if rung.partial is None}
    return sorted(planned for planned in found if len(planned) == count)


def _closer_placement(profile: BlockProfile, validation: HeldOutValidation, build: TargetBuild, count: int
                      ) -> tuple[str, CacheSchedule, Measurement, str]:
    """Of ``count`` model calls: the placement the held-out seed reads higher (the even spread on a tie), its
    schedule and reading, and a note of each placement's reading ("" where the ladder offers no other)."""
    steps = profile.grid.steps
    even = evenly_spread_steps(steps, count)
    placements = [("steps spread evenly", even)]
    ladder = [planned for planned in ladder_placements(steps, count, build) if planned != even]
    placements += [(f"the ladder's steps {list(planned)}" if len(ladder) > 1 else "the ladder's steps", planned)
                   for planned in ladder]
    readings = []
    for name, planned in placements:
        candidate = lookahead_schedule(profile, planned)
        readings.append((name, candidate, _lowered(validation.runs.schedule(candidate))))
    best = max(readings, key=lambda reading: reading[2].mean)  # max keeps the first (the even spread) on a tie
    each = ", ".join(f"{name} {measured.mean:.1f} dB" for name, _, measured in readings)
    return *best, (f" (held-out seed: {each})" if len(readings) > 1 else "")


def _lowered(measured: Measurement) -> Measurement:
    """A lookahead's held-out reading less what held-out seeds read it too high (``LOOKAHEAD_READS_HIGH_DB``)."""
    return dataclasses.replace(measured, pictures=tuple(value - LOOKAHEAD_READS_HIGH_DB for value in measured.pictures))


def _clearly_closer(lookahead: Measurement, build: TargetBuild) -> bool:
    """Whether the lookahead's pictures are closer than the cache schedule's by more than their noise
    (``Measurement.beats``, paired over the same pictures: both seeds'). A cache schedule without a measurement
    (it computes everything) gives way; one whose pictures were not kept is compared by its mean."""
    cache = build.expected_psnr
    if cache is None:
        return True
    if len(cache.values) != len(lookahead.pictures):
        return lookahead.mean > cache.mean
    return lookahead.beats(Measurement(cache.values))


def _cache_choice(schedule: CacheSchedule, build: TargetBuild) -> SamplingChoice:
    label = f"Block Cache's {schedule.estimated_speedup:.2f}x schedule"
    if build.expected_psnr is None:  # it computes everything (no schedule reached the floor) or was not measured
        return SamplingChoice(label, schedule.grid.steps, schedule, schedule.estimated_speedup, 100.0, 100.0)
    measured = build.expected_psnr
    return SamplingChoice(label, schedule.grid.steps, schedule, schedule.estimated_speedup, measured.mean,
                          measured.low)
