"""Benchmark: Block Cache against no cache, a uniform-interval schedule and ComfyUI's EasyCache/LazyCache.

Part 1, the trained reference model (core/reference_model.py): one batch of
prompts x seeds sampled by KSampler with every method, side by side in one run. For
each method: wall-clock speed-up (each run paired with a "no cache" run right before it,
median of the pair ratios, so machine noise hits both sides), the FLOP fraction it
computed, and PSNR / SSIM of the decoded pictures against the uncached pictures of the
same seed and prompt.

Part 2, a full-size SD1.5-structured UNet (random weights, fp32, 256x256, CPU): the
overhead of an all-compute schedule against no patch, achieved / ideal speed-up of
real schedules (ideal = 1 / computed FLOP fraction), and the cache's peak memory.

Writes results.json, table.md and quality_vs_speedup.png to --out.

    .venv/bin/python scripts/benchmark.py --out out/bench      (make bench)
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

import torch
from comfy_bootstrap import PACK_MODULE, load_pack
from plotting import Series, plot

THRESHOLDS = (0.25, 0.5, 1.0, 2.0)
PEER_THRESHOLDS = (0.1, 0.2, 0.4)  # 0.2 is the nodes' default
INTERVALS = (2, 3)
# Aggressive schedules that also run with Calibrate Block Cache's scale-shift correction.
CALIBRATED = (("attention", 2.0), ("all", 0.5), ("all", 1.0))


def _module(name: str) -> Any:
    return importlib.import_module(f"{PACK_MODULE}.core.{name}")


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


# ---- methods ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Method:
    name: str
    family: str  # "none", "block_cache/attention", "block_cache/all", "uniform", "deepcache", "easycache", "lazycache"
    setting: str
    model: Any
    holder: Any = None  # Block Cache's holder: its run stats give the FLOP fraction
    times: list[float] = dataclasses.field(default_factory=list)
    ratios: list[float] = dataclasses.field(default_factory=list)
    flop_fraction: float = 1.0
    output: torch.Tensor | None = None
    calls: int = 0


class CallCounter:
    """Counts real diffusion-model computations: a hook on the first input conv, which every real call runs."""

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        self.count = 0
        self._handle = diffusion_model.input_blocks[0][0].register_forward_pre_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1


def interval_schedule(schedule: Any, interval: int, keep: Callable[[str], bool] = lambda _: False) -> Any:
    """Every layer computes every ``interval``-th step (and those ``keep`` names at every step)."""
    steps = schedule.grid.steps
    layers = tuple(dataclasses.replace(layer, compute=tuple(keep(layer.name) or i % interval == 0
                                                             for i in range(steps)))
                   for layer in schedule.layers)
    return dataclasses.replace(schedule, layers=layers, builder={"method": "uniform_interval", "interval": interval})


def reference_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import comfy_extras.nodes_easycache as easycache
    import nodes as comfy_nodes

    reference_model = _module("reference_model")
    reference_data = _module("reference_data")
    patching = _module("patching")
    schedule_mod = _module("schedule")
    runtime = _module("runtime")
    heatmap = _module("heatmap")

    reference = reference_model.load_reference_model()
    model = reference.patcher
    prompts = reference_data.benchmark_prompts(args.prompts)
    batch = [p for p in prompts for _ in range(args.seeds)]  # every prompt with `seeds` different noises
    positive = [[reference.encode(batch), {}]]
    negative = reference.conditioning("")
    latent = {"samples": torch.zeros(len(batch), 3, reference_model.RESOLUTION, reference_model.RESOLUTION)}
    sampler = dict(steps=args.steps, cfg=args.cfg, sampler_name=args.sampler, scheduler=args.scheduler)

    def sample(m: Any, seed: int = args.seed, lat: dict | None = None, pos: Any = None) -> torch.Tensor:
        (out,) = comfy_nodes.common_ksampler(m, seed, sampler["steps"], sampler["cfg"], sampler["sampler_name"],
                                             sampler["scheduler"], pos or positive, negative, lat or latent)
        return out["samples"]

    # Profile on prompts and seeds the evaluation does not use.
    profile_prompts = reference_data.benchmark_prompts(args.profile_prompts, seed=99)
    profiled, holder = patching.attach_profiler(model)
    profile_latent = {"samples": torch.zeros(len(profile_prompts), *latent["samples"].shape[1:])}
    sample(profiled, seed=args.seed + 1000, lat=profile_latent, pos=[[reference.encode(profile_prompts), {}]])
    profile = patching.collect_profile(holder, model, sampler=args.sampler, scheduler=args.scheduler, cfg=args.cfg,
                                       denoise=1.0, latent_shape=tuple(profile_latent["samples"].shape))
    heatmap_path = Path(args.out) / "reference_profile_heatmap.png"
    _save_picture(heatmap.render_profile(profile), heatmap_path)

    methods = [Method("no cache", "none", "", model)]
    calibrations = []
    for kinds in ("attention", "all"):
        for threshold in THRESHOLDS:
            schedule = schedule_mod.build_schedule(profile, schedule_mod.BuildOptions(threshold=threshold,
                                                                                      cache_kinds=kinds))
            patched, bc_holder = patching.apply_block_cache(model, schedule)
            methods.append(Method(f"Block Cache {kinds} δ={threshold:g}", f"block_cache/{kinds}",
                                  f"threshold {threshold:g}", patched, bc_holder))
            if (kinds, threshold) in CALIBRATED and args.calibration_iterations:
                result = _calibrate(reference, schedule, negative, args)
                calibrations.append({"schedule": f"{kinds} δ={threshold:g}", "seconds": result.seconds,
                                     "loss_first": result.losses[0], "loss_last": result.losses[-1],
                                     "streams": len(result.schedule.scale_shift.entries)})
                patched, bc_holder = patching.apply_block_cache(model, result.schedule)
                methods.append(Method(f"Block Cache {kinds} δ={threshold:g} + scale-shift",
                                      f"block_cache/{kinds}+scale_shift", f"threshold {threshold:g}", patched,
                                      bc_holder))
    base = schedule_mod.build_schedule(profile, schedule_mod.BuildOptions(threshold=0.0, cache_kinds="all"))
    outer = _outer_layer_names(model)
    for interval in INTERVALS:
        for family, keep in (("uniform", lambda _: False), ("deepcache", lambda name: name in outer)):
            patched, bc_holder = patching.apply_block_cache(model, interval_schedule(base, interval, keep))
            label = "uniform every" if family == "uniform" else "DeepCache-like every"
            methods.append(Method(f"{label} {interval}", family, f"interval {interval}", patched, bc_holder))
    methods += _faster_diffusion_methods(model, profile, args)
    for family, node in (("easycache", easycache.EasyCacheNode), ("lazycache", easycache.LazyCacheNode)):
        for threshold in PEER_THRESHOLDS:
            (patched,) = node.execute(model, threshold, 0.15, 0.95, False).result
            methods.append(Method(f"{node.__name__.removesuffix('Node')} {threshold:g}", family,
                                  f"reuse_threshold {threshold:g}", patched))

    counter = CallCounter(model.get_model_object("diffusion_model"))
    sample(model)  # warm-up
    none = methods[0]
    for round_index in range(args.rounds):
        for method in methods[1:]:
            start = time.perf_counter()
            plain = sample(model)
            none.times.append(time.perf_counter() - start)
            counter.count = 0
            start = time.perf_counter()
            out = sample(method.model)
            method.times.append(time.perf_counter() - start)
            method.ratios.append(none.times[-1] / method.times[-1])
            if round_index == 0:
                none.output = plain
                method.output = out
                method.calls = counter.count
                if method.holder is not None:
                    method.flop_fraction = 1.0 / runtime.run_speedup_estimate(method.holder, method.holder.last_run)
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    counter.count = 0
    sample(model)
    full_calls = counter.count
    reference_pictures = _pictures(none.output)
    rows = []
    for method in methods:
        if method.holder is None and method.family != "none":
            method.flop_fraction = method.calls / full_calls  # peers skip whole model calls
        pictures = _pictures(method.output)
        rows.append({
            "method": method.name, "family": method.family, "setting": method.setting,
            "speedup": statistics.median(method.ratios) if method.ratios else 1.0,
            "speedup_runs": method.ratios,
            "flop_fraction": method.flop_fraction,
            "ideal_speedup": 1.0 / method.flop_fraction,
            "psnr": float(psnr(pictures, reference_pictures).mean()),
            "psnr_min": float(psnr(pictures, reference_pictures).min()),
            "ssim": float(ssim(pictures, reference_pictures).mean()),
            "seconds": statistics.median(method.times) if method.times else statistics.median(none.times),
        })
    _save_grid(reference_pictures, Path(args.out) / "reference_uncached_samples.png")
    return {"rows": rows, "pairs": len(batch), "prompts": prompts, "seeds_per_prompt": args.seeds,
            "sampler": sampler, "rounds": args.rounds, "profile_heatmap": heatmap_path.name,
            "profile_prompts": profile_prompts, "calibrations": calibrations,
            "calibration_iterations": args.calibration_iterations}


def _faster_diffusion_methods(model: Any, profile: Any, args: argparse.Namespace) -> list[Method]:
    """Faster Diffusion: encoder propagation with the paper's key steps, + noise injection, + parallel decoding."""
    faster_diffusion = _module("faster_diffusion")
    noise_injection = _module("noise_injection")
    parallel_decoding = _module("parallel_decoding")
    patching = _module("patching")
    grid = faster_diffusion.grid_for_model(model, args.steps, args.sampler, args.scheduler)
    schedule = faster_diffusion.build_faster_diffusion_schedule(profile.block_map, grid,
                                                                faster_diffusion.FasterDiffusionOptions(),
                                                                profile=profile)
    keys = ",".join(str(k) for k in schedule.builder["key_steps"])
    injection = noise_injection.NoiseInjection(alpha=noise_injection.PAPER_ALPHA)
    methods = []
    for name, noise, parallel in (("Faster Diffusion", None, False),
                                  ("Faster Diffusion + noise injection", injection, False),
                                  ("Faster Diffusion + parallel decoding", None, True),
                                  ("Faster Diffusion + noise + parallel", injection, True)):
        patched, holder = patching.apply_block_cache(model, schedule, noise_injection=noise)
        if parallel:
            patched, _ = parallel_decoding.enable_parallel_decoding(
                patched, holder, schedule, parallel_decoding.ParallelDecoding(enabled=True))
        methods.append(Method(name, "faster_diffusion", f"key steps {keys}", patched, holder))
    return methods


def _calibrate(reference: Any, schedule: Any, negative: Any, args: argparse.Namespace) -> Any:
    """Calibrate Block Cache's training on prompts and seeds the evaluation never uses."""
    calibration = _module("calibration")
    reference_model = _module("reference_model")
    prompts = _module("reference_data").benchmark_prompts(8, seed=7)
    latent = torch.zeros(len(prompts), 3, reference_model.RESOLUTION, reference_model.RESOLUTION)
    options = calibration.CalibrationOptions(iterations=args.calibration_iterations, seed=args.seed + 5000)
    result = calibration.calibrate(reference.patcher, schedule, [([[reference.encode(prompts), {}]], negative)],
                                   latent, options)
    print(f"calibrated {schedule.builder['cache_kinds']} δ={schedule.builder['threshold']:g}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} "
          f"in {result.seconds:.0f} s", flush=True)
    return result


def _outer_layer_names(model: Any) -> set[str]:
    """The layers at the highest resolution (DeepCache's always-computed shallow branch)."""
    unet = model.get_model_object("diffusion_model")
    per_level = int(unet.num_res_blocks[0])
    outer = [f"input_blocks.{i}" for i in range(1, per_level + 1)]
    outer += [f"output_blocks.{len(unet.output_blocks) - 1 - i}" for i in range(per_level + 1)]
    block_map = _module("block_map").block_map_for_patcher(model)
    return {spec.name for spec in block_map.layers if any(spec.name == o or spec.name.startswith(o + ".") for o in outer)}


def _pictures(latent: torch.Tensor) -> torch.Tensor:
    """The pixel-space VAE's decode: [-1, 1] -> [0, 1] (comfy/sd.py VAE.process_output)."""
    return ((latent.float() + 1) / 2).clamp(0, 1)


def _save_picture(array: Any, path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.clip(array, 0, 1) * 255).astype("uint8")).save(path)


def _save_grid(pictures: torch.Tensor, path: Path, columns: int = 8, scale: int = 3) -> None:
    rows = math.ceil(len(pictures) / columns)
    grid = torch.ones(3, rows * 34, columns * 34)
    for index, picture in enumerate(pictures):
        r, c = divmod(index, columns)
        grid[:, r * 34 + 1: r * 34 + 33, c * 34 + 1: c * 34 + 33] = picture
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    _save_picture(grid.permute(1, 2, 0).numpy(), path)


# ---- full-size UNet --------------------------------------------------------------------------------

def full_size_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import nodes as comfy_nodes

    builtin = _module("builtin_models")
    patching = _module("patching")
    schedule_mod = _module("schedule")
    runtime = _module("runtime")

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
    cases["uniform every 2 (all layers)"] = patching.apply_block_cache(model, interval_schedule(base_schedule, 2))

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
        fraction = 1.0 / runtime.run_speedup_estimate(case_holder, stats)
        achieved = statistics.median(ratios[name])
        rows.append({"case": name, "speedup": achieved, "speedup_runs": ratios[name], "flop_fraction": fraction,
                     "ideal_speedup": 1.0 / fraction, "achieved_over_ideal": achieved * fraction,
                     "overhead": 1.0 / achieved - 1.0 if name == "all-compute" else None,
                     "peak_cache_mb": stats.peak_cache_bytes / 2**20})
    parameters = sum(p.numel() for p in base.diffusion_model.parameters())
    return {"rows": rows, "all_compute_bit_identical": identical, "steps": args.full_steps,
            "resolution": args.full_resolution, "rounds": args.full_rounds,
            "model_mb": parameters * 4 / 2**20, "latent_shape": list(latent["samples"].shape)}


# ---- report ----------------------------------------------------------------------------------------

def markdown(results: dict[str, Any]) -> str:
    lines = []
    ref = results.get("reference")
    if ref:
        s = ref["sampler"]
        lines += [
            f"Reference model, {ref['pairs']} prompt x seed pairs ({len(ref['prompts'])} prompts x "
            f"{ref['seeds_per_prompt']} seeds, one batch), 32x32 pixels, {s['sampler_name']}/{s['scheduler']} "
            f"{s['steps']} steps, cfg {s['cfg']}; speed-up = median over {ref['rounds']} rounds of "
            "(no-cache time / method time), each method run right after its own no-cache run.",
            "",
            "| method | setting | speed-up (wall) | FLOPs computed | ideal speed-up | PSNR dB (mean / min) | SSIM |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in ref["rows"]:
            psnr_text = "identical" if row["psnr"] >= 100 else f"{row['psnr']:.1f} / {row['psnr_min']:.1f}"
            lines.append(f"| {row['method']} | {row['setting'] or '-'} | {row['speedup']:.2f}x | "
                         f"{row['flop_fraction']:.1%} | {row['ideal_speedup']:.2f}x | {psnr_text} | "
                         f"{row['ssim']:.4f} |")
        if ref.get("calibrations"):
            lines += ["", f"Scale-shift calibration: {ref['calibration_iterations']} iterations, each sampling 8 "
                          "training prompts with a fresh seed (prompts and seeds disjoint from the evaluation); "
                          "relative error of the reused layer outputs, first -> last iteration:", ""]
            lines += [f"- {c['schedule']}: {c['loss_first']:.4f} -> {c['loss_last']:.4f}, {c['streams']} corrected "
                      f"streams, {c['seconds']:.0f} s" for c in ref["calibrations"]]
    full = results.get("full_size")
    if full:
        lines += [
            "",
            f"Full-size SD1.5-structured UNet (random weights, {full['model_mb']:.0f} MB fp32), "
            f"{full['resolution']}x{full['resolution']}, euler {full['steps']} steps, cfg batched, CPU; "
            f"median of {full['rounds']} paired rounds. All-compute output bit-identical to no patch: "
            f"{full['all_compute_bit_identical']}.",
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


def quality_plot(ref: dict[str, Any], path: Path) -> None:
    labels = {"block_cache/attention": "Block Cache (attention)", "block_cache/all": "Block Cache (all layers)",
              "block_cache/attention+scale_shift": "Block Cache (attention) + scale-shift",
              "block_cache/all+scale_shift": "Block Cache (all layers) + scale-shift",
              "uniform": "uniform interval", "deepcache": "DeepCache-like interval",
              "easycache": "EasyCache (core)", "lazycache": "LazyCache (core)"}
    points = [r for r in ref["rows"] if r["family"] == "faster_diffusion"]
    series = []
    for family, label in labels.items():
        # Connected in threshold / interval order, so a noisy timing shows as a kink, not a reordering.
        rows = sorted((r for r in ref["rows"] if r["family"] == family), key=lambda r: float(r["setting"].split()[-1]))
        if rows:
            series.append(Series(label, [r["speedup"] for r in rows], [min(r["psnr"], 60.0) for r in rows],
                                 point_labels=[r["setting"].split()[-1] for r in rows]))
    for row in points:  # single points: the variants are not a threshold sweep
        series.append(Series(row["method"], [row["speedup"]], [min(row["psnr"], 60.0)], point_labels=[""]))
    plot(series, str(path), title="Reference model: fidelity to the uncached output vs measured speed-up "
         "(points labelled by threshold / interval)", xlabel="wall-clock speed-up vs no cache",
         ylabel="PSNR dB (capped 60)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--profile-prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calibration-iterations", type=int, default=16, help="0 skips the scale-shift rows")
    parser.add_argument("--full-steps", type=int, default=4)
    parser.add_argument("--full-rounds", type=int, default=5)
    parser.add_argument("--full-resolution", type=int, default=256)
    # One thread: two threads on a busy 2-core machine spin-wait on each other and run many times slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    load_pack()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                                          f"{args.threads} threads, CPU"}
    if not args.skip_reference:
        results["reference"] = reference_benchmark(args)
        quality_plot(results["reference"], args.out / "quality_vs_speedup.png")
    if not args.skip_full:
        results["full_size"] = full_size_benchmark(args)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "table.md").write_text(table)
    print(table)
    print(f"wrote results.json, table.md, quality_vs_speedup.png to {args.out}")


if __name__ == "__main__":
    main()
