"""The speed-up target builder: the schedule with the least expected error at a given cost.

A target schedule is *synchronized*: every cacheable layer computes at the same steps (the
compute steps) and is forecast from its last computations at the others (block_caching/forecast.py).
Which steps compute is chosen by the error measured on the profile, not by a threshold:

* The profile's trajectory holds each layer's sketch at every step of the uncached run. So the
  forecast error of reusing at step ``s`` from computations at steps ``h = (a, b, ...)`` is
  measured, not modelled: ``err(s | h) = sum over layers of |forecast - actual|_1 / |output|_1``
  (averaged over samples), weighted by how much step ``s`` moves the latent in that run
  (``Trajectory.step_weights``; an error in the model's output at a big step moves the picture
  more).
* A dynamic program over (compute count, last computations) finds, for every count of compute
  steps, the steps that minimize the summed error: the *ladder*, one best schedule per count, and
  between neighbouring counts two *fine* rungs that reuse some layers at one more step
  (``fine_rungs``).
* The target picks the rung: the slowest whose FLOP-weighted speed-up still reaches the target.
  The forecast order is the one with the least error at that rung (``auto``) or the one asked for.

Why synchronized and not per layer: per-layer errors are not comparable (an error in the last
output layer reaches the picture whole, one in a deep layer is filtered), and a per-layer
allocation by this error model reused the expensive outer layers and lost 9 dB against the
synchronized schedule at equal FLOPs on the reference model (docs/speedup-target.md). Summed over
layers at each step, the error tracks the picture's PSNR (Spearman 0.92 over 33 schedules).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..block_maps.block_map import CACHE_KIND_CHOICES, ReuseMode
from ..errors import ScheduleBuildError
from .forecast import MAX_FORECAST_ORDER, forecast_weights
from .profile import TRAJECTORY_ELEMENTS, BlockProfile
from .replay import Measurement, measurement
from .schedule import (
    CacheSchedule,
    LayerSchedule,
    all_compute_schedule,
    computed_flop_fraction,
    schedule_of_profile,
    validate_step_options,
)
from .target_build import (
    AUTO_ORDER_LABEL,
    CombinedSteps,
    ExpectedPsnr,
    FewerStepsComparison,
    LadderRung,
    PartialStep,
    SteppedDown,
    TargetBuild,
    Tried,
    reused_share,
    rung_label,
)

# The highest target that kept every evaluation set of the reference model and `make demo` at 30+ dB
# mean PSNR (2.5 left the demo's prompt at 28 dB): docs/benchmark.md.
DEFAULT_SPEEDUP = 2.25
FORECAST_ORDER_CHOICES = (AUTO_ORDER_LABEL, *(str(order) for order in range(MAX_FORECAST_ORDER + 1)))
DEFAULT_FORECAST_ORDER = AUTO_ORDER_LABEL
# The Build node's quality floor: where the chosen schedule's PSNR, measured on the profiled run, falls below
# it, the schedule steps down the ladder (more compute steps) until it is reached. 30 dB is where the
# reference models' pictures start to differ visibly from the uncached ones (docs/benchmark.md).
DEFAULT_MIN_PSNR = 30.0
# The longest stretch between two compute steps the search considers unless the user sets one: at
# most 7 forecasts in a row. It does not depend on the target, so one ladder serves every speed-up.
DEFAULT_MAX_GAP = 8


@dataclass(frozen=True)
class TargetOptions:
    speedup: float = DEFAULT_SPEEDUP
    forecast_order: int | None = None  # None: the order with the least error at the chosen rung
    cache_kinds: str = "all"
    always_compute_first: int = 1
    always_compute_last: int = 0
    max_consecutive_reuse: int = 0  # 0: as the search finds best (up to DEFAULT_MAX_GAP - 1)
    min_psnr: float = 0.0  # with a measure: step down the ladder until the measured PSNR reaches it (0: off)

    def validate(self) -> None:
        if not (isinstance(self.speedup, (int, float)) and math.isfinite(self.speedup) and self.speedup >= 1.0):
            raise ValueError(f"speedup must be a finite number >= 1, got {self.speedup!r}")
        order = self.forecast_order
        if order is not None and (isinstance(order, bool) or not isinstance(order, int)
                                  or not 0 <= order <= MAX_FORECAST_ORDER):
            raise ValueError(f"forecast_order must be None (auto) or an integer from 0 to {MAX_FORECAST_ORDER}, "
                             f"got {order!r}")
        if not (isinstance(self.min_psnr, (int, float)) and math.isfinite(self.min_psnr) and self.min_psnr >= 0.0):
            raise ValueError(f"min_psnr must be a finite number >= 0 (0: off), got {self.min_psnr!r}")
        validate_step_options(self)

    def orders(self) -> tuple[int, ...]:
        if self.forecast_order is None:
            return tuple(range(1, MAX_FORECAST_ORDER + 1))
        return (self.forecast_order,)


@dataclass(frozen=True)
class Rung:
    """The best schedule with a given number of compute steps; a *fine* rung also reuses some of the cached
    layers at one of those steps (``partial``), which puts it between two whole-step rungs."""

    computes: int
    steps: tuple[int, ...]  # the compute steps
    order: int
    error: float  # predicted: summed weighted forecast error
    flop_fraction: float
    partial: PartialStep | None = None
    as_is_layers: tuple[int, ...] = ()  # cached layers reused as they are (order 0) whatever ``order`` is
    damping: float = 1.0  # the share of each forecast's move (forecast.forecast_weights)

    def layer_order(self, layer: int) -> int:
        """The forecast order of the cached ``layer`` (a block-map index)."""
        return 0 if layer in self.as_is_layers else self.order

    def layer_damping(self, layer: int) -> float:
        """The damping of the cached ``layer``'s forecast (1 where it has none)."""
        return self.damping if self.layer_order(layer) else 1.0

    def compute_row(self, layer: int, steps: int) -> tuple[bool, ...]:
        """Where the cached ``layer`` (a block-map index) computes."""
        computed = set(self.steps)
        if self.partial is not None and layer in self.partial.layers:
            computed.discard(self.partial.step)
        return tuple(step in computed for step in range(steps))

    @property
    def label(self) -> str:
        return rung_label(self.computes, self.partial, self.as_is_layers)


# Per-layer forecast orders that 'choose by measured PSNR' also measures for the schedule it kept: order 0
# (reuse as is) on the first or the last third of the cached layers, or on all of them. On the video
# reference model the held-out seed's pick kept 2-10 dB more on unseen prompts at 2-2.7x; on the transformer
# it was as often worse as better, so a variant is only taken where it beats the kept schedule by more than
# the pictures' noise (Measurement.beats; docs/speedup-target.md).
AS_IS_GROUPS = ("first third", "last third", "all")

# The step weights' spread (largest over smallest) above which the search with every step weighted alike is
# measured as an alternative: Wan's time shift of 8 gives 48x at 30 and 50 steps, the Flux and SD samplers of
# the reference models 3-10x (docs/speedup-target.md).
EVEN_WEIGHTS_MIN_SPREAD = 20.0

# An order-1 forecast damped to this share of its move (forecast.forecast_weights) is measured as an alternative at
# each rung where the error model predicts it better than the search's own schedule: on the Flux reference at 20
# steps it kept 2.4 dB more on average; on the UNet reference the error model predicts it worse
# (docs/speedup-target.md). There, the same count of compute steps spread evenly is measured too: damped, they kept
# 0.7-3.9 dB more than the damped search's at 2-2.8x on Flux at 20 steps, and less at milder rungs.
DAMPED_FORECAST = 0.5

# A fine rung reuses these shares of the cached layers at one compute step of a whole-step rung, so two
# fine rungs split the FLOPs between neighbouring whole-step rungs in three (issue 22's "no cliff").
FINE_RUNG_SHARES = (1 / 3, 2 / 3)

# After the floor's bisection (over one search's schedules), the rung it found and this many faster rungs (one
# compute step of the ladder: its fine rungs and the next whole-step rung) are probed with their other schedules of
# the same cost, fastest first: one of those may reach the floor where the bisected one does not (on the Flux
# reference at 20 steps the damped schedule one fine rung faster, and steps spread evenly one compute step fewer).
FLOOR_REFINE_ABOVE = len(FINE_RUNG_SHARES) + 1

# Before that bisection, this many next slower rungs are probed with all their schedules: they lose the least speed
# (on the video reference at 50 steps and target 5.5, the next rung held the floor with the evenly weighted search's
# schedule, where the bisection with the damped search's read best at the target and passed over it).
FLOOR_SCAN_FIRST = 1


class StepErrorModel:
    """err(s | h): the weighted forecast error of reusing every cacheable layer at step ``s`` from
    their computations at steps ``h`` (newest first), measured on the profile's trajectory. With
    ``even_step_weights`` every step's error counts alike (their mean weight), not by how far the step
    moves the latent."""

    def __init__(self, profile: BlockProfile, layers: list[int], even_step_weights: bool = False,
                 damping: float = 1.0) -> None:
        trajectory = profile.trajectory
        if trajectory is None:
            raise ScheduleBuildError("the profile has no trajectory")
        self.taus = list(profile.grid.taus)
        self.damping = damping
        weights = list(trajectory.step_weights)
        self.weights = [sum(weights) / len(weights)] * len(weights) if even_step_weights and weights else weights
        blocks, norms = [], []
        for layer in layers:
            sketch = trajectory.sketches[layer]
            stride = max(1, sketch.shape[2] // TRAJECTORY_ELEMENTS)
            blocks.append(sketch[:, :, ::stride] * (sketch.shape[2] / sketch[:, :, ::stride].shape[2]))
            norms.append(trajectory.output_norms[layer].clamp_min(1e-12))
        samples = {b.shape[1] for b in blocks}
        self._sizes = [b.shape[2] for b in blocks]
        if len(samples) == 1:
            self._values = torch.cat(blocks, dim=2).double()  # [steps, samples, elements of all layers]
        else:  # layers measured over different numbers of calls: kept apart
            self._values = None
            self._blocks = [b.double() for b in blocks]
        self._norms = [n.double() for n in norms]  # per layer: [steps, samples]
        self._cache: dict[tuple[int, tuple[int, ...]], tuple[float, tuple[float, ...]]] = {}

    @property
    def layer_count(self) -> int:
        return len(self._norms)

    def error(self, step: int, history: tuple[int, ...]) -> float:
        return self._measured(step, history)[0]

    def layer_errors(self, step: int, history: tuple[int, ...]) -> tuple[float, ...]:
        """Each cached layer's part of ``error(step, history)``, in the order of the model's layers."""
        return self._measured(step, history)[1]

    def _measured(self, step: int, history: tuple[int, ...]) -> tuple[float, tuple[float, ...]]:
        """(the weighted error, its per-layer parts), measured once per (step, history)."""
        key = (step, history)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        weights = forecast_weights([self.taus[h] for h in history], self.taus[step], self.damping)
        if self._values is not None:
            forecast = sum(w * self._values[h] for w, h in zip(weights, history, strict=True))
            deviation = (forecast - self._values[step]).abs()
            per_layer = torch.split(deviation, self._sizes, dim=1)
            raw = tuple(float((part.sum(1) / norm[step]).mean()) for part, norm in zip(per_layer, self._norms,
                                                                                       strict=True))
        else:
            raw = tuple(
                float(((sum(w * block[h] for w, h in zip(weights, history, strict=True)) - block[step]).abs().sum(1)
                       / norm[step]).mean())
                for block, norm in zip(self._blocks, self._norms, strict=True))
        weight = self.weights[step]
        result = (sum(raw) * weight, tuple(value * weight for value in raw))
        self._cache[key] = result
        return result


def best_schedules(model: StepErrorModel, steps: int, order: int, forced: list[bool], max_gap: int
                   ) -> dict[int, tuple[float, tuple[int, ...]]]:
    """For every count of compute steps: (least summed error, the compute steps).

    Step 0 always computes; ``forced`` steps compute; two compute steps are at most ``max_gap``
    apart, and the last one at most ``max_gap`` before the end (so at most max_gap - 1 reuses in a
    row). Ties keep the first found, so the result is deterministic.
    """
    depth = order + 1
    # layer[count]: history (newest first) -> (cost, compute steps)
    states: dict[tuple[int, ...], tuple[float, tuple[int, ...]]] = {(0,): (0.0, (0,))}
    by_count: list[dict[tuple[int, ...], tuple[float, tuple[int, ...]]]] = [{}, states]
    results: dict[int, tuple[float, tuple[int, ...]]] = {}
    next_forced = [steps] * (steps + 1)
    for s in range(steps - 1, -1, -1):
        next_forced[s] = s if forced[s] else next_forced[s + 1]
    for count in range(1, steps + 1):
        current = by_count[count]
        following: dict[tuple[int, ...], tuple[float, tuple[int, ...]]] = {}
        for history in sorted(current):
            cost, chosen = current[history]
            newest = history[0]
            limit = min(steps - 1, newest + max_gap, next_forced[newest + 1])
            reuse_cost = 0.0
            for nxt in range(newest + 1, limit + 1):
                candidate = cost + reuse_cost
                key = ((nxt, *history))[:depth]
                if key not in following or candidate < following[key][0]:
                    following[key] = (candidate, (*chosen, nxt))
                reuse_cost += model.error(nxt, history)
            if next_forced[newest + 1] >= steps and steps - newest <= max_gap:
                # Reuse to the end.
                final = cost + sum(model.error(s, history) for s in range(newest + 1, steps))
                if count not in results or final < results[count][0]:
                    results[count] = (final, chosen)
        if not following:
            break
        by_count.append(following)
    return results


@dataclass(frozen=True)
class Search:
    """What the search found on a profile: per forecast order, the best compute steps for every count."""

    per_order: dict[int, dict[int, tuple[float, tuple[int, ...]]]]
    layers: list[int]  # the cacheable layers (block-map indices)
    forced: list[bool]
    max_gap: int
    model: StepErrorModel
    notes: list[str]


def search(profile: BlockProfile, options: TargetOptions, even_step_weights: bool = False,
           damping: float = 1.0) -> Search:
    """The best compute steps for every count and order, by the error model (``StepErrorModel``) of a forecast
    with that ``damping``."""
    options.validate()
    trajectory = profile.trajectory
    if trajectory is None:
        raise ScheduleBuildError(
            "This profile has no trajectory (it was loaded from JSON, or made by an older version), so the speed-up "
            "target cannot measure errors on it. Profile again with Profile Block Changes, or use Build Cache "
            "Schedule (threshold)."
        )
    steps = profile.grid.steps
    allowed = CACHE_KIND_CHOICES[options.cache_kinds]
    notes = []
    layers = [i for i, spec in enumerate(profile.block_map.layers)
              if spec.kind in allowed and trajectory.sketches[i] is not None]
    unmeasured = [spec.name for i, spec in enumerate(profile.block_map.layers)
                  if spec.kind in allowed and trajectory.sketches[i] is None]
    if unmeasured:
        notes.append(f"{len(unmeasured)} layers were not measured at every step and always compute: "
                     + ", ".join(unmeasured[:5]) + (" ..." if len(unmeasured) > 5 else ""))
    if not layers:
        raise ScheduleBuildError(f"No layer of kind '{options.cache_kinds}' was measured at every step of the profile; "
                                 "nothing can be cached. Choose other cache_kinds or profile again.")
    first = max(1, options.always_compute_first)
    forced = [s < first or s >= steps - options.always_compute_last for s in range(steps)]
    max_gap = options.max_consecutive_reuse + 1 if options.max_consecutive_reuse else DEFAULT_MAX_GAP
    model = StepErrorModel(profile, layers, even_step_weights, damping)
    per_order = {order: best_schedules(model, steps, order, forced, max_gap) for order in options.orders()}
    return Search(per_order, layers, forced, max_gap, model, notes)


def whole_step_ladder(found: Search, profile: BlockProfile) -> list[Rung]:
    """Every count's best schedule over the orders searched (ties keep the lower order)."""
    ladder: dict[int, Rung] = {}
    for order, results in found.per_order.items():
        for count, (error, chosen) in results.items():
            if count not in ladder or error < ladder[count].error:
                ladder[count] = _with_flop_fraction(profile, found.layers, Rung(count, chosen, order, error, 0.0,
                                                                                damping=found.model.damping))
    return [ladder[c] for c in sorted(ladder)]


def ladder_of(found: Search, profile: BlockProfile) -> list[Rung]:
    """The whole-step rungs and the fine rungs between them, from the fastest to the slowest."""
    whole = whole_step_ladder(found, profile)
    return sorted(whole + fine_rungs(found, profile, whole), key=lambda rung: (rung.flop_fraction, rung.error))


def fine_rungs(found: Search, profile: BlockProfile, whole: list[Rung]) -> list[Rung]:
    """Between neighbouring whole-step rungs: each whole-step rung with a run of neighbouring cached layers
    (a FINE_RUNG_SHARES share of them) reused at one of its compute steps, so it costs less than that rung
    and more than the next faster one.

    Of the rung's compute steps and the runs of that many neighbouring layers, the one
    whose reuse there adds the least predicted error. Only layers that reuse their residual qualify: a
    layer reused whole (a down- or upsampler) would throw away what the layers before it computed. Dropping
    one step may change which steps are best for the faster whole rung, so the fine rungs fill the FLOPs
    between the two, not their schedules.
    """
    steps, layers, model = profile.grid.steps, found.layers, found.model
    count = len(layers)
    residual = [ReuseMode.RESIDUAL in profile.block_map.layers[layer].reuse_modes for layer in layers]
    sizes = sorted({min(count - 1, max(1, round(share * count))) for share in FINE_RUNG_SHARES}) if count > 1 else []
    result = []
    for rung in whole:
        if rung.computes >= steps:
            continue
        base = _layer_error_totals(model, steps, rung.steps, rung.order)
        best: dict[int, tuple[float, PartialStep]] = {}
        for step in rung.steps:
            fewer = tuple(s for s in rung.steps if s != step)
            if found.forced[step] or not _gaps_fit(fewer, steps, found.max_gap):
                continue
            added = [after - before for after, before in
                     zip(_layer_error_totals(model, steps, fewer, rung.order), base, strict=True)]
            for size in sizes:
                for start in range(count - size + 1):
                    if not all(residual[start:start + size]):
                        continue
                    extra = sum(added[start:start + size])
                    if size not in best or extra < best[size][0]:
                        best[size] = (extra, PartialStep(step, tuple(layers[start:start + size])))
        for extra, partial in best.values():
            result.append(_with_flop_fraction(profile, layers, dataclasses.replace(rung, error=sum(base) + extra,
                                                                                   partial=partial)))
    return result


def _gaps_fit(compute_steps: tuple[int, ...], steps: int, max_gap: int) -> bool:
    """Whether no two compute steps, nor the last and the end, are more than ``max_gap`` apart."""
    bounds = (*compute_steps, steps)
    return all(b - a <= max_gap for a, b in zip(bounds, bounds[1:], strict=False))


def _layer_error_totals(model: StepErrorModel, steps: int, compute_steps: tuple[int, ...], order: int
                        ) -> list[float]:
    """Per cached layer: the error model's summed error of computing at ``compute_steps`` only."""
    totals = [0.0] * model.layer_count
    for step, history in _reuse_histories(steps, compute_steps, order):
        for i, value in enumerate(model.layer_errors(step, history)):
            totals[i] += value
    return totals


def build_ladder(profile: BlockProfile, options: TargetOptions) -> tuple[list[Rung], list[int], list[str]]:
    """Every count's best schedule (the ladder), the layers it caches, and notes for the log."""
    found = search(profile, options)
    return ladder_of(found, profile), found.layers, found.notes


def evenly_spread_steps(steps: int, count: int) -> tuple[int, ...]:
    """``count`` compute steps of ``steps`` spread evenly from the first step to the last, both included."""
    return tuple(round(i * (steps - 1) / (count - 1)) for i in range(count)) if count > 1 else (0,)


def evenly_spread_ladder(found: Search, profile: BlockProfile) -> list[Rung]:
    """``whole_step_ladder`` with every count's compute steps spread evenly from the first step to the last
    (``evenly_spread_steps``, where ``found``'s forced steps and longest reuse allow it) instead of searched, at
    the order of ``found``'s that predicts them best. No fine rungs: one count's steps spread evenly, less some
    layers at one step, are not between two counts' spread evenly (on the Flux reference at 28 steps they kept
    less than the faster whole-step rung)."""
    steps = profile.grid.steps
    whole: dict[int, Rung] = {}
    for count in range(2, steps):
        even = evenly_spread_steps(steps, count)
        if not all(s in even for s in range(steps) if found.forced[s]) or not _gaps_fit(even, steps, found.max_gap):
            continue
        for order in sorted(found.per_order):
            error = predicted_error(found.model, steps, even, order)
            if count not in whole or error < whole[count].error:
                whole[count] = _with_flop_fraction(profile, found.layers, Rung(count, even, order, error, 0.0,
                                                                               damping=found.model.damping))
    return [whole[count] for count in sorted(whole)]


def candidates(found: Search, profile: BlockProfile, count: int) -> list[tuple[str, Rung]]:
    """Schedules of equal cost (``count`` compute steps) to choose from by measurement: the search's best for
    each order, and compute steps spread evenly from the first step to the last (as TeaCache's rule computes
    them; on the video reference model they kept 3-12 dB more than the search's below 3x,
    docs/benchmark-video.md) with each order."""
    steps = profile.grid.steps
    found_steps: list[tuple[str, tuple[int, ...], int]] = []
    for order, results in found.per_order.items():
        if count in results:
            found_steps.append((f"searched, order {order}", results[count][1], order))
    even = evenly_spread_steps(steps, count)
    gaps = [b - a for a, b in zip(even, (*even[1:], steps), strict=True)]
    if all(s in even for s in range(steps) if found.forced[s]) and max(gaps) <= found.max_gap:
        found_steps += [(f"evenly spaced, order {order}", even, order) for order in found.per_order]
    result: list[tuple[str, Rung]] = []
    seen = set()
    for label, chosen, order in found_steps:
        if (chosen, order) in seen:
            continue
        seen.add((chosen, order))
        error = predicted_error(found.model, steps, chosen, order)
        result.append((label, _with_flop_fraction(profile, found.layers, Rung(count, chosen, order, error, 0.0,
                                                                              damping=found.model.damping))))
    return result


def predicted_error(model: StepErrorModel, steps: int, compute_steps: tuple[int, ...], order: int) -> float:
    """The error model's summed error of a schedule (what the search minimizes)."""
    total = 0.0
    for step, history in _reuse_histories(steps, compute_steps, order):
        total += model.error(step, history)
    return total


def _reuse_histories(steps: int, compute_steps: tuple[int, ...], order: int) -> list[tuple[int, tuple[int, ...]]]:
    """Each reuse step of a schedule, with the computations its forecast reads (newest first)."""
    return [(step, tuple(c for c in reversed(compute_steps) if c < step)[: order + 1])
            for step in range(steps) if step not in compute_steps]


def _with_flop_fraction(profile: BlockProfile, layers: list[int], rung: Rung) -> Rung:
    return dataclasses.replace(rung, flop_fraction=_flop_fraction(profile, layers, rung))


def _flop_fraction(profile: BlockProfile, layers: list[int], rung: Rung) -> float:
    mask = np.ones((len(profile.block_map.layers), profile.grid.steps), dtype=bool)
    for layer in layers:
        mask[layer] = rung.compute_row(layer, profile.grid.steps)
    return computed_flop_fraction(mask, profile.layer_flops, profile.total_flops)


def choose_rung(ladder: list[Rung], speedup: float) -> Rung:
    """The slowest rung that still reaches ``speedup`` (the most FLOPs within it), else the fastest."""
    reaching = [rung for rung in ladder if rung.flop_fraction <= 1.0 / speedup + 1e-12]
    if reaching:
        return max(reaching, key=lambda rung: (rung.flop_fraction, -rung.error))
    return min(ladder, key=lambda rung: rung.flop_fraction)


# Schedules of a rung's cost found otherwise than by the search (``alternative_rungs``), labelled.
Alternatives = Sequence[Callable[[Rung], list[tuple[str, Rung]]]]


def _measured_choice(found: Search, profile: BlockProfile, rung: Rung, measured: Callable[[Rung], Measurement],
                     choose_by_measure: bool, per_layer_orders: bool, tried: list[Tried],
                     alternatives: Alternatives = ()) -> tuple[Rung, Measurement]:
    """The rung kept and its measurement (at first ``rung``, the search's choice). The ``alternatives``' rungs of
    its cost, with ``choose_by_measure`` its equal-cost ``candidates`` (a fine rung has none) and then, with
    ``per_layer_orders`` (an 'auto' forecast order), the kept one's ``as_is_variants`` are measured too. The
    best of them replaces the kept one only where it ``beats`` it: a few pictures are a noisy judge (on the
    UNet reference model the error model chose about as well as four measured pictures did,
    docs/benchmark.md). Every measurement is appended to ``tried``."""

    def better_of(kept: tuple[Rung, Measurement, str], options: list[tuple[str, Rung]]
                  ) -> tuple[Rung, Measurement, str]:
        best = kept
        for label, candidate in options:
            value = measured(candidate)
            beats = value.beats(kept[1])
            noise = "" if beats or value.mean <= kept[1].mean else " (closer, but within the pictures' noise)"
            tried.append(_tried(label + noise, candidate, value))
            if beats and value.mean > best[1].mean:
                best = (candidate, value, label)
        return best

    own_label = f"{OWN_LABEL}, order {rung.order}" + ("" if rung.partial is None else f", {rung.label}")
    own = measured(rung)
    tried.append(_tried(own_label, rung, own))
    kept = better_of((rung, own, own_label), _other_schedules(found, profile, rung, choose_by_measure, alternatives))
    if choose_by_measure and per_layer_orders:
        kept = better_of(kept, [(f"{kept[2]}, order 0 on {_group_words(group)}", variant)
                                for group, variant in as_is_variants(found, profile, kept[0])])
    return kept[0], kept[1]


# How ``_measured_choice`` labels the search's own schedule.
OWN_LABEL = "searched"


def _other_schedules(found: Search, profile: BlockProfile, rung: Rung, choose_by_measure: bool,
                     alternatives: Alternatives) -> list[tuple[str, Rung]]:
    """The schedules of ``rung``'s cost other than its own that ``_measured_choice`` measures, labelled, each
    once."""
    options = candidates(found, profile, rung.computes) if choose_by_measure and rung.partial is None else []
    for alternative in alternatives:
        options += alternative(rung)
    seen = {_schedule_key(rung)}
    unique = []
    for label, candidate in options:
        if _schedule_key(candidate) not in seen:
            seen.add(_schedule_key(candidate))
            unique.append((label, candidate))
    return unique


def _schedule_key(rung: Rung) -> tuple[Any, ...]:
    """What tells two rungs' schedules apart."""
    return rung.steps, rung.order, rung.partial, rung.as_is_layers, rung.damping


def step_weight_spread(weights: list[float]) -> float:
    """How many times the largest step weight is the smallest (of the steps that move the latent at all)."""
    moving = [w for w in weights if w > 0]
    return max(moving) / min(moving) if moving else 1.0


def alternative_rungs(profile: BlockProfile, options: TargetOptions, found: Search, label: str,
                      even_step_weights: bool = False, damping: float = 1.0, if_predicted_better: bool = False,
                      evenly_spread: bool = False) -> Callable[[Rung], list[tuple[str, Rung]]]:
    """For a rung of ``found``'s ladder: the rung of its cost (as many compute steps, and a fine rung's share
    of reused layers) of the ladder searched with every step's error weighted alike, or for a forecast with
    another ``damping``, or with ``evenly_spread`` the ladder of ``evenly_spread_ladder`` (for that forecast),
    labelled, with its error by the error model of its own forecast and ``found``'s step weights. The search is
    made when first asked for. With ``if_predicted_better``, only where that error is below the rung's own.

    Why every step weighted alike: the error model weights each step by how far it moves the latent, and under a
    strong time shift (Wan's 8) these weights span 30-50-fold, the largest at the end, so the search packs its
    computations there. On the video reference model the search with even weights kept 5 dB more on unseen
    prompts; on the Flux and UNet reference models, whose weights span 3-10x, 0.1-1 dB less, and the held-out
    seed read its schedules 1-2 dB high there (docs/speedup-target.md). So it is offered only where the weights
    span more than EVEN_WEIGHTS_MIN_SPREAD, and kept only where measured better. Why damped: DAMPED_FORECAST."""
    ladder: list[Rung] = []

    def of_cost(like: Rung) -> list[tuple[str, Rung]]:
        if not ladder:
            searched = search(profile, options, even_step_weights, damping)
            ladder.extend(evenly_spread_ladder(searched, profile) if evenly_spread else ladder_of(searched, profile))
        steps = profile.grid.steps
        result = []
        for rung in ladder:
            if rung.computes != like.computes or reused_share(rung.partial) != reused_share(like.partial):
                continue
            if even_step_weights:  # its own error model weighs the steps otherwise
                rung = dataclasses.replace(rung, error=rung_error(found.model, steps, found.layers, rung))
            if if_predicted_better and rung.error >= like.error:
                continue
            result.append((f"{label}, order {rung.order}" + ("" if rung.partial is None else f", {rung.label}"),
                           rung))
        return result

    return of_cost


def step_down_to_floor(ladder: list[Rung], rung: Rung, floor: float, steps: int,
                       probe: Callable[[Rung], tuple[Rung, Measurement]],
                       probe_others: Callable[[Rung], tuple[Rung, Measurement] | None] | None = None,
                       refine: int = 0, bisected: Callable[[Rung], bool] | None = None, scan_first: int = 0
                       ) -> tuple[Rung | None, Measurement | None]:
    """The fastest rung slower than ``rung`` whose expected PSNR on other prompts (the low end of its measured
    range) reaches ``floor``, as a probe keeps and measures it, with its measurement (None: none does, so only
    computing everything will).

    ``probe`` measures one schedule of a rung, all of one search, whose fidelity grows with the cost: a
    bisection over the slower rungs (those ``bisected`` says that search has, all where it has none) probes
    about log2 of their number; computing every step (the uncached run) needs none. Then the rung found and the
    ``refine`` slower rungs just faster than it are probed with their other schedules of the same cost
    (``probe_others``: the schedule kept and its measurement, None where there is no other), fastest first:
    which of several schedules wins does not grow with the cost, so those are not bisected. Before all that,
    the ``scan_first`` next slower rungs are probed one by one, with their other schedules where they have any."""
    slower = sorted((candidate for candidate in ladder
                     if candidate.flop_fraction > rung.flop_fraction and candidate.computes < steps),
                    key=lambda candidate: candidate.flop_fraction)
    for candidate in slower[:scan_first]:
        probed = (probe_others(candidate) if probe_others is not None else None) or probe(candidate)
        if probed[1].low >= floor:
            return probed
    slower = slower[scan_first:]
    over = [candidate for candidate in slower if bisected is None or bisected(candidate)] or slower
    low, high = 0, len(over)
    found: tuple[Rung | None, Measurement | None] = (None, None)
    while low < high:
        middle = (low + high) // 2
        kept, value = probe(over[middle])
        if value.low >= floor:
            found, high = (kept, value), middle
        else:
            low = middle + 1
    if probe_others is not None:
        start = slower.index(over[low]) if low < len(over) else len(slower)
        for candidate in slower[max(0, start - refine):start + 1]:
            probed = probe_others(candidate)
            if probed is not None and probed[1].low >= floor:
                return probed
    return found


def _step_down(found: Search, profile: BlockProfile, ladder: list[Rung], target_rung: Rung, kept: Rung,
               floor: float, measured: Callable[[Rung], Measurement], choose_by_measure: bool,
               alternatives: Alternatives, tried: list[Tried]) -> tuple[Rung | None, Measurement | None]:
    """``step_down_to_floor`` from ``kept`` (what ``_measured_choice`` kept at ``target_rung``): the bisection
    with the search whose schedule read best at the target's rung (a rung where it misses the floor measured with
    its other schedules too), then the rungs next to the one it finds with all their schedules, paired as
    ``_measured_choice`` pairs them. Every measurement is recorded in ``tried``."""

    def reading(alternative: Callable[[Rung], list[tuple[str, Rung]]]) -> float:
        return max((measured(other).mean for _, other in alternative(target_rung)), default=-math.inf)

    best = max(alternatives, key=reading, default=None)
    leading = best if best is not None and reading(best) > measured(target_rung).mean else None

    def stepped(candidate: Rung, probed: list[Tried]) -> None:
        """``probed`` recorded as measured on the way down (each schedule once)."""
        for entry in probed:
            label = f"stepped down, {candidate.label}" + (
                "" if entry.label.startswith(f"{OWN_LABEL}, order") else f": {entry.label}")
            entry = dataclasses.replace(entry, label=label)
            same = [i for i, t in enumerate(tried) if dataclasses.replace(t, label=label) == entry]
            if same:  # measured once: the later label says more
                tried[same[0]] = entry
            else:
                tried.append(entry)

    def probe(candidate: Rung) -> tuple[Rung, Measurement]:
        """A slower rung's schedule of the leading search (the search's own where it has none) measured; below the
        floor, its other schedules too (another search may hold it there)."""
        options_of_cost = leading(candidate) if leading is not None else []
        label, schedule = options_of_cost[0] if options_of_cost else (f"{OWN_LABEL}, order {candidate.order}",
                                                                      candidate)
        value = measured(schedule)
        stepped(candidate, [_tried(label, schedule, value)])
        if value.low >= floor:
            return schedule, value
        others = probe_others(candidate)
        return others if others is not None and others[1].low >= floor else (schedule, value)

    def probe_others(candidate: Rung) -> tuple[Rung, Measurement] | None:
        """A slower rung's schedules of the same cost measured, the best kept; None where it has no other."""
        if not _other_schedules(found, profile, candidate, choose_by_measure, alternatives):
            return None
        probed: list[Tried] = []
        result = _measured_choice(found, profile, candidate, measured, choose_by_measure, per_layer_orders=False,
                                  tried=probed, alternatives=alternatives)
        stepped(candidate, probed)
        return result

    return step_down_to_floor(ladder, kept, floor, profile.grid.steps, probe, probe_others,
                              refine=FLOOR_REFINE_ABOVE, scan_first=FLOOR_SCAN_FIRST,
                              bisected=None if leading is None else lambda candidate: bool(leading(candidate)))


def as_is_variants(found: Search, profile: BlockProfile, rung: Rung) -> list[tuple[str, Rung]]:
    """``rung`` with order 0 on each AS_IS_GROUPS group of the cached layers (groups that coincide, with few
    layers, once), with the group's name; none for a rung whose order is 0 already."""
    if rung.order == 0:
        return []
    layers = found.layers
    model = found.model if rung.damping == found.model.damping else StepErrorModel(profile, layers,
                                                                                  damping=rung.damping)
    third = max(1, len(layers) // 3)
    groups = {"first third": layers[:third], "last third": layers[-third:], "all": layers}
    variants, seen = [], set()
    for name in AS_IS_GROUPS:
        as_is = tuple(groups[name])
        if as_is in seen:
            continue
        seen.add(as_is)
        variant = dataclasses.replace(rung, as_is_layers=as_is)
        error = rung_error(model, profile.grid.steps, layers, variant)
        variants.append((name, dataclasses.replace(variant, error=error)))
    return variants


def _group_words(group: str) -> str:
    """An AS_IS_GROUPS group as the node's text names it."""
    return "the cached layers" if group == "all" else f"the {group} of the cached layers"


def rung_error(model: StepErrorModel, steps: int, layers: list[int], rung: Rung) -> float:
    """The error model's summed error of a rung, each cached layer with its own compute steps and order."""
    total = 0.0
    for position, layer in enumerate(layers):
        row = rung.compute_row(layer, steps)
        computed = tuple(step for step in range(steps) if row[step])
        for step, history in _reuse_histories(steps, computed, rung.layer_order(layer)):
            total += model.layer_errors(step, history)[position]
    return total


def _measured_once(profile: BlockProfile, layers: list[int], measure: Callable[[CacheSchedule], Measurement | float]
                   ) -> Callable[[Rung], Measurement]:
    """A rung's schedule measured by ``measure``, each schedule once however often it is asked for."""
    values: dict[tuple[Any, ...], Measurement] = {}

    def measured(rung: Rung) -> Measurement:
        key = _schedule_key(rung)
        if key not in values:
            values[key] = measurement(measure(_schedule(profile, layers, rung, {})))
        return values[key]

    return measured


def _tried(label: str, rung: Rung, value: Measurement) -> Tried:
    return Tried(label, rung.steps, rung.order, rung.error, value.mean, value.low, value.high, rung.partial,
                 rung.as_is_layers, rung.damping)


def _schedule(profile: BlockProfile, layers: list[int], rung: Rung, builder: dict[str, Any]) -> CacheSchedule:
    cached = set(layers)
    layer_schedules = []
    for index, spec in enumerate(profile.block_map.layers):
        reuse = ReuseMode.RESIDUAL if ReuseMode.RESIDUAL in spec.reuse_modes else ReuseMode.OUTPUT
        compute_row = rung.compute_row(index, profile.grid.steps)
        if index in cached and not all(compute_row):
            layer_schedules.append(LayerSchedule(spec.name, spec.kind, reuse, compute_row,
                                                 forecast_order=rung.layer_order(index),
                                                 forecast_damping=rung.layer_damping(index)))
        else:
            layer_schedules.append(LayerSchedule(spec.name, spec.kind, reuse, (True,) * profile.grid.steps))
    return schedule_of_profile(profile, layer_schedules, builder)


def build_target_schedule(profile: BlockProfile, options: TargetOptions,
                          measure: Callable[[CacheSchedule], Measurement | float] | None = None,
                          choose_by_measure: bool = False, metric: str = "",
                          fewer_steps: Callable[[int], Measurement | float] | None = None) -> CacheSchedule:
    """The schedule for ``options.speedup``: the error model's best at that cost.

    ``measure`` (a schedule's fidelity, higher is better: the PSNR of sampling the profiled prompts again
    with it, block_caching/replay.py; ``metric`` says of what) validates the choice: its value is
    recorded. Where the step weights span more than EVEN_WEIGHTS_MIN_SPREAD, the schedule of that cost
    searched with every step weighted alike is measured too, and where the error model predicts the search for a
    forecast damped to DAMPED_FORECAST better, its schedule and the one with the steps spread evenly for that
    forecast (``alternative_rungs``), and with ``choose_by_measure`` other schedules of that cost; one may replace
    it (``_measured_choice``). With ``options.min_psnr``, where the expected PSNR on other prompts (the low end
    of the measured range) of the choice is below it, the choice steps down the ladder to the fastest rung that
    reaches it (``step_down_to_floor``: a bisection with the search that read best at the target's rung, then
    the rungs next to the one found with all their schedules), or to computing everything. ``fewer_steps`` (the
    same measure of uncached sampling with fewer steps) compares the choice with fewer steps at its cost.
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
    notes = list(found.notes)
    if measure is not None and rung.computes < steps:
        measured = _measured_once(profile, found.layers, measure)
        spread = step_weight_spread(found.model.weights)
        alternatives = []
        if spread > EVEN_WEIGHTS_MIN_SPREAD:
            alternatives.append(alternative_rungs(profile, options, found, "every step weighted alike",
                                                  even_step_weights=True))
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
        target_rung = rung
        rung, chosen = _measured_choice(found, profile, rung, measured, choose_by_measure,
                                        per_layer_orders=options.forecast_order is None, tried=tried,
                                        alternatives=alternatives)
        # Another schedule is kept only where it clearly beats the search's own, so its reading carries the floor.
        if options.min_psnr and chosen.low < options.min_psnr:
            stepped_from = rung
            floor_rung, chosen = _step_down(found, profile, ladder, target_rung, rung, options.min_psnr, measured,
                                            choose_by_measure, alternatives, tried)
            rung = floor_rung or Rung(steps, tuple(range(steps)), 0, 0.0, 1.0)
        if spread <= EVEN_WEIGHTS_MIN_SPREAD and (choose_by_measure or stepped_from is not None):
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
        versus = FewerStepsComparison(count, steps / count, value.mean, value.low, value.high, value.mean >= chosen.mean)
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
        chosen_by="measured" if tried and (choose_by_measure or _schedule_key(rung) not in {
            _schedule_key(r) for r in ladder}) else "predicted",
        predicted_error=rung.error,
        reached=rung.flop_fraction <= 1.0 / options.speedup + 1e-12,
        ladder=tuple(LadderRung(r.computes, r.order, r.error, r.flop_fraction, r.steps, r.partial) for r in ladder),
        measured=tuple(tried),
        measured_metric=metric if tried else "",
        stepped_down_from=None if stepped_from is None else SteppedDown(
            stepped_from.computes, stepped_from.order, 1.0 / stepped_from.flop_fraction, stepped_from.steps,
            stepped_from.partial, stepped_from.as_is_layers),
        expected_psnr=None if chosen is None else ExpectedPsnr(chosen.mean, chosen.low, chosen.high,
                                                               len(chosen.pictures)),
        fewer_steps=versus,
        notes=tuple(notes),
    )
    return _schedule(profile, found.layers, rung, build.to_json())


def combined_step_count(steps: int, speedup: float) -> int:
    """The sampler steps for fewer steps with the cache: the two share the speed-up evenly (each gives its
    square root), where each loses least (docs/benchmark/unseen: fewer steps with the cache)."""
    return max(2, min(steps - 1, round(steps / math.sqrt(speedup))))


def build_combined_schedule(profile: BlockProfile, options: TargetOptions,
                            profile_at: Callable[[int], BlockProfile],
                            measure: Callable[[CacheSchedule], Measurement | float]) -> CacheSchedule | None:
    """Fewer sampler steps and the cache together for ``options.speedup``: a profile at
    ``combined_step_count`` steps (``profile_at``), and the speed-up target's schedule for it at the speed-up
    the fewer steps leave, floor included; ``measure`` compares it with the profiled count's uncached
    pictures. None where the profiled run is too short to sample with fewer steps."""
    steps = profile.grid.steps
    count = combined_step_count(steps, options.speedup)
    if steps < 3 or count >= steps:
        return None
    fewer = profile_at(count)
    remaining = max(1.0, options.speedup * count / steps)
    schedule = build_target_schedule(fewer, dataclasses.replace(options, speedup=remaining), measure)
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
                     measure: Callable[[CacheSchedule], Measurement | float]) -> tuple[list[SamplingChoice], str]:
    """What ``best_choice`` picks from for a built ``schedule`` (``build_target_schedule`` with a measure and
    fewer steps compared): the cache at the profiled steps, uncached fewer steps at its cost, and fewer steps
    with the cache (``build_combined_schedule``), each where it was measured; and a note where the
    combination was not (empty otherwise)."""
    steps, build = schedule.grid.steps, TargetBuild.of(schedule)
    choices = []
    if build.expected_psnr is not None:
        measured = build.expected_psnr
        choices.append(SamplingChoice(f"Block Cache at {steps} steps", steps, schedule, schedule.estimated_speedup,
                                      measured.mean, measured.low))
    elif schedule.compute_mask().all():
        choices.append(SamplingChoice(f"uncached at {steps} steps", steps, schedule, 1.0, 100.0, 100.0))
    versus = build.fewer_steps
    if versus is not None:
        choices.append(SamplingChoice(
            f"uncached at {versus.steps} steps", versus.steps,
            all_compute_schedule(profile.block_map, profile.grid, profile.layer_flops, profile.total_flops),
            versus.speedup, versus.measured_psnr, versus.expected_low))
    combined = build_combined_schedule(profile, options, profile_at, measure)
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
