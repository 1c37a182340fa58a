"""Forecast reuse: a reused layer's residual predicted from its last computations in normalized time.

The exactness test uses a real ComfyUI BaseModel (SD1.5 sampling) whose diffusion model is a list of
blocks with a residual branch that is exactly linear in the timestep: there an order-1 (or 2) forecast
must rebuild the uncached output from two computations, whatever the step spacing, sampler or step
count, and per cond chunk; order 0 (plain reuse) must not.
"""

from __future__ import annotations

import dataclasses
import logging

import comfy.samplers
import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching import forecast
from comfyui_block_cache.block_caching.forecast import push_point
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.schedule import all_compute_schedule
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from comfyui_block_cache.demo_models.builtin_models import SMALL_UNET_CONFIGS
from comfyui_block_cache.runtime.time_grid import StepGrid
from dit_zoo import TinyDit
from helpers import sample, split_cond_calls
from torch import nn

STEPS = 6


class LinearInTimeBlock(nn.Module):
    """x + (offset + slope * t / 1000) * gate(context): a residual branch linear in the timestep t."""

    def __init__(self, channels: int, context_dim: int) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.slope = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gate = nn.Linear(context_dim, channels)  # per cond: cond and uncond chunks differ
        self.out = nn.Identity()  # a second child: the generic block-list finder wants containers

    def forward(self, x: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        gate = self.gate(context.mean(1))[:, :, None, None]
        return self.out(x + (self.offset + self.slope * (timesteps / 1000.0)[:, None, None, None]) * gate)


class LinearInTimeModel(nn.Module):
    def __init__(self, channels: int = 4, context_dim: int = 32) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.blocks = nn.ModuleList(LinearInTimeBlock(channels, context_dim) for _ in range(3))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, context, timesteps)
        return x


def _make(model_config):
    model = model_config.get_model({}, "")
    model.diffusion_model = LinearInTimeModel()
    return model


@pytest.fixture(scope="module")
def linear(pack):
    entry = TinyDit("generic (LinearInTimeModel)", "linear-in-time", "SD15",
                    dict(SMALL_UNET_CONFIGS["tiny"]), (2, 4, 8, 8), (6, 32),
                    make_model=_make)
    model = entry.build(seed=3)
    return model, entry.conds(), entry.latent(batch=2)


def _schedule(pack, model, compute_steps, order, damping=1.0):
    """Every block computes at ``compute_steps`` of a 6-step euler/normal grid and is forecast with ``order``
    (its move damped to ``damping``)."""
    sampling = model.get_model_object("model_sampling")
    grid = StepGrid.from_sigmas(sampling, comfy.samplers.calculate_sigmas(sampling, "normal", STEPS),
                                               sampler="euler", scheduler="normal")
    block_map = block_map_for_patcher(model)
    base = all_compute_schedule(block_map, grid, (1.0,) * len(block_map.layers), 4.0)
    row = tuple(step in compute_steps for step in range(STEPS))
    layers = tuple(dataclasses.replace(layer, compute=row, forecast_order=order, forecast_damping=damping)
                   for layer in base.layers)
    return dataclasses.replace(base, layers=layers)


def test_lagrange_weights_reproduce_polynomials(pack):
    assert forecast.lagrange_weights([0.7], 0.3) == [1.0]
    taus = [0.55, 0.8, 0.95]  # newest first, unevenly spaced
    for degree in range(3):
        values = [t ** degree for t in taus]
        for tau in (0.4, 0.55, 0.1):
            weights = forecast.lagrange_weights(taus, tau)
            assert sum(w * v for w, v in zip(weights, values, strict=True)) == pytest.approx(tau ** degree, abs=1e-12)
    assert forecast.lagrange_weights([0.5, 0.6], 0.5) == [1.0, 0.0]  # at the newest point: that point


def test_damped_weights_move_part_of_the_way_from_the_newest_point(pack):
    taus, tau = [0.55, 0.8], 0.3
    plain = forecast.lagrange_weights(taus, tau)
    assert forecast.forecast_weights(taus, tau) == plain and forecast.forecast_weights(taus, tau, 1.0) == plain
    assert forecast.forecast_weights(taus, tau, 0.0) == [1.0, 0.0]
    values = [2.0, 5.0]  # newest first
    newest, full = values[0], sum(w * v for w, v in zip(plain, values, strict=True))
    half = sum(w * v for w, v in zip(forecast.forecast_weights(taus, tau, 0.5), values, strict=True))
    assert half == pytest.approx(newest + 0.5 * (full - newest), abs=1e-12)


def test_a_damped_forecast_runs_between_reuse_and_the_full_forecast(pack, linear):
    """In the runtime, damping 1 is the order-1 forecast and damping 0 plain reuse, bit for bit; half of it
    lies between them. The damping is part of the schedule's fingerprint."""
    model, conds, latent = linear
    reference = sample(model, *conds, latent, steps=STEPS, cfg=4.0)
    outputs = {}
    for order, damping in ((0, 1.0), (1, 1.0), (1, 0.0), (1, 0.5)):
        patched, holder = apply_block_cache(model, _schedule(pack, model, (0, 1, 2, 4), order, damping))
        outputs[order, damping] = sample(patched, *conds, latent, steps=STEPS, cfg=4.0)
        assert holder.last_run.reused.sum() > 0
    assert torch.equal(outputs[1, 0.0], outputs[0, 1.0])
    errors = {key: float((out - reference).abs().max()) for key, out in outputs.items()}
    assert errors[1, 1.0] < 1e-5 * float(reference.abs().max()) < errors[1, 0.5] < errors[0, 1.0], errors
    fingerprints = {_schedule(pack, model, (0, 1, 2, 4), 1, d).fingerprint for d in (1.0, 0.5)}
    assert len(fingerprints) == 2


def test_history_keeps_order_plus_one_points_with_distinct_times(pack):
    push = push_point
    a, b, c, d = ([torch.full((1, 2), float(v))] for v in range(4))
    points, taus = push([], [], a, 0.9, order=1)
    points, taus = push(points, taus, b, 0.7, order=1)
    points, taus = push(points, taus, c, 0.5, order=1)
    assert taus == [0.5, 0.7] and points[0] is c and points[1] is b
    points, taus = push(points, taus, d, 0.5, order=1)  # same time (Heun's corrector): replaces the newest
    assert taus == [0.5, 0.7] and points[0] is d
    points, taus = push(points, taus, a, 0.8, order=1)  # time ran backwards (a restart): start afresh
    assert taus == [0.8] and len(points) == 1
    assert push(points, taus, b, 0.3, order=0)[1] == [0.3]
    wider = [torch.zeros(1, 3)]
    assert push([a], [0.9], wider, 0.7, order=2)[1] == [0.7]  # another shape: start afresh


@pytest.mark.parametrize("sampler,steps,split", [("euler", STEPS, False), ("heun", STEPS, False),
                                                 ("euler", 9, False), ("dpmpp_2m", STEPS, True)])
def test_forecast_is_exact_on_a_residual_linear_in_time(pack, linear, sampler, steps, split):
    """Orders 1 and 2 rebuild the uncached output from two computations (also re-timed, on Heun's second
    evaluation, and per cond chunk with CFG split over calls); order 0 does not."""
    model, conds, latent = linear
    reference = sample(model, *conds, latent, steps=steps, sampler=sampler, cfg=4.0)
    scale = float(reference.abs().max())
    errors = {}
    for order in (0, 1, 2):
        patched, holder = apply_block_cache(model, _schedule(pack, model, (0, 1, 2, 4), order))
        if split:
            split_cond_calls(patched)
        out = sample(patched, *conds, latent, steps=steps, sampler=sampler, cfg=4.0)
        assert holder.last_run.reused.sum() > 0
        errors[order] = float((out - reference).abs().max()) / scale
    assert errors[1] < 1e-5 and errors[2] < 1e-5, errors
    assert errors[0] > 1e-3, errors


def test_order_0_and_forecast_at_the_newest_point_are_plain_reuse(pack, tiny_model, conds, latent):
    """Order 0 is today's reuse; an order-1 forecast asked for at the time of its newest point returns that
    point bit for bit (Heun's corrector evaluation at a computed step)."""
    newest, older = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(forecast.combine([newest, older], forecast.lagrange_weights([0.5, 0.7], 0.5)), newest)
    sampling = tiny_model.get_model_object("model_sampling")
    grid = StepGrid.from_sigmas(sampling, comfy.samplers.calculate_sigmas(sampling, "normal", 8))
    block_map = block_map_for_patcher(tiny_model)
    schedule = all_compute_schedule(block_map, grid)
    rows = tuple(dataclasses.replace(layer, compute=tuple(s % 2 == 0 for s in range(8))) for layer in schedule.layers)
    outputs = []
    for order in (0, 1):
        layers = tuple(dataclasses.replace(layer, forecast_order=order) for layer in rows)
        patched, holder = apply_block_cache(tiny_model, dataclasses.replace(schedule, layers=layers))
        outputs.append(sample(patched, *conds, latent, sampler="heun", steps=8))
        assert holder.last_run.reused.sum() > 0
    assert not torch.equal(outputs[0], outputs[1])  # order 1 does forecast between computations


def test_history_memory_is_measured_and_logged(pack, linear, caplog):
    """Order k keeps k older points per reused layer and chunk: measured in the run stats and in the log."""
    model, conds, latent = linear
    peaks = {}
    for order in (0, 1, 2):
        patched, holder = apply_block_cache(model, _schedule(pack, model, (0, 1, 2, 4), order))
        with caplog.at_level(logging.INFO):
            caplog.clear()
            sample(patched, *conds, latent, steps=STEPS, cfg=4.0)
        stats = holder.last_run
        peaks[order] = (stats.figures["cache"].peak_cache_bytes, stats.figures["cache"].peak_history_bytes)
        if order:
            assert f"forecast history (order {order})" in caplog.text
        else:
            assert "forecast history" not in caplog.text
    # One cached residual per block and chunk: 3 blocks x 2 chunks (cond, uncond) x batch 2 x 4 x 8 x 8 floats.
    one_point = 3 * 2 * 2 * 4 * 8 * 8 * 4
    assert peaks[0] == (one_point, 0)
    assert peaks[1] == (2 * one_point, one_point)
    assert peaks[2] == (3 * one_point, 2 * one_point)


def test_forecast_on_both_streams_of_a_flux_double_block(pack):
    """Flux double blocks return (img, txt): each stream keeps its own history and is forecast."""
    from dit_zoo import ZOO

    entry = next(e for e in ZOO if e.id == "flux-dev")
    model = entry.build(seed=0)
    conds, latent = entry.conds(), entry.latent()
    reference = sample(model, *conds, latent, steps=STEPS, cfg=entry.cfg)
    sampling = model.get_model_object("model_sampling")
    grid = StepGrid.from_sigmas(sampling, comfy.samplers.calculate_sigmas(sampling, "simple", STEPS))
    block_map = block_map_for_patcher(model)
    base = all_compute_schedule(block_map, grid)
    row = tuple(step in (0, 1, 3) for step in range(STEPS))
    outputs = {}
    for order in (0, 1):
        layers = tuple(dataclasses.replace(layer, compute=row, forecast_order=order) for layer in base.layers)
        patched, holder = apply_block_cache(model, dataclasses.replace(base, layers=layers))
        outputs[order] = sample(patched, *conds, latent, steps=STEPS, cfg=entry.cfg, scheduler="simple")
        assert holder.last_run.reused.sum() > 0
    double = [i for i, spec in enumerate(block_map.layers) if len(spec.streams) == 2]
    assert double, "flux-dev has double-stream blocks"
    assert torch.isfinite(outputs[1]).all() and not torch.equal(outputs[0], outputs[1])
    errors = {order: float((out - reference).abs().mean()) for order, out in outputs.items()}
    assert np.isfinite(list(errors.values())).all()
