"""The trained video reference model (a Wan 2.1): the loader, determinism, prompts, block map, caching,
the clips it was trained on, and the graph a user builds for it (EmptyHunyuanLatentVideo -> VAE Decode)."""

from __future__ import annotations

import dataclasses
import importlib

import comfy.ldm.wan.model
import comfy.model_base
import comfy.model_patcher
import comfy.model_sampling
import comfy_extras.nodes_hunyuan as nodes_hunyuan
import nodes as comfy_nodes
import numpy as np
import pytest
import torch
from comfy_bootstrap import PACK_MODULE
from comfyui_block_cache.block_caching.patching import apply_block_cache, attach_profiler, collect_profile
from comfyui_block_cache.block_caching.schedule import all_compute_schedule
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from comfyui_block_cache.nodes.nodes_demo import LoadDemoModel
from helpers import count_layer_computations, sample

reference_video = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_video")
reference_clips = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_clips")
reference_model = importlib.import_module(f"{PACK_MODULE}.demo_models.reference_model")

STEPS = 4
PROMPT = "a large red circle at left moving right on a blue striped background"
BLOCKS = reference_video.UNET_CONFIG["num_layers"]
FRAMES = reference_video.FRAMES
VIDEO = (2, 3, FRAMES, 32, 32)


@pytest.fixture(scope="module")
def reference():
    return reference_video.load_reference_video()


@pytest.fixture(scope="module")
def run(pack, reference):
    """Two prompts, one seed: the uncached output and a profile of the same run."""
    conds = reference.conditioning_batch(reference_clips.benchmark_prompts(2, seed=99)), reference.conditioning("")
    latent = reference_video.empty_latent(2)
    plain = sample(reference.patcher, *conds, latent, steps=STEPS, scheduler="simple", seed=3)
    profiling, holder = attach_profiler(reference.patcher)
    profiled = sample(profiling, *conds, latent, steps=STEPS, scheduler="simple", seed=3)
    profile = collect_profile(holder, reference.patcher)
    return conds, latent, plain, profile, profiled


def test_loader_gives_comfyui_wan_classes_with_the_committed_weights(reference):
    model = reference.patcher.model
    assert isinstance(reference.patcher, comfy.model_patcher.ModelPatcher)
    assert isinstance(model, comfy.model_base.WAN21) and model.model_type == comfy.model_base.ModelType.FLOW
    assert type(model.diffusion_model) is comfy.ldm.wan.model.WanModel
    # Wan's flow matching with its shift, as a Wan 2.1 checkpoint gets it.
    sampling = reference.patcher.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow)
    assert isinstance(sampling, comfy.model_sampling.CONST) and sampling.shift == 8.0
    state = reference_video.load_state()
    expected = model.model_config.process_unet_state_dict(
        {k.removeprefix("diffusion_model."): v for k, v in state.items() if k.startswith("diffusion_model.")})
    encoder_state = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    weights, encoder = model.diffusion_model.state_dict(), reference.text_encoder.state_dict()
    assert set(weights) == set(expected) and set(encoder) == set(encoder_state)
    assert len(expected) + len(encoder_state) == len(state)
    for loaded, saved in ((weights, expected), (encoder, encoder_state)):
        for key, value in saved.items():
            assert torch.equal(loaded[key], value), key
    assert len(model.diffusion_model.blocks) == BLOCKS
    assert reference_video.WEIGHTS_PATH.stat().st_size <= 20 * 2**20
    ((context, extras),) = reference.conditioning(PROMPT)
    assert context.shape == (1, reference_model.MAX_TOKENS, reference_model.CONTEXT_DIM) and extras == {}


def test_the_user_s_graph_gives_eight_frames_that_decode_to_eight_images(reference):
    """EmptyHunyuanLatentVideo at 256x256, length 29 -> KSampler -> VAE Decode, as the example workflow wires it."""
    result = nodes_hunyuan.EmptyHunyuanLatentVideo.execute(256, 256, 29, 1)
    latent = result[0] if isinstance(result, tuple) else result.result[0]
    positive, negative = reference.conditioning(PROMPT), reference.conditioning("")
    (first,) = comfy_nodes.common_ksampler(reference.patcher, 3, STEPS, 5.0, "euler", "simple", positive, negative,
                                          latent)
    (second,) = comfy_nodes.common_ksampler(reference.patcher, 3, STEPS, 5.0, "euler", "simple", positive, negative,
                                           latent)
    assert torch.equal(first["samples"], second["samples"]), "sampling is deterministic"
    assert first["samples"].shape == (1, 3, FRAMES, 32, 32) and torch.isfinite(first["samples"]).all()
    (images,) = comfy_nodes.VAEDecode().decode(reference.vae, first)
    assert images.shape == (FRAMES, 32, 32, 3) and 0 <= float(images.min()) and float(images.max()) <= 1
    expected = ((first["samples"][0].movedim(0, -1) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(images, expected)


def test_the_background_colour_follows_the_prompt(reference):
    latent = reference_video.empty_latent(1)
    negative = reference.conditioning("")

    def clip(prompt: str) -> torch.Tensor:
        return sample(reference.patcher, reference.conditioning(prompt), negative, latent, steps=12,
                      scheduler="simple", seed=5)[0]

    blue = clip("a small white circle at center on a blue background")
    yellow = clip("a small white circle at center on a yellow background")
    # Blue: more blue than red; yellow: more red and green than blue.
    assert float(blue[2].mean() - blue[0].mean()) > 0.5
    assert float(yellow[0].mean() - yellow[2].mean()) > 0.5


def test_the_denoiser_recovers_clips_and_their_motion(reference):
    """From a clip at half noise (sigma 0.5), the model's estimate of the clean clip is far closer to it than
    the noisy clip, and a moving shape is where each frame has it."""
    clips, captions = reference_clips.training_batch(4, torch.Generator().manual_seed(2024), drop_caption=0,
                                                     drop_part=0)
    right = reference_clips.Clip(reference_clips.random_clip(torch.Generator().manual_seed(3)).scene, "right")
    clips = torch.cat([clips, reference_clips.render_clip(right)[None]])
    captions.append(right.caption())
    model = reference.patcher.model
    sigma = torch.full((len(clips),), 0.5)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    noisy = model.model_sampling.noise_scaling(sigma, noise, clips)
    with torch.no_grad():
        velocity = model.diffusion_model(noisy, model.model_sampling.timestep(sigma), reference.encode(captions))
    estimate = model.model_sampling.calculate_denoised(sigma, velocity, noisy)

    def psnr(a: torch.Tensor) -> float:
        return float(10 * torch.log10(4.0 / (a - clips).pow(2).mean()))

    assert psnr(estimate) > 18.0 and psnr(estimate) > psnr(noisy) + 8.0, (psnr(estimate), psnr(noisy))

    # Each estimated frame is closer to its own clean frame than to the other end of the motion.
    first, last = estimate[-1, :, 0], estimate[-1, :, -1]
    clean_first, clean_last = clips[-1, :, 0], clips[-1, :, -1]
    assert (first - clean_first).pow(2).mean() < (first - clean_last).pow(2).mean()
    assert (last - clean_last).pow(2).mean() < (last - clean_first).pow(2).mean()


def test_block_map_finds_every_block(pack, reference):
    block_map = block_map_for_patcher(reference.patcher)
    assert block_map.family == "Wan 2.1 / 2.2"
    assert [layer.name for layer in block_map.layers] == [f"blocks.{i}" for i in range(BLOCKS)]


def test_profile_is_the_uncached_run_and_measures_every_block(run):
    _, _, plain, profile, profiled = run
    assert torch.equal(profiled, plain)
    assert profile.grid.latent_shape == VIDEO
    change = np.array(profile.change, dtype=float)
    assert change.shape == (BLOCKS, STEPS) and (change[:, 1:] > 0).all()


def test_wan_s_time_shift_spreads_the_step_weights_past_the_even_weighting_gate(pack, reference):
    """At the benchmark's 30 steps, Wan's shift 8 makes the latent move tens of times more at the last steps than at
    the first: the Build node then also tries the search with every step weighted alike (test_reference_dit.py
    checks that the Flux reference stays under the gate)."""
    from comfyui_block_cache.block_caching import target_schedule
    from comfyui_block_cache.block_caching.target_ladder import step_weight_spread

    conds = reference.conditioning_batch([PROMPT]), reference.conditioning("")
    profiling, holder = attach_profiler(reference.patcher)
    sample(profiling, *conds, reference_video.empty_latent(1), steps=30, scheduler="simple", seed=3)
    weights = collect_profile(holder, reference.patcher).trajectory.step_weights
    assert weights[-1] > weights[0]
    assert step_weight_spread(list(weights)) > 2 * target_schedule.EVEN_WEIGHTS_MIN_SPREAD


def test_all_compute_schedule_is_bit_identical(pack, reference, run):
    conds, latent, plain, profile, _ = run
    schedule = all_compute_schedule(profile.block_map, profile.grid)
    patched, holder = apply_block_cache(reference.patcher, schedule)
    out = sample(patched, *conds, latent, steps=STEPS, scheduler="simple", seed=3)
    assert torch.equal(out, plain)
    assert holder.last_run.reused.sum() == 0 and holder.last_run.computed.sum() == BLOCKS * STEPS


def test_a_caching_schedule_skips_exactly_its_blocks(pack, reference, run):
    conds, latent, plain, profile, _ = run
    schedule = all_compute_schedule(profile.block_map, profile.grid)
    layers = tuple(dataclasses.replace(layer, compute=(True, False, True, True)) for layer in schedule.layers)
    schedule = dataclasses.replace(schedule, layers=layers)
    patched, holder = apply_block_cache(reference.patcher, schedule)
    names = [layer.name for layer in layers]
    with count_layer_computations(reference.patcher.model.diffusion_model, names) as counts:
        out = sample(patched, *conds, latent, steps=STEPS, scheduler="simple", seed=3)
    assert [counts[name] for name in names] == [STEPS - 1] * len(names)
    assert holder.last_run.reused.sum() == len(names)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_clips_are_seeded_and_their_captions_use_the_model_s_words():
    first, captions = reference_clips.training_batch(6, torch.Generator().manual_seed(4))
    again, captions_again = reference_clips.training_batch(6, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and captions == captions_again
    assert first.shape == (6, 3, FRAMES, 32, 32) and float(first.min()) >= -1 and float(first.max()) <= 1
    assert (first[:, :, 1:] != first[:, :, :-1]).any(dim=(1, 3, 4)).all(), "every clip changes from frame to frame"
    known = set(reference_video.VIDEO_VOCABULARY)
    for caption in reference_clips.benchmark_prompts(40, seed=7):
        assert set(caption.split()) <= known, caption
        assert reference_model.tokenize([caption], reference_video.VIDEO_VOCABULARY)[0, -1] == 0 or \
            len(caption.split()) + 1 == reference_model.MAX_TOKENS, "no caption is cut"


def test_demo_node_reference_video_choice(pack):
    node = LoadDemoModel
    model, positive, negative, vae = node.execute("reference_video", 0, "a small blue ring turning red", "").result
    assert isinstance(model.model.diffusion_model, comfy.ldm.wan.model.WanModel)
    assert positive[0][0].shape == (1, reference_model.MAX_TOKENS, reference_model.CONTEXT_DIM)
    assert vae.latent_channels == 3 and model.get_model_object("latent_format").latent_dimensions == 3
