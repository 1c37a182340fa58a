"""Runtime details on a real Flux double block: in-place inputs, repeated calls, cache device."""

from __future__ import annotations

import dataclasses

import comfy.patcher_extension
import comfy.samplers
import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.cache import CACHE_DEVICES, CACHE_ON_CPU, BlockCacheHolder
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.plan import LayerPlan
from comfyui_block_cache.block_caching.schedule import BuildOptions, all_compute_schedule, build_schedule
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from comfyui_block_cache.runtime import run as runtime
from comfyui_block_cache.runtime.run import LayerForward, RunContext
from comfyui_block_cache.runtime.time_grid import StepGrid
from dit_zoo import ZOO
from helpers import profile_by_sampling, run_of, sample

FLUX = next(e for e in ZOO if e.id == "flux-dev")
LAYER = "double_blocks.0"


@pytest.fixture(scope="module")
def flux(pack):
    """The tiny Flux model and the real arguments its first double block got at the first step."""
    model = FLUX.build(seed=0)
    block = model.model.diffusion_model.get_submodule(LAYER)
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        if not captured:
            captured.append((args, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sample(model, *FLUX.conds(), FLUX.latent(), steps=2, cfg=1.0)
    finally:
        handle.remove()
    return model, block, captured[0]


def _holder(pack, model, compute_at_second_step: bool, cache_device: str = "model device"):
    block_map = block_map_for_patcher(model)
    model_sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "normal", 2).cpu()
    grid = StepGrid.from_sigmas(model_sampling, sigmas)
    schedule = all_compute_schedule(block_map, grid)
    layers = tuple(dataclasses.replace(layer, compute=(True, compute_at_second_step)) for layer in schedule.layers)
    schedule = dataclasses.replace(schedule, layers=layers)
    holder = BlockCacheHolder(block_map, plan=LayerPlan.from_schedule(schedule),
                                           cache_device=cache_device)
    run = RunContext(holder, model_sampling, sigmas)
    index = block_map.index()[LAYER]
    return run, sigmas, index


def _patch(pack, run, block, index):
    """The layer's patch, called inside one model call of ``run`` per evaluation (as APPLY_MODEL opens them)."""
    spec = run.holder.block_map.layers[index]
    patch = LayerForward(run.holder, index, spec, block, block.forward, None)
    calls = {}

    def call(*args, **kwargs):
        model_call = calls.setdefault(run.stats.evaluations, runtime.ModelCall(run, [None]))
        with runtime.activate(model_call):
            return patch(*args, **kwargs)

    return call


def _fresh(kwargs: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _step(run, sigmas, step: int) -> None:
    run.end_evaluation()
    run.begin_evaluation(torch.zeros(1, 16, 8, 8), sigmas[step:step + 1])


def test_reused_double_block_rebuilds_its_output_despite_in_place_updates(pack, flux):
    model, block, (args, kwargs) = flux
    assert not args and "img" in kwargs and "txt" in kwargs  # Flux passes the streams by keyword
    reference_img, reference_txt = block(**_fresh(kwargs))
    run, sigmas, index = _holder(pack, model, compute_at_second_step=False)
    patch = _patch(pack, run, block, index)
    run.begin_evaluation(torch.zeros(1, 16, 8, 8), sigmas[:1])
    computed = _fresh(kwargs)
    img, txt = patch(**computed)
    assert img is computed["img"]  # the block really updated its input in place
    _step(run, sigmas, 1)
    reused_inputs = _fresh(kwargs)
    img, txt = patch(**reused_inputs)
    assert run.stats.reused[index] == 1 and run.stats.computed[index] == 1
    # Same inputs at the reused step: input + cached residual must give the computed output back.
    # Had the residual been taken against the updated input, it would be zero and img == the input.
    torch.testing.assert_close(img, reference_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(txt, reference_txt, rtol=0, atol=1e-5)
    assert torch.equal(reused_inputs["img"], kwargs["img"]), "a reused block must not touch its inputs"
    run.close()


def test_each_call_of_a_block_within_one_model_call_has_its_own_cache(pack, flux):
    model, block, (_, kwargs) = flux
    other = _fresh(kwargs)
    other["img"] = other["img"] * 0.5 + 0.1
    expected = [block(**_fresh(kwargs))[0], block(**_fresh(other))[0]]
    run, sigmas, index = _holder(pack, model, compute_at_second_step=False)
    patch = _patch(pack, run, block, index)
    run.begin_evaluation(torch.zeros(1, 16, 8, 8), sigmas[:1])
    patch(**_fresh(kwargs))
    patch(**_fresh(other))
    _step(run, sigmas, 1)
    reused = [patch(**_fresh(kwargs))[0], patch(**_fresh(other))[0]]
    assert run.stats.reused[index] == 2
    for got, want in zip(reused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    run.close()


def test_cpu_cache_device_gives_the_same_output(pack):
    model = FLUX.build(seed=0)
    conds, latent = FLUX.conds(), FLUX.latent()
    profile, _ = profile_by_sampling(pack, model, conds, latent, steps=4, cfg=FLUX.cfg)
    schedule = build_schedule(profile, BuildOptions(threshold=10.0))
    outputs = []
    for device in CACHE_DEVICES:
        patched, holder = apply_block_cache(model, schedule, cache_device=device)
        cached = []

        def watch(executor, *args, cached=cached, **kwargs):
            out = executor(*args, **kwargs)
            run = run_of(args, kwargs)
            cached.extend(t for entry in run.layer_method.cache.values() for point in entry.points for t in point if t is not None)
            return out

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_watch", watch)
        outputs.append(sample(patched, *conds, latent, steps=4, cfg=FLUX.cfg))
        stats = holder.last_run
        assert stats.reused.sum() > 0 and stats.figures["cache"].stores > 0 and cached
        if device == CACHE_ON_CPU:
            # every stored tensor went through the CPU copy (pinned where CUDA is there)
            assert stats.figures["cache"].offloaded >= stats.figures["cache"].stores  # one per chunk and stream of each stored call
            assert all(t.device.type == "cpu" and t.is_pinned() == torch.cuda.is_available() for t in cached)
        else:
            assert stats.figures["cache"].offloaded == 0
    assert torch.equal(outputs[0], outputs[1])
    with pytest.raises(ValueError, match="cache_device must be one of"):
        apply_block_cache(model, schedule, cache_device="gpu0")


@pytest.mark.parametrize("sampler,steps", [("heun", 3), ("euler", 7), ("dpmpp_2m", 5)])
def test_schedule_is_retimed_onto_other_samplers_and_step_counts(pack, sampler, steps):
    from helpers import count_layer_computations, expected_computations, record_evaluation_sigmas

    model = FLUX.build(seed=0)
    conds, latent = FLUX.conds(), FLUX.latent()
    profile, _ = profile_by_sampling(pack, model, conds, latent, steps=6, cfg=FLUX.cfg)
    schedule = build_schedule(profile, BuildOptions(threshold=0.6))
    assert not schedule.compute_mask().all()
    patched, holder = apply_block_cache(model, schedule)
    eval_sigmas = record_evaluation_sigmas(patched)
    names = [layer.name for layer in schedule.layers]
    with count_layer_computations(model.model.diffusion_model, names) as counts:
        sample(patched, *conds, latent, steps=steps, sampler=sampler, cfg=FLUX.cfg)
    counted = np.array([counts[name] for name in names])
    np.testing.assert_array_equal(counted, expected_computations(schedule, model, eval_sigmas,
                                                                 holder.last_sample_sigmas))
    assert holder.last_run.figures["cache"].retimed
