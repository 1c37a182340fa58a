"""Block Cache and torch.compile (core TorchCompileModel), before and after Apply.

Where it is defined, an all-compute schedule must give exactly the output of the same graph without
Block Cache; a caching schedule must cache and keep the other feature working. The ``schedules``
fixture (conftest.py) is (all-compute, caching) from a real profile of the tiny UNet.
"""

from __future__ import annotations

import shutil

import comfy.patcher_extension
import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.patching import apply_block_cache
from dit_zoo.base import host_version
from helpers import (
    patched_layers,
    sample,
)

WrappersMP = comfy.patcher_extension.WrappersMP


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
    uncompiled_cached, uncompiled_holder = apply_block_cache(tiny_model, caching)
    cached_reference = sample(uncompiled_cached, *conds, latent, steps=steps)
    cache_effect = float((cached_reference - reference).abs().max())
    assert cache_effect > 100 * max(tolerance, 1e-6), "caching must change the output far beyond the tolerance"
    differences = {}
    for order in ("compile, then Apply", "Apply, then compile"):
        for schedule, expected in ((all_compute, reference), (caching, cached_reference)):
            if order == "compile, then Apply":
                model, holder = apply_block_cache(_compiled(tiny_model, backend), schedule)
            else:
                model, holder = apply_block_cache(tiny_model, schedule)
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
    assert float((plain - reference).abs().max()) <= tolerance and not patched_layers(tiny_model.model)
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
