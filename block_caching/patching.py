"""Block Caching on a ComfyUI ModelPatcher: apply a schedule, attach the profiler, collect a profile.

Both installers return a *clone* (runtime/wrappers.py: object patches and keyed wrappers only);
the model passed in is never changed. Everything is checked before the clone is touched, so a bad
schedule leaves nothing half-patched.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from ..block_maps.block_map import BlockMap
from ..block_maps.mapping import block_map_for_patcher
from ..errors import ScheduleMismatchError, UnsupportedModelError
from ..provenance import provenance
from ..runtime.run import RunExtension
from ..runtime.time_grid import StepGrid, normalized_times
from ..runtime.wrappers import install_runtime
from .cache import CACHE_ON_MODEL_DEVICE, BlockCacheHolder
from .lookahead import StepLookahead
from .plan import LayerPlan
from .profile import BlockProfile
from .profiler import ProfilerHolder
from .schedule import CacheSchedule

logger = logging.getLogger(__name__)


def _scheduled_block_map(schedule: CacheSchedule, model_map: BlockMap) -> BlockMap:
    """The model's layers that the schedule names, in schedule order; raises on any misfit."""
    by_name = {spec.name: spec for spec in model_map.layers}
    missing = [layer.name for layer in schedule.layers if layer.name not in by_name]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ScheduleMismatchError(
            f"This schedule was made for a {schedule.block_map.model_type} {schedule.block_map.model_class} and names "
            f"{len(missing)} layers this {model_map.model_type} {model_map.model_class} does not have ({shown}). "
            "Profile this model and build a schedule for it, or load a schedule made for it."
        )
    specs = []
    for layer in schedule.layers:
        spec = by_name[layer.name]
        if layer.kind is not spec.kind:
            raise ScheduleMismatchError(
                f"Layer {layer.name} is a {layer.kind.value} in the schedule but a {spec.kind.value} in this model. "
                "The schedule was made for another model: profile this one."
            )
        if layer.reuse not in spec.reuse_modes:
            raise ScheduleMismatchError(
                f"Layer {layer.name} ({spec.kind.value}) cannot be reused in '{layer.reuse.value}' mode; "
                f"it allows {', '.join(m.value for m in spec.reuse_modes)}. Rebuild the schedule."
            )
        specs.append(spec)
    unscheduled = len(model_map.layers) - len(specs)
    if unscheduled:
        logger.info("Block Cache: %d layers of the model are not in the schedule and always run.", unscheduled)
    if schedule.block_map.fingerprint != model_map.fingerprint:
        logger.warning(
            "Block Cache: the schedule was profiled on a %s with another structure (fingerprint %s, this model %s); "
            "layer names match, so it is applied, but a profile of this model will fit better.",
            schedule.block_map.model_type, schedule.block_map.fingerprint, model_map.fingerprint)
    return dataclasses.replace(model_map, layers=tuple(specs))


class MethodOption(Protocol):
    """A method's option of Apply (noise injection, parallel decoding, a calibration's training): what
    it installs on the holder, if anything, as a run extension."""

    def bind(self, holder: BlockCacheHolder, schedule: CacheSchedule) -> RunExtension | None:
        """The extension for this holder and schedule; None when off or when it does not apply (logged)."""
        ...


def apply_block_cache(model: Any, schedule: CacheSchedule, cache_device: str = CACHE_ON_MODEL_DEVICE,
                      options: Sequence[MethodOption] = ()) -> tuple[Any, BlockCacheHolder]:
    """A clone of ``model`` that samples with ``schedule``, and the holder of its configuration.

    A schedule with lookahead steps runs with its ``StepLookahead`` first. ``options`` act in every run besides
    the cache, in this order (runtime/run.py): Faster
    Diffusion's prior noise injection and parallel decoding, a calibration's training.
    """
    if schedule.lookahead_steps and not schedule.compute_mask().all():
        raise ScheduleMismatchError("A lookahead schedule computes every layer wherever the model runs; this one also "
                                    "reuses layers, which is not supported. Rebuild it with Build Cache Schedule.")
    model_map = block_map_for_patcher(model)
    block_map = _scheduled_block_map(schedule, model_map)  # in schedule order
    if schedule.scale_shift is not None:
        schedule.scale_shift.check_matches(schedule.fingerprint, model_map.fingerprint)
    holder = BlockCacheHolder(block_map, LayerPlan.from_schedule(schedule), cache_device=cache_device)
    if schedule.scale_shift is not None:
        holder.corrections = schedule.scale_shift.bind(block_map)
    if schedule.lookahead_steps:
        holder.extensions.append(StepLookahead(schedule.lookahead_steps, schedule.grid))
    for option in options:
        extension = option.bind(holder, schedule)
        if extension is not None:
            holder.extensions.append(extension)
    return install_runtime(model, block_map, holder), holder


def attach_profiler(model: Any) -> tuple[Any, ProfilerHolder]:
    """A clone of ``model`` that computes every layer and records their change per step."""
    block_map = block_map_for_patcher(model)
    holder = ProfilerHolder(block_map)
    return install_runtime(model, block_map, holder), holder


def collect_profile(holder: ProfilerHolder, model: Any, *, sampler: str | None = None,
                    scheduler: str = "", cfg: float | None = None, denoise: float | None = None,
                    latent_shape: tuple[int, ...] | None = None, **extra: Any) -> BlockProfile:
    """The profile a profiling holder recorded in its last sampling run.

    What the caller does not say (a sampler node of any kind ran the run) is taken from the run:
    its sampler, the guider's CFG, the latent's shape; ``denoise`` is then the normalized time the
    run started at (1: from pure noise; a later KSamplerAdvanced segment starts lower).
    """
    stats = holder.last_run
    recorder = holder.last_recording
    if recorder is None or stats is None or stats.sample_sigmas is None:
        raise RuntimeError("no profiling run was recorded; the sampler did not run the profiled model")
    if stats.evaluations and not stats.computed.any():
        raise UnsupportedModelError(
            f"the profiled run called none of the {len(stats.layer_names)} mapped layers of {holder.block_map.model_class} "
            "(a stage of the model whose blocks are not in its block map, such as TRELLIS.2's sparse shape and "
            "texture stages, or another node that replaces the blocks' forwards itself, such as a cache pack): "
            "there is nothing to profile or cache in this run.")
    model_sampling = model.get_model_object("model_sampling")
    sigmas = stats.sample_sigmas
    if denoise is None:
        denoise = round(normalized_times(model_sampling, sigmas[:1])[0], 4) if sigmas.numel() else 1.0
    grid = StepGrid.from_sigmas(
        model_sampling,
        sigmas,
        sampler=stats.sampler if sampler is None else sampler,
        scheduler=scheduler,
        cfg=float(stats.cfg if cfg is None and stats.cfg is not None else cfg if cfg is not None else 1.0),
        denoise=float(denoise),
        latent_shape=tuple(int(v) for v in (stats.latent_shape if latent_shape is None else latent_shape)),
    )
    return recorder.finish(grid, provenance(evaluations=stats.evaluations, **extra))
