"""Apply Block Cache."""

from __future__ import annotations

from comfy_api.latest import io

from ..core.patching import apply_block_cache
from .frontend import send_run_summaries
from .types import CATEGORY, CacheScheduleSocket


class ApplyBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheApply",
            display_name="Apply Block Cache",
            category=CATEGORY,
            description="Returns a copy of the model that reuses cached layer outputs as the schedule says. Put it "
                        "between the model loader and any sampler. Each run logs how many layer evaluations it "
                        "computed and skipped. Schedules for another step count or sampler are re-timed.",
            inputs=[
                io.Model.Input("model", tooltip="The model to accelerate. It is not changed; a patched copy is "
                                                "returned."),
                CacheScheduleSocket.Input("schedule", tooltip="From Build Cache Schedule or Load Cache Schedule, "
                                                              "made for this model."),
            ],
            outputs=[io.Model.Output(tooltip="The model with Block Cache; use it in any KSampler.")],
            hidden=[io.Hidden.unique_id],  # to show each run's summary on this node in the browser
        )

    @classmethod
    def execute(cls, model, schedule) -> io.NodeOutput:
        patched, holder = apply_block_cache(model, schedule)
        send_run_summaries(holder, cls.hidden.unique_id if cls.hidden else None)
        return io.NodeOutput(patched)
