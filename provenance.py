"""What the pack stamps on every profile and schedule it makes: when, and with which versions."""

from __future__ import annotations

import datetime
from typing import Any

PACK_VERSION = "0.1.0"  # the same as pyproject.toml's version


def _comfyui_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except ImportError:
        return "unknown"


def provenance(**extra: Any) -> dict[str, Any]:
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pack_version": PACK_VERSION,
        "comfyui_version": _comfyui_version(),
        **extra,
    }
