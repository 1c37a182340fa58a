"""Measured fidelity: a schedule judged by sampling the profiled run again with it.

The profiling run is an uncached run (its output equals KSampler's), so re-running the same
inputs, noise and sampler with a candidate schedule and comparing the outputs measures that
schedule's real error, not a prediction. The speed-up target builder uses it to choose between
schedules of equal cost, and the node shows the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .patching import apply_block_cache
from .schedule import CacheSchedule


@dataclass(frozen=True)
class ProfileReplay:
    """How to sample a profiled run again: ``sample(model)`` runs the same sampler on the same inputs and
    noise with another model (a patched clone of ``model``) and returns its output latent; ``reference``
    is the profiled run's own output."""

    model: Any  # the ModelPatcher that was profiled
    sample: Callable[[Any], torch.Tensor]
    reference: torch.Tensor


def latent_psnr(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over batch items of the PSNR against ``reference``, with the reference's value range as the peak
    (for a pixel-space model in [-1, 1] this is the picture's PSNR)."""
    reference = reference.float()
    peak = float(reference.max() - reference.min()) or 1.0
    mse = ((samples.float() - reference) ** 2).reshape(reference.shape[0], -1).mean(1)
    values = [100.0 if float(m) == 0 else min(100.0, 10 * math.log10(peak * peak / float(m))) for m in mse]
    return sum(values) / len(values)


def replay_measure(replays: tuple[ProfileReplay, ...]) -> Callable[[CacheSchedule], float]:
    """A schedule's mean latent PSNR against the uncached outputs over every profiled run."""

    def measure(schedule: CacheSchedule) -> float:
        values = []
        for replay in replays:
            patched, _ = apply_block_cache(replay.model, schedule)
            values.append(latent_psnr(replay.sample(patched), replay.reference))
        return sum(values) / len(values)

    return measure
