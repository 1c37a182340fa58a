"""Per-model block maps: which layers of a diffusion model can be cached, and how.

A block map lists the cacheable *layers* of a model in execution order. Layers,
not UNet blocks, are the unit: ComfyUI's UNet calls each child of a block
directly (``forward_timestep_embed``), so only a layer's own ``forward`` can be
replaced through an object patch (see comfyui-host-api.md, the verified note).
In transformer (DiT) models the unit is a transformer block; ``dit_families``
maps them, and a layer may carry several streams (e.g. Flux's img and txt).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError

logger = logging.getLogger(__name__)


class LayerKind(str, Enum):
    ATTENTION = "attention"  # a UNet SpatialTransformer
    TRANSFORMER = "transformer"  # a DiT block (attention + MLP, one or more streams)
    RESBLOCK = "resblock"
    DOWNSAMPLE = "downsample"
    UPSAMPLE = "upsample"


class ReuseMode(str, Enum):
    """How a cached layer stands in for its computation."""

    RESIDUAL = "residual"  # current input + cached residual branch (Block Caching)
    OUTPUT = "output"  # the cached output as it was (Faster Diffusion's encoder propagation)


class ResidualForm(str, Enum):
    """What a layer's residual branch is measured against: ``output = base(input) + branch``."""

    IDENTITY = "identity"  # base(x) = x; per stream, for streams whose shape the layer keeps
    SKIP_CONNECTION = "skip_connection"  # base(x) = layer.skip_connection(x), a 1x1 conv
    NONE = "none"  # no residual form: the layer changes the shape (down/upsampling)


# Which layer kinds each "cache_kinds" choice of the schedule builder allows. A DiT is all
# transformer blocks, so "attention" caches them just as it caches a UNet's SpatialTransformers.
CACHE_KIND_CHOICES: dict[str, frozenset[LayerKind]] = {
    "attention": frozenset({LayerKind.ATTENTION, LayerKind.TRANSFORMER}),
    "attention+resblock": frozenset({LayerKind.ATTENTION, LayerKind.TRANSFORMER, LayerKind.RESBLOCK}),
    "all": frozenset(LayerKind),
}


class OutputForm(str, Enum):
    """What a layer's forward returns."""

    TENSOR = "tensor"
    TUPLE = "tuple"  # e.g. Flux double blocks: (img, txt)
    DICT = "dict"


@dataclass(frozen=True)
class Stream:
    """One element of a layer's output, and the input it is a residual update of.

    ``key`` is the element's index (tuple) or key (dict), None for a tensor output.
    ``parameter``/``position`` name the forward argument holding the stream's input
    (found by keyword first, then by position), ``item`` its element where that argument is a
    tuple of streams (an audio-video block's ``(video, audio)``); a stream with no input
    (``parameter`` None, e.g. VACE's c_skip) is always cached as an output.
    """

    key: int | str | None
    parameter: str | None
    position: int | None
    item: int | None = None  # the stream is this element of a tuple argument (audio-video blocks)

    def input_of(self, args: tuple, kwargs: dict) -> Any:
        if self.parameter is None:
            return None
        if self.parameter in kwargs:
            value = kwargs[self.parameter]
        elif self.position is not None and self.position < len(args):
            value = args[self.position]
        else:
            return None
        if self.item is None:
            return value
        return value[self.item] if isinstance(value, (tuple, list)) and self.item < len(value) else None


SINGLE_STREAM = (Stream(key=None, parameter="x", position=0),)


@dataclass(frozen=True)
class LayerSpec:
    """One cacheable layer. ``name`` is its path below ``diffusion_model``."""

    name: str
    kind: LayerKind
    stage: str  # UNet: "input", "middle", "output"; DiT: the block list, e.g. "double_blocks"
    residual: ResidualForm
    output_form: OutputForm = OutputForm.TENSOR
    streams: tuple[Stream, ...] = SINGLE_STREAM
    # DiT blocks update their inputs in place (Flux: img += ...): inputs must be copied before
    # the call wherever a residual is measured. UNet layers never do, and skip the copy.
    mutates_inputs: bool = False
    # Where the batch is in the stream tensors: 0, except Cosmos 1 blocks (T, H, W, B, D tokens).
    # The runtime caches and measures per cond chunk along it.
    batch_dim: int = 0

    def batch_first(self, value: Any) -> Any:
        """A stream tensor as a view with the batch first (what the cache and profile work on)."""
        return value.movedim(self.batch_dim, 0) if self.batch_dim and isinstance(value, torch.Tensor) else value

    def batch_back(self, value: Any) -> Any:
        """The inverse of ``batch_first``, laid out as the block itself returns it."""
        if self.batch_dim and isinstance(value, torch.Tensor):
            return value.movedim(0, self.batch_dim).contiguous()
        return value

    @property
    def patch_key(self) -> str:
        """The ModelPatcher object-patch key of this layer's ``forward``."""
        return f"diffusion_model.{self.name}.forward"

    @property
    def reuse_modes(self) -> tuple[ReuseMode, ...]:
        if self.residual is ResidualForm.NONE:
            return (ReuseMode.OUTPUT,)
        return (ReuseMode.RESIDUAL, ReuseMode.OUTPUT)

    def split_output(self, out: Any) -> list[Any]:
        """The output's stream elements, in ``streams`` order."""
        if self.output_form is OutputForm.TENSOR:
            return [out]
        return [out[stream.key] for stream in self.streams]

    def join_output(self, elements: list[Any]) -> Any:
        """The inverse of ``split_output``."""
        if self.output_form is OutputForm.TENSOR:
            return elements[0]
        if self.output_form is OutputForm.TUPLE:
            return tuple(elements)
        return {stream.key: element for stream, element in zip(self.streams, elements, strict=True)}

    def residual_base(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The part of the output that is not the residual branch, for input ``x``."""
        if self.residual is ResidualForm.IDENTITY:
            return x
        if self.residual is ResidualForm.SKIP_CONNECTION:
            return module.skip_connection(x)
        raise ValueError(f"layer {self.name} ({self.kind.value}) has no residual form; use reuse mode 'output'")


@dataclass(frozen=True)
class SkippedLayer:
    """A layer or block that looked cacheable but is not, so it always runs: why, and what would fix it."""

    name: str  # its path below diffusion_model, or its class where a whole kind is skipped
    reason: str
    fix: str

    def describe(self) -> str:
        return f"{self.name}: {self.reason}. Fix: {self.fix}"


@dataclass(frozen=True)
class BlockMap:
    family: str  # e.g. "unet"
    model_type: str  # ComfyUI's model config class, e.g. "SD15", "SDXL"
    model_class: str  # the diffusion model class, e.g. "UNetModel"
    layers: tuple[LayerSpec, ...]
    fingerprint: str  # structural: layer names, classes and parameter shapes; never weights
    # What is not cached, and why: Apply Block Cache reports it rather than skipping it silently.
    skipped: tuple[SkippedLayer, ...] = ()

    def index(self) -> dict[str, int]:
        return {layer.name: i for i, layer in enumerate(self.layers)}


def supported_families() -> tuple[str, ...]:
    """Human-readable names of every mapped family, for errors and the README."""
    from .dit_families import DIT_FAMILIES

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
                      "to have it mapped in block_maps/block_map.py")


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

    from .dit_families import dit_layers

    model_class = type(diffusion_model).__name__
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
