"""What Build Cache Schedule outputs for its inputs, without the node API: whether it validates, the schedule,
fewer steps compared or chosen, the sampler steps, and the lines the node shows and logs."""

from __future__ import annotations

from dataclasses import dataclass

from .profile import BlockProfile
from .replay import HeldOutValidation, measure_metric, profile_again
from .schedule import CacheSchedule, all_compute_schedule
from .target_build import TargetBuild, TargetOptions, rung_label
from .target_lookahead import choose_lookahead
from .target_schedule import best_choice, build_target_schedule, build_validated_schedule, sampling_choices

VALIDATION_CHOICES = ("measure PSNR", "choose by measured PSNR", "off")
MEASURE, CHOOSE_BY_MEASURE, NO_VALIDATION = VALIDATION_CHOICES
FEWER_STEPS_CHOICES = ("compare", "use fewer steps when better", "off", "best of cache, fewer steps, or both")
COMPARE, USE_WHEN_BETTER, NO_FEWER_STEPS, BEST_OF_THREE = FEWER_STEPS_CHOICES
LOOKAHEAD_CHOICES = ("use when better", "off")
USE_LOOKAHEAD, NO_LOOKAHEAD = LOOKAHEAD_CHOICES


@dataclass(frozen=True)
class TargetOutcome:
    schedule: CacheSchedule  # what the node outputs
    sampler_steps: int  # the steps to sample with: the profiled count, or fewer where chosen
    ladder_of: CacheSchedule  # the schedule whose ladder the node draws
    lines: tuple[str, ...]  # the output schedule's summary first, then what the node shows and logs


def build_for_node(profile: BlockProfile, options: TargetOptions, validation: str = MEASURE,
                   fewer_steps: str = COMPARE, lookahead: str = USE_LOOKAHEAD) -> TargetOutcome:
    """The schedule for ``options``, validated as ``validation`` asks where the profile can sample its run
    again, replaced by a step lookahead where ``lookahead`` asks and one measures better, and compared with (or
    replaced by) fewer steps as ``fewer_steps`` asks."""
    if (validation not in VALIDATION_CHOICES or fewer_steps not in FEWER_STEPS_CHOICES
            or lookahead not in LOOKAHEAD_CHOICES):
        raise ValueError(f"validation must be one of {VALIDATION_CHOICES}, fewer_steps one of {FEWER_STEPS_CHOICES} "
                         f"and lookahead one of {LOOKAHEAD_CHOICES}, got {validation!r}, {fewer_steps!r} and "
                         f"{lookahead!r}")
    validated, fewer_steps, notes = _validation(profile, options, validation, fewer_steps)
    lookahead_lines: list[str] = []
    if validated is None:
        schedule = build_target_schedule(profile, options)
    else:
        schedule = build_validated_schedule(profile, options, validated,
                                            choose_by_measure=validation == CHOOSE_BY_MEASURE,
                                            compare_fewer_steps=fewer_steps != NO_FEWER_STEPS)
    ladder_of = schedule  # the cache's ladder, also where a lookahead replaces its schedule
    if lookahead == USE_LOOKAHEAD and validated is None:
        notes.append("lookahead not tried: it needs validation (the profiled prompts sampled again).")
    elif lookahead == USE_LOOKAHEAD:
        schedule, lookahead_lines = choose_lookahead(profile, options, validated, schedule,
                                                     fewer_steps != NO_FEWER_STEPS)
    build = TargetBuild.of(schedule)
    lines = [schedule.summary(), *_describe(profile, options, schedule, build), *lookahead_lines]
    sampler_steps = schedule.grid.steps
    versus = build.fewer_steps
    if fewer_steps == BEST_OF_THREE and validated is not None:
        schedule, sampler_steps, best_lines = _best_of_three(profile, options, validated, schedule)
        lines += best_lines
        if not schedule.lookahead_steps:
            ladder_of = schedule
    elif versus is not None and build.expected_psnr is not None:
        verdict = (f"{versus.steps} uncached steps ({versus.speedup:.2f}x) measured {versus.measured_psnr:.1f} "
                   f"dB, this schedule ({schedule.estimated_speedup:.2f}x) {versus.schedule_psnr:.1f} dB (the "
                   "second seed's pictures)")
        if not versus.better:
            lines.append(f"better than fewer steps at this cost: {verdict}.")
        elif fewer_steps == USE_WHEN_BETTER:
            schedule = all_compute_schedule(profile.block_map, profile.grid, profile.layer_flops, profile.total_flops)
            sampler_steps = versus.steps
            lines.append(f"FEWER STEPS ARE BETTER here: {verdict}. Switched: this schedule computes everything; "
                         f"sample with {sampler_steps} steps (the 'steps' output).")
        else:
            lines.append(f"FEWER STEPS ARE BETTER here: {verdict}. Sample with {versus.steps} steps "
                         "uncached instead, or set fewer_steps to 'use fewer steps when better'.")
    lines += [*build.notes, *notes]
    return TargetOutcome(schedule, sampler_steps, ladder_of, tuple(lines))


def _validation(profile: BlockProfile, options: TargetOptions, validation: str, fewer_steps: str
                ) -> tuple[HeldOutValidation | None, str, list[str]]:
    """The held-out runs to validate with (None: none), the fewer-steps choice that can be kept, and notes on
    what was skipped and why."""
    validated = None
    notes = []
    if validation != NO_VALIDATION:
        if profile.replays:
            validated = HeldOutValidation.of(profile.replays)
        else:
            notes.append("validation skipped: this profile cannot sample its run again (loaded as JSON, or "
                         "recorded under another sampler by Record Block Changes; for KSamplerAdvanced "
                         "segments, Profile Block Changes (Advanced) can).")
    if validated is None and options.min_psnr:
        notes.append(f"the {options.min_psnr:g} dB floor was not applied: it needs validation (the profiled prompts "
                     "sampled again).")
    if validated is None and fewer_steps != NO_FEWER_STEPS:
        notes.append("fewer steps were not compared: that needs validation.")
    segment = any(not replay.other_step_counts for replay in profile.replays)
    if validated is not None and segment and fewer_steps != NO_FEWER_STEPS:
        notes.append("fewer steps were not compared: this profile is of a segment of a split run, which is "
                     "sampled again with its own steps only.")
        fewer_steps = NO_FEWER_STEPS
    if validated is not None and not all(replay.held_out for replay in profile.replays):
        notes.append("validation read the profiled run itself (a segment that adds no noise, without its earlier "
                     "segment's profile): its figures flatter the schedule by a few dB.")
    return validated, fewer_steps, notes


def _describe(profile: BlockProfile, options: TargetOptions, schedule: CacheSchedule, build: TargetBuild
              ) -> list[str]:
    """What was chosen, what was measured, and why the target was not kept where it was not."""
    steps = schedule.grid.steps
    metric = measure_metric(profile.replays)
    partial = build.chosen_partial
    reused = ("" if partial is None else f" ({', '.join(schedule.layers[i].name for i in partial.layers)} reuse "
              f"at step {partial.step + 1})")
    as_is = build.chosen_as_is_layers
    damped = "" if build.chosen_damping == 1.0 else f", damped to {build.chosen_damping:g} of its move"
    orders = f"forecast order {build.chosen_order}{damped}" + ("" if not as_is else (
        f", 0 (reused as they are) on {', '.join(schedule.layers[i].name for i in as_is)}"))
    chosen = build.lookahead
    if chosen is None:
        lines = [f"computes at steps {list(build.compute_steps)}{reused}; {orders}"]
    else:
        instead = "" if chosen.instead_of_psnr is None else f", {chosen.instead_of_psnr:.1f} dB"
        label = rung_label(len(build.compute_steps), build.chosen_partial, build.chosen_as_is_layers)
        lines = [f"lookahead: the model runs at steps {list(chosen.steps)}, the steps between interpolated; "
                 f"instead of Block Cache's {chosen.instead_of_speedup:.2f}x ({label}{instead}), which "
                 f"computes at steps {list(build.compute_steps)}{reused}; {orders}"]
    for tried in build.measured:
        if tried.seeds > 1:
            status, seed = "checked", "that seed and a second one, which did not choose it"
        else:
            status, seed = "chosen" if tried.schedule_key == build.chosen_key else "tried", "another seed"
        lines.append(f"{status}: {tried.label}, {metric} PSNR {tried.measured_psnr:.1f} dB against uncached on the "
                     f"profiled prompts with {seed}; expected {tried.expected_low:.1f}-{tried.expected_high:.1f} "
                     "dB on other prompts")
    if build.measured and metric == "latent" and profile.grid.sigmas[-1] > 0:
        lines.append("(latent PSNR of a segment that ends with leftover noise: the noise they share makes it read "
                     "far above the pictures', so a floor hardly binds here; which schedule is closer is what it "
                     "tells)")
    elif build.measured and metric == "latent":
        lines.append("(latent PSNR: connect the VAE to Profile Block Changes to measure the pictures)")
    stepped = build.stepped_down_from
    if stepped is not None:
        label = rung_label(stepped.computes, stepped.partial, stepped.as_is_layers)
        lines.append(f"the {options.speedup:g}x target ({stepped.speedup:.2f}x, {label}) "
                     f"is expected below the {options.min_psnr:g} dB floor: stepped down to "
                     f"{schedule.estimated_speedup:.2f}x"
                     + ("" if len(build.compute_steps) < steps else
                        ", computing everything (no faster schedule reached the floor)")
                     + ". Lower min_psnr to keep more speed.")
    elif not build.reached:
        lines.append(f"{options.speedup:g}x is beyond what these options allow; this is the fastest schedule.")
    return lines


def _best_of_three(profile: BlockProfile, options: TargetOptions, validated: HeldOutValidation,
                   schedule: CacheSchedule) -> tuple[CacheSchedule, int, list[str]]:
    """The cache at the profiled steps, uncached fewer steps and the two together, each chosen on the held-out
    seed and read on the second one against the profiled count's uncached pictures; ``best_choice`` picks one."""
    steps = schedule.grid.steps
    choices, note = sampling_choices(profile, options, schedule, lambda count: profile_again(profile, count),
                                     validated.runs.schedule, validated.second.schedule)
    lines = [note] if note else []
    if not choices:
        return schedule, steps, lines
    best = best_choice(choices, options.speedup, options.min_psnr)
    for choice in choices:
        lines.append(f"{'CHOSEN' if choice is best else 'not chosen'}: {choice.label}, {choice.speedup:.2f}x, "
                     f"{choice.mean:.1f} dB measured (expected {choice.low:.1f}+ dB on other prompts)")
    if best.schedule is not schedule:
        lines.append(f"output schedule: {best.schedule.summary()}")
    if best.steps != steps:
        lines.append(f"SAMPLE WITH {best.steps} STEPS: wire the 'steps' output into the sampler (this schedule "
                     f"is built for {best.steps} steps; at {steps} it would be re-timed).")
    return best.schedule, best.steps, lines
