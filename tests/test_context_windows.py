"""Block Cache under ComfyUI's context windows (comfy/context_windows.py, on both tested hosts).

A long video is sampled as one model call per window of frames, at every step; windows overlap,
and the uniform schedules move them from step to step. The cache must keep each window's layers
apart: a reused layer stands in with what the same frames computed, never another window's.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.schedule import all_compute_schedule
from dit_zoo import ZOO
from helpers import count_layer_computations, profile_by_sampling, sample

context_windows = pytest.importorskip("comfy.context_windows", reason="this ComfyUI has no context windows")

WAN = next(entry for entry in ZOO if entry.id == "wan21-t2v")
FRAMES = 10  # latent frames: windows of 4 with an overlap of 2
STEPS = 6


def _latent() -> dict:
    shape = list(WAN.latent_shape)
    shape[2] = FRAMES
    return {"samples": torch.zeros(shape)}


def _with_windows(model, schedule: str):
    import comfy_extras.nodes_context_windows as nodes_context_windows

    node = nodes_context_windows.ContextWindowsManualNode
    settings = {"context_length": 4, "context_overlap": 2, "context_schedule": schedule, "context_stride": 1,
                "closed_loop": False, "fuse_method": "pyramid", "dim": 2,
                # newer hosts only: FreeNoise off, no causal anchor frame
                "freenoise": False, "causal_window_fix": False}
    accepted = inspect.signature(node.execute).parameters
    return node.execute(model, **{key: value for key, value in settings.items() if key in accepted}).result[0]


class WindowResidualMemo:
    """Order-0 Block Caching written out for the test, as the oracle: per (block, window frames,
    cond uuid) the residual of a computation that the next step reuses (the only ones worth
    keeping; any other computation drops what those frames held); at a step the schedule reuses,
    a block adds it to its input, or computes where those frames hold nothing."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask
        self.residuals: dict[tuple, torch.Tensor] = {}
        self.computed = np.zeros(mask.shape[0], dtype=np.int64)

    def patch(self, model, names: list[str]):
        patched = model.clone()
        diffusion_model = patched.get_model_object("diffusion_model")
        for index, name in enumerate(names):
            forward = diffusion_model.get_submodule(name).forward
            patched.add_object_patch(f"diffusion_model.{name}.forward",
                                     lambda *a, _i=index, _f=forward, **k: self.call(_i, _f, a, k))
        return patched

    def call(self, index: int, forward, args: tuple, kwargs: dict) -> torch.Tensor:
        options = kwargs["transformer_options"]
        sample_sigmas = options["sample_sigmas"].tolist()
        step = sample_sigmas.index(float(options["sigmas"][0]))
        window = options.get("context_window")
        frames = tuple(window.index_list) if window is not None else ()
        keys = [(index, frames, uuid) for uuid in options["uuids"]]
        x = args[0]
        if not self.mask[index, step] and all(key in self.residuals for key in keys):
            return x + torch.cat([self.residuals[key] for key in keys])
        before = x.clone()
        out = forward(*args, **kwargs)
        self.computed[index] += 1
        next_step_reuses = step + 1 < self.mask.shape[1] and not self.mask[index, step + 1]
        for key, residual in zip(keys, (out - before).chunk(len(keys)), strict=True):
            if self.mask[index, step] and next_step_reuses:
                self.residuals[key] = residual.clone()
            else:
                self.residuals.pop(key, None)
        return out


@pytest.fixture(scope="module")
def profiled(pack):
    model = WAN.build(seed=0)
    conds = WAN.conds()
    profile, _ = profile_by_sampling(pack, model, conds, _latent(), steps=STEPS, cfg=WAN.cfg)
    return model, conds, profile


def _order0_alternating(pack, profile):
    """Every block reuses at every other step (the first computed), reusing the residual as cached."""
    all_compute = all_compute_schedule(profile.block_map, profile.grid)
    layers = tuple(dataclasses.replace(layer, forecast_order=0,
                                       compute=tuple(step == 0 or (step + index) % 2 == 0
                                                     for step in range(profile.grid.steps)))
                   for index, layer in enumerate(all_compute.layers))
    return dataclasses.replace(all_compute, layers=layers)


@pytest.mark.parametrize("schedule", ["standard_static", "standard_uniform"])
def test_all_compute_is_bit_identical_under_context_windows(pack, profiled, schedule):
    model, conds, profile = profiled
    reference = sample(_with_windows(model, schedule), *conds, _latent(), steps=STEPS, cfg=WAN.cfg)
    all_compute = all_compute_schedule(profile.block_map, profile.grid)
    windows_then_cache, holder = apply_block_cache(_with_windows(model, schedule),
                                                                               all_compute)
    assert torch.equal(sample(windows_then_cache, *conds, _latent(), steps=STEPS, cfg=WAN.cfg), reference)
    assert holder.last_run.reused.sum() == 0 and holder.last_run.computed.sum() > 0
    cache_then_windows = _with_windows(apply_block_cache(model, all_compute)[0], schedule)
    assert torch.equal(sample(cache_then_windows, *conds, _latent(), steps=STEPS, cfg=WAN.cfg), reference)


@pytest.mark.parametrize("schedule", ["standard_static", "standard_uniform"])
def test_each_window_reuses_only_its_own_frames(pack, profiled, schedule):
    """Bit-identical to the oracle that keys every residual by its window's frames, computations
    counted equal; with moving windows, frames first seen at a reuse step compute."""
    model, conds, profile = profiled
    caching = _order0_alternating(pack, profile)
    names = [layer.name for layer in caching.layers]
    oracle = WindowResidualMemo(caching.compute_mask())
    expected = sample(_with_windows(oracle.patch(model, names), schedule), *conds, _latent(), steps=STEPS,
                      cfg=WAN.cfg)

    patched, holder = apply_block_cache(_with_windows(model, schedule), caching)
    with count_layer_computations(model.model.diffusion_model, names) as counts:
        out = sample(patched, *conds, _latent(), steps=STEPS, cfg=WAN.cfg)
    assert torch.equal(out, expected)
    counted = np.array([counts[name] for name in names])
    np.testing.assert_array_equal(counted, oracle.computed)
    np.testing.assert_array_equal(holder.last_run.computed, counted)
    assert holder.last_run.reused.sum() > 0
    if schedule == "standard_static":
        # The same windows every step: one call per window, and every scheduled reuse happens.
        windows = len(context_windows.get_matching_context_schedule(schedule).func(FRAMES, _handler(), {}))
        assert windows > 1
        np.testing.assert_array_equal(holder.last_run.computed + holder.last_run.reused,
                                      np.full(len(names), STEPS * windows))
        np.testing.assert_array_equal(counted, caching.compute_mask().sum(axis=1) * windows)


def _handler():
    """A handler with the windows' length and overlap, for calling the window schedules directly."""
    return context_windows.IndexListContextHandler(
        context_schedule=context_windows.get_matching_context_schedule("standard_static"),
        fuse_method=context_windows.get_matching_fuse_method("pyramid"), context_length=4, context_overlap=2, dim=2)


def test_a_cache_keyed_by_call_order_would_mix_moving_windows(profiled):
    """Why windows are keyed by their frames: the uniform schedule moves the windows between steps,
    so the n-th model call of one step and the n-th of the next cover other frames."""
    handler = _handler()
    uniform = context_windows.get_matching_context_schedule("standard_uniform")
    by_step = []
    for step in range(2):
        handler._step = step
        by_step.append(uniform.func(FRAMES, handler, {}))
    assert by_step[0] != by_step[1]
