"""Faster Diffusion Schedule: encoder propagation as a cache schedule for Apply Block Cache."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..block_maps.mapping import block_map_for_patcher
from ..faster_diffusion.schedule import (
    DEFAULT_ENCODER_RATIO,
    KEY_STEP_MODES,
    KEY_STEPS_AUTO,
    PAPER_DDIM_50,
    PAPER_DPM_SOLVER_20,
    FasterDiffusionOptions,
    build_faster_diffusion_schedule,
    grid_for_model,
    parse_key_steps,
)
from ..provenance import provenance
from ..schedule_files.schema import schedule_to_json
from .types import CATEGORY, BlockProfileSocket, schedule_outputs, schedule_picture


class FasterDiffusionSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheFasterDiffusionSchedule",
            display_name="Faster Diffusion Schedule",
            category=CATEGORY,
            description="Encoder propagation (Faster Diffusion, Li et al. 2024): at key steps the whole model runs; "
                        "at the other steps the encoder (UNet down and middle blocks; the first blocks of a DiT) "
                        "is skipped and the decoder runs on the encoder features cached at the last key step. "
                        "Needs no profile. Feed the schedule to Apply Block Cache (whose noise injection option "
                        "is the paper's companion fix).",
            inputs=[
                io.Model.Input("model", tooltip="The model the schedule is for (its layers are read; it is not "
                                                "changed)."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="The step count the key steps are laid out on; use your KSampler's. Other "
                                     "step counts and samplers still work: the schedule is re-timed by "
                                     "normalized time."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="Your KSampler's sampler (recorded with the schedule)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="Your KSampler's scheduler: the step times come from it."),
                io.Combo.Input("key_steps", options=list(KEY_STEP_MODES), default=KEY_STEPS_AUTO,
                               tooltip="Steps where the encoder runs. 'paper (auto)' picks the paper's DPM-Solver "
                                       f"20-step list for up to 31 steps, else its DDIM 50-step list. "
                                       f"{PAPER_DDIM_50.description}. {PAPER_DPM_SOLVER_20.description}. On other "
                                       "step counts a list is mapped by normalized time. 'uniform stride': every "
                                       "stride-th step. 'custom': the list below."),
                io.Int.Input("stride", default=5, min=1, max=10000,
                             tooltip="For 'uniform stride': the encoder runs at steps 0, stride, 2 x stride, ..."),
                io.String.Input("custom_key_steps", default="0, 1, 2, 3, 5, 10, 15",
                                tooltip="For 'custom': step numbers (0 = the first step) where the encoder runs, "
                                        "separated by commas. Step 0 is always added."),
                io.Float.Input("encoder_ratio", default=round(DEFAULT_ENCODER_RATIO, 4), min=0.0, max=0.99,
                               step=0.01,
                               tooltip="Transformer (DiT) models only: the share of blocks, in execution order, "
                                       "that act as the encoder (the paper: 18 of 28, 0.64). UNets always use "
                                       "their down and middle blocks."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="Your KSampler's denoise, so the steps have the times they will run at."),
                BlockProfileSocket.Input("profile", optional=True,
                                         tooltip="Optional, from Profile Block Changes on this model: only its "
                                                 "measured FLOPs are used, for the speed-up estimate. Without it "
                                                 "the estimate reads 1.00x (unknown)."),
            ],
            outputs=schedule_outputs(),
        )

    @classmethod
    def execute(cls, model, steps, sampler_name, scheduler, key_steps, stride, custom_key_steps, encoder_ratio,
                denoise=1.0, profile=None) -> io.NodeOutput:
        options = FasterDiffusionOptions(key_steps=key_steps, stride=int(stride),
                                         custom_key_steps=parse_key_steps(custom_key_steps),
                                         encoder_ratio=float(encoder_ratio))
        grid = grid_for_model(model, int(steps), sampler_name, scheduler, float(denoise))
        schedule = build_faster_diffusion_schedule(block_map_for_patcher(model), grid, options, profile=profile,
                                                   provenance=provenance())
        picture = schedule_picture(schedule)
        keys = schedule.builder["key_steps"]
        text = f"Faster Diffusion: encoder at {len(keys)} of {grid.steps} steps {keys}. {schedule.summary()}"
        return io.NodeOutput(schedule, picture, schedule_to_json(schedule), ui={"text": [text]})
