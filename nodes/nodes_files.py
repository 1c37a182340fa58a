"""Save Cache Schedule and Load Cache Schedule: JSON files in the user directory."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.errors import ScheduleFileError
from ..core.storage import list_schedules, load_schedule, resolve, save_schedule, schedule_directory
from .frontend import schedule_payload
from .types import CATEGORY, CacheScheduleSocket


class SaveCacheSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheSaveSchedule",
            display_name="Save Cache Schedule",
            category=CATEGORY,
            description="Writes the schedule as JSON to ComfyUI/user/block_cache/, where Load Cache Schedule "
                        "finds it and from where it can be shared.",
            is_output_node=True,
            inputs=[
                CacheScheduleSocket.Input("schedule", tooltip="The schedule to save."),
                io.String.Input("file_name", default="my_schedule",
                                tooltip="A plain file name (letters, digits, spaces, '_', '-', '.'); '.json' is "
                                        "added. Folders are not allowed."),
                io.Boolean.Input("overwrite", default=True,
                                 tooltip="Replace a saved schedule of the same name. Off: saving to a taken name "
                                         "fails instead."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, schedule, file_name, overwrite) -> io.NodeOutput:
        path = save_schedule(schedule_directory(), file_name, schedule, overwrite=overwrite)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {path.name}: {schedule.summary()}"))


class LoadCacheSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheLoadSchedule",
            display_name="Load Cache Schedule",
            category=CATEGORY,
            description="Loads a schedule saved with Save Cache Schedule, so a graph needs no profiling.",
            inputs=[
                io.Combo.Input("schedule_file", options=list_schedules(schedule_directory()),
                               tooltip="Schedules in ComfyUI's user folder, block_cache/. Refresh the page after "
                                       "saving a new one."),
            ],
            outputs=[CacheScheduleSocket.Output(display_name="schedule", tooltip="For Apply Block Cache.")],
        )

    @classmethod
    def fingerprint_inputs(cls, schedule_file):
        # Re-run when the file changes on disk, not only when another file is picked.
        try:
            path = resolve(schedule_directory(), schedule_file)
        except ScheduleFileError:
            return schedule_file  # execute() reports the bad name
        return path.stat().st_mtime if path.is_file() else schedule_file

    @classmethod
    def execute(cls, schedule_file) -> io.NodeOutput:
        schedule = load_schedule(schedule_directory(), schedule_file)
        return io.NodeOutput(schedule, ui={"text": [schedule.summary()],
                                           "block_cache_schedule": [schedule_payload(schedule)]})
