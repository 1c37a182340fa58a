"""Build Cache Schedule (a speed-up target, forecast reuse) and Build Cache Schedule (threshold, Eq. 7)."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..block_caching.schedule import DEFAULT_THRESHOLD, BuildOptions, build_schedule
from ..block_caching.target_build import (
    DEFAULT_FORECAST_ORDER,
    DEFAULT_MIN_PSNR,
    DEFAULT_SPEEDUP,
    FORECAST_ORDER_CHOICES,
    TargetOptions,
    parse_forecast_order,
)
from ..block_caching.target_outcome import (
    COMPARE,
    FEWER_STEPS_CHOICES,
    LOOKAHEAD_CHOICES,
    MEASURE,
    USE_LOOKAHEAD,
    VALIDATION_CHOICES,
    build_for_node,
)
from ..block_maps.block_map import CACHE_KIND_CHOICES
from ..schedule_files.schema import schedule_to_json
from .frontend import LADDER_UI_KEY, PROFILE_UI_KEY, SCHEDULE_UI_KEY, ladder_payload, profile_payload, schedule_payload
from .types import CATEGORY, BlockProfileSocket, schedule_outputs, schedule_picture

logger = logging.getLogger(__name__)

_PROFILE_TOOLTIP = ("From Profile Block Changes, Profile Block Changes (Advanced), Collect Block Profile or Merge "
                    "Block Profiles.")
_FIRST_TOOLTIP = "Steps at the start that always compute every layer (at least 1)."
_LAST_TOOLTIP = "Steps at the end that always compute every layer."


class BuildTargetSchedule(io.ComfyNode):
    """Build Cache Schedule from a speed-up target (node id BlockCacheBuildTargetSchedule; the id stays for
    saved workflows)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheBuildTargetSchedule",
            display_name="Build Cache Schedule",
            category=CATEGORY,
            description="Picks, for the speed-up you ask for, the steps at which every cacheable layer computes, "
                        "by the forecast error measured on the profile; in between, each layer's output is "
                        "forecast from its last computations. The node shows the FLOP speed-up and what it costs "
                        "in uncached steps.",
            inputs=[
                BlockProfileSocket.Input("profile", tooltip=_PROFILE_TOOLTIP),
                io.Float.Input("speedup", default=DEFAULT_SPEEDUP, min=1.0, max=10.0, step=0.05,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="How much faster, in FLOPs: the schedule with the least forecast error, "
                                       "measured on the profile, that computes at most 1/speedup of the model's "
                                       "work. The default kept 30+ dB PSNR against the uncached pictures on "
                                       "the reference model; higher changes the picture more. 1 computes "
                                       "everything."),
                io.Combo.Input("forecast_order", options=list(FORECAST_ORDER_CHOICES), default=DEFAULT_FORECAST_ORDER,
                               tooltip="How a skipped layer stands in: 0 reuses its last output as it is; 1 and 2 "
                                       "extrapolate it from its last 2 or 3 computations (TaylorSeer-style; "
                                       "validation may damp that to half its move where it measures better). "
                                       "'auto' takes the order with the least error on the profile. Each order above "
                                       "0 keeps one more cached copy per layer."),
                io.Combo.Input("cache_kinds", options=list(CACHE_KIND_CHOICES), default="all",
                               tooltip="Which layers may be skipped. 'all' skips whole steps of the model and "
                                       "gives the most speed; 'attention' keeps ResBlocks and resampling layers "
                                       "computing."),
                io.Int.Input("always_compute_first", default=1, min=1, max=10000, tooltip=_FIRST_TOOLTIP),
                io.Int.Input("always_compute_last", default=0, min=0, max=10000, tooltip=_LAST_TOOLTIP),
                io.Int.Input("max_consecutive_reuse", default=0, min=0, max=10000,
                             tooltip="The longest run of steps a layer may be forecast before it must compute; "
                                     "0 lets the search choose, up to 7."),
                io.Combo.Input("validation", options=list(VALIDATION_CHOICES), default=MEASURE,
                               tooltip="'measure PSNR' samples the profiled prompts with another seed, uncached and "
                                       "with the chosen schedule (one run at full cost, one at the target's), then "
                                       "the schedule it keeps with a second seed (two more runs: the pictures that "
                                       "chose a schedule read it high), and shows how close both seeds' pictures "
                                       "stay and the range expected on other prompts. "
                                       "Where the sampler's steps move the latent very unevenly (the step weights "
                                       "span more than 20x, as under Wan's time shift) it also samples the schedule "
                                       "of that cost searched with every step's error weighted alike, and keeps it "
                                       "where its pictures are clearly closer (one more run); likewise two "
                                       "schedules for a forecast damped to half its move (the search's, and the "
                                       "steps spread evenly from the first to the last), where the error model "
                                       "predicts the damped search better (as on Flux-like models; two more runs). "
                                       "'choose by measured PSNR' also samples the other schedules of that cost "
                                       "(up to 4: the search's best per forecast order, steps spread evenly from "
                                       "the first to the last, and the search's best with every step's error "
                                       "weighted alike or for a damped forecast) "
                                       "and, with forecast order 'auto', the kept one with order 0 (reuse as is) "
                                       "on the first third, the last third or all of the cached layers (3 more "
                                       "runs); one replaces the search's choice only where its pictures are closer "
                                       "by more than their noise (few profiled pictures are a noisy judge), and "
                                       "is then what the quality floor judges; it chooses among whole-step "
                                       "schedules only (the ones with candidates of equal cost). 'off' "
                                       "is instant."),
                io.Float.Input("min_psnr", default=DEFAULT_MIN_PSNR, min=0.0, max=60.0, step=0.5, optional=True,
                               tooltip="A quality floor, in dB of PSNR against the uncached pictures (with validation "
                                       "on): the schedule is measured on the profiled prompts with another seed (and, "
                                       "where that passes, a second one), and where the low end of the PSNR expected "
                                       "on other prompts is below the floor, "
                                       "it steps down to the fastest schedule with more compute steps that reaches "
                                       "it (the next slower one first, then a bisection, then the few next to the "
                                       "one found, each measured as validation measures); the node says so. 0: "
                                       "off, the speed-up is kept whatever it costs."),
                io.Combo.Input("fewer_steps", options=list(FEWER_STEPS_CHOICES), default=COMPARE,
                               optional=True,
                               tooltip="With validation on, also sample the profiled prompts uncached with as many "
                                       "steps as the schedule's cost buys, and say which keeps the picture better. "
                                       "'use fewer steps when better' then outputs a schedule that computes "
                                       "everything and that step count on 'steps' (wire it into the sampler's "
                                       "steps). 'best of cache, fewer steps, or both' also profiles and measures "
                                       "fewer steps with the cache (about 1/sqrt(speedup) of the steps, the cache "
                                       "giving the rest: two more runs) and outputs whichever is fastest above "
                                       "the floor, with its step count on 'steps'. 'off' saves that run."),
                io.Combo.Input("lookahead", options=list(LOOKAHEAD_CHOICES), default=USE_LOOKAHEAD, optional=True,
                               tooltip="With validation on and a sampler that evaluates the model once per step "
                                       "(euler, ddim, dpmpp_2m, ...): also measure a step lookahead, which runs the "
                                       "whole model at fewer steps (spread evenly or the ladder's, whichever reads "
                                       "higher) and interpolates the steps between (the model is evaluated one gap "
                                       "ahead, where an Euler step predicts), and output it where it is faster above "
                                       "the floor, or closer at the target's cost. A few more runs at the target's "
                                       "cost. On Flux and on DDIM it kept more than the cache. 'off' skips it."),
            ],
            outputs=[*schedule_outputs(),
                     io.Int.Output(display_name="steps",
                                   tooltip="The sampler steps to use: the profiled count, or fewer where 'fewer_steps' "
                                           "switched to them (the schedule is built for that count). Wire it into "
                                           "the sampler's steps.")],
        )

    @classmethod
    def execute(cls, profile, speedup, forecast_order, cache_kinds, always_compute_first, always_compute_last,
                max_consecutive_reuse, validation=MEASURE, min_psnr=DEFAULT_MIN_PSNR,
                fewer_steps=COMPARE, lookahead=USE_LOOKAHEAD) -> io.NodeOutput:
        options = TargetOptions(speedup=float(speedup), forecast_order=parse_forecast_order(forecast_order),
                                cache_kinds=cache_kinds,
                                always_compute_first=always_compute_first, always_compute_last=always_compute_last,
                                max_consecutive_reuse=max_consecutive_reuse, min_psnr=float(min_psnr))
        outcome = build_for_node(profile, options, validation, fewer_steps, lookahead)
        for line in outcome.lines[1:]:
            logger.info("Build Cache Schedule: %s", line)
        schedule = outcome.schedule
        return io.NodeOutput(schedule, schedule_picture(schedule), schedule_to_json(schedule), outcome.sampler_steps,
                             ui={"text": ["\n".join(outcome.lines)],
                                 LADDER_UI_KEY: [ladder_payload(outcome.ladder_of)],
                                 SCHEDULE_UI_KEY: [schedule_payload(schedule)]})


class BuildThresholdSchedule(io.ComfyNode):
    """The paper's per-layer rule, for experts (node id BlockCacheBuildSchedule: the id that workflows made before
    the speed-up target use)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheBuildSchedule",
            display_name="Build Cache Schedule (threshold)",
            category=CATEGORY,
            description="Block Caching's own per-layer rule (Eq. 7): a layer's change is summed step by step and "
                        "the layer is recomputed once the sum passes the threshold; in between its cached residual "
                        "is reused. For experts: Build Cache Schedule (speed-up target) keeps the picture better "
                        "at the same speed.",
            inputs=[
                BlockProfileSocket.Input("profile", tooltip=_PROFILE_TOOLTIP),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=5.0, step=0.01,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Delta: how much summed relative change a cached layer may drift before it "
                                       "is recomputed. 0 computes everything; higher is faster and less exact. "
                                       "0.5 is the paper's choice for LDM."),
                io.Combo.Input("cache_kinds", options=list(CACHE_KIND_CHOICES), default="attention",
                               tooltip="Which layers may be cached. 'attention' (SpatialTransformers) is the "
                                       "paper's choice; '+resblock' and 'all' skip more but change the image more."),
                io.Int.Input("always_compute_first", default=1, min=1, max=10000, tooltip=_FIRST_TOOLTIP),
                io.Int.Input("always_compute_last", default=0, min=0, max=10000,
                             tooltip=_LAST_TOOLTIP + " Fine detail forms there."),
                io.Int.Input("max_consecutive_reuse", default=0, min=0, max=10000,
                             tooltip="The longest run of steps a layer may be reused before it must compute; "
                                     "0 means no limit."),
                io.Combo.Input("forecast_order", options=["0", "1", "2"], default="0", optional=True,
                               tooltip="0 reuses a cached layer as it is (the paper); 1 and 2 extrapolate it from "
                                       "its last 2 or 3 computations."),
            ],
            outputs=schedule_outputs(),
        )

    @classmethod
    def execute(cls, profile, threshold, cache_kinds, always_compute_first, always_compute_last,
                max_consecutive_reuse, forecast_order="0") -> io.NodeOutput:
        options = BuildOptions(threshold=float(threshold), cache_kinds=cache_kinds,
                               always_compute_first=always_compute_first, always_compute_last=always_compute_last,
                               max_consecutive_reuse=max_consecutive_reuse, forecast_order=int(forecast_order))
        schedule = build_schedule(profile, options)
        picture = schedule_picture(schedule)
        # The profile goes to the browser too: the node rebuilds the schedule there, live, as the
        # threshold or an option moves (js/schedule_builder.js), and draws it instead of a preview PNG.
        return io.NodeOutput(schedule, picture, schedule_to_json(schedule),
                             ui={"text": [schedule.summary()], PROFILE_UI_KEY: [profile_payload(profile)],
                                 SCHEDULE_UI_KEY: [schedule_payload(schedule)]})
