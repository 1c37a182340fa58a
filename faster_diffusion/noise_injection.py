"""Faster Diffusion's prior noise injection: ``z_t <- z_t + alpha * z_T`` for late steps (t < 0.5 T).

What z_t and z_T are in ComfyUI. The paper works in DDPM's variance-preserving latent z_t (what the
UNet is fed), and z_T is the initial noise of the run. ComfyUI's k-diffusion samplers carry
``x = x0 + sigma * eps`` instead (variance-exploding for SD; for flow models x already is the model
input). The model input is ``model_sampling.calculate_input(sigma, x)``: ``x / sqrt(sigma^2 + 1)``
for SD (exactly the paper's z_t), ``x`` for flow models. So here:

* z_T is the model input at the run's first evaluation, ``calculate_input(sigma_0, x_0)``: for a
  full-denoise run that is the initial noise (scaled by sigma_max / sqrt(sigma_max^2 + 1), about
  0.998 for SD), as in the paper; for img2img it is the starting noisy latent.
* The injection is done in model-input space, ``z_t + alpha * z_T``, which in the sampler's x is
  ``x + alpha * z_T / s(sigma)`` with ``s(sigma) = calculate_input(sigma, 1)`` (any model sampling
  whose input scaling is linear in x per sigma is covered).
* "t < 0.5 T" is normalized time (the model's timestep over its timestep at sigma_max) below the
  cut-off, the same time axis every Block Cache schedule uses.

Where. A run extension of the cache (runtime/run.py): at the start of each evaluation, it adds the
term *in place* to the tensor the sampler passes, at the first evaluation of each new step. KSampler
passes its own state tensor there (unless a denoise mask is in use), so the solver continues from the injected latent,
exactly like the paper's ``latents = latents + alpha * init_latents`` before the UNet call, for the
one-evaluation-per-step samplers (euler/ddim, euler_ancestral, dpmpp_2m, lcm, uni_pc, ...). No
sampler code is touched. Caveats: for samplers with extra evaluations (heun, dpm_2, ...) the term
lands on whichever evaluation first reaches a new step (for Heun: its corrector input), and with a
denoise mask (inpainting) the sampler passes a blended copy, so the term only shifts that
evaluation's model input.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..block_caching.cache import BlockCacheHolder
from ..block_caching.schedule import CacheSchedule
from ..runtime.run import RunContext, RunExtension, RunMethod

logger = logging.getLogger(__name__)

DEFAULT_TAU_CUTOFF = 0.5


@dataclass(frozen=True)
class NoiseInjection(RunExtension):
    alpha: float = 0.0  # 0: off (nothing is installed)
    tau_cutoff: float = DEFAULT_TAU_CUTOFF  # inject at steps whose normalized time is below this

    @property
    def enabled(self) -> bool:
        return self.alpha != 0.0

    def validate(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0.0):
            raise ValueError(f"noise injection alpha must be a finite number >= 0, got {self.alpha!r}")
        if not (isinstance(self.tau_cutoff, (int, float)) and 0.0 <= self.tau_cutoff <= 1.0):
            raise ValueError(f"noise injection cut-off must be in [0, 1], got {self.tau_cutoff!r}")

    def bind(self, holder: BlockCacheHolder, schedule: CacheSchedule) -> NoiseInjection | None:
        """Apply's option: installed as a run extension of the cache when on."""
        self.validate()
        return self if self.enabled else None

    def start(self, run: RunContext) -> NoiseInjector:
        """This run's injector."""
        return NoiseInjector(self, run.model_sampling, run.holder.name)


class NoiseInjector(RunMethod):
    """One run's injection: z_T, and which step was last injected. Its figures: the steps injected."""

    name = "noise injection"

    def __init__(self, config: NoiseInjection, model_sampling: Any, holder_name: str = "Block Cache") -> None:
        config.validate()
        self.config = config
        self.model_sampling = model_sampling
        self.holder_name = holder_name
        self.z_T: torch.Tensor | None = None
        self.last_step: int | None = None
        self.injected_steps: list[int] = []

    def begin_evaluation(self, run: RunContext, x: torch.Tensor, sigma: torch.Tensor) -> None:
        if run.run_step is not None:
            self.before_evaluation(x, sigma, run.run_step, run.evaluation_tau)

    def close(self, run: RunContext) -> None:
        """Frees the latent-sized copy; the steps injected stay, as its figures."""
        if self.injected_steps:
            logger.info("%s: prior noise injection (alpha %g) at %d steps, from step %d.", self.holder_name,
                        self.config.alpha, len(self.injected_steps), self.injected_steps[0])
        elif self.last_step is not None:
            logger.warning("%s: prior noise injection (alpha %g) was on but injected at no step: no step of this "
                           "run started below the cut-off %g of normalized time, or the latent changed shape.",
                           self.holder_name, self.config.alpha, self.config.tau_cutoff)
        self.z_T = None

    def figures(self) -> list[int]:
        return self.injected_steps

    def before_evaluation(self, x: torch.Tensor, timestep: torch.Tensor, step: int, tau: float) -> bool:
        """Adds the term in place at the first evaluation of each new step (``step`` of the run,
        ``tau`` its normalized time) below the cut-off; returns whether it did."""
        if self.z_T is None:
            self.z_T = self.model_sampling.calculate_input(timestep, x).detach().clone()
        new_step = self.last_step is None or step > self.last_step
        self.last_step = step if self.last_step is None else max(step, self.last_step)
        if not new_step or self.z_T.shape != x.shape or tau >= self.config.tau_cutoff:
            return False
        scale = self.model_sampling.calculate_input(timestep, torch.ones_like(x))
        x.add_(self.config.alpha * self.z_T.to(device=x.device, dtype=x.dtype) / scale)
        self.injected_steps.append(step)
        return True
