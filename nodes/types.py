"""The pack's socket types. Values travel between nodes as in-memory Python objects."""

import torch
from comfy_api.latest import io

from .heatmap import render_schedule

BlockProfileSocket = io.Custom("BLOCK_PROFILE")
CacheScheduleSocket = io.Custom("CACHE_SCHEDULE")
# Record Block Changes -> Collect Block Profile: the profiling holder and the model it was made on.
ProfileRecordingSocket = io.Custom("BLOCK_PROFILE_RECORDING")

CATEGORY = "sampling/block_cache"


def schedule_outputs() -> list:
    """The outputs of every node that makes a schedule: the schedule, its picture and its JSON."""
    return [
        CacheScheduleSocket.Output(display_name="schedule", tooltip="For Apply Block Cache or Save Cache Schedule."),
        io.Image.Output(display_name="schedule_image",
                        tooltip="Layers (rows) x steps (columns): coloured where computed, dark where reused."),
        io.String.Output(display_name="json", tooltip="The schedule as JSON text (the saved file format)."),
    ]


def schedule_picture(schedule) -> torch.Tensor:
    """The schedule as a ComfyUI IMAGE batch of one."""
    return torch.from_numpy(render_schedule(schedule))[None]
