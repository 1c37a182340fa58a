"""Block Cache under dynamic VRAM's load sequence (ComfyUI 0.33: ModelPatcherDynamic, the default on CUDA).

ModelPatcherDynamic loads a model for every prompt by ``unpatch_model(unpatch_weights=False)``, then
``patch_model(load_weights=False)`` (object patches are applied there), then ``load``. On a CPU load
device it is the classic ModelPatcher, so these tests drive a ModelPatcher that loads exactly that
way; the last test checks that the host's ModelPatcherDynamic still does, where it has one.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import comfy.model_management
import comfy.model_patcher
import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.schedule import all_compute_schedule
from comfyui_block_cache.demo_models.builtin_models import build_unet_patcher
from comfyui_block_cache.runtime.run import LayerForward
from helpers import count_layer_computations, profile_schedules, sample


class DynamicLoadSequence(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher whose every load is ModelPatcherDynamic.partially_load's sequence."""

    loads: list[str] = []  # the steps of every load, in order (class-wide: clones are new instances)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            self.unpatch_model(self.offload_device, unpatch_weights=False)
            self.patch_model(load_weights=False)
            self.load(device_to)
        DynamicLoadSequence.loads.append("unpatch_model, patch_model, load")
        return None  # as ModelPatcherDynamic: no byte count


@pytest.fixture
def dynamic_model(pack):
    comfy.model_management.unload_all_models()
    DynamicLoadSequence.loads = []
    built = build_unet_patcher("tiny", seed=0)
    return DynamicLoadSequence(built.model, load_device=built.load_device, offload_device=built.offload_device)


def _layer_patches_on(pack, model) -> list[str]:
    patch_type = LayerForward
    return [name for name, module in model.model.named_modules()
            if isinstance(module.__dict__.get("forward"), patch_type)]


def test_all_compute_is_exact_prompt_after_prompt(pack, dynamic_model, conds, latent):
    all_compute, _ = profile_schedules(pack, dynamic_model, conds, latent)
    reference = sample(dynamic_model, *conds, latent)
    patched, holder = apply_block_cache(dynamic_model, all_compute)
    for prompt in range(3):
        loads = len(DynamicLoadSequence.loads)
        assert torch.equal(sample(patched, *conds, latent), reference), f"prompt {prompt}"
        assert len(DynamicLoadSequence.loads) > loads, "the prompt loaded through the dynamic sequence"
        assert holder.last_run.computed.sum() > 0 and holder.last_run.reused.sum() == 0
        # Another prompt with the unpatched model: the sequence takes every layer patch off.
        assert torch.equal(sample(dynamic_model, *conds, latent), reference)
        assert not _layer_patches_on(pack, dynamic_model)


def test_caching_schedule_counts_and_output_hold_over_reloads(pack, dynamic_model, conds, latent):
    _, caching = profile_schedules(pack, dynamic_model, conds, latent)
    other_schedule = all_compute_schedule(caching.block_map, caching.grid)
    patched, holder = apply_block_cache(dynamic_model, caching)
    other, _ = apply_block_cache(dynamic_model, other_schedule)
    names = [layer.name for layer in caching.layers]
    outputs = []
    for _ in range(2):
        with count_layer_computations(dynamic_model.model.diffusion_model, names) as counts:
            outputs.append(sample(patched, *conds, latent))
        counted = np.array([counts[name] for name in names])
        np.testing.assert_array_equal(counted, holder.last_run.computed)
        calls = (holder.last_run.computed + holder.last_run.reused) // caching.grid.steps
        np.testing.assert_array_equal(counted, caching.compute_mask().sum(axis=1) * calls)
        assert holder.last_run.reused.sum() > 0
        sample(other, *conds, latent)  # a clone with other object patches loads in between
    assert torch.equal(outputs[0], outputs[1])


def _calls_in_order(function: ast.FunctionDef) -> list[tuple[str, dict[str, object]]]:
    calls = []
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "self":
            keywords = {k.arg: ast.literal_eval(k.value) for k in node.keywords
                        if k.arg and isinstance(k.value, ast.Constant)}
            calls.append((node.func.attr, keywords, node.lineno))
    return [(name, keywords) for name, keywords, _ in sorted(calls, key=lambda call: call[2])]


def test_the_host_loads_dynamic_models_by_the_sequence_tested_here():
    dynamic = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if dynamic is None:
        pytest.skip("this ComfyUI has no ModelPatcherDynamic (dynamic VRAM came after 0.3.75)")
    function = ast.parse(textwrap.dedent(inspect.getsource(dynamic.partially_load))).body[0]
    calls = [(name, keywords) for name, keywords in _calls_in_order(function)
             if name in ("unpatch_model", "patch_model", "load")]
    assert calls == [("unpatch_model", {"unpatch_weights": False}), ("patch_model", {"load_weights": False}),
                     ("load", {})], calls
