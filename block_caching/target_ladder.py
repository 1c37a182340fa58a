"""The speed-up target's search: for every cost, the schedule with the least expected error.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..block_maps.block_map import CACHE_KIND_CHOICES, ReuseMode
from ..errors import ScheduleBuildError
from .forecast import forecast_weights
from .profile import TRAJECTORY_ELEMENTS, BlockProfile
from .schedule import CacheSchedule, LayerSchedule, computed_flop_fraction, schedule_of_profile
from .target_build import DEFAULT_MAX_GAP, PartialStep, TargetOptions, reused_share, rung_label


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


# Per-layer forecast orders that 'choose by measured PSNR' also measures for the schedule it kept: order 0 (reuse
# as is) on the first or last third of the cached layers, or all; taken only where it beats the kept schedule by
# more than the pictures' noise (Measurement.beats): it helps video, not the transformer (docs/speedup-target.md).
AS_IS_GROUPS = ("first third", "last third", "all")

# A fine rung reuses these shares of the cached layers at one compute step of a whole-step rung, so two
# fine rungs split the FLOPs between neighbouring whole-step rungs in three (issue 22's "no cliff").
FINE_RUNG_SHARES = (1 / 3, 2 / 3)


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
                ladder[count] = with_flop_fraction(profile, found.layers, Rung(count, chosen, order, error, 0.0,
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
        base = layer_error_totals(model, steps, rung.steps, rung.order)
        best: dict[int, tuple[float, PartialStep]] = {}
        for step in rung.steps:
            fewer = tuple(s for s in rung.steps if s != step)
            if found.forced[step] or not gaps_fit(fewer, steps, found.max_gap):
                continue
            added = [after - before for after, before in
                     zip(layer_error_totals(model, steps, fewer, rung.order), base, strict=True)]
            for size in sizes:
                for start in range(count - size + 1):
                    if not all(residual[start:start + size]):
                        continue
                    extra = sum(added[start:start + size])
                    if size not in best or extra < best[size][0]:
                        best[size] = (extra, PartialStep(step, tuple(layers[start:start + size])))
        for extra, partial in best.values():
            result.append(with_flop_fraction(profile, layers, dataclasses.replace(rung, error=sum(base) + extra,
                                                                                  partial=partial)))
    return result


def gaps_fit(compute_steps: tuple[int, ...], steps: int, max_gap: int) -> bool:
    """Whether no two compute steps, nor the last and the end, are more than ``max_gap`` apart."""
    bounds = (*compute_steps, steps)
    return all(b - a <= max_gap for a, b in zip(bounds, bounds[1:], strict=False))


def layer_error_totals(model: StepErrorModel, steps: int, compute_steps: tuple[int, ...], order: int
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
        if not all(s in even for s in range(steps) if found.forced[s]) or not gaps_fit(even, steps, found.max_gap):
            continue
        for order in sorted(found.per_order):
            error = predicted_error(found.model, steps, even, order)
            if count not in whole or error < whole[count].error:
                whole[count] = with_flop_fraction(profile, found.layers, Rung(count, even, order, error, 0.0,
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
        result.append((label, with_flop_fraction(profile, found.layers, Rung(count, chosen, order, error, 0.0,
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


def with_flop_fraction(profile: BlockProfile, layers: list[int], rung: Rung) -> Rung:
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


def rung_error(model: StepErrorModel, steps: int, layers: list[int], rung: Rung) -> float:
    """The error model's summed error of a rung, each cached layer with its own compute steps and order."""
    total = 0.0
    for position, layer in enumerate(layers):
        row = rung.compute_row(layer, steps)
        computed = tuple(step for step in range(steps) if row[step])
        for step, history in _reuse_histories(steps, computed, rung.layer_order(layer)):
            total += model.layer_errors(step, history)[position]
    return total


def rung_schedule(profile: BlockProfile, layers: list[int], rung: Rung, builder: dict[str, Any]) -> CacheSchedule:
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
