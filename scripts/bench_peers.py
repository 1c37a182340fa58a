"""Other caches' rules, re-implemented from their published descriptions for the benchmark only.

They run on this pack's runtime (the same layer patches and residual caches), so they differ from
Block Cache only in *when* a layer computes and *how* it stands in:

* FORA: every layer computes every k-th step and is reused as cached in between.
* TaylorSeer: the same interval, with each layer forecast by a Taylor expansion of its last
  computations (order 1 or 2).
* DeepCache: every k-th step in full; in between only the shallowest, highest-resolution layers
  (the skip branch's first and last levels) compute, the rest is reused.
* First Block Cache (ParaAttention / WaveSpeed): the first block computes at every step; when its
  residual changed by less than a threshold (mean absolute change relative to its mean magnitude)
  since the last full step, every other block reuses its cached residual, else all compute.

ComfyUI's own EasyCache and LazyCache nodes are used as they ship (comfy_extras/nodes_easycache.py).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any


def interval_schedule(schedule: Any, interval: int, keep: Callable[[str], bool] = lambda _: False,
                      order: int = 0) -> Any:
    """Every layer computes every ``interval``-th step (and those ``keep`` names at every step)."""
    steps = schedule.grid.steps
    layers = []
    for layer in schedule.layers:
        compute = tuple(keep(layer.name) or i % interval == 0 for i in range(steps))
        layers.append(dataclasses.replace(layer, compute=compute, forecast_order=0 if all(compute) else order))
    return dataclasses.replace(schedule, layers=tuple(layers),
                               builder={"method": "uniform_interval", "interval": interval, "order": order})


def outer_layer_names(model: Any, block_map_module: Any) -> set[str]:
    """The layers at the highest resolution (DeepCache's always-computed shallow branch)."""
    unet = model.get_model_object("diffusion_model")
    per_level = int(unet.num_res_blocks[0])
    outer = [f"input_blocks.{i}" for i in range(1, per_level + 1)]
    outer += [f"output_blocks.{len(unet.output_blocks) - 1 - i}" for i in range(per_level + 1)]
    block_map = block_map_module.block_map_for_patcher(model)
    return {spec.name for spec in block_map.layers if any(spec.name == o or spec.name.startswith(o + ".")
                                                           for o in outer)}


def first_block_cache(patching: Any, model: Any, base: Any, threshold: float) -> tuple[Any, Any]:
    """First Block Cache on the pack's runtime: layer 0 always computes and decides for the others.

    ``base`` is a schedule on the run's grid; every layer but the first is made reusable after step 0,
    and the decision at each evaluation is replaced by the rule, taken when the first layer has run.
    """
    steps = base.grid.steps
    layers = [dataclasses.replace(layer, compute=(True,) * steps if index == 0 else (True,) + (False,) * (steps - 1),
                                  forecast_order=0) for index, layer in enumerate(base.layers)]
    schedule = dataclasses.replace(base, layers=tuple(layers), builder={"method": "first_block_cache"})
    patched, holder = patching.apply_block_cache(model, schedule)
    runtime = sys.modules[type(holder).__module__]
    first_key = holder.block_map.layers[0].patch_key
    first_layer = patched.object_patches[first_key]  # the pack's CachedLayerForward of layer 0
    state: dict[str, Any] = {"previous": None}

    def first_layer_decides(*args: Any, **kwargs: Any) -> Any:
        call = runtime.active_call()
        out = first_layer(*args, **kwargs)
        if call is None or not call.run.in_evaluation:
            return out
        run = call.run
        x = args[0] if args else next(iter(kwargs.values()))
        residual = (out - first_layer.spec.residual_base(first_layer.module, x)).detach()
        previous = state["previous"]
        first = run.stats.evaluations == 1
        if first or previous is None or previous.shape != residual.shape:
            change = float("inf")
        else:
            change = float((residual - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))
        compute_all = change >= threshold
        run.compute_now[1:] = compute_all
        run.store_now = run.plan.reuses_ever  # the rule decides at run time: keep every computation
        if compute_all:
            state["previous"] = residual.clone()
        return out

    patched.add_object_patch(first_key, first_layer_decides)

    def reset_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        state["previous"] = None
        return executor(*args, **kwargs)

    import comfy.patcher_extension

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "bench_fbcache", reset_wrapper)
    return patched, holder


def easycache(model: Any, node: Any, threshold: float) -> Any:
    (patched,) = node.execute(model, threshold, 0.15, 0.95, False).result
    return patched
