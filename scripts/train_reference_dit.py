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
import importlib
import math
from collections.abc import Iterator

import torch
import training
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
    training.add_arguments(parser, minutes=90.0, max_steps=4142, out="out/train_dit")
    args = parser.parse_args()

    load_pack()
    reference = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_dit")
    text = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_model")
    data = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_data")
    weights_path = training.prepare(args, reference.WEIGHTS_PATH)

    base = reference.build_base_model()
    dit = base.diffusion_model
    seeded_init_(dit, args.seed)
    encoder = text.TokenEncoder()
    model_sampling = base.model_sampling
    sigmas = model_sampling.sigmas.float()

    def batch_loss(pictures: torch.Tensor, captions: list[str], noise_generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(pictures.shape, generator=noise_generator)
        t = torch.randint(0, len(sigmas), (args.batch,), generator=noise_generator)
        sigma = sigmas[t]
        noisy = model_sampling.noise_scaling(sigma, noise, pictures)
        ids = text.tokenize(captions)
        context = encoder(ids)
        with out_of_place_iadd():
            prediction = dit(noisy, sigma, context, y=reference.pooled(context, ids))
        return torch.nn.functional.mse_loss(prediction, noise - pictures)

    training.train(args, model=dit, encoder=encoder, name="dit", weights_path=weights_path,
                   metadata={"objective": "rectified flow (eps - x0), Flux model_sampling",
                             "resolution": str(reference.RESOLUTION)},
                   training_batch=data.training_batch, batch_loss=batch_loss)


if __name__ == "__main__":
    main()
