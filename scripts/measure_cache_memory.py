"""Peak memory with and without Block Cache on a video model (Wan 2.1 1.3B block width), on CPU.

Each configuration runs in a fresh subprocess and reports its peak resident memory
(ru_maxrss), so the difference between configurations is what caching adds.

The model is ComfyUI's own WAN21 (WanModel) at the real 1.3B width (dim 1536, 12 heads,
ffn 8960, text dim 4096) with fewer blocks than the real 30, at a real 480x832 latent.
Cache memory grows linearly with the blocks cached, so the report also gives the measured
per-block figure extrapolated to the full 30 blocks and to Wan 14B's width.

    .venv/bin/python scripts/measure_cache_memory.py [--blocks 2] [--frames 17]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = ("no cache", "all-compute schedule", "caching schedule")


def _child(config: str, blocks: int, frames: int, height: int, width: int) -> dict:
    from comfy_bootstrap import load_pack

    pack = load_pack()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    import comfy.utils
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False
    torch.manual_seed(0)
    unet_config = {"image_model": "wan2.1", "model_type": "t2v", "dim": 1536, "out_dim": 16, "num_heads": 12,
                   "ffn_dim": 8960, "num_layers": blocks, "patch_size": (1, 2, 2), "freq_dim": 256,
                   "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16,
                   "text_dim": 4096, "text_len": 512}
    model_config = comfy.supported_models.WAN21_T2V(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    pack.demo_models.builtin_models.seeded_init_(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    latent = torch.zeros(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 512, 4096, generator=generator), {}]]
    negative = [[torch.randn(1, 512, 4096, generator=generator), {}]]
    steps = 2
    sampler = patcher
    holder = None
    if config != "no cache":
        block_map = pack.block_maps.mapping.block_map_for_patcher(patcher)
        model_sampling = patcher.get_model_object("model_sampling")
        import comfy.samplers

        sigmas = comfy.samplers.calculate_sigmas(model_sampling, "normal", steps).cpu()
        grid = pack.runtime.time_grid.StepGrid.from_sigmas(model_sampling, sigmas)
        schedule = pack.block_caching.schedule.all_compute_schedule(block_map, grid)
        if config == "caching schedule":  # every block computed at step 0 and reused at step 1
            layers = tuple(dataclasses.replace(layer, compute=(True, False)) for layer in schedule.layers)
            schedule = dataclasses.replace(schedule, layers=layers)
        sampler, holder = pack.block_caching.patching.apply_block_cache(patcher, schedule)
    noise = comfy.sample.prepare_noise(latent, 0)
    started = time.perf_counter()
    comfy.sample.sample(sampler, noise, steps, 5.0, "euler", "normal", positive, negative, latent, seed=0)
    seconds = time.perf_counter() - started
    tokens = latent.shape[2] * (latent.shape[3] // 2) * (latent.shape[4] // 2)
    return {
        "config": config,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds,
        "tokens": tokens,
        "reused": int(holder.last_run.reused.sum()) if holder and holder.last_run else 0,
        "peak_cache_mb": holder.last_run.figures["cache"].peak_cache_bytes / 2**20 if holder and holder.last_run else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--child", choices=CONFIGS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.blocks, args.frames, args.height, args.width)))
        return
    results = {}
    for config in CONFIGS:
        command = [sys.executable, __file__, "--child", config, "--blocks", str(args.blocks), "--frames",
                   str(args.frames), "--height", str(args.height), "--width", str(args.width)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[config] = json.loads(output.strip().splitlines()[-1])
        print(f"{config}: {results[config]}", flush=True)
    base = results["no cache"]["peak_rss_mb"]
    tokens = results["no cache"]["tokens"]
    cache_mb = results["caching schedule"]["peak_cache_mb"]
    expected_mb = tokens * 1536 * 4 * 2 / 2**20  # fp32 residual, cond + uncond chunks
    print()
    print(f"Wan 2.1 1.3B width, {args.blocks} blocks, {args.frames} frames at {args.width}x{args.height} "
          f"({tokens} tokens), fp32, CFG 5 (cond + uncond in one batch), CPU")
    print("| configuration | peak RSS (MB) | vs no cache (MB) | cache held at most (MB) | sampling time (s) |")
    print("|---|---|---|---|---|")
    for config in CONFIGS:
        rss = results[config]["peak_rss_mb"]
        print(f"| {config} | {rss:.0f} | {rss - base:+.0f} | {results[config]['peak_cache_mb']:.0f} | "
              f"{results[config]['seconds']:.1f} |")
    print()
    print(f"Cache per block: {cache_mb / args.blocks:.1f} MB held, expected {expected_mb:.1f} MB "
          f"(tokens x 1536 x 4 bytes x 2 chunks).")
    print(f"All 30 blocks of Wan 1.3B: ~{30 * expected_mb / 1024:.1f} GB fp32, ~{15 * expected_mb / 1024:.1f} GB bf16. "
          f"Wan 14B (dim 5120, 40 blocks, bf16): ~{40 * expected_mb * 5120 / 1536 / 2 / 1024:.1f} GB.")


if __name__ == "__main__":
    main()
