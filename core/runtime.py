"""The sampling-time runtime: per-layer forward patches and the wrappers that drive them.

One ``BlockCacheHolder`` belongs to one Apply (or Profile) node execution. Its
layer patches (``CachedLayerForward``, installed as ModelPatcher object patches on
each layer's ``forward``) and its keyed wrappers all point at it:

* OUTER_SAMPLE starts a fresh ``RunState`` for every sampling run (with the schedule
  moved onto the run's own steps where they differ) and frees it at the end, logging
  what was computed and skipped;
* PREDICT_NOISE marks each solver evaluation: it maps the evaluation's sigma onto
  the run's steps and decides, per layer, compute or reuse (a reused layer stands in
  with its cached value, or a forecast from its last computations: core/forecast.py);
* APPLY_MODEL records which cond chunks (uuids) the current model call carries,
  so caches are per chunk and batched or split CFG behave the same.

Outside a run the layer patches call the original forward untouched.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .block_map import BlockMap, LayerSpec, ResidualForm, ReuseMode
from .forecast import combine, lagrange_weights, push_point
from .profile import ProfileRecorder
from .schedule import CacheSchedule, computed_flop_fraction
from .time_grid import StepGrid, normalized_times, retime_mask

logger = logging.getLogger(__name__)

WRAPPER_KEY = "block_cache"

# Where cached tensors live. On the model's device reuse costs nothing extra; in CPU memory a video
# model's cache (hundreds of MB per block) leaves the GPU free, at one copy each way per use.
CACHE_ON_MODEL_DEVICE = "model device"
CACHE_ON_CPU = "cpu"
CACHE_DEVICES = (CACHE_ON_MODEL_DEVICE, CACHE_ON_CPU)


@dataclass
class LayerPlan:
    """What the runtime needs of a schedule, as arrays."""

    grid: StepGrid
    reuse: tuple[ReuseMode, ...]
    layer_flops: tuple[float, ...]
    total_flops: float
    cumulative_computes: np.ndarray  # [layers, steps]: computes at or before each step
    reuses_ever: np.ndarray  # [layers]: the layer is reused somewhere, so its cache is worth keeping
    orders: tuple[int, ...]  # per layer: forecast order of its reuse (0: reuse as cached)

    @classmethod
    def from_schedule(cls, schedule: CacheSchedule) -> LayerPlan:
        return cls.from_mask(schedule.grid, schedule.compute_mask(), tuple(layer.reuse for layer in schedule.layers),
                             schedule.layer_flops, schedule.total_flops,
                             tuple(layer.forecast_order for layer in schedule.layers))

    @classmethod
    def from_mask(cls, grid: StepGrid, mask: np.ndarray, reuse: tuple[ReuseMode, ...], layer_flops: tuple[float, ...],
                  total_flops: float, orders: tuple[int, ...]) -> LayerPlan:
        return cls(grid=grid, reuse=reuse, layer_flops=layer_flops, total_flops=total_flops,
                   cumulative_computes=np.cumsum(mask, axis=1), reuses_ever=~mask.all(axis=1), orders=orders)

    def compute_mask(self) -> np.ndarray:
        return np.diff(self.cumulative_computes, axis=1, prepend=0).astype(bool)

    def on_run_grid(self, model_sampling: Any, run_grid: StepGrid) -> LayerPlan:
        """This plan moved onto a run's own steps (``retime_mask``): computations keep their density."""
        grid_bounds = [*self.grid.taus, *normalized_times(model_sampling, torch.tensor(self.grid.sigmas[-1:]))]
        run_bounds = [*run_grid.taus, *normalized_times(model_sampling, torch.tensor(run_grid.sigmas[-1:]))]
        mask = retime_mask(self.compute_mask(), grid_bounds, run_bounds)
        return LayerPlan.from_mask(run_grid, mask, self.reuse, self.layer_flops, self.total_flops, self.orders)

    def decisions(self, previous_step: int | None, step: int) -> np.ndarray:
        """Per layer: compute now? A layer computes when the schedule has a compute point
        in the steps since the previous evaluation, ``(previous_step, step]``. A layer the
        schedule computes at every step is never cached, at any evaluation: so an all-compute
        schedule is the uncached model, also for samplers that evaluate twice per step."""
        layers = self.cumulative_computes.shape[0]
        if previous_step is None or step < previous_step:
            return np.ones(layers, dtype=bool)  # first evaluation, or time ran backwards (restart samplers)
        if step == previous_step:
            return ~self.reuses_ever
        return (self.cumulative_computes[:, step] > self.cumulative_computes[:, previous_step]) | ~self.reuses_ever


@dataclass
class RunStats:
    """What one sampling run computed; kept on the holder after the run for display and tests."""

    layer_names: tuple[str, ...]
    computed: np.ndarray  # [layers] real layer computations
    reused: np.ndarray  # [layers] calls served from the cache
    evaluations: int = 0
    steps: int = 0
    retimed: bool = False
    cache_resets: int = 0
    seconds: float = 0.0  # wall time of the sampling run
    peak_cache_bytes: int = 0  # the most memory the cached tensors held at once
    peak_history_bytes: int = 0  # of it, the most that forecast history (points beyond the newest) held

    @property
    def total(self) -> int:
        return int(self.computed.sum() + self.reused.sum())


@dataclass
class _CacheEntry:
    """One layer call's cached streams, for one cond chunk."""

    # Newest first, one per computation kept for the forecast (order + 1 at most); each holds per
    # stream the residual branch or the output (None: the output was None).
    points: list[list[torch.Tensor | None]]
    taus: list[float]  # the normalized time of each point
    residual: list[bool]  # per stream: whether the points hold a residual branch
    input_shapes: list[tuple[int, ...] | None]  # per stream: the input's shape for this chunk (must match)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for point in self.points for t in point if t is not None)

    @property
    def history_bytes(self) -> int:
        """The part held only for the forecast: every point but the newest."""
        return sum(t.numel() * t.element_size() for point in self.points[1:] for t in point if t is not None)


@dataclass
class RunState:
    """Everything that lives for one sampling run, and nothing longer."""

    model_sampling: Any
    run_grid: StepGrid  # this run's own steps; profiles are recorded on it
    stats: RunStats
    # The schedule on this run's steps: the schedule's own plan on its own grid, else re-timed.
    plan: LayerPlan | None = None
    evaluation_step: int | None = None  # the step of ``plan.grid`` (profiling: of ``run_grid``)
    schedule_step: int | None = None  # the step of the schedule's grid (what scale-shift rows are indexed by)
    evaluation_tau: float = 1.0
    previous_step: int | None = None
    first_of_step: bool = False
    compute_now: np.ndarray | None = None
    in_evaluation: bool = False
    chunk_keys: list[Any] = field(default_factory=lambda: [None])
    # Calls of each layer within the current model call: a block list may run a block more than
    # once per call (OmniGen2's refiners, Wan VACE per control video), each with its own cache.
    occurrences: dict[int, int] = field(default_factory=dict)
    # Model calls per cond chunk in the current evaluation. Post-CFG patches (PAG, Skip-Layer
    # Guidance) call the model again with the same cond uuid; each such pass keeps its own cache,
    # or their perturbed outputs would be reused for the real cond.
    passes: dict[Any, int] = field(default_factory=dict)
    latent_signature: tuple | None = None
    cache: dict[tuple[int, Any, int], _CacheEntry] = field(default_factory=dict)
    cache_bytes: int = 0
    history_bytes: int = 0  # of cache_bytes, what older forecast points hold
    measure_flops: bool = False


class BlockCacheHolder:
    """State holder shared by one node's layer patches and wrappers.

    With a ``plan`` it caches; with a ``recorder`` it computes everything and profiles.
    """

    def __init__(self, block_map: BlockMap, plan: LayerPlan | None = None,
                 recorder: ProfileRecorder | None = None, name: str = "Block Cache",
                 cache_device: str = CACHE_ON_MODEL_DEVICE) -> None:
        if (plan is None) == (recorder is None):
            raise ValueError("a holder either caches (plan) or profiles (recorder)")
        if cache_device not in CACHE_DEVICES:
            raise ValueError(f"cache_device must be one of {', '.join(CACHE_DEVICES)}, got {cache_device!r}")
        self.block_map = block_map
        self.cache_device = cache_device
        self.plan = plan
        self.recorder = recorder
        self.name = name
        self.run: RunState | None = None
        self.last_run: RunStats | None = None
        self.last_sample_sigmas: torch.Tensor | None = None
        # Called with (holder, stats) after every completed run, e.g. to show a summary in the UI.
        self.run_listeners: list[Callable[[BlockCacheHolder, RunStats], None]] = []
        self._retime_logged = False
        # Faster Diffusion's prior noise injection (core.noise_injection), when Apply enables it.
        self.noise_injector: Any = None
        # Scale-shift corrections of reused tensors (core.scale_shift), per layer and stream, in
        # block-map order; None: reused tensors are used as cached.
        self.corrections: list[list[Any]] | None = None
        # A Calibrate Block Cache training session (core.calibration), while one runs.
        self.calibration: Any = None

    def reset(self) -> None:
        """Drop the run state and every cached tensor."""
        if self.run is not None:
            self.run.cache.clear()
        self.run = None

    # -- run and evaluation boundaries --------------------------------------------------------
    def start_run(self, model_sampling: Any, sample_sigmas: torch.Tensor, sampler_name: str = "") -> None:
        self.reset()
        names = tuple(layer.name for layer in self.block_map.layers)
        layers = len(names)
        step_taus = normalized_times(model_sampling, sample_sigmas[:-1]) if sample_sigmas.numel() > 1 else []
        stats = RunStats(names, np.zeros(layers, dtype=np.int64), np.zeros(layers, dtype=np.int64), steps=len(step_taus))
        run_grid = StepGrid(sigmas=tuple(float(s) for s in sample_sigmas.detach().cpu().reshape(-1)),
                            taus=tuple(step_taus))
        self.run = RunState(model_sampling=model_sampling, run_grid=run_grid, stats=stats, plan=self.plan,
                            measure_flops=self.recorder is not None)
        self.last_sample_sigmas = sample_sigmas.detach().cpu()
        grid = self.plan.grid if self.plan is not None else None
        other_sampler = bool(grid and grid.sampler and sampler_name and
                             _sampler_key(grid.sampler) != _sampler_key(sampler_name))
        if grid is not None and (other_sampler or not grid.same_as(step_taus)):
            stats.retimed = True
            if step_taus and not grid.same_as(step_taus):
                self.run.plan = self.plan.on_run_grid(model_sampling, run_grid)
            if not self._retime_logged:
                logger.info(
                    "%s: schedule made for %d steps of %s/%s re-timed onto this run's %d steps of %s by "
                    "normalized time, keeping its density of computations.", self.name, grid.steps,
                    grid.sampler or "?", grid.scheduler or "?", len(step_taus), sampler_name or "?")
                self._retime_logged = True

    def finish_run(self) -> RunStats | None:
        run = self.run
        self.reset()
        if run is None:
            return None
        self.last_run = run.stats
        return run.stats

    def begin_evaluation(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        run = self.run
        if run is None:
            return
        signature = (tuple(x.shape), x.dtype, x.device)
        if run.latent_signature is not None and signature != run.latent_signature:
            # A new batch size, resolution, dtype or device: the cache cannot be reused.
            logger.info("%s: latent changed from %s to %s; cache reset.", self.name, run.latent_signature, signature)
            run.cache.clear()
            run.cache_bytes = 0
            run.history_bytes = 0
            run.previous_step = None
            run.stats.cache_resets += 1
        run.latent_signature = signature
        tau = normalized_times(run.model_sampling, sigma.reshape(-1)[:1])[0]
        if run.plan is not None:
            step = run.plan.grid.step_of(tau)
            run.compute_now = run.plan.decisions(run.previous_step, step)
            run.schedule_step = self.plan.grid.step_of(tau) if run.plan is not self.plan else step
        else:
            step = run.run_grid.step_of(tau)
            run.compute_now = None
        run.first_of_step = run.previous_step is None or step != run.previous_step
        run.evaluation_step = step
        run.evaluation_tau = tau
        run.occurrences = {}
        run.passes = {}
        run.in_evaluation = True
        run.stats.evaluations += 1

    def observe_denoised(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
        """A profiling run records how far each step moves the latent (the error model's step weights)."""
        run = self.run
        if run is None or self.recorder is None or not run.first_of_step or run.evaluation_step is None:
            return
        sigmas = self.last_sample_sigmas
        step = run.evaluation_step
        if sigmas is None or step + 1 >= sigmas.numel():
            return
        self.recorder.observe_step(step, x, denoised, float(sigma.reshape(-1)[0]), float(sigmas[step + 1]))

    def restart_model_calls(self) -> None:
        """Forget the current evaluation's model calls, so that it can be run again from its start
        (calibration runs the teacher, then the student, on one evaluation)."""
        if self.run is not None:
            self.run.occurrences = {}
            self.run.passes = {}

    def end_evaluation(self) -> None:
        run = self.run
        if run is None:
            return
        run.previous_step = run.evaluation_step
        run.in_evaluation = False
        run.measure_flops = False

    # -- layer calls ---------------------------------------------------------------------------
    def call_layer(self, patch: CachedLayerForward, args: tuple, kwargs: dict) -> Any:
        run = self.run
        if run is None or not run.in_evaluation:
            return patch.original(*args, **kwargs)
        index = patch.layer_index
        occurrence = run.occurrences.get(index, 0)
        run.occurrences[index] = occurrence + 1
        keys = run.chunk_keys
        profiling = self.recorder is not None
        calibration = self.calibration
        if calibration is not None and calibration.teacher_pass:
            # The uncached teacher: everything computes; the outputs the student will reuse are targets.
            out = patch.original(*args, **kwargs)
            if not run.compute_now[index]:
                calibration.record_target(index, tuple(keys), occurrence, patch.spec, out)
            return out
        if not profiling and not run.compute_now[index]:
            if calibration is None:
                reused = self._reuse(run, patch, args, kwargs, keys, occurrence)
            else:
                with calibration.grad_context():
                    reused = self._reuse(run, patch, args, kwargs, keys, occurrence)
                if reused is not None:
                    reused = calibration.observe_reuse(index, tuple(keys), occurrence, patch.spec, reused)
            if reused is not None:
                run.stats.reused[index] += 1
                return reused
        keep = (run.first_of_step if profiling else bool(run.plan.reuses_ever[index]))
        inputs = _stream_inputs(patch.spec, args, kwargs, copy=keep and patch.spec.mutates_inputs) if keep else None
        if profiling and run.measure_flops:
            counter = FlopCounterMode(display=False)
            with counter:
                out = patch.original(*args, **kwargs)
            self.recorder.layer_flops[index] = float(counter.get_total_flops())
        else:
            out = patch.original(*args, **kwargs)
        run.stats.computed[index] += 1
        if inputs is not None:
            residual_wanted = profiling or self.plan.reuse[index] is ReuseMode.RESIDUAL
            branches = _branches(patch, inputs, out, residual_wanted, len(keys))
            if branches is not None:
                if profiling:
                    outputs = [patch.spec.batch_first(o) for o in patch.spec.split_output(out)]
                    self.recorder.observe(index, run.evaluation_step, keys, occurrence, [b for b, _ in branches],
                                          outputs)
                else:
                    self._store(run, index, occurrence, inputs, branches, keys)
        return out

    def _reuse(self, run: RunState, patch: CachedLayerForward, args: tuple, kwargs: dict, keys: list[Any],
               occurrence: int) -> Any:
        """The layer's output rebuilt from the cache, or None when a chunk has nothing usable."""
        inputs = _stream_inputs(patch.spec, args, kwargs, copy=False)
        entries = []
        for key in keys:
            entry = run.cache.get((patch.layer_index, key, occurrence))
            if entry is None:
                return None
            entries.append(entry)
        chunks = len(keys)
        elements: list[Any] = []
        corrections = self.corrections[patch.layer_index] if self.corrections is not None else None
        for stream_index, current in enumerate(inputs):
            expected = entries[0].input_shapes[stream_index]
            if expected is not None:
                if not isinstance(current, torch.Tensor) or current.shape[0] % chunks != 0 or \
                        (current.shape[0] // chunks, *current.shape[1:]) != expected:
                    return None  # another resolution or batch than when cached: compute instead
            if entries[0].points[0][stream_index] is None:
                elements.append(None)
                continue
            reference = current if isinstance(current, torch.Tensor) else None
            cached = _predicted(entries, stream_index, run.evaluation_tau, reference)
            if corrections is not None and corrections[stream_index] is not None:
                cached = corrections[stream_index].apply(cached, run.schedule_step)
            if entries[0].residual[stream_index]:
                with torch.no_grad():  # never part of a calibration's graph (the weights may be inference tensors)
                    base = patch.spec.residual_base(patch.module, current)
                elements.append(patch.spec.batch_back(base + cached))
            else:
                # callers may change it in place; the cache must stay intact
                elements.append(patch.spec.batch_back(cached.clone()))
        return patch.spec.join_output(elements)

    def _store(self, run: RunState, index: int, occurrence: int, inputs: list[Any],
               branches: list[tuple[torch.Tensor | None, bool]], keys: list[Any]) -> None:
        chunks = len(keys)
        for chunk, key in enumerate(keys):
            tensors: list[torch.Tensor | None] = []
            shapes: list[tuple[int, ...] | None] = []
            for current, (branch, _) in zip(inputs, branches, strict=True):
                if isinstance(current, torch.Tensor):
                    per_chunk = current.shape[0] // chunks
                    shapes.append((per_chunk, *current.shape[1:]))
                else:
                    shapes.append(None)
                if branch is None:
                    tensors.append(None)
                    continue
                per_chunk = branch.shape[0] // chunks
                part = branch[chunk * per_chunk:(chunk + 1) * per_chunk]
                if self.cache_device == CACHE_ON_CPU and part.device.type != "cpu":
                    part = part.to("cpu")
                elif chunks > 1:
                    part = part.clone()  # a slice would pin the whole batch
                tensors.append(part)
            residual = [r for _, r in branches]
            replaced = run.cache.get((index, key, occurrence))
            if replaced is not None and replaced.residual == residual and replaced.input_shapes == shapes:
                points, taus = push_point(replaced.points, replaced.taus, tensors, run.evaluation_tau,
                                          self.plan.orders[index])
            else:
                points, taus = [tensors], [run.evaluation_tau]
            entry = _CacheEntry(points, taus, residual, shapes)
            if replaced is not None:
                run.cache_bytes -= replaced.nbytes
                run.history_bytes -= replaced.history_bytes
            run.cache_bytes += entry.nbytes
            run.history_bytes += entry.history_bytes
            run.cache[(index, key, occurrence)] = entry
        run.stats.peak_history_bytes = max(run.stats.peak_history_bytes, run.history_bytes)
        run.stats.peak_cache_bytes = max(run.stats.peak_cache_bytes, run.cache_bytes)


def _predicted(entries: list[_CacheEntry], stream_index: int, tau: float,
               reference: torch.Tensor | None) -> torch.Tensor:
    """One stream's stand-in for all chunks of a call: each chunk's cached value, or its forecast
    at ``tau`` from the points kept, on the device and in the dtype of ``reference``."""
    parts = []
    for entry in entries:
        tensors = [point[stream_index] for point in entry.points]
        if reference is not None and (tensors[0].device != reference.device or tensors[0].dtype != reference.dtype):
            tensors = [t.to(device=reference.device, dtype=reference.dtype) for t in tensors]
        if len(tensors) == 1:
            parts.append(tensors[0])  # order 0: reused exactly as cached
        else:
            parts.append(combine(tensors, lagrange_weights(entry.taus, tau)))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stream_inputs(spec: LayerSpec, args: tuple, kwargs: dict, copy: bool) -> list[Any]:
    values = [spec.batch_first(stream.input_of(args, kwargs)) for stream in spec.streams]
    if copy:
        values = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in values]
    return values


def _branches(patch: CachedLayerForward, inputs: list[Any], out: Any, residual_wanted: bool,
              chunks: int) -> list[tuple[torch.Tensor | None, bool]] | None:
    """Per stream: (residual branch or output copy, is residual); None if the call cannot be cached.

    A stream is cached as a residual where the layer has a residual form and, for an identity
    residual, keeps the stream's shape; otherwise as its output.
    """
    spec = patch.spec
    try:
        outputs = [spec.batch_first(output) for output in spec.split_output(out)]
    except (KeyError, IndexError, TypeError):
        return None  # the block returned something its signature does not describe
    result: list[tuple[torch.Tensor | None, bool]] = []
    for current, output in zip(inputs, outputs, strict=True):
        if output is None:
            result.append((None, False))
            continue
        if not isinstance(output, torch.Tensor) or output.ndim == 0 or output.shape[0] % chunks != 0:
            return None  # not a batch of the call's cond chunks: nothing per chunk to cache
        residual = residual_wanted and isinstance(current, torch.Tensor) and (
            spec.residual is ResidualForm.SKIP_CONNECTION or
            (spec.residual is ResidualForm.IDENTITY and current.shape == output.shape))
        if residual:
            result.append(((output - spec.residual_base(patch.module, current)).detach(), True))
        else:
            result.append((output.detach().clone(), False))
    return result


def _sampler_key(name: str) -> str:
    """Comparable sampler names: KSampler's 'ddim' runs sample_euler; 'uni_pc' runs sample_unipc."""
    key = name.replace("_", "")
    return "euler" if key == "ddim" else key


def sampler_name_of(sampler: Any) -> str:
    """The k-diffusion name of a ComfyUI sampler object, e.g. 'heun' (empty when unknown)."""
    function = getattr(sampler, "sampler_function", None)
    return getattr(function, "__name__", "").removeprefix("sample_")


class CachedLayerForward:
    """The object patch that replaces one layer's ``forward``.

    It keeps the forward it replaced (the layer's own, or another pack's patch) and calls it
    whenever the layer must compute, so patches chain rather than overwrite.
    """

    def __init__(self, holder: BlockCacheHolder, layer_index: int, spec: LayerSpec,
                 module: torch.nn.Module, original: Callable[..., Any]) -> None:
        self.holder = holder
        self.layer_index = layer_index
        self.spec = spec
        self.module = module
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.holder.call_layer(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<Block Cache forward of {self.spec.name}>"


# -- wrappers (registered with WRAPPER_KEY through ModelPatcher.add_wrapper_with_key) ---------------

def _sampling_run(executor: Any, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor]:
    """The model_sampling and sigmas of an OUTER_SAMPLE call."""
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    return executor.class_obj.model_patcher.get_model_object("model_sampling"), sigmas


def run_scoped_outer_sample_wrapper(component: Any, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """For a per-run helper beside the cache (noise injection, parallel decoding): its
    ``start_run(model_sampling, sigmas)`` before the run, its ``finish_run()`` after it, whatever happens."""
    component.start_run(*_sampling_run(executor, args, kwargs))
    try:
        return executor(*args, **kwargs)
    finally:
        component.finish_run()


def outer_sample_wrapper(holder: BlockCacheHolder, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Starts a fresh run state for every sampling run, and frees it whatever happens."""
    model_sampling, sigmas = _sampling_run(executor, args, kwargs)
    sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
    holder.start_run(model_sampling, sigmas, sampler_name_of(sampler))
    started = time.perf_counter()
    completed = False
    try:
        result = executor(*args, **kwargs)
        completed = True
        return result
    finally:
        stats = holder.finish_run()
        if stats is not None and completed:
            stats.seconds = time.perf_counter() - started
            log_run_summary(holder, stats)
            for listener in holder.run_listeners:
                try:
                    listener(holder, stats)
                except Exception:  # a display hook must never fail a finished run
                    logger.exception("%s: a run listener failed", holder.name)


def predict_noise_wrapper(holder: BlockCacheHolder, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs once per solver evaluation, for all conds together."""
    x = args[0] if args else kwargs["x"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    holder.begin_evaluation(x, timestep)
    try:
        denoised = executor(*args, **kwargs)
        holder.observe_denoised(x, timestep, denoised)
        return denoised
    finally:
        holder.end_evaluation()


def apply_model_wrapper(holder: BlockCacheHolder, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Records which cond chunks the current model call carries (one cache per chunk)."""
    run = holder.run
    if run is None:
        return executor(*args, **kwargs)
    transformer_options = kwargs.get("transformer_options")
    if transformer_options is None and len(args) > 5:
        transformer_options = args[5]
    transformer_options = transformer_options or {}
    keys = transformer_options.get("uuids") or transformer_options.get("cond_or_uncond") or [None]
    x = args[0] if args else kwargs["x"]
    if x.shape[0] % len(keys) != 0:
        keys = [None]
    previous = run.chunk_keys, run.occurrences
    passes = run.passes
    pass_index = max(passes.get(key, 0) for key in keys)
    for key in keys:
        passes[key] = pass_index + 1
    run.chunk_keys, run.occurrences = [(key, pass_index) for key in keys], {}
    measure_total = run.measure_flops and holder.recorder is not None
    try:
        if measure_total:
            counter = FlopCounterMode(display=False)
            with counter:
                out = executor(*args, **kwargs)
            holder.recorder.total_flops = float(counter.get_total_flops())
            return out
        return executor(*args, **kwargs)
    finally:
        run.chunk_keys, run.occurrences = previous


def log_run_summary(holder: BlockCacheHolder, stats: RunStats) -> None:
    total = stats.total
    if holder.recorder is not None:
        logger.info("%s: profiled %d layers over %d steps (%d model evaluations).",
                    holder.name, len(stats.layer_names), stats.steps, stats.evaluations)
        return
    skipped = int(stats.reused.sum())
    estimate = run_speedup_estimate(holder, stats)
    orders = sorted({order for order, reused in zip(holder.plan.orders, holder.plan.reuses_ever, strict=True)
                     if reused})
    forecast = ""
    if any(orders):
        forecast = (f", of which forecast history (order {'/'.join(str(o) for o in orders)}) "
                    f"{stats.peak_history_bytes / 2**20:.1f} MB")
    logger.info(
        "%s: computed %d/%d layer evaluations, skipped %d (%.0f%%) over %d steps / %d model evaluations%s; "
        "estimated speed-up %.2fx (FLOP-weighted); the cache held at most %.1f MB (%s)%s.",
        holder.name, int(stats.computed.sum()), total, skipped, 100.0 * skipped / max(1, total), stats.steps,
        stats.evaluations, ", schedule re-timed" if stats.retimed else "", estimate,
        stats.peak_cache_bytes / 2**20, holder.cache_device, forecast)


def run_speedup_estimate(holder: BlockCacheHolder, stats: RunStats) -> float:
    """FLOP-weighted speed-up of a finished run, from what it really computed."""
    plan = holder.plan
    calls = stats.computed + stats.reused
    if plan is None or plan.total_flops <= 0 or calls.max(initial=0) == 0:
        return 1.0
    # One column holding each layer's computed share of its calls.
    compute_rate = (stats.computed / np.maximum(calls, 1))[:, None]
    fraction = computed_flop_fraction(compute_rate, plan.layer_flops, plan.total_flops)
    return 1.0 / fraction if fraction > 0 else 1.0


def bind(wrapper: Callable[..., Any], holder: BlockCacheHolder) -> Callable[..., Any]:
    """A wrapper with its holder bound, in the ``wrapper(executor, *args, **kwargs)`` form."""
    return functools.partial(wrapper, holder)
