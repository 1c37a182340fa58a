"""Finding a model's block map: the UNet's layers here, transformer block lists in ``dit_families``."""

from __future__ import annotations

import hashlib
import logging

from torch import nn

from ..errors import UnsupportedModelError
from .block_map import BlockMap, LayerKind, LayerSpec, ResidualForm, SkippedLayer
from .dit_families import DIT_FAMILIES, dit_layers, refusal_of

logger = logging.getLogger(__name__)


def supported_families() -> tuple[str, ...]:
    """Human-readable names of every mapped family, for errors and the README."""
    return ("UNet (SD1.x, SD2.x, SDXL base and refiner, and other SD-layout UNets)",
            *(family.name for family in DIT_FAMILIES))


def _unet_layer_kind(module: nn.Module) -> tuple[LayerKind, ResidualForm] | None:
    from comfy.ldm.modules.attention import SpatialTransformer, SpatialVideoTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample, VideoResBlock

    if isinstance(module, (VideoResBlock, SpatialVideoTransformer)):
        return None  # SVD's temporal layers take extra arguments and mix frames: not mapped yet
    if isinstance(module, SpatialTransformer):
        return LayerKind.ATTENTION, ResidualForm.IDENTITY
    if isinstance(module, ResBlock):
        if module.updown:
            return LayerKind.RESBLOCK, ResidualForm.NONE
        if isinstance(module.skip_connection, nn.Identity):
            return LayerKind.RESBLOCK, ResidualForm.IDENTITY
        return LayerKind.RESBLOCK, ResidualForm.SKIP_CONNECTION
    if isinstance(module, Downsample):
        return LayerKind.DOWNSAMPLE, ResidualForm.NONE
    if isinstance(module, Upsample):
        return LayerKind.UPSAMPLE, ResidualForm.NONE
    return None


_UNMAPPED_UNET_FIX = ("none in this version; the other layers are cached. Open an issue naming the layer class "
                      "to have it mapped in block_maps/mapping.py")


def _unet_layers(diffusion_model: nn.Module) -> tuple[list[LayerSpec], list[SkippedLayer]]:
    layers: list[LayerSpec] = []
    skipped: list[SkippedLayer] = []
    stages: list[tuple[str, str, list[nn.Module]]] = [
        ("input", "input_blocks", list(diffusion_model.input_blocks)),
        ("middle", "middle_block", [diffusion_model.middle_block] if diffusion_model.middle_block is not None else []),
        ("output", "output_blocks", list(diffusion_model.output_blocks)),
    ]
    for stage, attr, blocks in stages:
        for block_index, block in enumerate(blocks):
            for layer_index, layer in enumerate(block):
                name = f"{attr}.{layer_index}" if stage == "middle" else f"{attr}.{block_index}.{layer_index}"
                kind = _unet_layer_kind(layer)
                if kind is None:
                    if name != "input_blocks.0.0":  # conv_in: a single cheap conv, not a candidate
                        skipped.append(SkippedLayer(name, f"{type(layer).__name__} is not a mapped UNet layer "
                                                          "(SVD's temporal layers take extra arguments and mix "
                                                          "frames)", _UNMAPPED_UNET_FIX))
                    continue
                layers.append(LayerSpec(name=name, kind=kind[0], stage=stage, residual=kind[1]))
    return layers, skipped


def structural_fingerprint(diffusion_model: nn.Module, layers: list[LayerSpec]) -> str:
    """A hash of the layer names, classes and parameter shapes (not the weights)."""
    digest = hashlib.sha256()
    for spec in layers:
        module = diffusion_model.get_submodule(spec.name)
        digest.update(f"{spec.name}|{type(module).__name__}".encode())
        for pname, param in module.named_parameters():
            digest.update(f"|{pname}:{tuple(param.shape)}".encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def build_block_map(diffusion_model: nn.Module, model_type: str = "unknown") -> BlockMap:
    """Find the cacheable layers of ``diffusion_model``, and the ones that cannot be cached (``skipped``).

    Raises UnsupportedModelError, naming the model class, the supported families and the reasons
    blocks were skipped, when none are found.
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model_class = type(diffusion_model).__name__
    refusal = refusal_of(diffusion_model)
    if refusal is not None:
        raise UnsupportedModelError(f"{model_class} (model type {model_type}) is not cached: {refusal.reason}")
    if isinstance(diffusion_model, UNetModel):
        layers, skipped = _unet_layers(diffusion_model)
        family = "unet"
    else:
        family, layers, skipped, notes = dit_layers(diffusion_model)
        for note in notes:
            logger.info("Block Cache: %s: %s", model_class, note)
    if not layers:
        found = (" Blocks were found but none can be cached: " + "; ".join(s.describe() for s in skipped)
                 if skipped else " Other models are searched for lists of like transformer blocks; this one has none.")
        raise UnsupportedModelError(
            f"Block Cache found no cacheable layers in {model_class} (model type {model_type}): the model class "
            f"is unknown to it. Supported families: {'; '.join(supported_families())}.{found} Fix: use a model of "
            "a supported family, or open an issue naming the class so its block lists are added to "
            "block_maps/dit_families.py."
        )
    if skipped:
        logger.warning("Block Cache: %d of the %d candidate layers of %s cannot be cached and always run: %s",
                       len(skipped), len(skipped) + len(layers), model_class,
                       "; ".join(s.describe() for s in skipped))
    return BlockMap(
        family=family,
        model_type=model_type,
        model_class=model_class,
        layers=tuple(layers),
        fingerprint=structural_fingerprint(diffusion_model, layers),
        skipped=tuple(skipped),
    )


def block_map_for_patcher(model_patcher) -> BlockMap:
    """The block map of a ComfyUI ModelPatcher's diffusion model."""
    base_model = model_patcher.model
    model_type = type(getattr(base_model, "model_config", None)).__name__
    return build_block_map(model_patcher.get_model_object("diffusion_model"), model_type)
