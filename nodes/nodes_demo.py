"""Load Block Cache Demo Model: a built-in model, so the pack can be tried with no checkpoint."""

from __future__ import annotations

from comfy_api.latest import io

from ..demo_models.builtin_models import SMALL_UNET_CONFIGS, build_unet_patcher, context_dim_of, prompt_conditioning
from ..demo_models.reference_dit import load_reference_dit
from ..demo_models.reference_model import load_reference_model, pixel_space_vae
from ..demo_models.reference_video import load_reference_video
from .types import CATEGORY

REFERENCE = "reference"
REFERENCE_DIT = "reference_dit"
REFERENCE_VIDEO = "reference_video"
LOADERS = {REFERENCE: load_reference_model, REFERENCE_DIT: load_reference_dit, REFERENCE_VIDEO: load_reference_video}


class LoadDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheDemoModel",
            display_name="Load Block Cache Demo Model",
            category=CATEGORY,
            description="A built-in model made of ComfyUI's own classes, with conditioning for it, so the pack can "
                        "be tried with no checkpoint. 'reference' is a small trained text-to-image UNet and "
                        "'reference_dit' a small trained Flux transformer (both 32x32 pixels: coloured shapes on "
                        "textured backgrounds), 'reference_video' a small trained Wan 2.1 (8-frame 32x32 clips of "
                        "moving or colour-changing shapes); the other sizes have random weights.",
            inputs=[
                io.Combo.Input("size", options=[*LOADERS, *SMALL_UNET_CONFIGS], default=REFERENCE,
                               tooltip="'reference': the trained 32x32 pixel-space UNet (use EmptyLatentImage at "
                                       "256x256 or EmptyChromaRadianceLatentImage at 32x32, and VAE Decode with this "
                                       "node's VAE). 'reference_dit': the trained 32x32 pixel-space Flux transformer "
                                       "(ComfyUI's Flux class and Flux sampling; same latents and VAE). 'reference_video': "
                                       "the trained Wan 2.1 text-to-video model (ComfyUI's Wan class and sampling; use "
                                       "EmptyHunyuanLatentVideo at 256x256, length 29: 8 frames of 32x32, and this "
                                       "node's VAE). 'small': "
                                       "SD1.5's layout at a fifth of its width, random weights; 'tiny': for quick "
                                       "checks."),
                io.Int.Input("weight_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights of 'small' and 'tiny'; the reference models ignore it."),
                io.String.Input("positive_prompt", default="a large red circle at center on a blue striped background",
                                tooltip="Reference models: a caption such as 'a small yellow triangle at top left on a "
                                        "green checkered background' (colours, shapes, sizes, positions, textures; "
                                        "other words are ignored); 'reference_video' also knows 'moving left/right/up/down' and "
                                        "'turning <colour>'. Random-weight sizes: only picks a reproducible "
                                        "conditioning."),
                io.String.Input("negative_prompt", default="",
                                tooltip="Negative prompt; empty is the unconditional prompt the reference models "
                                        "were trained with for CFG."),
            ],
            outputs=[
                io.Model.Output(tooltip="The demo model."),
                io.Conditioning.Output(display_name="positive", tooltip="Conditioning for the positive prompt."),
                io.Conditioning.Output(display_name="negative", tooltip="Conditioning for the negative prompt."),
                io.Vae.Output(tooltip="ComfyUI's pixel-space VAE: VAE Decode turns the reference model's LATENT into "
                                      "an IMAGE (for 'reference_video', one IMAGE per frame). The random-weight sizes have no "
                                      "real VAE (their latent has 4 channels)."),
            ],
        )

    @classmethod
    def execute(cls, size, weight_seed, positive_prompt, negative_prompt) -> io.NodeOutput:
        if size in LOADERS:
            reference = LOADERS[size]()
            return io.NodeOutput(reference.patcher.clone(), reference.conditioning(positive_prompt),
                                 reference.conditioning(negative_prompt), reference.vae)
        model = build_unet_patcher(size, weight_seed)
        dim = context_dim_of(model)
        return io.NodeOutput(model, prompt_conditioning(positive_prompt, dim), prompt_conditioning(negative_prompt, dim),
                             pixel_space_vae())
