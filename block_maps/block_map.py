"""Per-model block maps: which layers of a diffusion model can be cached, and how.

A block map lists the cacheable *layers* of a model in execution order. Layers,
not UNet blocks, are the unit: ComfyUI's UNet calls each child of a block
directly (``forward_timestep_embed``), so only a layer's own ``forward`` can be
replaced through an object patch (see comfyui-host-api.md, the verified note).
In transformer (DiT) models the unit is a transformer block, and a layer may carry
several streams (e.g. Flux's img and txt). This module holds the map's types; ``mapping``
finds a model's layers (UNets itself, transformers through ``dit_families``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn


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


@dataclass(frozen=True)
class Stream:
    """One element of a layer's output, and the input it is a residual update of.

    ``key`` is the element's index in a tuple output, None for a tensor output.
    ``parameter``/``position`` name the forward argument holding the stream's input
    (found by keyword first, then by position), ``item`` its element where that argument is a
    tuple of streams (an audio-video block's ``(video, audio)``); a stream with no input
    (``parameter`` None, e.g. VACE's c_skip) is always cached as an output.
    """

    key: int | None
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
    # Where the batch is in the stream tensors: 0, except Cosmos 1 blocks (T, H, W, B, D tokens); None
    # where they carry no batch axis (MiniMax H3 packs one sample's tokens as (tokens, hidden)).
    # The runtime caches and measures per cond chunk along it.
    batch_dim: int | None = 0

    def batch_first(self, value: Any) -> Any:
        """A stream tensor as a view with the batch first (what the cache and profile work on)."""
        if not isinstance(value, torch.Tensor):
            return value
        if self.batch_dim is None:
            return value.unsqueeze(0)
        return value.movedim(self.batch_dim, 0) if self.batch_dim else value

    def batch_back(self, value: Any) -> Any:
        """The inverse of ``batch_first``, laid out as the block itself returns it."""
        if not isinstance(value, torch.Tensor):
            return value
        if self.batch_dim is None:
            return value.squeeze(0)
        return value.movedim(0, self.batch_dim).contiguous() if self.batch_dim else value

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
        return tuple(elements)

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
