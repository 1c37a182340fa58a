"""What a layer call takes and gives, per stream of its block signature: shared by the cache, the
profiler and calibration, which all read a mapped layer's inputs and outputs the same way."""

from __future__ import annotations

from typing import Any

import torch

from ..block_maps.block_map import LayerSpec, ResidualForm


def layer_outputs(spec: LayerSpec, out: Any) -> list[Any] | None:
    """A layer's output per stream, batch first; None where the block returned something its signature
    does not describe."""
    try:
        return [spec.batch_first(output) for output in spec.split_output(out)]
    except (KeyError, IndexError, TypeError):
        return None


def stream_inputs(spec: LayerSpec, args: tuple, kwargs: dict, copy: bool) -> list[Any]:
    values = [spec.batch_first(stream.input_of(args, kwargs)) for stream in spec.streams]
    if copy:
        values = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in values]
    return values


def residual_branches(spec: LayerSpec, module: torch.nn.Module, inputs: list[Any], out: Any, residual_wanted: bool,
              chunks: int) -> list[tuple[torch.Tensor | None, bool]] | None:
    """Per stream: (residual branch or output copy, is residual); None if the call cannot be cached.

    A stream is cached as a residual where the layer has a residual form and, for an identity
    residual, keeps the stream's shape; otherwise as its output.
    """
    outputs = layer_outputs(spec, out)
    if outputs is None:
        return None
    result: list[tuple[torch.Tensor | None, bool]] = []
    for current, output in zip(inputs, outputs, strict=True):
        if output is None:
            result.append((None, False))
            continue
        if not isinstance(output, torch.Tensor) or output.ndim == 0 or output.shape[0] % chunks != 0:
            return None  # not a batch of the call's cond chunks: nothing per chunk to cache
        residual = residual_wanted and isinstance(current, torch.Tensor) and (
            spec.residual is ResidualForm.SKIP_CONNECTION or
            (spec.residual is ResidualForm.IDENTITY and current.shape == output.shape))
        if residual:
            result.append(((output - spec.residual_base(module, current)).detach(), True))
        else:
            result.append((output.detach().clone(), False))
    return result
