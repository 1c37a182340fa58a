"""Block Caching's run method: per layer, compute, or reuse the cached residual (or its forecast).

A ``BlockCacheHolder`` carries the plan (``LayerPlan``: a schedule as arrays) and where the cache
lives; each run gets a ``LayerCache`` from it, which at every evaluation decides per layer from
the plan (moved onto the run's own steps where they differ) whether to compute or reuse, which
computations to store, and serves the layer calls: a reused layer stands in with its cached
value, or a forecast from its last computations (block_caching/forecast.py), corrected by the
schedule's scale-shift table where it has one, or by a ``ReuseTrainer`` (Calibrate's training)
that an extension of the run sets.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..block_maps.block_map import BlockMap, LayerSpec, ReuseMode
from ..runtime.run import LayerForward, LayerMethod, ModelCall, RunContext, RunHolder, RunStats
from .forecast import combine, forecast_weights, push_point
from .layer_calls import residual_branches, stream_inputs
from .plan import LayerPlan
from .run_summary import run_speedup_estimate

logger = logging.getLogger(__name__)

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


class ReuseTrainer(Protocol):
    """What trains the correction of reused outputs on a run (block_caching/calibration.py): the cache
    hands it the layer calls of the evaluation's teacher pass and every reused output of the student's."""

    teacher_pass: bool  # the current pass is the uncached teacher's: every layer computes
    corrections: list[list[Any]] | None  # what reused tensors are corrected by while it trains

    def record_target(self, index: int, keys: tuple, occurrence: int, spec: LayerSpec, out: Any) -> None:
        """A teacher's output of a layer the student will reuse."""

    def observe_reuse(self, index: int, keys: tuple, occurrence: int, spec: LayerSpec, reused: Any) -> Any:
        """The student's reused output: its loss is kept; returns it detached."""

    def grad_context(self) -> contextlib.AbstractContextManager[None]:
        """Where reused outputs are rebuilt, so that the loss reaches the correction."""


@dataclass
class CacheStats:
    """What one run's cache did: Block Caching's own figures of the run (``RunStats.figures['cache']``)."""

    retimed: bool = False  # the plan was moved onto this run's steps
    peak_cache_bytes: int = 0  # the most memory the cached tensors held at once
    peak_history_bytes: int = 0  # of it, the most that forecast history (points beyond the newest) held
    stores: int = 0  # layer calls whose output was cached (a reuse could follow)
    offloaded: int = 0  # cached tensors copied to CPU memory


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


class BlockCacheHolder(RunHolder):
    """What one Apply installed: the block map, the plan, where the cache lives; read-only."""

    def __init__(self, block_map: BlockMap, plan: LayerPlan, name: str = "Block Cache",
                 cache_device: str = CACHE_ON_MODEL_DEVICE) -> None:
        if cache_device not in CACHE_DEVICES:
            raise ValueError(f"cache_device must be one of {', '.join(CACHE_DEVICES)}, got {cache_device!r}")
        super().__init__(block_map, name)
        self.plan = plan
        self.cache_device = cache_device
        # Scale-shift corrections of reused tensors (block_caching/scale_shift.py), per layer and
        # stream, in block-map order; None: reused tensors are used as cached.
        self.corrections: list[list[Any]] | None = None
        # Options of Apply that were asked for but do not apply here, each with why (the node shows them).
        self.declined: list[str] = []

    def start_layer_method(self, run: RunContext) -> LayerCache:
        return LayerCache(self, run)

    def finish_run(self, run: RunContext, completed: bool) -> None:
        if completed:
            log_run_summary(self, run.stats)


class LayerCache(LayerMethod):
    """One run's cache: the plan on the run's steps, each evaluation's decisions, the cached tensors."""

    name = "cache"

    def __init__(self, holder: BlockCacheHolder, run: RunContext) -> None:
        self.holder = holder
        self.stats = CacheStats()
        self.plan = holder.plan  # on the run's steps: the schedule's own plan on its own grid, else re-timed
        self.cache_on_cpu = holder.cache_device == CACHE_ON_CPU
        self.trainer: ReuseTrainer | None = None  # set by an extension that trains the correction on this run
        self.schedule_step: int | None = None  # the step of the schedule's grid (scale-shift rows)
        self.store_now: np.ndarray | None = None
        # A sampler that may evaluate one step twice (Heun) keeps every computation a reuse could read.
        self.repeats_steps = run.sampler_name not in ONE_EVALUATION_PER_STEP
        self.cache: dict[tuple[int, Any, int], _CacheEntry] = {}
        self.cache_bytes = 0
        self.history_bytes = 0  # of cache_bytes, what older forecast points hold
        grid = holder.plan.grid
        step_taus = list(run.run_grid.taus)
        sampler_name = run.sampler_name
        other_sampler = bool(grid.sampler and sampler_name and sampler_key(grid.sampler) != sampler_key(sampler_name))
        if other_sampler or not grid.same_as(step_taus):
            self.stats.retimed = True
            if step_taus and not grid.same_as(step_taus):
                self.plan = holder.plan.on_run_grid(run.model_sampling, run.run_grid)
            logger.info(
                "%s: schedule made for %d steps of %s/%s re-timed onto this run's %d steps of %s by "
                "normalized time, keeping its density of computations.", holder.name, grid.steps,
                grid.sampler or "?", grid.scheduler or "?", len(step_taus), sampler_name or "?")

    @property
    def corrections(self) -> list[list[Any]] | None:
        trainer = self.trainer
        return trainer.corrections if trainer is not None else self.holder.corrections

    def decisions(self, run: RunContext, previous_step: int | None, step: int) -> np.ndarray:
        return self.plan.decisions(previous_step, step)  # the plan is on the run's steps

    def begin_evaluation(self, run: RunContext, x: torch.Tensor, sigma: torch.Tensor) -> None:
        step = run.run_step
        if step == run.previous_run_step:
            self.repeats_steps = True
        self.store_now = self.plan.reuses_ever if self.repeats_steps else self.plan.stores[:, step]
        retimed = self.plan is not self.holder.plan
        self.schedule_step = self.holder.plan.grid.step_of(run.evaluation_tau) if retimed else step

    def reset(self, run: RunContext) -> None:
        self.cache.clear()
        self.cache_bytes = self.history_bytes = 0

    def close(self, run: RunContext) -> None:
        self.cache.clear()
        self.cache_bytes = self.history_bytes = 0

    def figures(self) -> CacheStats:
        return self.stats

    def call_layer(self, run: RunContext, layer: LayerForward, call: ModelCall, occurrence: int,
                   module: torch.nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        index = layer.layer_index
        keys = call.chunk_keys
        trainer = self.trainer
        computes = run.computes
        if trainer is not None and trainer.teacher_pass:
            # The uncached teacher: everything computes; the outputs the student will reuse are targets.
            out = forward(*args, **kwargs)
            if not computes[index]:
                trainer.record_target(index, tuple(keys), occurrence, layer.spec, out)
            return out
        if not computes[index]:
            if trainer is None:
                reused = self._reuse(run, layer, module, args, kwargs, keys, occurrence)
            else:
                with trainer.grad_context():
                    reused = self._reuse(run, layer, module, args, kwargs, keys, occurrence)
                if reused is not None:
                    reused = trainer.observe_reuse(index, tuple(keys), occurrence, layer.spec, reused)
            if reused is not None:
                with run.lock:
                    run.stats.reused[index] += 1
                return reused
        keep = bool(self.store_now[index])
        if not keep and self.cache:
            with run.lock:
                for key in keys:  # what the cache holds for this call is older than this computation
                    self._drop(self.cache.pop((index, key, occurrence), None))
        inputs = stream_inputs(layer.spec, args, kwargs, copy=layer.spec.mutates_inputs) if keep else None
        out = forward(*args, **kwargs)
        with run.lock:
            run.stats.computed[index] += 1
        if inputs is not None:
            residual_wanted = self.plan.reuse[index] is ReuseMode.RESIDUAL
            branches = residual_branches(layer.spec, module, inputs, out, residual_wanted, len(keys))
            if branches is not None:
                self._store(run, index, occurrence, inputs, branches, keys)
        return out

    def _reuse(self, run: RunContext, patch: LayerForward, module: torch.nn.Module, args: tuple, kwargs: dict,
               keys: list[Any], occurrence: int) -> Any:
        """The layer's output rebuilt from the cache, or None when a chunk has nothing usable."""
        inputs = stream_inputs(patch.spec, args, kwargs, copy=False)
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
            cached = _predicted(entries, stream_index, run.evaluation_tau, reference,
                                self.plan.dampings[patch.layer_index])
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

    def _store(self, run: RunContext, index: int, occurrence: int, inputs: list[Any],
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
                    with run.lock:
                        self.stats.offloaded += 1
                elif chunks > 1:
                    part = part.clone()  # a slice would pin the whole batch
                tensors.append(part)
            if extends:
                points, taus = push_point(replaced.points, replaced.taus, tensors, run.evaluation_tau, order)
            else:
                points, taus = [tensors], [run.evaluation_tau]
            entry = _CacheEntry(points, taus, residual, shapes)
            with run.lock:
                self._drop(replaced)
                self.cache_bytes += entry.nbytes
                self.history_bytes += entry.history_bytes
                self.cache[(index, key, occurrence)] = entry
        with run.lock:
            self.stats.stores += 1
            self.stats.peak_history_bytes = max(self.stats.peak_history_bytes, self.history_bytes)
            self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.cache_bytes)



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
               reference: torch.Tensor | None, damping: float) -> torch.Tensor:
    """One stream's stand-in for all chunks of a call: each chunk's cached value, or its forecast
    at ``tau`` from the points kept (``damping``: forecast.forecast_weights), on the device and in the
    dtype of ``reference``."""
    parts = []
    for entry in entries:
        tensors = [point[stream_index] for point in entry.points]
        if reference is not None and (tensors[0].device != reference.device or tensors[0].dtype != reference.dtype):
            tensors = [t.to(device=reference.device, dtype=reference.dtype, non_blocking=True) for t in tensors]
        if len(tensors) == 1:
            parts.append(tensors[0])  # order 0: reused exactly as cached
        else:
            parts.append(combine(tensors, forecast_weights(entry.taus, tau, damping)))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def sampler_key(name: str) -> str:
    """Comparable sampler names: KSampler's 'ddim' runs sample_euler; 'uni_pc' runs sample_unipc."""
    key = name.replace("_", "")
    return "euler" if key == "ddim" else key


def cache_stats(stats: RunStats) -> CacheStats:
    """The cache's figures of a finished run of a Block Cache holder."""
    return stats.figures[LayerCache.name]


def log_run_summary(holder: BlockCacheHolder, stats: RunStats) -> None:
    total = stats.total
    skipped = int(stats.reused.sum())
    estimate = run_speedup_estimate(holder, stats)
    cache = cache_stats(stats)
    orders = sorted({order for order, reused in zip(holder.plan.orders, holder.plan.reuses_ever, strict=True)
                     if reused})
    forecast = ""
    if any(orders):
        dampings = sorted({d for d, order, reused in zip(holder.plan.dampings, holder.plan.orders,
                                                         holder.plan.reuses_ever, strict=True)
                           if reused and order and d != 1.0})
        damped = f", damped to {'/'.join(f'{d:g}' for d in dampings)}" if dampings else ""
        forecast = (f", of which forecast history (order {'/'.join(str(o) for o in orders)}{damped}) "
                    f"{cache.peak_history_bytes / 2**20:.1f} MB")
    logger.info(
        "%s: computed %d/%d layer evaluations, skipped %d (%.0f%%) over %d steps / %d model evaluations%s%s; "
        "estimated speed-up %.2fx (FLOP-weighted); the cache held at most %.1f MB (%s)%s; %d computations "
        "were stored for a reuse.",
        holder.name, int(stats.computed.sum()), total, skipped, 100.0 * skipped / max(1, total), stats.steps,
        stats.evaluations, f" ({stats.unevaluated} interpolated, not run)" if stats.unevaluated else "",
        ", schedule re-timed" if cache.retimed else "", estimate,
        cache.peak_cache_bytes / 2**20, holder.cache_device, forecast, cache.stores)
