"""Hostile input: fuzzed schedule and profile documents, and file names for Save/Load.

Every case must end in a valid object or one of the pack's clear errors (ScheduleFormatError,
ScheduleFileError), never another exception, and nothing may be written or read outside the
schedule folder. Case counts are fixed by ``EXAMPLES`` (printed in the README's compatibility table).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from comfyui_block_cache import errors
from comfyui_block_cache.block_caching.schedule import BuildOptions, build_schedule
from comfyui_block_cache.demo_models.builtin_models import build_unet_patcher, prompt_conditioning
from comfyui_block_cache.errors import ScheduleFileError
from comfyui_block_cache.schedule_files.schema import (
    MAX_DOCUMENT_BYTES,
    profile_from_dict,
    profile_to_dict,
    schedule_from_dict,
    schedule_from_json,
    schedule_to_dict,
)
from comfyui_block_cache.schedule_files.storage import load_schedule, save_schedule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 300
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["", "1" * 5000, "0", "residual", "output", "attention", "transformer", "nan", "Infinity"]),
)
json_values = st.recursive(json_leaves, lambda children: st.one_of(
    st.lists(children, max_size=5), st.dictionaries(st.text(max_size=12), children, max_size=5)), max_leaves=30)


@pytest.fixture(scope="module")
def valid(pack):
    """A real schedule and profile document of the tiny UNet (profiled once)."""
    from helpers import profile_by_sampling
    model = build_unet_patcher("tiny", seed=0)
    conds = (prompt_conditioning("a", 32), prompt_conditioning("b", 32))
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    profile, _ = profile_by_sampling(pack, model, conds, latent, steps=6)
    schedule = build_schedule(profile, BuildOptions(threshold=0.5, cache_kinds="all"))
    return schedule_to_dict(schedule), profile_to_dict(profile)


def _paths(doc, prefix=()):
    """Every path to a value in a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


def _replace(doc, path, value):
    doc = copy.deepcopy(doc)
    if not path:
        return value
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def _parse_or_clear_error(pack, reader, doc):
    try:
        result = reader(doc)
    except errors.ScheduleFormatError as error:
        assert str(error).startswith("Invalid Block Cache") or "Block Cache" in str(error)
        return None
    return result


def _check_schedule(schedule) -> None:
    """A schedule that parsed must be usable: finite numbers, masks of the grid's length."""
    mask = schedule.compute_mask()
    assert mask.shape == (len(schedule.layers), schedule.grid.steps) and mask[:, 0].all()
    assert all(math.isfinite(f) and f >= 0 for f in schedule.layer_flops) and math.isfinite(schedule.total_flops)
    assert math.isfinite(schedule.estimated_speedup)


@SETTINGS
@given(data=st.data())
def test_mutated_schedule_documents(pack, valid, data):
    schedule_doc, _ = valid
    paths = list(_paths(schedule_doc))
    path = data.draw(st.sampled_from(paths))
    doc = _replace(schedule_doc, path, data.draw(json_values))
    result = _parse_or_clear_error(pack, schedule_from_dict, doc)
    if result is not None:
        _check_schedule(result)


@SETTINGS
@given(data=st.data())
def test_mutated_profile_documents(pack, valid, data):
    _, profile_doc = valid
    path = data.draw(st.sampled_from(list(_paths(profile_doc))))
    doc = _replace(profile_doc, path, data.draw(json_values))
    result = _parse_or_clear_error(pack, profile_from_dict, doc)
    if result is not None:
        assert all(len(row) == result.grid.steps for row in result.change)


@SETTINGS
@given(doc=json_values)
def test_random_documents(pack, doc):
    assert _parse_or_clear_error(pack, schedule_from_dict, doc) is None
    assert _parse_or_clear_error(pack, profile_from_dict, doc) is None


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=10**9), junk=st.binary(max_size=20))
def test_truncated_and_corrupted_json(pack, valid, cut, junk):
    text = json.dumps(valid[0]).encode()
    truncated = text[:cut % len(text)] + junk
    assert _parse_or_clear_error(pack, schedule_from_json, truncated) is None


def test_deep_nesting_and_huge_documents(pack, valid):
    with pytest.raises(errors.ScheduleFormatError):
        schedule_from_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(errors.ScheduleFormatError):
        schedule_from_json(b" " * (MAX_DOCUMENT_BYTES + 1))
    huge = copy.deepcopy(valid[0])
    huge["grid"]["steps"] = 10**12
    with pytest.raises(errors.ScheduleFormatError):
        schedule_from_dict(huge)


name_parts = st.sampled_from(["..", ".", "/", "\\", "~", "%2e%2e", "\x00", "x", "a b", "-", "_", ".json", "C:",
                              "\u202e", "\n", "*", "?", "con", "nul"])
hostile_names = st.one_of(st.text(max_size=200), st.lists(name_parts, max_size=8).map("".join),
                          st.sampled_from(["../../x", "../x.json", "/etc/passwd", "..\\..\\x", "a/../../b",
                                           "./a", "a" * 500, "", " ", ".hidden", "x/y"]))


@SETTINGS
@given(name=hostile_names)
def test_file_names_never_escape_the_folder(pack, valid, tmp_path_factory, name):
    root = tmp_path_factory.mktemp("fuzz")
    folder = root / "user" / "block_cache"
    outside_before = sorted(p for p in root.rglob("*"))
    schedule = schedule_from_dict(valid[0])
    try:
        path = save_schedule(folder, name, schedule, overwrite=True)
    except ScheduleFileError:
        path = None
    if path is not None:
        assert path.parent == folder.resolve() and path.is_file()
        assert load_schedule(folder, name).grid.steps == schedule.grid.steps
    else:
        with pytest.raises(ScheduleFileError):
            load_schedule(folder, name)
    written = {p for p in root.rglob("*") if p.is_file()} - set(outside_before)
    assert all(Path(p).resolve().parent == folder.resolve() for p in written), written
