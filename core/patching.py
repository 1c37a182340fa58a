"""Installing the runtime on a ComfyUI ModelPatcher: object patches and keyed wrappers only.

Both functions return a *clone*; the model passed in is never changed. Everything is
checked before the clone is touched, so a bad schedule leaves nothing half-patched.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from comfy.patcher_extension import WrappersMP

from .block_map import BlockMap, block_map_for_patcher
from .errors import ScheduleMismatchError
from .noise_injection import NoiseInjection
from .profile import BlockProfile
from .runtime import (
    CACHE_ON_MODEL_DEVICE,
    WRAPPER_KEY,
    BlockCacheHolder,
    CachedLayerForward,
    LayerPlan,
    apply_model_wrapper,
    bind,
    outer_sample_wrapper,
    predict_noise_wrapper,
)
from .schedule import CacheSchedule

logger = logging.getLogger(__name__)

_WRAPPERS = (
    (WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
    (WrappersMP.PREDICT_NOISE, predict_noise_wrapper),
    (WrappersMP.APPLY_MODEL, apply_model_wrapper),
)


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


def _install(model: Any, block_map: BlockMap, holder: BlockCacheHolder) -> Any:
    patched = model.clone()
    # A second Apply on an already patched model replaces the first instead of stacking on it.
    for wrapper_type, _ in _WRAPPERS:
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    diffusion_model = patched.get_model_object("diffusion_model")
    for index, spec in enumerate(block_map.layers):
        original = patched.get_model_object(spec.patch_key)
        while isinstance(original, CachedLayerForward):
            original = original.original
        module = diffusion_model.get_submodule(spec.name)
        patched.add_object_patch(spec.patch_key,
                                 CachedLayerForward(holder, index, spec, module, original, diffusion_model))
    for wrapper_type, wrapper in _WRAPPERS:
        patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, bind(wrapper, holder))
    return patched


def apply_block_cache(model: Any, schedule: CacheSchedule, cache_device: str = CACHE_ON_MODEL_DEVICE,
                      noise_injection: NoiseInjection | None = None) -> tuple[Any, BlockCacheHolder]:
    """A clone of ``model`` that samples with ``schedule``, and the holder of its run state.

    ``noise_injection`` (Faster Diffusion's prior noise injection) runs in the cache's own evaluation
    wrapper when enabled; with alpha 0 nothing is installed for it.
    """
    if noise_injection is not None:
        noise_injection.validate()
    model_map = block_map_for_patcher(model)
    block_map = _scheduled_block_map(schedule, model_map)  # in schedule order
    if schedule.scale_shift is not None:
        schedule.scale_shift.check_matches(schedule.fingerprint, model_map.fingerprint)
    holder = BlockCacheHolder(block_map, plan=LayerPlan.from_schedule(schedule), cache_device=cache_device)
    if schedule.scale_shift is not None:
        holder.corrections = schedule.scale_shift.bind(block_map)
    if noise_injection is not None and noise_injection.enabled:
        holder.noise_injection = noise_injection
    return _install(model, block_map, holder), holder


def attach_profiler(model: Any) -> tuple[Any, BlockCacheHolder]:
    """A clone of ``model`` that computes every layer and records their change per step."""
    block_map = block_map_for_patcher(model)
    holder = BlockCacheHolder(block_map, profiling=True, name="Block Cache profiler")
    return _install(model, block_map, holder), holder


def collect_profile(holder: BlockCacheHolder, model: Any, *, sampler: str | None = None,
                    scheduler: str = "", cfg: float | None = None, denoise: float | None = None,
                    latent_shape: tuple[int, ...] | None = None, **extra: Any) -> BlockProfile:
    """The profile a profiling holder recorded in its last sampling run.

    What the caller does not say (a sampler node of any kind ran the run) is taken from the run:
    its sampler, the guider's CFG, the latent's shape; ``denoise`` is then the normalized time the
    run started at (1: from pure noise; a later KSamplerAdvanced segment starts lower).
    """
    from .schema import provenance
    from .time_grid import StepGrid, normalized_times

    stats = holder.last_run
    recorder = holder.last_recording
    if recorder is None or stats is None or stats.sample_sigmas is None:
        raise RuntimeError("no profiling run was recorded; the sampler did not run the profiled model")
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
