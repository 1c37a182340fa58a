"""Trains the video reference model (demo_models/reference_video.py) on the procedural captioned clips.

Reproducible: the weights, the data stream and the noise all come from one seed. Objective: rectified
flow exactly as ComfyUI's Wan ``model_sampling`` defines it (x_t = (1 - sigma) x_0 + sigma eps, the
model predicts eps - x_0 from x_t at timestep 1000 sigma). Half of each batch draws sigma from
Wan's shifted sigma table (shift 8, where sampling spends its steps), half uniformly, so the last,
low-noise steps that shape the details are learned too.

Writes the EMA weights to models/reference_video/reference_video.safetensors every ``--save-every``
seconds and at the end, the loss log to ``--out``/loss.csv and a resumable state to ``--out``/state.pt.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_reference_video.py      (make train-reference-video)

The run stops at ``--max-steps`` or after ``--minutes``, whichever comes first. The committed weights
are this script's defaults: 3221 steps, which took 65 minutes on one thread of a 2-core CPU shared with
other jobs (the step count is also in the weights' metadata). The learning rate does not depend on the
run's length, so a run stopped earlier is a prefix of this one.
"""

from __future__ import annotations

import argparse
import importlib
import math

import torch
import training
from comfy_bootstrap import PACK_MODULE, load_pack
from train_reference_dit import out_of_place_iadd


def seeded_init_(wan: torch.nn.Module, seed: int) -> None:
    """Seeded init of what ComfyUI leaves uninitialised (its ops skip weight init for fast loading).

    Every block's output projections and the head start at zero, so each block starts as the identity
    (as adaLN-Zero); the modulation tables as Wan initialises them (randn / sqrt(dim))."""
    init = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wan.named_parameters():
            if name.endswith("modulation"):
                param.copy_(torch.randn(param.shape, generator=init) / math.sqrt(param.shape[-1]))
            elif name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:  # LayerNorm and RMSNorm scales
                param.fill_(1.0)
            elif any(part in name for part in (".o.weight", "ffn.2.weight", "head.head.weight")):
                param.zero_()
            else:  # Linear and the patch-embedding Conv3d
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=init) / math.sqrt(fan_in))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_arguments(parser, minutes=90.0, max_steps=3221, out="out/train_video")
    parser.set_defaults(batch=8)
    args = parser.parse_args()

    load_pack()
    reference = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_video")
    text = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_model")
    clips = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_clips")
    weights_path = training.prepare(args, reference.WEIGHTS_PATH)

    base = reference.build_base_model()
    wan = base.diffusion_model.requires_grad_(True)
    seeded_init_(wan, args.seed)
    encoder = text.TokenEncoder(vocabulary=reference.VIDEO_VOCABULARY)
    model_sampling = base.model_sampling
    sigmas = model_sampling.sigmas.float()

    def batch_loss(videos: torch.Tensor, captions: list[str], noise_generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(videos.shape, generator=noise_generator)
        from_table = sigmas[torch.randint(0, len(sigmas), (args.batch,), generator=noise_generator)]
        uniform = torch.rand(args.batch, generator=noise_generator).clamp_min(1e-3)
        sigma = torch.where(torch.arange(args.batch) % 2 == 0, from_table, uniform)
        noisy = model_sampling.noise_scaling(sigma, noise, videos)
        context = encoder(text.tokenize(captions, reference.VIDEO_VOCABULARY))
        with out_of_place_iadd():
            prediction = wan(noisy, model_sampling.timestep(sigma), context)
        return torch.nn.functional.mse_loss(prediction, noise - videos)

    training.train(args, model=wan, encoder=encoder, name="video", weights_path=weights_path,
                   metadata={"objective": "rectified flow (eps - x0), Wan model_sampling (shift 8)",
                             "resolution": str(reference.RESOLUTION), "frames": str(reference.FRAMES)},
                   training_batch=clips.training_batch, batch_loss=batch_loss)


if __name__ == "__main__":
    main()
