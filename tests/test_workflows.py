"""The example workflows: valid UI-format graphs, each with a thumbnail, valid against a real server.

Each workflow is converted to API format the way the frontend's graphToPrompt does (widget values
in input order, one extra value after a control_after_generate widget, links as [id, slot]) and
validated against the running server's /object_info: every node type exists, every input name is
known, every required input is given, every value fits its type, range or list of choices, and
every link joins matching types. The workflows that need no checkpoint are then queued and run.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from comfy_bootstrap import PACK_ROOT
from comfy_server import comfy_server

WORKFLOWS = sorted((PACK_ROOT / "example_workflows").glob("*.json"))
FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute", "PrimitiveNode"}  # never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SHORT_STEPS = 8
RUNNABLE = {"block_cache_demo_model_no_checkpoint", "block_cache_demo_dit_no_checkpoint",
            "block_cache_demo_video_no_checkpoint", "block_cache_demo_two_experts_no_checkpoint",
            "block_cache_apply_saved_schedule", "block_cache_calibrate_demo_model"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with comfy_server(tmp_path_factory.mktemp("comfy_workflows")) as running:
        yield running


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


def _input_specs(info: dict) -> list[tuple[str, list, bool]]:
    order = info.get("input_order", {})
    specs = []
    for section, required in (("required", True), ("optional", False)):
        inputs = info["input"].get(section, {})
        for name in order.get(section, list(inputs)):
            specs.append((name, inputs[name], required))
    return specs


def _is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _check_value(where: str, spec: list, value: Any) -> None:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        assert value in choices, f"{where}: {value!r} is not one of {choices[:20]}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an integer"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not text"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    if kind in ("INT", "FLOAT"):
        assert options.get("min", -float("inf")) <= value <= options.get("max", float("inf")), \
            f"{where}: {value} outside [{options.get('min')}, {options.get('max')}]"


def to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """UI format -> API format, validating every node, input, value and link on the way."""
    links = {link[0]: link for link in workflow["links"]}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        assert kind in object_info, f"node type {kind} is not registered on the server"
        info = object_info[kind]
        known = {name for name, _, _ in _input_specs(info)}
        for port in node.get("inputs", []):
            assert port["name"] in known, f"{kind} #{node['id']} has no input {port['name']!r}"
        linked = {p["name"]: p["link"] for p in node.get("inputs", []) if p.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs: dict[str, Any] = {}
        for name, spec, required in _input_specs(info):
            where = f"{kind} #{node['id']}.{name}"
            if _is_widget(spec):
                if not values and not required:
                    continue  # an optional widget the workflow predates: the frontend fills its default
                assert values, f"{where}: no widget value left (widgets_values too short or out of order)"
                value = values.pop(0)
                if (spec[1] if len(spec) > 1 else {}).get("control_after_generate"):
                    control = values.pop(0)
                    assert control in ("fixed", "increment", "decrement", "randomize"), f"{where}: {control!r}"
                if name not in linked:
                    _check_value(where, spec, value)
                    inputs[name] = value
            if name in linked:
                link = links[linked[name]]
                origin = nodes[link[1]]
                out_type = object_info[origin["type"]]["output"][link[2]]
                want = spec[0] if not isinstance(spec[0], list) else "COMBO"
                assert want in ("*", out_type), f"{where}: a {out_type} is linked to a {want} input"
                inputs[name] = [str(link[1]), link[2]]
            elif required:
                assert name in inputs, f"{where}: required input is missing"
        assert not values, f"{kind} #{node['id']}: unused widget values {values}"
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


SAMPLERS = {"KSampler", "KSamplerAdvanced"}


def cached_samplers(prompt: dict[str, dict]) -> set[str]:
    """Samplers whose model comes from Apply Block Cache."""
    return {i for i, n in prompt.items() if n["class_type"] in SAMPLERS
            and prompt[n["inputs"]["model"][0]]["class_type"] == "BlockCacheApply"}


def sampler_of(prompt: dict[str, dict], node_id: str) -> str | None:
    """The sampler upstream of a node, following its image/latent links (decode, scale, ...); None if
    the picture comes from elsewhere (e.g. Calibrate Block Cache's loss curve)."""
    while prompt[node_id]["class_type"] not in SAMPLERS:
        upstream = [v[0] for k, v in prompt[node_id]["inputs"].items() if k in ("images", "image", "samples")]
        if not upstream:
            return None
        node_id = upstream[0]
    return node_id


def test_every_workflow_has_a_thumbnail_and_is_ui_format():
    names = {path.stem for path in WORKFLOWS}
    assert {"block_cache_sd15_txt2img", "block_cache_sdxl_txt2img", "block_cache_apply_saved_schedule",
            "block_cache_demo_model_no_checkpoint"} <= names
    for path in WORKFLOWS:
        # frontend 1.32 asks /api/workflow_templates/<pack>/<name>.jpg for a custom node's template
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no thumbnail {path.stem}.jpg"
        workflow = json.loads(path.read_text())
        assert {"nodes", "links", "version", "last_node_id", "last_link_id"} <= set(workflow), path.name
        ids = [node["id"] for node in workflow["nodes"]]
        assert len(ids) == len(set(ids)) and max(ids) <= workflow["last_node_id"]
        for link_id, origin, slot, target, port, kind in workflow["links"]:
            source = next(n for n in workflow["nodes"] if n["id"] == origin)
            dest = next(n for n in workflow["nodes"] if n["id"] == target)
            assert link_id in source["outputs"][slot]["links"] and dest["inputs"][port]["link"] == link_id
            assert source["outputs"][slot]["type"] == dest["inputs"][port]["type"] == kind


def test_the_server_lists_the_workflows_as_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates["block_cache"]) == sorted(path.stem for path in WORKFLOWS)
    with urllib.request.urlopen(
            f"{server.url}/api/workflow_templates/block_cache/{WORKFLOWS[0].stem}.jpg", timeout=30) as response:
        assert response.read(3) == b"\xff\xd8\xff"  # a JPEG


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid_against_object_info(path: Path, object_info):
    prompt = to_api(json.loads(path.read_text()), object_info)
    assert any(node["class_type"].startswith("BlockCache") for node in prompt.values())


def test_the_bundled_schedule_is_offered(object_info):
    choices = object_info["BlockCacheLoadSchedule"]["input"]["required"]["schedule_file"]
    options = choices[0] if isinstance(choices[0], list) else choices[1]["options"]
    # The default-built schedule, and the one earlier versions shipped (saved workflows still load it).
    assert {"reference_euler20_speedup2.25.json", "reference_euler20_attention_t0.5.json"} <= set(options)


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if p.stem in RUNNABLE], ids=lambda p: p.stem)
def test_runnable_workflows_run(path: Path, server, object_info):
    prompt = to_api(json.loads(path.read_text()), object_info)
    for node in prompt.values():  # the same graph, shorter (a schedule is re-timed to other step counts)
        inputs = node["inputs"]
        if "steps" in inputs:
            for bound in ("start_at_step", "end_at_step"):  # a segment keeps its share of the steps
                if bound in inputs and inputs[bound] < inputs["steps"]:
                    inputs[bound] = inputs[bound] * SHORT_STEPS // inputs["steps"]
            inputs["steps"] = SHORT_STEPS
    queued = server.post("/prompt", {"prompt": prompt})
    outputs = server.wait_for(queued["prompt_id"])
    # The uncached branch may come from the server's cache (the other workflow ran it): not re-reported.
    cached_preview = next(i for i, n in prompt.items() if n["class_type"] == "PreviewImage"
                          and sampler_of(prompt, i) in cached_samplers(prompt))
    assert outputs[cached_preview]["images"], outputs
    assert "Block Cache: computed" in server.log()
    # Compare Pictures measured the cached picture against the uncached one (on the node, and logged).
    compare = next(i for i, n in prompt.items() if n["class_type"] == "BlockCacheComparePictures")
    assert sampler_of(prompt, prompt[compare]["inputs"]["cached"][0]) in cached_samplers(prompt)
    if compare in outputs:  # absent where the server reused the node's cached result
        assert "picture 1: PSNR" in outputs[compare]["text"][0], outputs[compare]
    assert "Compare Pictures: cached against uncached, picture 1: PSNR" in server.log()
    calibrations = [i for i, n in prompt.items() if n["class_type"] == "BlockCacheCalibrate"]
    for node_id in calibrations:  # the loss curve is shown, and the saved schedule has its parameters beside it
        curve = next(i for i, n in prompt.items() if n["class_type"] == "PreviewImage"
                     and n["inputs"]["images"][0] == node_id)
        assert outputs[curve]["images"], outputs
        assert "Calibrate Block Cache:" in server.log()
        saved = server.base / "user" / "block_cache"
        assert (saved / "reference_calibrated.json").is_file()
        assert (saved / "reference_calibrated.scale_shift.safetensors").is_file()
