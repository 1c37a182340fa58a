"""Block Cache beside the model-sampling nodes (ModelSamplingDiscrete and co., FreeU) and the
flow-shift nodes (ModelSamplingSD3 / ModelSamplingFlux) on tiny flow models.

Where it is defined, an all-compute schedule must give exactly the output of the same graph without
Block Cache; a caching schedule must cache and keep the other feature working. The ``schedules``
fixture (conftest.py) is (all-compute, caching) from a real profile of the tiny UNet.
"""

from __future__ import annotations

import comfy.patcher_extension
import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.patching import apply_block_cache
from dit_zoo import ZOO
from helpers import (
    computations_on,
    density_retimed,
    profile_schedules,
    record_evaluation_sigmas,
    sample,
)

WrappersMP = comfy.patcher_extension.WrappersMP


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
    before, _ = apply_block_cache(patched_other, all_compute)
    assert torch.equal(sample(before, *conds, latent), reference)
    after = other(apply_block_cache(tiny_model, all_compute)[0])
    assert torch.equal(sample(after, *conds, latent), reference)
    cached, holder = apply_block_cache(patched_other, caching)
    assert torch.isfinite(sample(cached, *conds, latent)).all() and holder.last_run.reused.sum() > 0
    assert not holder.last_run.figures["cache"].retimed, "the schedule's grid must match the patched model's own sigmas"

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
        before, _ = apply_block_cache(patch(model, setting), all_compute)
        assert torch.equal(sample(before, *conds, latent, steps=steps, cfg=cfg), reference)
        after = patch(apply_block_cache(model, all_compute)[0], setting)
        assert torch.equal(sample(after, *conds, latent, steps=steps, cfg=cfg), reference)

    # The node at the model's own shift: the schedule fits as it is and gives the unpatched result.
    unpatched, _ = apply_block_cache(model, caching)
    expected = sample(unpatched, *conds, latent, steps=steps, cfg=cfg)
    applied, after_holder = apply_block_cache(model, caching)
    for same_model, holder in (apply_block_cache(patch(model, same), caching),
                               (patch(applied, same), after_holder)):
        assert torch.equal(sample(same_model, *conds, latent, steps=steps, cfg=cfg), expected)
        assert not holder.last_run.figures["cache"].retimed and holder.last_run.reused.sum() > 0

    # Another shift moves every step's sigma: the schedule is re-timed by noise level, before and after.
    outputs = []
    for shifted_model, holder in (apply_block_cache(patch(model, other), caching),
                                  (patch(applied, other), after_holder)):
        eval_sigmas = record_evaluation_sigmas(shifted_model)
        outputs.append(sample(shifted_model, *conds, latent, steps=steps, cfg=cfg))
        stats = holder.last_run
        assert stats.figures["cache"].retimed and stats.reused.sum() > 0 and torch.isfinite(outputs[-1]).all()
        np.testing.assert_array_equal(stats.computed, _expected_computes_by_sigma(caching, eval_sigmas,
                                                                                holder.last_sample_sigmas))
    assert torch.equal(outputs[0], outputs[1])
