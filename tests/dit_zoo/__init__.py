"""Tiny, seeded instances of every DiT family ComfyUI runs, built from ComfyUI's own classes.

Each module in this package defines ``ENTRIES: list[TinyDit]``; ``ZOO`` collects them all.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import TinyDit

ZOO: list[TinyDit] = []
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("base"):
        ZOO.extend(importlib.import_module(f"{__name__}.{_info.name}").ENTRIES)

__all__ = ["ZOO", "TinyDit"]
