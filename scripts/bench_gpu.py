"""The runtime's cost on real hardware: overhead, achieved speed-up, cache and profile memory, syncs.

About 2 minutes on an H200 (``make bench-gpu``; figures in docs/benchmark/gpu_h200); it also runs on a CPU, where peak
memory comes from torch's profiler memory timeline and syncs are not measured. On CUDA it starts ComfyUI as its
main.py does, with dynamic VRAM (ModelPatcherDynamic) where the host has it (``--classic-patcher`` leaves it off),
and each row says which ComfyUI and patcher it ran on.

Models, with seeded random weights (the figures measure the runtime, not pictures):
  * ``sd15``: the full-size SD1.5 UNet, fp16 on a GPU (fp32 on a CPU), 512x512 (a 64x64 latent),
    CFG 5 (cond and uncond in one batch), euler, 20 steps;
  * ``flux``: ComfyUI's Flux class at Flux's width (hidden 3072, 24 heads, context 4096) with
    4 double and 8 single blocks (the real model has 19 and 38), bf16 (fp32 on a CPU), 1024x1024
    (4096 image tokens; ``--flux-resolution``), CFG 1, euler, 20 steps.

For each, measured in one process:
  * all-compute overhead: an all-compute schedule against no patch (goal: at most 1%);
  * achieved / ideal speed-up of a uniform "every 2nd step" schedule (ideal: 1 / its FLOP fraction,
    from the FLOPs the profiler counted; goal: at least 0.95), also with ``cache_device=cpu``;
  * cache memory: what the cache held at most, and the peak allocated memory above no patch;
  * profile memory: a profiling run's peak above no patch, against the profiler before issue 15,
    which kept one float32 copy of every layer's residual per cond chunk (emulated here);
  * syncs per step (GPU): host-device synchronizations torch reports under ``set_sync_debug_mode``.

    .venv/bin/python scripts/bench_gpu.py [--models sd15,flux] [--steps 20] [--repeats 3] [--out DIR]
    .venv/bin/python scripts/bench_gpu.py --smoke   # tiny models, seconds (a CI test runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from comfy_bootstrap import load_pack  # noqa: E402

FLUX_SHAPE = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 4,
              "depth_single_blocks": 8, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
              "guidance_embed": False}
FLUX_SMOKE = {**FLUX_SHAPE, "vec_in_dim": 32, "context_in_dim": 64, "hidden_size": 64, "num_heads": 2, "depth": 1,
              "depth_single_blocks": 2, "axes_dim": [8, 12, 12]}


@dataclasses.dataclass
class Case:
    name: str
    patcher: Any
    positive: list
    negative: list
    latent: torch.Tensor
    cfg: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sd15(pack: Any, device: torch.device, smoke: bool) -> Case:
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    builtin = pack.demo_models.builtin_models
    if smoke:
        patcher = builtin.build_unet_patcher("tiny", seed=0)
        context = 32
        latent = torch.zeros(1, 4, 16, 16)
    else:
        _, unet_config = builtin.FULL_UNET_CONFIGS["SD15"]
        config = comfy.supported_models.SD15(dict(unet_config))
        config.set_inference_dtype(torch.float16 if device.type == "cuda" else torch.float32, None)
        with pack.demo_models.host_compat.weights_at_construction():
            model = config.get_model({}, "")
        builtin.seeded_init_(model.diffusion_model, 0)
        patcher = pack.demo_models.host_compat.core_patcher(model, device, comfy.model_management.unet_offload_device())
        context = 768
        latent = torch.zeros(1, 4, 64, 64)
    prompt = builtin.prompt_conditioning
    return Case("SD1.5 UNet" + (" (smoke: tiny)" if smoke else ", 512x512"), patcher,
                prompt("a lighthouse at dusk", context), prompt("blurry", context), latent, 5.0)


def _flux(pack: Any, device: torch.device, smoke: bool, resolution: int = 1024, depth: tuple[int, int] = (4, 8)) -> Case:
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    shape = FLUX_SMOKE if smoke else {**FLUX_SHAPE, "depth": depth[0], "depth_single_blocks": depth[1]}
    config = comfy.supported_models.Flux(pack.demo_models.host_compat.flux_config(shape))
    config.set_inference_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32, None)
    with pack.demo_models.host_compat.weights_at_construction():
        model = config.get_model({}, "")
    pack.demo_models.builtin_models.seeded_init_(model.diffusion_model, 0)
    patcher = pack.demo_models.host_compat.core_patcher(model, device, comfy.model_management.unet_offload_device())
    generator = torch.Generator().manual_seed(0)
    tokens = 8 if smoke else 256
    cond = [[torch.randn(1, tokens, shape["context_in_dim"], generator=generator),
             {"pooled_output": torch.randn(1, shape["vec_in_dim"], generator=generator)}]]
    side = 8 if smoke else resolution // 8
    name = "Flux-shaped stack" + (" (smoke)" if smoke else f" ({depth[0]}+{depth[1]} blocks), {resolution}x{resolution}")
    return Case(name, patcher, cond, cond, torch.zeros(1, 16, side, side), 1.0)


def _sample(case: Case, model: Any, steps: int, device: torch.device) -> float:
    return _sample_output(case, model, steps, device)[0]


def _sample_output(case: Case, model: Any, steps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    import comfy.sample

    noise = comfy.sample.prepare_noise(case.latent, 0)
    _synchronize(device)
    started = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, case.cfg, "euler", "normal", case.positive, case.negative,
                              case.latent, seed=0)
    _synchronize(device)
    return time.perf_counter() - started, out


def _peak_above(device: torch.device, run: Callable[[], Any]) -> int | None:
    """Peak memory allocated during ``run`` above what was allocated before it: the device's own
    counter on a GPU; on a CPU, torch's profiler memory timeline (every tensor created and freed)."""
    if device.type != "cuda":
        return _cpu_peak_above(run)
    _synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    _synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _cpu_peak_above(run: Callable[[], Any]) -> int | None:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    try:
        timeline = prof._memory_profile().timeline
    except Exception:  # a private API: without it, no CPU figure
        return None
    live = peak = 0
    for _, action, _, size in sorted(timeline, key=lambda event: event[0]):
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def _syncs_per_step(device: torch.device, run: Callable[[], Any], steps: int) -> float | None:
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / max(1, steps)


class _BaselineProfiler:
    """The profiler before issue 15, emulated: it copied a block's inputs where the block updates them in
    place, made each layer's full residual, and held one float32 copy of it per cond chunk from one step
    to the next."""

    def __init__(self, pack: Any) -> None:
        self.layer_calls = pack.block_caching.layer_calls
        self.recording_class = pack.block_caching.profiler.ProfilingRun
        self.original = self.recording_class.call_layer
        self.held: dict[tuple, torch.Tensor] = {}
        self.peak_bytes = 0

    def __enter__(self) -> _BaselineProfiler:
        baseline, original, layer_calls = self, self.original, self.layer_calls

        def call_layer(recording, run, layer, call, occurrence, module, forward, args, kwargs):
            if not run.first_of_step:
                return original(recording, run, layer, call, occurrence, module, forward, args, kwargs)
            spec, keys = layer.spec, call.chunk_keys
            inputs = layer_calls.stream_inputs(spec, args, kwargs, copy=spec.mutates_inputs)
            out = original(recording, run, layer, call, occurrence, module, forward, args, kwargs)
            branches = layer_calls.residual_branches(spec, module, inputs, out, True, len(keys)) or []
            for stream, (branch, _) in enumerate(branches):
                if branch is None:
                    continue
                per = branch.shape[0] // len(keys)
                for chunk, key in enumerate(keys):
                    baseline.held[(layer.layer_index, key, occurrence, stream)] = \
                        branch[chunk * per:(chunk + 1) * per].float().clone()
            baseline.peak_bytes = max(baseline.peak_bytes, sum(t.numel() * t.element_size()
                                                                for t in baseline.held.values()))
            return out

        self.recording_class.call_layer = call_layer
        return self

    def __exit__(self, *exc: Any) -> None:
        self.recording_class.call_layer = self.original
        self.held.clear()


def measure(pack: Any, case: Case, device: torch.device, steps: int, repeats: int,
            memory_only: bool = False) -> dict[str, Any]:
    patching, cache = pack.block_caching.patching, pack.block_caching.cache
    model = case.patcher

    def timed(patched: Any) -> float:
        _sample(case, patched, steps, device)  # warm-up: loading, kernels, allocator
        return statistics.median(_sample(case, patched, steps, device) for _ in range(repeats))

    # Profile (also counts the FLOPs), then the same run with the old profiler emulated.
    profiler, holder = patching.attach_profiler(model)
    _sample(case, model, steps, device)  # loads the weights, so that no peak below counts them
    plain_peak = _peak_above(device, lambda: _sample(case, model, steps, device))
    profile_peak = _peak_above(device, lambda: _sample(case, profiler, steps, device))
    recorder_bytes = holder.last_recording.nbytes
    profile = patching.collect_profile(holder, model, sampler="euler", scheduler="normal", cfg=case.cfg, denoise=1.0,
                                       latent_shape=tuple(case.latent.shape))
    with _BaselineProfiler(pack) as baseline:
        baseline_peak = _peak_above(device, lambda: _sample(case, patching.attach_profiler(model)[0], steps, device))
        baseline_bytes = baseline.peak_bytes

    mb = 2 ** 20
    memory = {
        "model": case.name, "device": str(device), "steps": steps, "comfyui": _comfyui_version(),
        "patcher": type(model).__name__,
        "no_patch_peak_mb": None if plain_peak is None else plain_peak / mb,
        "profile_held_mb": recorder_bytes / mb, "profile_before_issue15_held_mb": baseline_bytes / mb,
        "profile_peak_above_no_patch_mb": None if profile_peak is None or plain_peak is None
        else (profile_peak - plain_peak) / mb,
        "profile_before_issue15_peak_above_no_patch_mb": None if baseline_peak is None or plain_peak is None
        else (baseline_peak - plain_peak) / mb,
    }
    if memory_only:
        return memory
    all_compute = pack.block_caching.schedule.all_compute_schedule(profile.block_map, profile.grid, profile.layer_flops,
                                                     profile.total_flops)
    layers = []
    for layer in all_compute.layers:
        compute = tuple(i % 2 == 0 or i == steps - 1 for i in range(steps))
        layers.append(dataclasses.replace(layer, compute=compute))
    every_two = dataclasses.replace(all_compute, layers=tuple(layers), builder={"method": "uniform_interval"})

    t_plain = timed(model)
    all_patched, all_holder = patching.apply_block_cache(model, all_compute)
    t_all = timed(all_patched)
    cached, cached_holder = patching.apply_block_cache(model, every_two)
    t_cached = timed(cached)
    # Correctness where it runs (a GPU with dynamic VRAM loads every prompt anew): an all-compute schedule is the
    # unpatched model bit for bit, and the cached run computes what the schedule says.
    plain_out = _sample_output(case, model, steps, device)[1]
    all_out = _sample_output(case, all_patched, steps, device)[1]
    cached_out = _sample_output(case, cached, steps, device)[1]
    calls = (cached_holder.last_run.computed + cached_holder.last_run.reused) // steps
    scheduled = every_two.compute_mask().sum(axis=1) * calls
    cache_peak = _peak_above(device, lambda: _sample(case, cached, steps, device))
    cache_bytes = cached_holder.last_run.figures["cache"].peak_cache_bytes
    offloaded, offloaded_holder = patching.apply_block_cache(model, every_two, cache_device=cache.CACHE_ON_CPU)
    t_offloaded = timed(offloaded)
    syncs_plain = _syncs_per_step(device, lambda: _sample(case, model, steps, device), steps)
    syncs_cached = _syncs_per_step(device, lambda: _sample(case, cached, steps, device), steps)
    ideal = every_two.estimated_speedup
    return {
        **memory, "repeats": repeats,
        "all_compute_bit_identical": bool(torch.equal(all_out, plain_out)),
        "all_compute_reused": int(all_holder.last_run.reused.sum()),
        "cached_computations_as_scheduled": bool((cached_holder.last_run.computed == scheduled).all()),
        "cached_max_abs_difference": float((cached_out - plain_out).abs().max()),
        "seconds_no_patch": t_plain, "seconds_all_compute": t_all, "all_compute_overhead": t_all / t_plain - 1.0,
        "ideal_speedup_every_2": ideal, "achieved_speedup_every_2": t_plain / t_cached,
        "achieved_over_ideal": t_plain / t_cached / ideal,
        "achieved_speedup_every_2_cache_on_cpu": t_plain / t_offloaded,
        "cache_held_mb": cache_bytes / mb,
        "cache_peak_above_no_patch_mb": None if cache_peak is None or plain_peak is None
        else (cache_peak - plain_peak) / mb,
        "cache_on_cpu_offloaded_tensors": offloaded_holder.last_run.figures["cache"].offloaded,
        "syncs_per_step_no_patch": syncs_plain, "syncs_per_step_cached": syncs_cached,
    }


def _comfyui_version() -> str:
    try:
        import comfyui_version
    except ImportError:
        return "unknown"
    return comfyui_version.__version__


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(results: list[dict[str, Any]]) -> str:
    if results and "all_compute_overhead" not in results[0]:
        lines = ["| model | device | steps | no patch: peak (MB) | profile: held, peak above no patch (MB) | "
                 "before issue 15: held, peak above (MB) | ratio of peaks above |", "|---|---|---|---|---|---|---|"]
        for r in results:
            above, before = r["profile_peak_above_no_patch_mb"], r["profile_before_issue15_peak_above_no_patch_mb"]
            ratio = f"1/{before / max(above, 1e-9):.0f}" if above is not None and before is not None else "n/a"
            lines.append(f"| {r['model']} | {r['device']} | {r['steps']} | {_fmt(r['no_patch_peak_mb'], '.0f')} | "
                         f"{r['profile_held_mb']:.2f}, {_fmt(above, '.2f')} | "
                         f"{r['profile_before_issue15_held_mb']:.1f}, {_fmt(before, '.1f')} | {ratio} |")
        return "\n".join(lines)
    lines = ["| model | device, ComfyUI, patcher | all-compute overhead, bit-identical | achieved / ideal (every 2) | "
             "same, cache on CPU | cache held (MB) | profile held (MB), before issue 15 | "
             "profile peak above no patch (MB), before | syncs per step, no patch / cached |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['device']}, {r['comfyui']}, {r['patcher']} | {r['all_compute_overhead']:+.1%}, "
            f"{'yes' if r['all_compute_bit_identical'] else 'NO'} | "
            f"{r['achieved_speedup_every_2']:.2f}x / {r['ideal_speedup_every_2']:.2f}x = "
            f"{r['achieved_over_ideal']:.3f} | {r['achieved_speedup_every_2_cache_on_cpu']:.2f}x | "
            f"{r['cache_held_mb']:.1f} | {r['profile_held_mb']:.2f}, {r['profile_before_issue15_held_mb']:.1f} | "
            f"{_fmt(r['profile_peak_above_no_patch_mb'], '.1f')}, "
            f"{_fmt(r['profile_before_issue15_peak_above_no_patch_mb'], '.1f')} | "
            f"{_fmt(r['syncs_per_step_no_patch'], '.1f')} / {_fmt(r['syncs_per_step_cached'], '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,flux")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny models and 4 steps: checks the script runs")
    parser.add_argument("--memory-only", action="store_true", help="profile memory only (for a CPU)")
    parser.add_argument("--flux-resolution", type=int, default=1024,
                        help="the Flux-shaped stack's picture side in pixels (a CPU takes minutes at 512)")
    parser.add_argument("--flux-blocks", default="4,8",
                        help="double,single blocks of the Flux-shaped stack (4,8: 10 GB of weights in fp32)")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="auto: the GPU, where torch sees one")
    parser.add_argument("--classic-patcher", action="store_true",
                        help="leave dynamic VRAM off (on CUDA, ComfyUI 0.33 turns it on by default, as this script does)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    pack = load_pack(cpu=args.device == "cpu" or not torch.cuda.is_available(), dynamic_vram=not args.classic_patcher)
    import comfy.model_management
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    device = comfy.model_management.get_torch_device()
    steps, repeats = (3, 1) if args.smoke else (args.steps, args.repeats)
    builders = {"sd15": _sd15, "flux": functools.partial(
        _flux, resolution=args.flux_resolution, depth=tuple(int(v) for v in args.flux_blocks.split(",")))}
    results = []
    for name in args.models.split(","):
        case = builders[name](pack, device, args.smoke)
        results.append(measure(pack, case, device, steps, repeats, args.memory_only))
        print(json.dumps(results[-1]), flush=True)
        del case
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    table = report(results)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=1))
        (args.out / "bench_gpu.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
