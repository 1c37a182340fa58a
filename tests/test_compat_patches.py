"""Block Cache beside other packs' patches: LoRA, attention patches (IPAdapter-style), Flux block
replacement, post-CFG passes (PAG, SLG), ControlNet / T2I-Adapter, and core EasyCache / LazyCache.

Where it is defined, an all-compute schedule must give exactly the output of the same graph without
Block Cache; a caching schedule must cache and keep the other feature working. The ``schedules``
fixture (conftest.py) is (all-compute, caching) from a real profile of the tiny UNet.
"""

from __future__ import annotations

import dataclasses
import logging

import comfy.cldm.cldm
import comfy.controlnet
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.samplers
import comfy.t2i_adapter.adapter
import numpy as np
import pytest
import torch
from comfy.ldm.modules.attention import optimized_attention
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.demo_models.builtin_models import seeded_init_
from comfyui_block_cache.nodes.frontend import warn_never_reused
from dit_zoo import ZOO
from helpers import (
    patched_layers,
    profile_schedules,
    sample,
    with_lora,
)

WrappersMP = comfy.patcher_extension.WrappersMP
FLUX = next(e for e in ZOO if e.id == "flux-dev")


# -- LoRA ---------------------------------------------------------------------------------------

def test_lora_before_and_after_apply_all_compute_is_exact(pack, tiny_model, conds, latent, schedules):
    all_compute, _ = schedules
    reference = sample(with_lora(tiny_model), *conds, latent)
    assert not torch.equal(reference, sample(tiny_model, *conds, latent)), "the LoRA must change the output"
    before, _ = apply_block_cache(with_lora(tiny_model), all_compute)
    assert torch.equal(sample(before, *conds, latent), reference)
    after, _ = apply_block_cache(tiny_model, all_compute)
    after = with_lora(after)
    assert torch.equal(sample(after, *conds, latent), reference)


def test_lora_with_a_caching_schedule_caches_and_keeps_the_lora(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    plain, _ = apply_block_cache(tiny_model, caching)
    lora_cached, holder = apply_block_cache(with_lora(tiny_model), caching)
    out_plain = sample(plain, *conds, latent)
    out_lora = sample(lora_cached, *conds, latent)
    assert holder.last_run.reused.sum() > 0 and not torch.equal(out_plain, out_lora)
    # Applying the LoRA after Block Cache gives the same as before it.
    after = with_lora(apply_block_cache(tiny_model, caching)[0])
    assert torch.equal(sample(after, *conds, latent), out_lora)


# -- attention patches (IPAdapter-style) ----------------------------------------------------------

def _attention_patches(model, calls):
    def attn2_patch(q, k, v, extra_options):
        calls["attn2_patch"] += 1
        return q, k * 1.1, v

    def attn1_replace(q, k, v, extra_options):
        calls["attn1_replace"] += 1
        return optimized_attention(q, k, v * 0.9, extra_options["n_heads"])

    model.set_model_attn2_patch(attn2_patch)
    model.set_model_attn1_replace(attn1_replace, "input", 1)
    return model


def test_attention_patches_before_and_after_apply_all_compute_is_exact(pack, tiny_model, conds, latent, schedules):
    all_compute, _ = schedules
    calls = {"attn2_patch": 0, "attn1_replace": 0}
    reference = sample(_attention_patches(tiny_model.clone(), calls), *conds, latent)
    assert calls["attn1_replace"] > 0 and calls["attn2_patch"] > 0
    assert not torch.equal(reference, sample(tiny_model, *conds, latent))
    before, _ = apply_block_cache(_attention_patches(tiny_model.clone(), calls), all_compute)
    assert torch.equal(sample(before, *conds, latent), reference)
    after, _ = apply_block_cache(tiny_model, all_compute)
    assert torch.equal(sample(_attention_patches(after.clone(), calls), *conds, latent), reference)


def test_attention_replace_runs_whenever_its_layer_computes(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    calls = {"attn2_patch": 0, "attn1_replace": 0}
    patched, holder = apply_block_cache(_attention_patches(tiny_model.clone(), calls), caching)
    sample(patched, *conds, latent)
    index = holder.block_map.index()["input_blocks.1.1"]
    # One replace call per real computation of that SpatialTransformer (one transformer block).
    assert calls["attn1_replace"] == holder.last_run.computed[index] > 0


# -- patches_replace['dit'] (Skip-Layer Guidance style) on Flux -----------------------------------------

def test_dit_block_replace_patch_chains_with_block_cache(pack):
    model = FLUX.build(seed=0)
    conds, latent = FLUX.conds(), FLUX.latent()
    calls = []

    def double_block_replace(args, extras):
        calls.append(1)
        out = extras["original_block"](args)
        out["img"] = out["img"] * 0.98
        return out

    replaced = model.clone()
    replaced.set_model_patch_replace(double_block_replace, "dit", "double_block", 1)
    reference = sample(replaced, *conds, latent, steps=4, cfg=FLUX.cfg)
    assert calls and not torch.equal(reference, sample(model, *conds, latent, steps=4, cfg=FLUX.cfg))
    all_compute, caching = profile_schedules(pack, model, FLUX.conds(), latent, steps=4, cfg=FLUX.cfg)
    patched, _ = apply_block_cache(replaced, all_compute)
    assert torch.equal(sample(patched, *conds, latent, steps=4, cfg=FLUX.cfg), reference)
    # Set after our node, on its output: the same.
    after = apply_block_cache(model, all_compute)[0].clone()
    after.set_model_patch_replace(double_block_replace, "dit", "double_block", 1)
    assert torch.equal(sample(after, *conds, latent, steps=4, cfg=FLUX.cfg), reference)
    # Caching: the replace function still wraps the block at every evaluation; the block inside it caches.
    calls.clear()
    cached, holder = apply_block_cache(replaced, caching)
    sample(cached, *conds, latent, steps=4, cfg=FLUX.cfg)
    assert len(calls) == holder.last_run.evaluations and holder.last_run.reused.sum() > 0

# -- post-CFG passes (Perturbed-Attention Guidance, Skip-Layer Guidance) ----------------------------

def _discarded_perturbed_pass(calls):
    """A post-CFG function that calls the model again with the cond and a broken middle attention,
    as PAG does, but throws the result away: the sampled image must not change."""

    def zero_attention(q, k, v, extra_options):
        return torch.zeros_like(q)

    def post_cfg(args):
        options = comfy.model_patcher.set_model_options_patch_replace(args["model_options"].copy(), zero_attention,
                                                                      "attn1", "middle", 0)
        comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], options)
        calls.append(1)
        return args["denoised"]

    return post_cfg


@pytest.mark.parametrize("order", [0, 1])
def test_extra_post_cfg_passes_keep_their_own_cache(pack, tiny_model, conds, latent, schedules, order):
    """Also with forecast reuse (order 1): each pass keeps its own history of computations."""
    _, caching = schedules
    caching = dataclasses.replace(caching, layers=tuple(
        dataclasses.replace(layer, forecast_order=order if not all(layer.compute) else 0) for layer in caching.layers))
    reference_model, _ = apply_block_cache(tiny_model, caching)
    reference = sample(reference_model, *conds, latent)
    calls = []
    with_pass = tiny_model.clone()
    with_pass.set_model_sampler_post_cfg_function(_discarded_perturbed_pass(calls))
    patched, holder = apply_block_cache(with_pass, caching)
    out = sample(patched, *conds, latent)
    assert len(calls) == holder.last_run.evaluations and holder.last_run.reused.sum() > 0
    # Had the perturbed pass shared the cond's cache, reused layers would carry its broken attention.
    assert torch.equal(out, reference)


def test_perturbed_attention_guidance_all_compute_is_exact(pack, tiny_model, conds, latent, schedules):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    all_compute, caching = schedules
    (pag_model,) = PerturbedAttentionGuidance.execute(tiny_model, 2.0).result
    reference = sample(pag_model, *conds, latent)
    assert not torch.equal(reference, sample(tiny_model, *conds, latent))
    before, _ = apply_block_cache(pag_model, all_compute)
    assert torch.equal(sample(before, *conds, latent), reference)
    (after,) = PerturbedAttentionGuidance.execute(apply_block_cache(tiny_model, all_compute)[0],
                                                  2.0).result
    assert torch.equal(sample(after, *conds, latent), reference)
    cached, holder = apply_block_cache(pag_model, caching)
    assert torch.isfinite(sample(cached, *conds, latent)).all() and holder.last_run.reused.sum() > 0

# -- ControlNet / T2I-Adapter ------------------------------------------------------------------------

def _tiny_controlnet(pack, model):
    """A ControlNet (comfy.cldm) with the tiny UNet's own config, seeded, as load_controlnet wraps it."""
    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels")
    control_model = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, operations=comfy.ops.disable_weight_init)
    seeded_init_(control_model, 5)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device())


def _tiny_t2i_adapter(pack, model):
    """An SDXL-layout T2I-Adapter (cin 768: 3 channels x 16x16 pixel unshuffle), two 64-channel levels:
    its features land on the tiny UNet's input block 3 and its middle block, both 64 x 8 x 8."""
    adapter = comfy.t2i_adapter.adapter.Adapter(channels=[64, 64], nums_rb=1, cin=768, ksize=1, sk=True,
                                                use_conv=False, xl=True)
    seeded_init_(adapter, 6)
    return comfy.controlnet.T2IAdapter(adapter, adapter.input_channels, 8, "nearest-exact")


# Control tensors added to the UNet per model call: ControlNet to the middle block and the 4 skip
# connections of the output blocks; this T2I-Adapter to input block 3 and the middle block.
CONTROLS = {"ControlNet": (_tiny_controlnet, 5), "T2IAdapter": (_tiny_t2i_adapter, 2)}


def _controlled(conds, control, strength=0.3):
    """The conditioning as core's Apply ControlNet node makes it, from a seeded 128x128 hint image."""
    import nodes

    image = torch.rand((1, 128, 128, 3), generator=torch.Generator().manual_seed(1))
    return nodes.ControlNetApplyAdvanced().apply_controlnet(*conds, control, image, strength, 0.0, 1.0)


@pytest.fixture
def applied_controls(monkeypatch):
    """Every control tensor the UNet adds (openaimodel.apply_control, which runs after each block
    whether its layers computed or were served from the cache), as (where, shape) pairs."""
    applied = []
    original = openaimodel.apply_control

    def counting(h, control, name):
        if control is not None and control.get(name) and control[name][-1] is not None:
            assert control[name][-1].shape[1:] == h.shape[1:], "a control tensor that does not fit its block"
            applied.append((name, tuple(h.shape)))
        return original(h, control, name)

    monkeypatch.setattr(openaimodel, "apply_control", counting)
    return applied


@pytest.mark.parametrize("kind", CONTROLS)
def test_control_all_compute_is_exact(pack, tiny_model, conds, latent, schedules, applied_controls, kind):
    build, per_call = CONTROLS[kind]
    all_compute, _ = schedules
    controlled = _controlled(conds, build(pack, tiny_model))
    reference = sample(tiny_model, *controlled, latent)
    reference_applied = len(applied_controls)
    assert reference_applied == 8 * per_call, "one batched cond+uncond call per step, every control applied"
    assert not torch.equal(reference, sample(tiny_model, *conds, latent)), "the control must change the output"
    patched, holder = apply_block_cache(tiny_model, all_compute)
    applied_controls.clear()
    assert torch.equal(sample(patched, *controlled, latent), reference)
    assert len(applied_controls) == reference_applied and holder.last_run.reused.sum() == 0


@pytest.mark.parametrize("kind", CONTROLS)
def test_control_reaches_the_computing_layers_of_a_caching_run(pack, tiny_model, conds, latent, schedules,
                                                                applied_controls, kind):
    build, per_call = CONTROLS[kind]
    _, caching = schedules
    control = build(pack, tiny_model)
    controlled = _controlled(conds, control)
    plain, plain_holder = apply_block_cache(tiny_model, caching)
    without_control = sample(plain, *conds, latent)
    patched, holder = apply_block_cache(tiny_model, caching)
    applied_controls.clear()
    out = sample(patched, *controlled, latent)
    stats = holder.last_run
    assert stats.reused.sum() > 0 and torch.isfinite(out).all()
    np.testing.assert_array_equal(stats.computed, plain_holder.last_run.computed)
    # The UNet adds the control after every block at every evaluation, cached layers or not.
    assert len(applied_controls) == stats.evaluations * per_call
    assert not torch.equal(out, without_control), "the control must reach the caching run's output"
    # Same patched model again: same result (the ControlNet's own hint cache is core's, per run).
    assert torch.equal(sample(patched, *controlled, latent), out)
    # Restored: the loader's model samples the controlled graph as before Block Cache was applied,
    # and neither it nor the control model keeps any of our layer patches.
    reference = sample(tiny_model.clone(), *controlled, latent)
    assert torch.equal(sample(tiny_model, *controlled, latent), reference)
    assert not patched_layers(tiny_model.model)
    assert not patched_layers(getattr(control, "control_model", None) or control.t2i_model)

# -- stacking with ComfyUI's own EasyCache / LazyCache ------------------------------------------------

@pytest.mark.parametrize("node_name", ["EasyCacheNode", "LazyCacheNode"])
def test_stacking_with_core_step_caches(pack, tiny_model, conds, latent, schedules, node_name):
    """Defined behaviour: EasyCache/LazyCache decide per step whether the model runs at all; when it
    runs, Block Cache decides per layer. With an all-compute schedule the result is theirs alone."""
    import comfy_extras.nodes_easycache as easycache

    node = getattr(easycache, node_name)
    all_compute, caching = schedules

    def theirs(model):
        return node.execute(model, 0.2, 0.15, 0.95, False).result[0]

    reference = sample(theirs(tiny_model), *conds, latent)
    ours_then_theirs = theirs(apply_block_cache(tiny_model, all_compute)[0])
    assert torch.equal(sample(ours_then_theirs, *conds, latent), reference)
    theirs_then_ours, _ = apply_block_cache(theirs(tiny_model), all_compute)
    assert torch.equal(sample(theirs_then_ours, *conds, latent), reference)
    both, holder = apply_block_cache(theirs(tiny_model), caching)
    out = sample(both, *conds, latent)
    assert torch.isfinite(out).all() and holder.last_run.computed.sum() > 0


def test_a_pack_that_patches_the_block_forwards_itself_is_said_to_bypass_the_cache(pack, tiny_model, conds, latent,
                                                                                   schedules, caplog):
    """A pack that swaps the blocks' forwards inside its own unet wrapper for each call (the hook peers.md gives
    for the TaylorSeer pack) bypasses Block Cache's layer patches: the run is that pack's alone, and Block Cache
    says which of its layers were never called instead of saving nothing in silence."""
    import contextlib
    from unittest import mock

    _, caching = schedules
    diffusion_model = tiny_model.get_model_object("diffusion_model")
    names = [layer.name for layer in caching.layers]

    def swapping_wrapper(apply_model, args):
        with contextlib.ExitStack() as stack:
            for name in names:
                block = diffusion_model.get_submodule(name)
                stack.enter_context(mock.patch.object(block, "forward", type(block).forward.__get__(block)))
            return apply_model(args["input"], args["timestep"], **args["c"])

    theirs = tiny_model.clone()
    theirs.set_model_unet_function_wrapper(swapping_wrapper)
    both, holder = apply_block_cache(theirs, caching)
    holder.run_listeners.append(warn_never_reused)  # as Apply Block Cache does
    with caplog.at_level(logging.WARNING):
        assert torch.equal(sample(both, *conds, latent), sample(tiny_model, *conds, latent))
    assert holder.last_run.computed.sum() == 0 and holder.last_run.reused.sum() == 0
    assert "were never called in this run" in caplog.text
    alone, holder = apply_block_cache(tiny_model, caching)
    sample(alone, *conds, latent)
    assert holder.last_run.reused.sum() > 0, "without that pack the same schedule caches"


def test_a_pack_that_swaps_forward_orig_and_skips_steps_runs_with_block_cache(pack):
    """A pack that swaps Flux's ``forward_orig`` inside its own unet wrapper for each call and skips whole steps
    by re-adding its last residual (the TeaCache / MagCache hook, as peers.md describes it): its skipping decides
    per step; on the steps it computes, its forward calls the blocks, and Block Cache decides per layer. With an
    all-compute schedule the run is that pack's alone, bit for bit."""
    from unittest import mock

    model = FLUX.build(seed=0)
    conds, latent = FLUX.conds(), FLUX.latent()
    diffusion_model = model.get_model_object("diffusion_model")
    original = type(diffusion_model).forward_orig

    def stepping_pack(model_in):
        state = {"call": 0, "residual": None}

        def forward_orig(self, img, *args, **kwargs):
            state["call"] += 1
            if state["call"] % 3 == 0 and state["residual"] is not None and state["residual"].shape == img.shape:
                return img + state["residual"]  # a skipped step
            out = original(self, img, *args, **kwargs)
            state["residual"] = out - img if out.shape == img.shape else None
            return out

        def wrapper(apply_model, args):
            with mock.patch.object(type(diffusion_model), "forward_orig", forward_orig):
                return apply_model(args["input"], args["timestep"], **args["c"])

        patched = model_in.clone()
        patched.set_model_unet_function_wrapper(wrapper)
        return patched

    all_compute, caching = profile_schedules(pack, model, FLUX.conds(), latent, steps=6, cfg=FLUX.cfg)
    reference = sample(stepping_pack(model), *conds, latent, steps=6, cfg=FLUX.cfg)
    assert not torch.equal(reference, sample(model, *conds, latent, steps=6, cfg=FLUX.cfg)), "the pack skips"
    exact, _ = apply_block_cache(stepping_pack(model), all_compute)
    assert torch.equal(sample(exact, *conds, latent, steps=6, cfg=FLUX.cfg), reference)
    both, holder = apply_block_cache(stepping_pack(model), caching)
    out = sample(both, *conds, latent, steps=6, cfg=FLUX.cfg)
    assert torch.isfinite(out).all() and holder.last_run.computed.sum() > 0 and holder.last_run.reused.sum() > 0
    assert not torch.equal(out, reference), "Block Cache still reuses layers on the steps the pack computes"
