"""Load Block Cache Demo Model: a built-in model, so the pack can be tried with no checkpoint."""

from __future__ import annotations

from comfy_api.latest import io

from ..core.builtin_models import SMALL_UNET_CONFIGS, build_unet_patcher, context_dim_of, prompt_conditioning
from .types import CATEGORY


class LoadDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheDemoModel",
            display_name="Load Block Cache Demo Model",
            category=CATEGORY,
            description="A small SD1.5-layout UNet built from ComfyUI's own classes with seeded weights, and "
                        "conditioning for it. For trying the pack and for tests; it draws no real pictures.",
            inputs=[
                io.Combo.Input("size", options=list(SMALL_UNET_CONFIGS), default="small",
                               tooltip="'small': SD1.5's layout at a fifth of its width; 'tiny': for quick checks."),
                io.Int.Input("weight_seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the model weights."),
                io.String.Input("positive_prompt", default="a red circle on a blue background",
                                tooltip="Picks a reproducible conditioning (the demo model has no text encoder)."),
                io.String.Input("negative_prompt", default="", tooltip="Picks the negative conditioning."),
            ],
            outputs=[
                io.Model.Output(tooltip="The demo model."),
                io.Conditioning.Output(display_name="positive", tooltip="Conditioning for the positive prompt."),
                io.Conditioning.Output(display_name="negative", tooltip="Conditioning for the negative prompt."),
            ],
        )

    @classmethod
    def execute(cls, size, weight_seed, positive_prompt, negative_prompt) -> io.NodeOutput:
        model = build_unet_patcher(size, weight_seed)
        dim = context_dim_of(model)
        return io.NodeOutput(model, prompt_conditioning(positive_prompt, dim), prompt_conditioning(negative_prompt, dim))
