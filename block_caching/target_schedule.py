"""The speed-up target builder: the schedule for a speed-up, held to a quality floor.

``build_target_schedule`` searches the ladder of schedules (block_caching/target_ladder.py), picks the rung of
the target's cost, and with a measure keeps the best of that rung's schedules and steps down to the floor
(block_caching/target_floor.py); what it chose and why goes into the schedule's JSON (target_build.py). Fewer
sampler steps, with and without the cache, are measured against it (``sampling_choices``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from .profile import BlockProfile
from .replay import HeldOutValidation, Measurement, measurement
from .schedule import CacheSchedule, all_compute_schedule
from .target_build import (
    CombinedSteps,
    ExpectedPsnr,
    FewerStepsComparison,
    LadderRung,
    SteppedDown,
    TargetBuild,
    TargetOptions,
    Tried,
)
from .target_floor import Holds, measured_choice, measured_once, reaches, schedule_key, step_down, tried_entry
from .target_ladder import Rung, alternative_rungs, choose_rung, ladder_of, rung_schedule, search, step_weight_spread

# The step weights' spread (largest over smallest) above which the search with every step weighted alike is
# measured too (Wan's time shift gives 48x, the reference Flux and UNet samplers 3-10x); on a video latent at any
# spread, and taken without a measure (docs/speedup-target.md, docs/benchmark-video.md#step-weights).
EVEN_WEIGHTS_MIN_SPREAD = 20.0
# How chosen_by names a schedule taken without a measure by the video rule above.
VIDEO_RULE = "video rule"

# An order-1 forecast damped to this share of its move, measured (with its steps spread evenly too) where the error
# model predicts it better than the search's own: it helps the reference Flux, not the UNet (docs/speedup-target.md).
DAMPED_FORECAST = 0.5


def build_target_schedule(profile: BlockProfile, options: TargetOptions,
                          measure: Callable[[CacheSchedule], Measurement | float] | None = None,
                          choose_by_measure: bool = False, metric: str = "",
                          fewer_steps: Callable[[int], Measurement | float] | None = None,
                          confirm: Callable[[CacheSchedule], Measurement | float] | None = None) -> CacheSchedule:
    """The schedule for ``options.speedup``: the error model's best at that cost.

    ``measure`` (a schedule's fidelity, higher is better: the PSNR of sampling the profiled prompts again
    with it, block_caching/replay.py; ``metric`` says of what) validates the choice: its value is
    recorded. Where the step weights span more than EVEN_WEIGHTS_MIN_SPREAD, or the latent is a video's, the schedule
    of that cost searched with every step weighted alike is measured too (without a measure, on a video latent, it
    is taken: chosen_by VIDEO_RULE), and where the error model predicts the search for a
    forecast damped to DAMPED_FORECAST better, its schedule and the one with the steps spread evenly for that
    forecast (``alternative_rungs``), and with ``choose_by_measure`` other schedules of that cost; one may replace
    it (``measured_choice``). With ``options.min_psnr``, where the expected PSNR on other prompts (the low end
    of the measured range) of the choice is below it, the choice steps down the ladder to the fastest rung that
    reaches it (``step_down_to_floor``: a bisection over the whole ladder with the preferred schedule of each
    rung, then the rungs next to the one found with all their schedules), or to computing everything.
    ``confirm`` (the same measure with other pictures: a second held-out seed) checks a schedule that reaches the
    floor before it is kept: the floor and the reading recorded for the choice are of both seeds' pictures, since
    the pictures that chose a schedule read it high (``checked_once``). ``fewer_steps`` (uncached sampling with
    fewer steps, on ``confirm``'s pictures where it is given) compares the choice with fewer steps at its cost, on
    the same pictures.
    """
    found = search(profile, options)
    ladder = ladder_of(found, profile)
    if measure is not None and choose_by_measure:
        # Only whole-step rungs have equal-cost candidates to choose from, and the floor's bisection needs its
        # rungs measured alike; a whole-step rung's best candidate kept more than the fine rungs around it.
        ladder = [candidate for candidate in ladder if candidate.partial is None]
    rung = choose_rung(ladder, options.speedup)
    steps = profile.grid.steps
    stepped_from: Rung | None = None
    tried: list[Tried] = []
    chosen: Measurement | None = None
    confirmed: Callable[[Rung], Measurement] | None = None  # the second held-out seed's readings
    notes = list(found.notes)
    spread = step_weight_spread(found.model.weights)
    video = is_video(profile)
    evenly_weighted = alternative_rungs(profile, options, found, "every step weighted alike", even_step_weights=True)
    by_rule = False
    if measure is None and video and rung.computes < steps:
        evenly = evenly_weighted(rung)
        if evenly and evenly[0][1].steps != rung.steps:
            rung, by_rule = evenly[0][1], True
            notes.append("not measured: on a video latent the schedule of this cost searched with every step's "
                         "error weighted alike is taken (a guess: on two trained video models it kept 4-8 dB more in "
                         "three runs of four and 1-2 dB less in one). Validation measures instead: profile with "
                         "Profile Block Changes, or a segment with Profile Block Changes (Advanced).")
    if measure is not None and rung.computes < steps:
        measured = measured_once(profile, found.layers, measure)
        # In the order the step down probes them first: each where it kept the most on unseen prompts.
        alternatives = []
        if spread > EVEN_WEIGHTS_MIN_SPREAD or video:
            alternatives.append(evenly_weighted)
        damped_offered = False
        if options.forecast_order in (None, 1):  # what was measured: an order-1 forecast, damped
            damped = alternative_rungs(profile, dataclasses.replace(options, forecast_order=1), found,
                                       f"searched for a forecast damped to {DAMPED_FORECAST:g}",
                                       damping=DAMPED_FORECAST, if_predicted_better=True)
            evenly_damped = alternative_rungs(profile, dataclasses.replace(options, forecast_order=1), found,
                                              f"steps spread evenly, forecast damped to {DAMPED_FORECAST:g}",
                                              damping=DAMPED_FORECAST, evenly_spread=True)
            alternatives += [damped, lambda like: evenly_damped(like) if damped(like) else []]
            damped_offered = bool(damped(rung))
        confirmed = None if confirm is None else measured_once(profile, found.layers, confirm)
        checked = None if confirmed is None else checked_once(confirmed, tried)
        holds = floor_check(options.min_psnr, checked)
        rung, chosen = measured_choice(found, profile, rung, measured, choose_by_measure,
                                       per_layer_orders=options.forecast_order is None, record=tried.append,
                                       alternatives=alternatives, holds=holds if options.min_psnr else None)
        if options.min_psnr and not holds(rung, chosen):
            stepped_from = rung
            floor_rung, chosen = step_down(found, profile, ladder, rung, holds, measured, choose_by_measure,
                                           alternatives, tried)
            rung = floor_rung or Rung(steps, tuple(range(steps)), 0, 0.0, 1.0)
        if checked is not None and rung.computes < steps:
            chosen = checked(rung, chosen)
        if spread <= EVEN_WEIGHTS_MIN_SPREAD and not video and (choose_by_measure or stepped_from is not None):
            notes.append(f"the search with every step's error weighted alike was not tried: the step weights span "
                         f"{spread:.1f}x, it is tried above {EVEN_WEIGHTS_MIN_SPREAD:g}x (a strong time shift).")
        if not damped_offered and (choose_by_measure or stepped_from is not None):
            notes.append(f"an order-1 forecast damped to {DAMPED_FORECAST:g} was not tried at the target's cost: "
                         + ("the error model predicts it no better there." if options.forecast_order in (None, 1)
                            else f"forecast order {options.forecast_order} was asked for."))
    versus = None
    if fewer_steps is not None and chosen is not None and rung.computes < steps:
        # Uncached sampling at the schedule's cost: as many steps as its FLOPs buy (at least 1).
        count = max(1, min(steps - 1, round(steps * rung.flop_fraction)))
        value = measurement(fewer_steps(count))
        # On the same pictures: the second seed's, where given (the first seed's reading of the choice is its
        # luckiest, not a fair match for fewer steps).
        same = confirmed(rung) if confirmed is not None else chosen
        versus = FewerStepsComparison(count, steps / count, value.mean, value.low, value.high, value.mean >= same.mean,
                                      same.mean)
    build = TargetBuild(
        speedup_target=options.speedup,
        forecast_order=options.forecast_order,
        cache_kinds=options.cache_kinds,
        always_compute_first=options.always_compute_first,
        always_compute_last=options.always_compute_last,
        max_consecutive_reuse=options.max_consecutive_reuse,
        min_psnr=options.min_psnr,
        cached_layers=tuple(profile.block_map.layers[i].name for i in found.layers),
        compute_steps=rung.steps,
        chosen_partial=rung.partial,
        chosen_as_is_layers=rung.as_is_layers,
        chosen_order=rung.order,
        chosen_damping=rung.damping,
        chosen_by=VIDEO_RULE if by_rule else "measured" if tried and (choose_by_measure or schedule_key(rung) not in {
            schedule_key(r) for r in ladder}) else "predicted",
        predicted_error=rung.error,
        reached=rung.flop_fraction <= 1.0 / options.speedup + 1e-12,
        ladder=tuple(LadderRung(r.computes, r.order, r.error, r.flop_fraction, r.steps, r.partial) for r in ladder),
        measured=tuple(tried),
        measured_metric=metric if tried else "",
        stepped_down_from=None if stepped_from is None else SteppedDown(
            stepped_from.computes, stepped_from.order, 1.0 / stepped_from.flop_fraction, stepped_from.steps,
            stepped_from.partial, stepped_from.as_is_layers),
        expected_psnr=None if chosen is None else ExpectedPsnr(chosen.mean, chosen.low, chosen.high,
                                                               len(chosen.pictures), chosen.pictures),
        fewer_steps=versus,
        notes=tuple(notes),
    )
    return rung_schedule(profile, found.layers, rung, build.to_json())


def build_validated_schedule(profile: BlockProfile, options: TargetOptions, validation: HeldOutValidation, *,
                             choose_by_measure: bool = False, compare_fewer_steps: bool = False) -> CacheSchedule:
    """``build_target_schedule`` as the Build node validates by default: measured on the held-out seed, what
    passes checked on the second seed, and (``compare_fewer_steps``) fewer steps read on the second seed."""
    return build_target_schedule(profile, options, validation.runs.schedule, choose_by_measure=choose_by_measure,
                                 metric=validation.metric,
                                 fewer_steps=validation.second.fewer_steps if compare_fewer_steps else None,
                                 confirm=validation.second.schedule)


def is_video(profile: BlockProfile) -> bool:
    """Whether the profiled latent has frames (batch, channels, frames, height, width; more than one frame)."""
    shape = profile.grid.latent_shape
    return len(shape) == 5 and shape[2] > 1


def checked_once(confirmed: Callable[[Rung], Measurement], tried: list[Tried]
                 ) -> Callable[[Rung, Measurement], Measurement]:
    """A schedule's first reading and ``confirmed`` (its pictures on the second seed, measured once) as one
    measurement, recorded in ``tried`` once (``Tried.seeds`` 2, named as its first reading).

    Why a second held-out seed: the step down keeps the fastest of many schedules whose reading reaches the floor,
    so the pictures that chose it read it high (on the Flux reference at 20 steps, a 35 dB floor kept a schedule
    read at 38.2 dB whose unseen prompts read 33.9 / 33.1; docs/speedup-target.md). Pictures that did not choose it
    do not."""
    recorded: set[tuple[object, ...]] = set()

    def checked(rung: Rung, first: Measurement) -> Measurement:
        both = dataclasses.replace(first, pictures=first.pictures + confirmed(rung).pictures)
        key = schedule_key(rung)
        if key not in recorded:
            recorded.add(key)
            labels = [t.label for t in tried if t.schedule_key == key and t.seeds == 1]
            entry = tried_entry(labels[-1] if labels else rung.label, rung, both)
            tried.append(dataclasses.replace(entry, seeds=2))
        return both

    return checked


def floor_check(floor: float, checked: Callable[[Rung, Measurement], Measurement] | None) -> Holds:
    """A schedule holds ``floor`` where its range reaches it, and with ``checked`` where the range of both seeds'
    pictures together reaches it too (the second seed measured only for a schedule whose first reading passes)."""
    first = reaches(floor)
    if checked is None:
        return first
    return lambda rung, value: first(rung, value) and checked(rung, value).low >= floor


def combined_step_count(steps: int, speedup: float) -> int:
    """The sampler steps for fewer steps with the cache: the two share the speed-up evenly (each gives its
    square root), where each loses least (docs/benchmark/unseen: fewer steps with the cache)."""
    return max(2, min(steps - 1, round(steps / math.sqrt(speedup))))


def build_combined_schedule(profile: BlockProfile, options: TargetOptions,
                            profile_at: Callable[[int], BlockProfile],
                            measure: Callable[[CacheSchedule], Measurement | float],
                            confirm: Callable[[CacheSchedule], Measurement | float] | None = None
                            ) -> CacheSchedule | None:
    """Fewer sampler steps and the cache together for ``options.speedup``: a profile at
    ``combined_step_count`` steps (``profile_at``), and the speed-up target's schedule for it at the speed-up
    the fewer steps leave, floor included; ``measure`` (and ``confirm``, as ``build_target_schedule`` takes it)
    compares it with the profiled count's uncached pictures. None where the profiled run is too short to sample
    with fewer steps."""
    steps = profile.grid.steps
    count = combined_step_count(steps, options.speedup)
    if steps < 3 or count >= steps:
        return None
    fewer = profile_at(count)
    remaining = max(1.0, options.speedup * count / steps)
    schedule = build_target_schedule(fewer, dataclasses.replace(options, speedup=remaining), measure,
                                     confirm=confirm)
    combined = CombinedSteps(steps, count, steps * schedule.estimated_speedup / count)
    build = dataclasses.replace(TargetBuild.of(schedule), combined=combined)
    return dataclasses.replace(schedule, builder=build.to_json())


@dataclass(frozen=True)
class SamplingChoice:
    """One way to sample at about the asked cost, measured against the profiled count's uncached pictures."""

    label: str
    steps: int  # the sampler steps it needs
    schedule: CacheSchedule
    speedup: float  # FLOPs against the uncached run at the profiled step count
    mean: float  # measured PSNR
    low: float  # the low end of the range expected on other prompts


def best_choice(choices: list[SamplingChoice], speedup: float, min_psnr: float) -> SamplingChoice:
    """Of the choices expected to reach ``min_psnr`` on other prompts (all of them where none does or the floor
    is 0): the one measured best among those that reach ``speedup`` (within 5 %), else among those within 5 %
    of the fastest."""
    reaching = [c for c in choices if c.low >= min_psnr] or choices
    fast = [c for c in reaching if c.speedup >= 0.95 * speedup]
    if not fast:
        fastest = max(c.speedup for c in reaching)
        fast = [c for c in reaching if c.speedup >= 0.95 * fastest]
    return max(fast, key=lambda c: c.mean)


def sampling_choices(profile: BlockProfile, options: TargetOptions, schedule: CacheSchedule,
                     profile_at: Callable[[int], BlockProfile],
                     measure: Callable[[CacheSchedule], Measurement | float],
                     confirm: Callable[[CacheSchedule], Measurement | float] | None = None
                     ) -> tuple[list[SamplingChoice], str]:
    """What ``best_choice`` picks from for a built ``schedule`` (``build_target_schedule`` with a measure and
    fewer steps compared): the cache at the profiled steps, uncached fewer steps at its cost, and fewer steps
    with the cache (``build_combined_schedule``), each where it was measured; and a note where the
    combination was not (empty otherwise)."""
    steps, build = schedule.grid.steps, TargetBuild.of(schedule)
    choices = []
    if build.expected_psnr is not None:
        measured = build.expected_psnr
        method = "step lookahead" if schedule.lookahead_steps else "Block Cache"
        choices.append(SamplingChoice(f"{method} at {steps} steps", steps, schedule, schedule.estimated_speedup,
                                      measured.mean, measured.low))
    elif schedule.compute_mask().all():
        choices.append(SamplingChoice(f"uncached at {steps} steps", steps, schedule, 1.0, 100.0, 100.0))
    versus = build.fewer_steps
    if versus is not None:
        choices.append(SamplingChoice(
            f"uncached at {versus.steps} steps", versus.steps,
            all_compute_schedule(profile.block_map, profile.grid, profile.layer_flops, profile.total_flops),
            versus.speedup, versus.measured_psnr, versus.expected_low))
    combined = build_combined_schedule(profile, options, profile_at, measure, confirm)
    if combined is None:
        return choices, f"fewer steps with the cache: not tried ({steps} steps are too few to sample with fewer)."
    combined_build = TargetBuild.of(combined)
    if combined_build.expected_psnr is None or combined_build.combined is None:
        reason = (f"no schedule reached the {options.min_psnr:g} dB floor" if options.min_psnr else
                  "the speed-up left for the cache computes every step")
        return choices, f"fewer steps with the cache: not offered ({reason} at {combined.grid.steps} steps)."
    measured, info = combined_build.expected_psnr, combined_build.combined
    choices.append(SamplingChoice(f"Block Cache at {info.steps} steps", info.steps, combined, info.speedup,
                                  measured.mean, measured.low))
    return choices, ""
