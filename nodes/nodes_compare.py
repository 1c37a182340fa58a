"""Compare Pictures: the cached run's fidelity against the uncached one, in the graph."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..block_caching.fidelity import compare_pictures, difference_map
from .types import CATEGORY

logger = logging.getLogger(__name__)

DEFAULT_GAIN = 8.0


class ComparePictures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheComparePictures",
            display_name="Compare Pictures",
            category=CATEGORY,
            description="How close the cached pictures are to the uncached ones (same seed and settings): PSNR "
                        "and SSIM per picture and on average, shown on the node and logged, and a map of where "
                        "they differ. About 30 dB PSNR or more and SSIM above 0.95 is hard to tell apart by eye.",
            inputs=[
                io.Image.Input("uncached", tooltip="The reference: the decoded pictures of the KSampler without "
                                                   "Block Cache."),
                io.Image.Input("cached", tooltip="The decoded pictures of the KSampler with Block Cache, same seed, "
                                                 "prompt and settings; as many and as large as the uncached ones."),
                io.Float.Input("difference_gain", default=DEFAULT_GAIN, min=1.0, max=100.0, step=0.5,
                               tooltip="The difference map shows |cached - uncached| times this, so small "
                                       "errors are visible (8: a difference of 1/8 of the full range is white)."),
            ],
            outputs=[
                io.Image.Output(display_name="difference",
                                tooltip="Per picture: |cached - uncached| x difference_gain, black where equal."),
                io.Float.Output(display_name="mean_psnr",
                                tooltip="PSNR in dB averaged over the pictures (100 where identical)."),
                io.Float.Output(display_name="mean_ssim",
                                tooltip="SSIM (11x11 gaussian window) averaged over the pictures; 1 where "
                                        "identical."),
            ],
            is_output_node=True,  # it reports on the node even when nothing uses its outputs
        )

    @classmethod
    def execute(cls, uncached: torch.Tensor, cached: torch.Tensor,
                difference_gain: float = DEFAULT_GAIN) -> io.NodeOutput:
        if cached.shape != uncached.shape:
            raise ValueError(f"Compare Pictures: the cached pictures are {_describe(cached)} but the uncached ones "
                             f"{_describe(uncached)}; give both the same count and size (same latent and decoder).")
        fidelity = compare_pictures(cached.movedim(-1, 1), uncached.movedim(-1, 1))
        lines = fidelity.lines()
        for line in lines:
            logger.info("Compare Pictures: cached against uncached, %s", line)
        return io.NodeOutput(difference_map(cached, uncached, float(difference_gain)), fidelity.mean_psnr,
                             fidelity.mean_ssim, ui={"text": ["\n".join(lines)]})


def _describe(images: torch.Tensor) -> str:
    return f"{images.shape[0]} x {images.shape[2]}x{images.shape[1]} px, {images.shape[3]} channels"
