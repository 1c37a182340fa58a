"""Calibrate Block Cache: trains the scale-shift correction (block_caching/scale_shift.py) student-teacher.

Per iteration, one sampling run on the schedule's grid (a prompt and a fresh seed):

1. the *student* is the cached model with the current corrections; it is unrolled from noise
   by the schedule's own sampler, so it visits the latents x_t the cached model really visits;
2. at every step, before the student's evaluation, the uncached *teacher* (the same frozen
   model, every layer computed) runs on the student's x_t, and the outputs of the layers the
   student will serve from its cache are kept as targets;
3. the student's evaluation then reuses those layers through the correction, the relative
   squared error to the teacher's output is back-propagated into that step's scale and shift
   rows only (the layer's output is detached before the next layer sees it, so no gradient
   runs through the model), and Adam updates them, with a step size decaying linearly to 0.

The session is a run extension of the cache (runtime/run.py): each run's ``StudentTeacherRun`` makes
the session the cache's ``ReuseTrainer`` and runs every evaluation twice, teacher then student.
Everything runs on a clone made by ``apply_block_cache``; the model passed in is never changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..block_maps.block_map import BlockMap, LayerSpec
from ..errors import BlockCacheError
from ..runtime.run import RunContext, RunExtension, RunMethod
from .cache import BlockCacheHolder, LayerCache
from .patching import apply_block_cache
from .scale_shift import ScaleShiftTable, channel_dim
from .schedule import CacheSchedule

logger = logging.getLogger(__name__)

DEFAULT_ITERATIONS = 24
DEFAULT_LEARNING_RATE = 0.03
_EPSILON = 1e-12


@dataclass(frozen=True)
class CalibrationOptions:
    iterations: int = DEFAULT_ITERATIONS
    learning_rate: float = DEFAULT_LEARNING_RATE
    seed: int = 0  # iteration i samples with seed + i
    steps: int = 0  # 0: the schedule's own step count
    cfg: float = 0.0  # 0: the schedule's own cfg

    def validate(self) -> None:
        if not isinstance(self.iterations, int) or not 1 <= self.iterations <= 100_000:
            raise ValueError(f"iterations must be an integer from 1 to 100000, got {self.iterations!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and 0 < self.learning_rate <= 1):
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0 (0: the schedule's), got {self.steps!r}")
        if not (isinstance(self.cfg, (int, float)) and math.isfinite(self.cfg) and self.cfg >= 0):
            raise ValueError(f"cfg must be a finite number >= 0 (0: the schedule's), got {self.cfg!r}")


@dataclass
class CalibrationResult:
    schedule: CacheSchedule  # the input schedule carrying the trained ``scale_shift``
    losses: list[float]  # per iteration: mean relative squared error of the reused layers' outputs
    seconds: float
    reused_outputs: int = 0  # layer outputs the loss was measured on, over all iterations
    sampler: str = ""
    scheduler: str = ""


class CalibrationSession(RunExtension):
    """The training state of one Calibrate run, over all its sampling runs: the ``ReuseTrainer`` of each
    run's cache (``LayerCache``)."""

    def __init__(self, table: ScaleShiftTable, learning_rate: float, train: bool = True) -> None:
        self.table = table
        self.learning_rate = learning_rate
        self.train = train  # False: measure the loss only
        self.teacher_pass = False
        self.targets: dict[tuple[int, tuple, int], list[Any]] = {}
        self.terms: list[torch.Tensor] = []
        self.iteration_losses: list[float] = []
        self.reused_outputs = 0
        self.optimizer: torch.optim.Optimizer | None = None
        with torch.inference_mode(False):
            for entry in table.entries.values():  # continuing from an earlier calibration
                entry.scale = entry.scale.detach().clone().requires_grad_(True)
                entry.shift = entry.shift.detach().clone().requires_grad_(True)
                self._optimize(entry.scale, entry.shift)
        self.block_map: BlockMap | None = None
        # What reused tensors are corrected by while this session trains (the holder's stay as they are).
        self.corrections: list[list[Any]] | None = None

    def bind(self, holder: BlockCacheHolder, schedule: CacheSchedule) -> CalibrationSession:
        """Installed on ``holder`` (apply_block_cache's options): its corrections follow the holder's layers."""
        self.block_map = holder.block_map
        self.corrections = self.table.bind(holder.block_map)
        return self

    def start(self, run: RunContext) -> RunMethod | None:
        cache = run.layer_method
        if not isinstance(cache, LayerCache):
            return None
        cache.trainer = self
        return StudentTeacherRun(self)

    def set_learning_rate(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate

    def _optimize(self, *tensors: torch.Tensor) -> None:
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(list(tensors), lr=self.learning_rate)
        else:
            self.optimizer.add_param_group({"params": list(tensors)})

    @staticmethod
    @contextlib.contextmanager
    def grad_context() -> Iterator[None]:
        # ComfyUI runs nodes in inference mode and samplers under no_grad; the correction needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            yield

    # -- called by the run's cache --------------------------------------------------------------
    def record_target(self, index: int, keys: tuple, occurrence: int, spec: LayerSpec, out: Any) -> None:
        elements = [spec.batch_first(element) for element in spec.split_output(out)]
        targets = []
        for stream, element in enumerate(elements):
            if not isinstance(element, torch.Tensor):
                targets.append(None)
                continue
            with torch.inference_mode(False):
                targets.append(element.detach().clone())
                if (spec.name, stream) not in self.table.entries:
                    entry = self.table.entry(spec.name, stream, spec, element.shape[_channel_axis(spec, element)],
                                             device=element.device)
                    entry.scale.requires_grad_(True)
                    entry.shift.requires_grad_(True)
                    self._optimize(entry.scale, entry.shift)
                    self.corrections = self.table.bind(self.block_map)
        self.targets[(index, keys, occurrence)] = targets

    def observe_reuse(self, index: int, keys: tuple, occurrence: int, spec: LayerSpec, reused: Any) -> Any:
        """Adds the loss of one reused layer output and returns the output, detached."""
        targets = self.targets.get((index, keys, occurrence))
        elements = spec.split_output(reused)
        detached = []
        for stream, element in enumerate(elements):
            if not isinstance(element, torch.Tensor):
                detached.append(element)
                continue
            target = targets[stream] if targets is not None and stream < len(targets) else None
            predicted = spec.batch_first(element)
            if target is not None and target.shape == predicted.shape and element.requires_grad:
                with self.grad_context():
                    error = (predicted.float() - target.float()).pow(2).mean()
                    self.terms.append(error / target.float().pow(2).mean().clamp_min(_EPSILON))
                self.reused_outputs += 1
            detached.append(element.detach())
        return spec.join_output(detached)

    # -- per evaluation and iteration -----------------------------------------------------------
    def learn(self) -> float | None:
        """Back-propagates this evaluation's terms and steps the optimizer; returns their mean."""
        self.targets.clear()
        if not self.terms or self.optimizer is None:
            self.terms.clear()
            return None
        with self.grad_context():
            total = torch.stack([term.to(self.terms[0].device) for term in self.terms]).sum()
            if self.train:
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                self.optimizer.step()
        mean = float(total.detach()) / len(self.terms)
        self.terms.clear()
        return mean


def _channel_axis(spec: LayerSpec, element: torch.Tensor) -> int:
    return channel_dim(spec) % element.ndim


class StudentTeacherRun(RunMethod):
    """One sampling run of a calibration: every evaluation that reuses a layer runs twice, the uncached
    teacher's pass first, then the student's, whose loss is learnt from."""

    def __init__(self, session: CalibrationSession) -> None:
        self.session = session

    def around_evaluation(self, run: RunContext, evaluate: Callable[[], torch.Tensor]) -> torch.Tensor:
        computes = run.computes
        if computes is None or computes.all():
            return evaluate()  # nothing is reused at this step: nothing to learn
        session = self.session
        session.teacher_pass = True
        try:
            evaluate()
        finally:
            session.teacher_pass = False
        out = evaluate()
        loss = session.learn()
        if loss is not None:
            session.iteration_losses.append(loss)
        return out


def attach_calibration(model: Any, schedule: CacheSchedule, learning_rate: float,
                       train: bool = True) -> tuple[Any, CalibrationSession]:
    """A clone of ``model`` that samples with ``schedule`` and trains its corrections as it goes."""
    table = schedule.scale_shift
    if table is None:
        table = ScaleShiftTable(schedule.fingerprint, schedule.block_map.fingerprint, schedule.grid.steps)
    else:
        table = table.detached()
    session = CalibrationSession(table, learning_rate, train)
    patched, _ = apply_block_cache(model, schedule, options=[session])
    return patched, session


def _known(name: str, choices: list[str], fallback: str, what: str) -> str:
    if name in choices:
        return name
    logger.info("Calibrate Block Cache: the schedule's %s %r is not one of KSampler's; using %s.", what, name, fallback)
    return fallback


def _sampling_setup(schedule: CacheSchedule, options: CalibrationOptions) -> tuple[int, float, str, str]:
    """Steps, cfg, sampler and scheduler of the calibration runs: the schedule's own where known."""
    import comfy.samplers

    grid = schedule.grid
    sampler = _known(grid.sampler, comfy.samplers.KSampler.SAMPLERS, "euler", "sampler")
    scheduler = _known(grid.scheduler, comfy.samplers.KSampler.SCHEDULERS, "normal", "scheduler")
    return options.steps or grid.steps, options.cfg or grid.cfg or 5.0, sampler, scheduler


def _unroll(model: Any, schedule: CacheSchedule, prompts: list[tuple[Any, Any]], latent: torch.Tensor,
            options: CalibrationOptions, train: bool,
            progress: Callable[[int, int], None] | None
            ) -> tuple[CalibrationSession, list[float], tuple[int, float, str, str]]:
    """``options.iterations`` student-teacher runs; returns the session, each run's mean loss, and the
    runs' steps, cfg, sampler and scheduler."""
    import comfy.model_management
    import comfy.sample

    options.validate()
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if schedule.lookahead_steps:
        raise BlockCacheError("This schedule is a step lookahead: it reuses no layer, so there is nothing to "
                              "calibrate. Build one with lookahead 'off' to calibrate the cache's schedule.")
    if schedule.compute_mask().all():
        raise BlockCacheError("This schedule reuses nothing, so there is nothing to calibrate. Build a schedule with "
                              "a higher threshold first.")
    setup = _sampling_setup(schedule, options)
    steps, cfg, sampler, scheduler = setup
    total = options.iterations * steps
    losses: list[float] = []
    with torch.inference_mode(False):
        patched, session = attach_calibration(model, schedule, options.learning_rate, train=train)
        latent_image = comfy.sample.fix_empty_latent_channels(patched, latent)
        for iteration in range(options.iterations):
            comfy.model_management.throw_exception_if_processing_interrupted()
            positive, negative = prompts[iteration % len(prompts)]
            seed = options.seed + iteration
            noise = comfy.sample.prepare_noise(latent_image, seed)
            session.iteration_losses = []
            # Linear decay to zero: large early steps reach the optimum, small late ones settle on it.
            session.set_learning_rate(options.learning_rate * (1.0 - iteration / options.iterations))

            def on_step(step: int, _x0: Any, _x: Any, _total: int, done: int = iteration * steps) -> None:
                if progress is not None:
                    progress(min(total, done + step + 1), total)

            with torch.no_grad():
                comfy.sample.sample(patched, noise, steps, cfg, sampler, scheduler, positive, negative, latent_image,
                                    denoise=schedule.grid.denoise, callback=on_step, disable_pbar=True, seed=seed)
            if session.iteration_losses:
                losses.append(sum(session.iteration_losses) / len(session.iteration_losses))
                logger.debug("Calibrate Block Cache: iteration %d/%d, loss %.5f", iteration + 1,
                             options.iterations, losses[-1])
    return session, losses, setup


def calibrate(model: Any, schedule: CacheSchedule, prompts: list[tuple[Any, Any]], latent: torch.Tensor,
              options: CalibrationOptions,
              progress: Callable[[int, int], None] | None = None) -> CalibrationResult:
    """Trains ``schedule``'s scale-shift correction on ``model``; returns the schedule carrying it.

    ``prompts`` are (positive, negative) ComfyUI conditionings, used in turn; ``latent`` is an
    (empty) latent batch whose shape is sampled. Continues from the schedule's own correction if
    it has one.
    """
    started = time.perf_counter()
    session, losses, (steps, cfg, sampler, scheduler) = _unroll(model, schedule, prompts, latent, options, True,
                                                                progress)
    seconds = time.perf_counter() - started
    table = session.table.detached()
    table.metadata.update({
        "iterations": str(options.iterations), "learning_rate": repr(options.learning_rate),
        "prompts": str(len(prompts)), "first_seed": str(options.seed), "steps": str(steps), "cfg": repr(cfg),
        "sampler": sampler, "scheduler": scheduler, "latent_shape": "x".join(str(v) for v in latent.shape),
        "loss_first": f"{losses[0]:.6g}" if losses else "", "loss_last": f"{losses[-1]:.6g}" if losses else "",
        "seconds": f"{seconds:.1f}",
    })
    if losses:
        logger.info("Calibrate Block Cache: %d iterations of %d steps in %.1f s; relative error of reused layer "
                    "outputs %.4g -> %.4g (%d corrected streams).", options.iterations, steps, seconds, losses[0],
                    losses[-1], len(table.entries))
    return CalibrationResult(dataclasses.replace(schedule, scale_shift=table), losses, seconds,
                             session.reused_outputs, sampler, scheduler)


def measure_error(model: Any, schedule: CacheSchedule, prompts: list[tuple[Any, Any]], latent: torch.Tensor,
                  options: CalibrationOptions) -> float:
    """The mean student-teacher loss of ``schedule`` as it is (with its correction, if any), nothing
    trained: the same runs as ``calibrate``, for before/after comparisons on held-out seeds."""
    _, losses, _ = _unroll(model, schedule, prompts, latent, options, False, None)
    return sum(losses) / len(losses) if losses else 0.0
