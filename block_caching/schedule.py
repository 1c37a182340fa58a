"""Cache schedules: which layer is computed at which step, and how a reused layer stands in.

``build_schedule`` implements Block Caching's automatic schedule (Eq. 7): per layer,
the change since the last computation is summed step by step, and the layer is
recomputed at the first step where the sum exceeds the threshold delta.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..block_maps.block_map import CACHE_KIND_CHOICES, BlockMap, LayerKind, ReuseMode
from ..runtime.time_grid import StepGrid
from .forecast import MAX_FORECAST_ORDER
from .profile import BlockProfile

if TYPE_CHECKING:
    from .scale_shift import ScaleShiftTable

DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class BuildOptions:
    threshold: float = DEFAULT_THRESHOLD
    cache_kinds: str = "attention"  # a key of CACHE_KIND_CHOICES
    always_compute_first: int = 1  # steps at the start that always compute (at least 1)
    always_compute_last: int = 0  # steps at the end that always compute
    max_consecutive_reuse: int = 0  # 0: no limit
    forecast_order: int = 0  # how cached layers stand in when reused (block_caching/forecast.py); 0: as cached

    def validate(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")
        validate_step_options(self)
        if not isinstance(self.forecast_order, int) or not 0 <= self.forecast_order <= MAX_FORECAST_ORDER:
            raise ValueError(f"forecast_order must be an integer from 0 to {MAX_FORECAST_ORDER}, "
                             f"got {self.forecast_order!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "block_caching",
            "threshold": self.threshold,
            "cache_kinds": self.cache_kinds,
            "always_compute_first": self.always_compute_first,
            "always_compute_last": self.always_compute_last,
            "max_consecutive_reuse": self.max_consecutive_reuse,
            "forecast_order": self.forecast_order,
        }


def validate_step_options(options: Any) -> None:
    """What both builders' options share: ``cache_kinds`` and the integer step protections."""
    if options.cache_kinds not in CACHE_KIND_CHOICES:
        raise ValueError(f"cache_kinds must be one of {sorted(CACHE_KIND_CHOICES)}, got {options.cache_kinds!r}")
    for name in ("always_compute_first", "always_compute_last", "max_consecutive_reuse"):
        value = getattr(options, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class LayerSchedule:
    name: str
    kind: LayerKind
    reuse: ReuseMode
    compute: tuple[bool, ...]  # one entry per grid step
    forecast_order: int = 0  # reused as cached (0), or forecast from the last order + 1 computations
    forecast_damping: float = 1.0  # the share of the forecast's move from the last computation (forecast.py)


@dataclass(frozen=True)
class CacheSchedule:
    block_map: BlockMap
    grid: StepGrid
    layers: tuple[LayerSchedule, ...]  # the block map's layers, in the same order
    layer_flops: tuple[float, ...]
    total_flops: float
    builder: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    # Learned corrections of reused features (Calibrate Block Cache); None: uncorrected.
    scale_shift: ScaleShiftTable | None = None
    # Step lookahead (block_caching/lookahead.py): the only steps the model is evaluated at, the others
    # interpolated; empty: every step. Its layers compute wherever the model runs.
    lookahead_steps: tuple[int, ...] = ()

    @property
    def fingerprint(self) -> str:
        """A hash of what the runtime does with this schedule: model structure, steps, layers, masks."""
        digest = hashlib.sha256(f"{self.block_map.fingerprint}|{self.grid.steps}".encode())
        for layer in self.layers:
            mask = "".join("1" if c else "0" for c in layer.compute)
            order = f"|{layer.forecast_order}" if layer.forecast_order else ""  # unchanged for order-0 schedules
            damping = f"|d{layer.forecast_damping!r}" if layer.forecast_damping != 1.0 else ""  # and undamped ones
            digest.update(f"\n{layer.name}|{layer.reuse.value}|{mask}{order}{damping}".encode())
        if self.lookahead_steps:  # unchanged for schedules without
            digest.update(f"\nlookahead|{','.join(map(str, self.lookahead_steps))}".encode())
        return digest.hexdigest()[:16]

    def compute_mask(self) -> np.ndarray:
        """[layers, steps] boolean array: True where the layer is computed."""
        return np.array([layer.compute for layer in self.layers], dtype=bool).reshape(len(self.layers), self.grid.steps)

    def evaluated_mask(self) -> np.ndarray:
        """[layers, steps]: True where the layer really computes, its row at the steps the model is evaluated
        (every step, without lookahead): what the heatmap shows and the FLOPs count."""
        mask = self.compute_mask()
        if self.lookahead_steps:
            skipped = np.ones(self.grid.steps, dtype=bool)
            skipped[list(self.lookahead_steps)] = False
            mask[:, skipped] = False
        return mask

    @property
    def flop_fraction(self) -> float:
        if not self.lookahead_steps:
            return computed_flop_fraction(self.compute_mask(), self.layer_flops, self.total_flops)
        # The steps between evaluations run nothing, not even the layers outside the block map.
        evaluated = list(self.lookahead_steps)
        return (computed_flop_fraction(self.compute_mask()[:, evaluated], self.layer_flops, self.total_flops)
                * len(evaluated) / self.grid.steps)

    @property
    def estimated_speedup(self) -> float:
        fraction = self.flop_fraction
        return 1.0 / fraction if fraction > 0 else 1.0

    @property
    def equivalent_steps(self) -> float:
        """The cost in uncached steps: what sampling with fewer steps would buy at the same FLOPs."""
        return self.flop_fraction * self.grid.steps

    def summary(self) -> str:
        mask = self.evaluated_mask()
        orders = sorted({layer.forecast_order for layer in self.layers if not all(layer.compute)})
        forecast = f"; reused layers forecast with order {'/'.join(map(str, orders))}" if any(orders) else ""
        dampings = sorted({layer.forecast_damping for layer in self.layers
                           if not all(layer.compute) and layer.forecast_order and layer.forecast_damping != 1.0})
        if dampings:
            forecast += f", damped to {'/'.join(f'{d:g}' for d in dampings)} of its move"
        return (
            f"{int(mask.sum())}/{mask.size} layer evaluations computed over {self.grid.steps} steps; "
            f"{self.flop_fraction:.1%} of the FLOPs, estimated speed-up {self.estimated_speedup:.2f}x: the cost of "
            f"{self.equivalent_steps:.1f} uncached steps{forecast}"
            + ("; with scale-shift calibration" if self.scale_shift is not None else "")
            + (f"; lookahead: the model evaluated at {len(self.lookahead_steps)} of {self.grid.steps} steps, the "
               "others interpolated" if self.lookahead_steps else "")
        )


def lookahead_steps_valid(steps: tuple[int, ...] | list[int], count: int) -> bool:
    """Whether ``steps`` can be a schedule's lookahead steps on ``count`` steps: increasing from 0, inside the grid."""
    return bool(steps) and steps[0] == 0 and steps[-1] < count and all(b > a for a, b in itertools.pairwise(steps))


def computed_flop_fraction(mask: np.ndarray, layer_flops: tuple[float, ...] | list[float], total_flops: float) -> float:
    """Share of the uncached model FLOPs a compute mask runs, one model evaluation per step.

    Layers outside the block map (conv_in, the time embedding, the output head) always run.
    """
    steps = mask.shape[1] if mask.ndim == 2 else 0
    if steps == 0 or total_flops <= 0:
        return 1.0
    # Plain left-to-right sums (not numpy's pairwise ones): the frontend's JavaScript port
    # (js/schedule_builder.js) repeats them in the same order and gets the same bits.
    flop_sum = 0.0
    for value in layer_flops:
        flop_sum += float(value)
    fixed = max(0.0, float(total_flops) - flop_sum)
    computed = 0.0
    for value, row_count in zip(layer_flops, np.asarray(mask, dtype=np.float64).sum(axis=1).tolist(), strict=True):
        computed += float(value) * row_count
    return (fixed * steps + computed) / (float(total_flops) * steps)


def _layer_mask(change: tuple[float, ...], options: BuildOptions, steps: int) -> list[bool]:
    compute = [False] * steps
    accumulated = 0.0
    reuse_run = 0
    first = max(1, options.always_compute_first)
    for step in range(steps):
        forced = step < first or step >= steps - options.always_compute_last
        if options.max_consecutive_reuse and reuse_run >= options.max_consecutive_reuse:
            forced = True
        value = change[step]
        # An unmeasured step counts as a large change: never reuse on missing data.
        accumulated += value if not math.isnan(value) else math.inf
        if forced or accumulated > options.threshold:
            compute[step] = True
            accumulated = 0.0
            reuse_run = 0
        else:
            reuse_run += 1
    return compute


def build_schedule(profile: BlockProfile, options: BuildOptions, reuse_mode: ReuseMode = ReuseMode.RESIDUAL) -> CacheSchedule:
    options.validate()
    allowed = CACHE_KIND_CHOICES[options.cache_kinds]
    steps = profile.grid.steps
    layers = []
    for spec, change in zip(profile.block_map.layers, profile.change, strict=True):
        if spec.kind in allowed:
            compute = _layer_mask(change, options, steps)
        else:
            compute = [True] * steps
        reuse = reuse_mode if reuse_mode in spec.reuse_modes else ReuseMode.OUTPUT
        order = options.forecast_order if not all(compute) else 0
        layers.append(LayerSchedule(name=spec.name, kind=spec.kind, reuse=reuse, compute=tuple(compute),
                                    forecast_order=order))
    return schedule_of_profile(profile, layers, options.to_dict())


def schedule_of_profile(profile: BlockProfile, layers: list[LayerSchedule], builder: dict[str, Any]) -> CacheSchedule:
    """A schedule of ``profile``'s model and steps with these layers, as ``builder`` made it."""
    return CacheSchedule(
        block_map=profile.block_map,
        grid=profile.grid,
        layers=tuple(layers),
        layer_flops=profile.layer_flops,
        total_flops=profile.total_flops,
        builder=builder,
        provenance={**profile.provenance, "profile_samples": profile.sample_count},
    )


def all_compute_schedule(block_map: BlockMap, grid: StepGrid, layer_flops: tuple[float, ...] | None = None,
                         total_flops: float = 0.0) -> CacheSchedule:
    """A schedule that computes every layer at every step: output must equal no cache, bit for bit."""
    layers = tuple(
        LayerSchedule(name=s.name, kind=s.kind, reuse=s.reuse_modes[0], compute=(True,) * grid.steps)
        for s in block_map.layers
    )
    return CacheSchedule(
        block_map=block_map,
        grid=grid,
        layers=layers,
        layer_flops=layer_flops or (0.0,) * len(layers),
        total_flops=total_flops,
        builder={"method": "all_compute"},
    )
