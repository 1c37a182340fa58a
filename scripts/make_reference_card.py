"""Pictures for a reference model's card and the README, made with ComfyUI's own sampler.

Writes to models/reference/ (``--model unet``), models/reference_dit/ (``--model dit``) or
models/reference_video/ (``--model video``): loss_curve.png (from the training log), samples.png (a
grid of prompts x seeds sampled by KSampler and decoded by core VAEDecode; for video, one row per
prompt and seed with its frames across), training_data.png and profile_heatmap.png (Profile Block
Changes on the model: change per layer and step).

    .venv/bin/python scripts/make_reference_card.py --log out/train/loss.csv
    .venv/bin/python scripts/make_reference_card.py --model dit --log out/train_dit/loss.csv
    .venv/bin/python scripts/make_reference_card.py --model video --log out/train_video/loss.csv --steps 30 --seeds 2
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
from pathlib import Path

import numpy as np
import torch
from comfy_bootstrap import PACK_MODULE, PACK_ROOT, load_pack
from PIL import Image, ImageDraw, ImageFont
from plotting import Series, plot

# Per model: loader module, loader function, card folder, scheduler, training objective (loss plot title).
MODELS = {
    "unet": ("reference_model", "load_reference_model", "reference", "normal", "eps-prediction MSE"),
    "dit": ("reference_dit", "load_reference_dit", "reference_dit", "simple", "flow-matching (eps - x0) MSE"),
    "video": ("reference_video", "load_reference_video", "reference_video", "simple", "flow-matching (eps - x0) MSE"),
}
VIDEO_PROMPTS = [
    "a large red circle at left moving right on a blue striped background",
    "a small yellow triangle at top moving down on a green background",
    "a large white square at center turning red on a black checkered background",
    "a large purple ring at bottom moving up on a yellow background",
    "a small green diamond at right moving left on a red dotted background",
    "a large blue triangle at center turning yellow on a white background",
]
PROMPTS = [
    "a large red circle at center on a blue striped background",
    "a small yellow triangle at top left on a green background",
    "a large white square at bottom right on a black checkered background",
    "a large purple ring at center on a yellow background",
    "a small green diamond at top right on a red dotted background",
    "a large orange striped circle at left on a white background",
    "a large blue triangle at bottom on a orange checkered background",
    "a black square at top on a white striped background",
]


def loss_curve(log: Path, out: Path, objective: str) -> None:
    steps, losses = [], []
    with log.open() as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    window = 50
    smoothed = [float(np.mean(losses[max(0, i - window + 1): i + 1])) for i in range(len(losses))]
    plot([Series("loss per batch", steps, losses, colour=(190, 190, 220)),
          Series(f"mean of last {window}", steps, smoothed, colour=(31, 119, 180))],
         str(out), title=f"Reference model training: {objective}", xlabel="step", ylabel="MSE (log)", log_y=True)


def sample_grid(reference, out: Path, seeds: int, steps: int, cfg: float, scheduler: str,
                video: bool = False) -> None:
    """Images: one row per prompt, one picture per seed. Video: one row per prompt and seed, its frames across."""
    import nodes as comfy_nodes

    font = ImageFont.load_default()
    scale, cell = 3, 32 * 3 + 4
    rows = []
    for prompt in VIDEO_PROMPTS if video else PROMPTS:
        latent = {"samples": torch.zeros(seeds, 3, *((8,) if video else ()), 32, 32)}
        (samples,) = comfy_nodes.common_ksampler(reference.patcher, 1, steps, cfg, "euler", scheduler,
                                                 reference.conditioning(prompt), reference.conditioning(""), latent)
        if video:  # VAE Decode gives every clip's frames as one batch of images
            for seed in range(seeds):
                (frames,) = comfy_nodes.VAEDecode().decode(reference.vae, {"samples": samples["samples"][seed:seed + 1]})
                rows.append((f"{prompt} (seed {seed + 1})", frames))
        else:
            (images,) = comfy_nodes.VAEDecode().decode(reference.vae, samples)
            rows.append((prompt, images))
    label_w = 470
    columns = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (label_w + columns * cell, len(rows) * cell + 20), "white")
    draw = ImageDraw.Draw(canvas)
    across = "frames across" if video else f"{seeds} seeds"
    draw.text((4, 4), f"KSampler euler/{scheduler} {steps} steps, cfg {cfg}; one row per prompt, {across}",
              fill="black", font=font)
    for r, (prompt, images) in enumerate(rows):
        y = 20 + r * cell
        draw.text((4, y + cell // 2 - 6), prompt, fill="black", font=font)
        for c, image in enumerate(images):
            tile = Image.fromarray((image.numpy() * 255).clip(0, 255).astype(np.uint8)).resize((32 * scale,) * 2,
                                                                                               Image.NEAREST)
            canvas.paste(tile, (label_w + c * cell + 2, y + 2))
    canvas.save(out)


def training_grid(out: Path, video: bool = False) -> None:
    """32 training pictures, or 4 training clips (one row of 8 frames per clip)."""
    data = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_{'clips' if video else 'data'}")
    pictures, _ = data.training_batch(4 if video else 32, torch.Generator().manual_seed(5), drop_caption=0,
                                      drop_part=0)
    if video:  # clip after clip, frame after frame: one row of 8 per clip
        pictures = pictures.movedim(2, 1).flatten(0, 1)
    grid = ((pictures + 1) / 2).clamp(0, 1)
    rows = math.ceil(len(grid) / 8)
    canvas = torch.ones(3, rows * 34, 8 * 34)
    for i, p in enumerate(grid):
        r, c = divmod(i, 8)
        canvas[:, r * 34 + 1: r * 34 + 33, c * 34 + 1: c * 34 + 33] = p
    canvas = canvas.repeat_interleave(3, 1).repeat_interleave(3, 2)
    Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(out)


def profile_heatmap(reference, out: Path, steps: int, cfg: float, scheduler: str, video: bool = False) -> None:
    pack = load_pack()
    data = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_{'clips' if video else 'data'}")
    prompts = data.benchmark_prompts(4, seed=99)
    latent = {"samples": torch.zeros(len(prompts), 3, *((8,) if video else ()), 32, 32)}
    positive = reference.conditioning_batch(prompts)
    _, _, heatmap = pack.nodes.nodes_profile.ProfileBlockChanges.execute(
        reference.patcher, 2, steps, cfg, "euler", scheduler, positive, reference.conditioning(""), latent, 1.0).result
    Image.fromarray((heatmap[0].numpy() * 255).clip(0, 255).astype(np.uint8)).save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="unet")
    parser.add_argument("--log", type=Path, default=Path("out/train/loss.csv"))
    parser.add_argument("--out", type=Path, default=None, help="default: the model's folder in models/")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    # One thread: two threads on a busy 2-core machine spin-wait on each other and run many times slower.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    load_pack()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    torch.set_num_threads(args.threads)
    module, loader, folder, scheduler, objective = MODELS[args.model]
    reference = getattr(importlib.import_module(f"{PACK_MODULE}.demo_models.{module}"), loader)()
    out = args.out or PACK_ROOT / "models" / folder
    out.mkdir(parents=True, exist_ok=True)
    if args.log.exists():
        loss_curve(args.log, out / "loss_curve.png", objective)
    video = args.model == "video"
    training_grid(out / "training_data.png", video)
    sample_grid(reference, out / "samples.png", args.seeds, args.steps, args.cfg, scheduler, video)
    profile_heatmap(reference, out / "profile_heatmap.png", args.steps, args.cfg, scheduler, video)
    print(f"wrote {', '.join(sorted(p.name for p in out.glob('*.png')))} to {out}")


if __name__ == "__main__":
    main()
