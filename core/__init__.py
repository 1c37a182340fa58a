"""Block Cache core: block maps, profiles, schedules and the sampling-time runtime.

Nothing here imports ComfyUI's node API (``comfy_api``); the node classes in
``nodes/`` are thin wrappers around these modules.
"""

PACK_VERSION = "0.1.0"
