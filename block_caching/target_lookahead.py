"""Step lookahead as Build Cache Schedule's measured alternative to the cache's own schedule.

Which steps the model runs at: spread evenly from the first to the last (on the Flux reference the ladder's
searched steps kept more at 28 steps and were mixed at 20, docs/speedup-target.md#step-lookahead: measuring
both is not done yet). How many: the most that reach the speed-up target, and with a quality floor one more
at a time until one holds it on both held-out seeds, while that is still about as fast as the cache's schedule
(``EQUAL_COST``). ``best_choice`` takes the faster of the two above the floor, at the target's cost the one
measured closer; at about the cache's cost the lookahead must be clearly closer (a paired gain above the
pictures' noise), since on the Flux reference the two kept about the same there.
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
        planned = evenly_spread_steps(steps, count)
        candidate = lookahead_schedule(profile, planned)
        measured = validation.runs.schedule(candidate)
        if measured.low >= options.min_psnr:
            seconds[count] = validation.second.schedule(candidate)
            measured = dataclasses.replace(measured, pictures=measured.pictures + seconds[count].pictures)
        measurements[count] = measured
        label = f"lookahead at {count} of {steps} steps"
        choices.append(SamplingChoice(label, steps, candidate, speedup, measured.mean, measured.low))
        lines.append(f"tried: {label} ({speedup:.2f}x), {measured.mean:.1f} dB measured on "
                     f"{'both held-out seeds' if count in seconds else 'the held-out seed'}, expected "
                     f"{measured.low:.1f}-{measured.high:.1f} dB on other prompts")
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
