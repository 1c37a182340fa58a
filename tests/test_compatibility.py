"""Block Cache beside other patches and in awkward graph shapes, on real ComfyUI code.

Where it is defined, an all-compute schedule must give exactly the output of the same graph
without Block Cache; a caching schedule must keep the other patch working.
"""

from __future__ import annotations

import dataclasses

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import numpy as np
import pytest
import torch
from comfy.ldm.modules.attention import optimized_attention
from dit_zoo import ZOO
from helpers import (
    InterruptAt,
    count_layer_computations,
    has_block_cache,
    live_tensor_bytes,
    profile_by_sampling,
    run_of,
    runs_holding_tensors,
    sample,
)

FLUX = next(e for e in ZOO if e.id == "flux-dev")


def profile_schedules(pack, model, conds, latent, steps=8, cfg=5.0):
    """(all-compute schedule, caching schedule) built from a real profile of ``model``."""
    profile, _ = profile_by_sampling(pack, model, conds, latent, steps=steps, cfg=cfg)
    caching = pack.block_caching.schedule.build_schedule(profile, pack.block_caching.schedule.BuildOptions(threshold=1.0, cache_kinds="all"))
    assert not caching.compute_mask().all()
    return pack.block_caching.schedule.all_compute_schedule(profile.block_map, profile.grid), caching


@pytest.fixture
def schedules(pack, tiny_model, conds, latent):
    return profile_schedules(pack, tiny_model, conds, latent)


def _lora_patches(model, seed=3, scale=0.05):
    """LoRA-style weight differences on every attention projection, through ModelPatcher.add_patches."""
    generator = torch.Generator().manual_seed(seed)
    patches = {}
    for key, weight in model.model.state_dict().items():
        if key.endswith(("to_q.weight", "to_k.weight", "to_v.weight")):
            patches[key] = (torch.randn(weight.shape, generator=generator) * scale,)
    assert patches
    return patches


def with_lora(model):
    lora = model.clone()
    lora.add_patches(_lora_patches(model), 1.0)
    return lora


# -- LoRA ---------------------------------------------------------------------------------------

def test_lora_before_and_after_apply_all_compute_is_exact(pack, tiny_model, conds, latent, schedules):
    all_compute, _ = schedules
    reference = sample(with_lora(tiny_model), *conds, latent)
    assert not torch.equal(reference, sample(tiny_model, *conds, latent)), "the LoRA must change the output"
    before, _ = pack.block_caching.patching.apply_block_cache(with_lora(tiny_model), all_compute)
    assert torch.equal(sample(before, *conds, latent), reference)
    after, _ = pack.block_caching.patching.apply_block_cache(tiny_model, all_compute)
    after = with_lora(after)
    assert torch.equal(sample(after, *conds, latent), reference)


def test_lora_with_a_caching_schedule_caches_and_keeps_the_lora(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    plain, _ = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    lora_cached, holder = pack.block_caching.patching.apply_block_cache(with_lora(tiny_model), caching)
    out_plain = sample(plain, *conds, latent)
    out_lora = sample(lora_cached, *conds, latent)
    assert holder.last_run.reused.sum() > 0 and not torch.equal(out_plain, out_lora)
    # Applying the LoRA after Block Cache gives the same as before it.
    after = with_lora(pack.block_caching.patching.apply_block_cache(tiny_model, caching)[0])
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
    before, _ = pack.block_caching.patching.apply_block_cache(_attention_patches(tiny_model.clone(), calls), all_compute)
    assert torch.equal(sample(before, *conds, latent), reference)
    after, _ = pack.block_caching.patching.apply_block_cache(tiny_model, all_compute)
    assert torch.equal(sample(_attention_patches(after.clone(), calls), *conds, latent), reference)


def test_attention_replace_runs_whenever_its_layer_computes(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    calls = {"attn2_patch": 0, "attn1_replace": 0}
    patched, holder = pack.block_caching.patching.apply_block_cache(_attention_patches(tiny_model.clone(), calls), caching)
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
    patched, _ = pack.block_caching.patching.apply_block_cache(replaced, all_compute)
    assert torch.equal(sample(patched, *conds, latent, steps=4, cfg=FLUX.cfg), reference)
    # Set after our node, on its output: the same.
    after = pack.block_caching.patching.apply_block_cache(model, all_compute)[0].clone()
    after.set_model_patch_replace(double_block_replace, "dit", "double_block", 1)
    assert torch.equal(sample(after, *conds, latent, steps=4, cfg=FLUX.cfg), reference)
    # Caching: the replace function still wraps the block at every evaluation; the block inside it caches.
    calls.clear()
    cached, holder = pack.block_caching.patching.apply_block_cache(replaced, caching)
    sample(cached, *conds, latent, steps=4, cfg=FLUX.cfg)
    assert len(calls) == holder.last_run.evaluations and holder.last_run.reused.sum() > 0


# -- graph shapes -------------------------------------------------------------------------------

def test_one_patched_model_in_two_samplers_gives_the_same_result_twice(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    patched, holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    first = sample(patched, *conds, latent)
    first_stats = holder.last_run
    second = sample(patched, *conds, latent)
    assert torch.equal(first, second)
    np.testing.assert_array_equal(first_stats.computed, holder.last_run.computed)


def test_bypassed_apply_leaves_no_caching_behind(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    reference = sample(tiny_model, *conds, latent)
    patched, holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    sample(patched, *conds, latent)
    # The next graph has the Apply node bypassed: the loader's model goes straight to the sampler.
    names = [layer.name for layer in caching.layers]
    with count_layer_computations(tiny_model.model.diffusion_model, names) as counts:
        assert torch.equal(sample(tiny_model, *conds, latent), reference)
    assert all(counts[name] == 8 for name in names)
    assert not has_block_cache(tiny_model)


def test_two_applies_on_clones_of_one_model_do_not_share_state(pack, tiny_model, conds, latent, schedules):
    all_compute, caching = schedules
    exact, exact_holder = pack.block_caching.patching.apply_block_cache(tiny_model, all_compute)
    cached, cached_holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    reference = sample(tiny_model, *conds, latent)
    cached_out = sample(cached, *conds, latent)
    assert torch.equal(sample(exact, *conds, latent), reference)
    assert torch.equal(sample(cached, *conds, latent), cached_out)
    assert exact_holder.last_run.reused.sum() == 0 and cached_holder.last_run.reused.sum() > 0
    assert exact_holder is not cached_holder


def test_second_apply_on_a_patched_model_replaces_the_first(pack, tiny_model, conds, latent, schedules):
    all_compute, caching = schedules
    twice, holder = pack.block_caching.patching.apply_block_cache(
        pack.block_caching.patching.apply_block_cache(tiny_model, caching)[0], all_compute)
    assert torch.equal(sample(twice, *conds, latent), sample(tiny_model, *conds, latent))
    assert holder.last_run.reused.sum() == 0


# -- cancellation and memory ----------------------------------------------------------------------

def test_interrupt_mid_sampling_leaves_nothing_behind(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    clean, _ = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    expected = sample(clean, *conds, latent)
    patched, holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    interrupted = patched.clone()
    interrupt = InterruptAt(4)
    runs = []

    def keep_run(executor, *args, **kwargs):
        runs.append(run_of(args, kwargs))
        return executor(*args, **kwargs)

    interrupted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_interrupt", interrupt)
    interrupted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_keep_run", keep_run)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(interrupted, *conds, latent)
    assert interrupt.seen == 4 and runs[-1] is not None
    assert not runs_holding_tensors(holder), "the run state must be dropped"
    assert runs[-1].layer_method.cache == {}, "the interrupted run's cached tensors must be freed"
    # The next run with the same patched model is clean: exactly a fresh model's result.
    assert torch.equal(sample(patched, *conds, latent), expected)
    # And the loader's model is unpatched again.
    assert torch.equal(sample(tiny_model, *conds, latent), sample(tiny_model.clone(), *conds, latent))


def test_no_memory_growth_over_twenty_runs(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    patched, holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    sample(patched, *conds, latent)

    before = live_tensor_bytes()
    peaks = []
    for _ in range(20):
        sample(patched, *conds, latent)
        peaks.append(holder.last_run.peak_cache_bytes)
    after = live_tensor_bytes()
    assert len(set(peaks)) == 1 and peaks[0] > 0, "every run caches the same amount"
    assert after - before <= 0, f"{after - before} bytes of tensors stayed alive after 20 runs"


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
    reference_model, _ = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    reference = sample(reference_model, *conds, latent)
    calls = []
    with_pass = tiny_model.clone()
    with_pass.set_model_sampler_post_cfg_function(_discarded_perturbed_pass(calls))
    patched, holder = pack.block_caching.patching.apply_block_cache(with_pass, caching)
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
    before, _ = pack.block_caching.patching.apply_block_cache(pag_model, all_compute)
    assert torch.equal(sample(before, *conds, latent), reference)
    (after,) = PerturbedAttentionGuidance.execute(pack.block_caching.patching.apply_block_cache(tiny_model, all_compute)[0],
                                                  2.0).result
    assert torch.equal(sample(after, *conds, latent), reference)
    cached, holder = pack.block_caching.patching.apply_block_cache(pag_model, caching)
    assert torch.isfinite(sample(cached, *conds, latent)).all() and holder.last_run.reused.sum() > 0


# -- model-sampling nodes, FreeU --------------------------------------------------------------

def _model_sampling_v_zsnr(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    return ModelSamplingDiscrete().patch(model, "v_prediction", True)[0]


def _freeu(model):
    from comfy_extras.nodes_freelunch import FreeU

    return FreeU().patch(model, 1.3, 1.4, 0.9, 0.2)[0]


@pytest.mark.parametrize("other", [_model_sampling_v_zsnr, _freeu], ids=["ModelSamplingDiscrete", "FreeU"])
def test_model_patch_nodes_before_and_after_apply_all_compute_is_exact(pack, tiny_model, conds, latent, other):
    patched_other = other(tiny_model)
    reference = sample(patched_other, *conds, latent)
    assert not torch.equal(reference, sample(tiny_model, *conds, latent))
    # Profile the model as the graph has it, so the schedule's grid is that model's own.
    all_compute, caching = profile_schedules(pack, patched_other, conds, latent)
    before, _ = pack.block_caching.patching.apply_block_cache(patched_other, all_compute)
    assert torch.equal(sample(before, *conds, latent), reference)
    after = other(pack.block_caching.patching.apply_block_cache(tiny_model, all_compute)[0])
    assert torch.equal(sample(after, *conds, latent), reference)
    cached, holder = pack.block_caching.patching.apply_block_cache(patched_other, caching)
    assert torch.isfinite(sample(cached, *conds, latent)).all() and holder.last_run.reused.sum() > 0
    assert not holder.last_run.retimed, "the schedule's grid must match the patched model's own sigmas"


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
    ours_then_theirs = theirs(pack.block_caching.patching.apply_block_cache(tiny_model, all_compute)[0])
    assert torch.equal(sample(ours_then_theirs, *conds, latent), reference)
    theirs_then_ours, _ = pack.block_caching.patching.apply_block_cache(theirs(tiny_model), all_compute)
    assert torch.equal(sample(theirs_then_ours, *conds, latent), reference)
    both, holder = pack.block_caching.patching.apply_block_cache(theirs(tiny_model), caching)
    out = sample(both, *conds, latent)
    assert torch.isfinite(out).all() and holder.last_run.computed.sum() > 0
