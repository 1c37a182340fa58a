"""Model-config fields that newer ComfyUI hosts require and older ones do not know.

A checkpoint loader reads them off the state dict (``comfy.model_detection``); the demo models and
the benchmarks' model stacks write their configs by hand, so they add them here, only where the
host's params class declares them: a feature check, not a version check.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

# What model_detection gives a plain Flux checkpoint on hosts whose FluxParams has the field (0.4 on).
FLUX_FIELDS: dict[str, Any] = {"txt_ids_dims": []}


def params_class(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module), name)


def with_host_fields(config: dict[str, Any], params: type | str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``config`` plus each of ``defaults`` that the host's ``params`` dataclass declares and ``config`` lacks."""
    cls = params_class(params) if isinstance(params, str) else params
    declared = {field.name for field in dataclasses.fields(cls)}
    return {**config, **{key: value for key, value in defaults.items() if key in declared and key not in config}}


def flux_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Flux unet_config as the host's model detection would complete it."""
    return with_host_fields(config, "comfy.ldm.flux.model.FluxParams", FLUX_FIELDS)
