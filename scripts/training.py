"""The training loop both reference models share: AdamW with warm-up, gradient clipping, an EMA copy,
a loss log, resumable checkpoints, and the EMA weights saved as the loader's safetensors file.

Each training script builds its model and gives the loss of one batch; everything else is here.
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from collections.abc import Callable
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser, minutes: float, max_steps: int, out: str) -> None:
    parser.add_argument("--minutes", type=float, default=minutes, help="wall-time cap")
    parser.add_argument("--max-steps", type=int, default=max_steps)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a busy 2-core machine two threads spin-wait on each other, about 10x slower per step.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-every", type=float, default=300.0, help="seconds between checkpoints")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--weights", type=Path, default=None, help="default: the loader's path")
    parser.add_argument("--resume", action="store_true", help="continue from --out/state.pt")


def prepare(args: argparse.Namespace, default_weights: Path) -> Path:
    """Threads, denormals and the seed; returns the weights' path, with the folders made."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals make CPU training many times slower
    torch.manual_seed(args.seed)
    weights_path = args.weights or default_weights
    args.out.mkdir(parents=True, exist_ok=True)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    return weights_path


def train(args: argparse.Namespace, *, model: torch.nn.Module, encoder: torch.nn.Module, name: str,
          weights_path: Path, metadata: dict[str, str],
          training_batch: Callable[[int, torch.Generator], tuple[torch.Tensor, list[str]]],
          batch_loss: Callable[[torch.Tensor, list[str], torch.Generator], torch.Tensor]) -> None:
    """Trains ``model`` (the diffusion model, checkpointed as ``name``) and ``encoder`` together;
    ``batch_loss(pictures, captions, noise_generator)`` is one batch's loss."""
    import comfy.utils

    parameters = list(model.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    ema_model, ema_encoder = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(encoder).requires_grad_(False)
    data_generator = torch.Generator().manual_seed(args.seed + 1)
    noise_generator = torch.Generator().manual_seed(args.seed + 2)
    step, elapsed_before = 0, 0.0
    state_path = args.out / "state.pt"
    log_path = args.out / "loss.csv"
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state[name])
        encoder.load_state_dict(state["encoder"])
        ema_model.load_state_dict(state[f"ema_{name}"])
        ema_encoder.load_state_dict(state["ema_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        data_generator.set_state(state["data_generator"])
        noise_generator.set_state(state["noise_generator"])
        step, elapsed_before = state["step"], state["elapsed"]
        print(f"resumed at step {step}")
    elif log_path.exists():
        log_path.unlink()

    def save() -> None:
        tensors = {f"diffusion_model.{k}": v.detach().float().contiguous() for k, v in ema_model.state_dict().items()}
        tensors.update({f"text_encoder.{k}": v.detach().float().contiguous()
                        for k, v in ema_encoder.state_dict().items()})
        run = {"steps": str(step), "batch": str(args.batch), "seed": str(args.seed), "lr": str(args.lr),
               "ema": str(args.ema), "minutes": f"{(elapsed_before + time.monotonic() - start) / 60:.1f}"}
        comfy.utils.save_torch_file(tensors, str(weights_path), metadata={**run, **metadata})
        torch.save({name: model.state_dict(), "encoder": encoder.state_dict(), f"ema_{name}": ema_model.state_dict(),
                    "ema_encoder": ema_encoder.state_dict(), "optimizer": optimizer.state_dict(),
                    "data_generator": data_generator.get_state(), "noise_generator": noise_generator.get_state(),
                    "step": step, "elapsed": elapsed_before + time.monotonic() - start}, state_path)
        print(f"saved step {step} to {weights_path}", flush=True)

    start = time.monotonic()
    last_save = start
    running = None
    with log_path.open("a", newline="") as log_file:
        log = csv.writer(log_file)
        if step == 0:
            log.writerow(["step", "loss", "minutes"])
        while step < args.max_steps and elapsed_before + time.monotonic() - start < args.minutes * 60:
            pictures, captions = training_batch(args.batch, data_generator)
            loss = batch_loss(pictures, captions, noise_generator)

            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            step += 1
            # EMA with a short horizon early on, so a run stopped early still has useful weights.
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for ema, live in ((ema_model, model), (ema_encoder, encoder)):
                    for e, p in zip(ema.parameters(), live.parameters(), strict=True):
                        e.lerp_(p, 1 - decay)

            value = float(loss.detach())
            running = value if running is None else 0.98 * running + 0.02 * value
            minutes = (elapsed_before + time.monotonic() - start) / 60
            log.writerow([step, f"{value:.5f}", f"{minutes:.2f}"])
            if step % 25 == 0:
                log_file.flush()
                print(f"step {step} loss {value:.4f} (smoothed {running:.4f}) {minutes:.1f} min", flush=True)
            if time.monotonic() - last_save > args.save_every:
                save()
                last_save = time.monotonic()
    save()
