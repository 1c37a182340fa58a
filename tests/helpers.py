"""Test helpers: sampling through ComfyUI's KSampler path, and counting real layer computations."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import comfy.model_management
import comfy.patcher_extension
import nodes as comfy_nodes
import torch


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
    core = pack.core
    profiling, holder = core.patching.attach_profiler(model)
    out = sample(profiling, *conds, latent, steps=steps, cfg=cfg, sampler=sampler)
    profile = core.patching.collect_profile(holder, model, sampler=sampler, scheduler="normal", cfg=cfg, denoise=1.0,
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
