"""Block Cache: per-layer caching for ComfyUI sampling (Block Caching, CVPR 2024)."""

from .nodes import comfy_entrypoint

# The only registration of the web folder (pyproject.toml has no [tool.comfy] web, which would add a second).
WEB_DIRECTORY = "./js"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
