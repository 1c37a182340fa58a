"""What the speed-up target builder is asked (``TargetOptions``), and what it chose and why: its typed result.

``build_target_schedule`` (block_caching/target_schedule.py) makes one ``TargetBuild`` and writes it
into the schedule's ``builder`` JSON once (``to_json``); the Build node, the frontend's ladder and the
best-of choice read it back typed (``TargetBuild.of``). The JSON keys are the schedule files' own and
stay as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import BlockCacheError
from .forecast import MAX_FORECAST_ORDER
from .schedule import CacheSchedule, validate_step_options

METHOD = "speedup_target"
AUTO_ORDER_LABEL = "auto"


def forecast_order_label(order: int | None) -> str:
    """The forecast order as the node and the JSON write it: 'auto' (None), or the order."""
    return AUTO_ORDER_LABEL if order is None else str(order)


def parse_forecast_order(label: str) -> int | None:
    """The node's forecast-order choice: None for 'auto' (the order with the least error), else the order."""
    if label == AUTO_ORDER_LABEL:
        return None
    try:
        return int(label)
    except ValueError:
        raise ValueError(f"forecast_order must be '{AUTO_ORDER_LABEL}' or an order such as '1', got {label!r}") from None


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
class PartialStep:
    """Some cached layers reuse at one of a rung's compute steps (a fine rung, between two whole-step rungs)."""

    step: int
    layers: tuple[int, ...]  # block-map indices of the layers that reuse there

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "layers": list(self.layers)}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> PartialStep | None:
        if data is None:
            return None
        return cls(int(data["step"]), tuple(int(layer) for layer in data["layers"]))


def rung_label(computes: int, partial: PartialStep | None, as_is_layers: tuple[int, ...] = ()) -> str:
    """How the node and the logs name a rung: its compute steps, a fine rung's partial step (1-based), and the
    layers reused as they are (forecast order 0)."""
    label = f"{computes} compute steps"
    if partial is not None:
        label += f", {len(partial.layers)} layers reused at step {partial.step + 1}"
    if as_is_layers:
        label += f", {len(as_is_layers)} layers reused as they are"
    return label


def reused_share(partial: PartialStep | None) -> int:
    """How many layers a fine rung reuses at its partial step (0: a whole-step rung): with the compute count, a
    rung's cost, which rungs of either step weighting's search share."""
    return 0 if partial is None else len(partial.layers)


def partial_to_json(partial: PartialStep | None) -> dict[str, Any] | None:
    """A rung's partial step as the JSON and the frontend payload write it (None: a whole-step rung)."""
    return None if partial is None else partial.to_json()


def _layer_indices(data: list[Any] | None) -> tuple[int, ...]:
    """Block-map indices from the JSON (absent in schedules saved before per-layer orders: none)."""
    return tuple(int(layer) for layer in data or ())


@dataclass(frozen=True)
class LadderRung:
    """The best schedule with ``computes`` compute steps, or a fine rung between two of them (``partial``): the
    error model's, for the JSON and the frontend."""

    computes: int
    order: int
    error: float
    flop_fraction: float
    steps: tuple[int, ...]
    partial: PartialStep | None = None

    def to_json(self) -> dict[str, Any]:
        return {"computes": self.computes, "order": self.order, "error": self.error,
                "flop_fraction": self.flop_fraction, "steps": list(self.steps), "partial": partial_to_json(self.partial)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LadderRung:
        return cls(int(data["computes"]), int(data["order"]), float(data["error"]), float(data["flop_fraction"]),
                   tuple(int(s) for s in data["steps"]), PartialStep.from_json(data.get("partial")))


@dataclass(frozen=True)
class Tried:
    """One schedule validation measured: its PSNR on the profiled run, and the range expected on other prompts."""

    label: str
    steps: tuple[int, ...]
    order: int
    predicted_error: float
    measured_psnr: float
    expected_low: float | None  # None: measured before ranges were recorded
    expected_high: float | None
    partial: PartialStep | None = None
    as_is_layers: tuple[int, ...] = ()  # block-map indices forecast with order 0 whatever ``order`` is
    damping: float = 1.0  # the share of the forecast's move (block_caching/forecast.py)
    seeds: int = 1  # held-out seeds read together: 2 where a second seed checked the first's choice

    @property
    def schedule_key(self) -> tuple[Any, ...]:
        """What tells the measured schedules apart (target_floor.schedule_key of its rung)."""
        return self.steps, self.order, self.partial, self.as_is_layers, self.damping

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "steps": list(self.steps), "order": self.order, "damping": self.damping,
                "predicted_error": self.predicted_error, "measured_psnr": self.measured_psnr,
                "expected_low": self.expected_low, "expected_high": self.expected_high,
                "partial": partial_to_json(self.partial), "as_is_layers": list(self.as_is_layers),
                "seeds": self.seeds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tried:
        low, high = data.get("expected_low"), data.get("expected_high")
        return cls(str(data["label"]), tuple(int(s) for s in data["steps"]), int(data["order"]),
                   float(data["predicted_error"]), float(data["measured_psnr"]),
                   None if low is None else float(low), None if high is None else float(high),
                   PartialStep.from_json(data.get("partial")), _layer_indices(data.get("as_is_layers")),
                   float(data.get("damping", 1.0)), int(data.get("seeds", 1)))


@dataclass(frozen=True)
class ExpectedPsnr:
    """The chosen schedule's measurement: its mean, and the range expected on other prompts."""

    mean: float
    low: float
    high: float
    pictures: int
    values: tuple[float, ...] = ()  # each picture's PSNR, for a paired comparison (absent in older files)

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "pictures": self.pictures,
                "values": list(self.values)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExpectedPsnr:
        return cls(float(data["mean"]), float(data["low"]), float(data["high"]), int(data["pictures"]),
                   tuple(float(v) for v in data.get("values", ())))


@dataclass(frozen=True)
class FewerStepsComparison:
    """Uncached sampling with as many steps as the schedule's FLOPs buy, measured alike."""

    steps: int
    speedup: float
    measured_psnr: float
    expected_low: float
    expected_high: float
    better: bool  # fewer steps measured at least as well as the schedule
    schedule_psnr: float  # the schedule on the same pictures (0: not recorded, a schedule made before it was)

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "speedup": self.speedup, "measured_psnr": self.measured_psnr,
                "expected_low": self.expected_low, "expected_high": self.expected_high, "better": self.better,
                "schedule_psnr": self.schedule_psnr}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FewerStepsComparison:
        return cls(int(data["steps"]), float(data["speedup"]), float(data["measured_psnr"]),
                   float(data["expected_low"]), float(data["expected_high"]), bool(data["better"]),
                   float(data.get("schedule_psnr", 0.0)))


@dataclass(frozen=True)
class SteppedDown:
    """The target's own rung, before the quality floor stepped down from it."""

    computes: int
    order: int
    speedup: float
    steps: tuple[int, ...]
    partial: PartialStep | None = None
    as_is_layers: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"computes": self.computes, "order": self.order, "speedup": self.speedup, "steps": list(self.steps),
                "partial": partial_to_json(self.partial), "as_is_layers": list(self.as_is_layers)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SteppedDown:
        return cls(int(data["computes"]), int(data["order"]), float(data["speedup"]),
                   tuple(int(s) for s in data["steps"]), PartialStep.from_json(data.get("partial")),
                   _layer_indices(data.get("as_is_layers")))


@dataclass(frozen=True)
class CombinedSteps:
    """Fewer sampler steps with the cache: the step count sampled, and the speed-up against the profiled count."""

    profiled_steps: int
    steps: int
    speedup: float

    def to_json(self) -> dict[str, Any]:
        return {"profiled_steps": self.profiled_steps, "steps": self.steps, "speedup": self.speedup}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CombinedSteps:
        return cls(int(data["profiled_steps"]), int(data["steps"]), float(data["speedup"]))


@dataclass(frozen=True)
class LookaheadChosen:
    """Step lookahead chosen over the cache's own schedule (block_caching/target_lookahead.py): its planned steps,
    and the cache schedule it replaced (speed-up, and measured PSNR: None where it computed everything)."""

    steps: tuple[int, ...]
    instead_of_speedup: float
    instead_of_psnr: float | None

    def to_json(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "instead_of_speedup": self.instead_of_speedup,
                "instead_of_psnr": self.instead_of_psnr}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LookaheadChosen:
        psnr = data.get("instead_of_psnr")
        return cls(tuple(int(s) for s in data["steps"]), float(data["instead_of_speedup"]),
                   None if psnr is None else float(psnr))


@dataclass(frozen=True)
class TargetBuild:
    """The speed-up target builder's result: the options, the chosen rung, the ladder, what was measured."""

    speedup_target: float
    forecast_order: int | None  # asked for (None: auto)
    cache_kinds: str
    always_compute_first: int
    always_compute_last: int
    max_consecutive_reuse: int
    min_psnr: float
    cached_layers: tuple[str, ...]
    compute_steps: tuple[int, ...]
    chosen_order: int
    chosen_by: str  # "measured", "predicted", or "video rule" (target_schedule.VIDEO_RULE)
    predicted_error: float
    reached: bool  # the chosen rung reaches the target
    ladder: tuple[LadderRung, ...]
    measured: tuple[Tried, ...] = ()
    measured_metric: str = ""  # what the measurements are PSNRs of ("image" or "latent")
    stepped_down_from: SteppedDown | None = None  # where the floor moved the choice (None: it did not)
    expected_psnr: ExpectedPsnr | None = None  # the chosen schedule's measurement (None: not measured)
    fewer_steps: FewerStepsComparison | None = None  # None: not compared
    notes: tuple[str, ...] = ()
    combined: CombinedSteps | None = None  # built for fewer sampler steps than profiled
    chosen_partial: PartialStep | None = None  # the chosen rung is a fine one
    chosen_as_is_layers: tuple[int, ...] = ()  # cached layers forecast with order 0 (chosen by measurement)
    chosen_damping: float = 1.0  # the chosen rung's forecast damping (block_caching/forecast.py)
    lookahead: LookaheadChosen | None = None  # the output is a step lookahead, not the chosen rung

    @property
    def chosen_key(self) -> tuple[Any, ...]:
        """The chosen schedule's ``Tried.schedule_key``."""
        return self.compute_steps, self.chosen_order, self.chosen_partial, self.chosen_as_is_layers, self.chosen_damping

    def to_json(self) -> dict[str, Any]:
        """The schedule's ``builder`` JSON."""
        data: dict[str, Any] = {
            "method": METHOD,
            "speedup_target": self.speedup_target,
            "forecast_order": forecast_order_label(self.forecast_order),
            "cache_kinds": self.cache_kinds,
            "always_compute_first": self.always_compute_first,
            "always_compute_last": self.always_compute_last,
            "max_consecutive_reuse": self.max_consecutive_reuse,
            "cached_layers": list(self.cached_layers),
            "compute_steps": list(self.compute_steps),
            "chosen_partial": partial_to_json(self.chosen_partial),
            "chosen_as_is_layers": list(self.chosen_as_is_layers),
            "chosen_order": self.chosen_order,
            "chosen_damping": self.chosen_damping,
            "chosen_by": self.chosen_by,
            "predicted_error": self.predicted_error,
            "measured": [tried.to_json() for tried in self.measured],
            "measured_metric": self.measured_metric,
            "reached": self.reached,
            "min_psnr": self.min_psnr,
            "stepped_down_from": None if self.stepped_down_from is None else self.stepped_down_from.to_json(),
            "expected_psnr": None if self.expected_psnr is None else self.expected_psnr.to_json(),
            "fewer_steps": None if self.fewer_steps is None else self.fewer_steps.to_json(),
            "ladder": [rung.to_json() for rung in self.ladder],
            "notes": list(self.notes),
        }
        if self.combined is not None:
            data["combined"] = self.combined.to_json()
        if self.lookahead is not None:
            data["lookahead"] = self.lookahead.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TargetBuild:
        def optional(key: str, kind: Any) -> Any:
            value = data.get(key)
            return None if value is None else kind.from_json(value)

        return cls(
            speedup_target=float(data["speedup_target"]),
            forecast_order=parse_forecast_order(str(data["forecast_order"])),
            cache_kinds=str(data["cache_kinds"]),
            always_compute_first=int(data["always_compute_first"]),
            always_compute_last=int(data["always_compute_last"]),
            max_consecutive_reuse=int(data["max_consecutive_reuse"]),
            min_psnr=float(data.get("min_psnr", 0.0)),
            cached_layers=tuple(str(name) for name in data["cached_layers"]),
            compute_steps=tuple(int(s) for s in data["compute_steps"]),
            chosen_order=int(data["chosen_order"]),
            chosen_by=str(data.get("chosen_by", "predicted")),
            predicted_error=float(data["predicted_error"]),
            reached=bool(data["reached"]),
            ladder=tuple(LadderRung.from_json(rung) for rung in data["ladder"]),
            measured=tuple(Tried.from_json(tried) for tried in data.get("measured", ())),
            measured_metric=str(data.get("measured_metric", "")),
            stepped_down_from=optional("stepped_down_from", SteppedDown),
            expected_psnr=optional("expected_psnr", ExpectedPsnr),
            fewer_steps=optional("fewer_steps", FewerStepsComparison),
            notes=tuple(str(note) for note in data.get("notes", ())),
            combined=optional("combined", CombinedSteps),
            chosen_partial=PartialStep.from_json(data.get("chosen_partial")),
            chosen_as_is_layers=_layer_indices(data.get("chosen_as_is_layers")),
            chosen_damping=float(data.get("chosen_damping", 1.0)),
            lookahead=optional("lookahead", LookaheadChosen),
        )

    @classmethod
    def of(cls, schedule: CacheSchedule) -> TargetBuild:
        """The build of a speed-up target schedule; raises for any other schedule."""
        builder = schedule.builder or {}
        if builder.get("method") != METHOD:
            raise BlockCacheError(f"This schedule was not built for a speed-up target (its builder is "
                                  f"{builder.get('method') or 'unknown'}): rebuild it with Build Cache Schedule.")
        try:
            return cls.from_json(builder)
        except (KeyError, TypeError, ValueError) as error:
            raise BlockCacheError(f"This schedule's speed-up target record is incomplete ({error!r}): rebuild it "
                                  "with Build Cache Schedule.") from error
