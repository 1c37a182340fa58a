"""Trains the transformer reference model (demo_models/reference_dit.py) on the procedural captioned shapes.

Reproducible: the weights, the data stream and the noise all come from one seed, so
the same command on the same torch version gives the same run (thread timing aside).
Objective: rectified flow exactly as ComfyUI's Flux ``model_sampling`` defines it
(x_t = (1 - sigma) x_0 + sigma eps, the model predicts eps - x_0 from x_t and
timestep = sigma), with sigma drawn from ModelSamplingFlux's own shifted sigma table,
so KSampler samples the trained model with no adapter.

Writes the EMA weights to models/reference_dit/reference_dit.safetensors every
``--save-every`` seconds and at the end (stop it at any time), the loss log to
``--out``/loss.csv and a resumable state to ``--out``/state.pt.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_reference_dit.py      (make train-reference-dit)

The run stops at ``--max-steps`` or after ``--minutes``, whichever comes first. The committed
weights are this script's defaults: 4142 steps, which took 58 minutes on one thread of a 2-core
CPU shared with other jobs (the step count is also in the weights' metadata). The learning rate
does not depend on the run's length, so a run stopped earlier is a prefix of this one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from comfy_bootstrap import PACK_MODULE, load_pack


def seeded_init_(dit: torch.nn.Module, seed: int) -> None:
    """Seeded init of what ComfyUI leaves uninitialised (its ops skip weight init for fast loading).

    adaLN-Zero as in DiT: every modulation and the output layer start at zero, so each block
    starts as the identity and the model as a constant."""
    init = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in dit.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=init) / math.sqrt(module.weight.shape[1]))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()
        for name, param in dit.named_parameters():
            if name.endswith(".scale"):  # QK RMSNorm
                param.fill_(1.0)
            elif ".lin." in name or "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.zero_()


@contextlib.contextmanager
def out_of_place_iadd() -> Iterator[None]:
    """``a += b`` on tensors as ``a = a + b`` while the block forward runs for training.

    ComfyUI's Flux blocks add their residuals in place (``img += ...``) for inference memory;
    autograd rejects that, since the block's LayerNorm saved the tensor for backward. Rebinding
    the name to a new tensor computes the same values and keeps the graph valid."""
    original = torch.Tensor.__iadd__
    torch.Tensor.__iadd__ = lambda self, other: self + other
    try:
        yield
    finally:
        torch.Tensor.__iadd__ = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=90.0, help="wall-time cap")
    parser.add_argument("--max-steps", type=int, default=4142)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a busy 2-core machine two threads spin-wait on each other.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-every", type=float, default=300.0, help="seconds between checkpoints")
    parser.add_argument("--out", type=Path, default=Path("out/train_dit"))
    parser.add_argument("--weights", type=Path, default=None, help="default: the loader's path")
    parser.add_argument("--resume", action="store_true", help="continue from --out/state.pt")
    args = parser.parse_args()

    load_pack()
    reference = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_dit")
    text = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_model")
    data = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_data")
    import comfy.utils

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals make CPU training many times slower
    torch.manual_seed(args.seed)
    weights_path = args.weights or reference.WEIGHTS_PATH
    args.out.mkdir(parents=True, exist_ok=True)
    weights_path.parent.mkdir(parents=True, exist_ok=True)

    base = reference.build_base_model()
    dit = base.diffusion_model
    seeded_init_(dit, args.seed)
    encoder = text.TokenEncoder()
    model_sampling = base.model_sampling
    sigmas = model_sampling.sigmas.float()

    parameters = list(dit.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    ema_dit, ema_encoder = copy.deepcopy(dit).requires_grad_(False), copy.deepcopy(encoder).requires_grad_(False)
    data_generator = torch.Generator().manual_seed(args.seed + 1)
    noise_generator = torch.Generator().manual_seed(args.seed + 2)
    step, elapsed_before = 0, 0.0
    state_path = args.out / "state.pt"
    log_path = args.out / "loss.csv"
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        dit.load_state_dict(state["dit"])
        encoder.load_state_dict(state["encoder"])
        ema_dit.load_state_dict(state["ema_dit"])
        ema_encoder.load_state_dict(state["ema_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        data_generator.set_state(state["data_generator"])
        noise_generator.set_state(state["noise_generator"])
        step, elapsed_before = state["step"], state["elapsed"]
        print(f"resumed at step {step}")
    elif log_path.exists():
        log_path.unlink()

    def save() -> None:
        tensors = {f"diffusion_model.{k}": v.detach().float().contiguous() for k, v in ema_dit.state_dict().items()}
        tensors.update({f"text_encoder.{k}": v.detach().float().contiguous()
                        for k, v in ema_encoder.state_dict().items()})
        metadata = {"steps": str(step), "batch": str(args.batch), "seed": str(args.seed), "lr": str(args.lr),
                    "ema": str(args.ema), "minutes": f"{(elapsed_before + time.monotonic() - start) / 60:.1f}",
                    "objective": "rectified flow (eps - x0), Flux model_sampling", "resolution": str(reference.RESOLUTION)}
        comfy.utils.save_torch_file(tensors, str(weights_path), metadata=metadata)
        torch.save({"dit": dit.state_dict(), "encoder": encoder.state_dict(), "ema_dit": ema_dit.state_dict(),
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
            pictures, captions = data.training_batch(args.batch, data_generator)
            noise = torch.randn(pictures.shape, generator=noise_generator)
            t = torch.randint(0, len(sigmas), (args.batch,), generator=noise_generator)
            sigma = sigmas[t]
            noisy = model_sampling.noise_scaling(sigma, noise, pictures)
            ids = text.tokenize(captions)
            context = encoder(ids)
            with out_of_place_iadd():
                prediction = dit(noisy, sigma, context, y=reference.pooled(context, ids))
            loss = torch.nn.functional.mse_loss(prediction, noise - pictures)

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
                for ema, live in ((ema_dit, dit), (ema_encoder, encoder)):
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


if __name__ == "__main__":
    main()
