"""Calibrate Block Cache: Block Caching's learned scale-shift correction (paper Sec. 3.4)."""

from __future__ import annotations

import comfy.utils
import torch
from comfy_api.latest import io

from ..block_caching.calibration import DEFAULT_ITERATIONS, DEFAULT_LEARNING_RATE, CalibrationOptions, calibrate
from .frontend import SCHEDULE_UI_KEY, schedule_payload
from .heatmap import render_loss_curve
from .types import CATEGORY, CacheScheduleSocket


def prompts_of(positive: list, negative: list) -> list[tuple[list, list]]:
    """Each entry of the positive conditioning (several come from Conditioning (Combine)) is one
    prompt, paired with the whole negative conditioning."""
    return [([entry], negative) for entry in positive]


class CalibrateBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheCalibrate",
            display_name="Calibrate Block Cache",
            category=CATEGORY,
            description="Learns a per-channel, per-step scale and shift for every cached layer output (Block "
                        "Caching's scale-shift adjustment), so aggressive schedules stay closer to the uncached "
                        "picture at the same speed. It samples with the cached model and, at each step, runs the "
                        "uncached model on the same latent as the teacher; only the corrections are trained. "
                        "Save the schedule with Save Cache Schedule to keep them (a .safetensors file beside it).",
            inputs=[
                io.Model.Input("model", tooltip="The model the schedule was built for. It is not changed."),
                CacheScheduleSocket.Input("schedule", tooltip="The schedule to calibrate (from Build Cache Schedule "
                                                              "or Load Cache Schedule). A calibrated one continues "
                                                              "training."),
                io.Conditioning.Input("positive", tooltip="Prompts to calibrate on. Several prompts joined with "
                                                          "Conditioning (Combine) are used in turn, one per "
                                                          "iteration; varied prompts generalize better."),
                io.Conditioning.Input("negative", tooltip="The negative prompt used with every prompt."),
                io.Latent.Input("latent_image", tooltip="Only its size is used (e.g. Empty Latent Image at your "
                                                        "usual resolution); its content is replaced by noise."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The first noise seed; iteration i uses seed + i, so every iteration sees "
                                     "new noise."),
                io.Int.Input("iterations", default=DEFAULT_ITERATIONS, min=1, max=100000,
                             tooltip="Sampling runs to learn from. Each costs about two normal generations "
                                     "(the cached student and the uncached teacher). On SD1.5 at 512x512, 20-50 "
                                     "iterations (a few minutes on a recent GPU) are enough: the correction is "
                                     "small and converges fast. Expect a modest gain: on the pack's reference "
                                     "model, +0.1 to +0.6 dB PSNR against the uncached picture at aggressive "
                                     "thresholds (16 iterations), and less at mild ones."),
                io.Float.Input("learning_rate", default=DEFAULT_LEARNING_RATE, min=0.0001, max=1.0, step=0.0001,
                               tooltip="Adam's first step size for the scale and shift; it decays linearly to 0 "
                                       "over the iterations. 0.03 suits most models; lower it if the loss curve "
                                       "jumps around."),
                io.Int.Input("steps", default=0, min=0, max=10000,
                             tooltip="Sampling steps per iteration. 0 uses the schedule's own step count, which "
                                     "is what the corrections are indexed by; other counts are re-timed."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale of the calibration runs. 0 uses the one the schedule was "
                                       "profiled with."),
            ],
            outputs=[
                CacheScheduleSocket.Output(display_name="schedule",
                                           tooltip="The same schedule carrying the trained correction. Apply Block "
                                                   "Cache uses it; Save Cache Schedule writes it beside the JSON."),
                io.Image.Output(display_name="loss_curve",
                                tooltip="Per iteration: the mean relative squared error of the reused layer "
                                        "outputs against the uncached teacher's. It should fall and flatten."),
            ],
        )

    @classmethod
    def execute(cls, model, schedule, positive, negative, latent_image, seed, iterations, learning_rate, steps,
                cfg) -> io.NodeOutput:
        options = CalibrationOptions(iterations=int(iterations), learning_rate=float(learning_rate), seed=int(seed),
                                     steps=int(steps), cfg=float(cfg))
        options.validate()  # before anything runs
        bar = comfy.utils.ProgressBar(iterations * (steps or schedule.grid.steps))
        result = calibrate(model, schedule, prompts_of(positive, negative), latent_image["samples"], options,
                           progress=lambda done, total: bar.update_absolute(done, total))
        losses = result.losses
        title = (f"scale-shift calibration: relative error {losses[0]:.4g} -> {losses[-1]:.4g}" if losses
                 else "scale-shift calibration: nothing was reused")
        curve = torch.from_numpy(render_loss_curve(losses, title))[None]
        summary = (f"{len(result.schedule.scale_shift.entries)} corrected streams, {iterations} iterations in "
                   f"{result.seconds:.0f} s; {title.split(': ', 1)[1]}")
        return io.NodeOutput(result.schedule, curve,
                             ui={"text": [summary], SCHEDULE_UI_KEY: [schedule_payload(result.schedule)]})
