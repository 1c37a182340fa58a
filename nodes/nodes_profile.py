"""Profile Block Changes (and its KSamplerAdvanced twin), Record / Collect Block Changes, Merge Block Profiles."""

from __future__ import annotations

import dataclasses
import logging

import comfy.samplers
import nodes as comfy_nodes
import torch
from comfy_api.latest import io

from ..block_caching.patching import attach_profiler, collect_profile
from ..block_caching.profile import merge_profiles
from ..block_caching.replay import ProfileReplay, earlier_segment_replay, segment_replay
from .frontend import PROFILE_UI_KEY, profile_payload
from .heatmap import render_profile
from .types import CATEGORY, BlockProfileSocket, ProfileRecordingSocket

logger = logging.getLogger(__name__)
ENABLE_DISABLE = ["enable", "disable"]


def _sampler_inputs(like: str) -> list[io.Input]:
    """The inputs a profiling node shares with the core sampler ``like``, between seed and steps and the latent."""
    return [
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip=f"Classifier-free guidance scale, as in {like}."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                       tooltip=f"The sampling algorithm, as in {like}."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                       tooltip=f"The noise schedule, as in {like}."),
        io.Conditioning.Input("positive", tooltip="The conditioning describing what to include."),
        io.Conditioning.Input("negative", tooltip="The conditioning describing what to exclude."),
    ]


def _profiling_outputs(latent_tooltip: str, profile_tooltip: str) -> list[io.Output]:
    """A profiling node's outputs: the sampled latent, the profile and its heatmap."""
    return [io.Latent.Output(tooltip=latent_tooltip),
            BlockProfileSocket.Output(display_name="profile", tooltip=profile_tooltip),
            io.Image.Output(display_name="heatmap", tooltip="The change per layer (rows) and step (columns).")]


class ProfileBlockChanges(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheProfile",
            display_name="Profile Block Changes",
            category=CATEGORY,
            description="Samples exactly like KSampler and also measures how much each layer's output changes "
                        "from step to step (Block Caching's relative L1 metric). Use it in place of a KSampler, "
                        "then feed its profile to Build Cache Schedule.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with and profile."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Sampling steps. A schedule is built on this step grid and re-timed to others."),
                *_sampler_inputs("KSampler"),
                io.Latent.Input("latent_image", tooltip="The latent to denoise. A batch of several images gives a "
                                                        "profile averaged over all of them (the paper averages many)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the latent to denoise, as in KSampler."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional. With it, Build Cache Schedule's validation measures the PSNR of "
                                     "the decoded pictures; without it, of the latents, which can read several "
                                     "dB higher than the pictures'."),
            ],
            outputs=_profiling_outputs("The denoised latent: identical to KSampler's for the same inputs.",
                                       "Per-layer, per-step change measurements for Build Cache Schedule."),
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, vae=None) -> io.NodeOutput:
        def sample(with_model, run_steps=steps, run_seed=seed):
            (out,) = comfy_nodes.common_ksampler(with_model, run_seed, run_steps, cfg, sampler_name, scheduler, positive,
                                                 negative, latent_image, denoise=denoise)
            return out

        steps_profiled = steps
        profiled_model, holder = attach_profiler(model)
        latent = sample(profiled_model)
        profile = collect_profile(holder, model, sampler=sampler_name, scheduler=scheduler, cfg=cfg,
                                  denoise=denoise, latent_shape=tuple(latent_image["samples"].shape), seed=seed)
        # Build Cache Schedule can sample this run again to measure a schedule's real error.
        decode = None if vae is None else (lambda samples: vae.decode(samples).movedim(-1, 1))
        replay = ProfileReplay(model, lambda with_model, steps=None, seed_offset=0: sample(
            with_model, steps or steps_profiled, seed + seed_offset)["samples"], latent["samples"], decode)
        profile = dataclasses.replace(profile, replays=(replay,))
        heatmap, summary = _profile_outputs(profile)
        # The node draws the heatmap itself from the payload (js/block_cache.js); no preview PNG.
        return io.NodeOutput(latent, profile, heatmap,
                             ui={"text": [summary], PROFILE_UI_KEY: [profile_payload(profile)]})


class ProfileBlockChangesAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheProfileAdvanced",
            display_name="Profile Block Changes (Advanced)",
            category=CATEGORY,
            description="Samples exactly like KSamplerAdvanced and profiles that segment of the run (one expert of "
                        "Wan 2.2, a refiner's steps). Use it in place of a KSamplerAdvanced, one per segment. Unlike "
                        "Record Block Changes, Build Cache Schedule can sample the segment again, so it measures "
                        "its schedule for this segment instead of guessing.",
            inputs=[
                io.Model.Input("model", tooltip="The model that samples this segment (for Wan 2.2, one expert)."),
                io.Combo.Input("add_noise", options=ENABLE_DISABLE,
                               tooltip="As in KSamplerAdvanced: 'enable' for the first segment, 'disable' for a "
                                       "segment that continues an earlier one's latent."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="The steps of the whole run, as in KSamplerAdvanced."),
                *_sampler_inputs("KSamplerAdvanced"),
                io.Latent.Input("latent_image", tooltip="The latent to denoise: an empty latent for the first "
                                                        "segment, the earlier segment's output for a later one."),
                io.Int.Input("start_at_step", default=0, min=0, max=10000,
                             tooltip="The first step of this segment, as in KSamplerAdvanced."),
                io.Int.Input("end_at_step", default=10000, min=0, max=10000,
                             tooltip="The step this segment ends at, as in KSamplerAdvanced."),
                io.Combo.Input("return_with_leftover_noise", options=ENABLE_DISABLE, default="disable",
                               tooltip="As in KSamplerAdvanced: 'enable' where a later segment continues."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional, for the last segment (leftover noise off): with it, validation "
                                     "measures the PSNR of the decoded pictures; without it, and for a segment "
                                     "that ends with leftover noise, of the latents."),
                BlockProfileSocket.Input("earlier_segment", optional=True,
                                         tooltip="For a segment that continues another (add_noise off): the profile "
                                                 "of the Profile Block Changes (Advanced) node that made "
                                                 "latent_image. Validation then samples that segment again with "
                                                 "other seeds, so this one is measured on other noise than the "
                                                 "run that chose its schedule; without it, on this very latent."),
            ],
            outputs=_profiling_outputs("The latent: identical to KSamplerAdvanced's for the same inputs.",
                                       "This segment's per-layer, per-step changes for Build Cache "
                                       "Schedule, which builds a schedule for this segment."),
        )

    @classmethod
    def execute(cls, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, start_at_step, end_at_step, return_with_leftover_noise, vae=None,
                earlier_segment=None) -> io.NodeOutput:
        if start_at_step >= min(end_at_step, steps):
            raise ValueError(f"Profile Block Changes (Advanced): steps {start_at_step} to {min(end_at_step, steps)} "
                             "are no segment to sample or profile; start_at_step must be below end_at_step and steps.")
        earlier = None if earlier_segment is None else earlier_segment_replay(earlier_segment,
                                                                              latent_image["samples"])
        finished = return_with_leftover_noise == "disable"

        def sample(with_model, samples=None, seed_offset=0):
            latent = latent_image if samples is None else {**latent_image, "samples": samples}
            (out,) = comfy_nodes.common_ksampler(with_model, noise_seed + seed_offset, steps, cfg, sampler_name,
                                                 scheduler, positive, negative, latent,
                                                 disable_noise=add_noise == "disable", start_step=start_at_step,
                                                 last_step=end_at_step, force_full_denoise=finished)
            return out

        profiled_model, holder = attach_profiler(model)
        latent = sample(profiled_model)
        profile = collect_profile(holder, model, sampler=sampler_name, scheduler=scheduler, cfg=cfg,
                                  latent_shape=tuple(latent_image["samples"].shape), seed=noise_seed)
        lines = []
        if vae is not None and not finished:
            lines.append("the VAE is not used: this segment ends with leftover noise, so validation compares latents.")
        decode = None if vae is None or not finished else (lambda samples: vae.decode(samples).movedim(-1, 1))
        replay = segment_replay(model, lambda with_model, samples, seed_offset: sample(
            with_model, samples, seed_offset)["samples"], latent["samples"], profile.grid.steps,
            adds_noise=add_noise == "enable", earlier=earlier, decode=decode)
        if not replay.held_out:
            lines.append("no earlier_segment and no noise added: validation samples this segment from this very "
                         "latent at every seed, so it reads the schedule on the run that chose it (a few dB high).")
        for line in lines:
            logger.warning("Profile Block Changes (Advanced): %s", line)
        profile = dataclasses.replace(profile, replays=(replay,))
        heatmap, summary = _profile_outputs(profile)
        return io.NodeOutput(latent, profile, heatmap, ui={"text": ["\n".join([summary, *lines])],
                                                            PROFILE_UI_KEY: [profile_payload(profile)]})


def _profile_outputs(profile) -> tuple[torch.Tensor, str]:
    heatmap = torch.from_numpy(render_profile(profile))[None]
    summary = (f"{len(profile.block_map.layers)} layers x {profile.grid.steps} steps, "
               f"{profile.sample_count} samples ({profile.block_map.model_type})")
    return heatmap, summary


class RecordBlockChanges(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheRecord",
            display_name="Record Block Changes",
            category=CATEGORY,
            description="Profiles under the sampler you already use (KSampler, KSamplerAdvanced segments, "
                        "SamplerCustomAdvanced with a guider, third-party samplers): its model samples exactly "
                        "like the input model and records how each layer changes. Feed the sampler's output "
                        "latent and the recording to Collect Block Profile. Build Cache Schedule cannot sample "
                        "such a run again, so it cannot measure its schedule: for KSamplerAdvanced segments, "
                        "Profile Block Changes (Advanced) can.",
            inputs=[io.Model.Input("model", tooltip="The model to profile (for Wan 2.2, each expert on its own).")],
            outputs=[
                io.Model.Output(display_name="model", tooltip="Sample with this model: its output is the input "
                                                              "model's, and its layers are measured."),
                ProfileRecordingSocket.Output(display_name="recording",
                                              tooltip="For Collect Block Profile, with the sampler's output."),
            ],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        profiled_model, holder = attach_profiler(model)
        return io.NodeOutput(profiled_model, (holder, model))


class CollectBlockProfile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheCollectProfile",
            display_name="Collect Block Profile",
            category=CATEGORY,
            description="The profile Record Block Changes measured in the sampling run that made this latent. "
                        "A KSamplerAdvanced segment gives the profile of its segment, which Build Cache "
                        "Schedule turns into a schedule for that segment.",
            inputs=[
                ProfileRecordingSocket.Input("recording", tooltip="From Record Block Changes."),
                io.Latent.Input("latent", tooltip="The output of the sampler that used Record Block Changes' "
                                                  "model; it makes this node run after the sampler."),
            ],
            outputs=_profiling_outputs("The latent, passed through.",
                                       "Per-layer, per-step change measurements for Build Cache Schedule. "
                                       "It cannot re-sample the run, so the builder's validation is off (for a "
                                       "KSamplerAdvanced segment, Profile Block Changes (Advanced) can)."),
        )

    @classmethod
    def execute(cls, recording, latent) -> io.NodeOutput:
        holder, model = recording
        try:
            profile = collect_profile(holder, model)
        except RuntimeError as error:
            raise RuntimeError("Collect Block Profile: the model from Record Block Changes has not sampled. Connect "
                               "it to a sampler and this node's latent input to that sampler's output; a node "
                               "between them that patches the model with this pack (Apply Block Cache, another "
                               "Record) replaces the recording: profile first, then apply.") from error
        heatmap, summary = _profile_outputs(profile)
        return io.NodeOutput(latent, profile, heatmap,
                             ui={"text": [summary], PROFILE_UI_KEY: [profile_payload(profile)]})


class MergeBlockProfiles(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheMergeProfiles",
            display_name="Merge Block Profiles",
            category=CATEGORY,
            description="Averages profiles from several prompts or seeds (same model, same step grid), "
                        "weighted by how many samples each holds.",
            inputs=[
                BlockProfileSocket.Input("profile_a", tooltip="A profile from Profile Block Changes."),
                BlockProfileSocket.Input("profile_b", tooltip="Another profile of the same model and step grid."),
            ],
            outputs=[BlockProfileSocket.Output(display_name="profile", tooltip="The averaged profile.")],
        )

    @classmethod
    def execute(cls, profile_a, profile_b) -> io.NodeOutput:
        return io.NodeOutput(merge_profiles([profile_a, profile_b]))
