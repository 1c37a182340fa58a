"""Block change profiles: how much each layer's residual branch changes per step.

The metric is the paper's Eq. 6, the relative L1 change of a layer's residual
branch between consecutive steps, ``|C(t) - C(t-1)|_1 / |C(t)|_1``, averaged over
batch items and cond/uncond chunks. For a layer with no residual form
(down/upsampling) the change of its output is measured instead. A layer with
several streams (a DiT block's img and txt) is measured over all of them pooled:
``sum_s |dC_s|_1 / sum_s |C_s|_1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .block_map import BlockMap
from .time_grid import StepGrid

# Keeps the metric finite where a residual branch is all zeros.
_NORM_EPSILON = 1e-12


@dataclass(frozen=True)
class BlockProfile:
    block_map: BlockMap
    grid: StepGrid
    change: tuple[tuple[float, ...], ...]  # [layer][step]; NaN where nothing was measured (step 0)
    layer_flops: tuple[float, ...]  # per model evaluation, one entry per layer
    total_flops: float  # the whole diffusion model, per model evaluation
    sample_count: int  # how many (batch item x cond chunk) series were averaged
    provenance: dict[str, Any] = field(default_factory=dict)

    def mean_change(self, layer_index: int) -> float:
        values = [v for v in self.change[layer_index] if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")


def merge_profiles(profiles: list[BlockProfile]) -> BlockProfile:
    """Average several profiles of one model on one step grid, weighted by sample count."""
    if not profiles:
        raise ValueError("nothing to merge")
    first = profiles[0]
    for other in profiles[1:]:
        if other.block_map.fingerprint != first.block_map.fingerprint:
            raise ValueError(
                "cannot merge profiles of different model structures "
                f"({first.block_map.model_type} {first.block_map.fingerprint} vs "
                f"{other.block_map.model_type} {other.block_map.fingerprint}); profile the same model"
            )
        if not other.grid.same_as(list(first.grid.taus)):
            raise ValueError(
                f"cannot merge profiles of different step grids ({first.grid.steps} vs {other.grid.steps} steps); "
                "profile with the same steps, sampler, scheduler and denoise"
            )
    total = sum(p.sample_count for p in profiles)
    merged: list[tuple[float, ...]] = []
    for layer in range(len(first.block_map.layers)):
        row = []
        for step in range(first.grid.steps):
            pairs = [(p.change[layer][step], p.sample_count) for p in profiles if not math.isnan(p.change[layer][step])]
            weight = sum(w for _, w in pairs)
            row.append(sum(v * w for v, w in pairs) / weight if weight else float("nan"))
        merged.append(tuple(row))
    return replace(
        first,
        change=tuple(merged),
        sample_count=total,
        provenance={**first.provenance, "merged_from": len(profiles)},
    )


class ProfileRecorder:
    """Accumulates the change metric during one profiling run.

    The runtime calls ``observe`` once per layer call at the first model evaluation of
    each step. Residual branches are kept per cond chunk (uuid), as detached copies:
    blocks change their inputs in place.
    """

    def __init__(self, block_map: BlockMap) -> None:
        self.block_map = block_map
        self.steps = 0
        self._previous: dict[tuple[int, Any, int], tuple[int, list[torch.Tensor]]] = {}
        self._sums: dict[tuple[int, int], torch.Tensor] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self.layer_flops: list[float] = [0.0] * len(block_map.layers)
        self.total_flops = 0.0
        self.samples_per_chunk = 0
        self.chunks_seen: set[Any] = set()

    def observe(self, layer_index: int, step: int, chunk_keys: list[Any], occurrence: int,
                branches: list[torch.Tensor | None]) -> None:
        """Record one layer call: ``branches`` holds each stream's residual branch (or output),
        for all chunks of the call; ``occurrence`` tells apart calls of one layer in one model call."""
        present = [b.detach().float() for b in branches if b is not None]
        if not present:
            return
        per_chunk = present[0].shape[0] // max(1, len(chunk_keys))
        self.samples_per_chunk = max(self.samples_per_chunk, per_chunk)
        for chunk, key in enumerate(chunk_keys):
            self.chunks_seen.add(key)
            current = [b[chunk * per_chunk:(chunk + 1) * per_chunk] for b in present]
            slot_key = (layer_index, key, occurrence)
            previous = self._previous.get(slot_key)
            if previous is not None and previous[0] < step and [p.shape for p in previous[1]] == [
                    c.shape for c in current]:
                diff = sum((c - p).abs().flatten(1).sum(1) for c, p in zip(current, previous[1], strict=True))
                norm = sum(c.abs().flatten(1).sum(1) for c in current).clamp_min(_NORM_EPSILON)
                rel = (diff / norm).sum()
                slot = (layer_index, step)
                self._sums[slot] = self._sums[slot] + rel if slot in self._sums else rel
                self._counts[slot] = self._counts.get(slot, 0) + per_chunk
            self._previous[slot_key] = (step, [c.clone() for c in current])

    def finish(self, grid: StepGrid, provenance: dict[str, Any]) -> BlockProfile:
        layers = len(self.block_map.layers)
        change = []
        for layer in range(layers):
            row = []
            for step in range(grid.steps):
                slot = (layer, step)
                row.append(float(self._sums[slot]) / self._counts[slot] if slot in self._counts else float("nan"))
            change.append(tuple(row))
        self._previous.clear()
        self._sums.clear()
        return BlockProfile(
            block_map=self.block_map,
            grid=grid,
            change=tuple(change),
            layer_flops=tuple(self.layer_flops),
            total_flops=self.total_flops,
            sample_count=max(1, self.samples_per_chunk * len(self.chunks_seen)),
            provenance=provenance,
        )
