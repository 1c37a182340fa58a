"""Step lookahead: the model evaluated at some steps only, the steps between interpolated (issue 22).

Rectified-flow paths are nearly straight, so a whole step's output is better *interpolated* between two
evaluations than forecast from the past. After evaluating step ``p``, the next step evaluates the model at the
next planned step ``e`` instead, at the point one Euler step from ``p``'s latent with ``p``'s derivative predicts;
the steps between take the denoised picture interpolated linearly in sigma between ``p``'s and ``e``'s, and step
``e`` takes ``e``'s, so the sampler's derivative ``(x - denoised) / sigma`` follows the latent it really has
(interpolating the derivative instead kept 1.2-3.6 dB less from 1.8x to 3.2x with the steps spread evenly on the
Flux reference, up to 5 dB on the UNet: docs/benchmark/unseen#what-to-interpolate). One model call per gap, as
whole-step reuse, but it tracks the full step count's path to second order where reuse extrapolates (on the Flux
reference at 20 and 28 steps it beat Block Cache's best schedule at every floor).

A run extension of the cache (runtime/run.py) acting on the sampler's CFG-combined prediction: samplers that
evaluate the model once per step, on the step's own sigma (``LOOKAHEAD_SAMPLERS``); with any other, or where
a run evaluates off the plan (a step twice, time backwards, off the step grid), it computes every step and says so.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..runtime.run import RunContext, RunExtension, RunMethod
from ..runtime.time_grid import TAU_TOLERANCE, StepGrid, retime_mask
from .cache import ONE_EVALUATION_PER_STEP, sampler_key
from .profile import BlockProfile
from .schedule import CacheSchedule, all_compute_schedule, lookahead_steps_valid

logger = logging.getLogger(__name__)

# The CFG++ samplers read the unconditioned prediction through a post-CFG hook, which a step answered
# without the model does not call.
LOOKAHEAD_SAMPLERS = frozenset(name for name in ONE_EVALUATION_PER_STEP if "cfg_pp" not in name)
_LOOKAHEAD_SAMPLER_KEYS = frozenset(sampler_key(name) for name in LOOKAHEAD_SAMPLERS)


def lookahead_runs_with(sampler: str) -> bool:
    """Whether a step lookahead runs with ``sampler`` (KSampler's name, as a profile records it, or its k-diffusion
    function's, as a run sees it)."""
    return sampler_key(sampler) in _LOOKAHEAD_SAMPLER_KEYS


def lookahead_schedule(profile: BlockProfile, steps: tuple[int, ...], builder: dict[str, Any] | None = None
                       ) -> CacheSchedule:
    """The schedule that evaluates ``profile``'s model at ``steps`` only (increasing, from the first), every layer
    computing there."""
    count = profile.grid.steps
    if not lookahead_steps_valid(steps, count):
        raise ValueError(f"lookahead steps must increase from 0 to at most {count - 1}, got {list(steps)}")
    schedule = all_compute_schedule(profile.block_map, profile.grid, profile.layer_flops, profile.total_flops)
    return dataclasses.replace(schedule, lookahead_steps=tuple(steps), builder=builder or {"method": "lookahead"},
                               provenance={**profile.provenance, "profile_samples": profile.sample_count})


@dataclass(frozen=True)
class StepLookahead(RunExtension):
    """A schedule's lookahead: the steps of its grid the model is evaluated at."""

    steps: tuple[int, ...]
    grid: StepGrid

    def start(self, run: RunContext) -> LookaheadRun:
        return LookaheadRun(self.run_steps(run), run.run_grid, run.sampler_name, run.holder.name)

    def run_steps(self, run: RunContext) -> frozenset[int]:
        """The planned steps on the run's own steps: as they are on the schedule's grid, else moved by normalized
        time keeping their density (``retime_mask``, as the layers' computations are)."""
        if self.grid.same_as(list(run.run_grid.taus)):
            return frozenset(self.steps)
        mask = np.zeros((1, self.grid.steps), dtype=bool)
        mask[0, list(self.steps)] = True
        moved = retime_mask(mask, self.grid.bounds(run.model_sampling), run.run_grid.bounds(run.model_sampling))
        return frozenset(int(s) for s in np.flatnonzero(moved[0]))


@dataclass
class LookaheadFigures:
    """What one run's lookahead did (``RunStats.figures['lookahead']``)."""

    planned: tuple[int, ...]  # the planned steps on the run's steps
    model_calls: int = 0
    interpolated: int = 0  # steps between two evaluations, their denoised picture interpolated
    off: str = ""  # why it computed every step from some point on (empty: it did not)
    evaluated_steps: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Point:
    """An evaluation: its step, sigma, denoised picture, and derivative ``(x - denoised) / sigma``."""

    step: int
    sigma: float
    denoised: torch.Tensor
    derivative: torch.Tensor


class LookaheadRun(RunMethod):
    """One run's lookahead: the last evaluation, and the one ahead while the steps before it are taken."""

    name = "lookahead"

    def __init__(self, planned: frozenset[int], run_grid: StepGrid, sampler_name: str, holder_name: str) -> None:
        self.planned = tuple(sorted(planned))
        self.grid = run_grid
        self.holder_name = holder_name
        self.stats = LookaheadFigures(self.planned)
        self.known: _Point | None = None
        self.ahead: _Point | None = None
        self.x: torch.Tensor | None = None
        self.sigma: torch.Tensor | None = None
        self.last_step: int | None = None
        if not lookahead_runs_with(sampler_name):
            self.turn_off(f"the sampler {sampler_name or '(unknown)'} evaluates the model more than once per step "
                          "or reads more than its output (supported: " + ", ".join(sorted(LOOKAHEAD_SAMPLERS)) + ")")

    def turn_off(self, why: str) -> None:
        if not self.stats.off:
            self.stats.off = why
            logger.warning("%s: lookahead off, every step computes from here: %s.", self.holder_name, why)
        self.known = self.ahead = None

    def begin_evaluation(self, run: RunContext, x: torch.Tensor, sigma: torch.Tensor) -> None:
        self.x, self.sigma = x, sigma
        step = run.run_step
        if self.stats.off or step is None:
            return
        if self.last_step is not None and step <= self.last_step:
            self.turn_off(f"step {step + 1} was evaluated again (after step {self.last_step + 1})")
        elif abs(run.evaluation_tau - self.grid.taus[step]) > TAU_TOLERANCE:
            self.turn_off(f"an evaluation between steps {step} and {step + 1}")
        self.last_step = step

    def reset(self, run: RunContext) -> None:
        self.known = self.ahead = None

    def around_evaluation(self, run: RunContext, evaluate: Callable[[], torch.Tensor]) -> torch.Tensor:
        x, sigma_tensor, step = self.x, self.sigma, run.run_step
        if self.stats.off or step is None or x is None or sigma_tensor is None:
            return self._evaluated(evaluate, step, x, sigma_tensor)
        sigmas = self.grid.sigmas
        sigma = sigmas[step]
        known = self.known
        if self.ahead is None and (known is None or step in self.planned):
            return self._evaluated(evaluate, step, x, sigma_tensor)
        assert known is not None
        if self.ahead is None:
            target = next((planned for planned in self.planned if planned > step), len(sigmas) - 2)
            predicted = x + (sigmas[target] - sigma) * known.derivative
            denoised = run.evaluate_at(evaluate, predicted, torch.full_like(sigma_tensor, sigmas[target]))
            self.stats.model_calls += 1
            self.stats.evaluated_steps.append(target)
            self.ahead = _Point(target, sigmas[target], denoised, (predicted - denoised) / sigmas[target])
        ahead = self.ahead
        if step >= ahead.step:
            self.known, self.ahead = ahead, None
            return ahead.denoised
        self.stats.interpolated += 1
        share = (sigma - known.sigma) / (ahead.sigma - known.sigma)
        return known.denoised + share * (ahead.denoised - known.denoised)

    def _evaluated(self, evaluate: Callable[[], torch.Tensor], step: int | None, x: torch.Tensor | None,
                   sigma: torch.Tensor | None) -> torch.Tensor:
        denoised = evaluate()
        self.stats.model_calls += 1
        if step is not None:
            self.stats.evaluated_steps.append(step)
        if not self.stats.off and step is not None and x is not None and sigma is not None:
            value = self.grid.sigmas[step]
            self.known = _Point(step, value, denoised, (x - denoised) / value)
        return denoised

    def close(self, run: RunContext) -> None:
        stats = self.stats
        if stats.model_calls:
            logger.info("%s: lookahead ran the model %d times for %d steps (%d interpolated)%s.", self.holder_name,
                        stats.model_calls, self.grid.steps, stats.interpolated,
                        f"; off: {stats.off}" if stats.off else "")
        self.known = self.ahead = None
        self.x = self.sigma = None

    def figures(self) -> LookaheadFigures:
        return self.stats
