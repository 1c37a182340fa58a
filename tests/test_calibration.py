"""Calibrate Block Cache: the scale-shift correction (Block Caching Sec. 3.4), on real ComfyUI models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from comfyui_block_cache import errors
from comfyui_block_cache.block_caching.patching import apply_block_cache
from comfyui_block_cache.block_caching.scale_shift import FILE_FORMAT, ScaleShiftTable
from comfyui_block_cache.block_caching.schedule import BuildOptions, build_schedule
from comfyui_block_cache.block_caching.target_build import TargetOptions
from comfyui_block_cache.block_caching.target_schedule import build_target_schedule
from comfyui_block_cache.demo_models.builtin_models import build_unet_patcher, prompt_conditioning
from comfyui_block_cache.errors import BlockCacheError, ScheduleFileError
from comfyui_block_cache.schedule_files.storage import load_schedule, save_schedule
from dit_zoo import ZOO
from helpers import is_identity, profile_by_sampling, runs_holding_tensors, sample

STEPS = 8


@pytest.fixture
def calibration(pack):
    import importlib

    return importlib.import_module(pack.__name__ + ".block_caching.calibration")


@pytest.fixture
def aggressive(pack, tiny_model, conds, latent):
    """A schedule that reuses most layer evaluations, and the uncached output it approximates."""
    profile, uncached = profile_by_sampling(pack, tiny_model, conds, latent, steps=STEPS)
    schedule = build_schedule(profile, BuildOptions(threshold=2.0, cache_kinds="all"))
    assert schedule.compute_mask().mean() < 0.4
    return schedule, uncached


@pytest.fixture
def calibrated(pack, calibration, tiny_model, conds, latent, aggressive):
    schedule, _ = aggressive
    options = calibration.CalibrationOptions(iterations=8, learning_rate=0.05, seed=100)
    return calibration.calibrate(tiny_model, schedule, [conds], latent["samples"], options)


def _sample(pack, model, schedule, conds, latent):
    patched, _ = apply_block_cache(model, schedule)
    return sample(patched, *conds, latent, steps=STEPS)


def _with_table(schedule, fill):
    """The calibrated schedule with every correction row replaced: fill(entry, layer_name) -> (scale, shift)."""
    table = schedule.scale_shift.detached()
    for (name, _stream), entry in table.entries.items():
        entry.scale, entry.shift = fill(entry, name)
    return dataclasses.replace(schedule, scale_shift=table)


def test_calibration_lowers_the_student_teacher_loss(pack, calibration, tiny_model, conds, latent, aggressive,
                                                     calibrated):
    schedule, _ = aggressive
    assert calibrated.schedule.scale_shift is not None and calibrated.schedule.scale_shift.entries
    assert not is_identity(calibrated.schedule.scale_shift)
    assert len(calibrated.losses) == 8 and calibrated.losses[-1] < calibrated.losses[0]
    # On seeds it never trained on, the trained correction brings the cached layers closer to the teacher.
    held_out = calibration.CalibrationOptions(iterations=2, seed=5000)
    before = calibration.measure_error(tiny_model, schedule, [conds], latent["samples"], held_out)
    after = calibration.measure_error(tiny_model, calibrated.schedule, [conds], latent["samples"], held_out)
    assert after < 0.95 * before, (before, after)
    # Only layers the schedule reuses get a correction, one per stream, one row per grid step.
    reused = {layer.name for layer in schedule.layers if not all(layer.compute)}
    table = calibrated.schedule.scale_shift
    assert {name for name, _ in table.entries} <= reused
    assert all(entry.scale.shape[0] == STEPS and entry.scale.shape == entry.shift.shape
               for entry in table.entries.values())


def test_identity_parameters_are_bit_identical_to_no_correction(pack, tiny_model, conds, latent, aggressive,
                                                                calibrated):
    schedule, _ = aggressive
    uncorrected = _sample(pack, tiny_model, schedule, conds, latent)
    identity = _with_table(calibrated.schedule, lambda e, _: (torch.zeros_like(e.scale), torch.zeros_like(e.shift)))
    assert is_identity(identity.scale_shift)
    assert torch.equal(_sample(pack, tiny_model, identity, conds, latent), uncorrected)
    # ... while the trained correction really is applied.
    assert not torch.equal(_sample(pack, tiny_model, calibrated.schedule, conds, latent), uncorrected)


def test_corrections_are_a_no_op_where_a_layer_computes(pack, tiny_model, conds, latent, aggressive, calibrated):
    schedule, _ = aggressive
    computes = {layer.name: torch.tensor(layer.compute) for layer in schedule.layers}

    def huge_where_computed(entry, name):
        rows = computes[name][:, None].expand_as(entry.scale)
        return torch.where(rows, torch.full_like(entry.scale, 100.0), torch.zeros_like(entry.scale)), \
            torch.where(rows, torch.full_like(entry.shift, -50.0), torch.zeros_like(entry.shift))

    poisoned = _with_table(calibrated.schedule, huge_where_computed)
    assert torch.equal(_sample(pack, tiny_model, poisoned, conds, latent),
                       _sample(pack, tiny_model, schedule, conds, latent))


def test_parameters_round_trip_through_safetensors_and_the_schedule_file(pack, tiny_model, conds, latent, calibrated,
                                                                         tmp_path):
    schedule = calibrated.schedule
    path = save_schedule(tmp_path, "calibrated", schedule)
    parameters = tmp_path / "calibrated.scale_shift.safetensors"
    assert parameters.is_file()
    document = json.loads(path.read_text())
    assert document["calibration"] == {"file": parameters.name, "fingerprint": schedule.fingerprint}
    loaded = load_schedule(tmp_path, "calibrated.json")
    assert loaded.scale_shift is not None and loaded.layers == schedule.layers
    assert loaded.scale_shift.entries.keys() == schedule.scale_shift.entries.keys()
    for key, entry in schedule.scale_shift.entries.items():
        assert torch.equal(loaded.scale_shift.entries[key].scale, entry.scale)
        assert torch.equal(loaded.scale_shift.entries[key].shift, entry.shift)
    assert loaded.scale_shift.metadata["iterations"] == "8"
    assert torch.equal(_sample(pack, tiny_model, loaded, conds, latent),
                       _sample(pack, tiny_model, schedule, conds, latent))
    # An uncalibrated schedule writes no parameters and no reference.
    plain = save_schedule(tmp_path, "plain", dataclasses.replace(schedule, scale_shift=None))
    assert "calibration" not in json.loads(plain.read_text())
    assert not (tmp_path / "plain.scale_shift.safetensors").exists()


def test_mismatched_parameters_give_clear_errors_and_patch_nothing(pack, tiny_model, conds, latent, aggressive,
                                                                   calibrated, tmp_path):
    schedule = calibrated.schedule
    table = schedule.scale_shift
    # Parameters of another schedule (a different threshold gives other masks).
    other = dataclasses.replace(aggressive[0], layers=tuple(
        dataclasses.replace(layer, compute=(True,) * STEPS) if i == 0 else layer
        for i, layer in enumerate(aggressive[0].layers)), scale_shift=table)
    with pytest.raises(errors.ScheduleMismatchError, match="another schedule"):
        apply_block_cache(tiny_model, other)
    # Parameters of a model with another structure.
    foreign = table.detached()
    foreign.model_fingerprint = "0" * 16
    with pytest.raises(errors.ScheduleMismatchError, match="another structure"):
        apply_block_cache(tiny_model, dataclasses.replace(schedule, scale_shift=foreign))
    # Channel counts that do not fit the model: found at the first reuse, the run fails clearly.
    narrow = _with_table(schedule, lambda e, _: (e.scale[:, :1].clone(), e.shift[:, :1].clone()))
    patched, holder = apply_block_cache(tiny_model, narrow)
    with pytest.raises(errors.ScheduleMismatchError, match="channels"):
        sample(patched, *conds, latent, steps=STEPS)
    assert not runs_holding_tensors(holder)  # run state freed
    assert not tiny_model.object_patches and not tiny_model.model_options["transformer_options"].get("wrappers")
    # Files: a missing parameter file, a schedule edited after calibration, a corrupt file, a hostile name.
    path = save_schedule(tmp_path, "calibrated", schedule)
    parameters = tmp_path / "calibrated.scale_shift.safetensors"
    saved = parameters.read_bytes()
    parameters.unlink()
    with pytest.raises(errors.ScheduleFileError, match="missing"):
        load_schedule(tmp_path, "calibrated.json")
    parameters.write_bytes(b"not safetensors" * 10)
    with pytest.raises(errors.ScheduleFileError, match="safetensors"):
        load_schedule(tmp_path, "calibrated.json")
    parameters.write_bytes(saved)
    document = json.loads(path.read_text())
    document["layers"][0]["compute"] = "1" * STEPS if document["layers"][0]["compute"] != "1" * STEPS else \
        "1" + "0" * (STEPS - 1)
    path.write_text(json.dumps(document))
    with pytest.raises(errors.ScheduleFileError, match="changed after it was calibrated"):
        load_schedule(tmp_path, "calibrated.json")
    for hostile in ("../../x.scale_shift.safetensors", "/etc/passwd", "x.json", 5, "a" * 500):
        document["calibration"]["file"] = hostile
        path.write_text(json.dumps(document))
        with pytest.raises(errors.ScheduleFormatError, match="calibration.file"):
            load_schedule(tmp_path, "calibrated.json")


def test_damaged_parameter_files_are_rejected(pack, calibrated, tmp_path):
    table = calibrated.schedule.scale_shift
    tensors = {f"{name}#{stream}.{part}": getattr(entry, part)
               for (name, stream), entry in table.entries.items() for part in ("scale", "shift")}
    metadata = {"format": FILE_FORMAT, "version": "1", "steps": str(STEPS),
                "schedule_fingerprint": table.schedule_fingerprint, "model_fingerprint": table.model_fingerprint}
    from_tensors = ScaleShiftTable.from_tensors
    assert from_tensors(tensors, metadata, "ok").entries.keys() == table.entries.keys()
    first = next(iter(tensors))
    cases = {
        "format": ({**metadata, "format": "something else"}, tensors),
        "version": ({**metadata, "version": "99"}, tensors),
        "steps": ({**metadata, "steps": "many"}, tensors),
        "shape": (metadata, {**tensors, first: torch.zeros(3, 2)}),
        "NaN": (metadata, {**tensors, first: torch.full_like(tensors[first], float("nan"))}),
        "unexpected tensor": (metadata, {**tensors, "bad key": torch.zeros(STEPS, 2)}),
        "matching": (metadata, {k: v for k, v in tensors.items() if k != first}),
    }
    for problem, (meta, data) in cases.items():
        with pytest.raises(ScheduleFileError, match=problem):
            from_tensors(data, meta, "damaged.scale_shift.safetensors")


def test_calibrate_refuses_a_schedule_that_reuses_nothing(pack, calibration, tiny_model, conds, latent, aggressive):
    schedule, _ = aggressive
    everything = dataclasses.replace(schedule, layers=tuple(
        dataclasses.replace(layer, compute=(True,) * STEPS) for layer in schedule.layers))
    with pytest.raises(BlockCacheError, match="reuses nothing"):
        calibration.calibrate(tiny_model, everything, [conds], latent["samples"], calibration.CalibrationOptions())
    lookahead = dataclasses.replace(everything, lookahead_steps=(0, STEPS - 1))
    with pytest.raises(BlockCacheError, match="step lookahead"):
        calibration.calibrate(tiny_model, lookahead, [conds], latent["samples"], calibration.CalibrationOptions())
    with pytest.raises(ValueError, match="learning_rate"):
        calibration.calibrate(tiny_model, schedule, [conds], latent["samples"],
                              calibration.CalibrationOptions(learning_rate=float("nan")))


def test_calibrate_node_in_inference_mode_like_comfyui_runs_it(pack):
    import importlib
    node = importlib.import_module(pack.__name__ + ".nodes.nodes_calibrate").CalibrateBlockCache
    # ComfyUI's execution.py runs every node in inference mode: the loader's weights, the conditioning
    # and the schedule are all made there, and the weights are inference tensors that require grad.
    with torch.inference_mode():
        tiny_model = build_unet_patcher("tiny", seed=0)
        prompt = prompt_conditioning
        conds = (prompt("a red square", 32), prompt("blurry", 32))
        latent = {"samples": torch.zeros(1, 4, 16, 16)}
        profile, _ = profile_by_sampling(pack, tiny_model, conds, latent, steps=STEPS)
        schedule = build_schedule(profile, BuildOptions(threshold=2.0, cache_kinds="all"))
        assert any(layer.reuse.value == "residual" and layer.kind.value == "resblock" for layer in schedule.layers)
        positive = conds[0] + conds[0]  # two entries: two prompts, used in turn
        output = node.execute(tiny_model, schedule, positive, conds[1], latent, 3, 4, 0.05, 0, 0.0)
    calibrated, curve = output.result
    assert calibrated.scale_shift is not None and not is_identity(calibrated.scale_shift)
    assert calibrated.layers == schedule.layers and schedule.scale_shift is None  # the input is unchanged
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and float(curve.std()) > 0
    assert "corrected streams" in output.ui["text"][0]
    assert calibrated.scale_shift.metadata["prompts"] == "2"
    assert not tiny_model.object_patches  # the model passed in was never patched


def test_calibration_on_a_dit_with_two_streams(pack, calibration):
    """Flux double blocks return (img, txt) tokens: channels are last, each stream has its own correction."""
    flux = next(entry for entry in ZOO if entry.id == "flux-dev")
    model = flux.build(seed=0)
    conds = flux.conds()
    profile, _ = profile_by_sampling(pack, model, conds, flux.latent(), steps=6, cfg=1.0)
    schedule = build_schedule(profile, BuildOptions(threshold=3.0))
    options = calibration.CalibrationOptions(iterations=6, learning_rate=0.05)
    result = calibration.calibrate(model, schedule, [conds], flux.latent()["samples"], options)
    table = result.schedule.scale_shift
    streams = {stream for (name, stream) in table.entries if name.startswith("double_blocks")}
    assert streams == {0, 1}
    assert result.losses[-1] < result.losses[0]
    identity = _with_table(result.schedule, lambda e, _: (torch.zeros_like(e.scale), torch.zeros_like(e.shift)))
    patched_plain, _ = apply_block_cache(model, schedule)
    patched_identity, _ = apply_block_cache(model, identity)
    assert torch.equal(sample(patched_identity, *conds, flux.latent(), steps=6, cfg=1.0),
                       sample(patched_plain, *conds, flux.latent(), steps=6, cfg=1.0))


def test_calibration_corrects_forecast_reuse(pack, calibration, tiny_model, conds, latent):
    """On a speed-up target schedule (forecast order 1) the correction applies to the forecast: identity
    parameters give the uncorrected forecast bit for bit, and training lowers the error of the forecasts."""
    profile, _ = profile_by_sampling(pack, tiny_model, conds, latent, steps=STEPS)
    schedule = build_target_schedule(
        profile, TargetOptions(speedup=3.0, forecast_order=1))
    assert {layer.forecast_order for layer in schedule.layers if not all(layer.compute)} == {1}
    options = calibration.CalibrationOptions(iterations=6, learning_rate=0.05, seed=100)
    result = calibration.calibrate(tiny_model, schedule, [conds], latent["samples"], options)
    assert result.losses[-1] < result.losses[0]
    identity = _with_table(result.schedule, lambda e, _: (torch.zeros_like(e.scale), torch.zeros_like(e.shift)))
    assert torch.equal(_sample(pack, tiny_model, identity, conds, latent),
                       _sample(pack, tiny_model, schedule, conds, latent))
