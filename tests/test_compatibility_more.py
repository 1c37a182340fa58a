"""Block Cache beside ControlNet / T2I-Adapter, torch.compile, low-VRAM loading, models moved between
dtypes and devices, and the flow-shift nodes (ModelSamplingSD3 / ModelSamplingFlux), on real ComfyUI
code with tiny models.

As in test_compatibility.py: an all-compute schedule must give exactly the output of the same graph
without Block Cache; a caching schedule must cache and keep the other feature working.
"""

from __future__ import annotations

import logging
import shutil

import comfy.cldm.cldm
import comfy.controlnet
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import comfy.t2i_adapter.adapter
import numpy as np
import pytest
import torch
from comfy_bootstrap import load_pack
from dit_zoo import ZOO
from dit_zoo.base import host_version
from helpers import (
    computations_on,
    density_retimed,
    live_tensor_bytes,
    record_evaluation_sigmas,
    run_of,
    runs_holding_tensors,
    sample,
)
from test_compatibility import profile_schedules, with_lora

WrappersMP = comfy.patcher_extension.WrappersMP


@pytest.fixture
def schedules(pack, tiny_model, conds, latent):
    return profile_schedules(pack, tiny_model, conds, latent)


def _patched_layers(module: torch.nn.Module) -> list[str]:
    """Submodules whose ``forward`` is one of our layer patches. (ComfyUI's unpatch_model restores an
    object patch by setting the backed-up bound method back, so an instance ``forward`` alone means
    nothing.)"""
    patch_type = load_pack().runtime.run.LayerForward
    return [name for name, m in module.named_modules() if isinstance(m.__dict__.get("forward"), patch_type)]


# -- ControlNet / T2I-Adapter ------------------------------------------------------------------------

def _tiny_controlnet(pack, model):
    """A ControlNet (comfy.cldm) with the tiny UNet's own config, seeded, as load_controlnet wraps it."""
    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels")
    control_model = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, operations=comfy.ops.disable_weight_init)
    pack.demo_models.builtin_models.seeded_init_(control_model, 5)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device())


def _tiny_t2i_adapter(pack, model):
    """An SDXL-layout T2I-Adapter (cin 768: 3 channels x 16x16 pixel unshuffle), two 64-channel levels:
    its features land on the tiny UNet's input block 3 and its middle block, both 64 x 8 x 8."""
    adapter = comfy.t2i_adapter.adapter.Adapter(channels=[64, 64], nums_rb=1, cin=768, ksize=1, sk=True,
                                                use_conv=False, xl=True)
    pack.demo_models.builtin_models.seeded_init_(adapter, 6)
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
    patched, holder = pack.block_caching.patching.apply_block_cache(tiny_model, all_compute)
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
    plain, plain_holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    without_control = sample(plain, *conds, latent)
    patched, holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
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
    assert not _patched_layers(tiny_model.model)
    assert not _patched_layers(getattr(control, "control_model", None) or control.t2i_model)


# -- torch.compile (core TorchCompileModel node) -----------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per code object process-wide: start and leave each compile test clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model, backend):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    (out,) = TorchCompileModel.execute(model, backend).result
    return out


def _check_compile(pack, tiny_model, conds, latent, schedules, backend, tolerance):
    """Both orders: the compiled graph equals the uncompiled one (within ``tolerance``), counts included."""
    all_compute, caching = schedules
    steps = 4
    reference = sample(tiny_model, *conds, latent, steps=steps)
    uncompiled_cached, uncompiled_holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    cached_reference = sample(uncompiled_cached, *conds, latent, steps=steps)
    cache_effect = float((cached_reference - reference).abs().max())
    assert cache_effect > 100 * max(tolerance, 1e-6), "caching must change the output far beyond the tolerance"
    differences = {}
    for order in ("compile, then Apply", "Apply, then compile"):
        for schedule, expected in ((all_compute, reference), (caching, cached_reference)):
            if order == "compile, then Apply":
                model, holder = pack.block_caching.patching.apply_block_cache(_compiled(tiny_model, backend), schedule)
            else:
                model, holder = pack.block_caching.patching.apply_block_cache(tiny_model, schedule)
                model = _compiled(model, backend)
            out = sample(model, *conds, latent, steps=steps)
            difference = float((out - expected).abs().max())
            differences[(order, schedule is caching)] = difference
            assert difference <= tolerance, f"{order}: {difference} from the uncompiled output"
            if schedule is caching:
                # Caching still happens, and exactly as scheduled: same real computations and reuses.
                np.testing.assert_array_equal(holder.last_run.computed, uncompiled_holder.last_run.computed)
                np.testing.assert_array_equal(holder.last_run.reused, uncompiled_holder.last_run.reused)
            else:
                assert holder.last_run.reused.sum() == 0
    # The loader's model compiled alone afterwards samples as before, with none of our layer patches on it.
    # Compiled code starts afresh: on ComfyUI 0.33 with torch 2.9, guards left by runs with a keyed wrapper
    # raise KeyError on a run without it, whichever pack's wrapper it was (the test below, with core EasyCache).
    torch._dynamo.reset()
    plain = sample(_compiled(tiny_model, backend), *conds, latent, steps=steps)
    assert float((plain - reference).abs().max()) <= tolerance and not _patched_layers(tiny_model.model)
    return differences


def test_torch_compile_eager_backend_before_and_after_apply(pack, tiny_model, conds, latent, schedules, fresh_dynamo):
    """TorchCompileModel's own code path (set_torch_compile_wrapper, TorchDynamo tracing the whole UNet
    with our layer patches inside it) with the "eager" backend: dynamo's graph capture, guards and
    graph breaks are all real, only the code generation is skipped, so the output is bit-identical."""
    _check_compile(pack, tiny_model, conds, latent, schedules, "eager", tolerance=0.0)


@pytest.mark.xfail(host_version() >= (0, 33, 0), raises=KeyError, strict=True,
                   reason="ComfyUI 0.33 + torch 2.9: a compiled model's guards on transformer_options['wrappers'] "
                          "raise KeyError once a wrapper key (here core EasyCache's) is gone; not Block Cache's")
def test_host_compile_guards_survive_a_wrapper_key_going_away(tiny_model, conds, latent, fresh_dynamo):
    """The host's own behaviour, without Block Cache: core EasyCache on a compiled model, then the
    compiled model alone. Where this fails, any keyed wrapper (ours too) leaves such guards behind."""
    import comfy_extras.nodes_easycache as easycache

    cached = easycache.EasyCacheNode.execute(_compiled(tiny_model, "eager"), 0.2, 0.15, 0.95, False).result[0]
    assert torch.isfinite(sample(cached, *conds, latent, steps=4)).all()
    assert torch.isfinite(sample(_compiled(tiny_model, "eager"), *conds, latent, steps=4)).all()


@pytest.mark.slow  # inductor compiles C++ for ~90 s on a 2-core CPU
@pytest.mark.skipif(not shutil.which("cc"), reason="inductor needs a C compiler")
def test_torch_compile_inductor_before_and_after_apply(pack, tiny_model, conds, latent, schedules, fresh_dynamo):
    """The node's default backend. Inductor fuses and reorders float ops, so outputs differ from eager
    by rounding (at most 1.0e-3 on outputs of magnitude ~400 here); counts must still match exactly."""
    _check_compile(pack, tiny_model, conds, latent, schedules, "inductor", tolerance=1e-2)


# -- low VRAM: partial loading, lowvram weight patches ------------------------------------------------

def _partially_loaded(model, record):
    """A clone whose weights are loaded partially for sampling, as under --lowvram: after ComfyUI's
    own load, everything is unloaded (ModelPatcher.partially_unload) and a third of the weights is
    loaded back (ModelPatcher.partially_load); the rest run through comfy.ops' cast-weights path, with
    weight patches (LoRA) applied per call by LowVramPatch. On a CPU the devices are the same, but
    every code path of the partial load runs."""
    partial = model.clone()

    def wrapper(executor, model_patcher, *args, **kwargs):
        out = executor(model_patcher, *args, **kwargs)
        size = model_patcher.model_size()
        model_patcher.partially_unload(model_patcher.offload_device, size)
        model_patcher.partially_load(model_patcher.load_device, size // 3)
        inner = model_patcher.model
        record.update(lowvram=inner.model_lowvram, lowvram_patches=inner.lowvram_patch_counter,
                      loaded=inner.model_loaded_weight_memory, size=size,
                      object_patched=bool(_patched_layers(inner)))
        return out

    partial.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, "test_partial_load", wrapper)
    return partial


def test_partial_loading_with_lowvram_patches(pack, tiny_model, conds, latent, schedules):
    all_compute, caching = schedules
    record = {}
    full_reference = sample(with_lora(tiny_model), *conds, latent)
    reference = sample(_partially_loaded(with_lora(tiny_model), record), *conds, latent)
    assert record["lowvram"] and record["lowvram_patches"] > 0 and 0 < record["loaded"] < record["size"]
    assert not record["object_patched"]
    # ComfyUI's lowvram path computes the same LoRA weights per call: bit-identical here.
    assert torch.equal(reference, full_reference)

    record.clear()
    exact, _ = pack.block_caching.patching.apply_block_cache(_partially_loaded(with_lora(tiny_model), record), all_compute)
    assert torch.equal(sample(exact, *conds, latent), reference)
    assert record["lowvram"] and record["object_patched"], "our layer patches survive partially_load"

    full_cached, full_holder = pack.block_caching.patching.apply_block_cache(with_lora(tiny_model), caching)
    expected = sample(full_cached, *conds, latent)
    assert full_holder.last_run.reused.sum() > 0
    # Caching, with Apply before the partial-load clone and after it: the fully loaded result, the same counts.
    applied, applied_holder = pack.block_caching.patching.apply_block_cache(with_lora(tiny_model), caching)
    for model, holder in ((_partially_loaded(applied, record), applied_holder),
                          pack.block_caching.patching.apply_block_cache(_partially_loaded(with_lora(tiny_model), record),
                                                               caching)):
        record.clear()
        assert torch.equal(sample(model, *conds, latent), expected)
        assert record["lowvram"] and record["lowvram_patches"] > 0 and record["object_patched"]
        np.testing.assert_array_equal(holder.last_run.computed, full_holder.last_run.computed)
        np.testing.assert_array_equal(holder.last_run.reused, full_holder.last_run.reused)
    # Afterwards the loader's model loads fully again, without lowvram casts or our patches.
    assert torch.equal(sample(tiny_model, *conds, latent), sample(tiny_model.clone(), *conds, latent))
    assert not tiny_model.model.model_lowvram and not _patched_layers(tiny_model.model)
    assert not any(hasattr(m, "prev_comfy_cast_weights") for m in tiny_model.model.modules())


# -- a model moved between dtypes / devices between runs ---------------------------------------------

def _move(model_patcher, dtype):
    """Moves the model's weights to ``dtype`` the way its dtype is read back (BaseModel.get_dtype)."""
    diffusion_model = model_patcher.model.diffusion_model
    diffusion_model.to(dtype)
    diffusion_model.dtype = dtype


def _on_a_copy_of_the_model(patcher):
    """A clone on another copy of the model, as deepclone_multigpu makes one (a fresh model from the
    loader), with its weights changed slightly so that the copy's layers and the original's give
    different pictures."""
    comfy.model_management.unload_all_models()  # the model's modules without any patch applied
    moved = patcher.clone()
    moved.model = load_pack().demo_models.builtin_models.build_unet_patcher("tiny", seed=0).model
    with torch.no_grad():
        for parameter in moved.model.diffusion_model.parameters():
            parameter.mul_(1.01)
    return moved


def test_clone_on_another_copy_of_the_model_runs_its_own_layers(pack, tiny_model, conds, latent, schedules, caplog):
    """The object patches travel with such a clone; each must run the layer of the model it is called on."""
    _, caching = schedules
    all_compute = pack.block_caching.schedule.all_compute_schedule(caching.block_map, caching.grid)
    exact, _ = pack.block_caching.patching.apply_block_cache(tiny_model, all_compute)
    with caplog.at_level(logging.INFO):
        out = sample(_on_a_copy_of_the_model(exact), *conds, latent)
    assert "runs on another copy of the model" in caplog.text
    assert torch.equal(out, sample(_on_a_copy_of_the_model(tiny_model), *conds, latent))
    patched, holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    expected = sample(patched, *conds, latent)
    reused = holder.last_run.reused.sum()
    assert reused > 0
    moved = sample(_on_a_copy_of_the_model(patched), *conds, latent)
    assert holder.last_run.reused.sum() == reused, "the copy caches by the same schedule"
    assert not torch.equal(moved, expected), "the copy's own layers computed, not the original's"
    assert torch.equal(sample(patched, *conds, latent), expected), "the original is untouched"


def test_model_moved_between_dtypes_and_devices_between_runs(pack, tiny_model, conds, latent, schedules):
    _, caching = schedules
    patched, holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    first = sample(patched, *conds, latent)
    first_stats = holder.last_run
    # Offloaded between runs (the loader detaches it to the offload device, as when another model loads).
    patched.detach()
    assert torch.equal(sample(patched, *conds, latent), first)
    # The weights moved to float64 between runs: the run caches float64 tensors from scratch and
    # gives exactly what the same schedule gives on a model made in float64.
    _move(tiny_model, torch.float64)
    try:
        out64 = sample(patched, *conds, latent)
        assert holder.last_run.peak_cache_bytes == 2 * first_stats.peak_cache_bytes, "float64 cache, fresh"
    finally:
        _move(tiny_model, torch.float32)
    np.testing.assert_array_equal(holder.last_run.computed, first_stats.computed)
    model64 = pack.demo_models.builtin_models.build_unet_patcher("tiny", seed=0, dtype=torch.float64)
    patched64, _ = pack.block_caching.patching.apply_block_cache(model64, caching)
    assert torch.equal(out64, sample(patched64, *conds, latent))
    # Back in float32: the first run's result again; no state carried over, nothing left alive.
    before = live_tensor_bytes()
    assert torch.equal(sample(patched, *conds, latent), first)
    assert not runs_holding_tensors(holder) and holder.last_run.cache_resets == 0
    assert live_tensor_bytes() - before <= 0


def test_latent_dtype_change_inside_a_run_resets_the_cache(pack, tiny_model, conds, latent, schedules):
    """A PREDICT_NOISE wrapper outside ours hands the model a float64 latent from the 4th evaluation
    on: the latent signature changes once, the cache is dropped and every layer computes there."""
    _, caching = schedules
    seen = []

    def to_float64_later(executor, x, *args, **kwargs):
        seen.append(x.dtype)
        if len(seen) >= 4:
            return executor(x.to(torch.float64), *args, **kwargs).to(x.dtype)
        return executor(x, *args, **kwargs)

    outer = tiny_model.clone()
    outer.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "test_float64", to_float64_later)
    patched, holder = pack.block_caching.patching.apply_block_cache(outer, caching)
    computed_per_evaluation = []

    def record(executor, *args, **kwargs):
        stats = run_of(args, kwargs).stats
        before = stats.computed.copy()
        out = executor(*args, **kwargs)
        computed_per_evaluation.append(stats.computed - before)
        return out

    patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "test_record", record)
    out = sample(patched, *conds, latent)
    stats = holder.last_run
    assert torch.isfinite(out).all() and stats.cache_resets == 1 and stats.reused.sum() > 0
    layers = len(caching.layers)
    assert (computed_per_evaluation[3] == 1).all() and computed_per_evaluation[3].sum() == layers
    plain, plain_holder = pack.block_caching.patching.apply_block_cache(tiny_model, caching)
    sample(plain, *conds, latent)
    assert stats.computed.sum() > plain_holder.last_run.computed.sum(), "the reset recomputed cached layers"


# -- ModelSamplingSD3 / ModelSamplingFlux on tiny flow models -----------------------------------------

def _sd3_shift(model, shift):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    return ModelSamplingSD3().patch(model, shift)[0]


def _flux_shift(model, size):
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    return ModelSamplingFlux().patch(model, 1.15, 0.5, size, size)[0]


# (zoo entry, node, the node's setting that reproduces the model's own sampling, another setting)
FLOW_NODES = {
    "ModelSamplingSD3": ("sd3", _sd3_shift, 3.0, 6.0),
    "ModelSamplingFlux": ("flux-dev", _flux_shift, 1024, 256),
}


def _expected_computes_by_sigma(schedule, eval_sigmas, run_sigmas):
    """Independent of the pack's time code: for flow models normalized time is sigma (sigma_max 1 at
    any shift), so the schedule's mask moves onto the run's steps by sigma (the re-timing rule), and a
    layer computes when the run's mask computes it in a step passed since the previous evaluation."""
    run_sigmas = [float(s) for s in run_sigmas]
    mask = density_retimed(schedule.compute_mask(), list(schedule.grid.sigmas), run_sigmas)
    return computations_on(mask, run_sigmas[:-1], eval_sigmas)


@pytest.mark.parametrize("node", FLOW_NODES)
def test_flow_shift_nodes_before_and_after_apply(pack, node):
    entry_id, patch, same, other = FLOW_NODES[node]
    entry = next(e for e in ZOO if e.id == entry_id)
    model, conds, latent = entry.build(seed=0), entry.conds(), entry.latent()
    steps, cfg = 6, entry.cfg
    # Profiled on the unpatched model, as a schedule saved earlier would be.
    all_compute, caching = profile_schedules(pack, model, conds, latent, steps=steps, cfg=cfg)
    assert np.allclose(caching.grid.taus, caching.grid.sigmas[:-1], atol=1e-6), "flow time is sigma"
    for setting in (same, other):
        reference = sample(patch(model, setting), *conds, latent, steps=steps, cfg=cfg)
        before, _ = pack.block_caching.patching.apply_block_cache(patch(model, setting), all_compute)
        assert torch.equal(sample(before, *conds, latent, steps=steps, cfg=cfg), reference)
        after = patch(pack.block_caching.patching.apply_block_cache(model, all_compute)[0], setting)
        assert torch.equal(sample(after, *conds, latent, steps=steps, cfg=cfg), reference)

    # The node at the model's own shift: the schedule fits as it is and gives the unpatched result.
    unpatched, _ = pack.block_caching.patching.apply_block_cache(model, caching)
    expected = sample(unpatched, *conds, latent, steps=steps, cfg=cfg)
    applied, after_holder = pack.block_caching.patching.apply_block_cache(model, caching)
    for same_model, holder in (pack.block_caching.patching.apply_block_cache(patch(model, same), caching),
                               (patch(applied, same), after_holder)):
        assert torch.equal(sample(same_model, *conds, latent, steps=steps, cfg=cfg), expected)
        assert not holder.last_run.retimed and holder.last_run.reused.sum() > 0

    # Another shift moves every step's sigma: the schedule is re-timed by noise level, before and after.
    outputs = []
    for shifted_model, holder in (pack.block_caching.patching.apply_block_cache(patch(model, other), caching),
                                  (patch(applied, other), after_holder)):
        eval_sigmas = record_evaluation_sigmas(shifted_model)
        outputs.append(sample(shifted_model, *conds, latent, steps=steps, cfg=cfg))
        stats = holder.last_run
        assert stats.retimed and stats.reused.sum() > 0 and torch.isfinite(outputs[-1]).all()
        np.testing.assert_array_equal(stats.computed, _expected_computes_by_sigma(caching, eval_sigmas,
                                                                                holder.last_sample_sigmas))
    assert torch.equal(outputs[0], outputs[1])
