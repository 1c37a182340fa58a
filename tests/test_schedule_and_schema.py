"""Schedule builder (Eq. 7), time grid, JSON schema, files and the block maps of full-size UNets."""

from __future__ import annotations

import json
import math

import pytest
import torch
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.profile import BlockProfile, merge_profiles
from comfyui_block_cache.block_caching.schedule import BuildOptions, build_schedule
from comfyui_block_cache.block_maps import block_map as bm
from comfyui_block_cache.block_maps.mapping import build_block_map
from comfyui_block_cache.demo_models.builtin_models import build_full_unet
from comfyui_block_cache.errors import (
    ScheduleFileError,
    ScheduleFormatError,
    ScheduleMismatchError,
    UnsupportedModelError,
)
from comfyui_block_cache.runtime.time_grid import StepGrid
from comfyui_block_cache.schedule_files.schema import (
    profile_from_dict,
    profile_to_dict,
    schedule_from_dict,
    schedule_from_json,
    schedule_to_json,
)
from comfyui_block_cache.schedule_files.storage import list_schedules, load_schedule, save_schedule


def make_profile(pack, change_rows, kinds=None):
    kinds = kinds or [bm.LayerKind.ATTENTION] * len(change_rows)
    specs = tuple(bm.LayerSpec(f"input_blocks.{i + 1}.1", kind, "input", bm.ResidualForm.IDENTITY)
                  for i, kind in enumerate(kinds))
    steps = len(change_rows[0])
    grid = StepGrid(sigmas=tuple(float(steps - i) for i in range(steps)) + (0.0,),
                                   taus=tuple(1.0 - i / steps for i in range(steps)), sampler="euler",
                                   scheduler="normal")
    block_map = bm.BlockMap("unet", "SD15", "UNetModel", specs, "0123456789abcdef")
    return BlockProfile(block_map, grid, tuple(tuple(r) for r in change_rows),
                                     tuple([10.0] * len(specs)), 10.0 * len(specs) + 5.0, 1)


def test_eq7_accumulate_and_threshold(pack):
    nan = float("nan")
    profile = make_profile(pack, [[nan, 0.2, 0.2, 0.2, 0.6, 0.1, 0.1, 0.1]])
    schedule = build_schedule(profile, BuildOptions(threshold=0.5))
    # sums: 0.2, 0.4, 0.6 > 0.5 -> compute at 3; 0.6 > 0.5 -> compute at 4; 0.1, 0.2, 0.3 -> reuse
    assert schedule.layers[0].compute == (True, False, False, True, True, False, False, False)


def test_builder_options(pack):
    nan = float("nan")
    small = [nan] + [0.01] * 9
    profile = make_profile(pack, [small, small], kinds=[bm.LayerKind.ATTENTION, bm.LayerKind.RESBLOCK])
    build = build_schedule
    opts = BuildOptions
    attention_only = build(profile, opts(threshold=0.5))
    assert attention_only.layers[0].compute == (True,) + (False,) * 9
    assert all(attention_only.layers[1].compute), "resblocks are not cached in 'attention' mode"
    assert not all(build(profile, opts(threshold=0.5, cache_kinds="attention+resblock")).layers[1].compute)
    ends = build(profile, opts(threshold=0.5, always_compute_first=2, always_compute_last=3)).layers[0].compute
    assert ends == (True, True) + (False,) * 5 + (True,) * 3
    capped = build(profile, opts(threshold=0.5, max_consecutive_reuse=2)).layers[0].compute
    assert capped == (True, False, False, True, False, False, True, False, False, True)
    assert build(profile, opts(threshold=0.0)).compute_mask().all()


def test_speedup_estimate_is_flop_weighted(pack):
    nan = float("nan")
    profile = make_profile(pack, [[nan, 0.0, 0.0, 0.0]])
    schedule = build_schedule(profile, BuildOptions(threshold=0.5))
    # total 15 FLOPs per step, 10 cacheable, computed once in 4 steps: (4*5 + 10) / (4*15)
    assert math.isclose(schedule.flop_fraction, 30 / 60)
    assert math.isclose(schedule.estimated_speedup, 2.0)


@pytest.mark.parametrize(("tau", "step"), [(1.0, 0), (0.95, 0), (0.9, 1), (0.85, 1), (0.0, 9), (1.5, 0)])
def test_step_of_maps_times_onto_the_grid(pack, tau, step):
    grid = StepGrid(sigmas=(), taus=tuple(1.0 - i / 10 for i in range(10)))
    assert grid.step_of(tau) == step


def test_merge_weights_by_samples(pack):
    nan = float("nan")
    a = make_profile(pack, [[nan, 0.2, 0.4]])
    b = make_profile(pack, [[nan, 0.5, 0.1]])
    import dataclasses

    b = dataclasses.replace(b, sample_count=3)
    merged = merge_profiles([a, b])
    assert merged.sample_count == 4
    assert math.isnan(merged.change[0][0])
    assert merged.change[0][1:] == pytest.approx((0.425, 0.175))


def test_schedule_and_profile_json_round_trip(pack):
    nan = float("nan")
    profile = make_profile(pack, [[nan, 0.3, 0.3, 0.3], [nan, 0.1, 0.1, 0.9]])
    schedule = build_schedule(profile, BuildOptions(threshold=0.5))
    text = schedule_to_json(schedule)
    loaded = schedule_from_json(text)
    assert loaded.layers == schedule.layers
    assert loaded.grid == schedule.grid
    assert loaded.block_map == schedule.block_map
    assert loaded.estimated_speedup == pytest.approx(schedule.estimated_speedup)
    assert schedule_to_json(loaded) == text
    doc = json.loads(text)
    assert doc["format"] == "block-cache-schedule" and doc["version"] == 2
    assert [layer["forecast_order"] for layer in doc["layers"]] == [0, 0]
    reloaded = profile_from_dict(json.loads(json.dumps(profile_to_dict(profile))))
    assert reloaded.block_map == profile.block_map and reloaded.change[1][1:] == profile.change[1][1:]


def test_version_1_schedules_load_with_order_0_and_orders_round_trip(pack):
    """Files saved before forecasting (version 1, no forecast_order) still load, as plain reuse; a
    version-2 file keeps each layer's order, and the order is part of the fingerprint; a damped forecast is
    written as version 3 and round-trips, its damping in the fingerprint."""
    import dataclasses

    nan = float("nan")
    profile = make_profile(pack, [[nan, 0.3, 0.3, 0.3], [nan, 0.1, 0.1, 0.9]])
    schedule = build_schedule(profile, BuildOptions(threshold=0.5))
    old = json.loads(schedule_to_json(schedule))
    old["version"] = 1
    for layer in old["layers"]:
        del layer["forecast_order"]
    loaded = schedule_from_dict(old)
    assert loaded.layers == schedule.layers and all(layer.forecast_order == 0 for layer in loaded.layers)
    assert loaded.fingerprint == schedule.fingerprint
    forecast = dataclasses.replace(schedule, layers=(dataclasses.replace(schedule.layers[0], forecast_order=2),
                                                     schedule.layers[1]))
    reloaded = schedule_from_json(schedule_to_json(forecast))
    assert [layer.forecast_order for layer in reloaded.layers] == [2, 0]
    assert reloaded.fingerprint == forecast.fingerprint != schedule.fingerprint
    assert json.loads(schedule_to_json(forecast))["version"] == 2, "undamped schedules stay version 2"
    damped = dataclasses.replace(forecast, layers=(dataclasses.replace(forecast.layers[0], forecast_damping=0.5),
                                                   forecast.layers[1]))
    document = json.loads(schedule_to_json(damped))
    assert document["version"] == 3 and [layer.get("forecast_damping") for layer in document["layers"]] == [0.5, None]
    again = schedule_from_dict(document)
    assert again.layers == damped.layers and again.fingerprint == damped.fingerprint != forecast.fingerprint


def _schedule_doc(pack):
    nan = float("nan")
    profile = make_profile(pack, [[nan, 0.3, 0.3, 0.3]])
    return json.loads(schedule_to_json(
        build_schedule(profile, BuildOptions(threshold=0.5))))


BAD_DOCUMENTS = {
    "truncated": lambda text, doc: text[: len(text) // 2],
    "not json": lambda text, doc: "hello",
    "not an object": lambda text, doc: "[1, 2]",
    "wrong format": lambda text, doc: json.dumps({**doc, "format": "something-else"}),
    "wrong version": lambda text, doc: json.dumps({**doc, "version": 99}),
    "missing layers": lambda text, doc: json.dumps({k: v for k, v in doc.items() if k != "layers"}),
    "mask too short": lambda text, doc: json.dumps({**doc, "layers": [{**doc["layers"][0], "compute": "10"}]}),
    "mask not binary": lambda text, doc: json.dumps({**doc, "layers": [{**doc["layers"][0], "compute": "1x01"}]}),
    "first step reused": lambda text, doc: json.dumps({**doc, "layers": [{**doc["layers"][0], "compute": "0101"}]}),
    "unknown kind": lambda text, doc: json.dumps({**doc, "layers": [{**doc["layers"][0], "kind": "lstm"}]}),
    "unknown reuse": lambda text, doc: json.dumps({**doc, "layers": [{**doc["layers"][0], "reuse": "magic"}]}),
    "path-like layer name": lambda text, doc: json.dumps(
        {**doc, "layers": [{**doc["layers"][0], "name": "../../etc"}]}),
    "nan number": lambda text, doc: text.replace('"total_flops": 15.0', '"total_flops": NaN'),
    "steps mismatch": lambda text, doc: json.dumps({**doc, "grid": {**doc["grid"], "steps": 7}}),
    "deep nesting": lambda text, doc: "[" * 100000 + "]" * 100000,
    "forecast order too high": lambda text, doc: json.dumps(
        {**doc, "layers": [{**doc["layers"][0], "forecast_order": 3}]}),
    "forecast order not an integer": lambda text, doc: json.dumps(
        {**doc, "layers": [{**doc["layers"][0], "forecast_order": 1.5}]}),
    "forecast damping above 1": lambda text, doc: json.dumps(
        {**doc, "version": 3, "layers": [{**doc["layers"][0], "forecast_order": 1, "forecast_damping": 1.5}]}),
    "forecast damping not a number": lambda text, doc: json.dumps(
        {**doc, "version": 3, "layers": [{**doc["layers"][0], "forecast_order": 1, "forecast_damping": "half"}]}),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
def test_bad_schedule_json_gives_one_clear_error(pack, case):
    doc = _schedule_doc(pack)
    text = json.dumps(doc, indent=1)
    bad = BAD_DOCUMENTS[case](text, doc)
    assert bad != text
    with pytest.raises(ScheduleFormatError) as error:
        schedule_from_json(bad)
    message = str(error.value)
    assert "Block Cache" in message and len(message) < 600
    assert ("Rebuild" in message) or ("Update Block Cache" in message)


def test_schedule_for_another_model_is_refused_before_patching(pack, tiny_model):
    doc = _schedule_doc(pack)
    doc["layers"][0]["name"] = "output_blocks.42.1"
    schedule = schedule_from_dict(doc)
    before = (dict(tiny_model.object_patches), {k: dict(v) for k, v in tiny_model.wrappers.items()})
    with pytest.raises(ScheduleMismatchError, match="does not have.*output_blocks.42.1"):
        apply_block_cache(tiny_model, schedule)
    assert (dict(tiny_model.object_patches), {k: dict(v) for k, v in tiny_model.wrappers.items()}) == before


def test_save_load_round_trip_and_unsafe_names(pack, tmp_path):
    doc = _schedule_doc(pack)
    schedule = schedule_from_dict(doc)
    folder = tmp_path / "block_cache"
    path = save_schedule(folder, "sd15 fast", schedule)
    assert path == folder / "sd15 fast.json"
    assert list_schedules(folder) == ["sd15 fast.json"]
    assert load_schedule(folder, "sd15 fast.json").layers == schedule.layers
    with pytest.raises(ScheduleFileError, match="already exists"):
        save_schedule(folder, "sd15 fast", schedule, overwrite=False)
    for name in ["../../x", "/etc/passwd", "a/b", "..", ".hidden", "x\\..\\y", "", "a" * 300, "nul\0byte"]:
        with pytest.raises(ScheduleFileError):
            save_schedule(folder, name, schedule)
        with pytest.raises(ScheduleFileError):
            load_schedule(folder, name)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["block_cache", "sd15 fast.json"]


@pytest.mark.parametrize(("name", "attention", "resblocks", "down", "up"), [
    ("SD15", 16, 22, 3, 3),
    ("SD21", 16, 22, 3, 3),
    ("SDXL", 11, 17, 2, 2),
    ("SDXLRefiner", 11, 22, 3, 3),
])
def test_full_size_block_maps_find_every_layer(pack, name, attention, resblocks, down, up):
    model, config_name = build_full_unet(name, device="meta")
    block_map = build_block_map(model, config_name)
    kinds = [layer.kind.value for layer in block_map.layers]
    assert kinds.count("attention") == attention
    assert kinds.count("resblock") == resblocks
    assert kinds.count("downsample") == down and kinds.count("upsample") == up
    # every ResBlock, SpatialTransformer, Downsample and Upsample in the model is mapped
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    expected = sum(isinstance(m, (SpatialTransformer, ResBlock, Downsample, Upsample)) for m in model.modules())
    assert len(block_map.layers) == expected
    for layer in block_map.layers:
        assert isinstance(model.get_submodule(layer.name), (SpatialTransformer, ResBlock, Downsample, Upsample))


def test_unsupported_model_error_names_class_and_families(pack):
    with pytest.raises(UnsupportedModelError, match="Linear.*Supported families: UNet.*Flux.*Wan"):
        build_block_map(torch.nn.Linear(2, 2), "Mystery")
