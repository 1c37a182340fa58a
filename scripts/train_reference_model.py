"""Trains the reference model (demo_models/reference_model.py) on the procedural captioned shapes.

Reproducible: the weights, the data stream and the noise all come from one seed, so
the same command on the same torch version gives the same run (thread timing aside).
Objective: SD1.5's discrete eps prediction, exactly as ComfyUI's ``model_sampling``
defines it (x_t = x_0 + sigma * eps, model input x_t / sqrt(sigma^2 + 1), timestep from
sigma), so KSampler samples the trained model with no adapter.

Writes the EMA weights to models/reference/reference_unet.safetensors every
``--save-every`` seconds and at the end (stop it at any time), the loss log to
``--out``/loss.csv and a resumable state to ``--out``/state.pt.

    nohup .venv/bin/python scripts/train_reference_model.py --minutes 60 > out/train/train.log 2>&1 &

The committed weights are step 828 of ``--threads 1 --warmup 100 --save-every 300`` (stopped
by hand after 45 minutes); ``--max-steps 828`` repeats that run.
"""

from __future__ import annotations

import argparse
import importlib
import math

import torch
import training
from comfy_bootstrap import PACK_MODULE, load_pack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_arguments(parser, minutes=60.0, max_steps=100_000, out="out/train")
    args = parser.parse_args()

    load_pack()
    reference = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_model")
    data = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_data")
    weights_path = training.prepare(args, reference.WEIGHTS_PATH)

    base = reference.build_base_model()
    unet = base.diffusion_model
    # Seeded init of what ComfyUI leaves uninitialised (its ops skip weight init for fast loading).
    init = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=init)
                                    / math.sqrt(module.weight[0].numel()))
                if module.bias is not None:
                    module.bias.zero_()
            # Zero the last layer of each residual branch and the output: the usual diffusion UNet init.
            if name.endswith("out_layers.3") or name.endswith("proj_out") or name == "out.2":
                for param in module.parameters():
                    param.zero_()
    encoder = reference.TokenEncoder()
    model_sampling = base.model_sampling
    sigmas = model_sampling.sigmas.float()

    def batch_loss(pictures: torch.Tensor, captions: list[str], noise_generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(pictures.shape, generator=noise_generator)
        t = torch.randint(0, len(sigmas), (args.batch,), generator=noise_generator)
        sigma = sigmas[t]
        noisy = pictures + noise * sigma.view(-1, 1, 1, 1)
        model_input = model_sampling.calculate_input(sigma, noisy)
        context = encoder(reference.tokenize(captions))
        prediction = unet(model_input, model_sampling.timestep(sigma).float(), context=context)
        return torch.nn.functional.mse_loss(prediction, noise)

    training.train(args, model=unet, encoder=encoder, name="unet", weights_path=weights_path,
                   metadata={"objective": "eps, SD1.5 discrete model_sampling",
                             "resolution": str(reference.RESOLUTION)},
                   training_batch=data.training_batch, batch_loss=batch_loss)


if __name__ == "__main__":
    main()
