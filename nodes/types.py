"""The pack's socket types. Values travel between nodes as in-memory Python objects."""

from comfy_api.latest import io

BlockProfileSocket = io.Custom("BLOCK_PROFILE")
CacheScheduleSocket = io.Custom("CACHE_SCHEDULE")

CATEGORY = "sampling/block_cache"
