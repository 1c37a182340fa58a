"""The pack's nodes (V3 schema). The logic lives in the method and runtime packages; these classes only adapt it."""

from comfy_api.latest import ComfyExtension, io

from .nodes_apply import ApplyBlockCache
from .nodes_calibrate import CalibrateBlockCache
from .nodes_compare import ComparePictures
from .nodes_demo import LoadDemoModel
from .nodes_faster_diffusion import FasterDiffusionSchedule
from .nodes_files import LoadCacheSchedule, SaveCacheSchedule
from .nodes_profile import (
    CollectBlockProfile,
    MergeBlockProfiles,
    ProfileBlockChanges,
    ProfileBlockChangesAdvanced,
    RecordBlockChanges,
)
from .nodes_schedule import BuildTargetSchedule, BuildThresholdSchedule

NODES: list[type[io.ComfyNode]] = [
    ProfileBlockChanges,
    ProfileBlockChangesAdvanced,
    RecordBlockChanges,
    CollectBlockProfile,
    BuildTargetSchedule,
    BuildThresholdSchedule,
    ApplyBlockCache,
    SaveCacheSchedule,
    LoadCacheSchedule,
    MergeBlockProfiles,
    LoadDemoModel,
    FasterDiffusionSchedule,
    CalibrateBlockCache,
    ComparePictures,
]


class BlockCacheExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> BlockCacheExtension:
    return BlockCacheExtension()
