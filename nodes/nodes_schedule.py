"""Build Cache Schedule."""

from __future__ import annotations

from comfy_api.latest import io

from ..core.block_map import CACHE_KIND_CHOICES
from ..core.schedule import DEFAULT_THRESHOLD, BuildOptions, build_schedule
from ..core.schema import schedule_to_json
from .frontend import profile_payload, schedule_payload
from .types import CATEGORY, BlockProfileSocket, schedule_outputs, schedule_picture


class BuildCacheSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheBuildSchedule",
            display_name="Build Cache Schedule",
            category=CATEGORY,
            description="Turns a profile into a per-layer schedule (Block Caching, Eq. 7): a layer's change is "
                        "summed step by step and the layer is recomputed once the sum passes the threshold; "
                        "in between its cached residual is reused.",
            inputs=[
                BlockProfileSocket.Input("profile", tooltip="From Profile Block Changes (or Merge Block Profiles)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=5.0, step=0.01,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Delta: how much summed relative change a cached layer may drift before it "
                                       "is recomputed. 0 computes everything; higher is faster and less exact. "
                                       "0.5 is the paper's choice for LDM."),
                io.Combo.Input("cache_kinds", options=list(CACHE_KIND_CHOICES), default="attention",
                               tooltip="Which layers may be cached. 'attention' (SpatialTransformers) is the "
                                       "paper's choice; '+resblock' and 'all' skip more but change the image more."),
                io.Int.Input("always_compute_first", default=1, min=1, max=10000,
                             tooltip="Steps at the start that always compute every layer."),
                io.Int.Input("always_compute_last", default=0, min=0, max=10000,
                             tooltip="Steps at the end that always compute every layer (fine detail forms there)."),
                io.Int.Input("max_consecutive_reuse", default=0, min=0, max=10000,
                             tooltip="The longest run of steps a layer may be reused before it must compute; "
                                     "0 means no limit."),
            ],
            outputs=schedule_outputs(),
        )

    @classmethod
    def execute(cls, profile, threshold, cache_kinds, always_compute_first, always_compute_last,
                max_consecutive_reuse) -> io.NodeOutput:
        options = BuildOptions(threshold=float(threshold), cache_kinds=cache_kinds,
                               always_compute_first=always_compute_first, always_compute_last=always_compute_last,
                               max_consecutive_reuse=max_consecutive_reuse)
        schedule = build_schedule(profile, options)
        picture = schedule_picture(schedule)
        # The profile goes to the browser too: the node rebuilds the schedule there, live, as the
        # threshold or an option moves (js/schedule_builder.js), and draws it instead of a preview PNG.
        return io.NodeOutput(schedule, picture, schedule_to_json(schedule),
                             ui={"text": [schedule.summary()], "block_cache_profile": [profile_payload(profile)],
                                 "block_cache_schedule": [schedule_payload(schedule)]})
