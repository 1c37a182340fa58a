"""Wan models of ComfyUI 0.33 that Block Cache refuses, built tiny as a checkpoint loader builds them.

* WAN21_CausalAR (CausalWanModel): the ar_video sampler runs it frame block by frame block, and its
  blocks write a KV cache as a side effect of forward; a reused block output would skip that write.
* WAN_Animate2 (WanAnimate2Model): its blocks run through forward_gen / forward_pose / kv_from_input,
  never through forward, so an object patch on forward never acts.
"""

from __future__ import annotations

from types import SimpleNamespace

import comfy.sample
import comfy.samplers
import pytest
import torch
from dit_zoo import TinyDit
from dit_zoo.video_wan import _VIDEO, _WAN
from helpers import assert_refused, build_or_skip, sample

CAUSAL_AR = TinyDit("Wan 2.1 Causal AR (refused)", "wan21-causal-ar", "WAN21_CausalAR_T2V",
                    {**_WAN, "image_model": "wan2.1", "model_type": "t2v", "causal_ar": True}, _VIDEO, (5, 24),
                    since="0.33.0")


def _animate2(generator: torch.Generator) -> dict:
    # Pose latents: one frame fewer than the generation, whose frame 0 is the reference image's slot.
    clip = SimpleNamespace(penultimate_hidden_states=torch.randn((1, 4, 1280), generator=generator))
    return {"clip_vision_output": clip, "pose_video_latent": torch.randn((1, 16, _VIDEO[2] - 1, *_VIDEO[3:]),
                                                                         generator=generator)}


ANIMATE2 = TinyDit("Wan-Animate-2 (refused)", "wan-animate2", "WAN_Animate2",
                   {**_WAN, "image_model": "wan2.1", "model_type": "animate2", "in_dim": 36}, _VIDEO, (5, 24),
                   cond_extras=_animate2, since="0.33.0")

REFUSED = {CAUSAL_AR.id: "comfy.ldm.wan.ar_model.CausalWanModel",
           ANIMATE2.id: "comfy.ldm.wan.model_animate2.WanAnimate2Model"}


@pytest.mark.parametrize("entry", [CAUSAL_AR, ANIMATE2], ids=lambda e: e.id)
def test_refused_with_its_reason(pack, entry):
    reason = assert_refused(pack, build_or_skip(entry), REFUSED[entry.id])
    assert {CAUSAL_AR.id: "KV cache", ANIMATE2.id: "never through forward"}[entry.id] in reason


def test_causal_ar_blocks_carry_a_kv_cache_across_model_calls():
    """The reason for refusing it: under the ar_video sampler every block call appends to a KV cache
    that the next calls (the next frame blocks) attend to."""
    model = build_or_skip(CAUSAL_AR)
    positive, negative = CAUSAL_AR.conds()
    latent = CAUSAL_AR.latent()["samples"]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2)
    sampler = comfy.samplers.ksampler("ar_video", {"num_frame_per_block": 1})
    ends = []

    def record(_module, _args, kwargs):
        ends.append(kwargs["kv_cache"]["end"])

    handle = model.model.diffusion_model.blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 7), 1.0, sampler, sigmas,
                                         positive, negative, latent, seed=7)
    finally:
        handle.remove()
    tokens = (_VIDEO[3] // 2) * (_VIDEO[4] // 2)
    # Per frame: 2 denoising calls and the call that commits the clean frame, each written at the
    # frame's offset; later frames start where the earlier ones left their keys and values.
    assert ends == [frame * tokens for frame in range(_VIDEO[2]) for _ in range(3)]
    assert torch.isfinite(out).all()


def test_animate2_blocks_are_never_called_through_forward():
    """The reason for refusing it: a patch on a block's forward would never run."""
    model = build_or_skip(ANIMATE2)
    blocks = model.model.diffusion_model.blocks
    calls = {"forward": 0, "ffn": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1
        return hook

    handles = [h for block in blocks for h in (block.register_forward_pre_hook(count("forward")),
                                               block.ffn.register_forward_pre_hook(count("ffn")))]
    try:
        out = sample(model, *ANIMATE2.conds(), ANIMATE2.latent(), steps=2, cfg=4.0)
    finally:
        for handle in handles:
            handle.remove()
    # Each block's feed-forward ran (pose branch and generation branch), its forward never did.
    assert calls["forward"] == 0 and calls["ffn"] > 0
    assert torch.isfinite(out).all()
