"""Tiny, seeded instances of every DiT family ComfyUI runs, built from ComfyUI's own classes.

Each module in this package defines ``ENTRIES: list[TinyDit]``; ``ZOO`` collects them all, and
``zoo_params`` gives them to ``pytest.mark.parametrize``, skipping (with the reason) the families
that the running ComfyUI is too old for.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

import pytest

from .base import TinyDit

ZOO: list[TinyDit] = []
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("base"):
        ZOO.extend(importlib.import_module(f"{__name__}.{_info.name}").ENTRIES)



def zoo_params(entries: Iterable[TinyDit] = ZOO) -> list:
    """The entries as pytest params with their ids; those this host lacks are skipped, with the reason."""
    params = []
    for entry in entries:
        missing = entry.missing_on_host()
        marks = [pytest.mark.skip(reason=missing)] if missing else []
        params.append(pytest.param(entry, id=entry.id, marks=marks))
    return params


def on_this_host(entries: Iterable[TinyDit] = ZOO) -> list[TinyDit]:
    return [entry for entry in entries if entry.missing_on_host() is None]


__all__ = ["ZOO", "TinyDit", "on_this_host", "zoo_params"]
