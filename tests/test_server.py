"""A real ComfyUI server (main.py --cpu) with this pack in custom_nodes, driven over HTTP."""

from __future__ import annotations

import json

import pytest
from comfy_server import comfy_server

NODE_IDS = ["BlockCacheProfile", "BlockCacheProfileAdvanced", "BlockCacheBuildTargetSchedule", "BlockCacheBuildSchedule",
            "BlockCacheApply", "BlockCacheSaveSchedule", "BlockCacheLoadSchedule", "BlockCacheComparePictures"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with comfy_server(tmp_path_factory.mktemp("comfy_base")) as running:
        yield running


def test_object_info_lists_the_nodes_with_tooltips(server):
    info = server.get("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} not registered"
    profile_inputs = info["BlockCacheProfile"]["input"]["required"]
    assert list(profile_inputs) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                    "negative", "latent_image", "denoise"]
    assert info["BlockCacheProfile"]["output"] == ["LATENT", "BLOCK_PROFILE", "IMAGE"]
    # The KSamplerAdvanced twin: its inputs in KSamplerAdvanced's order, then the VAE and the earlier segment.
    advanced = info["BlockCacheProfileAdvanced"]["input"]
    assert list(advanced["required"]) == list(info["KSamplerAdvanced"]["input"]["required"])
    assert list(advanced["optional"]) == ["vae", "earlier_segment"]
    assert info["BlockCacheProfileAdvanced"]["output"] == ["LATENT", "BLOCK_PROFILE", "IMAGE"]
    # The target builder's fourth output is the step count to sample with (fewer steps when they win).
    assert info["BlockCacheBuildTargetSchedule"]["output"] == ["CACHE_SCHEDULE", "IMAGE", "STRING", "INT"]
    assert info["BlockCacheBuildSchedule"]["output"] == ["CACHE_SCHEDULE", "IMAGE", "STRING"]
    target_inputs = info["BlockCacheBuildTargetSchedule"]["input"]["required"]
    # The speed-up is the first control, a slider; the threshold rule keeps its old inputs for saved workflows.
    assert list(target_inputs)[:2] == ["profile", "speedup"] and target_inputs["speedup"][1]["display"] == "slider"
    assert info["BlockCacheBuildTargetSchedule"]["display_name"] == "Build Cache Schedule"
    threshold_inputs = info["BlockCacheBuildSchedule"]["input"]["required"]
    assert list(threshold_inputs) == ["profile", "threshold", "cache_kinds", "always_compute_first",
                                      "always_compute_last", "max_consecutive_reuse"]
    assert info["BlockCacheApply"]["output"] == ["MODEL"]
    assert info["BlockCacheSaveSchedule"]["output_node"] is True
    for node_id in NODE_IDS:
        inputs = {**info[node_id]["input"]["required"], **info[node_id]["input"].get("optional", {})}
        for name, spec in inputs.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info[node_id].get("output_tooltips") or [True])


def test_the_web_folder_is_served_once(server):
    """Registered by WEB_DIRECTORY alone: each script is listed once, so the extension registers once."""
    scripts = [url for url in server.get("/extensions") if url.endswith(("/block_cache.js", "/schedule_builder.js"))]
    assert sorted(scripts) == ["/extensions/block_cache/block_cache.js", "/extensions/block_cache/schedule_builder.js"]


def _graph(steps: int, schedule_source: dict) -> dict:
    graph = {
        "model": {"class_type": "BlockCacheDemoModel",
                  "inputs": {"size": "tiny", "weight_seed": 0, "positive_prompt": "a circle", "negative_prompt": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "apply": {"class_type": "BlockCacheApply", "inputs": {"model": ["model", 0], "schedule": ["schedule", 0]}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "seed": 1, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["model", 1], "negative": ["model", 2], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "save_latent": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                               "filename_prefix": "block_cache_test"}},
    }
    graph.update(schedule_source)
    return graph


def test_profile_build_apply_sample_then_load(server):
    source = {
        "profile": {"class_type": "BlockCacheProfile", "inputs": {
            "model": ["model", 0], "seed": 1, "steps": 10, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["model", 1], "negative": ["model", 2], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "schedule": {"class_type": "BlockCacheBuildTargetSchedule", "inputs": {
            "profile": ["profile", 1], "speedup": 2.0, "forecast_order": "auto", "cache_kinds": "all",
            "always_compute_first": 1, "always_compute_last": 0, "max_consecutive_reuse": 0,
            "validation": "measure PSNR"}},
        "save": {"class_type": "BlockCacheSaveSchedule", "inputs": {"schedule": ["schedule", 0],
                                                                  "file_name": "server test", "overwrite": True}},
    }
    queued = server.post("/prompt", {"prompt": _graph(10, source)})
    outputs = server.wait_for(queued["prompt_id"], timeout=300)
    # The nodes draw their pictures in the browser from these payloads (js/block_cache.js).
    text = outputs["schedule"]["text"][0]
    assert outputs["schedule"]["block_cache_schedule"] and "estimated speed-up" in text and "uncached steps" in text
    assert "chosen: " in text and "dB against uncached" in text  # validated on the profiled run
    assert outputs["schedule"]["block_cache_ladder"] and outputs["profile"]["block_cache_profile"]
    assert "saved server test.json" in outputs["save"]["text"][0]
    assert outputs["save_latent"]["latents"]
    saved = server.base / "user" / "block_cache" / "server test.json"
    assert json.loads(saved.read_text())["format"] == "block-cache-schedule"
    log = server.log()
    assert "Block Cache: computed" in log and "skipped" in log

    # A later graph needs no profiling: the saved file is offered by Load Cache Schedule.
    options = server.get("/object_info/BlockCacheLoadSchedule")["BlockCacheLoadSchedule"]["input"]["required"]
    assert "server test.json" in options["schedule_file"][1]["options"]
    load = {"schedule": {"class_type": "BlockCacheLoadSchedule", "inputs": {"schedule_file": "server test.json"}}}
    queued = server.post("/prompt", {"prompt": _graph(15, load)})
    outputs = server.wait_for(queued["prompt_id"], timeout=300)
    assert outputs["save_latent"]["latents"] and "estimated speed-up" in outputs["schedule"]["text"][0]
    assert "re-timed onto this run's 15 steps" in server.log()


def test_two_segments_profiled_built_and_cached_through_the_executor(server):
    """The Wan 2.2 workflow's wiring with the tiny demo model: two Profile Block Changes (Advanced) segments, the
    later one given the earlier one's profile, each segment's schedule built with validation, applied, and the
    cached pair sampled by KSamplerAdvanced."""
    steps, split = 8, 3

    def segment(node_type: str, model: list, latent: list, first: bool) -> dict:
        return {"class_type": node_type, "inputs": {
            "model": model, "add_noise": "enable" if first else "disable", "noise_seed": 1, "steps": steps,
            "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "positive": ["model", 1],
            "negative": ["model", 2], "latent_image": latent, "start_at_step": 0 if first else split,
            "end_at_step": split if first else 10000, "return_with_leftover_noise": "enable" if first else "disable"}}

    graph = {key: node for key, node in _graph(steps, {}).items() if key in ("model", "latent")}
    graph["high"] = segment("BlockCacheProfileAdvanced", ["model", 0], ["latent", 0], True)
    graph["low"] = segment("BlockCacheProfileAdvanced", ["model", 0], ["high", 0], False)
    graph["low"]["inputs"]["earlier_segment"] = ["high", 1]
    for name in ("high", "low"):
        graph[f"build_{name}"] = {"class_type": "BlockCacheBuildTargetSchedule", "inputs": {
            "profile": [name, 1], "speedup": 2.0, "forecast_order": "auto", "cache_kinds": "all",
            "always_compute_first": 1, "always_compute_last": 0, "max_consecutive_reuse": 0,
            "validation": "measure PSNR"}}
        graph[f"apply_{name}"] = {"class_type": "BlockCacheApply", "inputs": {
            "model": ["model", 0], "schedule": [f"build_{name}", 0]}}
    graph["cached_high"] = segment("KSamplerAdvanced", ["apply_high", 0], ["latent", 0], True)
    graph["cached_low"] = segment("KSamplerAdvanced", ["apply_low", 0], ["cached_high", 0], False)
    graph["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["cached_low", 0],
                                                                   "filename_prefix": "block_cache_segments"}}
    queued = server.post("/prompt", {"prompt": graph})
    outputs = server.wait_for(queued["prompt_id"], timeout=300)
    assert outputs["save_latent"]["latents"]
    for name, segment_steps in (("high", split), ("low", steps - split)):
        assert f"x {segment_steps} steps" in outputs[name]["text"][0]
        text = outputs[f"build_{name}"]["text"][0]
        assert "chosen: " in text and "fewer steps were not compared: this profile is of a segment" in text, text
        assert "validation read the profiled run itself" not in text, "the low segment has its earlier segment"
    assert "Block Cache: computed" in server.log()


def test_the_reference_model_samples_an_empty_latent_image_at_its_own_size(server):
    """An EmptyLatentImage is sampled at 1/8 of its size on every host, as the workflows expect (256x256 -> the
    reference models' 32x32 pixels). ComfyUI 0.33 resizes an empty latent to the model's spacial_downscale_ratio:
    with the pixel-space ratio of 1 the workflows' 256x256 was sampled at 256x256 pixels, 64 times the work
    (150-250 s a step on a CPU; demo_models/reference_model.pixel_latent_format). 64x64 keeps a regression quick."""
    from safetensors.torch import load_file

    for size in ("reference", "reference_dit"):
        graph = _graph(1, {})
        graph["model"]["inputs"]["size"] = size
        graph["latent"]["inputs"].update(width=64, height=64)
        graph["sample"]["inputs"]["model"] = ["model", 0]
        del graph["apply"]
        graph["save_latent"]["inputs"]["filename_prefix"] = f"empty_{size}"
        queued = server.post("/prompt", {"prompt": graph})
        outputs = server.wait_for(queued["prompt_id"], timeout=120)
        saved = outputs["save_latent"]["latents"][0]
        latent = load_file(server.base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]
        assert tuple(latent.shape) == (1, 3, 8, 8), (size, tuple(latent.shape))
