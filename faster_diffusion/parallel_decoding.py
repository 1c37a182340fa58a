"""Faster Diffusion's parallel decoding (Li et al., NeurIPS 2024, arXiv 2312.09608, Sec. 3.3).

With encoder propagation (faster_diffusion/schedule.py) the decoder of a non-key step runs on the encoder
features cached at the last key step and on its own timestep embedding. If the decoder depends on
nothing else, its outputs for all the non-key steps up to the next key step can be computed at once,
as one batch, and handed out to the solver one step at a time.

What it takes here, and how it is done:

* **A decoder that depends on cached features only.** The UNet's first conv (conv_in,
  ``input_blocks.0.0``) feeds the last decoder block's first skip; encoder propagation recomputes it
  from the current latent at every step. With parallel decoding it is treated as part of the
  encoder: its output is cached at key steps (per cond chunk, like the encoder layers) and reused at
  the other steps, as in the paper, where the whole down path is skipped: conv_in is one of the
  extension's ``patched_layers``, whose calls the runtime hands to the run's ``ParallelDecoder``.
  (Sequential encoder propagation without this option keeps recomputing conv_in.)
* **The coming timesteps.** Known from the run's steps and the layer method's planned decisions
  (the run context's ``planned_computes``). Around every diffusion-model call (the runtime's
  DIFFUSION_MODEL hook) of an evaluation where the encoder is reused (a non-key evaluation):

  1. its sigma has a stashed output (for this call's cond chunks): that output is returned and the
     diffusion model is not called at all;
  2. its sigma is a step of the schedule: one diffusion-model call is made whose batch is this call's
     batch repeated for this step and the following non-key steps (up to the next key step, at most
     ``max_steps``), step-major, with each step's timestep; context, ``y`` and any batch-sized extra
     input are repeated with it, ``cond_or_uncond`` and ``uuids`` in ``transformer_options`` are
     repeated to match. The runtime's chunk keys are repeated too, so every encoder layer (and
     conv_in) returns its cached per-chunk features tiled to the bigger batch. The first block of
     rows is this evaluation's output, the rest are stashed by step;
  3. otherwise (a sigma the schedule does not know: dpm_2's and the SDE samplers' midpoints, a
     restart, ...) the call runs sequentially, exactly as without batching.

  The batched call is made at the first non-key evaluation after a key step rather than inside the
  key step: the result is the same (it depends on the cache and the timesteps only), and nothing is
  computed for steps a run never reaches. A key evaluation drops the stash (new encoder features)
  and stashes its own output at its sigma, so Heun, which evaluates each schedule sigma twice,
  reuses it. Heun's evaluations are all at schedule sigmas (with ``s_churn`` 0) and are all served.
* **Outputs are the diffusion model's** (eps, v, ...), never ``denoised``: BaseModel turns them into
  ``denoised`` with the current latent afterwards, so a stashed output stays right whatever latent
  the solver (or noise injection) arrives with.

Not batched, sequential instead (logged once): calls with ControlNet/T2I-Adapter residuals (they are
computed from the current latent at each step), schedules with scale-shift corrections (per step),
models whose timestep is not ``model_sampling.timestep(sigma)``, and calls where another node's
DIFFUSION_MODEL wrapper runs inside the runtime's (core EasyCache applied after Block Cache): it would
see a batch of several steps. Calibrate installs no parallel decoding. Only UNet encoder-propagation schedules
apply; other schedules and models are left as they are (logged). Patches that read
``transformer_options['sigmas']`` see the first batched step's sigma for the whole batch.

Layer-evaluation counts in the run summary stay per step (a served step counts its decoder layers
as computed and its encoder layers as reused, as sequentially); ``ParallelStats`` counts the real
batched passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..block_caching.cache import BlockCacheHolder, LayerCache
from ..block_caching.schedule import CacheSchedule
from ..runtime.run import ModelCall, RunContext, RunExtension, RunMethod

logger = logging.getLogger(__name__)

CONV_IN = "input_blocks.0.0"
# Two sigmas within this relative distance are the same step (sampler sigmas are the schedule's own
# float32 values, so in practice they are equal).
SIGMA_RTOL = 1e-5
# Of the free memory ComfyUI reports at a batched call, the share its extra rows may take.
FREE_MEMORY_SHARE = 0.8
# Steps per batched call where the memory cannot be estimated.
SAFE_DEFAULT_STEPS = 4


@dataclass(frozen=True)
class ParallelDecoding:
    enabled: bool = False
    max_steps: int = 0  # most steps decoded in one batched call; 0: all up to the next key step
    # False: conv_in is reused as with parallel decoding, but every evaluation runs its own decoder.
    # The same computation, one step at a time: the reference parallel decoding must equal.
    batched: bool = True

    def validate(self) -> None:
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise ValueError(f"parallel decoding max_steps must be an integer >= 0 (0: no limit), "
                             f"got {self.max_steps!r}")

    def bind(self, holder: BlockCacheHolder, schedule: CacheSchedule) -> ParallelDecodingPatch | None:
        """Apply's option: the run extension, when on and the schedule and model allow it (logged if not)."""
        self.validate()
        if not self.enabled:
            return None
        reason = not_applicable_reason(schedule, holder)
        if reason is not None:
            holder.declined.append(f"parallel decoding was requested but does not apply: {reason}. Sampling runs "
                                   "without it.")
            logger.warning("%s: %s", holder.name, holder.declined[-1])
            return None
        logger.info("%s: parallel decoding on: conv_in is reused with the encoder; the decoder passes of the non-key "
                    "steps after each key step run as one batch%s.", holder.name,
                    f" of at most {self.max_steps} steps" if self.max_steps else "")
        return ParallelDecodingPatch(holder, self)


@dataclass
class ParallelStats:
    """What one run's parallel decoding did."""

    batched_calls: int = 0  # diffusion-model calls that decoded several steps at once
    batched_steps: int = 0  # step x call slots those calls decoded
    served: int = 0  # model calls answered from the stash (no diffusion-model call)
    sequential: int = 0  # non-key calls that ran their own decoder (fallbacks)
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    unused: int = 0  # (step, chunk) outputs decoded ahead but never served: wasted work
    conv_in_reused: int = 0
    peak_stash_bytes: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # rows of each batched call
    memory_capped: int = 0  # batched calls made shorter to fit free memory


def not_applicable_reason(schedule: CacheSchedule, holder: BlockCacheHolder) -> str | None:
    """Why parallel decoding cannot run with this schedule on this model (None: it can)."""
    if any(layer.forecast_order for layer in schedule.layers):
        return "the schedule forecasts reused layers (forecast order > 0), which changes them from step to step"
    if (schedule.builder or {}).get("method") != "faster_diffusion":
        return ("the schedule is not an encoder-propagation schedule (Faster Diffusion Schedule); Block Caching "
                "schedules reuse layers independently, so no decoder depends on cached features only")
    if holder.block_map.family != "unet":
        return "it is implemented for UNet models (SD1.x, SD2.x, SDXL) only"
    if not isinstance(holder, BlockCacheHolder):
        return "the holder does not cache"
    encoder = _encoder_layers(holder)
    if not encoder.any():
        return "every step of the schedule is a key step: there is nothing to decode ahead"
    if (holder.plan.reuses_ever & ~encoder).any():
        return "the schedule reuses decoder layers (it was edited after it was built)"
    return None


def _encoder_layers(holder: BlockCacheHolder) -> np.ndarray:
    stages = np.array([spec.stage in ("input", "middle") for spec in holder.block_map.layers], dtype=bool)
    return stages & holder.plan.reuses_ever


class ParallelDecodingPatch(RunExtension):
    """Parallel decoding installed on a holder: read-only during sampling. Each run gets its own
    ``ParallelDecoder``; the last one stays here for display and tests."""

    patched_layers = (CONV_IN,)
    wraps_diffusion_model = True

    def __init__(self, holder: BlockCacheHolder, config: ParallelDecoding) -> None:
        config.validate()
        self.holder = holder
        self.config = config
        self.name = holder.name
        self.encoder = _encoder_layers(holder)
        self.decoder = ~self.encoder
        self.last_run: ParallelDecoder | None = None

    @property
    def last_stats(self) -> ParallelStats | None:
        return self.last_run.stats if self.last_run is not None else None

    def start(self, run: RunContext) -> ParallelDecoder | None:
        return ParallelDecoder(self, run) if isinstance(run.layer_method, LayerCache) else None


def installed_on(holder: BlockCacheHolder) -> ParallelDecodingPatch | None:
    """The parallel decoding an Apply installed on ``holder`` (its last run's figures), if any."""
    return next((e for e in holder.extensions if isinstance(e, ParallelDecodingPatch)), None)


class ParallelDecoder(RunMethod):
    """One run's parallel decoding: conv_in cache, the stash, counters (its figures)."""

    name = "parallel decoding"

    def __init__(self, patch: ParallelDecodingPatch, run: RunContext) -> None:
        self.patch = patch
        self.run = run
        self.config = patch.config
        self.holder_name = patch.name
        self.encoder = patch.encoder
        self.decoder = patch.decoder
        self.active = True
        self.model_sampling = run.model_sampling
        self.sample_sigmas: list[float] = [float(s) for s in run.run_grid.sigmas]
        self.conv_in_cache: dict[Any, torch.Tensor] = {}
        self.stash: dict[int, dict[Any, torch.Tensor]] = {}  # run step -> chunk key -> output rows
        self.served_entries: set[tuple[int, Any]] = set()
        self.stash_bytes = 0
        self.stash_evaluation = -1
        self.stats = ParallelStats()
        self._logged: set[str] = set()

    def close(self, run: RunContext) -> None:
        self.finish_run()

    def figures(self) -> ParallelStats:
        return self.stats

    def finish_run(self) -> ParallelStats:
        stats = self.stats
        self._drop_all()
        self._clear()
        self.active = False
        self.patch.last_run = self
        if stats.batched_calls or stats.sequential or stats.served:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(stats.fallback_reasons.items()))
            logger.info(
                "%s: parallel decoding ran %d batched decoder calls for %d step slots (batch rows %s), served %d "
                "model calls from them, %d non-key calls ran sequentially%s; %d stashed outputs unused; the stash "
                "held at most %.1f MB%s.", self.holder_name, stats.batched_calls, stats.batched_steps,
                _compact(stats.batch_sizes), stats.served, stats.sequential, f" ({reasons})" if reasons else "",
                stats.unused, stats.peak_stash_bytes / 2**20,
                f"; {stats.memory_capped} batched calls were shortened to fit free memory" if stats.memory_capped
                else "")
        return stats

    def _clear(self) -> None:
        self.conv_in_cache.clear()
        self.stash.clear()
        self.served_entries.clear()
        self.stash_bytes = 0
        self.stash_evaluation = -1

    # -- helpers ----------------------------------------------------------------------------------
    def _acting(self, run: RunContext) -> bool:
        """Whether this decoder acts on the current call: inside an evaluation with the cache's decisions."""
        return self.active and run.in_evaluation and run.computes is not None

    def _key_evaluation(self, run: RunContext) -> bool:
        return bool(run.computes[self.encoder].any())

    def _step_index(self, sigma: float) -> int | None:
        """The run step of the current evaluation if ``sigma`` is that step's own sigma (not a midpoint)."""
        step = self.run.run_step
        if step is None or step >= len(self.sample_sigmas) - 1:
            return None
        value = self.sample_sigmas[step]
        return step if abs(value - sigma) <= SIGMA_RTOL * max(abs(value), abs(sigma)) else None

    def _coming_steps(self, first: int, memory_limit: int) -> list[int]:
        """``first`` and the following run steps the runtime will run without the encoder, at most
        ``max_steps`` and ``memory_limit`` of them."""
        steps = [first]
        limit = min(self.config.max_steps or memory_limit, memory_limit)
        for step in range(first + 1, len(self.sample_sigmas) - 1):
            if limit and len(steps) >= limit:
                break
            if self.sample_sigmas[step] <= 0.0:
                break
            decisions = self.run.planned_computes(step - 1, step)
            if decisions is None or decisions[self.encoder].any():
                break  # a key step: the encoder runs again there
            steps.append(step)
        return steps

    def _memory_limit(self, base_model: Any, x: torch.Tensor) -> int:
        """How many steps' rows one batched call may hold: ComfyUI sized the batch against free memory
        before this call, so the extra rows must fit in what is free now (its own estimate per row)."""
        try:
            import comfy.model_management

            rows = x.shape[0]
            per_rows = float(base_model.memory_required([rows, *x.shape[1:]]))
            free = float(comfy.model_management.get_free_memory(x.device))
        except Exception:  # no estimate (a model without memory_required, an unknown device)
            if "memory" not in self._logged:
                self._logged.add("memory")
                logger.info("%s: parallel decoding: free memory unknown; batched calls hold at most %d steps.",
                            self.holder_name, SAFE_DEFAULT_STEPS)
            return SAFE_DEFAULT_STEPS
        if per_rows <= 0:
            return SAFE_DEFAULT_STEPS
        return max(1, 1 + int(free * FREE_MEMORY_SHARE // per_rows))

    def _note(self, reason: str, message: str | None = None) -> None:
        self.stats.sequential += 1
        self.stats.fallback_reasons[reason] = self.stats.fallback_reasons.get(reason, 0) + 1
        if message is not None and reason not in self._logged:
            self._logged.add(reason)
            logger.info("%s: parallel decoding: %s; such calls run sequentially.", self.holder_name, message)

    def _put(self, step: int, key: Any, rows: torch.Tensor) -> None:
        chunks = self.stash.setdefault(step, {})
        replaced = chunks.get(key)
        if replaced is not None:
            self.stash_bytes -= replaced.numel() * replaced.element_size()
        chunks[key] = rows
        self.stash_bytes += rows.numel() * rows.element_size()
        self.stats.peak_stash_bytes = max(self.stats.peak_stash_bytes, self.stash_bytes)

    def _drop_before(self, step: int) -> None:
        """Frees the stashed outputs of steps before ``step``: sigmas only go down."""
        for old in [s for s in self.stash if s < step]:
            chunks = self.stash.pop(old)
            self.stats.unused += sum((old, key) not in self.served_entries for key in chunks)
            self.stash_bytes -= sum(t.numel() * t.element_size() for t in chunks.values())

    def _drop_all(self) -> None:
        self._drop_before(len(self.sample_sigmas) + 1)

    def _stash_output(self, step: int, keys: list[Any], out: torch.Tensor) -> None:
        per = out.shape[0] // len(keys)
        for chunk, key in enumerate(keys):
            self._put(step, key, out[chunk * per:(chunk + 1) * per].detach().clone())

    def _count_served(self, run: RunContext) -> None:
        # The per-step layer counts sequential decoding would show for this call.
        run.stats.computed[self.decoder] += 1
        run.stats.reused[self.encoder] += 1
        self.stats.served += 1

    # -- conv_in ------------------------------------------------------------------------------------
    def call_patched_layer(self, run: RunContext, call: ModelCall, name: str, module: torch.nn.Module,
                           forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """conv_in's call: reused at a non-key evaluation, cached per chunk at a key one."""
        if not self._acting(run):
            return forward(*args, **kwargs)
        keys = call.chunk_keys
        x = args[0] if args else next(iter(kwargs.values()))
        if not self._key_evaluation(run):
            cached = self._conv_in_cached(keys, x)
            if cached is not None:
                self.stats.conv_in_reused += 1
                return cached
        out = forward(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.shape[0] % len(keys) == 0:
            per = out.shape[0] // len(keys)
            for chunk, key in enumerate(keys):
                if chunk == keys.index(key):  # a repeated (batched) key: its first block of rows
                    self.conv_in_cache[key] = out[chunk * per:(chunk + 1) * per].detach().clone()
        return out

    def _conv_in_cached(self, keys: list[Any], x: Any) -> torch.Tensor | None:
        parts = [self.conv_in_cache.get(key) for key in keys]
        if any(part is None for part in parts) or not isinstance(x, torch.Tensor):
            return None
        if sum(part.shape[0] for part in parts) != x.shape[0] or parts[0].shape[2:] != x.shape[2:]:
            return None  # another batch or resolution than when cached
        out = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        if out.device != x.device or out.dtype != x.dtype:
            out = out.to(device=x.device, dtype=x.dtype)
        return out

    # -- the diffusion model ------------------------------------------------------------------------
    def around_diffusion_model(self, run: RunContext, call: ModelCall, proceed: Callable[..., Any], args: tuple,
                               kwargs: dict, others_inside: bool) -> Any:
        if not self._acting(run) or len(args) < 6 or not isinstance(args[5], dict):
            return proceed(*args, **kwargs)
        x, transformer_options = args[0], args[5]
        sigmas = transformer_options.get("sigmas")
        keys = list(call.chunk_keys)
        if not isinstance(sigmas, torch.Tensor) or x.shape[0] % len(keys) != 0:
            return proceed(*args, **kwargs)
        sigma = float(sigmas.reshape(-1)[0])
        step = self._step_index(sigma)
        if self._key_evaluation(run):
            evaluation = run.stats.evaluations
            if self.stash_evaluation != evaluation:
                self._drop_all()  # new encoder features: everything stashed is stale
                self.stash_evaluation = evaluation
            out = proceed(*args, **kwargs)
            if self.config.batched and step is not None and isinstance(out, torch.Tensor):
                self._stash_output(step, keys, out)  # Heun evaluates this sigma again
                self.served_entries.update((step, key) for key in keys)  # not work done ahead: never "unused"
            return out
        if not self.config.batched:
            return proceed(*args, **kwargs)
        if step is None:
            self._note("sigma off the schedule", f"a sampler evaluated at sigma {sigma:.4g}, which is not a step "
                                                  "of the schedule (a midpoint or a restart)")
            return proceed(*args, **kwargs)
        served = self._serve(step, keys, x)
        if served is not None:
            self._count_served(run)
            return served
        reason = self._cannot_batch(others_inside, args, keys, x)
        if reason is not None:
            self._note(*reason)
            return proceed(*args, **kwargs)
        return self._decode_batch(run, call.base_model, proceed, args, kwargs, step, keys)

    def _serve(self, step: int, keys: list[Any], x: torch.Tensor) -> torch.Tensor | None:
        self._drop_before(step)
        chunks = self.stash.get(step)
        if chunks is None:
            return None
        parts = [chunks.get(key) for key in keys]
        if any(part is None for part in parts):
            return None
        if sum(part.shape[0] for part in parts) != x.shape[0] or parts[0].shape[2:] != x.shape[2:]:
            return None
        self.served_entries.update((step, key) for key in keys)
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def _cannot_batch(self, others_inside: bool, args: tuple, keys: list[Any],
                      x: torch.Tensor) -> tuple[str, Any] | None:
        if others_inside:
            return ("inner wrapper", "another node's DIFFUSION_MODEL wrapper runs inside this one and would see "
                                     "a batch of several steps (apply that node before Apply Block Cache)")
        if args[4] is not None:
            return ("control", "ControlNet / T2I-Adapter residuals are computed from each step's latent, so "
                               "later steps cannot be decoded ahead")
        if self.patch.holder.corrections is not None:
            return ("scale-shift", "the schedule's scale-shift corrections depend on the step")
        parts = [self.conv_in_cache.get(key) for key in keys]
        if any(part is None for part in parts) or sum(part.shape[0] for part in parts) != x.shape[0]:
            return ("no conv_in cache", None)  # a chunk new since the key step: it computes its encoder now
        return None

    def _decode_batch(self, run: RunContext, base_model: Any, proceed: Callable[..., Any], args: tuple, kwargs: dict,
                      first: int, keys: list[Any]) -> torch.Tensor:
        x, timesteps, context, y, control, transformer_options = args[:6]
        rows = x.shape[0]
        memory_limit = self._memory_limit(base_model, x)
        steps = self._coming_steps(first, memory_limit)
        if len(steps) >= memory_limit and len(self._coming_steps(first, memory_limit + 1)) > len(steps):
            self.stats.memory_capped += 1
            if "memory cap" not in self._logged:
                self._logged.add("memory cap")
                logger.info("%s: parallel decoding: batched calls capped at %d steps (%d rows) to fit the free "
                            "memory ComfyUI reports.", self.holder_name, memory_limit, memory_limit * rows)
        repeat = len(steps)
        sigma_type = transformer_options["sigmas"]
        step_sigmas = torch.tensor([self.sample_sigmas[s] for s in steps], dtype=sigma_type.dtype)
        step_sigmas = step_sigmas.to(sigma_type.device).repeat_interleave(rows)
        batch_timesteps = self.model_sampling.timestep(step_sigmas).float().to(device=timesteps.device,
                                                                                  dtype=timesteps.dtype)
        if not torch.allclose(batch_timesteps[:rows], timesteps.reshape(-1), rtol=1e-5, atol=1e-6):
            self._note("timesteps", "the model's timesteps are not model_sampling.timestep(sigma)")
            return proceed(*args, **kwargs)

        def tile(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows:
                return value.repeat(repeat, *([1] * (value.ndim - 1)))
            if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
                return [tile(v) for v in value]
            return value

        options = dict(transformer_options)
        for name in ("cond_or_uncond", "uuids"):
            if isinstance(options.get(name), list):
                options[name] = options[name] * repeat
        batch_args = (tile(x), batch_timesteps, tile(context), tile(y), control, options, *args[6:])
        batch_kwargs = {name: tile(value) for name, value in kwargs.items()}
        with run.model_call(keys * repeat, base_model):
            out = proceed(*batch_args, **batch_kwargs)
        self.stats.batched_calls += 1
        self.stats.batched_steps += repeat
        self.stats.batch_sizes.append(rows * repeat)
        for index, step in enumerate(steps[1:], start=1):
            self._stash_output(step, keys, out[index * rows:(index + 1) * rows])
        # This call's own rows: also kept, for a second evaluation at the same sigma (Heun).
        self._stash_output(first, keys, out[:rows])
        self.served_entries.update((first, key) for key in keys)
        return out[:rows].clone()


def _compact(values: list[int]) -> str:
    if not values:
        return "-"
    shown = ", ".join(str(v) for v in values[:12])
    return shown + (f", ... ({len(values)} in all)" if len(values) > 12 else "")
