"""The speed-up target's measured choice: which schedule of a rung's cost is kept, and the step down the
ladder to the quality floor.

The error model (block_caching/target_ladder.py) ranks the schedules of one search well, but not schedules of
different searches or forecasts against each other, nor what a picture will read. So a measure (the PSNR of
sampling the profiled prompts again with a schedule, block_caching/replay.py) decides between a rung's
schedules (``measured_choice``) and finds the fastest rung that holds the floor (``step_down``); each schedule
is measured once (``measured_once``) and every measurement is recorded for the node's log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .profile import BlockProfile
from .replay import Measurement, measurement
from .schedule import CacheSchedule
from .target_build import Tried
from .target_ladder import FINE_RUNG_SHARES, Rung, Search, as_is_variants, candidates, rung_schedule

# After the floor's bisection, the rung it found and this many faster rungs (one compute step of the ladder) are
# probed with their other schedules of the same cost, fastest first: one may reach the floor where the bisected
# schedule does not.
FLOOR_REFINE_ABOVE = len(FINE_RUNG_SHARES) + 1


# Schedules of a rung's cost found otherwise than by the search (``alternative_rungs``), labelled.
Alternatives = Sequence[Callable[[Rung], list[tuple[str, Rung]]]]


# How ``measured_choice`` labels the search's own schedule.
OWN_LABEL = "searched"

# Whether a rung's schedule, with its measurement, holds the quality floor.
Holds = Callable[[Rung, Measurement], bool]


def reaches(floor: float) -> Holds:
    """Holds where the low end of the measured range reaches ``floor``."""
    return lambda rung, value: value.low >= floor


def measured_choice(found: Search, profile: BlockProfile, rung: Rung, measured: Callable[[Rung], Measurement],
                    choose_by_measure: bool, per_layer_orders: bool, record: Callable[[Tried], None],
                    alternatives: Alternatives = (), holds: Holds | None = None) -> tuple[Rung, Measurement]:
    """The rung kept and its measurement (at first ``rung``, the search's choice). The ``alternatives``' rungs of
    its cost, with ``choose_by_measure`` its equal-cost ``candidates`` (a fine rung has none) and then, with
    ``per_layer_orders`` (an 'auto' forecast order), the kept one's ``as_is_variants`` are measured too. The
    best of them replaces the kept one only where it ``beats`` it: a few pictures are a noisy judge (on the
    UNet reference model the error model chose about as well as four measured pictures did,
    docs/benchmark.md). But where the kept one misses the floor (``holds``), the best measured that holds it is
    kept: between two readings within their noise the floor decides, and the second held-out seed checks the
    pick (on the Flux reference at 28 steps and 35 dB, steps spread evenly held where the search's own missed,
    within the noise, and the step down went on to a slower rung). Every measurement is passed to ``record`` as
    it is made."""
    seen: list[tuple[Rung, Measurement]] = []

    def better_of(kept: tuple[Rung, Measurement, str], options: list[tuple[str, Rung]]
                  ) -> tuple[Rung, Measurement, str]:
        best = kept
        for label, candidate in options:
            value = measured(candidate)
            seen.append((candidate, value))
            beats = value.beats(kept[1])
            noise = "" if beats or value.mean <= kept[1].mean else " (closer, but within the pictures' noise)"
            record(tried_entry(label + noise, candidate, value))
            if beats and value.mean > best[1].mean:
                best = (candidate, value, label)
        return best

    own_label = f"{OWN_LABEL}, order {rung.order}" + ("" if rung.partial is None else f", {rung.label}")
    own = measured(rung)
    seen.append((rung, own))
    record(tried_entry(own_label, rung, own))
    kept = better_of((rung, own, own_label), other_schedules(found, profile, rung, choose_by_measure, alternatives))
    if choose_by_measure and per_layer_orders:
        kept = better_of(kept, [(f"{kept[2]}, order 0 on {_group_words(group)}", variant)
                                for group, variant in as_is_variants(found, profile, kept[0])])
    if holds is not None and not holds(kept[0], kept[1]):
        others = sorted((option for option in seen if option[0] is not kept[0]), key=lambda option: -option[1].mean)
        return next((option for option in others if holds(*option)), kept[:2])
    return kept[0], kept[1]


def other_schedules(found: Search, profile: BlockProfile, rung: Rung, choose_by_measure: bool,
                    alternatives: Alternatives) -> list[tuple[str, Rung]]:
    """The schedules of ``rung``'s cost other than its own that ``measured_choice`` measures, labelled, each
    once."""
    options = candidates(found, profile, rung.computes) if choose_by_measure and rung.partial is None else []
    for alternative in alternatives:
        options += alternative(rung)
    seen = {schedule_key(rung)}
    unique = []
    for label, candidate in options:
        if schedule_key(candidate) not in seen:
            seen.add(schedule_key(candidate))
            unique.append((label, candidate))
    return unique


def schedule_key(rung: Rung) -> tuple[Any, ...]:
    """What tells two rungs' schedules apart."""
    return rung.steps, rung.order, rung.partial, rung.as_is_layers, rung.damping


def step_down_to_floor(ladder: list[Rung], rung: Rung, holds: Holds, steps: int,
                       probe: Callable[[Rung], tuple[Rung, Measurement]],
                       probe_others: Callable[[Rung], tuple[Rung, Measurement] | None] | None = None,
                       refine: int = 0) -> tuple[Rung | None, Measurement | None]:
    """The fastest rung slower than ``rung`` that ``holds`` the floor (the low end of its measured range reaches
    it: ``reaches``), as a probe keeps and measures it, with its measurement (None: none does, so only computing
    everything will).

    ``probe`` measures a rung (one schedule first, the rung's others where it misses), whose fidelity grows with
    the cost: a bisection probes about log2 of the slower rungs; computing every step (the uncached run) needs
    none. The bisection runs over the whole ladder, the same for every target, and takes a rung not slower than
    ``rung`` as missing the floor unmeasured: so of two targets that both step down, the faster never lands on a
    slower rung (a bisection over the slower rungs alone probed other rungs for each target, and a faster target
    could land slower). A slower target whose own rung holds is probed only where the bisection passes it. Then
    the rung found and the ``refine`` slower rungs just faster than it are probed with their other schedules of
    the same cost (``probe_others``: the schedule kept and its measurement, None where there is no other),
    fastest first: which of several schedules wins does not grow with the cost, so those are not bisected."""
    ordered = sorted((candidate for candidate in ladder if candidate.computes < steps),
                     key=lambda candidate: candidate.flop_fraction)
    first_slower = next((i for i, candidate in enumerate(ordered) if candidate.flop_fraction > rung.flop_fraction),
                        len(ordered))
    low, high = 0, len(ordered)
    found: tuple[Rung | None, Measurement | None] = (None, None)
    while low < high:
        middle = (low + high) // 2
        probed = probe(ordered[middle]) if middle >= first_slower else None
        if probed is not None and holds(*probed):
            found, high = probed, middle
        else:
            low = middle + 1
    if probe_others is not None:
        for candidate in ordered[max(first_slower, low - refine):low + 1]:
            probed_others = probe_others(candidate)
            if probed_others is not None and holds(*probed_others):
                return probed_others
    return found


def step_down(found: Search, profile: BlockProfile, ladder: list[Rung], kept: Rung, holds: Holds,
              measured: Callable[[Rung], Measurement], choose_by_measure: bool, alternatives: Alternatives,
              tried: list[Tried]) -> tuple[Rung | None, Measurement | None]:
    """``step_down_to_floor`` from ``kept`` (what ``measured_choice`` kept at the target's rung): the bisection
    probes each rung with the schedule of the first of the ``alternatives`` that has one of its cost (they come in
    the order they are preferred; the search's own where none has), and where that misses the floor with its other
    schedules too; then the rungs next to the one it finds with all their schedules, paired as ``measured_choice``
    pairs them. The schedule probed first does not depend on the target, so neither does the bisection. Every
    measurement is recorded in ``tried``."""

    def stepped(candidate: Rung, entry: Tried) -> None:
        """``entry`` recorded as measured on the way down (each schedule once)."""
        label = f"stepped down, {candidate.label}" + (
            "" if entry.label.startswith(f"{OWN_LABEL}, order") else f": {entry.label}")
        entry = dataclasses.replace(entry, label=label)
        same = [i for i, t in enumerate(tried) if dataclasses.replace(t, label=label) == entry]
        if same:  # measured once: the later label says more
            tried[same[0]] = entry
        else:
            tried.append(entry)

    def probe(candidate: Rung) -> tuple[Rung, Measurement]:
        """A slower rung's first schedule measured; below the floor, its other schedules too (another search may
        hold it there)."""
        label, schedule = next((options[0] for options in (alternative(candidate) for alternative in alternatives)
                                if options), (f"{OWN_LABEL}, order {candidate.order}", candidate))
        value = measured(schedule)
        stepped(candidate, tried_entry(label, schedule, value))
        if holds(schedule, value):
            return schedule, value
        others = probe_others(candidate)
        return others if others is not None and holds(*others) else (schedule, value)

    def probe_others(candidate: Rung) -> tuple[Rung, Measurement] | None:
        """A slower rung's schedules of the same cost measured, the best kept; None where it has no other."""
        if not other_schedules(found, profile, candidate, choose_by_measure, alternatives):
            return None
        return measured_choice(found, profile, candidate, measured, choose_by_measure, per_layer_orders=False,
                               record=lambda entry: stepped(candidate, entry), alternatives=alternatives,
                               holds=holds)

    return step_down_to_floor(ladder, kept, holds, profile.grid.steps, probe, probe_others, refine=FLOOR_REFINE_ABOVE)


def _group_words(group: str) -> str:
    """An AS_IS_GROUPS group as the node's text names it."""
    return "the cached layers" if group == "all" else f"the {group} of the cached layers"


def measured_once(profile: BlockProfile, layers: list[int], measure: Callable[[CacheSchedule], Measurement | float]
                  ) -> Callable[[Rung], Measurement]:
    """A rung's schedule measured by ``measure``, each schedule once however often it is asked for."""
    values: dict[tuple[Any, ...], Measurement] = {}

    def measured(rung: Rung) -> Measurement:
        key = schedule_key(rung)
        if key not in values:
            values[key] = measurement(measure(rung_schedule(profile, layers, rung, {})))
        return values[key]

    return measured


def tried_entry(label: str, rung: Rung, value: Measurement) -> Tried:
    return Tried(label, rung.steps, rung.order, rung.error, value.mean, value.low, value.high, rung.partial,
                 rung.as_is_layers, rung.damping)
