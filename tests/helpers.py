"""Test helpers: sampling through ComfyUI's KSampler path, and counting real layer computations."""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import comfy.model_management
import comfy.patcher_extension
import nodes as comfy_nodes
import numpy as np
import torch
from comfyui_block_cache.block_caching.patching import attach_profiler, collect_profile
from comfyui_block_cache.block_caching.schedule import BuildOptions, all_compute_schedule, build_schedule
from comfyui_block_cache.block_maps import dit_families as families
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from comfyui_block_cache.errors import UnsupportedModelError


def sample(model: Any, positive: Any, negative: Any, latent: dict, *, seed: int = 7, steps: int = 8,
           cfg: float = 5.0, sampler: str = "euler", scheduler: str = "normal", denoise: float = 1.0,
           **advanced: Any) -> torch.Tensor:
    """KSampler's own implementation (nodes.common_ksampler)."""
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                         denoise=denoise, **advanced)
    return out["samples"]


def profile_by_sampling(pack: Any, model: Any, conds: tuple, latent: dict, *, steps: int = 8, cfg: float = 5.0,
                        sampler: str = "euler") -> tuple[Any, torch.Tensor]:
    """Profile Block Changes' own path: a profiled KSampler run. Returns (profile, its sampled output)."""
    profiling, holder = attach_profiler(model)
    out = sample(profiling, *conds, latent, steps=steps, cfg=cfg, sampler=sampler)
    profile = collect_profile(holder, model, sampler=sampler, scheduler="normal", cfg=cfg, denoise=1.0,
                                            latent_shape=tuple(latent["samples"].shape))
    return profile, out


def _probes(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """Submodules that run only when the layer really computes, in pre-order: the first is its first
    child with parameters (or a Sequential); its descendants follow, for blocks that never call that
    child's forward (SD3's JointBlock calls methods of its context_block and x_block instead)."""
    modules = [m for m in layer.modules() if m is not layer and (
        any(True for _ in m.parameters()) or isinstance(m, torch.nn.Sequential))]
    if not modules:
        raise AssertionError(f"no child module to count on {type(layer).__name__}")
    first = modules[0]
    return [m for m in modules if m is first or any(m is d for d in first.modules())]


class _FirstRan(dict):
    """Per layer: the calls of its first probe that ran at all (the first child, wherever it runs)."""

    def __getitem__(self, name: str) -> int:
        return next((calls for calls in super().__getitem__(name) if calls), 0)


@contextmanager
def count_layer_computations(diffusion_model: torch.nn.Module, names: list[str]) -> Iterator[dict[str, int]]:
    """Counts, per layer, how often its own submodules ran: real computations, not cache hits."""
    counts = _FirstRan({name: [] for name in names})
    handles = []
    for name in names:
        for index, probe in enumerate(_probes(diffusion_model.get_submodule(name))):
            dict.__getitem__(counts, name).append(0)

            def hook(_module, _args, name=name, index=index):
                dict.__getitem__(counts, name)[index] += 1

            handles.append(probe.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


class InterruptAt:
    """A wrapper that raises ComfyUI's interrupt at the given call, as the Cancel button does."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def __call__(self, executor, *args, **kwargs):
        self.seen += 1
        if self.seen == self.at:
            comfy.model_management.interrupt_current_processing(True)
            comfy.model_management.throw_exception_if_processing_interrupted()
        return executor(*args, **kwargs)


def live_tensor_bytes() -> int:
    """Bytes held by every live tensor, after a garbage collection."""
    gc.collect()
    total = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                total += obj.numel() * obj.element_size()
        except Exception:  # noqa: S112 - some objects refuse inspection; they are not tensors we made
            continue
    return total


def has_block_cache(model: Any) -> bool:
    """Whether a ModelPatcher carries the pack's wrappers or layer patches."""
    wrappers = any(model.get_wrappers(t, "block_cache") for t in (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE,
                                                                   comfy.patcher_extension.WrappersMP.PREDICT_NOISE,
                                                                   comfy.patcher_extension.WrappersMP.APPLY_MODEL))
    return wrappers or any("Block Cache" in repr(patch) for patch in model.object_patches.values())


def is_identity(table: Any) -> bool:
    """A scale-shift table that changes nothing (every scale and shift zero)."""
    return all(not e.scale.any() and not e.shift.any() for e in table.entries.values())


def runs_holding_tensors(holder: Any) -> list[Any]:
    """Run contexts of ``holder`` still alive with cached tensors or inside an evaluation: none may be
    left after a run, finished or interrupted."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o).__name__ == "RunContext" and getattr(o, "holder", None) is holder
            and (getattr(o.layer_method, "cache", None) or o.in_evaluation)]


def run_of(args: tuple, kwargs: dict) -> Any:
    """The Block Cache run context a PREDICT_NOISE wrapper's call carries (None outside a run)."""
    model_options = args[2] if len(args) > 2 else kwargs.get("model_options") or {}
    return model_options.get("transformer_options", {}).get("block_cache")


def record_evaluation_sigmas(model: Any) -> list[float]:
    """Adds a PREDICT_NOISE wrapper to ``model`` that records each solver evaluation's sigma."""
    sigmas: list[float] = []

    def wrapper(executor, *args, **kwargs):
        sigmas.append(float(args[1].reshape(-1)[0]))
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_recorder", wrapper)
    return sigmas


def split_cond_calls(model: Any) -> None:
    """Forces cond and uncond into separate model calls, as ComfyUI does when memory is short."""

    def wrapper(executor, model_, conds, x_in, timestep, model_options):
        outputs = []
        for cond in conds:
            outputs.extend(executor(model_, [cond], x_in, timestep, model_options))
        return outputs

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test_split", wrapper)


def expected_run_mask(schedule: Any, model: Any, run_sigmas: torch.Tensor) -> np.ndarray:
    """The schedule's mask on the run's own steps (the runtime's re-timing rule, read independently)."""
    from comfy_bootstrap import load_pack

    time_grid = load_pack().runtime.time_grid
    sampling = model.get_model_object("model_sampling")
    run_taus = time_grid.normalized_times(sampling, torch.as_tensor(run_sigmas).reshape(-1))
    if schedule.grid.same_as(run_taus[:-1]):
        return schedule.compute_mask()
    bounds = list(schedule.grid.taus) + time_grid.normalized_times(sampling, torch.tensor(schedule.grid.sigmas[-1:]))
    return density_retimed(schedule.compute_mask(), bounds, run_taus)


def density_retimed(mask: np.ndarray, bounds: list[float], run_bounds: list[float]) -> np.ndarray:
    """The re-timing rule: between two computations g schedule steps apart, the schedule computes a
    share 1/g of its steps; that density f(time) is constant on each schedule step (``bounds``: step
    starts and the end, falling; the first and last steps extended beyond the range). Each run step's
    share is the mean of f over its span, from the integral G of f; a run step computes when a whole
    number lies in [shares before it, shares up to and including it)."""
    density = np.zeros(mask.shape, dtype=float)
    for layer, row in enumerate(mask):
        on = list(np.nonzero(row)[0]) + [len(row)]
        for a, b in zip(on, on[1:], strict=False):
            density[layer, a:b] = 1.0 / (b - a)
    top, bottom = max(bounds[0], run_bounds[0]), min(bounds[-1], run_bounds[-1])
    points = [top, *bounds[1:-1], bottom]

    def integral(time: float) -> np.ndarray:
        """G(time): the integral of f from ``time`` up to the top, per layer."""
        total = np.zeros(mask.shape[0])
        for i in range(len(points) - 1):
            high, low = points[i], points[i + 1]
            if time < high:
                total += max(0.0, high - max(low, time)) * density[:, i]
        return total

    shares = []
    for j in range(len(run_bounds) - 1):
        high, low = run_bounds[j], run_bounds[j + 1]
        if high - low <= 1e-4:
            step = next((i for i in range(len(bounds) - 1) if high >= bounds[i + 1] - 1e-4), len(bounds) - 2)
            shares.append(density[:, step])
        else:
            shares.append((integral(low) - integral(high)) / (high - low))
    run_mask = np.zeros((mask.shape[0], len(shares)), dtype=bool)
    total = np.zeros(mask.shape[0])
    for j, share in enumerate(shares):
        # A whole number in [total, total + share): the summed density crosses it in this step.
        run_mask[:, j] = [math.ceil(start - 1e-9) < start + part - 1e-9
                          for start, part in zip(total, share, strict=True)]
        total = total + share
    return run_mask


def computations_on(mask: np.ndarray, step_times: list[float], eval_times: list[float]) -> np.ndarray:
    """Per layer, the computations over evaluations at ``eval_times`` of a run whose steps start at
    ``step_times``: a layer computes when ``mask`` has a compute point in the steps passed since the
    previous evaluation (or at the first one); a layer computed at every step is never cached."""
    starts = np.array(step_times)
    expected = np.zeros(mask.shape[0], dtype=int)
    previous = None
    for time in eval_times:
        step = int(np.nonzero(starts >= time - 1e-4)[0].max()) if (starts >= time - 1e-4).any() else 0
        if previous is None or step < previous:
            expected += 1
        elif step > previous:
            expected += mask[:, previous + 1:step + 1].any(axis=1)
        previous = step
    expected[mask.all(axis=1)] = len(eval_times)
    return expected


def expected_computations(schedule: Any, model: Any, eval_sigmas: list[float], run_sigmas: torch.Tensor) -> np.ndarray:
    """Per layer, the computations the runtime must make on this run (``expected_run_mask``)."""
    from comfy_bootstrap import load_pack

    time_grid = load_pack().runtime.time_grid
    sampling = model.get_model_object("model_sampling")
    mask = expected_run_mask(schedule, model, run_sigmas)
    steps = time_grid.normalized_times(sampling, torch.as_tensor(run_sigmas).reshape(-1)[:-1])
    return computations_on(mask, steps, time_grid.normalized_times(sampling, torch.tensor(eval_sigmas)))


def build_or_skip(entry: Any) -> Any:
    """A zoo entry's model; the test is skipped, with the reason, on a host too old for it."""
    import pytest

    missing = entry.missing_on_host()
    if missing:
        pytest.skip(missing)
    return entry.build(seed=0)


def assert_refused(pack: Any, model: Any, qualified_class: str) -> str:
    """Block Cache refuses ``model`` (whose diffusion model is ``qualified_class``): the block map and the
    profiler raise UnsupportedModelError naming the class and the refusal table's reason. Returns the reason."""
    import pytest

    diffusion_model = model.model.diffusion_model
    assert f"{type(diffusion_model).__module__}.{type(diffusion_model).__qualname__}" == qualified_class
    refusal = families.refusal_of(diffusion_model)
    assert refusal is not None and refusal == families.REFUSED_MODELS[qualified_class]
    with pytest.raises(UnsupportedModelError) as raised:
        block_map_for_patcher(model)
    assert refusal.reason in str(raised.value) and type(diffusion_model).__name__ in str(raised.value)
    with pytest.raises(UnsupportedModelError):
        attach_profiler(model)
    return refusal.reason


def profile_schedules(pack, model, conds, latent, steps=8, cfg=5.0):
    """(all-compute schedule, caching schedule) built from a real profile of ``model``."""
    profile, _ = profile_by_sampling(pack, model, conds, latent, steps=steps, cfg=cfg)
    caching = build_schedule(profile, BuildOptions(threshold=1.0, cache_kinds="all"))
    assert not caching.compute_mask().all()
    return all_compute_schedule(profile.block_map, profile.grid), caching


def _lora_patches(model, seed=3, scale=0.05):
    """LoRA-style weight differences on every attention projection, through ModelPatcher.add_patches."""
    generator = torch.Generator().manual_seed(seed)
    patches = {}
    for key, weight in model.model.state_dict().items():
        if key.endswith(("to_q.weight", "to_k.weight", "to_v.weight")):
            patches[key] = (torch.randn(weight.shape, generator=generator) * scale,)
    assert patches
    return patches


def with_lora(model):
    lora = model.clone()
    lora.add_patches(_lora_patches(model), 1.0)
    return lora


def patched_layers(module: torch.nn.Module) -> list[str]:
    """Submodules whose ``forward`` is one of our layer patches. (ComfyUI's unpatch_model restores an
    object patch by setting the backed-up bound method back, so an instance ``forward`` alone means
    nothing.)"""
    from comfy_bootstrap import load_pack

    patch_type = load_pack().runtime.run.LayerForward
    return [name for name, m in module.named_modules() if isinstance(m.__dict__.get("forward"), patch_type)]
