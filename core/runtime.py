"""The sampling-time runtime: per-layer forward patches and the wrappers that drive them.

A ``BlockCacheHolder`` is what one Apply (or Profile) node installed: the block map and the
plan, read-only. Its layer patches (``CachedLayerForward``, ModelPatcher object patches on each
layer's ``forward``) and keyed wrappers all point at it; everything of one run lives in a
``RunContext``:

* OUTER_SAMPLE creates the run's context (with the schedule moved onto the run's own steps where
  they differ), publishes it in the run's ``transformer_options``, and frees it at the end,
  logging what was computed and skipped;
* PREDICT_NOISE marks each solver evaluation: the context maps its sigma onto the steps once and
  decides, per layer, compute or reuse (a reused layer stands in with its cached value, or a
  forecast from its last computations: core/forecast.py), and which computations to store;
* APPLY_MODEL opens a ``ModelCall`` scope (the cond chunks the call carries and the model it runs
  on), which the layer patches read, so caches are per chunk and threads keep apart.

Outside a run the layer patches call the forward they replaced, untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import comfy.model_patcher
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

# k-diffusion samplers that evaluate the model once per step. With them a computation is stored only
# where the plan has a reuse ahead; any other sampler may evaluate a step twice (Heun's corrector
# lands on the next step) and reuse there, so everything reusable is stored.
ONE_EVALUATION_PER_STEP = frozenset({
    "euler", "euler_ancestral", "euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "lcm", "ipndm", "ipndm_v", "deis",
    "res_multistep", "res_multistep_cfg_pp", "unipc", "unipc_bh2", "gradient_estimation",
})


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
    stores: np.ndarray  # [layers, steps]: a computation at the step is kept, for a reuse that can follow

    @classmethod
    def from_schedule(cls, schedule: CacheSchedule) -> LayerPlan:
        return cls.from_mask(schedule.grid, schedule.compute_mask(), tuple(layer.reuse for layer in schedule.layers),
                             schedule.layer_flops, schedule.total_flops,
                             tuple(layer.forecast_order for layer in schedule.layers))

    @classmethod
    def from_mask(cls, grid: StepGrid, mask: np.ndarray, reuse: tuple[ReuseMode, ...], layer_flops: tuple[float, ...],
                  total_flops: float, orders: tuple[int, ...]) -> LayerPlan:
        return cls(grid=grid, reuse=reuse, layer_flops=layer_flops, total_flops=total_flops,
                   cumulative_computes=np.cumsum(mask, axis=1), reuses_ever=~mask.all(axis=1), orders=orders,
                   stores=stores_for(mask, orders))

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


def stores_for(mask: np.ndarray, orders: tuple[int, ...]) -> np.ndarray:
    """Which computations a reuse can read: for each reuse step, the last ``order + 1`` computations
    before it (the forecast's points). The others are not stored, so all-compute stretches cost nothing."""
    stores = np.zeros_like(mask, dtype=bool)
    for layer, order in enumerate(orders):
        needed = 0  # computations still wanted by the next reuse ahead
        for step in range(mask.shape[1] - 1, -1, -1):
            if not mask[layer, step]:
                needed = order + 1
            elif needed:
                stores[layer, step] = True
                needed -= 1
    return stores


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
    stores: int = 0  # layer calls whose output was cached (a reuse could follow)
    offloaded: int = 0  # cached tensors copied to CPU memory (cache_device=cpu)
    sample_sigmas: torch.Tensor | None = None  # the run's sigmas, on the CPU
    sampler: str = ""  # the k-diffusion sampler's name, where known
    cfg: float | None = None  # the guider's CFG scale, where it has one
    latent_shape: tuple[int, ...] = ()
    injected_steps: list[int] = field(default_factory=list)  # prior noise injection's steps (Faster Diffusion)

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


class BlockCacheHolder:
    """What one Apply (or Profile) node installed: the block map and the plan, never run state.

    Clones of the patched model share it (through their wrappers and object patches), so it is
    read-only during sampling. Each run gets its own ``RunContext``; the holder only keeps the
    last finished run's figures (``last_run``) for the node's display and for tests.
    """

    def __init__(self, block_map: BlockMap, plan: LayerPlan | None = None, profiling: bool = False,
                 name: str = "Block Cache", cache_device: str = CACHE_ON_MODEL_DEVICE) -> None:
        if (plan is None) != profiling:
            raise ValueError("a holder either caches (plan) or profiles")
        if cache_device not in CACHE_DEVICES:
            raise ValueError(f"cache_device must be one of {', '.join(CACHE_DEVICES)}, got {cache_device!r}")
        self.block_map = block_map
        self.cache_device = cache_device
        self.plan = plan
        self.profiling = profiling
        self.name = name
        # Scale-shift corrections of reused tensors (core.scale_shift), per layer and stream, in
        # block-map order; None: reused tensors are used as cached.
        self.corrections: list[list[Any]] | None = None
        # Faster Diffusion's prior noise injection (core.noise_injection.NoiseInjection), when enabled.
        self.noise_injection: Any = None
        # Called with (holder, stats) after every completed run, e.g. to show a summary in the UI.
        self.run_listeners: list[Callable[[BlockCacheHolder, RunStats], None]] = []
        self.last_run: RunStats | None = None
        self.last_recording: ProfileRecorder | None = None  # a profiling holder's last run

    @property
    def last_sample_sigmas(self) -> torch.Tensor | None:
        return self.last_run.sample_sigmas if self.last_run is not None else None


class RunContext:
    """Everything that lives for one sampling run, and nothing longer.

    Created by the OUTER_SAMPLE wrapper and published in the run's ``transformer_options`` under
    ``WRAPPER_KEY`` (as core EasyCache publishes its holder), so every wrapper of the run, in any
    thread, reads the same context; layer patches reach it through the current ``ModelCall``.
    Noise injection, parallel decoding and calibration read the step and the decisions from it.
    """

    def __init__(self, holder: BlockCacheHolder, model_sampling: Any, sample_sigmas: torch.Tensor,
                 sampler_name: str = "") -> None:
        self.holder = holder
        self.model_sampling = model_sampling
        names = tuple(layer.name for layer in holder.block_map.layers)
        layers = len(names)
        sigmas = sample_sigmas.detach().to("cpu").reshape(-1)
        step_taus = normalized_times(model_sampling, sigmas[:-1]) if sigmas.numel() > 1 else []
        self.stats = RunStats(names, np.zeros(layers, dtype=np.int64), np.zeros(layers, dtype=np.int64),
                              steps=len(step_taus), sample_sigmas=sigmas, sampler=sampler_name)
        self.run_grid = StepGrid(sigmas=tuple(float(s) for s in sigmas), taus=tuple(step_taus))
        # The schedule on this run's steps: the schedule's own plan on its own grid, else re-timed.
        self.plan = holder.plan
        self.recorder = ProfileRecorder(holder.block_map) if holder.profiling else None
        self.measure_flops = holder.profiling
        self.cache_on_cpu = holder.cache_device == CACHE_ON_CPU
        self.noise_injector: Any = None  # core.noise_injection.NoiseInjector, per run
        self.parallel_decoder: Any = None  # core.parallel_decoding.ParallelDecoder, per run
        self.calibration: Any = None  # core.calibration.CalibrationSession, while one trains on this run
        self.evaluation_step: int | None = None  # the step of ``plan.grid`` (profiling: of ``run_grid``)
        self.run_step: int | None = None  # the step of ``run_grid``
        self.schedule_step: int | None = None  # the step of the schedule's grid (scale-shift rows)
        self.evaluation_tau = 1.0
        self.previous_step: int | None = None
        self.first_of_step = False
        self.compute_now: np.ndarray | None = None
        self.store_now: np.ndarray | None = None
        self.in_evaluation = False
        # A sampler that may evaluate one step twice (Heun) keeps every computation a reuse could read.
        self.repeats_steps = sampler_name not in ONE_EVALUATION_PER_STEP
        # Model calls per cond chunk in the current evaluation. Post-CFG patches (PAG, Skip-Layer
        # Guidance) call the model again with the same cond uuid; each such pass keeps its own cache,
        # or their perturbed outputs would be reused for the real cond.
        self.passes: dict[Any, int] = {}
        self.latent_signature: tuple | None = None
        self.cache: dict[tuple[int, Any, int], _CacheEntry] = {}
        self.cache_bytes = 0
        self.history_bytes = 0  # of cache_bytes, what older forecast points hold
        grid = holder.plan.grid if holder.plan is not None else None
        other_sampler = bool(grid and grid.sampler and sampler_name and
                             _sampler_key(grid.sampler) != _sampler_key(sampler_name))
        if grid is not None and (other_sampler or not grid.same_as(step_taus)):
            self.stats.retimed = True
            if step_taus and not grid.same_as(step_taus):
                self.plan = holder.plan.on_run_grid(model_sampling, self.run_grid)
            logger.info(
                "%s: schedule made for %d steps of %s/%s re-timed onto this run's %d steps of %s by "
                "normalized time, keeping its density of computations.", holder.name, grid.steps,
                grid.sampler or "?", grid.scheduler or "?", len(step_taus), sampler_name or "?")
        if holder.noise_injection is not None:
            from .noise_injection import NoiseInjector

            self.noise_injector = NoiseInjector(holder.noise_injection, model_sampling, holder.name)

    @property
    def corrections(self) -> list[list[Any]] | None:
        calibration = self.calibration
        return calibration.corrections if calibration is not None else self.holder.corrections

    def close(self) -> RunStats:
        """Frees every cached tensor; the run's figures stay in the returned stats."""
        self.cache.clear()
        self.cache_bytes = self.history_bytes = 0
        if self.noise_injector is not None:
            self.stats.injected_steps = self.noise_injector.finish_run()
        return self.stats

    # -- evaluation boundaries ----------------------------------------------------------------
    def begin_evaluation(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        signature = (tuple(x.shape), x.dtype, x.device)
        if self.latent_signature is not None and signature != self.latent_signature:
            # A new batch size, resolution, dtype or device: the cache cannot be reused.
            logger.info("%s: latent changed from %s to %s; cache reset.", self.holder.name, self.latent_signature,
                        signature)
            self.cache.clear()
            self.cache_bytes = self.history_bytes = 0
            self.previous_step = None
            self.stats.cache_resets += 1
        self.latent_signature = signature
        self.stats.latent_shape = tuple(x.shape)
        tau = normalized_times(self.model_sampling, sigma.reshape(-1)[:1])[0]  # the evaluation's one host sync
        self.run_step = self.run_grid.step_of(tau)
        plan = self.plan
        if plan is not None:
            step = plan.grid.step_of(tau)
            if step == self.previous_step:
                self.repeats_steps = True
            self.compute_now = plan.decisions(self.previous_step, step)
            self.store_now = plan.reuses_ever if self.repeats_steps else plan.stores[:, step]
            self.schedule_step = self.holder.plan.grid.step_of(tau) if plan is not self.holder.plan else step
        else:
            step = self.run_step
            self.compute_now = self.store_now = None
        self.first_of_step = self.previous_step is None or step != self.previous_step
        self.evaluation_step = step
        self.evaluation_tau = tau
        self.passes = {}
        self.in_evaluation = True
        self.stats.evaluations += 1

    def observe_denoised(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
        """A profiling run records how far each step moves the latent (the error model's step weights)."""
        if self.recorder is None or not self.first_of_step or self.evaluation_step is None:
            return
        sigmas = self.stats.sample_sigmas
        step = self.evaluation_step
        if sigmas is None or step + 1 >= sigmas.numel():
            return
        self.recorder.observe_step(step, x, denoised, float(sigma.reshape(-1)[0]), float(sigmas[step + 1]))

    def end_evaluation(self) -> None:
        self.previous_step = self.evaluation_step
        self.in_evaluation = False
        self.measure_flops = False

    def model_call(self, chunk_keys: list[Any], base_model: Any = None) -> contextlib.AbstractContextManager[ModelCall]:
        """The scope of one diffusion-model call: layer patches called inside it act for this run."""
        return activate(ModelCall(self, chunk_keys, base_model))

    # -- layer calls ---------------------------------------------------------------------------
    def call_layer(self, patch: CachedLayerForward, call: ModelCall, args: tuple, kwargs: dict) -> Any:
        module, forward = patch.resolve(call.base_model)
        if not self.in_evaluation:
            return forward(*args, **kwargs)
        index = patch.layer_index
        occurrence = call.occurrences.get(index, 0)
        call.occurrences[index] = occurrence + 1
        keys = call.chunk_keys
        profiling = self.recorder is not None
        calibration = self.calibration
        if calibration is not None and calibration.teacher_pass:
            # The uncached teacher: everything computes; the outputs the student will reuse are targets.
            out = forward(*args, **kwargs)
            if not self.compute_now[index]:
                calibration.record_target(index, tuple(keys), occurrence, patch.spec, out)
            return out
        if not profiling and not self.compute_now[index]:
            if calibration is None:
                reused = self._reuse(patch, module, args, kwargs, keys, occurrence)
            else:
                with calibration.grad_context():
                    reused = self._reuse(patch, module, args, kwargs, keys, occurrence)
                if reused is not None:
                    reused = calibration.observe_reuse(index, tuple(keys), occurrence, patch.spec, reused)
            if reused is not None:
                self.stats.reused[index] += 1
                return reused
        keep = self.first_of_step if profiling else bool(self.store_now[index])
        if not keep and not profiling and self.cache:
            for key in keys:  # what the cache holds for this call is older than this computation
                self._drop(self.cache.pop((index, key, occurrence), None))
        inputs = _stream_inputs(patch.spec, args, kwargs, copy=patch.spec.mutates_inputs) if keep else None
        if profiling and self.measure_flops:
            counter = FlopCounterMode(display=False)
            with counter:
                out = forward(*args, **kwargs)
            self.recorder.layer_flops[index] = float(counter.get_total_flops())
        else:
            out = forward(*args, **kwargs)
        self.stats.computed[index] += 1
        if inputs is not None:
            residual_wanted = profiling or self.plan.reuse[index] is ReuseMode.RESIDUAL
            branches = _branches(patch.spec, module, inputs, out, residual_wanted, len(keys))
            if branches is not None:
                if profiling:
                    outputs = [patch.spec.batch_first(o) for o in patch.spec.split_output(out)]
                    self.recorder.observe(index, self.evaluation_step, keys, occurrence, [b for b, _ in branches],
                                          outputs)
                else:
                    self._store(index, occurrence, inputs, branches, keys)
        return out

    def _reuse(self, patch: CachedLayerForward, module: torch.nn.Module, args: tuple, kwargs: dict,
               keys: list[Any], occurrence: int) -> Any:
        """The layer's output rebuilt from the cache, or None when a chunk has nothing usable."""
        inputs = _stream_inputs(patch.spec, args, kwargs, copy=False)
        entries = []
        for key in keys:
            entry = self.cache.get((patch.layer_index, key, occurrence))
            if entry is None:
                return None
            entries.append(entry)
        chunks = len(keys)
        elements: list[Any] = []
        corrections = self.corrections
        layer_corrections = corrections[patch.layer_index] if corrections is not None else None
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
            cached = _predicted(entries, stream_index, self.evaluation_tau, reference)
            if layer_corrections is not None and layer_corrections[stream_index] is not None:
                cached = layer_corrections[stream_index].apply(cached, self.schedule_step)
            if entries[0].residual[stream_index]:
                with torch.no_grad():  # never part of a calibration's graph (the weights may be inference tensors)
                    base = patch.spec.residual_base(module, current)
                elements.append(patch.spec.batch_back(base + cached))
            elif cached is entries[0].points[0][stream_index]:
                # callers may change it in place; the cache must stay intact
                elements.append(patch.spec.batch_back(cached.clone()))
            else:
                elements.append(patch.spec.batch_back(cached))
        return patch.spec.join_output(elements)

    def _drop(self, entry: _CacheEntry | None) -> None:
        if entry is not None:
            self.cache_bytes -= entry.nbytes
            self.history_bytes -= entry.history_bytes

    def _store(self, index: int, occurrence: int, inputs: list[Any],
               branches: list[tuple[torch.Tensor | None, bool]], keys: list[Any]) -> None:
        chunks = len(keys)
        order = self.plan.orders[index]
        residual = [r for _, r in branches]
        for chunk, key in enumerate(keys):
            shapes: list[tuple[int, ...] | None] = [
                (current.shape[0] // chunks, *current.shape[1:]) if isinstance(current, torch.Tensor) else None
                for current in inputs]
            replaced = self.cache.get((index, key, occurrence))
            extends = replaced is not None and replaced.residual == residual and replaced.input_shapes == shapes
            # The point that leaves the history lends its buffers to the new one (pinned memory is costly).
            spare = replaced.points[-1] if extends and len(replaced.points) > order else None
            tensors: list[torch.Tensor | None] = []
            for stream, (branch, _) in enumerate(branches):
                if branch is None:
                    tensors.append(None)
                    continue
                per_chunk = branch.shape[0] // chunks
                part = branch[chunk * per_chunk:(chunk + 1) * per_chunk]
                if self.cache_on_cpu:
                    part = offload_to_cpu(part, spare[stream] if spare is not None else None)
                    self.stats.offloaded += 1
                elif chunks > 1:
                    part = part.clone()  # a slice would pin the whole batch
                tensors.append(part)
            if extends:
                points, taus = push_point(replaced.points, replaced.taus, tensors, self.evaluation_tau, order)
            else:
                points, taus = [tensors], [self.evaluation_tau]
            entry = _CacheEntry(points, taus, residual, shapes)
            self._drop(replaced)
            self.cache_bytes += entry.nbytes
            self.history_bytes += entry.history_bytes
            self.cache[(index, key, occurrence)] = entry
        self.stats.stores += 1
        self.stats.peak_history_bytes = max(self.stats.peak_history_bytes, self.history_bytes)
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.cache_bytes)


@dataclass
class ModelCall:
    """One diffusion-model call of a run: the cond chunks it carries, and the calls of each layer in it.

    A block list may run a block more than once per call (OmniGen2's refiners, Wan VACE per control
    video), each with its own cache. Kept per call, not per run, so that conds run in parallel
    threads (multi-GPU) each count their own.
    """

    run: RunContext
    chunk_keys: list[Any]
    base_model: Any = None  # the model this call runs on: a clone's on another device, under multi-GPU
    occurrences: dict[int, int] = field(default_factory=dict)


_ACTIVE_CALL: contextvars.ContextVar[ModelCall | None] = contextvars.ContextVar("block_cache_model_call",
                                                                                default=None)


@contextlib.contextmanager
def activate(call: ModelCall) -> Iterator[ModelCall]:
    """Layer patches called inside this scope act for ``call``."""
    token = _ACTIVE_CALL.set(call)
    try:
        yield call
    finally:
        _ACTIVE_CALL.reset(token)


def active_call() -> ModelCall | None:
    """The model call running in this thread, if a Block Cache run started it."""
    return _ACTIVE_CALL.get()


def run_context(options: dict | None) -> RunContext | None:
    """The run context published in ``transformer_options`` (or in ``model_options``' ones)."""
    if not options:
        return None
    transformer_options = options.get("transformer_options", options)
    context = transformer_options.get(WRAPPER_KEY) if isinstance(transformer_options, dict) else None
    return context if isinstance(context, RunContext) else None


def offload_to_cpu(part: torch.Tensor, spare: torch.Tensor | None) -> torch.Tensor:
    """A CPU copy of ``part`` for the cache: into pinned memory without blocking the GPU, reusing
    ``spare`` (a buffer the cache is done with) where it fits; a CPU tensor is copied as is."""
    if part.device.type == "cpu":
        return part.clone()
    if spare is None or spare.shape != part.shape or spare.dtype != part.dtype or spare.device.type != "cpu":
        spare = torch.empty(part.shape, dtype=part.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    spare.copy_(part, non_blocking=spare.is_pinned())
    return spare


def _predicted(entries: list[_CacheEntry], stream_index: int, tau: float,
               reference: torch.Tensor | None) -> torch.Tensor:
    """One stream's stand-in for all chunks of a call: each chunk's cached value, or its forecast
    at ``tau`` from the points kept, on the device and in the dtype of ``reference``."""
    parts = []
    for entry in entries:
        tensors = [point[stream_index] for point in entry.points]
        if reference is not None and (tensors[0].device != reference.device or tensors[0].dtype != reference.dtype):
            tensors = [t.to(device=reference.device, dtype=reference.dtype, non_blocking=True) for t in tensors]
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


def _branches(spec: LayerSpec, module: torch.nn.Module, inputs: list[Any], out: Any, residual_wanted: bool,
              chunks: int) -> list[tuple[torch.Tensor | None, bool]] | None:
    """Per stream: (residual branch or output copy, is residual); None if the call cannot be cached.

    A stream is cached as a residual where the layer has a residual form and, for an identity
    residual, keeps the stream's shape; otherwise as its output.
    """
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
            result.append(((output - spec.residual_base(module, current)).detach(), True))
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
    whenever the layer must compute, so patches chain rather than overwrite. Outside a Block
    Cache run it is that forward, untouched.
    """

    def __init__(self, holder: BlockCacheHolder, layer_index: int, spec: LayerSpec,
                 module: torch.nn.Module, original: Callable[..., Any], diffusion_model: torch.nn.Module) -> None:
        self.holder = holder
        self.layer_index = layer_index
        self.spec = spec
        self.module = module
        self.original = original
        self.diffusion_model = diffusion_model  # the model the patch was made on
        self._other_module_logged = False

    def resolve(self, base_model: Any) -> tuple[torch.nn.Module, Callable[..., Any]]:
        """The layer module this call runs on, and its forward. A clone moved onto other modules
        (multi-GPU, dynamic VRAM) carries this patch too: there the layer is looked up by name."""
        diffusion_model = getattr(base_model, "diffusion_model", None)
        if diffusion_model is None or diffusion_model is self.diffusion_model:
            return self.module, self.original
        module = diffusion_model.get_submodule(self.spec.name)
        if not self._other_module_logged:
            self._other_module_logged = True
            logger.info("%s: %s runs on another copy of the model (multi-GPU or dynamic VRAM); its own forward "
                        "is used there.", self.holder.name, self.spec.name)
        return module, type(module).forward.__get__(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = _ACTIVE_CALL.get()
        if call is None or call.run.holder is not self.holder:
            return self.original(*args, **kwargs)
        return call.run.call_layer(self, call, args, kwargs)

    def __repr__(self) -> str:
        return f"<Block Cache forward of {self.spec.name}>"


# -- wrappers (registered with WRAPPER_KEY through ModelPatcher.add_wrapper_with_key) ---------------

def _sampling_run(executor: Any, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor]:
    """The model_sampling and sigmas of an OUTER_SAMPLE call."""
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    return executor.class_obj.model_patcher.get_model_object("model_sampling"), sigmas


def outer_sample_wrapper(holder: BlockCacheHolder, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Starts a fresh run context for every sampling run, publishes it in the guider's
    ``transformer_options`` for the run, and frees it whatever happens."""
    model_sampling, sigmas = _sampling_run(executor, args, kwargs)
    sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
    run = RunContext(holder, model_sampling, sigmas, sampler_name_of(sampler))
    guider = executor.class_obj
    cfg = getattr(guider, "cfg", None)
    run.stats.cfg = float(cfg) if isinstance(cfg, (int, float)) else None
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    guider.model_options.setdefault("transformer_options", {})[WRAPPER_KEY] = run
    started = time.perf_counter()
    completed = False
    try:
        result = executor(*args, **kwargs)
        completed = True
        return result
    finally:
        guider.model_options = original_options
        stats = run.close()
        if holder.profiling:
            holder.last_recording = run.recorder
        holder.last_run = stats
        if completed:
            stats.seconds = time.perf_counter() - started
            log_run_summary(holder, stats)
            for listener in holder.run_listeners:
                try:
                    listener(holder, stats)
                except Exception:  # a display hook must never fail a finished run
                    logger.exception("%s: a run listener failed", holder.name)


def _predict_noise_run(args: tuple, kwargs: dict) -> RunContext | None:
    model_options = args[2] if len(args) > 2 else kwargs.get("model_options")
    return run_context(model_options)


def predict_noise_wrapper(holder: BlockCacheHolder, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs once per solver evaluation, for all conds together."""
    run = _predict_noise_run(args, kwargs)
    if run is None or run.holder is not holder:
        return executor(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    run.begin_evaluation(x, timestep)
    try:
        if run.noise_injector is not None:
            run.noise_injector.before_evaluation(x, timestep, run.run_step, run.evaluation_tau)
        denoised = executor(*args, **kwargs)
        run.observe_denoised(x, timestep, denoised)
        return denoised
    finally:
        run.end_evaluation()


def apply_model_wrapper(holder: BlockCacheHolder, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Opens the model call's scope: which cond chunks it carries (one cache per chunk), and the
    model it runs on, for the layer patches called inside it."""
    transformer_options = kwargs.get("transformer_options")
    if transformer_options is None and len(args) > 5:
        transformer_options = args[5]
    transformer_options = transformer_options or {}
    run = run_context(transformer_options)
    if run is None or run.holder is not holder:
        return executor(*args, **kwargs)
    keys = transformer_options.get("uuids") or transformer_options.get("cond_or_uncond") or [None]
    x = args[0] if args else kwargs["x"]
    if x.shape[0] % len(keys) != 0:
        keys = [None]
    passes = run.passes
    pass_index = max(passes.get(key, 0) for key in keys)
    for key in keys:
        passes[key] = pass_index + 1
    measure_total = run.measure_flops and run.recorder is not None
    with run.model_call([(key, pass_index) for key in keys], getattr(executor, "class_obj", None)):
        if measure_total:
            counter = FlopCounterMode(display=False)
            with counter:
                out = executor(*args, **kwargs)
            run.recorder.total_flops = float(counter.get_total_flops())
            return out
        return executor(*args, **kwargs)


def log_run_summary(holder: BlockCacheHolder, stats: RunStats) -> None:
    total = stats.total
    if holder.profiling:
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
        "estimated speed-up %.2fx (FLOP-weighted); the cache held at most %.1f MB (%s)%s; %d computations "
        "were stored for a reuse.",
        holder.name, int(stats.computed.sum()), total, skipped, 100.0 * skipped / max(1, total), stats.steps,
        stats.evaluations, ", schedule re-timed" if stats.retimed else "", estimate,
        stats.peak_cache_bytes / 2**20, holder.cache_device, forecast, stats.stores)


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


def bind(wrapper: Callable[..., Any], holder: Any) -> Callable[..., Any]:
    """A wrapper with its holder bound, in the ``wrapper(executor, *args, **kwargs)`` form."""
    return functools.partial(wrapper, holder)
