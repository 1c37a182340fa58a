"""Measured fidelity: a schedule judged by sampling the profiled prompts again with it.

The profiling run is an uncached run (its output equals KSampler's). Validation samples the same
prompts and sampler with a candidate schedule and compares the pictures with uncached ones: the
schedule's real error, not a prediction. It does so with a *held-out noise seed* (the profiled
seed + 1, its uncached pictures sampled once): the search chose the schedule on the profiled run
itself, so that run flatters it (by 2-5 dB on the transformer reference model, docs/benchmark/unseen),
while other seeds and prompts do not. A second held-out seed (+ 2) checks what the first one chose
(block_caching/target_schedule.py). What it gives is a ``Measurement``: one PSNR per picture, their
mean, and the range the mean of other prompts' pictures can be expected in.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .fidelity import psnr
from .patching import apply_block_cache, attach_profiler, collect_profile
from .profile import BlockProfile, merge_profiles
from .schedule import CacheSchedule

logger = logging.getLogger(__name__)

# The noise seed validation samples with, as an offset from the profiled run's; the second one checks what the
# first chose (block_caching/target_schedule.py, checked_once).
HELD_OUT_SEED_OFFSET = 1
SECOND_SEED_OFFSET = 2
# The expected range of other prompts' mean PSNR: mean +- z standard errors of the measured pictures'
# mean, their spread taken as at least MIN_PICTURE_SD (a few pictures can agree by chance). Calibrated
# on the reference models' tuning set and checked on a second set (docs/benchmark/unseen).
EXPECTED_RANGE_Z = 1.0
MIN_PICTURE_SD = 3.0


@dataclass(frozen=True)
class ProfileReplay:
    """How to sample a profiled run again: ``sample(model, steps=None, seed_offset=0)`` runs the same sampler
    on the same inputs with another model (a patched clone of ``model``), with ``steps`` instead of the
    profiled count and the noise seed moved by ``seed_offset``, and returns its output latent;
    ``reference`` is the profiled run's own output. ``decode`` (a VAE's, latent -> pictures in [0, 1],
    batch first) makes the measure the pictures' PSNR; without it, the latents'."""

    model: Any  # the ModelPatcher that was profiled
    sample: Callable[..., torch.Tensor]
    reference: torch.Tensor
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    # A segment of a split run (segment_replay) samples again at its own step count only.
    other_step_counts: bool = True
    # False where another seed gives the run the same input (a segment that adds no noise and has no earlier
    # segment to sample again): its held-out pictures are then the profiled ones.
    held_out: bool = True

    @property
    def metric(self) -> str:
        return "picture" if self.decode is not None else "latent"

    def pictures(self, samples: torch.Tensor) -> tuple[torch.Tensor, float]:
        """What is compared, and its peak: decoded pictures in [0, 1], else the latents with the reference's
        value range as the peak (a model whose latents stray outside the decoder's range reads higher there:
        the reference model, about 7 dB)."""
        if self.decode is not None:
            return self.decode(samples).float().clamp(0, 1), 1.0
        return samples.float(), float(self.reference.max() - self.reference.min()) or 1.0


@dataclass(frozen=True)
class Measurement:
    """One PSNR per measured picture (dB), and what they say of other prompts' pictures."""

    pictures: tuple[float, ...]
    min_sd: float = MIN_PICTURE_SD  # the least spread the pictures' PSNR is taken to have (0: known exactly)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.pictures)

    @property
    def standard_error(self) -> float:
        spread = statistics.stdev(self.pictures) if len(self.pictures) > 1 else 0.0
        return max(spread, self.min_sd) / math.sqrt(len(self.pictures))

    @property
    def low(self) -> float:
        """The low end of the range other prompts' mean PSNR is expected in (what a quality floor checks)."""
        return self.mean - EXPECTED_RANGE_Z * self.standard_error

    @property
    def high(self) -> float:
        return self.mean + EXPECTED_RANGE_Z * self.standard_error

    def beats(self, other: Measurement) -> bool:
        """Whether these pictures, the same ones as ``other``'s sampled another way, are closer to their
        uncached pictures by more than the noise: the mean per-picture gain exceeds EXPECTED_RANGE_Z of its
        standard errors (a paired comparison: the prompts' own spread cancels). One picture cannot show its
        noise: its gain must exceed ``min_sd``."""
        gains = [mine - theirs for mine, theirs in zip(self.pictures, other.pictures, strict=True)]
        spread = statistics.stdev(gains) if len(gains) > 1 else self.min_sd
        return statistics.fmean(gains) > EXPECTED_RANGE_Z * spread / math.sqrt(len(gains))

    def describe(self) -> str:
        return (f"{self.mean:.1f} dB over {len(self.pictures)} held-out pictures, expected "
                f"{self.low:.1f}-{self.high:.1f} dB on other prompts")


def measurement(value: float | Measurement) -> Measurement:
    """A measure's result as a Measurement (a plain number: known exactly)."""
    return value if isinstance(value, Measurement) else Measurement((float(value),), min_sd=0.0)


class HeldOutRuns:
    """The profiled prompts sampled with a held-out seed (the profiled one + ``seed_offset``): the uncached pictures
    once, then any model's."""

    def __init__(self, replays: tuple[ProfileReplay, ...], seed_offset: int = HELD_OUT_SEED_OFFSET) -> None:
        self.replays = replays
        self.seed_offset = seed_offset
        self._uncached: dict[int, tuple[torch.Tensor, float]] = {}
        self.measured = 0  # counted in the log: each sampling shows its own progress bar, which restarts

    def measure(self, model_of: Callable[[ProfileReplay], Any], steps: int | None = None, what: str = "") -> Measurement:
        self.measured += 1
        logger.info("Validation, seed +%d: measurement %d%s, sampling the %d profiled run(s) again.",
                    self.seed_offset, self.measured, f" ({what})" if what else "", len(self.replays))
        values: list[float] = []
        for index, replay in enumerate(self.replays):
            if index not in self._uncached:
                self._uncached[index] = replay.pictures(replay.sample(replay.model, seed_offset=self.seed_offset))
            reference, peak = self._uncached[index]
            out, _ = replay.pictures(replay.sample(model_of(replay), steps=steps, seed_offset=self.seed_offset))
            values += psnr(out, reference, peak)
        return Measurement(tuple(values))

    def schedule(self, schedule: CacheSchedule) -> Measurement:
        """A schedule's PSNR against the uncached pictures (of the decoded pictures where the run has a decoder),
        sampled with the schedule's own step count (a schedule for fewer steps than the profiled run is
        compared with the profiled count's uncached pictures)."""
        return self.measure(lambda replay: apply_block_cache(replay.model, schedule)[0], steps=schedule.grid.steps,
                            what=f"a schedule of {schedule.estimated_speedup:.2f}x at {schedule.grid.steps} steps")

    def fewer_steps(self, steps: int) -> Measurement:
        """Uncached sampling with ``steps`` instead of the profiled count."""
        return self.measure(lambda replay: replay.model, steps=steps, what=f"uncached, {steps} steps")


@dataclass(frozen=True)
class HeldOutValidation:
    """What the Build node validates with: the profiled prompts sampled with the held-out seed (``runs``, which
    measures and chooses) and with the second seed (``second``, which checks what passes), and what both
    compare (``metric``)."""

    runs: HeldOutRuns
    second: HeldOutRuns
    metric: str

    @classmethod
    def of(cls, replays: tuple[ProfileReplay, ...]) -> HeldOutValidation:
        return cls(HeldOutRuns(replays), HeldOutRuns(replays, SECOND_SEED_OFFSET), measure_metric(replays))


def segment_replay(model: Any, sample_segment: Callable[[Any, torch.Tensor | None, int], torch.Tensor],
                   reference: torch.Tensor, steps: int, *, adds_noise: bool, earlier: ProfileReplay | None = None,
                   decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ProfileReplay:
    """How to sample one segment of a split run again (a KSamplerAdvanced segment: one expert of Wan 2.2).

    ``sample_segment(model, input, seed_offset)`` samples the segment from ``input`` (None: the profiled input
    latent) with the noise seed moved by ``seed_offset`` and returns its output latent. With ``earlier`` (the
    replay of the segment that made the profiled input), another seed's input is that segment sampled again,
    uncached, with the same seed offset: so a segment that adds no noise of its own (a low-noise expert) is still
    measured on other noise than the run that chose its schedule. Only the profiled ``steps`` can be sampled.
    """
    segment_steps = steps
    inputs: dict[int, torch.Tensor] = {}

    def input_for(seed_offset: int) -> torch.Tensor | None:
        if earlier is None or seed_offset == 0:
            return None
        if seed_offset not in inputs:  # one earlier run per seed, whatever this segment's model
            inputs[seed_offset] = earlier.sample(earlier.model, seed_offset=seed_offset)
        return inputs[seed_offset]

    def sample(with_model: Any, steps: int | None = None, seed_offset: int = 0) -> torch.Tensor:
        if steps not in (None, segment_steps):
            raise ValueError(f"a segment of a split run is sampled again with its own {segment_steps} steps only, "
                             f"not {steps}")
        return sample_segment(with_model, input_for(seed_offset), seed_offset)

    return ProfileReplay(model, sample, reference, decode, other_step_counts=False,
                         held_out=adds_noise or earlier is not None)


def earlier_segment_replay(earlier: BlockProfile, samples: torch.Tensor) -> ProfileReplay:
    """The replay, among ``earlier``'s, whose run made ``samples`` (a later segment's input latent)."""
    for replay in earlier.replays:
        if torch.equal(replay.reference, samples.to(replay.reference)):  # False where the shapes differ
            return replay
    if not earlier.replays:
        raise ValueError("the earlier segment's profile cannot sample its run again (loaded as JSON, or recorded by "
                         "Record Block Changes): connect the profile of Profile Block Changes (Advanced)")
    raise ValueError("the earlier segment's profile is not of the run that made this latent: connect the profile "
                     "of the node whose output latent is this node's latent_image")


def profile_again(profile: BlockProfile, steps: int) -> BlockProfile:
    """The profile of the profiled runs sampled again with ``steps`` (same prompts, seed and sampler), merged
    over its replays; it keeps the replays, so its schedules are measured against the original runs."""
    grid = profile.grid
    if not profile.replays:
        raise ValueError("this profile cannot sample its run again (loaded as JSON, or recorded by Record Block "
                         "Changes), so it cannot be profiled at another step count")
    if not all(replay.other_step_counts for replay in profile.replays):
        raise ValueError("this profile is of a segment of a split run, which is sampled again with its own steps "
                         "only, so it cannot be profiled at another step count")
    profiles = []
    for replay in profile.replays:
        profiled, holder = attach_profiler(replay.model)
        replay.sample(profiled, steps=steps)
        profiles.append(collect_profile(holder, replay.model, sampler=grid.sampler, scheduler=grid.scheduler,
                                        cfg=grid.cfg, denoise=grid.denoise, latent_shape=grid.latent_shape))
    return dataclasses.replace(merge_profiles(profiles), replays=profile.replays)


def measure_metric(replays: tuple[ProfileReplay, ...]) -> str:
    """What ``HeldOutRuns`` compares: 'picture', 'latent', or 'picture and latent' (merged profiles)."""
    return " and ".join(sorted({replay.metric for replay in replays}, reverse=True))
