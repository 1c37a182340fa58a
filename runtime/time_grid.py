"""The normalized time grid that profiles and schedules are built on.

Normalized time ``tau`` is the model's own timestep divided by its timestep at
``sigma_max``: 1 is pure noise and 0 is clean, for discrete (SD), flow (SD3,
Flux) and other model samplings alike. A schedule made on one grid (say 20
euler steps) drives a run on another (30 steps, or heun) by mapping each model
evaluation's tau onto the schedule's steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Two normalized times closer than this are the same grid point.
TAU_TOLERANCE = 1e-4


class TimeNormalizer:
    """Normalized time under one ``model_sampling`` (a ComfyUI model_sampling object). Its ends are
    measured once, so each later call costs one host sync (the timesteps' copy to the CPU), wherever
    the sigmas are: the model's tables, and the sigmas a sampler passes, may be on the GPU."""

    def __init__(self, model_sampling: Any) -> None:
        self.model_sampling = model_sampling
        t_max = self._timesteps(torch.as_tensor(model_sampling.sigma_max))
        t_min = self._timesteps(torch.as_tensor(model_sampling.sigma_min))
        # EDM's timestep (0.25 ln sigma, Cosmos 1) is negative below sigma 1: measured from 0, every
        # step there would clamp to time 0 and collide. Measure it from sigma_min instead.
        self.origin = float(t_min) if float(t_min) < 0.0 else 0.0
        self.span = float(t_max - t_min) if self.origin else float(t_max)

    def _timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        return self.model_sampling.timestep(sigmas.detach().to(torch.float32).reshape(-1)).float().cpu()

    def __call__(self, sigmas: torch.Tensor) -> list[float]:
        t = self._timesteps(sigmas)
        return [float(v) for v in ((t - self.origin) / self.span).clamp(0.0, 1.0)]


def normalized_times(model_sampling: Any, sigmas: torch.Tensor) -> list[float]:
    """Normalized time of each sigma under ``model_sampling``."""
    return TimeNormalizer(model_sampling)(sigmas)


@dataclass(frozen=True)
class StepGrid:
    """The sampling steps a profile was measured on, and so a schedule was built on."""

    sigmas: tuple[float, ...]  # steps + 1 values, as the sampler got them (the last is usually 0)
    taus: tuple[float, ...]  # normalized time at the start of each step
    sampler: str = ""
    scheduler: str = ""
    cfg: float = 0.0
    denoise: float = 1.0
    latent_shape: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_sigmas(cls, model_sampling: Any, sigmas: torch.Tensor, **fields: Any) -> StepGrid:
        """The grid of a sampler's ``sigmas`` (steps + 1 values) under ``model_sampling``."""
        sigmas = sigmas.detach().cpu()
        return cls(sigmas=tuple(float(s) for s in sigmas), taus=tuple(normalized_times(model_sampling, sigmas[:-1])),
                   **fields)

    @property
    def steps(self) -> int:
        return len(self.taus)

    def step_of(self, tau: float) -> int:
        """The schedule step that is active at normalized time ``tau``.

        That is the last step starting at or before ``tau`` (times run from 1 down to 0);
        times before the first step map to step 0.
        """
        descending = np.asarray(self.taus, dtype=np.float64)
        # count of steps whose start time is >= tau: the last such step is active
        count = int(np.searchsorted(-descending, -(tau - TAU_TOLERANCE), side="right"))
        return max(0, count - 1)

    def bounds(self, model_sampling: Any) -> list[float]:
        """The normalized time each step starts at, and the end of the last (``retime_mask``'s bounds)."""
        return [*self.taus, *normalized_times(model_sampling, torch.tensor(self.sigmas[-1:]))]

    def same_as(self, taus: list[float]) -> bool:
        return len(taus) == len(self.taus) and all(
            math.isclose(a, b, abs_tol=TAU_TOLERANCE) for a, b in zip(taus, self.taus, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "sigmas": list(self.sigmas),
            "normalized_timesteps": list(self.taus),
            "sampler": self.sampler,
            "scheduler": self.scheduler,
            "cfg": self.cfg,
            "denoise": self.denoise,
            "latent_shape": list(self.latent_shape),
        }


def retime_mask(mask: np.ndarray, grid_bounds: list[float], run_bounds: list[float]) -> np.ndarray:
    """A [layers, steps] compute mask moved from one step grid onto another by normalized time.

    ``grid_bounds`` and ``run_bounds`` are the normalized times at which each step starts, plus
    the end of the last one (steps + 1 values, falling). The mask is read as a *density*: between two
    computations ``gap`` steps apart, a share 1 / gap of the steps computes. Each run step gets the
    time-weighted mean density over its span, and a run step computes once the shares since the last
    computation add up to 1. So the computations stay evenly spaced where the schedule's were, dense
    stretches (the early, high-change steps) stay dense at any step count, and the share of steps
    computed, so the cost relative to an uncached run, stays the same. The first run step always
    computes; a layer that computes at every step does so on any grid. A run step wholly outside the
    schedule's span (a schedule built on one segment of a run: a KSamplerAdvanced segment, one expert of
    a two-expert model) computes every layer: the schedule knows nothing of it.
    """
    layers, steps = mask.shape
    density = np.zeros((layers, steps))
    for layer in range(layers):
        computes = [int(s) for s in np.flatnonzero(mask[layer])] or [0]
        for start, end in zip(computes, [*computes[1:], steps], strict=True):
            density[layer, start:end] = 1.0 / (end - start)
    run_steps = len(run_bounds) - 1
    rate = np.zeros((run_steps, steps))
    for j in range(run_steps):
        high, low = run_bounds[j], run_bounds[j + 1]
        if high - low <= TAU_TOLERANCE:
            rate[j, _step_at(grid_bounds, high)] = 1.0
            continue
        for i in range(steps):
            # The schedule's first and last steps stand for everything before and after it.
            step_high = grid_bounds[i] if i > 0 else max(grid_bounds[0], high)
            step_low = grid_bounds[i + 1] if i < steps - 1 else min(grid_bounds[steps], low)
            overlap = min(high, step_high) - max(low, step_low)
            if overlap > 0:
                rate[j, i] = overlap / (high - low)
    share = rate @ density.T  # [run steps, layers]
    # The schedule computes where its cumulated density crosses a whole number: at the start of each
    # stretch. The run does the same on its own cumulated shares (so its first step always computes).
    before = np.vstack([np.zeros((1, layers)), np.cumsum(share, axis=0)[:-1]]) - 1e-9
    after = before + share
    retimed = (np.floor(after) >= np.ceil(before)).T
    start, end = grid_bounds[0], grid_bounds[steps]
    for j in range(run_steps):
        high, low = run_bounds[j], run_bounds[j + 1]
        before = low >= start - TAU_TOLERANCE and high > start + TAU_TOLERANCE
        after = high <= end + TAU_TOLERANCE and low < end - TAU_TOLERANCE
        if before or after:
            retimed[:, j] = True
    return retimed


def _step_at(bounds: list[float], tau: float) -> int:
    """The step of ``bounds`` (starts + end, falling) whose span holds ``tau``."""
    for i in range(len(bounds) - 1):
        if tau >= bounds[i + 1] - TAU_TOLERANCE:
            return i
    return len(bounds) - 2
