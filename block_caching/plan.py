"""A schedule as the runtime reads it: per layer and step, compute or reuse, moved onto a run's own
steps where they differ, and which computations a later reuse needs stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..block_maps.block_map import ReuseMode
from ..runtime.time_grid import StepGrid, retime_mask
from .schedule import CacheSchedule


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
    dampings: tuple[float, ...]  # per layer: the share of its forecast's move (1: undamped)
    stores: np.ndarray  # [layers, steps]: a computation at the step is kept, for a reuse that can follow

    @classmethod
    def from_schedule(cls, schedule: CacheSchedule) -> LayerPlan:
        return cls.from_mask(schedule.grid, schedule.compute_mask(), tuple(layer.reuse for layer in schedule.layers),
                             schedule.layer_flops, schedule.total_flops,
                             tuple(layer.forecast_order for layer in schedule.layers),
                             tuple(layer.forecast_damping for layer in schedule.layers))

    @classmethod
    def from_mask(cls, grid: StepGrid, mask: np.ndarray, reuse: tuple[ReuseMode, ...], layer_flops: tuple[float, ...],
                  total_flops: float, orders: tuple[int, ...], dampings: tuple[float, ...]) -> LayerPlan:
        return cls(grid=grid, reuse=reuse, layer_flops=layer_flops, total_flops=total_flops,
                   cumulative_computes=np.cumsum(mask, axis=1), reuses_ever=~mask.all(axis=1), orders=orders,
                   dampings=dampings, stores=stores_for(mask, orders))

    def compute_mask(self) -> np.ndarray:
        return np.diff(self.cumulative_computes, axis=1, prepend=0).astype(bool)

    def on_run_grid(self, model_sampling: Any, run_grid: StepGrid) -> LayerPlan:
        """This plan moved onto a run's own steps (``retime_mask``): computations keep their density."""
        mask = retime_mask(self.compute_mask(), self.grid.bounds(model_sampling), run_grid.bounds(model_sampling))
        return LayerPlan.from_mask(run_grid, mask, self.reuse, self.layer_flops, self.total_flops, self.orders,
                                   self.dampings)

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
