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
* TeaCache (Liu et al. 2024; welltop-cn/ComfyUI-TeaCache's Flux rule): before any block runs, the
  relative L1 change of the first block's timestep-modulated input since the previous step is
  accumulated; while the sum stays below a threshold every block reuses its cached residual (the
  whole transformer's residual), else all compute and the sum restarts. The first and last steps
  always compute. The change is rescaled by a polynomial fitted, as TeaCache fits one per model, to
  how much the model's output changed against how much that input changed, on an uncached run of
  the profiling prompts (``fit_teacache_polynomial``). TeaCache's degree 4 overfits the 19 points of
  one 20-step run and goes negative between them; degree 2 does not.

* TeaCache on Wan (TeaCache4Wan2.1): the same rule, its indicator the first block's timestep
  modulation ``e0`` (what TeaCache reads on Wan with ``use_ret_steps``).
* MagCache (Ma et al. 2025, Zehong-Ma/ComfyUI-MagCache's Wan rule): the ratio of the whole stack's
  residual magnitude from one step to the next, calibrated once on an uncached run
  (``fit_magnitude_ratios``), is multiplied up over the skipped steps; the error |1 - product| is
  accumulated, and every block reuses its cached residual while the error stays below a threshold
  and at most K steps in a row are skipped. The first 20% of the steps always compute.

ComfyUI's own EasyCache and LazyCache nodes are used as they ship (comfy_extras/nodes_easycache.py).
"""

from __future__ import annotations

import dataclasses
import importlib
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


def outer_layer_names(model: Any, mapping: Any) -> set[str]:
    """The layers at the highest resolution (DeepCache's always-computed shallow branch)."""
    unet = model.get_model_object("diffusion_model")
    per_level = int(unet.num_res_blocks[0])
    outer = [f"input_blocks.{i}" for i in range(1, per_level + 1)]
    outer += [f"output_blocks.{len(unet.output_blocks) - 1 - i}" for i in range(per_level + 1)]
    block_map = mapping.block_map_for_patcher(model)
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
    state: dict[str, Any] = {"previous": None, "evaluation": None, "compute": True}

    def decide(run: Any, first_layer: Any, args: tuple, kwargs: dict) -> Any:
        if state["evaluation"] == run.stats.evaluations:  # cond and uncond in two calls: decided at the first
            run.computes[1:] = state["compute"]
            return first_layer(*args, **kwargs)
        state["evaluation"] = run.stats.evaluations
        # The first stream (a UNet's x, a DiT's image tokens); copied, as DiT blocks add to it in place.
        spec = first_layer.spec
        x = spec.streams[0].input_of(args, kwargs).detach().clone()
        out = first_layer(*args, **kwargs)
        residual = (spec.split_output(out)[0] - spec.residual_base(first_layer.module, x)).detach()
        previous = state["previous"]
        first = run.stats.evaluations == 1
        if first or previous is None or previous.shape != residual.shape:
            change = float("inf")
        else:
            change = float((residual - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))
        compute_all = change >= threshold
        run.computes[1:] = compute_all
        state["compute"] = compute_all
        if compute_all:
            state["previous"] = residual.clone()
        return out

    _decide_at_first_layer(patched, holder, decide)
    _reset_per_run(patched, state, "bench_fbcache", previous=None, evaluation=None, compute=True)
    return patched, holder


def _decide_at_first_layer(patched: Any, holder: Any, decide: Callable[[Any, Any, tuple, dict], Any]) -> None:
    """Puts ``decide(run, first_layer, args, kwargs)`` in place of the first layer's patch: a rule that
    decides at run time, once the first layer's input is known, what the other layers do."""
    pack_name = type(holder).__module__.split(".")[0]
    runtime = importlib.import_module(f"{pack_name}.runtime.run")
    key = holder.block_map.layers[0].patch_key
    first_layer = patched.object_patches[key]  # the pack's LayerForward of layer 0

    def first(*args: Any, **kwargs: Any) -> Any:
        call = runtime.active_call()
        if call is None or call.run.holder is not holder or not call.run.in_evaluation:
            return first_layer(*args, **kwargs)
        cache = call.run.layer_method
        cache.store_now = cache.plan.reuses_ever  # decided at run time: keep every computation
        return decide(call.run, first_layer, args, kwargs)

    patched.add_object_patch(key, first)


def _reset_per_run(patched: Any, state: dict[str, Any], key: str, **initial: Any) -> None:
    import comfy.patcher_extension

    def reset_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        state.update(initial)
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, reset_wrapper)


def flux_modulated_input(module: Any, kwargs: dict) -> Any:
    """TeaCache's Flux indicator: the first double block's image stream after its norm and time modulation."""
    modulation, _ = module.img_mod(kwargs["vec"])
    return (1 + modulation.scale) * module.img_norm1(kwargs["img"]) + modulation.shift


def wan_time_modulation(module: Any, kwargs: dict) -> Any:
    """TeaCache's Wan indicator: the timestep modulation ``e0`` the first block is given."""
    return kwargs["e"]


def _relative_l1(current: Any, previous: Any) -> float:
    return float((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))


def fit_teacache_polynomial(model: Any, sample: Callable[[Any], Any], layer: str = "double_blocks.0",
                            indicator: Callable[[Any, dict], Any] = flux_modulated_input,
                            degree: int = 2) -> tuple[float, ...]:
    """TeaCache's calibration: per step, the output's relative L1 change against the indicator's,
    over one uncached ``sample(model)`` run; returns the fitted polynomial's coefficients."""
    return fit_polynomial(*record_teacache_run(model, sample, layer, indicator), degree)


def fit_polynomial(indicators: list[Any], outputs: list[Any], degree: int = 2) -> tuple[float, ...]:
    """The polynomial of ``fit_teacache_polynomial`` from a recorded run (``record_teacache_run``)."""
    import numpy as np

    x = [_relative_l1(indicators[i], indicators[i - 1]) for i in range(1, len(indicators))]
    y = [_relative_l1(outputs[i], outputs[i - 1]) for i in range(1, len(outputs))]
    return tuple(float(c) for c in np.polyfit(x, y, degree))


def teacache_accumulate(accumulated: float, change: float, coefficients: tuple[float, ...],
                        threshold: float) -> tuple[float, bool]:
    """One step of TeaCache's rule: the rescaled change added to the sum; whether every block computes (the
    sum reached ``threshold``, and restarts) and the sum it leaves."""
    import numpy as np

    accumulated += max(0.0, float(np.polyval(coefficients, change)))
    return (0.0, True) if accumulated >= threshold else (accumulated, False)


def record_teacache_run(model: Any, sample: Callable[[Any], Any], layer: str,
                        indicator: Callable[[Any, dict], Any]) -> tuple[list[Any], list[Any]]:
    """One uncached ``sample(model)`` run: the indicator at ``layer`` and the model's output, per call."""
    dit = model.get_model_object("diffusion_model")
    indicators: list[Any] = []
    outputs: list[Any] = []
    hooks = [
        dit.get_submodule(layer).register_forward_pre_hook(
            lambda module, args, kwargs: indicators.append(indicator(module, kwargs).detach().clone()),
            with_kwargs=True),
        dit.register_forward_hook(lambda module, args, output: outputs.append(output.detach().clone())),
    ]
    try:
        sample(model)
    finally:
        for hook in hooks:
            hook.remove()
    return indicators, outputs


def teacache(patching: Any, model: Any, base: Any, threshold: float, coefficients: tuple[float, ...] = (1.0, 0.0),
             indicator: Callable[[Any, dict], Any] = flux_modulated_input) -> tuple[Any, Any]:
    """TeaCache on the pack's runtime: the rule decides for every layer before the first one runs."""
    steps = base.grid.steps
    layers = [dataclasses.replace(layer, compute=(True,) + (False,) * (steps - 1), forecast_order=0)
              for layer in base.layers]
    schedule = dataclasses.replace(base, layers=tuple(layers), builder={"method": "teacache"})
    patched, holder = patching.apply_block_cache(model, schedule)
    state: dict[str, Any] = {"previous": None, "accumulated": 0.0, "evaluation": None, "compute": True}

    def decide(run: Any, first_layer: Any, args: tuple, kwargs: dict) -> Any:
        if state["evaluation"] == run.stats.evaluations:  # cond and uncond in two calls: decided at the first
            run.computes[:] = state["compute"]
            return first_layer(*args, **kwargs)
        state["evaluation"] = run.stats.evaluations
        current = indicator(first_layer.module, kwargs).detach()
        previous = state["previous"]
        step = run.run_step
        if step in (0, steps - 1) or previous is None or previous.shape != current.shape:
            compute_all = True
            state["accumulated"] = 0.0
        else:
            state["accumulated"], compute_all = teacache_accumulate(
                state["accumulated"], _relative_l1(current, previous), coefficients, threshold)
        state["previous"] = current
        state["compute"] = compute_all
        run.computes[:] = compute_all
        return first_layer(*args, **kwargs)

    _decide_at_first_layer(patched, holder, decide)
    _reset_per_run(patched, state, "bench_teacache", previous=None, accumulated=0.0, evaluation=None, compute=True)
    return patched, holder


def fit_magnitude_ratios(model: Any, sample: Callable[[Any], Any], first: str, last: str) -> list[float]:
    """MagCache's calibration: per step of one uncached ``sample(model)`` run, the mean over tokens of the
    ratio of the stack's residual norm (``last``'s output minus ``first``'s input) to the previous step's."""
    dit = model.get_model_object("diffusion_model")
    inputs: list[Any] = []
    residuals: list[Any] = []
    hooks = [
        dit.get_submodule(first).register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone())),
        dit.get_submodule(last).register_forward_hook(
            lambda module, args, output: residuals.append((output - inputs[-1]).detach().float())),
    ]
    try:
        sample(model)
    finally:
        for hook in hooks:
            hook.remove()
    ratios = [1.0]
    for previous, current in zip(residuals, residuals[1:], strict=False):
        ratios.append(float((current.norm(dim=-1) / previous.norm(dim=-1).clamp_min(1e-12)).mean()))
    return ratios


def magcache(patching: Any, model: Any, base: Any, threshold: float, ratios: list[float], max_skips: int = 2,
             retention: float = 0.2) -> tuple[Any, Any]:
    """MagCache on the pack's runtime: the calibrated magnitude ratios decide for every layer, per step."""
    steps = base.grid.steps
    if len(ratios) != steps:
        raise ValueError(f"MagCache's ratios are per step: {len(ratios)} for a {steps}-step run")
    layers = [dataclasses.replace(layer, compute=(True,) + (False,) * (steps - 1), forecast_order=0)
              for layer in base.layers]
    schedule = dataclasses.replace(base, layers=tuple(layers), builder={"method": "magcache"})
    patched, holder = patching.apply_block_cache(model, schedule)
    initial = {"ratio": 1.0, "error": 0.0, "skipped": 0, "evaluation": None, "compute": True}
    state: dict[str, Any] = dict(initial)

    def decide(run: Any, first_layer: Any, args: tuple, kwargs: dict) -> Any:
        if state["evaluation"] == run.stats.evaluations:  # cond and uncond in two calls: decided at the first
            run.computes[:] = state["compute"]
            return first_layer(*args, **kwargs)
        state["evaluation"] = run.stats.evaluations
        step = run.run_step
        compute_all = True
        if step >= retention * steps:
            state["ratio"] *= ratios[step]
            state["error"] += abs(1.0 - state["ratio"])
            state["skipped"] += 1
            compute_all = not (state["error"] < threshold and state["skipped"] <= max_skips)
        if compute_all:
            state.update(ratio=1.0, error=0.0, skipped=0)
        state["compute"] = compute_all
        run.computes[:] = compute_all
        return first_layer(*args, **kwargs)

    _decide_at_first_layer(patched, holder, decide)
    _reset_per_run(patched, state, "bench_magcache", **initial)
    return patched, holder


def easycache(model: Any, node: Any, threshold: float) -> Any:
    (patched,) = node.execute(model, threshold, 0.15, 0.95, False).result
    return patched
