"""Block Cache: per-layer caching for ComfyUI sampling (Block Caching, CVPR 2024)."""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./js"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
