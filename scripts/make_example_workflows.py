"""Writes the example workflows (UI format) into example_workflows/, and the bundled schedule.

    .venv/bin/python scripts/make_example_workflows.py             # the workflow JSON files
    .venv/bin/python scripts/make_example_workflows.py --schedule  # also re-profile the bundled schedule

The graphs are generated rather than hand-edited so that their links, ids and widget orders stay
consistent; tests/test_workflows.py converts each to API format and validates it against a
running server's /object_info. Thumbnails (same name, .jpg, as ComfyUI's template browser wants)
are screenshots taken by tests/test_browser.py (`make thumbnails`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"
BUNDLED = ROOT / "schedules"
BUNDLED_SCHEDULE = "reference_euler20_speedup2.25.json"
# The demo examples run the trained reference model (32x32 pixels) with this setting.
DEMO_PROMPT = "a large red circle at center on a blue striped background"
DEMO_STEPS, DEMO_CFG, DEMO_SEED = 20, 5.0, 1
APPLY_WIDGETS = ["model device"]  # cache_device
PROFILE_KEY = "block_cache_profile"  # node.properties keys of js/block_cache.js
SCHEDULE_KEY = "block_cache_schedule"
LADDER_KEY = "block_cache_ladder"
BUILD = "BlockCacheBuildTargetSchedule"
# Build Cache Schedule's defaults: speedup, forecast_order, cache_kinds, first, last, max_consecutive_reuse,
# validation, min_psnr, fewer_steps, lookahead.
BUILD_WIDGETS = [2.25, "auto", "all", 1, 0, 0, "measure PSNR", 30.0, "compare", "use when better"]
DEMO = "block_cache_demo_model_no_checkpoint"
# The transformer reference model (a trained Flux) samples as Flux workflows do: euler/simple.
DIT_DEMO = "block_cache_demo_dit_no_checkpoint"
DIT_SCHEDULER, DIT_CFG = "simple", 5.0
# The video reference model (a trained Wan 2.1) samples as Wan workflows do: euler/simple, 30 steps.
VIDEO_DEMO = "block_cache_demo_video_no_checkpoint"
VIDEO_STEPS = 30
VIDEO_SPLIT = 15  # the two-expert demo: the high-noise segment samples steps 0-14, the low-noise one 15-29
VIDEO_PROMPT = "a large red circle at left moving right on a blue striped background"

# Socket inputs and outputs of the node types the examples use: (name, type).
SOCKETS: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "PreviewImage": ([("images", "IMAGE")], []),
    "ImageScale": ([("image", "IMAGE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "SaveLatent": ([("samples", "LATENT")], []),
    "MarkdownNote": ([], []),
    "UNETLoader": ([], [("MODEL", "MODEL")]),
    "DualCLIPLoader": ([], [("CLIP", "CLIP")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")]),
    "BlockCacheDemoModel": ([], [("MODEL", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("VAE", "VAE")]),
    "BlockCacheProfile": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                           ("latent_image", "LATENT"), ("vae", "VAE")],
                          [("LATENT", "LATENT"), ("profile", "BLOCK_PROFILE"), ("heatmap", "IMAGE")]),
    BUILD: ([("profile", "BLOCK_PROFILE")],
            [("schedule", "CACHE_SCHEDULE"), ("schedule_image", "IMAGE"), ("json", "STRING"), ("steps", "INT")]),
    "BlockCacheApply": ([("model", "MODEL"), ("schedule", "CACHE_SCHEDULE")], [("MODEL", "MODEL")]),
    "BlockCacheSaveSchedule": ([("schedule", "CACHE_SCHEDULE")], []),
    "BlockCacheLoadSchedule": ([], [("schedule", "CACHE_SCHEDULE")]),
    "BlockCacheCalibrate": ([("model", "MODEL"), ("schedule", "CACHE_SCHEDULE"), ("positive", "CONDITIONING"),
                             ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
                            [("schedule", "CACHE_SCHEDULE"), ("loss_curve", "IMAGE")]),
    "BlockCacheFasterDiffusionSchedule": ([("model", "MODEL"), ("profile", "BLOCK_PROFILE")],
                                          [("schedule", "CACHE_SCHEDULE"), ("schedule_image", "IMAGE"),
                                           ("json", "STRING")]),
    "CLIPLoader": ([], [("CLIP", "CLIP")]),
    "ModelSamplingSD3": ([("model", "MODEL")], [("MODEL", "MODEL")]),
    "EmptyHunyuanLatentVideo": ([], [("LATENT", "LATENT")]),
    "KSamplerAdvanced": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "BlockCacheProfileAdvanced": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                   ("latent_image", "LATENT"), ("vae", "VAE"), ("earlier_segment", "BLOCK_PROFILE")],
                                  [("LATENT", "LATENT"), ("profile", "BLOCK_PROFILE"), ("heatmap", "IMAGE")]),
    "BlockCacheComparePictures": ([("uncached", "IMAGE"), ("cached", "IMAGE")],
                                  [("difference", "IMAGE"), ("mean_psnr", "FLOAT"), ("mean_ssim", "FLOAT")]),
}


@dataclass
class Graph:
    nodes: list[dict[str, Any]] = field(default_factory=list)
    links: list[list[Any]] = field(default_factory=list)

    def add(self, node_type: str, pos: tuple[int, int], widgets: list[Any], size: tuple[int, int] = (320, 130),
            title: str | None = None, colour: str | None = None) -> int:
        inputs, outputs = SOCKETS[node_type]
        node_id = len(self.nodes) + 1
        node: dict[str, Any] = {
            "id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
            "order": node_id - 1, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node_type}, "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        if colour:
            node["color"], node["bgcolor"] = colour, colour
        self.nodes.append(node)
        return node_id

    def link(self, source: int, slot: int, target: int, input_name: str) -> None:
        link_id = len(self.links) + 1
        src, dst = self.nodes[source - 1], self.nodes[target - 1]
        port = next(i for i, p in enumerate(dst["inputs"]) if p["name"] == input_name)
        kind = src["outputs"][slot]["type"]
        assert dst["inputs"][port]["type"] == kind, (src["type"], dst["type"], input_name)
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][port]["link"] = link_id
        self.links.append([link_id, source, slot, target, port, kind])

    def to_json(self) -> dict[str, Any]:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4}


CACHED = "#2a4a2a"  # green-ish: the cached branch
NOTE_W = 380
DIFFERENCE_GAIN = 8.0  # Compare Pictures' default


def _compare(g: Graph, uncached: int, cached: int, pos: tuple[int, int]) -> int:
    """Compare Pictures on the two decoded pictures (PSNR and SSIM shown on it); returns its id."""
    compare = g.add("BlockCacheComparePictures", pos, [DIFFERENCE_GAIN], (360, 200), colour=CACHED)
    g.link(uncached, 0, compare, "uncached")
    g.link(cached, 0, compare, "cached")
    return compare


def _txt2img(ckpt: str, size: int, steps: int, cfg: float, note: str, schedule_name: str) -> dict[str, Any]:
    """Checkpoint -> profile -> build -> apply -> KSampler, beside an uncached KSampler."""
    g = Graph()
    ckpt_id = g.add("CheckpointLoaderSimple", (0, 120), [ckpt], (300, 100))
    pos = g.add("CLIPTextEncode", (0, 280), ["a photograph of a lighthouse on a cliff at sunset, detailed"],
                (300, 140), title="positive")
    neg = g.add("CLIPTextEncode", (0, 460), ["blurry, low quality"], (300, 110), title="negative")
    latent = g.add("EmptyLatentImage", (0, 610), [size, size, 1], (300, 110))
    note_id = g.add("MarkdownNote", (0, -200), [note], (NOTE_W * 2, 280))
    del note_id
    profile = g.add("BlockCacheProfile", (340, 120), [1, "fixed", steps, cfg, "euler", "normal", 1.0], (380, 520))
    build = g.add(BUILD, (760, 120), list(BUILD_WIDGETS), (460, 520), colour=CACHED)
    save = g.add("BlockCacheSaveSchedule", (760, 680), [schedule_name, True], (460, 120))
    apply = g.add("BlockCacheApply", (1260, 120), APPLY_WIDGETS, (440, 180), colour=CACHED)
    cached = g.add("KSampler", (1260, 340), [1, "fixed", steps, cfg, "euler", "normal", 1.0], (300, 262),
                   title="KSampler (cached)", colour=CACHED)
    uncached = g.add("KSampler", (1260, 640), [1, "fixed", steps, cfg, "euler", "normal", 1.0], (300, 262),
                     title="KSampler (uncached)")
    dec_c = g.add("VAEDecode", (1600, 340), [], (200, 50))
    dec_u = g.add("VAEDecode", (1600, 640), [], (200, 50))
    prev_c = g.add("PreviewImage", (1840, 120), [], (360, 400), title="cached", colour=CACHED)
    prev_u = g.add("PreviewImage", (2220, 120), [], (360, 400), title="uncached")
    g.link(ckpt_id, 1, pos, "clip")
    g.link(ckpt_id, 1, neg, "clip")
    for sampler in (profile, cached, uncached):
        g.link(pos, 0, sampler, "positive")
        g.link(neg, 0, sampler, "negative")
        g.link(latent, 0, sampler, "latent_image")
    g.link(ckpt_id, 0, profile, "model")
    g.link(ckpt_id, 2, profile, "vae")
    g.link(ckpt_id, 0, apply, "model")
    g.link(ckpt_id, 0, uncached, "model")
    g.link(profile, 1, build, "profile")
    g.link(build, 0, apply, "schedule")
    g.link(build, 0, save, "schedule")
    g.link(apply, 0, cached, "model")
    g.link(cached, 0, dec_c, "samples")
    g.link(uncached, 0, dec_u, "samples")
    g.link(ckpt_id, 2, dec_c, "vae")
    g.link(ckpt_id, 2, dec_u, "vae")
    g.link(dec_c, 0, prev_c, "images")
    g.link(dec_u, 0, prev_u, "images")
    compare = _compare(g, dec_u, dec_c, (1840, 560))
    g.link(compare, 0, g.add("PreviewImage", (2220, 560), [], (360, 400), title="difference"), "images")
    return g.to_json()


_TUNE = ("Move **speedup** on *Build Cache Schedule*: the schedule picture, the FLOP speed-up and its cost in "
         "uncached steps update at once, without queueing. The default, 2.25x, kept the picture at 30+ dB PSNR "
         "against the uncached one on the pack's reference model; higher changes it more. Queue to sample with "
         "it: *Apply Block Cache* then shows how many layer evaluations were computed and the time saved "
         "against the uncached KSampler.")


def sd15() -> dict[str, Any]:
    note = ("## Block Cache: SD1.5 txt2img\n\n*Profile Block Changes* samples once like KSampler and measures how "
            "much every layer changes per step; *Build Cache Schedule* turns that into a schedule; *Apply Block "
            f"Cache* makes the model reuse cached layers.\n\n{_TUNE}\n\nPut an SD1.5 checkpoint in "
            "`models/checkpoints` and pick it in the loader. The schedule is also saved for later graphs "
            "(*Load Cache Schedule*), which then need no profiling.")
    return _txt2img("v1-5-pruned-emaonly-fp16.safetensors", 512, 20, 7.0, note, "sd15_euler20")


def sdxl() -> dict[str, Any]:
    note = ("## Block Cache: SDXL txt2img\n\nThe same chain as the SD1.5 example on an SDXL base checkpoint "
            f"(1024x1024).\n\n{_TUNE}\n\nPut `sd_xl_base_1.0.safetensors` in `models/checkpoints`.")
    return _txt2img("sd_xl_base_1.0.safetensors", 1024, 20, 7.0, note, "sdxl_euler20")


def _side_by_side(g: Graph, model: int, apply: int, positive: int, negative: int, latent: int, vae: tuple[int, int],
                  sampler: list[Any], x: int) -> None:
    """A cached and an uncached KSampler at column ``x``, decoded and previewed side by side."""
    cached = g.add("KSampler", (x, 340), sampler, (300, 262), title="KSampler (cached)", colour=CACHED)
    uncached = g.add("KSampler", (x, 640), list(sampler), (300, 262), title="KSampler (uncached)")
    for node in (cached, uncached):
        g.link(positive, 0, node, "positive")
        g.link(negative, 0, node, "negative")
        g.link(latent, 0, node, "latent_image")
    g.link(apply, 0, cached, "model")
    g.link(model, 0, uncached, "model")
    _decode_and_compare(g, (cached, 0), (uncached, 0), vae, x)


def _decode_and_compare(g: Graph, cached: tuple[int, int], uncached: tuple[int, int], vae: tuple[int, int], x: int,
                        cached_y: int = 340) -> None:
    """The cached and the uncached latents decoded and previewed side by side, with Compare Pictures and
    its difference map, right of column ``x``."""
    decodes = (g.add("VAEDecode", (x + 340, cached_y), [], (200, 50)), g.add("VAEDecode", (x + 340, 640), [], (200, 50)))
    previews = (g.add("PreviewImage", (x + 580, 120), [], (360, 400), title="cached", colour=CACHED),
                g.add("PreviewImage", (x + 960, 120), [], (360, 400), title="uncached"))
    for source, decode, preview in zip((cached, uncached), decodes, previews, strict=True):
        g.link(*source, decode, "samples")
        g.link(*vae, decode, "vae")
        g.link(decode, 0, preview, "images")
    compare = _compare(g, decodes[1], decodes[0], (x + 580, 560))
    g.link(compare, 0, g.add("PreviewImage", (x + 960, 560), [], (360, 400), title="difference"), "images")


FLUX_STEPS = 20


def flux() -> dict[str, Any]:
    """Flux dev from the core loaders: profile -> build -> apply -> KSampler, beside an uncached KSampler."""
    g = Graph()
    note = ("## Block Cache: Flux dev txt2img\n\nThe same chain as the SD1.5 example on Flux dev, loaded with "
            "the core loaders: *Profile Block Changes* measures how much every double and single block changes "
            "per step, *Build Cache Schedule* turns that into a schedule and *Apply Block Cache* makes the model "
            f"reuse cached blocks. Flux is guidance-distilled: cfg 1.0, the guidance is on *FluxGuidance*, and "
            f"the negative is the zeroed positive (ignored at cfg 1.0).\n\n{_TUNE}\n\nPut "
            "`flux1-dev.safetensors` in `models/diffusion_models`, `clip_l.safetensors` and "
            "`t5xxl_fp16.safetensors` in `models/text_encoders`, `ae.safetensors` in `models/vae`.")
    g.add("MarkdownNote", (0, -260), [note], (NOTE_W * 2, 340))
    unet = g.add("UNETLoader", (0, 120), ["flux1-dev.safetensors", "default"], (300, 90))
    clip = g.add("DualCLIPLoader", (0, 240), ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"],
                 (300, 130))
    vae = g.add("VAELoader", (0, 400), ["ae.safetensors"], (300, 60))
    text = g.add("CLIPTextEncode", (0, 490), ["a photograph of a lighthouse on a cliff at sunset, detailed"],
                 (300, 140), title="positive")
    guidance = g.add("FluxGuidance", (0, 660), [3.5], (300, 60))
    negative = g.add("ConditioningZeroOut", (0, 750), [], (300, 30), title="negative (zeroed)")
    latent = g.add("EmptySD3LatentImage", (0, 820), [1024, 1024, 1], (300, 110))
    sampler = [1, "fixed", FLUX_STEPS, 1.0, "euler", "simple", 1.0]
    profile = g.add("BlockCacheProfile", (340, 120), list(sampler), (380, 520))
    build = g.add(BUILD, (760, 120), list(BUILD_WIDGETS), (460, 520), colour=CACHED)
    save = g.add("BlockCacheSaveSchedule", (760, 680), ["flux_dev_euler20", True], (460, 120))
    apply = g.add("BlockCacheApply", (1260, 120), APPLY_WIDGETS, (440, 180), colour=CACHED)
    g.link(clip, 0, text, "clip")
    g.link(text, 0, guidance, "conditioning")
    g.link(text, 0, negative, "conditioning")
    g.link(unet, 0, profile, "model")
    g.link(guidance, 0, profile, "positive")
    g.link(negative, 0, profile, "negative")
    g.link(latent, 0, profile, "latent_image")
    g.link(vae, 0, profile, "vae")
    g.link(profile, 1, build, "profile")
    g.link(build, 0, save, "schedule")
    g.link(unet, 0, apply, "model")
    g.link(build, 0, apply, "schedule")
    _side_by_side(g, unet, apply, guidance, negative, latent, (vae, 0), sampler, 1260)
    return g.to_json()


WAN22_STEPS = 20
WAN22_SPLIT = 10  # the high-noise expert samples steps 0-9, the low-noise expert 10-19


def wan22() -> dict[str, Any]:
    """Wan 2.2 14B text-to-video: two experts in two KSamplerAdvanced segments, each profiled, scheduled (and
    measured) and cached on its own segment, beside the uncached pair."""
    g = Graph()
    note = ("## Block Cache: Wan 2.2 (two experts)\n\nWan 2.2 14B runs a high-noise expert for the first "
            f"steps and a low-noise expert for the rest, as two *KSamplerAdvanced* segments (steps 0-{WAN22_SPLIT} "
            f"and {WAN22_SPLIT}-{WAN22_STEPS}). *Profile Block Changes (Advanced)* samples each segment as "
            "KSamplerAdvanced does and profiles it; *Build Cache Schedule* builds each expert a schedule for its "
            "own segment and measures it by sampling that segment again with other seeds (the low-noise segment "
            "through the high-noise one: its *earlier_segment* input). The profiled pair is the uncached run, so "
            "*Compare Pictures* shows what the cache costs, frame by frame. Under another sampler, *Record Block "
            "Changes* and *Collect Block Profile* profile a segment too, without the measurement.\n\n"
            f"{_TUNE}\n\nPut `wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors` and "
            "`wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors` in `models/diffusion_models`, "
            "`umt5_xxl_fp8_e4m3fn_scaled.safetensors` in `models/text_encoders`, `wan_2.1_vae.safetensors` in "
            "`models/vae`.")
    g.add("MarkdownNote", (0, -300), [note], (NOTE_W * 2, 420))
    clip = g.add("CLIPLoader", (0, 120), ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], (300, 110))
    vae = g.add("VAELoader", (0, 260), ["wan_2.1_vae.safetensors"], (300, 60))
    positive = g.add("CLIPTextEncode", (0, 350), ["a red fox running through fresh snow at dawn, cinematic"],
                     (300, 140), title="positive")
    negative = g.add("CLIPTextEncode", (0, 520), ["blurry, static, low quality"], (300, 140), title="negative")
    latent = g.add("EmptyHunyuanLatentVideo", (0, 690), [832, 480, 81, 1], (300, 130))
    for node in (positive, negative):
        g.link(clip, 0, node, "clip")
    experts = {}
    for row, (name, file) in enumerate((("high", "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
                                        ("low", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"))):
        y = 120 + row * 520
        unet = g.add("UNETLoader", (340, y), [file, "default"], (320, 90), title=f"{name}-noise expert")
        shift = g.add("ModelSamplingSD3", (340, y + 130), [8.0], (320, 60))
        g.link(unet, 0, shift, "model")
        experts[name] = shift

    low_cached, low_run = _two_experts(g, (experts["high"], 0), (experts["low"], 0), (positive, 0), (negative, 0),
                                       (latent, 0), (vae, 0), [42, "fixed", WAN22_STEPS, 3.5, "euler", "simple"],
                                       WAN22_SPLIT)
    _decode_and_compare(g, (low_cached, 0), (low_run, 0), (vae, 0), 2380, cached_y=500)
    return g.to_json()


def _two_experts(g: Graph, high: tuple[int, int], low: tuple[int, int], positive: tuple[int, int],
                 negative: tuple[int, int], latent: tuple[int, int], vae: tuple[int, int], sampling: list[Any],
                 split: int) -> tuple[int, int]:
    """Two KSamplerAdvanced segments, profiled (the uncached run), each expert's schedule built and applied,
    and the cached pair; ``sampling`` is KSamplerAdvanced's seed, control, steps, cfg, sampler and scheduler.
    Returns the cached and the profiled low-noise segments."""

    def segment(node_type: str, model: tuple[int, int], source: tuple[int, int], first: bool, pos: tuple[int, int],
                title: str, colour: str | None = None) -> int:
        widgets = ["enable" if first else "disable", *sampling, 0 if first else split, split if first else 10000,
                   "enable" if first else "disable"]
        node = g.add(node_type, pos, widgets, (300, 360), title=title, colour=colour)
        g.link(*model, node, "model")
        g.link(*positive, node, "positive")
        g.link(*negative, node, "negative")
        g.link(*source, node, "latent_image")
        return node

    # The profiled (uncached) run: the high-noise segment, then the low-noise one from its latent.
    high_run = segment("BlockCacheProfileAdvanced", high, latent, True, (700, 120), "high-noise segment (profiled)")
    low_run = segment("BlockCacheProfileAdvanced", low, (high_run, 0), False, (700, 640),
                      "low-noise segment (profiled)")
    g.link(high_run, 1, low_run, "earlier_segment")
    g.link(*vae, low_run, "vae")
    # Each expert's schedule, applied to that expert.
    applied = {}
    for row, (name, model, run) in enumerate((("high", high, high_run), ("low", low, low_run))):
        y = 120 + row * 520
        build = g.add(BUILD, (1400, y), list(BUILD_WIDGETS), (460, 460), title=f"Build Cache Schedule ({name})",
                      colour=CACHED)
        apply = g.add("BlockCacheApply", (1900, y), APPLY_WIDGETS, (440, 180), title=f"Apply Block Cache ({name})",
                      colour=CACHED)
        g.link(run, 1, build, "profile")
        g.link(*model, apply, "model")
        g.link(build, 0, apply, "schedule")
        applied[name] = apply
    high_cached = segment("KSamplerAdvanced", (applied["high"], 0), latent, True, (2380, 120),
                          "high-noise segment (cached)", CACHED)
    low_cached = segment("KSamplerAdvanced", (applied["low"], 0), (high_cached, 0), False, (2380, 500),
                         "low-noise segment (cached)", CACHED)
    return low_cached, low_run


def faster_diffusion_sd15() -> dict[str, Any]:
    """SD1.5: Faster Diffusion Schedule (no profiling) -> apply with noise injection -> KSampler."""
    g = Graph()
    note = ("## Block Cache: Faster Diffusion on SD1.5\n\n*Faster Diffusion Schedule* (encoder propagation, "
            "Li et al. 2024) needs no profiling: at its key steps the whole UNet runs, at the others the encoder "
            "(down and middle blocks) is skipped and the decoder reuses the encoder features of the last key "
            "step. 'paper (auto)' takes the paper's DPM-Solver 20-step key steps. *Apply Block Cache* adds the "
            "paper's noise injection (alpha 0.003) and reports the time saved against the uncached KSampler."
            "\n\nPut an SD1.5 checkpoint in `models/checkpoints` and pick it in the loader. Keep *steps*, "
            "*sampler_name* and *scheduler* the same as the KSampler's.")
    g.add("MarkdownNote", (0, -200), [note], (NOTE_W * 2, 280))
    ckpt = g.add("CheckpointLoaderSimple", (0, 120), ["v1-5-pruned-emaonly-fp16.safetensors"], (300, 100))
    pos = g.add("CLIPTextEncode", (0, 280), ["a photograph of a lighthouse on a cliff at sunset, detailed"],
                (300, 140), title="positive")
    neg = g.add("CLIPTextEncode", (0, 460), ["blurry, low quality"], (300, 110), title="negative")
    latent = g.add("EmptyLatentImage", (0, 610), [512, 512, 1], (300, 110))
    steps, sampler_name, scheduler = 20, "dpmpp_2m", "karras"
    schedule = g.add("BlockCacheFasterDiffusionSchedule", (340, 120),
                     [steps, sampler_name, scheduler, "paper (auto)", 5, "0, 1, 2, 3, 5, 10, 15",
                      round(18 / 28, 4), 1.0], (440, 520), colour=CACHED)
    apply = g.add("BlockCacheApply", (820, 120), ["model device", 0.003, 0.5], (400, 200), colour=CACHED)
    g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    g.link(ckpt, 0, schedule, "model")
    g.link(ckpt, 0, apply, "model")
    g.link(schedule, 0, apply, "schedule")
    _side_by_side(g, ckpt, apply, pos, neg, latent, (ckpt, 2),
                  [1, "fixed", steps, 7.0, sampler_name, scheduler, 1.0], 1260)
    return g.to_json()


def _demo_sources(g: Graph, size: str = "reference") -> tuple[int, int]:
    video = size == "reference_video"
    model = g.add("BlockCacheDemoModel", (0, 120), [size, 0, VIDEO_PROMPT if video else DEMO_PROMPT, ""], (320, 190))
    # 256x256 gives the reference models' 32x32 pixel latent (ComfyUI's pixel-space latent format); for the
    # video model, length 29 gives its 8 frames (Wan's 4x frame compression, undone by its latent format).
    latent = (g.add("EmptyHunyuanLatentVideo", (0, 350), [256, 256, 29, 1], (320, 130)) if video
              else g.add("EmptyLatentImage", (0, 350), [256, 256, 1], (320, 110)))
    return model, latent


def _demo_tail(g: Graph, model: int, latent: int, apply: int, x: int, scheduler: str = "normal",
               cfg: float = DEMO_CFG, steps: int = DEMO_STEPS) -> None:
    """A cached and an uncached KSampler, decoded side by side."""
    widgets = [DEMO_SEED, "fixed", steps, cfg, "euler", scheduler, 1.0]
    cached = g.add("KSampler", (x, 120), widgets, (300, 262), title="KSampler (cached)", colour=CACHED)
    uncached = g.add("KSampler", (x, 420), list(widgets), (300, 262), title="KSampler (uncached)")
    for sampler in (cached, uncached):
        g.link(model, 1, sampler, "positive")
        g.link(model, 2, sampler, "negative")
        g.link(latent, 0, sampler, "latent_image")
    g.link(apply, 0, cached, "model")
    g.link(model, 0, uncached, "model")
    decoded = []
    for sampler, y, title in ((cached, 120, "cached"), (uncached, 420, "uncached")):
        decode = g.add("VAEDecode", (x + 330, y), [], (200, 50))
        decoded.append(decode)
        # 32x32 pixels: shown 8x larger, nearest-neighbour, so the pixels stay visible.
        scale = g.add("ImageScale", (x + 330, y + 90), ["nearest-exact", 256, 256, "disabled"], (240, 130))
        preview = g.add("PreviewImage", (x + 600, y), [], (280, 290), title=title,
                        colour=CACHED if sampler == cached else None)
        g.link(sampler, 0, decode, "samples")
        g.link(model, 3, decode, "vae")
        g.link(decode, 0, scale, "image")
        g.link(scale, 0, preview, "images")
    compare = _compare(g, decoded[1], decoded[0], (x + 330, 720))
    scale = g.add("ImageScale", (x + 720, 720), ["nearest-exact", 256, 256, "disabled"], (240, 130))
    preview = g.add("PreviewImage", (x + 990, 720), [], (280, 290), title="difference")
    g.link(compare, 0, scale, "image")
    g.link(scale, 0, preview, "images")


def _demo_profile_and_build(g: Graph, model: int, latent: int, cfg: float = DEMO_CFG,
                            scheduler: str = "normal", steps: int = DEMO_STEPS) -> tuple[int, int]:
    """Profile Block Changes on the demo model's sources, and Build Cache Schedule from its profile."""
    profile_id = g.add("BlockCacheProfile", (350, 120),
                       [DEMO_SEED, "fixed", steps, cfg, "euler", scheduler, 1.0], (360, 520))
    build = g.add(BUILD, (740, 120), list(BUILD_WIDGETS), (420, 520), colour=CACHED)
    for source, port, name in ((model, 0, "model"), (model, 1, "positive"), (model, 2, "negative"),
                               (latent, 0, "latent_image"), (model, 3, "vae")):
        g.link(source, port, profile_id, name)
    g.link(profile_id, 1, build, "profile")
    return profile_id, build


def demo(payloads: dict | None = None) -> dict[str, Any]:
    """Runs anywhere: the built-in demo model, no checkpoint.

    ``payloads`` (the frontend payloads of the bundled schedule's profiling run, which is this graph's
    own setting: the profile and the builder's ladder) are stored in the nodes' properties, so the
    heatmap and the live schedule show as soon as the workflow opens, before anything is queued.
    """
    g = Graph()
    note = ("## Block Cache: built-in model, no checkpoint needed\n\nThe pack's small trained reference model "
            "(ComfyUI's own UNet class in SD1.5's layout, 32x32 pixels, coloured shapes on textured backgrounds) "
            "runs on any machine, on CPU in seconds. The workflow opens with the heatmap and schedule it measured "
            "with these settings; queue it to measure again.\n\n" + _TUNE)
    model, latent = _demo_sources(g)
    g.add("MarkdownNote", (0, -200), [note], (NOTE_W * 2, 260))
    profile_id, build = _demo_profile_and_build(g, model, latent)
    apply = g.add("BlockCacheApply", (1190, 120), APPLY_WIDGETS, (380, 180), colour=CACHED)
    g.link(model, 0, apply, "model")
    g.link(build, 0, apply, "schedule")
    _demo_tail(g, model, latent, apply, 1600)
    if payloads:
        g.nodes[profile_id - 1]["properties"][PROFILE_KEY] = payloads["profile"]
        g.nodes[build - 1]["properties"][LADDER_KEY] = payloads["ladder"]
    return g.to_json()


def _demo_on(size: str, note: str, steps: int = DEMO_STEPS) -> dict[str, Any]:
    """A no-checkpoint demo on one of the built-in flow-matching reference models (euler/simple)."""
    g = Graph()
    model, latent = _demo_sources(g, size)
    g.add("MarkdownNote", (0, -200), [note + "\n\n" + _TUNE], (NOTE_W * 2, 260))
    _, build = _demo_profile_and_build(g, model, latent, DIT_CFG, DIT_SCHEDULER, steps)
    apply = g.add("BlockCacheApply", (1190, 120), APPLY_WIDGETS, (380, 180), colour=CACHED)
    g.link(model, 0, apply, "model")
    g.link(build, 0, apply, "schedule")
    _demo_tail(g, model, latent, apply, 1600, DIT_SCHEDULER, DIT_CFG, steps)
    return g.to_json()


def demo_dit() -> dict[str, Any]:
    """Runs anywhere: the built-in transformer reference model (ComfyUI's Flux class), no checkpoint."""
    return _demo_on("reference_dit", (
        "## Block Cache on a transformer: built-in Flux model, no checkpoint needed\n\nThe pack's small "
        "trained transformer reference model is ComfyUI's own Flux class (double- and single-stream blocks, "
        "RoPE) with Flux's flow-matching sampling, 32x32 pixels, coloured shapes on textured backgrounds. It "
        "profiles, builds and caches exactly as a Flux checkpoint does, on CPU in seconds: the heatmap has one "
        "row per double and single block."))


def demo_video() -> dict[str, Any]:
    """Runs anywhere: the built-in video reference model (ComfyUI's Wan 2.1 class), no checkpoint."""
    return _demo_on("reference_video", (
        "## Block Cache on video: built-in Wan model, no checkpoint needed\n\nThe pack's small trained video "
        "reference model is ComfyUI's own Wan 2.1 class (WanAttentionBlocks, 3D RoPE) with Wan's flow-matching "
        "sampling: 8-frame 32x32 clips of shapes that move or change colour. It profiles, builds and caches "
        "exactly as a Wan checkpoint does, on CPU in seconds: the heatmap has one row per block. The previews "
        "show the 8 frames."), VIDEO_STEPS)


def demo_two_experts() -> dict[str, Any]:
    """Runs anywhere: Wan 2.2's two-expert layout on the built-in video reference model, no checkpoint."""
    g = Graph()
    note = ("## Block Cache on two experts: built-in Wan model, no checkpoint needed\n\nWan 2.2 samples with a "
            "high-noise expert for the first steps and a low-noise expert for the rest, as two *KSamplerAdvanced* "
            f"segments. Here the pack's small trained video model plays both experts (steps 0-{VIDEO_SPLIT} and "
            f"{VIDEO_SPLIT}-{VIDEO_STEPS}): each segment is profiled by *Profile Block Changes (Advanced)*, gets "
            "its own schedule, measured on other seeds (the low-noise segment through the high-noise one), and "
            "its own cache. On CPU in about a minute. The Wan 2.2 workflow is the same graph with the 14B "
            "experts.\n\n" + _TUNE)
    g.add("MarkdownNote", (0, -300), [note], (NOTE_W * 2, 300))
    model, latent = _demo_sources(g, "reference_video")
    low_cached, low_run = _two_experts(g, (model, 0), (model, 0), (model, 1), (model, 2), (latent, 0), (model, 3),
                                       [DEMO_SEED, "fixed", VIDEO_STEPS, DIT_CFG, "euler", DIT_SCHEDULER],
                                       VIDEO_SPLIT)
    _decode_and_compare(g, (low_cached, 0), (low_run, 0), (model, 3), 2380, cached_y=500)
    return g.to_json()


def calibrate_demo() -> dict[str, Any]:
    """The reference model: profile -> an aggressive schedule -> Calibrate -> save + apply -> KSampler."""
    g = Graph()
    note = ("## Block Cache: scale-shift calibration (no checkpoint needed)\n\nA cached layer's forecast drifts "
            "a little from what it would have computed. *Calibrate Block Cache* "
            "learns a per-channel scale and shift for every reused layer output (Block Caching, Sec. 3.4): it "
            "samples with the cached model and, at each step, runs the uncached model on the same latent as the "
            "teacher. The loss curve shows the error of the reused outputs falling. The speed is unchanged. *Save "
            "Cache Schedule* writes `reference_calibrated.json` and `reference_calibrated.scale_shift.safetensors` "
            "beside it; *Load Cache Schedule* loads both.\n\nOn a real model, calibrate on a few varied prompts "
            "(join them with Conditioning (Combine)) at your usual size, for 20-50 iterations.")
    model, latent = _demo_sources(g)
    g.add("MarkdownNote", (0, -220), [note], (NOTE_W * 2, 290))
    profile_id, build = _demo_profile_and_build(g, model, latent)
    calibrate = g.add("BlockCacheCalibrate", (1190, 120), [100, "fixed", 8, 0.03, 0, 0.0], (380, 330),
                      colour=CACHED)
    curve = g.add("PreviewImage", (1190, 490), [], (380, 260), title="calibration loss")
    save = g.add("BlockCacheSaveSchedule", (740, 680), ["reference_calibrated", True], (420, 120))
    apply = g.add("BlockCacheApply", (1190, 790), APPLY_WIDGETS, (380, 180), colour=CACHED)
    g.link(model, 0, calibrate, "model")
    g.link(build, 0, calibrate, "schedule")
    g.link(model, 1, calibrate, "positive")
    g.link(model, 2, calibrate, "negative")
    g.link(latent, 0, calibrate, "latent_image")
    g.link(calibrate, 1, curve, "images")
    g.link(calibrate, 0, save, "schedule")
    g.link(model, 0, apply, "model")
    g.link(calibrate, 0, apply, "schedule")
    _demo_tail(g, model, latent, apply, 1600)
    return g.to_json()


def saved_schedule() -> dict[str, Any]:
    """Load Cache Schedule -> Apply -> KSampler with the schedule shipped in schedules/."""
    g = Graph()
    note = ("## Block Cache: apply a saved schedule\n\nNo profiling: *Load Cache Schedule* reads a schedule "
            f"file, here `{BUNDLED_SCHEDULE}` that ships with the pack (made for the built-in reference model: 20 "
            "euler steps, Build Cache Schedule's defaults, 2.25x). Your own schedules, saved with *Save Cache "
            "Schedule*, are listed first. A schedule made for 20 steps also drives other step counts and samplers: "
            "it is re-timed, keeping its share of computed steps.")
    model, latent = _demo_sources(g)
    g.add("MarkdownNote", (0, -200), [note], (NOTE_W * 2, 230))
    load = g.add("BlockCacheLoadSchedule", (360, 120), [BUNDLED_SCHEDULE], (440, 440), colour=CACHED)
    g.nodes[load - 1]["properties"][SCHEDULE_KEY] = schedule_file_payload(BUNDLED / BUNDLED_SCHEDULE)
    apply = g.add("BlockCacheApply", (840, 120), APPLY_WIDGETS, (440, 180), colour=CACHED)
    g.link(model, 0, apply, "model")
    g.link(load, 0, apply, "schedule")
    _demo_tail(g, model, latent, apply, 1320)
    return g.to_json()


def schedule_file_payload(path: Path) -> dict[str, Any]:
    """What nodes/frontend.py schedule_payload sends, read from a saved schedule file."""
    doc = json.loads(path.read_text())
    return {"version": 1, "model_type": doc["model"]["model_type"], "steps": doc["grid"]["steps"],
            "layers": [{"name": layer["name"], "kind": layer["kind"]} for layer in doc["layers"]],
            "compute": [layer["compute"] for layer in doc["layers"]], "computed": doc["estimate"]["computed"],
            "total": doc["estimate"]["total"], "flop_fraction": doc["estimate"]["flop_fraction"],
            "speedup": doc["estimate"]["speedup"], "builder": doc["builder"]}


WORKFLOWS = {
    "block_cache_demo_model_no_checkpoint": demo,
    DIT_DEMO: demo_dit,
    VIDEO_DEMO: demo_video,
    "block_cache_sd15_txt2img": sd15,
    "block_cache_sdxl_txt2img": sdxl,
    "block_cache_apply_saved_schedule": saved_schedule,
    "block_cache_flux_txt2img": flux,
    "block_cache_wan22_two_experts": wan22,
    "block_cache_demo_two_experts_no_checkpoint": demo_two_experts,
    "block_cache_faster_diffusion_sd15": faster_diffusion_sd15,
    "block_cache_calibrate_demo_model": calibrate_demo,
}


def make_bundled_schedule() -> dict[str, Any]:
    """Profiles the reference model as the demo workflow does and builds with Build Cache Schedule's defaults;
    returns the demo's payloads (profile and ladder)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from comfy_bootstrap import load_pack

    pack = load_pack()
    import comfy.utils
    import nodes as comfy_nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False
    demo_models = pack.demo_models
    loaded = demo_models.reference_model.load_reference_model()
    model, reference_vae = loaded.patcher.clone(), loaded.vae
    positive, negative = loaded.conditioning(DEMO_PROMPT), loaded.conditioning("")
    latent = demo_models.reference_model.empty_latent(1)  # what EmptyLatentImage 256x256 becomes for this model
    def sample(with_model, steps=None, seed_offset=0):
        (out,) = comfy_nodes.common_ksampler(with_model, DEMO_SEED + seed_offset, steps or DEMO_STEPS, DEMO_CFG,
                                             "euler", "normal", positive, negative, latent)
        return out["samples"]

    profiled, holder = pack.block_caching.patching.attach_profiler(model)
    reference = sample(profiled)
    profile = pack.block_caching.patching.collect_profile(holder, model, sampler="euler", scheduler="normal", cfg=DEMO_CFG,
                                            denoise=1.0, latent_shape=tuple(latent["samples"].shape), seed=DEMO_SEED)
    # As the node does by default: the chosen schedule is measured on the profiled prompts with two held-out seeds.
    replay_module = pack.block_caching.replay
    replay = replay_module.ProfileReplay(model, sample, reference,
                                         lambda samples: reference_vae.decode(samples).movedim(-1, 1))
    schedule = pack.block_caching.target_schedule.build_validated_schedule(
        profile, pack.block_caching.target_build.TargetOptions(min_psnr=pack.block_caching.target_build.DEFAULT_MIN_PSNR),
        replay_module.HeldOutValidation.of((replay,)))
    print(f"bundled schedule: {schedule.summary()}; {schedule.builder['measured']}")
    print(f"wrote {pack.schedule_files.storage.save_schedule(BUNDLED, BUNDLED_SCHEDULE, schedule, overwrite=True)}")
    return {"profile": pack.nodes.frontend.profile_payload(profile),
            "ladder": pack.nodes.frontend.ladder_payload(schedule)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", action="store_true", help="also re-profile the bundled schedule")
    args = parser.parse_args()
    demo_path = OUT / f"{DEMO}.json"
    if args.schedule:
        payloads = make_bundled_schedule()
    else:  # keep the measured payloads the demo workflow already carries
        old = json.loads(demo_path.read_text()) if demo_path.is_file() else {"nodes": []}
        found = {key: n["properties"][key] for n in old["nodes"] for key in (PROFILE_KEY, LADDER_KEY)
                 if key in n["properties"]}
        payloads = ({"profile": found[PROFILE_KEY], "ladder": found[LADDER_KEY]}
                    if PROFILE_KEY in found and LADDER_KEY in found else None)
    OUT.mkdir(exist_ok=True)
    for name, make in WORKFLOWS.items():
        path = OUT / f"{name}.json"
        graph = make(payloads) if name == DEMO else make()
        path.write_text(json.dumps(graph, indent=1, allow_nan=False) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
