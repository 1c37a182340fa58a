"""Measured fidelity: a schedule judged by sampling the profiled run again with it.

The profiling run is an uncached run (its output equals KSampler's), so re-running the same
inputs, noise and sampler with a candidate schedule and comparing the outputs measures that
schedule's real error, not a prediction. The speed-up target builder uses it to choose between
schedules of equal cost, and the node shows the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .fidelity import mean_psnr
from .patching import apply_block_cache
from .schedule import CacheSchedule


@dataclass(frozen=True)
class ProfileReplay:
    """How to sample a profiled run again: ``sample(model)`` runs the same sampler on the same inputs and
    noise with another model (a patched clone of ``model``) and returns its output latent; ``reference``
    is the profiled run's own output. ``decode`` (a VAE's, latent -> pictures in [0, 1], batch first)
    makes the measure the pictures' PSNR; without it, the latents'."""

    model: Any  # the ModelPatcher that was profiled
    sample: Callable[[Any], torch.Tensor]
    reference: torch.Tensor
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def metric(self) -> str:
        return "picture" if self.decode is not None else "latent"


def latent_psnr(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of latents, with the reference's value range as the peak. Not the picture's: a model whose
    latents stray outside the decoder's range reads higher here (the reference model: about 7 dB)."""
    return mean_psnr(samples, reference, float(reference.max() - reference.min()) or 1.0)


def replay_measure(replays: tuple[ProfileReplay, ...]) -> Callable[[CacheSchedule], float]:
    """A schedule's mean PSNR against the uncached outputs over every profiled run (of the decoded pictures
    where the run has a decoder)."""
    decoded: dict[int, torch.Tensor] = {}

    def measure(schedule: CacheSchedule) -> float:
        values = []
        for index, replay in enumerate(replays):
            patched, _ = apply_block_cache(replay.model, schedule)
            out = replay.sample(patched)
            if replay.decode is None:
                values.append(latent_psnr(out, replay.reference))
                continue
            if index not in decoded:
                decoded[index] = replay.decode(replay.reference).float().clamp(0, 1)
            values.append(mean_psnr(replay.decode(out).float().clamp(0, 1), decoded[index], 1.0))
        return sum(values) / len(values)

    return measure


def measure_metric(replays: tuple[ProfileReplay, ...]) -> str:
    """What ``replay_measure`` compares: 'picture', 'latent', or 'picture and latent' (merged profiles)."""
    return " and ".join(sorted({replay.metric for replay in replays}, reverse=True))
