"""The main job on the built-in default: profile -> schedule -> apply -> sample, on CPU.

Runs the pack's own node classes as a graph would, on the trained reference model
(default; a 32x32 pixel-space text-to-image UNet, see models/reference/MODEL_CARD.md) or
on a random-weight small SD1.5-layout UNet (--model small), and times cached against
uncached sampling side by side (alternating runs). Writes the heatmaps, the schedule
JSON and the two results as pictures.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from comfy_bootstrap import load_pack


def _picture(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def _latent_picture(latent, vae=None) -> np.ndarray:
    """The reference model's pictures through its VAE, side by side; else the first three latent
    channels of the first item, normalised. Upscaled 8x."""
    if vae is not None:
        x = np.concatenate(list(vae.decode(latent).numpy()), axis=1)
    else:
        x = latent[0, :3].float().numpy()
        x = ((x - x.min()) / max(1e-8, float(x.max() - x.min()))).transpose(1, 2, 0)
    return np.kron(x, np.ones((8, 8, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--speedup", type=float, default=None, help="default: the builder's default")
    parser.add_argument("--cache-kinds", default="all", choices=["attention", "attention+resblock", "all"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cfg", type=float, default=5.0, help="the example workflows' cfg")
    parser.add_argument("--model", default="reference", choices=["reference", "small", "tiny"],
                        help="the trained reference model, or a random-weight SD1.5-layout UNet")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pack = load_pack()
    import comfy.utils
    import nodes as comfy_nodes
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False
    nodes = pack.nodes
    args.out.mkdir(parents=True, exist_ok=True)

    prompt = "a large red circle at center on a blue striped background"
    model, positive, negative, vae = nodes.nodes_demo.LoadDemoModel.execute(args.model, 0, prompt, "").result
    if args.model == "reference":
        latent = {"samples": torch.zeros(4, 3, 32, 32)}  # four 32x32 pictures (pixel space)
        size_text = "trained reference model, 4 x 32x32 pixels"
    else:
        latent = {"samples": torch.zeros(1, 4, 32, 32)}  # 256x256 pixels
        size_text = f"{args.model} SD1.5-layout UNet (random weights), 256x256"
        vae = None
    sampler = dict(seed=1, steps=args.steps, cfg=args.cfg, sampler_name="euler", scheduler="normal")

    latent_out, profile, heatmap = nodes.nodes_profile.ProfileBlockChanges.execute(
        model, sampler["seed"], args.steps, sampler["cfg"], "euler", "normal", positive, negative, latent, 1.0,
        vae).result
    speedup = args.speedup if args.speedup is not None else pack.block_caching.target_build.DEFAULT_SPEEDUP
    schedule, schedule_image, schedule_json, _ = nodes.nodes_schedule.BuildTargetSchedule.execute(
        profile, speedup, "auto", args.cache_kinds, 1, 0, 0).result
    (cached_model,) = nodes.nodes_apply.ApplyBlockCache.execute(model, schedule).result

    def run(m, steps=args.steps):
        start = time.perf_counter()
        (out,) = comfy_nodes.common_ksampler(m, sampler["seed"], steps, sampler["cfg"], "euler", "normal",
                                             positive, negative, latent)
        return time.perf_counter() - start, out["samples"]

    def psnr_of(samples, reference) -> tuple[float, float]:
        """Mean and worst PSNR over the pictures (as the benchmark measures): of the decoded pictures in
        [0, 1], or of the latents with their largest value as the peak."""
        if vae is not None:
            a, b, peak = vae.decode(samples), vae.decode(reference), 1.0
        else:
            a, b, peak = samples, reference, float(reference.abs().max())
        mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(1).clamp_min(1e-10)
        values = (10 * torch.log10(peak**2 / mse)).clamp(max=100.0)
        return float(values.mean()), float(values.min())

    run(model), run(cached_model)  # warm-up
    plain_times, cached_times = [], []
    for _ in range(args.repeats):
        t, plain = run(model)
        plain_times.append(t)
        t, cached = run(cached_model)
        cached_times.append(t)
    measured = float(np.median(plain_times) / np.median(cached_times))
    psnr = psnr_of(cached, plain)
    # The alternative at the same cost: fewer uncached steps.
    fewer = max(1, round(schedule.equivalent_steps))
    fewer_psnr = psnr_of(run(model, fewer)[1], plain)

    _picture(heatmap[0].numpy(), args.out / "profile_heatmap.png")
    _picture(schedule_image[0].numpy(), args.out / "schedule.png")
    _picture(np.concatenate([_latent_picture(plain, vae), _latent_picture(cached, vae)], axis=0), args.out / "uncached_vs_cached.png")
    (args.out / "schedule.json").write_text(schedule_json)
    print(f"\nBlock Cache demo: {size_text}, euler {args.steps} steps, cfg {sampler['cfg']}")
    print(f"  profile: {len(profile.block_map.layers)} layers x {profile.grid.steps} steps")
    print(f"  schedule: speed-up target {speedup:g}x, {args.cache_kinds}: {schedule.summary()}")
    print(f"  measured speed-up {measured:.2f}x (median of {args.repeats} alternating runs: "
          f"{np.median(plain_times):.3f}s uncached, {np.median(cached_times):.3f}s cached)")
    kind = "picture" if vae is not None else "latent"
    print(f"  {kind} PSNR vs uncached (mean / worst of {len(plain)}): {psnr[0]:.1f} / {psnr[1]:.1f} dB; "
          f"{fewer} uncached steps (about the same cost): {fewer_psnr[0]:.1f} / {fewer_psnr[1]:.1f} dB")
    if vae is None:
        print("  (random-weight model: fidelity here says little)")
    print(f"  wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out}")


if __name__ == "__main__":
    main()
