"""Benchmark: Block Cache against fewer steps and every other cache rule, on the trained reference model.

Part 1, fidelity at equal cost, for each sampler setting (euler/normal 20, dpmpp_2m/karras 25,
ddim/ddim_uniform 50; cfg 5). The profile is taken on 4 prompts and seeds that no evaluation
uses; every method is then evaluated on two disjoint sets of 16 prompt x seed pairs (A and B),
so each verdict is checked twice. For each method:

* FLOPs: torch's FlopCounterMode around the whole sampling call (set B), against no cache;
* fidelity: PSNR and SSIM of the pictures against the uncached pictures of the same prompt and
  seed (mean and worst case), on A and on B;
* wall-clock: the sampling time on set A against the nearest uncached timing of the same run.

Methods: no cache; fewer steps (same sampler and scheduler); Block Cache's speed-up target
(the Build node's default and a sweep, forecast order auto, and order 0 as an ablation); Block
Cache's threshold rule (Eq. 7); FORA (uniform interval, reuse as-is), TaylorSeer (uniform
interval + forecast), DeepCache, First Block Cache (bench_peers.py); ComfyUI's EasyCache and
LazyCache; Faster Diffusion. Then the Pareto table: per fidelity floor (35 / 30 / 27 dB mean
PSNR) and per family, the best FLOP speed-up that stays above it.

Part 2, a full-size SD1.5-structured UNet (random weights, fp32, 256x256, CPU): the overhead of
an all-compute schedule against no patch, achieved / ideal speed-up, and the cache's peak memory.

With ``--model dit`` the same benchmark runs on the transformer reference model (a trained
Flux, demo_models/reference_dit.py) at euler/simple 20 and 28 steps: DeepCache (a UNet rule)
gives way to a TeaCache-style rule (bench_peers.py), Faster Diffusion uses its DiT encoder split,
and Part 2 (a UNet) is skipped.

With ``--model video`` it runs on the video reference model (a trained Wan 2.1,
demo_models/reference_video.py, 8-frame clips) at euler/simple 30 and 50 steps. PSNR and SSIM are
per clip (all frames), plus the worst frame's PSNR and a temporal figure: the PSNR of the
frame-to-frame differences against the uncached clip's. TeaCache reads Wan's time modulation, and
MagCache's Wan rule joins (bench_peers.py); a two-expert row samples the run as Wan 2.2 does, in two
KSamplerAdvanced segments split at Wan 2.2's boundary sigma (the same trained model as both experts),
each segment with its own profile and schedule at the default target. The ablations measured on
the image models (measured choice, order 0, threshold rule) are left out for time. It also writes
preview.gif: uncached, the default and fewer steps at its cost, side by side.

Writes results.json, table.md and one quality_vs_speedup_<setting>.png per setting to --out.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark.py --out out/bench      (make bench)
    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark.py --model dit --out out/bench_dit      (make bench-dit)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_peers
import torch
from comfy_bootstrap import PACK_MODULE, load_pack
from plotting import Series, plot
from torch.utils.flop_counter import FlopCounterMode

SETTINGS: dict[str, tuple[str, str, int]] = {
    "euler20": ("euler", "normal", 20),
    "dpmpp2m25": ("dpmpp_2m", "karras", 25),
    "ddim50": ("ddim", "ddim_uniform", 50),
}
# The transformer reference samples as Flux workflows do: euler/simple.
DIT_SETTINGS: dict[str, tuple[str, str, int]] = {
    "euler20": ("euler", "simple", 20),
    "euler28": ("euler", "simple", 28),
}
VIDEO_SETTINGS: dict[str, tuple[str, str, int]] = {
    "euler30": ("euler", "simple", 30),
    "euler50": ("euler", "simple", 50),
}
WAN22_BOUNDARY_SIGMA = 0.875  # Wan 2.2 T2V hands over from the high- to the low-noise expert here


@dataclasses.dataclass(frozen=True)
class RuleGrid:
    """The settings of the other rules that a model's benchmark sweeps."""

    intervals: tuple[int, ...] = (2, 3, 4)  # FORA, TaylorSeer, DeepCache
    taylor_orders: tuple[int, ...] = (1, 2)
    fbcache: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    teacache: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3)  # on the fitted scale: about 0.03-0.2 per step
    easycache: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)  # EasyCache's and LazyCache's reuse_threshold
    magcache: tuple[tuple[float, int], ...] = ()  # (threshold, K); its Wan default is 0.12, 2


# Video costs 8 frames a clip: fewer settings of the rules the image benchmarks ruled out (TaylorSeer order 2,
# interval 4), EasyCache's lowest threshold (it skipped nothing on a trial run), First Block Cache's low ones.
VIDEO_RULES = RuleGrid(intervals=(2, 3), taylor_orders=(1,), fbcache=(0.3, 0.6), teacache=(0.05, 0.1, 0.15, 0.2, 0.3),
                       easycache=(0.1, 0.2, 0.4), magcache=((0.03, 2), (0.06, 2), (0.12, 2), (0.24, 2)))


@dataclasses.dataclass(frozen=True)
class ReferenceSetup:
    module: str  # in demo_models
    loader: str
    settings: dict[str, tuple[str, str, int]]
    description: str
    prompts: str  # the demo_models module whose benchmark_prompts() gives the prompt sets
    video: bool = False
    rules: RuleGrid = RuleGrid()


MODELS: dict[str, ReferenceSetup] = {
    "unet": ReferenceSetup("reference_model", "load_reference_model", SETTINGS, "Reference model (UNet)",
                           "reference_data"),
    "dit": ReferenceSetup("reference_dit", "load_reference_dit", DIT_SETTINGS, "Transformer reference model (Flux)",
                          "reference_data"),
    "video": ReferenceSetup("reference_video", "load_reference_video", VIDEO_SETTINGS,
                            "Video reference model (Wan 2.1, 8 frames)", "reference_clips", video=True,
                            rules=VIDEO_RULES),
}
VIDEO_SKIPPED = {"block_cache_measured", "block_cache_order0", "block_cache_threshold"}
MIN_SPEEDUP, MAX_SPEEDUP = 1.4, 6.0  # the range of Block Cache's ladder that is swept
MAX_RUNGS = 14
ORDER0_SPEEDUPS = (2.0, 3.0)
FLOORS = (35.0, 30.0, 27.0)
# Prompt sets (reference_data.benchmark_prompts seeds) and sampling seeds: disjoint for profile, A and B.
PROFILE_SET = (99, 1001)
EVAL_SETS = {"A": (1234, 1), "B": (4242, 2)}
FAMILY_LABELS = {
    "block_cache": "Block Cache (speed-up target)",
    "block_cache_measured": "Block Cache, chosen by measured PSNR",
    "block_cache_floor": "Block Cache default, 30 dB floor (the Build node's)",
    "block_cache_best": "Block Cache default, best of cache / fewer steps / both",
    "block_cache_order0": "Block Cache, order 0 (no forecast)",
    "block_cache_threshold": "Block Cache threshold (Eq. 7)",
    "fewer_steps": "fewer steps",
    "fora": "FORA (uniform, reuse)",
    "taylorseer": "TaylorSeer (uniform + forecast)",
    "deepcache": "DeepCache rule",
    "fbcache": "First Block Cache rule",
    "teacache": "TeaCache rule",
    "magcache": "MagCache rule",
    "easycache": "EasyCache (core)",
    "lazycache": "LazyCache (core)",
    "faster_diffusion": "Faster Diffusion",
    "block_cache_two_experts": "Block Cache default, two experts (Wan 2.2 layout)",
    "block_cache_two_experts_measured": "Block Cache default, two experts, each segment measured",
}
# Where each module named in the scripts lives in the pack.
PACKAGES = {
    **dict.fromkeys(("reference_model", "reference_dit", "reference_video", "reference_data", "reference_clips",
                     "builtin_models"), "demo_models"),
    **dict.fromkeys(("patching", "schedule", "target_schedule", "target_ladder", "target_build", "replay", "cache",
                     "profile", "fidelity", "calibration", "forecast", "target_outcome", "lookahead", "target_lookahead"), "block_caching"),
    **dict.fromkeys(("parallel_decoding", "noise_injection"), "faster_diffusion"),
    **dict.fromkeys(("mapping", "block_map"), "block_maps"),
}
# The rows the goal compares against (everything that is not Block Cache's own builder).
OTHERS = ("fewer_steps", "fora", "taylorseer", "deepcache", "fbcache", "teacache", "magcache", "easycache",
          "lazycache", "faster_diffusion")


def setting_named(settings: dict[str, tuple[str, str, int]], name: str) -> tuple[str, str, int]:
    """A model's setting by name, or one outside them written SAMPLER/SCHEDULER/STEPS (e.g. euler/normal/28)."""
    if name in settings:
        return settings[name]
    try:
        sampler, scheduler, steps = name.split("/")
        return sampler, scheduler, int(steps)
    except ValueError:
        raise ValueError(f"no setting {name!r}: one of {', '.join(settings)}, or SAMPLER/SCHEDULER/STEPS") from None


def _module(name: str) -> Any:
    """A pack module by its name; ``faster_diffusion`` is that method's schedule builder."""
    if name == "faster_diffusion":
        return importlib.import_module(f"{PACK_MODULE}.faster_diffusion.schedule")
    return importlib.import_module(f"{PACK_MODULE}.{PACKAGES[name]}.{name}")


# ---- quality -------------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per picture, for pictures in [0, 1] (B x C x H x W); capped at 100 dB where identical."""
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per picture SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, per channel, valid region."""
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = (g / g.sum()).to(a.dtype)
    window = (g[:, None] * g[None, :]).expand(a.shape[1], 1, 11, 11).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, window, groups=a.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1)


def clip_metrics(clips: torch.Tensor, uncached: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per picture or clip (B x C x [T x] H x W in [0, 1]): PSNR, SSIM (the mean over frames), and for
    clips the worst frame's PSNR and the temporal PSNR (of the frame-to-frame differences)."""
    if clips.ndim == 4:
        return {"psnr": psnr(clips, uncached), "ssim": ssim(clips, uncached)}
    frames = clips.shape[2]

    def as_frames(x: torch.Tensor) -> torch.Tensor:
        return x.movedim(2, 1).flatten(0, 1)

    per_frame = psnr(as_frames(clips), as_frames(uncached)).view(-1, frames)
    motion, uncached_motion = clips.diff(dim=2), uncached.diff(dim=2)
    return {"psnr": psnr(clips, uncached), "ssim": ssim(as_frames(clips), as_frames(uncached)).view(-1, frames).mean(1),
            "psnr_worst_frame": per_frame.min(1).values, "temporal_psnr": psnr(motion, uncached_motion)}


def _pictures(latent: torch.Tensor) -> torch.Tensor:
    """The pixel-space VAE's decode: [-1, 1] -> [0, 1] (comfy/sd.py VAE.process_output)."""
    return ((latent.float() + 1) / 2).clamp(0, 1)


# ---- part 1: fidelity at equal cost -----------------------------------------------------------------

@dataclasses.dataclass
class Method:
    name: str
    family: str
    setting: str  # the knob, e.g. "2.39x" or "12 steps"
    make: Callable[[], tuple[Any, int]]  # -> (model to sample with, steps)
    knob: float = 0.0  # for ordering a family's curve
    # Samples (positive, latent, seed) itself, where one model and one sampler call do not (two experts).
    sample: Callable[[Any, dict, int], torch.Tensor] | None = None


def _methods(setup: ReferenceSetup, reference: Any, profile: Any, steps: int, sampler: str, scheduler: str,
             max_rungs: int = MAX_RUNGS, wanted: Callable[[str], bool] = lambda family: True) -> list[Method]:
    """The rows of one setting; only the families `wanted` says, so that a re-run of some rows builds no other
    schedule (building the target's schedules samples the profiled run again)."""
    import comfy_extras.nodes_easycache as easycache

    patching = _module("patching")
    schedule_mod = _module("schedule")
    target = _module("target_schedule")
    target_ladder, target_build = _module("target_ladder"), _module("target_build")
    outcome_module = _module("target_outcome")
    replay_module = _module("replay")
    faster_diffusion = _module("faster_diffusion")
    mapping = _module("mapping")
    model = reference.patcher
    methods = [Method("no cache", "none", "", lambda: (model, steps))]
    rules = setup.rules
    for n in _fewer_steps(steps, setup.video) if wanted("fewer_steps") else ():
        methods.append(Method(f"fewer steps {n}", "fewer_steps", f"{n} steps", lambda n=n: (model, n), knob=n))

    def apply(schedule: Any) -> Callable[[], tuple[Any, int]]:
        return lambda: (patching.apply_block_cache(model, schedule)[0], steps)

    # The held-out seeds' uncached pictures, sampled once for all rows.
    validation = replay_module.HeldOutValidation.of(profile.replays)
    measure = validation.runs.schedule
    ladder, _, _ = target_ladder.build_ladder(profile, target_build.TargetOptions())
    # Every rung the speed-up slider can reach in the benchmark's range, and the default.
    default_rung = target_ladder.choose_rung(ladder, target_build.DEFAULT_SPEEDUP)
    rungs = [1.0 / r.flop_fraction for r in ladder if MIN_SPEEDUP <= 1.0 / r.flop_fraction <= MAX_SPEEDUP
             and r != default_rung]
    stride = max(1, math.ceil(len(rungs) / max_rungs))  # long grids: every stride-th rung
    targets = sorted(set(rungs[::stride]) | {target_build.DEFAULT_SPEEDUP})
    for index, speedup in enumerate(targets):
        default = speedup == target_build.DEFAULT_SPEEDUP
        label = f"{speedup:.2f}x" if not default else (f"{1 / default_rung.flop_fraction:.2f}x (default, "
                                                       f"{target_build.DEFAULT_SPEEDUP:g}x target)")
        for family in ("block_cache", "block_cache_measured"):
            if not wanted(family) or (family == "block_cache_measured" and not default and index % 2):
                continue  # the ablation at every other point is enough
            options = target_build.TargetOptions(speedup=speedup - 1e-9)
            schedule = target.build_target_schedule(profile, options, measure,
                                                    choose_by_measure=family == "block_cache_measured")
            chosen = f"{label}: {_chosen_rung(schedule)}"
            methods.append(Method(f"{FAMILY_LABELS[family]} {label}", family, chosen, apply(schedule), knob=speedup))
    if wanted("block_cache_floor") or wanted("block_cache_best"):
        # The Build node as it comes: the default target, stepped down where the profiled run measures below the
        # floor.
        floor_options = target_build.TargetOptions(min_psnr=target_build.DEFAULT_MIN_PSNR)
        schedule = outcome_module.build_for_node(profile, floor_options).schedule
        stepped = schedule.builder["stepped_down_from"]
        chosen = (f"{schedule.estimated_speedup:.2f}x: {_chosen_rung(schedule)}"
                  + (f" (stepped down from {stepped['speedup']:.2f}x)" if stepped else ""))
        if wanted("block_cache_floor"):
            methods.append(Method(f"{FAMILY_LABELS['block_cache_floor']} {schedule.estimated_speedup:.2f}x",
                                  "block_cache_floor", chosen, apply(schedule), knob=schedule.estimated_speedup))
    if wanted("block_cache_best"):
        # The Build node with fewer_steps = 'best of cache, fewer steps, or both': the default target and floor,
        # choosing between the floor's schedule above, fewer steps at its cost, and the two together.
        choices, _ = target.sampling_choices(profile, floor_options, schedule,
                                             lambda count: replay_module.profile_again(profile, count), measure,
                                             validation.second.schedule)
        best = target.best_choice(choices, floor_options.speedup, floor_options.min_psnr)
        methods.append(Method(f"{FAMILY_LABELS['block_cache_best']} {best.speedup:.2f}x", "block_cache_best",
                              f"{best.label}, {best.speedup:.2f}x",
                              lambda best=best: (patching.apply_block_cache(model, best.schedule)[0], best.steps),
                              knob=best.speedup))
    for speedup in ORDER0_SPEEDUPS if wanted("block_cache_order0") else ():
        schedule = target.build_target_schedule(profile, target_build.TargetOptions(speedup=speedup, forecast_order=0),
                                                measure)
        methods.append(Method(f"Block Cache {speedup:g}x order 0", "block_cache_order0", f"{speedup:g}x",
                              apply(schedule), knob=speedup))
    for kinds, threshold in (("attention", 0.5), ("all", 0.25), ("all", 0.5)) if wanted("block_cache_threshold") else ():
        schedule = schedule_mod.build_schedule(profile, schedule_mod.BuildOptions(threshold=threshold,
                                                                                  cache_kinds=kinds))
        methods.append(Method(f"Block Cache threshold {kinds} δ={threshold:g}", "block_cache_threshold",
                              f"{kinds} δ={threshold:g}", apply(schedule), knob=threshold))
    base = schedule_mod.build_schedule(profile, schedule_mod.BuildOptions(threshold=0.0, cache_kinds="all"))
    unet = profile.block_map.family == "unet"
    outer = bench_peers.outer_layer_names(model, mapping) if unet else set()
    for k in rules.intervals:
        if wanted("fora"):
            methods.append(Method(f"FORA every {k}", "fora", f"every {k}",
                                  apply(bench_peers.interval_schedule(base, k)), knob=k))
        for order in rules.taylor_orders if wanted("taylorseer") else ():
            methods.append(Method(f"TaylorSeer every {k} order {order}", "taylorseer", f"every {k}, order {order}",
                                  apply(bench_peers.interval_schedule(base, k, order=order)), knob=k + order / 10))
        if unet and wanted("deepcache"):  # DeepCache's rule is defined on a UNet's skip branch
            methods.append(Method(f"DeepCache every {k}", "deepcache", f"every {k}",
                                  apply(bench_peers.interval_schedule(base, k, keep=lambda name: name in outer)),
                                  knob=k))
    for threshold in rules.fbcache if wanted("fbcache") else ():
        methods.append(Method(f"First Block Cache {threshold:g}", "fbcache", f"threshold {threshold:g}",
                              lambda t=threshold: (bench_peers.first_block_cache(patching, model, base, t)[0], steps),
                              knob=threshold))
    # TeaCache's indicator: Flux's modulated input of the first double block, Wan's time modulation.
    if not unet and wanted("teacache"):
        layer, indicator = (("blocks.0", bench_peers.wan_time_modulation) if setup.video
                            else ("double_blocks.0", bench_peers.flux_modulated_input))
        # Fitted on the profiling prompts' uncached run, as TeaCache fits its polynomial per model.
        coefficients = bench_peers.fit_teacache_polynomial(model, profile.replays[0].sample, layer, indicator)
        for threshold in rules.teacache:
            methods.append(Method(
                f"TeaCache {threshold:g}", "teacache", f"rel_l1_thresh {threshold:g}",
                lambda t=threshold: (bench_peers.teacache(patching, model, base, t, coefficients, indicator)[0], steps),
                knob=threshold))
    if setup.video and wanted("magcache"):  # MagCache's Wan rule, calibrated on the profiling prompts' uncached run
        blocks = len(model.get_model_object("diffusion_model").blocks)
        ratios = bench_peers.fit_magnitude_ratios(model, profile.replays[0].sample, "blocks.0", f"blocks.{blocks - 1}")
        for threshold, max_skips in rules.magcache:
            methods.append(Method(
                f"MagCache {threshold:g} K={max_skips}", "magcache", f"magcache_thresh {threshold:g}, K {max_skips}",
                lambda t=threshold, k=max_skips: (bench_peers.magcache(patching, model, base, t, ratios, k)[0], steps),
                knob=threshold + max_skips / 100))
    for family, node in (("easycache", easycache.EasyCacheNode), ("lazycache", easycache.LazyCacheNode)):
        for threshold in rules.easycache if wanted(family) else ():
            methods.append(Method(f"{node.__name__.removesuffix('Node')} {threshold:g}", family,
                                  f"reuse_threshold {threshold:g}",
                                  lambda n=node, t=threshold: (bench_peers.easycache(model, n, t), steps),
                                  knob=threshold))
    if wanted("faster_diffusion"):
        grid = faster_diffusion.grid_for_model(model, steps, sampler, scheduler)
        schedule = faster_diffusion.build_faster_diffusion_schedule(profile.block_map, grid,
                                                                    faster_diffusion.FasterDiffusionOptions(),
                                                                    profile=profile)
        keys = ",".join(str(k) for k in schedule.builder["key_steps"])
        methods.append(Method("Faster Diffusion", "faster_diffusion", f"key steps {keys}", apply(schedule)))
    return methods


def two_experts_methods(reference: Any, positive: Any, latent: dict, negative: Any, cfg: float,
                        sampler: str, scheduler: str, steps: int, wanted: Callable[[str], bool]) -> list[Method]:
    """Wan 2.2's layout: a high-noise expert samples the steps above the boundary sigma, a low-noise expert
    the rest, in two KSamplerAdvanced segments (here one trained model as both). Each expert is profiled
    on its own segment of the profiling prompts' run and cached by the default target's schedule for it:
    recorded (Record / Collect Block Changes: nothing measured, the video rule), or profiled as Profile Block
    Changes (Advanced) does, each segment's schedule measured by sampling it again (the low-noise one through
    the high-noise one) as Build Cache Schedule does by default (30 dB floor)."""
    import comfy.samplers
    import nodes as comfy_nodes

    patching, target = _module("patching"), _module("target_schedule")
    target_build, replay_module = _module("target_build"), _module("replay")
    model = reference.patcher
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).tolist()
    split = next(i for i, sigma in enumerate(sigmas) if sigma < WAN22_BOUNDARY_SIGMA)

    def first_segment(m: Any, positive: Any, latent: dict, seed: int) -> dict:
        (first,) = comfy_nodes.common_ksampler(m, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                               start_step=0, last_step=split, force_full_denoise=False)
        return first

    def second_segment(m: Any, positive: Any, first: dict, seed: int) -> dict:
        (out,) = comfy_nodes.common_ksampler(m, seed, steps, cfg, sampler, scheduler, positive, negative, first,
                                             disable_noise=True, start_step=split, last_step=steps,
                                             force_full_denoise=True)
        return out

    def segments(high: Any, low: Any, positive: Any, latent: dict, seed: int) -> torch.Tensor:
        return second_segment(low, positive, first_segment(high, positive, latent, seed), seed)["samples"]

    (recording_high, high_holder), (recording_low, low_holder) = patching.attach_profiler(model), \
        patching.attach_profiler(model)
    seed = PROFILE_SET[1]
    first = first_segment(recording_high, positive, latent, seed)
    out = second_segment(recording_low, positive, first, seed)["samples"]
    profiles = [patching.collect_profile(holder, model) for holder in (high_holder, low_holder)]
    spans = f"steps 0-{split - 1} and {split}-{steps - 1}"
    methods = []
    if wanted("block_cache_two_experts"):
        experts = [patching.apply_block_cache(model, target.build_target_schedule(p, target_build.TargetOptions()))[0]
                   for p in profiles]
        label = f"{spans}, each its own {target_build.DEFAULT_SPEEDUP:g}x schedule"
        methods.append(Method(FAMILY_LABELS["block_cache_two_experts"], "block_cache_two_experts", label,
                              lambda: (model, steps),
                              sample=lambda positive, latent, seed, e=experts: segments(*e, positive, latent, seed)))
    if wanted("block_cache_two_experts_measured"):
        high_replay = replay_module.segment_replay(
            model, lambda m, _, offset: first_segment(m, positive, latent, seed + offset)["samples"],
            first["samples"], split, adds_noise=True)
        low_replay = replay_module.segment_replay(
            model, lambda m, samples, offset: second_segment(
                m, positive, first if samples is None else {**first, "samples": samples}, seed + offset)["samples"],
            out, steps - split, adds_noise=False, earlier=high_replay, decode=_pictures)
        schedules = []
        for profile, replay in zip(profiles, (high_replay, low_replay), strict=True):
            replays = (replay,)
            schedules.append(target.build_validated_schedule(
                dataclasses.replace(profile, replays=replays),
                target_build.TargetOptions(min_psnr=target_build.DEFAULT_MIN_PSNR),
                replay_module.HeldOutValidation.of(replays)))
        experts = [patching.apply_block_cache(model, schedule)[0] for schedule in schedules]
        chosen = "; ".join(f"{name}: {_chosen_rung(schedule)} ({schedule.builder['chosen_by']}; "
                           f"{_measured_count(schedule)})"
                           for name, schedule in zip(("high", "low"), schedules, strict=True))
        methods.append(Method(FAMILY_LABELS["block_cache_two_experts_measured"], "block_cache_two_experts_measured",
                              f"{spans}, {chosen}", lambda: (model, steps),
                              sample=lambda positive, latent, seed, e=experts: segments(*e, positive, latent, seed)))
    return methods


def _preview_gif(path: Path, rows: list[dict[str, Any]], clips: dict[str, torch.Tensor], uncached: torch.Tensor,
                 count: int = 4, scale: int = 4) -> None:
    """An animated GIF of the first ``count`` clips of set A: uncached, the Build node's default, and the
    fewer-steps row nearest its cost, side by side."""
    from PIL import Image, ImageDraw

    default = next(r for r in rows if r["family"] == "block_cache_floor")
    fewer = min((r for r in rows if r["family"] == "fewer_steps"),
                key=lambda r: abs(math.log(r["flop_fraction"] / default["flop_fraction"])))
    columns = [("uncached", uncached), (f"cache {1 / default['flop_fraction']:.2f}x", _pictures(clips[default["method"]])),
               (f"{fewer['steps']} steps {1 / fewer['flop_fraction']:.2f}x", _pictures(clips[fewer["method"]]))]
    count = min(count, uncached.shape[0])
    size, header = uncached.shape[-1] * scale, 14
    frames = []
    for t in range(uncached.shape[2]):
        canvas = Image.new("RGB", (size * len(columns), header + size * count), "white")
        draw = ImageDraw.Draw(canvas)
        for c, (label, video) in enumerate(columns):
            draw.text((c * size + 3, 1), label, fill="black")
            for r in range(count):
                frame = (video[r, :, t].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
                tile = Image.fromarray(frame).resize((size, size), Image.NEAREST)
                canvas.paste(tile, (c * size, header + r * size))
        frames.append(canvas)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0)


def _chosen_rung(schedule: Any) -> str:
    """A speed-up target schedule's rung: its compute steps, a fine rung's partial step, its forecast order."""
    builder = schedule.builder
    if schedule.lookahead_steps:
        return (f"lookahead at steps {list(schedule.lookahead_steps)} (instead of Block Cache's "
                f"{builder['lookahead']['instead_of_speedup']:.2f}x)")
    partial = builder.get("chosen_partial")
    fine = "" if not partial else f" ({len(partial['layers'])} layers reused at step {partial['step'] + 1})"
    return f"steps {builder['compute_steps']}{fine}, order {builder['chosen_order']}"


def _measured_count(schedule: Any) -> str:
    """How many schedules the Build node measured for this one, and how many of them a second seed checked."""
    measured = schedule.builder["measured"]
    return f"{len(measured)} measured, {sum(entry['seeds'] > 1 for entry in measured)} checked on a second seed"


def _fewer_steps(steps: int, coarse: bool = False) -> list[int]:
    if coarse:  # about 9 counts spread over the range that the caches' rows reach
        return sorted({round(steps * f) for f in (0.16, 0.2, 0.26, 0.33, 0.4, 0.5, 0.6, 0.75, 0.9)})
    if steps <= 25:
        return list(range(3, steps))
    return sorted({n for n in (5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 20, 22, 25, 28, 32, 36, 40, 45) if n < steps})


def fidelity_benchmark(args: argparse.Namespace, name: str) -> dict[str, Any]:
    import nodes as comfy_nodes

    setup = MODELS[args.model]
    sampler, scheduler, steps = setting_named(setup.settings, name)
    reference_module = _module(setup.module)
    prompt_source = _module(setup.prompts)
    patching = _module("patching")
    replay_module = _module("replay")
    load = getattr(reference_module, setup.loader)
    reference = load(args.weights) if args.weights else load()
    model = reference.patcher
    negative = reference.conditioning("")

    def batch(prompt_seed: int, count: int, repeats: int) -> tuple[list[str], Any, dict]:
        prompts = prompt_source.benchmark_prompts(count, seed=prompt_seed)
        items = [p for p in prompts for _ in range(repeats)]
        return prompts, reference.conditioning_batch(items), reference_module.empty_latent(len(items))

    def sample(m: Any, positive: Any, latent: dict, seed: int, n: int = steps) -> torch.Tensor:
        (out,) = comfy_nodes.common_ksampler(m, seed, n, args.cfg, sampler, scheduler, positive, negative, latent)
        return out["samples"]

    profile_prompts, profile_positive, profile_latent = batch(PROFILE_SET[0], args.profile_prompts, 1)
    profiled, holder = patching.attach_profiler(model)
    profiled_out = sample(profiled, profile_positive, profile_latent, PROFILE_SET[1])
    profile = patching.collect_profile(holder, model, sampler=sampler, scheduler=scheduler, cfg=args.cfg, denoise=1.0,
                                       latent_shape=tuple(profile_latent["samples"].shape))
    # As Profile Block Changes does: the builder may sample the profiled run again to measure candidates.
    profiled_steps = steps
    replay = replay_module.ProfileReplay(
        model, lambda m, steps=None, seed_offset=0: sample(m, profile_positive, profile_latent,
                                                           PROFILE_SET[1] + seed_offset, steps or profiled_steps),
        profiled_out, _pictures)
    profile = dataclasses.replace(profile, replays=(replay,))
    sets = {key: batch(prompt_seed, args.prompts, args.seeds) for key, (prompt_seed, _) in EVAL_SETS.items()}
    uncached = {key: _pictures(sample(model, sets[key][1], sets[key][2], EVAL_SETS[key][1])) for key in sets}

    def flops_of(m: Any, n: int) -> tuple[float, torch.Tensor]:
        counter = FlopCounterMode(display=False)
        with counter:
            out = sample(m, sets["B"][1], sets["B"][2], EVAL_SETS["B"][1], n)
        return float(counter.get_total_flops()), out

    full_flops, _ = flops_of(model, steps)
    no_cache_seconds: list[float] = []

    def time_no_cache() -> None:
        start = time.perf_counter()
        sample(model, sets["A"][1], sets["A"][2], EVAL_SETS["A"][1])
        no_cache_seconds.append(time.perf_counter() - start)

    sample(model, sets["A"][1], sets["A"][2], EVAL_SETS["A"][1])  # warm-up
    time_no_cache()
    rows = []
    def wanted(family: str) -> bool:
        return family in args.families and not (setup.video and family in VIDEO_SKIPPED)

    methods = _methods(setup, reference, profile, steps, sampler, scheduler, args.max_rungs, wanted)
    if setup.video:
        methods += two_experts_methods(reference, profile_positive, profile_latent, negative, args.cfg,
                                       sampler, scheduler, steps, wanted)
    outputs_a: dict[str, torch.Tensor] = {}
    for index, method in enumerate(methods):
        if index and index % 8 == 0:
            time_no_cache()
        m, n = method.make()
        if method.sample is None:
            flops, out_b = flops_of(m, n)
        else:
            counter = FlopCounterMode(display=False)
            with counter:
                out_b = method.sample(sets["B"][1], sets["B"][2], EVAL_SETS["B"][1])
            flops = float(counter.get_total_flops())
        start = time.perf_counter()
        if method.sample is None:
            out_a = sample(m, sets["A"][1], sets["A"][2], EVAL_SETS["A"][1], n)
        else:
            out_a = method.sample(sets["A"][1], sets["A"][2], EVAL_SETS["A"][1])
        seconds = time.perf_counter() - start
        outputs_a[method.name] = out_a
        row = {"method": method.name, "family": method.family, "setting": method.setting, "knob": method.knob,
               "steps": n, "flop_fraction": flops / full_flops, "seconds": seconds,
               "wall_speedup": no_cache_seconds[-1] / seconds}
        for key, out in (("A", out_a), ("B", out_b)):
            metrics = clip_metrics(_pictures(out), uncached[key])
            row[f"psnr_min_{key}"] = float(metrics["psnr"].min())
            for metric, values in metrics.items():
                row[f"{metric}_{key}"] = float(values.mean())
        rows.append(row)
        print(f"[{name}] {method.name}: {1 / row['flop_fraction']:.2f}x FLOPs, {row['wall_speedup']:.2f}x wall, "
              f"PSNR A {row['psnr_A']:.1f} / B {row['psnr_B']:.1f} dB", flush=True)
    if setup.video and {"block_cache_floor", "fewer_steps"} <= {r["family"] for r in rows}:  # its two rows ran
        _preview_gif(args.out / f"preview_{name}.gif", rows, outputs_a, uncached["A"])
    return {"setting": name, "model": args.model, "weights": str(args.weights or "committed"), "sampler": sampler,
            "scheduler": scheduler, "steps": steps, "cfg": args.cfg,
            "rows": rows, "pareto": {key: pareto(rows, key) for key in EVAL_SETS},
            "pairs": len(sets["A"][2]["samples"]), "prompts": {key: sets[key][0] for key in sets},
            "profile_prompts": profile_prompts, "no_cache_seconds": no_cache_seconds,
            "profile_trajectory_mb": profile.trajectory.nbytes / 2**20}


def pareto(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Per floor and family: the row with the best FLOP speed-up whose mean PSNR on set ``key`` is above it."""
    table: dict[str, dict[str, Any]] = {}
    for floor in FLOORS:
        best: dict[str, Any] = {}
        for row in rows:
            if row["family"] == "none" or row[f"psnr_{key}"] < floor:
                continue
            current = best.get(row["family"])
            if current is None or row["flop_fraction"] < current["flop_fraction"]:
                best[row["family"]] = row
        table[f"{floor:g}"] = {family: {"method": r["method"], "speedup": 1 / r["flop_fraction"],
                                        "wall_speedup": r["wall_speedup"], "psnr": r[f"psnr_{key}"]}
                               for family, r in best.items()}
    return table


def verdict(pareto_table: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per floor: Block Cache's best against the best other row, and their ratio."""
    lines = []
    for floor, families in pareto_table.items():
        ours = families.get("block_cache")
        others = [(family, entry) for family, entry in families.items() if family in OTHERS]
        best_family, best = max(others, key=lambda item: item[1]["speedup"]) if others else (None, None)
        ratio = ours["speedup"] / best["speedup"] if ours and best else None
        lines.append({"floor": floor, "ours": ours, "best_other_family": best_family, "best_other": best,
                      "ratio": ratio})
    return lines


# ---- part 2: full-size UNet -------------------------------------------------------------------------

def full_size_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import nodes as comfy_nodes

    builtin = _module("builtin_models")
    patching = _module("patching")
    schedule_mod = _module("schedule")
    cache = _module("cache")

    _, unet_config = builtin.FULL_UNET_CONFIGS["SD15"]
    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, "")
    builtin.seeded_init_(base.diffusion_model, 0)
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    positive = builtin.prompt_conditioning("a photo of a cat", 768)
    negative = builtin.prompt_conditioning("", 768)
    latent = {"samples": torch.zeros(1, 4, args.full_resolution // 8, args.full_resolution // 8)}

    def sample(m: Any) -> torch.Tensor:
        (out,) = comfy_nodes.common_ksampler(m, 1, args.full_steps, args.cfg, "euler", "normal", positive, negative,
                                             latent)
        return out["samples"]

    profiled, holder = patching.attach_profiler(model)
    sample(profiled)
    profile = patching.collect_profile(holder, model, sampler="euler", scheduler="normal", cfg=args.cfg, denoise=1.0,
                                       latent_shape=tuple(latent["samples"].shape))
    all_compute = schedule_mod.all_compute_schedule(profile.block_map, profile.grid, profile.layer_flops,
                                                    profile.total_flops)
    cases = {"all-compute": patching.apply_block_cache(model, all_compute)}
    cases["Block Cache attention δ=0.5"] = patching.apply_block_cache(
        model, schedule_mod.build_schedule(profile, schedule_mod.BuildOptions(threshold=0.5, cache_kinds="attention")))
    base_schedule = schedule_mod.build_schedule(profile, schedule_mod.BuildOptions(threshold=0.0, cache_kinds="all"))
    cases["uniform every 2 (all layers)"] = patching.apply_block_cache(model, bench_peers.interval_schedule(base_schedule, 2))
    cases["the same, forecast order 1"] = patching.apply_block_cache(
        model, bench_peers.interval_schedule(base_schedule, 2, order=1))

    ratios: dict[str, list[float]] = {name: [] for name in cases}
    identical = True
    plain = None
    for _ in range(args.full_rounds):
        for name, (patched, _) in cases.items():
            start = time.perf_counter()
            plain = sample(model)
            plain_seconds = time.perf_counter() - start
            start = time.perf_counter()
            out = sample(patched)
            ratios[name].append(plain_seconds / (time.perf_counter() - start))
            if name == "all-compute":
                identical = identical and bool(torch.equal(out, plain))
        print("full-size round done", flush=True)
    rows = []
    for name, (_, case_holder) in cases.items():
        stats = case_holder.last_run
        fraction = 1.0 / cache.run_speedup_estimate(case_holder, stats)
        achieved = statistics.median(ratios[name])
        rows.append({"case": name, "speedup": achieved, "speedup_runs": ratios[name], "flop_fraction": fraction,
                     "ideal_speedup": 1.0 / fraction, "achieved_over_ideal": achieved * fraction,
                     "overhead": 1.0 / achieved - 1.0 if name == "all-compute" else None,
                     "peak_cache_mb": stats.figures["cache"].peak_cache_bytes / 2**20})
    parameters = sum(p.numel() for p in base.diffusion_model.parameters())
    return {"rows": rows, "all_compute_bit_identical": identical, "steps": args.full_steps,
            "resolution": args.full_resolution, "rounds": args.full_rounds,
            "model_mb": parameters * 4 / 2**20, "latent_shape": list(latent["samples"].shape)}


# ---- report ----------------------------------------------------------------------------------------

def markdown(results: dict[str, Any]) -> str:
    lines = []
    for result in results.get("fidelity", {}).values():
        lines += [
            f"## {result['sampler']}/{result['scheduler']} {result['steps']} steps, cfg {result['cfg']:g}",
            "",
            f"{MODELS[result.get('model', 'unet')].description}, 32x32 pixels; two disjoint evaluation sets of {result['pairs']} prompt x seed pairs "
            f"(A, B), profile on {len(result['profile_prompts'])} other prompts. FLOPs by FlopCounterMode around the "
            "sampling call; wall = uncached time / method time on set A (same run, one CPU thread).",
            "",
        ]
        video = "temporal_psnr_A" in result["rows"][0]
        if video:
            lines += ["PSNR and SSIM per clip (all 8 frames); worst frame: the mean over clips of each clip's "
                      "worst frame; temporal: PSNR of the frame-to-frame differences against the uncached clip's.", ""]
        extra = " worst frame A | temporal A |" if video else ""
        lines += ["| method | FLOP speed-up | wall speed-up | PSNR A (mean / min) | SSIM A |" + extra
                  + " PSNR B (mean / min) | SSIM B |", "|---|---:|---:|---:|---:|" + "---:|" * (4 if video else 2)]
        for row in result["rows"]:
            if row["family"] == "none":
                continue
            cells = f" {_db(row['psnr_worst_frame_A'])} | {_db(row['temporal_psnr_A'])} |" if video else ""
            lines.append(f"| {row['method']} | {1 / row['flop_fraction']:.2f}x | {row['wall_speedup']:.2f}x | "
                         f"{_db(row['psnr_A'])} / {_db(row['psnr_min_A'])} | {row['ssim_A']:.3f} |{cells} "
                         f"{_db(row['psnr_B'])} / {_db(row['psnr_min_B'])} | {row['ssim_B']:.3f} |")
        lines += ["", pareto_markdown(result), ""]
    full = results.get("full_size")
    if full:
        lines += [
            "## Full-size SD1.5-structured UNet",
            "",
            f"Random weights, {full['model_mb']:.0f} MB fp32, {full['resolution']}x{full['resolution']}, euler "
            f"{full['steps']} steps, cfg batched, CPU; median of {full['rounds']} paired rounds. All-compute output "
            f"bit-identical to no patch: {full['all_compute_bit_identical']}.",
            "",
            "| case | speed-up (wall) | FLOPs computed | ideal speed-up | achieved / ideal | overhead | cache peak |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in full["rows"]:
            overhead = f"{row['overhead']:+.1%}" if row["overhead"] is not None else "-"
            lines.append(f"| {row['case']} | {row['speedup']:.3f}x | {row['flop_fraction']:.1%} | "
                         f"{row['ideal_speedup']:.2f}x | {row['achieved_over_ideal']:.3f} | {overhead} | "
                         f"{row['peak_cache_mb']:.1f} MB |")
    lines += ["", f"Machine: {results['machine']}."]
    return "\n".join(lines) + "\n"


def _db(value: float) -> str:
    return "identical" if value >= 100 else f"{value:.1f}"


def pareto_markdown(result: dict[str, Any]) -> str:
    """Best FLOP speed-up per family above each floor, on set A and set B, and the ratio to the best other."""
    families = [f for f in FAMILY_LABELS if any(r["family"] == f for r in result["rows"])]
    header = "| family | " + " | ".join(f"≥ {floor:g} dB (A / B)" for floor in FLOORS) + " |"
    lines = [f"Best FLOP speed-up above each mean-PSNR floor ({result['sampler']}/{result['scheduler']} "
             f"{result['steps']}):", "", header, "|---|" + "---:|" * len(FLOORS)]
    for family in families:
        cells = []
        for floor in FLOORS:
            parts = []
            for key in EVAL_SETS:
                entry = result["pareto"][key][f"{floor:g}"].get(family)
                parts.append(f"{entry['speedup']:.2f}x" if entry else "–")
            cells.append(" / ".join(parts))
        lines.append(f"| {FAMILY_LABELS[family]} | " + " | ".join(cells) + " |")
    ratios = []
    for floor in FLOORS:
        parts = []
        for key in EVAL_SETS:
            line = next(v for v in verdict(result["pareto"][key]) if v["floor"] == f"{floor:g}")
            if line["ratio"] is None:
                parts.append("–")
            else:
                parts.append(f"{line['ratio']:.2f} (vs {FAMILY_LABELS[line['best_other_family']]})")
        ratios.append(" / ".join(parts))
    lines.append("| **Block Cache / best other** | " + " | ".join(ratios) + " |")
    fewer = []
    for floor in FLOORS:
        parts = []
        for key in EVAL_SETS:
            entries = result["pareto"][key][f"{floor:g}"]
            ours, steps = entries.get("block_cache"), entries.get("fewer_steps")
            parts.append(f"{ours['speedup'] / steps['speedup']:.2f}" if ours and steps else "–")
        fewer.append(" / ".join(parts))
    lines.append("| **Block Cache / fewer steps** | " + " | ".join(fewer) + " |")
    return "\n".join(lines)


FAMILY_COLOURS = {
    "block_cache": (214, 39, 40), "block_cache_measured": (255, 152, 150), "block_cache_order0": (140, 86, 75),
    "block_cache_floor": (120, 0, 0), "block_cache_best": (255, 0, 255),
    "block_cache_threshold": (196, 156, 148), "fewer_steps": (0, 0, 0), "fora": (31, 119, 180),
    "taylorseer": (23, 190, 207), "deepcache": (148, 103, 189), "fbcache": (188, 189, 34), "teacache": (127, 127, 127),
    "easycache": (44, 160, 44), "lazycache": (152, 223, 138), "faster_diffusion": (255, 127, 14),
    "magcache": (65, 65, 65), "block_cache_two_experts": (255, 187, 120),
    "block_cache_two_experts_measured": (255, 127, 80),
}


def quality_plot(result: dict[str, Any], path: Path) -> None:
    series = []
    for family, label in FAMILY_LABELS.items():
        rows = sorted((r for r in result["rows"] if r["family"] == family),
                      key=lambda r: (r["flop_fraction"], -r["psnr_A"]))
        if not rows:
            continue
        line = family not in ("faster_diffusion", "block_cache_floor", "block_cache_best", "block_cache_two_experts",
                              "block_cache_two_experts_measured")
        series.append(Series(label, [1 / r["flop_fraction"] for r in rows], [min(r["psnr_A"], 60.0) for r in rows],
                             line=line, colour=FAMILY_COLOURS[family]))
    plot(series, str(path), title=f"{MODELS[result.get('model', 'unet')].description}, {result['sampler']}/{result['scheduler']} {result['steps']}: "
         "PSNR vs the uncached pictures (set A) against FLOP speed-up", xlabel="FLOP speed-up vs no cache",
         ylabel="PSNR dB (mean, capped 60)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="unet",
                        help="unet: the UNet reference model; dit: the transformer (Flux) reference model; video: "
                             "the video (Wan) reference model")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--settings", default=None,
                        help="comma-separated; " + "; ".join(f"{name}: " + ", ".join(setup.settings)
                                                             for name, setup in MODELS.items())
                        + "; or SAMPLER/SCHEDULER/STEPS, e.g. euler/normal/28")
    parser.add_argument("--max-rungs", type=int, default=MAX_RUNGS, help="Block Cache's target sweep: at most "
                                                                         "this many rungs of the ladder")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--profile-prompts", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--full-steps", type=int, default=4)
    parser.add_argument("--full-rounds", type=int, default=5)
    parser.add_argument("--full-resolution", type=int, default=256)
    # One thread: two threads on a busy 2-core machine spin-wait on each other and run many times slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--weights", type=Path, default=None,
                        help="another checkpoint of the model (e.g. one trained with another --seed); default: the "
                             "committed reference weights")
    parser.add_argument("--families", default="", help="comma-separated: only these method families, e.g. "
                                                         "teacache (default: all of " + ", ".join(FAMILY_LABELS) + ")")
    args = parser.parse_args()
    settings = MODELS[args.model].settings
    args.settings = args.settings or ",".join(settings)
    for name in args.settings.split(","):
        try:
            setting_named(settings, name)
        except ValueError as error:
            parser.error(f"--model {args.model}: {error}")
    # A re-run of some rows (the uncached row always runs).
    args.families = set(args.families.split(",")) if args.families else set(FAMILY_LABELS)
    unknown = args.families - set(FAMILY_LABELS)
    if unknown:
        parser.error(f"--families: no family {', '.join(sorted(unknown))}; the families are {', '.join(FAMILY_LABELS)}")
    args.skip_full = args.skip_full or args.model != "unet"  # Part 2 measures a full-size UNet
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    load_pack()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                                          f"{args.threads} threads, CPU", "fidelity": {}}
    if not args.skip_reference:
        for name in args.settings.split(","):
            result = fidelity_benchmark(args, name)
            results["fidelity"][name] = result
            quality_plot(result, args.out / f"quality_vs_speedup_{name.replace('/', '_')}.png")
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if not args.skip_full:
        results["full_size"] = full_size_benchmark(args)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "table.md").write_text(table)
    print(table)
    print(f"wrote results.json, table.md and the plots to {args.out}")


if __name__ == "__main__":
    main()
