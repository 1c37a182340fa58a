"""The generic fallback for diffusion models in no family table, on real ComfyUI BaseModels.

A custom model with one list of like transformer blocks is found by structure, cached, and exact
under an all-compute schedule; a model without such lists (a custom one, Stable Cascade stage B
and C, whose per-level lists of mixed ResBlock/Attn/Timestep blocks are iterated by the model)
gets an UnsupportedModelError that names the class and the supported families.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
from comfyui_block_cache.block_caching.patching import apply_block_cache, attach_profiler, collect_profile
from comfyui_block_cache.block_caching.schedule import BuildOptions, all_compute_schedule, build_schedule
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from comfyui_block_cache.demo_models.builtin_models import SMALL_UNET_CONFIGS
from comfyui_block_cache.errors import UnsupportedModelError
from comfyui_block_cache.nodes.nodes_apply import ApplyBlockCache
from comfyui_block_cache.runtime.run import LayerForward, ModelCall, RunContext, activate
from dit_zoo import TinyDit
from helpers import count_layer_computations, has_block_cache, profile_by_sampling, sample
from torch import nn

STEPS = 4


class TinyBlock(nn.Module):
    """A transformer block of no known family: modulated self/cross attention and an MLP."""

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.context_kv = nn.Linear(context_dim, 2 * dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(emb).unsqueeze(1).chunk(2, dim=-1)
        q, k, v = self.qkv(self.norm1(x) * (1 + scale) + shift).chunk(3, dim=-1)
        context_k, context_v = self.context_kv(context).chunk(2, dim=-1)
        # In place, as many DiT blocks update their input: the runtime must copy it first.
        x += F.scaled_dot_product_attention(q, torch.cat([k, context_k], 1), torch.cat([v, context_v], 1))
        x += self.mlp(self.norm2(x))
        return x


class TinyGenericDit(nn.Module):
    """A custom diffusion model: tokens from latent pixels, one list of like blocks."""

    def __init__(self, channels: int = 4, dim: int = 32, context_dim: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.dim = dim
        self.proj_in = nn.Linear(channels, dim)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(TinyBlock(dim, context_dim) for _ in range(depth))
        self.heads = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim)])  # plain layers: not blocks
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(x.flatten(2).transpose(1, 2))
        emb = self.time_embed(timestep_embedding(timesteps, self.dim).to(x.dtype))
        for block in self.blocks:
            tokens = block(tokens, context, emb)
        for head in self.heads:
            tokens = tokens + head(tokens)
        return self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class TinyAudioVideoBlock(nn.Module):
    """An audio-video block: both streams travel in one tuple argument and come back updated."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.video = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.audio = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.cross = nn.Linear(dim, dim)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor], emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        video, audio = x
        video = video + self.video(video + emb[:, None]) + self.cross(audio.mean(1, keepdim=True))
        audio = audio + self.audio(audio + emb[:, None])
        return video, audio


class TinyAudioVideoDit(nn.Module):
    """A custom model whose blocks carry (video, audio): the audio tokens come from the latent's last row."""

    def __init__(self, channels: int = 4, dim: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.dim = dim
        self.proj_in = nn.Linear(channels, dim)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(TinyAudioVideoBlock(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(x.flatten(2).transpose(1, 2))
        emb = self.time_embed(timestep_embedding(timesteps, self.dim).to(x.dtype))
        streams = (tokens[:, : h * (w - 1)], tokens[:, h * (w - 1):])
        for block in self.blocks:
            streams = block(streams, emb)
        return self.proj_out(torch.cat(streams, 1)).transpose(1, 2).reshape(b, c, h, w)


class TinyConvNet(nn.Module):
    """A custom diffusion model with no list of blocks, only a list of plain convolutions."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(x)
        return x


def _base_model_with(diffusion_model_class):
    """A tiny SD1.5-type BaseModel whose diffusion_model is replaced before the ModelPatcher wraps it."""

    def make(model_config):
        model = model_config.get_model({}, "")
        model.diffusion_model = diffusion_model_class()
        return model

    return make


def _tiny_unet_config(pack) -> dict:
    return dict(SMALL_UNET_CONFIGS["tiny"])  # its UNet is replaced


@pytest.fixture(scope="module")
def generic(pack):
    return TinyDit("generic (TinyGenericDit)", "generic-dit", "SD15", _tiny_unet_config(pack), (1, 4, 8, 8), (6, 32),
                   make_model=_base_model_with(TinyGenericDit))


@pytest.fixture(scope="module")
def generic_run(pack, generic):
    """(model, conds, unpatched output, profile) of the generic model."""
    model = generic.build(seed=0)
    conds = generic.conds()
    reference = sample(model, *conds, generic.latent(), steps=STEPS, cfg=generic.cfg)
    profile, _ = profile_by_sampling(pack, model, conds, generic.latent(), steps=STEPS, cfg=generic.cfg)
    return model, conds, reference, profile


def test_fallback_finds_the_block_list_by_structure(pack, generic_run, caplog):
    model, *_ = generic_run  # profiled: the profiler's patches are still on the loaded blocks
    with caplog.at_level(logging.INFO):
        block_map = block_map_for_patcher(model)
    assert block_map.family == "generic (TinyGenericDit)" and block_map.model_class == "TinyGenericDit"
    # Only the like blocks: not the list of plain Linear heads.
    assert [layer.name for layer in block_map.layers] == ["blocks.0", "blocks.1", "blocks.2"]
    for layer in block_map.layers:
        assert layer.kind.value == "transformer" and layer.mutates_inputs
        # Inferred from the block class's forward (first parameter), not from the patch in its place.
        assert [(s.parameter, s.position) for s in layer.streams] == [("x", 0)]
    assert "found block lists blocks by structure" in caplog.text
    assert "block signature inferred for TinyBlock" in caplog.text


def test_fallback_profile_measures_every_block(generic_run):
    *_, profile = generic_run
    change = np.array(profile.change, dtype=float)
    assert change.shape == (3, STEPS) and np.isfinite(change[:, 1:]).all() and (change[:, 1:] > 0).all()
    assert profile.total_flops > sum(profile.layer_flops) > 0


def test_fallback_all_compute_schedule_is_bit_identical(pack, generic, generic_run):
    model, conds, reference, profile = generic_run
    schedule = all_compute_schedule(profile.block_map, profile.grid)
    patched, holder = apply_block_cache(model, schedule)
    out = sample(patched, *conds, generic.latent(), steps=STEPS, cfg=generic.cfg)
    assert torch.equal(out, reference), f"max diff {(out - reference).abs().max():.3g}"
    assert holder.last_run.reused.sum() == 0 and holder.last_run.computed.sum() > 0


def test_fallback_caches_the_blocks_and_counts_match(pack, generic, generic_run):
    model, conds, reference, profile = generic_run
    options = BuildOptions(threshold=10.0, cache_kinds="attention")
    schedule = build_schedule(profile, options)
    mask = schedule.compute_mask()
    assert mask[:, 0].all() and not mask.all()
    patched, holder = apply_block_cache(model, schedule)
    names = [layer.name for layer in schedule.layers]
    with count_layer_computations(model.model.diffusion_model, names) as counts:
        out = sample(patched, *conds, generic.latent(), steps=STEPS, cfg=generic.cfg)
    counted = np.array([counts[name] for name in names])
    calls_per_evaluation = (holder.last_run.computed + holder.last_run.reused) // STEPS
    np.testing.assert_array_equal(counted, mask.sum(axis=1) * calls_per_evaluation)
    np.testing.assert_array_equal(counted, holder.last_run.computed)
    assert holder.last_run.reused.sum() > 0
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    # The original model is untouched afterwards.
    assert torch.equal(sample(model, *conds, generic.latent(), steps=STEPS, cfg=generic.cfg), reference)


def _assert_unsupported(pack, model_patcher, model_class: str, model_type: str) -> None:
    families = importlib.import_module(f"{pack.__name__}.block_maps.dit_families")
    with pytest.raises(UnsupportedModelError) as error:
        attach_profiler(model_patcher)
    message = str(error.value)
    assert f"in {model_class} (model type {model_type})" in message
    assert all(family.name in message for family in families.DIT_FAMILIES)
    assert families.generic_block_lists(model_patcher.model.diffusion_model) == ()


def test_model_without_block_lists_is_unsupported(pack):
    entry = TinyDit("generic (TinyConvNet)", "generic-conv", "SD15", _tiny_unet_config(pack), (1, 4, 8, 8), (6, 32),
                    make_model=_base_model_with(TinyConvNet))
    _assert_unsupported(pack, entry.build(seed=0), "TinyConvNet", "SD15")


# Tiny stage C and B. Their block lists hold one ModuleList per level (mixed ResBlock, TimestepBlock,
# AttnBlock), which the model iterates itself: no list of like blocks, so nothing to cache.
_CASCADE = {
    "Stable_Cascade_C": {"stable_cascade_stage": "c", "c_in": 16, "c_out": 16, "c_r": 16, "c_cond": 32,
                         "c_hidden": [32, 32], "nhead": [2, 2], "blocks": [[1, 1], [1, 1]],
                         "block_repeat": [[1, 1], [1, 1]], "level_config": ["CTA", "CTA"], "c_clip_text": 24,
                         "c_clip_text_pooled": 24, "c_clip_img": 768, "c_clip_seq": 2},
    "Stable_Cascade_B": {"stable_cascade_stage": "b", "c_in": 4, "c_out": 4, "c_r": 16, "c_cond": 32,
                         "c_hidden": [16, 32], "nhead": [-1, 2], "blocks": [[1, 1], [1, 1]],
                         "block_repeat": [[1, 1], [1, 1]], "level_config": ["CT", "CTA"], "c_clip": 24,
                         "c_clip_seq": 2},
}


@pytest.mark.parametrize(("config", "model_class"), [("Stable_Cascade_C", "StageC"), ("Stable_Cascade_B", "StageB")])
def test_stable_cascade_is_unsupported(pack, config, model_class):
    model_config = getattr(comfy.supported_models, config)(dict(_CASCADE[config]))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    _assert_unsupported(pack, patcher, model_class, config)


# -- no silent no-op: Apply Block Cache says what it cannot cache, why, and the fix ------------------

class TinyPairBlock(nn.Module):
    """A block of no known family that updates two streams and returns both: which input each element
    of the tuple updates is unknown, so it must not be cached as a single tensor."""

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.mix = nn.Linear(dim, dim)
        self.context_mix = nn.Linear(context_dim, context_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + self.mix(x).tanh(), context + self.context_mix(context).tanh()


class TinyOpaqueBlock(nn.Module):
    """A block whose forward names no inputs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.norm = nn.LayerNorm(dim)

    def forward(self, *args, **kwargs):
        return args[0] + self.mlp(self.norm(args[0]))


class TinyMixedDit(TinyGenericDit):
    """Like blocks the fallback can cache, then two lists it cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.pair_blocks = nn.ModuleList(TinyPairBlock(self.dim, 32) for _ in range(2))
        self.opaque_blocks = nn.ModuleList(TinyOpaqueBlock(self.dim) for _ in range(2))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(x.flatten(2).transpose(1, 2))
        emb = self.time_embed(timestep_embedding(timesteps, self.dim).to(x.dtype))
        for block in self.blocks:
            tokens = block(tokens, context, emb)
        for block in self.pair_blocks:
            tokens, context = block(tokens, context)
        for block in self.opaque_blocks:
            tokens = block(tokens)
        return self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


def _apply_node(pack):
    return ApplyBlockCache


def test_unsupported_model_is_reported_and_left_unpatched(pack, tiny_model, caplog):
    entry = TinyDit("generic (TinyConvNet)", "generic-conv", "SD15", _tiny_unet_config(pack), (1, 4, 8, 8), (6, 32),
                    make_model=_base_model_with(TinyConvNet))
    model = entry.build(seed=0)
    reference = sample(model, *entry.conds(), entry.latent(), steps=STEPS, cfg=entry.cfg)
    # Any schedule: the model is refused before the schedule is looked at.
    profile, _ = profile_by_sampling(pack, tiny_model, entry.conds(), {"samples": torch.zeros(1, 4, 16, 16)},
                                     steps=STEPS)
    schedule = all_compute_schedule(profile.block_map, profile.grid)
    with caplog.at_level(logging.WARNING):
        output = _apply_node(pack).execute(model, schedule)
    (returned,) = output.result
    text = output.ui["text"][0]
    for message in (text, caplog.text):
        assert "Block Cache is OFF for this model" in message and "TinyConvNet" in message  # what and which
        assert "the model class is unknown" in message  # why
        assert "Fix: use a model of a supported family" in message  # the fix
    # Nothing is patched: the model comes back as it was and samples as before.
    assert returned is model and not model.object_patches
    assert not has_block_cache(model)
    assert torch.equal(sample(returned, *entry.conds(), entry.latent(), steps=STEPS, cfg=entry.cfg), reference)


def test_blocks_that_cannot_be_cached_are_reported_with_reason_and_fix(pack, caplog):
    entry = TinyDit("generic (TinyMixedDit)", "generic-mixed", "SD15", _tiny_unet_config(pack), (1, 4, 8, 8), (6, 32),
                    make_model=_base_model_with(TinyMixedDit))
    model = entry.build(seed=0)
    conds = entry.conds()
    block_map = block_map_for_patcher(model)
    assert [layer.name for layer in block_map.layers] == ["blocks.0", "blocks.1", "blocks.2"]
    skipped = {layer.name: layer for layer in block_map.skipped}
    assert sorted(skipped) == ["opaque_blocks.0", "opaque_blocks.1", "pair_blocks.0", "pair_blocks.1"]
    assert "returns a tuple of streams" in skipped["pair_blocks.0"].reason
    assert "unknown block signature" in skipped["opaque_blocks.0"].reason
    assert all("BLOCK_SIGNATURES in block_maps/dit_families.py" in layer.fix for layer in skipped.values())

    profile, _ = profile_by_sampling(pack, model, conds, entry.latent(), steps=STEPS, cfg=entry.cfg)
    schedule = build_schedule(profile, BuildOptions(threshold=10.0))
    with caplog.at_level(logging.WARNING):
        output = _apply_node(pack).execute(model, schedule)
    (patched,) = output.result
    text = output.ui["text"][0]
    assert text.startswith("4 blocks of this model cannot be cached and always run")
    assert "- pair_blocks.1: TinyPairBlock.forward returns a tuple of streams" in text
    assert "- opaque_blocks.0: unknown block signature" in text and "Fix: add the block class" in text
    assert "cannot be cached and always run" in caplog.text
    # The blocks it can cache are cached; the others run every time.
    out = sample(patched, *conds, entry.latent(), steps=STEPS, cfg=entry.cfg)
    assert torch.isfinite(out).all() and has_block_cache(patched)
    assert not model.object_patches


def test_a_fully_cacheable_model_shows_no_note(pack, tiny_model, conds, latent):
    profile, _ = profile_by_sampling(pack, tiny_model, conds, latent, steps=STEPS)
    schedule = all_compute_schedule(profile.block_map, profile.grid)
    output = _apply_node(pack).execute(tiny_model, schedule)
    assert output.ui["text"] == [""] and has_block_cache(output.result[0])


class TinyHiddenPairBlock(TinyPairBlock):
    """Returns its two streams as a tuple that reading the source cannot see: the signature is inferred as a
    single tensor, and the runtime, finding a tuple, never caches it."""

    def forward(self, x: torch.Tensor, context: torch.Tensor):
        outputs = [x + self.mix(x).tanh(), context + self.context_mix(context).tanh()]
        return tuple(outputs)


class TinyHiddenPairDit(TinyGenericDit):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyHiddenPairBlock(self.dim, 32) for _ in range(3))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(x.flatten(2).transpose(1, 2)) + self.time_embed(
            timestep_embedding(timesteps, self.dim).to(x.dtype)).unsqueeze(1)
        for block in self.blocks:
            tokens, context = block(tokens, context)
        return self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


def test_scheduled_reuse_that_never_happens_is_reported(pack, generic, generic_run, caplog):
    entry = TinyDit("generic (TinyHiddenPairDit)", "generic-hidden", "SD15", _tiny_unet_config(pack), (1, 4, 8, 8),
                    (6, 32), make_model=_base_model_with(TinyHiddenPairDit))
    model = entry.build(seed=0)
    block_map = block_map_for_patcher(model)
    assert [layer.name for layer in block_map.layers] == ["blocks.0", "blocks.1", "blocks.2"] and not block_map.skipped
    # Every block scheduled to reuse at every other step.
    *_, profile = generic_run  # its grid (same sampler and steps); its layers have the same names
    base = all_compute_schedule(block_map, profile.grid)
    schedule = dataclasses.replace(base, layers=tuple(
        dataclasses.replace(layer, compute=tuple(step % 2 == 0 for step in range(profile.grid.steps)))
        for layer in base.layers))
    (patched,) = _apply_node(pack).execute(model, schedule).result
    with caplog.at_level(logging.WARNING):
        out = sample(patched, *entry.conds(), entry.latent(), steps=STEPS, cfg=entry.cfg)
    assert torch.isfinite(out).all()
    assert "3 layers the schedule reuses were computed at every call of this run" in caplog.text
    assert "blocks.0, blocks.1, blocks.2" in caplog.text and "BLOCK_SIGNATURES" in caplog.text

    # A block that caches as scheduled gets no such warning.
    model, conds, _, profile = generic_run
    caplog.clear()
    (patched,) = _apply_node(pack).execute(model, schedule).result
    with caplog.at_level(logging.WARNING):
        sample(patched, *conds, generic.latent(), steps=STEPS, cfg=generic.cfg)
    assert "computed at every call" not in caplog.text


def test_blocks_carrying_a_tuple_of_streams_are_cached_per_stream(pack, caplog):
    av = TinyDit("generic (TinyAudioVideoDit)", "generic-av", "SD15", _tiny_unet_config(pack), (1, 4, 8, 8), (6, 32),
                 make_model=_base_model_with(TinyAudioVideoDit))
    model, conds = av.build(seed=0), av.conds()
    with caplog.at_level(logging.INFO):
        block_map = block_map_for_patcher(model)
    assert [layer.name for layer in block_map.layers] == ["blocks.0", "blocks.1", "blocks.2"]
    assert not block_map.skipped
    for layer in block_map.layers:
        assert [(s.key, s.parameter, s.item) for s in layer.streams] == [(0, "x", 0), (1, "x", 1)]
    assert "TinyAudioVideoBlock (2 streams in one tuple)" in caplog.text
    reference = sample(model, *conds, av.latent(), steps=STEPS, cfg=av.cfg)
    profile, _ = profile_by_sampling(pack, model, conds, av.latent(), steps=STEPS, cfg=av.cfg)
    assert np.isfinite(np.array(profile.change)[:, 1:]).all()
    all_compute = all_compute_schedule(profile.block_map, profile.grid)
    exact, _ = apply_block_cache(model, all_compute)
    assert torch.equal(sample(exact, *conds, av.latent(), steps=STEPS, cfg=av.cfg), reference)
    schedule = build_schedule(profile, BuildOptions(threshold=10.0,
                                                                                          cache_kinds="all"))
    patched, holder = apply_block_cache(model, schedule)
    out = sample(patched, *conds, av.latent(), steps=STEPS, cfg=av.cfg)
    assert holder.last_run.reused.sum() > 0 and holder.last_run.figures["cache"].stores > 0, "the blocks were cached and reused"
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    # A reused block rebuilds both streams: with the cache computed at the same step, the output is the
    # computed one (each stream's input + its cached residual).
    run = RunContext(holder, model.get_model_object("model_sampling"), torch.tensor([1.0, 0.5, 0.0]))
    block = model.model.diffusion_model.blocks[1]
    spec = holder.block_map.layers[1]
    patch = LayerForward(holder, 1, spec, block, block.forward, None)
    streams = (torch.randn(1, 56, 32), torch.randn(1, 8, 32))
    emb = torch.randn(1, 32)
    call = ModelCall(run, [None])
    run.begin_evaluation(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))
    with activate(call):
        computed = patch(streams, emb)
    run.end_evaluation()
    run.begin_evaluation(torch.zeros(1, 4, 8, 8), torch.tensor([0.5]))
    run.computes[:] = False
    with activate(ModelCall(run, [None])):
        reused = patch(streams, emb)
    assert run.stats.reused[1] == 1
    for got, want in zip(reused, computed, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    run.close()


def test_a_profiled_run_that_calls_no_mapped_layer_is_an_error(pack, tiny_model, conds, latent):
    """A run whose model calls none of the mapped layers (a model stage the map does not list) gives no profile
    of NaNs: collecting it says why."""
    import comfy.patcher_extension

    profiling, holder = attach_profiler(tiny_model)
    profiling.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_bypass",
                                   lambda executor, x, *args, **kwargs: torch.zeros_like(x))
    sample(profiling, *conds, latent, steps=3)
    assert holder.last_run.evaluations > 0 and not holder.last_run.computed.any()
    with pytest.raises(UnsupportedModelError, match="called none of the"):
        collect_profile(holder, tiny_model)
