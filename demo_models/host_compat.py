"""What newer ComfyUI hosts expect of models built by hand, by feature check (not by version).

* Model-config fields that newer hosts require and older ones do not know: a checkpoint loader reads
  them off the state dict (``comfy.model_detection``); the demo models and the benchmarks' model
  stacks write their configs by hand, so they add them here where the host's params class declares them.
* The patcher class: loaders build ``comfy.model_patcher.CoreModelPatcher``, which ComfyUI 0.33's
  main.py makes ModelPatcherDynamic on CUDA (dynamic VRAM); a model built beside it with the classic
  ModelPatcher would not run there (its layers read weights the dynamic loader manages).
* Weights made at construction: under dynamic VRAM ComfyUI's layers get no weights until a state dict
  loads them; a model given seeded random weights in place must be built with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Iterator
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


def core_patcher(model: Any, load_device: Any, offload_device: Any) -> Any:
    """A ModelPatcher for ``model`` of the class the host's loaders build."""
    import comfy.model_patcher

    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return patcher_class(model, load_device=load_device, offload_device=offload_device)


@contextlib.contextmanager
def weights_at_construction() -> Iterator[None]:
    """Models built inside get their layers' weights at construction, also under dynamic VRAM (which
    otherwise leaves them to the state dict a loader reads), so they can be initialised in place."""
    try:
        import comfy.memory_management as memory_management
    except ImportError:  # a host without dynamic VRAM
        yield
        return
    lazy = getattr(memory_management, "aimdo_enabled", False)
    memory_management.aimdo_enabled = False
    try:
        yield
    finally:
        memory_management.aimdo_enabled = lazy
