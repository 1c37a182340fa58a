"""The browser's schedule builder (js/schedule_builder.js) against the Python one (block_caching/schedule.py).

Both run on the same fixture profiles (random, plus edge cases: unmeasured steps, zeros, ties
with the threshold, huge and subnormal values, odd FLOP counts) under every option
combination; every mask, count, FLOP fraction and speed-up must be identical, bit for bit.
The JavaScript side runs under node, on the payload the nodes send to the browser. That payload
carries the change values to 3 significant digits (it is saved in every workflow), so the
fixtures are made of such values. The payload's size for a Flux-sized profile is checked too.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import shutil
import subprocess
import time

import pytest
from comfy_bootstrap import PACK_ROOT
from comfyui_block_cache.block_caching import target_schedule as target
from comfyui_block_cache.block_caching.profile import BlockProfile
from comfyui_block_cache.block_caching.schedule import BuildOptions, build_schedule
from comfyui_block_cache.block_caching.target_build import TargetOptions
from comfyui_block_cache.block_maps import block_map as bm
from comfyui_block_cache.demo_models.builtin_models import build_unet_patcher, prompt_conditioning
from comfyui_block_cache.nodes import frontend
from comfyui_block_cache.nodes.frontend import display_value, ladder_payload, profile_payload
from comfyui_block_cache.runtime.time_grid import StepGrid

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (.ci/run installs it)")

THRESHOLDS = [0.0, 1e-300, 0.01, 0.1, 0.25, 0.5, 1.0, 5.0, 1e308]
KINDS = ["attention", "attention+resblock", "all"]
LAYER_KINDS = ["attention", "transformer", "resblock", "downsample", "upsample"]

RUNNER = """
import { readFileSync, writeFileSync } from "node:fs";
import { buildSchedule } from "./schedule_builder.mjs";
const { profiles, cases } = JSON.parse(readFileSync(process.argv[2], "utf8"));
const out = cases.map(([index, options]) => {
  try {
    const r = buildSchedule(profiles[index], options);
    return { mask: r.mask.map((row) => row.map((c) => (c ? "1" : "0")).join("")).join("|"),
             computed: r.computed, total: r.total, fraction: r.flopFraction, speedup: r.speedup };
  } catch (error) {
    return { error: String(error.message) };
  }
});
writeFileSync(process.argv[3], JSON.stringify(out));
"""


def _value(rng: random.Random, style: str) -> float:
    if rng.random() < 0.04:
        return math.nan  # unmeasured
    if style == "uniform":
        return rng.random()
    if style == "ties":  # sums that land exactly on thresholds such as 0.5 and 1.0
        return rng.choice([0.0, 0.125, 0.25, 0.5, 0.1, 0.05])
    if style == "wild":
        return rng.choice([0.0, 5e-324, 1e-300, 1e-12, 0.3, 2.0, 1e300, 1.7e308, rng.expovariate(3.0)])
    return rng.expovariate(rng.choice([1.0, 5.0, 30.0]))  # smooth, mostly small, like real profiles


def _sent(pack, value: float) -> float:
    """A change value as the browser receives it (NaN: unmeasured, sent as null)."""
    shown = display_value(value)
    return math.nan if shown is None else shown


def _profile(pack, rng: random.Random, layers: int, steps: int):
    style = rng.choice(["uniform", "ties", "wild", "expo", "expo"])
    kinds = [bm.LayerKind(rng.choice(LAYER_KINDS)) for _ in range(layers)]
    specs = tuple(bm.LayerSpec(f"input_blocks.{i + 1}.1", kind, "input", bm.ResidualForm.IDENTITY)
                  for i, kind in enumerate(kinds))
    change = tuple((math.nan,) + tuple(_sent(pack, _value(rng, style)) for _ in range(steps - 1))
                   for _ in range(layers))
    flops = tuple(rng.choice([0.0, 1.0, rng.uniform(1e6, 1e10), rng.uniform(0, 1) * 10 ** rng.randint(0, 12)])
                  for _ in range(layers))
    total = rng.choice([sum(flops) * rng.uniform(1.0, 3.0), sum(flops) * 0.5, 0.0, sum(flops) + 0.1,
                        rng.uniform(1e9, 1e12)])
    grid = StepGrid(sigmas=tuple(float(steps - i) for i in range(steps)) + (0.0,),
                                   taus=tuple(1.0 - i / steps for i in range(steps)), sampler="euler",
                                   scheduler="normal")
    block_map = bm.BlockMap("unet", "SD15", "UNetModel", specs, "0123456789abcdef")
    return BlockProfile(block_map, grid, change, flops, total, 1)


def _option_grid(steps: int) -> list[dict]:
    combos = itertools.product(THRESHOLDS, KINDS, sorted({0, 1, 2, 7, steps, steps + 3}),
                               sorted({0, 1, 3, steps}), [0, 1, 2, 5])
    return [{"threshold": t, "cache_kinds": k, "always_compute_first": f, "always_compute_last": last,
             "max_consecutive_reuse": m} for t, k, f, last, m in combos]


def _random_options(rng: random.Random, steps: int) -> dict:
    return {"threshold": rng.choice([rng.uniform(0, 5), round(rng.uniform(0, 2), 2), rng.choice(THRESHOLDS)]),
            "cache_kinds": rng.choice(KINDS), "always_compute_first": rng.randint(0, steps + 1),
            "always_compute_last": rng.choice([0, 0, rng.randint(0, steps + 1)]),
            "max_consecutive_reuse": rng.choice([0, 0, rng.randint(1, 6)])}


def test_javascript_builder_matches_python_exactly(pack, tmp_path):
    payload = profile_payload
    rng = random.Random(20240617)
    profiles = []
    cases: list[tuple[int, dict]] = []
    # Every option combination on a few profiles, including the degenerate shapes.
    for layers, steps in [(1, 1), (1, 2), (0, 5), (3, 4), (12, 20), (25, 50), (8, 10), (40, 30)]:
        profiles.append(_profile(pack, rng, layers, steps))
        cases += [(len(profiles) - 1, options) for options in _option_grid(steps)]
    # Many random profiles, each under a few random option sets.
    for _ in range(1000):
        profiles.append(_profile(pack, rng, rng.randint(1, 30), rng.randint(1, 60)))
        cases += [(len(profiles) - 1, _random_options(rng, profiles[-1].grid.steps)) for _ in range(4)]

    started = time.perf_counter()
    expected = []
    for index, options in cases:
        schedule = build_schedule(profiles[index], BuildOptions(**options))
        mask = schedule.compute_mask()
        expected.append({"mask": "|".join("".join("1" if c else "0" for c in row) for row in mask),
                         "computed": int(mask.sum()), "total": int(mask.size),
                         "fraction": schedule.flop_fraction, "speedup": schedule.estimated_speedup})
    python_seconds = time.perf_counter() - started

    shutil.copy(PACK_ROOT / "js" / "schedule_builder.js", tmp_path / "schedule_builder.mjs")
    (tmp_path / "runner.mjs").write_text(RUNNER)
    fixtures = tmp_path / "fixtures.json"
    # allow_nan=False: the payload must be what a browser can parse (NaN travels as null).
    fixtures.write_text(json.dumps({"profiles": [payload(p) for p in profiles], "cases": cases}, allow_nan=False))
    started = time.perf_counter()
    subprocess.run([NODE, str(tmp_path / "runner.mjs"), str(fixtures), str(tmp_path / "out.json")], check=True,
                   timeout=300)
    node_seconds = time.perf_counter() - started
    actual = json.loads((tmp_path / "out.json").read_text())

    assert len(actual) == len(expected)
    for (index, options), want, got in zip(cases, expected, actual, strict=True):
        assert "error" not in got, (index, options, got)
        for key in ("mask", "computed", "total", "fraction", "speedup"):
            assert got[key] == want[key], f"profile {index} options {options}: {key} {got[key]!r} != {want[key]!r}"
    logging.getLogger(__name__).info("%d profiles, %d schedules compared; python %.1fs, node %.1fs",
                                     len(profiles), len(cases), python_seconds, node_seconds)


@pytest.mark.parametrize("options", [
    {"threshold": -0.1}, {"threshold": float("inf")}, {"cache_kinds": "nope"}, {"always_compute_first": -1},
    {"always_compute_last": 1.5}, {"max_consecutive_reuse": -2},
])
def test_javascript_builder_rejects_what_python_rejects(pack, tmp_path, options):
    profile = _profile(pack, random.Random(1), 3, 5)
    with pytest.raises(ValueError):
        build_schedule(profile, BuildOptions(**options))
    shutil.copy(PACK_ROOT / "js" / "schedule_builder.js", tmp_path / "schedule_builder.mjs")
    (tmp_path / "runner.mjs").write_text(RUNNER)
    # JSON has no Infinity: send a threshold the runner turns back into it.
    sent = {**options, "threshold": "Infinity"} if options.get("threshold") == float("inf") else options
    (tmp_path / "f.json").write_text(json.dumps({"profiles": [profile_payload(profile)],
                                                 "cases": [[0, sent]]}))
    subprocess.run([NODE, str(tmp_path / "runner.mjs"), str(tmp_path / "f.json"), str(tmp_path / "o.json")],
                   check=True, timeout=60)
    assert "error" in json.loads((tmp_path / "o.json").read_text())[0]


def _flux_sized_profile(pack, steps: int, blocks: int = 57):
    """A profile shaped like a 1024x1024 Flux dev one: 19 double and 38 single blocks, smooth change values
    at full precision, Flux's FLOP counts, two cond chunks per batch item."""
    rng = random.Random(57)
    names = [f"double_blocks.{i}" for i in range(19)] + [f"single_blocks.{i}" for i in range(blocks - 19)]
    specs = tuple(bm.LayerSpec(name, bm.LayerKind.TRANSFORMER, name.split(".")[0], bm.ResidualForm.IDENTITY,
                               output_form=bm.OutputForm.TUPLE if name.startswith("double") else bm.OutputForm.TENSOR)
                  for name in names)
    change = tuple((math.nan,) + tuple(rng.expovariate(rng.choice([5.0, 30.0])) for _ in range(steps - 1))
                   for _ in names)
    flops = tuple(rng.uniform(4e11, 6e11) for _ in names)
    grid = StepGrid(sigmas=tuple(1.0 - i / steps for i in range(steps)) + (0.0,),
                                   taus=tuple(1.0 - i / steps for i in range(steps)), sampler="euler",
                                   scheduler="simple")
    block_map = bm.BlockMap("generic (Flux)", "Flux", "Flux", specs, "0123456789abcdef")
    return BlockProfile(block_map, grid, change, flops, sum(flops) * 1.02, 2)


def test_a_flux_profile_payload_stays_small(pack):
    """What node.properties keeps of a profile goes into every saved workflow and PNG: at most 50 KB."""
    profile = _flux_sized_profile(pack, 28)
    payload = frontend.profile_payload(profile)
    size = frontend.payload_bytes(payload)
    full = frontend.payload_bytes({**payload, "change": [[v if math.isfinite(v) else None for v in row]
                                                         for row in profile.change]})
    logging.getLogger(__name__).info("Flux 57 x 28 profile payload: %d bytes (%d at full precision)", size, full)
    assert size <= 50_000 and payload["change"] is not None  # the heatmap and threshold preview still work
    assert size < full / 2
    # Values kept to 3 significant digits; unmeasured steps are null.
    for row, sent in zip(profile.change, payload["change"], strict=True):
        assert sent[0] is None
        assert all(math.isclose(s, v, rel_tol=5e-3) for s, v in zip(sent[1:], row[1:], strict=True))
    # A profile too large for that (a 1000-step run) drops the matrix, never the bound.
    long = frontend.profile_payload(_flux_sized_profile(pack, 1000))
    assert long["change"] is None and frontend.payload_bytes(long) <= 50_000


TARGET_RUNNER = """
import { readFileSync, writeFileSync } from "node:fs";
import { targetSchedule } from "./schedule_builder.mjs";
const { ladders, cases } = JSON.parse(readFileSync(process.argv[2], "utf8"));
const out = cases.map(([index, speedup]) => {
  const r = targetSchedule(ladders[index], speedup);
  return { mask: r.mask.map((row) => row.map((c) => (c ? "1" : "0")).join("")).join("|"), computed: r.computed,
           fraction: r.flopFraction, order: r.rung.order };
});
writeFileSync(process.argv[3], JSON.stringify(out));
"""


def test_javascript_target_preview_matches_python(pack, tmp_path):
    """The speed-up slider's preview (js targetSchedule) picks the rung and draws the mask that
    build_target_schedule gives for that speed-up, on real ladders of the tiny UNet."""
    import torch
    from helpers import profile_by_sampling
    model = build_unet_patcher("tiny", seed=0)
    prompt = prompt_conditioning
    conds = prompt("a red square", 32), prompt("blurry", 32)
    ladders, cases, expected = [], [], []
    for steps, kinds, first in ((10, "all", 1), (16, "attention+resblock", 2), (7, "attention", 1)):
        profile, _ = profile_by_sampling(pack, model, conds, {"samples": torch.zeros(1, 4, 16, 16)}, steps=steps)
        options = TargetOptions(speedup=2.0, cache_kinds=kinds, always_compute_first=first)
        ladders.append(ladder_payload(target.build_target_schedule(profile, options)))
        for speedup in (1.0, 1.05, 1.3, 1.77, 2.0, 2.5, 3.1, 4.0, 6.0, 10.0):
            schedule = target.build_target_schedule(profile, TargetOptions(
                speedup=speedup, cache_kinds=kinds, always_compute_first=first))
            mask = schedule.compute_mask()
            cases.append((len(ladders) - 1, speedup))
            expected.append({"mask": "|".join("".join("1" if c else "0" for c in row) for row in mask),
                             "computed": int(mask.sum()), "fraction": schedule.flop_fraction,
                             "order": schedule.builder["chosen_order"]})
    shutil.copy(PACK_ROOT / "js" / "schedule_builder.js", tmp_path / "schedule_builder.mjs")
    (tmp_path / "runner.mjs").write_text(TARGET_RUNNER)
    (tmp_path / "fixtures.json").write_text(json.dumps({"ladders": ladders, "cases": cases}, allow_nan=False))
    subprocess.run([NODE, str(tmp_path / "runner.mjs"), str(tmp_path / "fixtures.json"), str(tmp_path / "out.json")],
                   check=True, timeout=120)
    actual = json.loads((tmp_path / "out.json").read_text())
    assert actual == expected
