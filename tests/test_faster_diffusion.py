"""Faster Diffusion: encoder propagation schedules and prior noise injection, on real ComfyUI models."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.schedule import all_compute_schedule
from comfyui_block_cache.block_maps.block_map import ReuseMode
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from comfyui_block_cache.faster_diffusion import schedule as fd
from comfyui_block_cache.faster_diffusion.noise_injection import NoiseInjection
from comfyui_block_cache.nodes.nodes_faster_diffusion import FasterDiffusionSchedule
from comfyui_block_cache.runtime.time_grid import StepGrid, normalized_times
from comfyui_block_cache.schedule_files import schema
from dit_zoo import ZOO
from helpers import count_layer_computations, record_evaluation_sigmas, sample

FLUX = next(e for e in ZOO if e.id == "flux-dev")



def _schedule(pack, model, steps=8, sampler="euler", **options):
    grid = fd.grid_for_model(model, steps, sampler, "normal")
    block_map = block_map_for_patcher(model)
    return fd.build_faster_diffusion_schedule(block_map, grid, fd.FasterDiffusionOptions(**options))


def _grid(pack, taus):
    return StepGrid(sigmas=(0.0,) * (len(taus) + 1), taus=tuple(taus))


def _uniform_grid(pack, steps):
    return _grid(pack, [1.0 - i / steps for i in range(steps)])


# -- key steps -------------------------------------------------------------------------------------

def test_paper_presets_on_their_own_grids(pack):
    assert fd.PAPER_DPM_SOLVER_20.indices == (0, 1, 2, 3, 5, 10, 15)  # counts {20,...,5} -> 20 - count
    for preset, expected in ((fd.PAPER_DDIM_50, (0, 1, 2, 3, 5, 10, 15, 25, 35)),
                             (fd.PAPER_DPM_SOLVER_20, (0, 1, 2, 3, 5, 10, 15))):
        grid = _uniform_grid(pack, preset.reference_steps)
        assert fd.resolve_key_steps(grid, fd.FasterDiffusionOptions(key_steps=preset.name)) == expected
        assert fd.resolve_key_steps(grid, fd.FasterDiffusionOptions()) == expected  # 'paper (auto)'


def test_presets_map_to_other_step_counts_by_normalized_time(pack):
    options = fd.FasterDiffusionOptions(key_steps=fd.PAPER_DDIM_50.name)
    # 100 uniform steps: the same times, so every index doubles
    assert fd.resolve_key_steps(_uniform_grid(pack, 100), options) == (0, 2, 4, 6, 10, 20, 30, 50, 70)
    # 20 steps: times 1 - k/50 land on the nearest step (step j starts at 1 - j/20); 2 and 3 merge
    assert fd.resolve_key_steps(_uniform_grid(pack, 20), options) == (0, 1, 2, 4, 6, 10, 14)
    # a grid that spends its first steps at high noise (a shifted flow schedule) gets more keys early
    shifted = [3 * s / (1 + 2 * s) for s in np.linspace(1, 0.05, 20)]
    keys = fd.resolve_key_steps(_grid(pack, shifted), options)
    assert keys[0] == 0 and all(b > a for a, b in zip(keys, keys[1:], strict=False))
    assert shifted[keys[-1]] == pytest.approx(0.3, abs=0.05)


def test_uniform_and_custom_key_steps(pack):
    grid = _uniform_grid(pack, 10)
    assert fd.resolve_key_steps(grid, fd.FasterDiffusionOptions(key_steps=fd.KEY_STEPS_UNIFORM, stride=4)) == (0, 4, 8)
    custom = fd.FasterDiffusionOptions(key_steps=fd.KEY_STEPS_CUSTOM, custom_key_steps=fd.parse_key_steps("7, 3 5"))
    assert fd.resolve_key_steps(grid, custom) == (0, 3, 5, 7)  # step 0 is always a key step
    with pytest.raises(ValueError, match="outside this 10-step grid"):
        fd.resolve_key_steps(grid, fd.FasterDiffusionOptions(key_steps=fd.KEY_STEPS_CUSTOM, custom_key_steps=(12,)))
    with pytest.raises(ValueError, match="whole step numbers"):
        fd.parse_key_steps("0, two")
    with pytest.raises(ValueError, match="encoder_ratio"):
        fd.FasterDiffusionOptions(encoder_ratio=1.0).validate()


# -- encoder propagation on the tiny UNet ------------------------------------------------------------

def test_unet_split_and_schema_round_trip(pack, tiny_model):
    schedule = _schedule(pack, tiny_model, key_steps="custom", custom_key_steps=(0, 3, 6))
    stages = {spec.name: spec.stage for spec in schedule.block_map.layers}
    mask = schedule.compute_mask()
    for layer, row in zip(schedule.layers, mask, strict=True):
        assert layer.reuse is ReuseMode.OUTPUT
        expected = [s in (0, 3, 6) for s in range(8)] if stages[layer.name] != "output" else [True] * 8
        assert row.tolist() == expected, layer.name
    assert schedule.builder["method"] == "faster_diffusion" and schedule.builder["key_steps"] == [0, 3, 6]
    loaded = schema.schedule_from_json(schema.schedule_to_json(schedule))
    np.testing.assert_array_equal(loaded.compute_mask(), mask)
    assert [layer.reuse for layer in loaded.layers] == [layer.reuse for layer in schedule.layers]
    assert loaded.builder == schedule.builder and loaded.grid == schedule.grid


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_real_computations_follow_key_steps(pack, tiny_model, conds, latent, sampler):
    keys = (0, 2, 5)
    schedule = _schedule(pack, tiny_model, sampler=sampler, key_steps="custom", custom_key_steps=keys)
    patched, holder = apply_block_cache(tiny_model, schedule)
    names = [layer.name for layer in schedule.layers]
    with count_layer_computations(tiny_model.model.diffusion_model, names) as counts:
        out = sample(patched, *conds, latent, sampler=sampler)
    stages = {spec.name: spec.stage for spec in schedule.block_map.layers}
    for name in names:
        assert counts[name] == (8 if stages[name] == "output" else len(keys)), name
    np.testing.assert_array_equal([counts[n] for n in names], holder.last_run.computed)
    reference = sample(tiny_model, *conds, latent, sampler=sampler)
    assert torch.isfinite(out).all()
    relative = float((out - reference).norm() / reference.norm())
    assert 0.0 < relative < 0.5, relative


def test_every_step_a_key_step_is_bit_identical(pack, tiny_model, conds, latent):
    schedule = _schedule(pack, tiny_model, key_steps="uniform stride", stride=1)
    assert schedule.compute_mask().all()
    patched, holder = apply_block_cache(tiny_model, schedule)
    assert torch.equal(sample(patched, *conds, latent), sample(tiny_model, *conds, latent))
    assert holder.last_run.reused.sum() == 0


def test_retimed_to_another_step_count(pack, tiny_model, conds, latent):
    """Made for 8 steps, run at 12: the encoder computes at the run steps the re-timing rule gives (the key
    steps' density of computations moved onto the run's steps), the decoder at every step."""
    from helpers import expected_run_mask

    schedule = _schedule(pack, tiny_model, steps=8, key_steps="custom", custom_key_steps=(0, 2, 5))
    patched, holder = apply_block_cache(tiny_model, schedule)
    eval_sigmas = record_evaluation_sigmas(patched)
    names = [layer.name for layer in schedule.layers]
    with count_layer_computations(tiny_model.model.diffusion_model, names) as counts:
        out = sample(patched, *conds, latent, steps=12)
    assert holder.last_run.figures["cache"].retimed and len(eval_sigmas) == 12
    run_mask = expected_run_mask(schedule, tiny_model, holder.last_sample_sigmas)
    stages = {spec.name: spec.stage for spec in schedule.block_map.layers}
    encoder_computes = {int(row.sum()) for row, name in zip(run_mask, names, strict=True) if stages[name] != "output"}
    assert len(encoder_computes) == 1
    expected = encoder_computes.pop()
    for name in names:
        assert counts[name] == (12 if stages[name] == "output" else expected), name
    # 3 key steps of 8 keep their share of 12 steps: 3 x 12 / 8 = 4.5, rounded along the way.
    assert expected in (4, 5) and torch.isfinite(out).all()


def test_dit_encoder_ratio(pack):
    model = FLUX.build(seed=0)
    block_map = block_map_for_patcher(model)
    ratio = 0.5
    schedule = _schedule(pack, model, steps=4, key_steps="custom", custom_key_steps=(0, 2), encoder_ratio=ratio)
    encoder = round(ratio * len(block_map.layers))
    assert 0 < encoder < len(block_map.layers) and schedule.builder["encoder_layers"] == encoder
    patched, holder = apply_block_cache(model, schedule)
    names = [layer.name for layer in schedule.layers]
    with count_layer_computations(model.model.diffusion_model, names) as counts:
        out = sample(patched, *FLUX.conds(), FLUX.latent(), steps=4, cfg=1.0)
    assert [counts[n] for n in names] == [2] * encoder + [4] * (len(names) - encoder)
    assert torch.isfinite(out).all() and holder.last_run.reused.sum() == 2 * encoder


def test_node_builds_a_schedule(pack, tiny_model):
    node = FasterDiffusionSchedule
    schedule, picture, text = node.execute(tiny_model, 20, "dpmpp_2m", "karras", "paper (auto)", 5, "", 0.64).result
    assert schedule.builder["key_steps"] == [0, 1, 2, 3, 5, 10, 15]
    assert schedule.grid.steps == 20 and picture.ndim == 4 and '"faster_diffusion"' in text


# -- prior noise injection -----------------------------------------------------------------------------

def _record_x(model) -> list[torch.Tensor]:
    import comfy.patcher_extension

    seen: list[torch.Tensor] = []

    def wrapper(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen.append(args[0].clone())  # after the pack's wrappers: what the model was fed
        return out

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "test_x", wrapper)
    return seen


def test_noise_injection_off_is_bit_identical(pack, tiny_model, conds, latent):
    schedule = _schedule(pack, tiny_model, key_steps="uniform stride", stride=3)
    plain, _ = apply_block_cache(tiny_model, schedule)
    off_injection = NoiseInjection(0.0)
    off, holder = apply_block_cache(tiny_model, schedule, options=[off_injection])
    assert torch.equal(sample(off, *conds, latent), sample(plain, *conds, latent))
    assert "noise injection" not in holder.last_run.figures


def test_noise_injection_that_injects_at_no_step_says_so(pack, tiny_model, conds, latent, caplog):
    schedule = all_compute_schedule(block_map_for_patcher(tiny_model), fd.grid_for_model(tiny_model, 8, "euler",
                                                                                         "normal"))
    never, holder = apply_block_cache(tiny_model, schedule, options=[NoiseInjection(alpha=0.05, tau_cutoff=0.0)])
    with caplog.at_level(logging.WARNING):
        assert torch.equal(sample(never, *conds, latent), sample(tiny_model, *conds, latent))
    assert holder.last_run.figures["noise injection"] == []
    assert "injected at no step" in caplog.text


def test_noise_injection_changes_only_late_steps(pack, tiny_model, conds, latent):
    schedule = all_compute_schedule(block_map_for_patcher(tiny_model),
                                                  fd.grid_for_model(tiny_model, 8, "euler", "normal"))
    runs = {}
    for alpha in (0.0, 0.05):
        injection = NoiseInjection(alpha=alpha, tau_cutoff=0.5)
        patched, holder = apply_block_cache(tiny_model, schedule, options=[injection])
        xs = _record_x(patched)
        sigmas = record_evaluation_sigmas(patched)
        runs[alpha] = (sample(patched, *conds, latent), xs, sigmas, holder.last_run)
    base_out, base_xs, sigmas, _ = runs[0.0]
    out, xs, _, stats = runs[0.05]
    taus = normalized_times(tiny_model.get_model_object("model_sampling"), torch.tensor(sigmas))
    late = [i for i, tau in enumerate(taus) if tau < 0.5]
    assert stats.figures["noise injection"] == late and 0 < len(late) < len(taus)
    for i in range(len(taus)):
        assert torch.equal(xs[i], base_xs[i]) == (i < late[0]), i
    # the first injected evaluation sees exactly the paper's z_t + alpha z_T, written in x's scale
    model_sampling = tiny_model.get_model_object("model_sampling")
    sigma = torch.tensor([sigmas[late[0]]])
    z_T = model_sampling.calculate_input(torch.tensor([sigmas[0]]), base_xs[0])
    expected = base_xs[late[0]] + 0.05 * z_T / model_sampling.calculate_input(sigma, torch.ones_like(z_T))
    torch.testing.assert_close(xs[late[0]], expected)
    assert not torch.equal(out, base_out) and torch.isfinite(out).all()
