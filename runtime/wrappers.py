"""Installing the runtime on a ComfyUI ModelPatcher: object patches and keyed wrappers only, one
wrapper per type, all under ``WRAPPER_KEY``. The only module of the pack that registers or removes them.

* OUTER_SAMPLE creates the run's context, publishes it in the run's ``transformer_options`` and
  frees it at the end, whatever happens;
* PREDICT_NOISE marks each solver evaluation (the context maps its sigma onto the steps once) and
  runs it through the methods' ``around_evaluation``;
* APPLY_MODEL opens a ``ModelCall`` scope (the cond chunks the call carries and the model it runs
  on), which the layer patches read;
* DIFFUSION_MODEL, only where an extension asks for it, runs each diffusion-model call through the
  methods' ``around_diffusion_model``.

Outside a run the object patches call the forward they replaced, untouched.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import comfy.model_patcher
import torch
from comfy.patcher_extension import WrappersMP

from ..block_maps.block_map import BlockMap
from .run import (
    WRAPPER_KEY,
    ExtensionLayerForward,
    ForwardPatch,
    LayerForward,
    RunContext,
    RunHolder,
    active_call,
    run_context,
    sampler_name_of,
)

logger = logging.getLogger(__name__)


def outer_sample_wrapper(holder: RunHolder, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Starts a fresh run context for every sampling run, publishes it in the guider's
    ``transformer_options`` for the run, and frees it whatever happens."""
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
    guider = executor.class_obj
    run = RunContext(holder, guider.model_patcher.get_model_object("model_sampling"), sigmas,
                     sampler_name_of(sampler))
    cfg = getattr(guider, "cfg", None)
    run.stats.cfg = float(cfg) if isinstance(cfg, (int, float)) else None
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    guider.model_options.setdefault("transformer_options", {})[WRAPPER_KEY] = run
    started = time.perf_counter()
    completed = False
    try:
        result = executor(*args, **kwargs)
        completed = True
        return result
    finally:
        guider.model_options = original_options
        stats = run.close()
        holder.last_run = stats
        if completed:
            stats.seconds = time.perf_counter() - started
        holder.finish_run(run, completed)
        if completed:
            for listener in holder.run_listeners:
                try:
                    listener(holder, stats)
                except Exception:  # a display hook must never fail a finished run
                    logger.exception("%s: a run listener failed", holder.name)


def predict_noise_wrapper(holder: RunHolder, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs once per solver evaluation, for all conds together."""
    run = run_context(args[2] if len(args) > 2 else kwargs.get("model_options"))
    if run is None or run.holder is not holder:
        return executor(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]

    def model_evaluation(inputs: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if inputs is None:
            return executor(*args, **kwargs)
        moved_args, moved_kwargs = list(args), dict(kwargs)
        for position, name, value in ((0, "x", inputs[0]), (1, "timestep", inputs[1])):
            if len(moved_args) > position:
                moved_args[position] = value
            else:
                moved_kwargs[name] = value
        return executor(*moved_args, **moved_kwargs)

    try:
        run.begin_evaluation(x, timestep)  # inside: a method failing at the start still ends the evaluation
        denoised = run.evaluate(model_evaluation)
        run.observe_denoised(x, timestep, denoised)
        return denoised
    finally:
        run.end_evaluation()


def apply_model_wrapper(holder: RunHolder, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Opens the model call's scope: which cond chunks it carries (one cache per chunk), and the
    model it runs on, for the layer patches called inside it."""
    transformer_options = kwargs.get("transformer_options")
    if transformer_options is None and len(args) > 5:
        transformer_options = args[5]
    transformer_options = transformer_options or {}
    run = run_context(transformer_options)
    if run is None or run.holder is not holder:
        return executor(*args, **kwargs)
    keys = transformer_options.get("uuids") or transformer_options.get("cond_or_uncond") or [None]
    x = args[0] if args else kwargs["x"]
    if x.shape[0] % len(keys) != 0:
        keys = [None]
    frames = context_window_frames(transformer_options)
    if frames is not None:
        keys = [(key, frames) for key in keys]
    passes = run.passes
    pass_index = max(passes.get(key, 0) for key in keys)
    for key in keys:
        passes[key] = pass_index + 1
    with run.model_call([(key, pass_index) for key in keys], getattr(executor, "class_obj", None)):
        return run.layer_method.call_model(run, executor, args, kwargs)


def context_window_frames(transformer_options: dict) -> tuple | None:
    """The frames of the context window this model call runs on (ComfyUI's context windows sample a
    long video as one call per window; windows may move between steps), or None. Each window's
    layers cache apart, so a reuse only ever stands in for the same frames."""
    window = transformer_options.get("context_window")
    if window is None:
        return None
    return ("frames", *getattr(window, "index_list", ()), getattr(window, "causal_anchor_index", None))


def diffusion_model_wrapper(holder: RunHolder, executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs each diffusion-model call of a run through the methods that act around it."""
    call = active_call()
    if call is None or call.run.holder is not holder:
        return executor(*args, **kwargs)
    wrappers, index = getattr(executor, "wrappers", None), getattr(executor, "idx", None)
    others_inside = isinstance(wrappers, list) and isinstance(index, int) and len(wrappers) > index + 1
    return call.run.call_diffusion_model(call, executor, args, kwargs, others_inside)


_WRAPPERS = (
    (WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
    (WrappersMP.PREDICT_NOISE, predict_noise_wrapper),
    (WrappersMP.APPLY_MODEL, apply_model_wrapper),
    (WrappersMP.DIFFUSION_MODEL, diffusion_model_wrapper),
)


def remove_runtime(patched: Any) -> list[str]:
    """Takes a previous install off ``patched`` (a clone the caller owns): its wrappers, and its object
    patches, giving back the patches of other packs they replaced. Returns the names of the holders removed."""
    for wrapper_type, _ in _WRAPPERS:
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    removed: list[str] = []
    for key, current in list(patched.object_patches.items()):
        if isinstance(current, ForwardPatch):
            if current.holder.name not in removed:
                removed.append(current.holder.name)
            if current.replaced_a_patch:
                patched.add_object_patch(key, current.original)
            else:
                del patched.object_patches[key]
    return removed


def _patch_forward(patched: Any, name: str, make: Callable[..., ForwardPatch]) -> None:
    key = f"diffusion_model.{name}.forward"
    replaced_a_patch = key in patched.object_patches
    module = patched.get_model_object("diffusion_model").get_submodule(name)
    patched.add_object_patch(key, make(module=module, original=patched.get_model_object(key),
                                       replaced_a_patch=replaced_a_patch))


def install_runtime(model: Any, block_map: BlockMap, holder: RunHolder) -> Any:
    """A clone of ``model`` whose ``block_map`` layers, and the layers its extensions name, run through
    ``holder``'s runs.

    A second install on an already patched model replaces the first instead of stacking on it (and says
    so); the model passed in is never changed.
    """
    patched = model.clone()
    for replaced in remove_runtime(patched):
        # One runtime per model: what the earlier node installed (a recording, a cache) no longer runs.
        logger.warning("%s replaces the %s this model already had: it no longer runs on the model this returns.",
                       holder.name, replaced)
    diffusion_model = patched.get_model_object("diffusion_model")
    for index, spec in enumerate(block_map.layers):
        _patch_forward(patched, spec.name, functools.partial(LayerForward, holder, index, spec,
                                                             diffusion_model=diffusion_model))
    for extension in holder.extensions:
        for name in extension.patched_layers:
            _patch_forward(patched, name, functools.partial(ExtensionLayerForward, holder, extension, name,
                                                            diffusion_model=diffusion_model))
    wraps_diffusion_model = any(extension.wraps_diffusion_model for extension in holder.extensions)
    for wrapper_type, wrapper in _WRAPPERS:
        if wrapper_type != WrappersMP.DIFFUSION_MODEL or wraps_diffusion_model:
            patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, functools.partial(wrapper, holder))
    return patched

