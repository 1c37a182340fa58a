"""Parallel decoding benchmark (Faster Diffusion) on the trained reference model, CPU.

Side by side in one run, on the same prompts and seeds, for each configuration (sampler, steps, the
paper's key steps for it):

* no cache;
* sequential encoder propagation (Faster Diffusion Schedule -> Apply Block Cache; conv_in recomputed);
* sequential encoder propagation with conv_in reused (``ParallelDecoding(batched=False)``): the same
  computation as parallel decoding, one step at a time;
* parallel decoding (Apply Block Cache's ``parallel_decoding``).

Per method: wall time and the speed-up against no cache. Every round runs all methods in a rotated
order; on a machine shared with other jobs the best (least disturbed) time of each method is the
steadiest figure, so the table gives the best time, the speed-up of best times, and the median over
rounds of the per-round ratio (no-cache time / method time) beside it. Also: real UNet passes
and their batch rows, the peak of live tensor memory during sampling (torch.profiler's CPU memory
events, in a separate untimed run), PSNR of the pictures against the uncached pictures, and for
parallel decoding the largest difference to its sequential twin.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_parallel_decoding.py --out out/bench_parallel
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from benchmark import _module, _pictures, psnr
from comfy_bootstrap import load_pack

CONFIGS = {
    # name: (sampler, scheduler, steps, key-step preset); the paper's two settings
    "ddim50": ("ddim", "ddim_uniform", 50, "paper_ddim_50"),
    "dpmpp_2m20": ("dpmpp_2m", "karras", 20, "paper_dpm_solver_20"),
}


@dataclasses.dataclass
class Method:
    name: str
    model: Any
    decoder: Any = None
    times: list[float] = dataclasses.field(default_factory=list)
    ratios: list[float] = dataclasses.field(default_factory=list)
    output: torch.Tensor | None = None
    rows: list[int] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0


def peak_tensor_bytes(fn: Any) -> int:
    """The most bytes of CPU tensors live at once while ``fn`` runs, above what was live at its start.

    From torch.profiler's memory events: an op's own allocations count at its start, frees at their
    time. A leaf op's internal scratch memory that it frees before returning is not seen.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for event in prof.events():
        delta = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if delta:
            deltas.append((event.time_range.start, delta))
    deltas.sort(key=lambda item: item[0])
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


class Passes:
    """Rows of every real UNet pass (a pre-hook on the output head, which every real pass runs)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.rows: list[int] = []
        unet.out.register_forward_pre_hook(lambda _m, args: self.rows.append(int(args[0].shape[0])))


def run_config(name: str, args: argparse.Namespace, reference: Any) -> dict[str, Any]:
    import nodes as comfy_nodes

    fd = _module("faster_diffusion")
    patching = _module("patching")
    pd = _module("parallel_decoding")
    mapping = _module("mapping")
    reference_data = _module("reference_data")
    reference_model = _module("reference_model")

    sampler, scheduler, steps, preset = CONFIGS[name]
    model = reference.patcher.clone()
    prompts = reference_data.benchmark_prompts(args.prompts)
    positive = [[reference.encode(prompts), {}]]
    negative = reference.conditioning("")
    latent = reference_model.empty_latent(len(prompts))

    grid = fd.grid_for_model(model, steps, sampler, scheduler)
    schedule = fd.build_faster_diffusion_schedule(mapping.block_map_for_patcher(model), grid,
                                                  fd.FasterDiffusionOptions(key_steps=preset))
    keys = schedule.builder["key_steps"]
    encoder_propagation, _ = patching.apply_block_cache(model, schedule)

    def with_decoding(**config: Any) -> tuple[Any, Any]:
        patched, holder = patching.apply_block_cache(model, schedule,
                                                     options=[pd.ParallelDecoding(enabled=True, **config)])
        return patched, pd.installed_on(holder)

    seq_conv, seq_decoder = with_decoding(batched=False)
    parallel, par_decoder = with_decoding()
    methods = [Method("no cache", model), Method("sequential encoder propagation", encoder_propagation),
               Method("sequential, conv_in reused", seq_conv, seq_decoder),
               Method("parallel decoding", parallel, par_decoder)]

    def sample(m: Any) -> torch.Tensor:
        (out,) = comfy_nodes.common_ksampler(m, args.seed, steps, args.cfg, sampler, scheduler, positive, negative,
                                             latent)
        return out["samples"]

    passes = Passes(model.get_model_object("diffusion_model"))
    for method in methods:  # warm-up, and the outputs and passes of each method
        passes.rows = []
        method.output = sample(method.model)
        method.rows = list(passes.rows)
    for round_index in range(args.rounds):
        shift = round_index % len(methods)
        order = methods[shift:] + methods[:shift]
        seconds = {}
        for method in order:
            start = time.perf_counter()
            sample(method.model)
            seconds[method.name] = time.perf_counter() - start
            method.times.append(seconds[method.name])
        for method in methods:
            method.ratios.append(seconds["no cache"] / seconds[method.name])
        print(f"{name}: round {round_index + 1}/{args.rounds}: " +
              ", ".join(f"{m.name} {seconds[m.name]:.2f} s" for m in methods), flush=True)
    for method in methods:
        method.peak_bytes = peak_tensor_bytes(lambda method=method: sample(method.model))

    reference_pictures = _pictures(methods[0].output)
    rows = []
    for method in methods:
        pictures = _pictures(method.output)
        stats = method.decoder.last_stats if method.decoder is not None else None
        rows.append({
            "method": method.name,
            "seconds": min(method.times),
            "seconds_median": statistics.median(method.times),
            "speedup": min(methods[0].times) / min(method.times),
            "speedup_paired_median": statistics.median(method.ratios),
            "speedup_rounds": method.ratios,
            "unet_passes": len(method.rows),
            "unet_rows": sum(method.rows),
            "largest_batch": max(method.rows),
            "peak_tensor_mb": method.peak_bytes / 2**20,
            "psnr": float(psnr(pictures, reference_pictures).mean()),
            "psnr_min": float(psnr(pictures, reference_pictures).min()),
            "parallel_stats": dataclasses.asdict(stats) if stats is not None else None,
        })
    difference = float((methods[3].output - methods[2].output).abs().max())
    return {"config": name, "sampler": sampler, "scheduler": scheduler, "steps": steps, "key_steps": keys,
            "pictures": len(prompts), "cfg": args.cfg, "rounds": args.rounds, "rows": rows,
            "parallel_vs_sequential_conv_in_max_abs_difference": difference,
            "output_max_abs": float(methods[2].output.abs().max())}


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for config in results["configs"]:
        lines.append(f"**{config['sampler']}/{config['scheduler']} {config['steps']} steps**, key steps "
                     f"{config['key_steps']}; {config['pictures']} pictures x cfg {config['cfg']:g}; "
                     f"{config['rounds']} rounds. Parallel vs its sequential twin: max abs difference "
                     f"{config['parallel_vs_sequential_conv_in_max_abs_difference']:.2g} (outputs up to "
                     f"{config['output_max_abs']:.2f}).")
        lines.append("")
        lines.append("| method | wall time (best) | speed-up (best; paired median) | UNet passes (rows) | "
                     "largest batch | peak tensor memory | PSNR dB (mean / min) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for row in config["rows"]:
            quality = "identical" if row["psnr"] >= 100 else f"{row['psnr']:.1f} / {row['psnr_min']:.1f}"
            lines.append(f"| {row['method']} | {row['seconds']:.2f} s | {row['speedup']:.2f}x; "
                         f"{row['speedup_paired_median']:.2f}x | "
                         f"{row['unet_passes']} ({row['unet_rows']}) | {row['largest_batch']} | "
                         f"{row['peak_tensor_mb']:.1f} MB | {quality} |")
        lines.append("")
    lines.append(f"Machine: {results['machine']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/bench_parallel"))
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    load_pack()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    reference = _module("reference_model").load_reference_model()
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU",
        "configs": [run_config(name, args, reference) for name in args.configs],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "table.md").write_text(table)
    print(table)
    print(f"wrote results.json and table.md to {args.out}")


if __name__ == "__main__":
    main()
