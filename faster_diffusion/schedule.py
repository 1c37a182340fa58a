"""Faster Diffusion's encoder propagation as a cache schedule (Li et al., NeurIPS 2024, arXiv 2312.09608).

The model is split into an *encoder* and a *decoder*. At key steps everything computes; at the
other steps every encoder layer returns its output cached at the last key step (ReuseMode.OUTPUT)
and only the decoder runs, with the current timestep embedding. No new runtime is needed: the
Block Cache runtime already reuses OUTPUT-mode layers by returning a copy of their cached output,
so a UNet decoder gets exactly the cached skip features and bottleneck.

* UNet: the encoder is every input_blocks and middle_block layer (conv_in always runs: it is
  cheap and not in the block map); the decoder is every output_blocks layer.
* DiT: the first ``encoder_ratio`` of the blocks in execution order (the paper: 18 of 28 for DiT-XL).

Key steps are step indices of the schedule's grid; step 0 is always one. The runtime re-times a
schedule to another step count or sampler by normalized time, as for any schedule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ..block_caching.profile import BlockProfile
from ..block_caching.schedule import CacheSchedule, LayerSchedule
from ..block_maps.block_map import BlockMap, ReuseMode
from ..runtime.time_grid import StepGrid

logger = logging.getLogger(__name__)

DEFAULT_ENCODER_RATIO = 18 / 28  # DiT-XL: the first 18 of 28 blocks act as the encoder
UNET_ENCODER_STAGES = frozenset({"input", "middle"})


@dataclass(frozen=True)
class KeyStepPreset:
    """The paper's key steps: step indices of a ``reference_steps``-step run."""

    name: str
    reference_steps: int
    indices: tuple[int, ...]
    description: str


# SD, DDIM 50 steps: indices as published.
PAPER_DDIM_50 = KeyStepPreset("paper_ddim_50", 50, (0, 1, 2, 3, 5, 10, 15, 25, 35),
                              "SD, DDIM 50 steps: [0, 1, 2, 3, 5, 10, 15, 25, 35] (9 encoder passes)")
# SD, DPM-Solver(++) 20 steps: published as {20, 19, 18, 17, 15, 10, 5} in timestep-count terms,
# i.e. the number of steps still to run when the step starts. Step index = 20 - count.
_DPM_COUNTS = (20, 19, 18, 17, 15, 10, 5)
PAPER_DPM_SOLVER_20 = KeyStepPreset("paper_dpm_solver_20", 20, tuple(sorted(20 - c for c in _DPM_COUNTS)),
                                    "SD, DPM-Solver 20 steps: counts {20,19,18,17,15,10,5} = indices "
                                    "[0, 1, 2, 3, 5, 10, 15] (7 encoder passes)")
PRESETS: dict[str, KeyStepPreset] = {p.name: p for p in (PAPER_DDIM_50, PAPER_DPM_SOLVER_20)}

KEY_STEPS_AUTO = "paper (auto)"
KEY_STEPS_UNIFORM = "uniform stride"
KEY_STEPS_CUSTOM = "custom"
KEY_STEP_MODES = (KEY_STEPS_AUTO, PAPER_DDIM_50.name, PAPER_DPM_SOLVER_20.name, KEY_STEPS_UNIFORM, KEY_STEPS_CUSTOM)


def preset_for_steps(steps: int) -> KeyStepPreset:
    """'paper (auto)': the preset whose reference step count is nearer (in ratio) to ``steps``."""
    return PAPER_DPM_SOLVER_20 if steps <= math.sqrt(20 * 50) else PAPER_DDIM_50


def map_preset(preset: KeyStepPreset, grid: StepGrid) -> tuple[int, ...]:
    """The preset's key steps on ``grid``.

    On a grid of the preset's own length the indices are taken as published. On any other grid
    each key step is mapped by normalized time: the paper's samplers space their timesteps
    uniformly, so reference step k starts at normalized time 1 - k / N_ref; it becomes the grid
    step whose start time is nearest (ties to the earlier step). Keys landing on one step merge.
    """
    if grid.steps == preset.reference_steps:
        return tuple(preset.indices)
    keys = set()
    for k in preset.indices:
        tau = 1.0 - k / preset.reference_steps
        keys.add(min(range(grid.steps), key=lambda j, tau=tau: (abs(grid.taus[j] - tau), j)))
    return tuple(sorted(keys | {0}))


def parse_key_steps(text: str) -> tuple[int, ...]:
    """'0, 1, 2, 5, 10' -> (0, 1, 2, 5, 10). Raises ValueError naming the bad entry."""
    values = []
    for part in text.replace(";", ",").replace(" ", ",").split(","):
        if not part:
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f"key steps must be whole step numbers separated by commas; {part!r} is not") from None
    return tuple(values)


@dataclass(frozen=True)
class FasterDiffusionOptions:
    key_steps: str = KEY_STEPS_AUTO  # one of KEY_STEP_MODES
    stride: int = 5  # for KEY_STEPS_UNIFORM: a key step every ``stride`` steps
    custom_key_steps: tuple[int, ...] = field(default_factory=tuple)  # for KEY_STEPS_CUSTOM: grid step indices
    encoder_ratio: float = DEFAULT_ENCODER_RATIO  # DiT only: the share of blocks that act as the encoder

    def validate(self) -> None:
        if self.key_steps not in KEY_STEP_MODES:
            raise ValueError(f"key_steps must be one of {', '.join(KEY_STEP_MODES)}, got {self.key_steps!r}")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {self.stride!r}")
        if not (isinstance(self.encoder_ratio, (int, float)) and 0.0 <= self.encoder_ratio < 1.0):
            raise ValueError(f"encoder_ratio must be in [0, 1) (at least one decoder block), got {self.encoder_ratio!r}")
        if self.key_steps == KEY_STEPS_CUSTOM and not self.custom_key_steps:
            raise ValueError("key_steps 'custom' needs a list of step numbers, e.g. '0, 1, 2, 3, 5, 10, 15'")


def resolve_key_steps(grid: StepGrid, options: FasterDiffusionOptions) -> tuple[int, ...]:
    """Sorted, distinct key-step indices on ``grid``; step 0 is always included."""
    options.validate()
    steps = grid.steps
    if options.key_steps == KEY_STEPS_UNIFORM:
        keys = set(range(0, steps, options.stride))
    elif options.key_steps == KEY_STEPS_CUSTOM:
        outside = sorted(k for k in options.custom_key_steps if not 0 <= k < steps)
        if outside:
            raise ValueError(f"key steps {outside} are outside this {steps}-step grid (steps are numbered 0 to "
                             f"{steps - 1})")
        keys = set(options.custom_key_steps)
    else:
        preset = preset_for_steps(steps) if options.key_steps == KEY_STEPS_AUTO else PRESETS[options.key_steps]
        keys = set(map_preset(preset, grid))
    return tuple(sorted(keys | {0}))


def encoder_mask(block_map: BlockMap, encoder_ratio: float = DEFAULT_ENCODER_RATIO) -> tuple[bool, ...]:
    """Per layer of ``block_map``: does it belong to the encoder?"""
    if block_map.family == "unet":
        return tuple(spec.stage in UNET_ENCODER_STAGES for spec in block_map.layers)
    count = len(block_map.layers)
    # At least one block must stay in the decoder, or non-key steps would return a frozen output.
    encoder = min(count - 1, round(encoder_ratio * count))
    return tuple(i < encoder for i in range(count))


def _flops_from_profile(block_map: BlockMap, profile: BlockProfile | None) -> tuple[tuple[float, ...], float, str]:
    if profile is None:
        return (0.0,) * len(block_map.layers), 0.0, "none"
    by_name = dict(zip((spec.name for spec in profile.block_map.layers), profile.layer_flops, strict=True))
    missing = [spec.name for spec in block_map.layers if spec.name not in by_name]
    if missing:
        raise ValueError(f"the profile was made for another model: it has no layer {missing[0]} "
                         f"({len(missing)} layers missing). Profile this model.")
    return tuple(float(by_name[spec.name]) for spec in block_map.layers), float(profile.total_flops), "profile"


def build_faster_diffusion_schedule(block_map: BlockMap, grid: StepGrid,
                                    options: FasterDiffusionOptions | None = None,
                                    profile: BlockProfile | None = None,
                                    provenance: dict[str, Any] | None = None) -> CacheSchedule:
    """Encoder propagation: encoder layers compute at key steps only (OUTPUT reuse), the decoder always.

    FLOPs per layer come from ``profile`` (measured by Profile Block Changes) when given; without
    one they are 0 and the schedule's FLOP estimate reads 1.0x (unknown), while the computed
    fraction of layer evaluations is still exact.
    """
    options = options or FasterDiffusionOptions()
    keys = resolve_key_steps(grid, options)
    key_mask = tuple(step in keys for step in range(grid.steps))
    encoder = encoder_mask(block_map, options.encoder_ratio)
    layer_flops, total_flops, flops_source = _flops_from_profile(block_map, profile)
    layers = []
    for spec, in_encoder in zip(block_map.layers, encoder, strict=True):
        # OUTPUT reuse is what the method means: the decoder gets the key step's features as they were.
        compute = key_mask if in_encoder else (True,) * grid.steps
        layers.append(LayerSchedule(name=spec.name, kind=spec.kind, reuse=ReuseMode.OUTPUT, compute=compute))
    builder = {
        "method": "faster_diffusion",
        "key_steps_mode": options.key_steps,
        "key_steps": list(keys),
        "stride": options.stride,
        "custom_key_steps": list(options.custom_key_steps),
        "encoder_ratio": options.encoder_ratio if block_map.family != "unet" else None,
        "encoder_layers": int(sum(encoder)),
        "decoder_layers": len(encoder) - int(sum(encoder)),
        "flops_source": flops_source,
    }
    schedule = CacheSchedule(block_map=block_map, grid=grid, layers=tuple(layers), layer_flops=layer_flops,
                             total_flops=total_flops, builder=builder, provenance=dict(provenance or {}))
    logger.info("Faster Diffusion: %d encoder / %d decoder layers, key steps %s of %d; %s", builder["encoder_layers"],
                builder["decoder_layers"], list(keys), grid.steps, schedule.summary())
    return schedule


def grid_for_model(model: Any, steps: int, sampler: str, scheduler: str, denoise: float = 1.0) -> StepGrid:
    """The step grid KSampler would run ``model`` on (same sigmas, denoise handled as KSampler does)."""
    import comfy.samplers

    model_sampling = model.get_model_object("model_sampling")
    if denoise <= 0.0:
        raise ValueError("denoise must be > 0")
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, total).cpu()
    sigmas = sigmas[-(steps + 1):]
    return StepGrid.from_sigmas(model_sampling, sigmas, sampler=sampler, scheduler=scheduler, denoise=float(denoise))
