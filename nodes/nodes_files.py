"""Save Cache Schedule and Load Cache Schedule: JSON files in the user directory."""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io, ui

from ..errors import ScheduleFileError
from ..schedule_files.storage import list_schedules, load_schedule, resolve, save_schedule, schedule_directory
from .frontend import SCHEDULE_UI_KEY, schedule_payload
from .types import CATEGORY, CacheScheduleSocket

# Schedules shipped with the pack (read-only; the example workflows use them). Listed after the
# user's own; a user file of the same name wins.
BUNDLED_SCHEDULES = Path(__file__).resolve().parents[1] / "schedules"


def schedule_choices() -> list[str]:
    user = list_schedules(schedule_directory())
    return user + [name for name in list_schedules(BUNDLED_SCHEDULES) if name not in user]


def directory_of(schedule_file: str) -> Path:
    """The user folder, unless only the pack's bundled folder has this file."""
    user = schedule_directory()
    if not resolve(user, schedule_file).is_file() and resolve(BUNDLED_SCHEDULES, schedule_file).is_file():
        return BUNDLED_SCHEDULES
    return user


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
                io.Combo.Input("schedule_file", options=schedule_choices(),
                               tooltip="Schedules in ComfyUI's user folder, block_cache/, then those shipped with "
                                       "the pack (its schedules/ folder). Refresh the page after saving a new one."),
            ],
            outputs=[CacheScheduleSocket.Output(display_name="schedule", tooltip="For Apply Block Cache.")],
        )

    @classmethod
    def fingerprint_inputs(cls, schedule_file):
        # Re-run when the file changes on disk, not only when another file is picked.
        try:
            path = resolve(directory_of(schedule_file), schedule_file)
        except ScheduleFileError:
            return schedule_file  # execute() reports the bad name
        return path.stat().st_mtime if path.is_file() else schedule_file

    @classmethod
    def execute(cls, schedule_file) -> io.NodeOutput:
        schedule = load_schedule(directory_of(schedule_file), schedule_file)
        return io.NodeOutput(schedule, ui={"text": [schedule.summary()],
                                           SCHEDULE_UI_KEY: [schedule_payload(schedule)]})
