"""Block change profiles: how much each layer's residual branch changes per step, and its trajectory.

The change metric is the paper's Eq. 6, the relative L1 change of a layer's residual
branch between consecutive steps, ``|C(t) - C(t-1)|_1 / |C(t)|_1``, averaged over
batch items and cond/uncond chunks. For a layer with no residual form
(down/upsampling) the change of its output is measured instead. A layer with
several streams (a DiT block's img and txt) is measured over all of them pooled:
``sum_s |dC_s|_1 / sum_s |C_s|_1``.

Nothing is kept at full size. Each layer call is reduced to a *sketch*: a fixed, seeded
sample of at most ``SKETCH_ELEMENTS`` elements per batch item and stream, scaled by
(elements / sampled) so that its L1 sums estimate the full ones. Eq. 6 is computed on the fly
between a sketch and the previous step's (only that one is kept), and a quarter of each sketch
(``TRAJECTORY_ELEMENTS`` per sample) is kept for every step: the *trajectory*, on which the
speed-up target builder measures the forecast error of any candidate schedule
(block_caching/target_schedule.py). A run's memory is thus well under a MB per layer, whatever the
resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..block_maps.block_map import BlockMap
from ..runtime.time_grid import StepGrid

# Keeps the metric finite where a residual branch is all zeros.
_NORM_EPSILON = 1e-12
# Elements sampled per batch item and stream; smaller tensors are kept whole (exact).
SKETCH_ELEMENTS = 2048
# Elements per sample (all streams of a call together) kept for every step for the error model.
TRAJECTORY_ELEMENTS = 512


@dataclass(frozen=True)
class Trajectory:
    """The uncached run's layer sketches at every step, for the error model of the schedule builder.

    ``sketches[layer]`` is [steps, samples, elements] (a sample is one batch item of one cond
    chunk and call), ``output_norms[layer]`` the L1 norm of the layer's output at the same
    elements, [steps, samples]; None for a layer not measured at every step. ``step_weights``
    is the relative change of the latent at each step of the uncached run: how much an error
    in the model's output at that step moves the picture.
    """

    sketches: tuple[torch.Tensor | None, ...]
    output_norms: tuple[torch.Tensor | None, ...]
    step_weights: tuple[float, ...]

    def merged_with(self, other: Trajectory) -> Trajectory:
        """Both runs' samples side by side (the same model and step grid)."""
        def join(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None or b is None or a.shape[2:] != b.shape[2:]:
                return None
            return torch.cat([a, b], dim=1)

        samples_a = _sample_count(self)
        samples_b = _sample_count(other)
        total = max(1, samples_a + samples_b)
        weights = tuple((wa * samples_a + wb * samples_b) / total
                        for wa, wb in zip(self.step_weights, other.step_weights, strict=True))
        return Trajectory(
            sketches=tuple(join(a, b) for a, b in zip(self.sketches, other.sketches, strict=True)),
            output_norms=tuple(join(a, b) for a, b in zip(self.output_norms, other.output_norms, strict=True)),
            step_weights=weights,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for group in (self.sketches, self.output_norms)
                   for t in group if t is not None)


def _sample_count(trajectory: Trajectory) -> int:
    return next((t.shape[1] for t in trajectory.sketches if t is not None), 0)


@dataclass(frozen=True)
class BlockProfile:
    block_map: BlockMap
    grid: StepGrid
    change: tuple[tuple[float, ...], ...]  # [layer][step]; NaN where nothing was measured (step 0)
    layer_flops: tuple[float, ...]  # per model evaluation, one entry per layer
    total_flops: float  # the whole diffusion model, per model evaluation
    sample_count: int  # how many (batch item x cond chunk) series were averaged
    provenance: dict[str, Any] = field(default_factory=dict)
    # In memory only (not in the JSON): what the speed-up target builder measures errors on, and how to
    # sample the profiled runs again (block_caching/replay.py ProfileReplay) to measure a schedule's real error.
    trajectory: Trajectory | None = None
    replays: tuple[Any, ...] = ()


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
            pairs = [(p.change[layer][step], p.sample_count) for p in profiles if p.change[layer][step] ==
                     p.change[layer][step]]  # NaN (unmeasured) is left out
            weight = sum(w for _, w in pairs)
            row.append(sum(v * w for v, w in pairs) / weight if weight else float("nan"))
        merged.append(tuple(row))
    trajectory = first.trajectory
    for other in profiles[1:]:
        trajectory = (trajectory.merged_with(other.trajectory)
                      if trajectory is not None and other.trajectory is not None else None)
    return replace(
        first,
        change=tuple(merged),
        sample_count=total,
        provenance={**first.provenance, "merged_from": len(profiles)},
        trajectory=trajectory,
        replays=tuple(replay for p in profiles for replay in p.replays),
    )


class ProfileRecorder:
    """Accumulates sketches during one profiling run.

    The profiling run method (block_caching/profiler.py) calls ``observe`` (or, with the streams
    already sketched, ``observe_sketches``) once per layer call at the first model evaluation of
    each step, and ``observe_step`` once per step with the latent and the model's denoised output.
    """

    def __init__(self, block_map: BlockMap) -> None:
        self.block_map = block_map
        # (layer, chunk key, occurrence) -> step -> (trajectory sketch [samples, elements], output norm [samples])
        self._series: dict[tuple[int, Any, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        # (layer, chunk key, occurrence) -> the last step recorded and its full sketch, for Eq. 6
        self._previous: dict[tuple[int, Any, int], tuple[int, torch.Tensor]] = {}
        self._change_sums: dict[tuple[int, int], float] = {}
        self._change_counts: dict[tuple[int, int], int] = {}
        self._step_weights: dict[int, float] = {}
        self._indices: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.layer_flops: list[float] = [0.0] * len(block_map.layers)
        self.total_flops = 0.0
        self.samples_per_chunk = 0
        self.chunks_seen: set[Any] = set()

    @property
    def nbytes(self) -> int:
        """What the recorder holds: every step's trajectory sketches, and the last full sketches."""
        held = [t for series in self._series.values() for pair in series.values() for t in pair]
        held += [sketch for _, sketch in self._previous.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def sketch(self, tensor: torch.Tensor) -> torch.Tensor:
        """[samples, elements] float32: a seeded sample of each batch item's elements, scaled so
        that L1 sums estimate the full tensor's. Linear: the sketch of a difference is the
        difference of the sketches."""
        flat = tensor.detach().reshape(tensor.shape[0], -1)
        size = flat.shape[1]
        if size <= SKETCH_ELEMENTS:
            return flat.to(torch.float32, copy=True)  # a copy: the block may update its input in place
        key = (size, flat.device)
        index = self._indices.get(key)
        if index is None:
            generator = torch.Generator().manual_seed(size)
            index = torch.randperm(size, generator=generator)[:SKETCH_ELEMENTS].sort().values.to(flat.device)
            self._indices[key] = index
        return flat.index_select(1, index).float() * (size / SKETCH_ELEMENTS)

    def observe(self, layer_index: int, step: int, chunk_keys: list[Any], occurrence: int,
                branches: list[torch.Tensor | None], outputs: list[Any]) -> None:
        """Record one layer call: ``branches`` holds each stream's residual branch (or output), and
        ``outputs`` the layer's output streams, for all chunks of the call (batch first);
        ``occurrence`` tells apart calls of one layer in one model call."""
        self.observe_sketches(layer_index, step, chunk_keys, occurrence,
                              [self.sketch(b) if b is not None and isinstance(o, torch.Tensor) else None
                               for b, o in zip(branches, outputs, strict=True)],
                              [self.sketch(o) if isinstance(o, torch.Tensor) else None for o in outputs])

    def observe_sketches(self, layer_index: int, step: int, chunk_keys: list[Any], occurrence: int,
                         branches: list[torch.Tensor | None], outputs: list[torch.Tensor | None]) -> None:
        """``observe`` with each stream's branch and output already sketched (``sketch``, batch first)."""
        pairs = [(b, o) for b, o in zip(branches, outputs, strict=True) if b is not None and o is not None]
        if not pairs:
            return
        chunks = max(1, len(chunk_keys))
        per_chunk = pairs[0][0].shape[0] // chunks
        self.samples_per_chunk = max(self.samples_per_chunk, per_chunk)
        for chunk, key in enumerate(chunk_keys):
            self.chunks_seen.add(key)
            rows = slice(chunk * per_chunk, (chunk + 1) * per_chunk)
            sketch = torch.cat([b[rows] for b, _ in pairs], dim=1)
            norm = sum(o[rows].abs().sum(1) for _, o in pairs)
            series_key = (layer_index, key, occurrence)
            series = self._series.setdefault(series_key, {})
            if step in series:
                continue  # a second evaluation of the step (Heun): the first one stands for it
            previous = self._previous.get(series_key)
            if previous is not None and previous[0] < step and previous[1].shape == sketch.shape:
                rel = (sketch - previous[1]).abs().sum(1) / sketch.abs().sum(1).clamp_min(_NORM_EPSILON)
                self._change_sums[(layer_index, step)] = self._change_sums.get((layer_index, step), 0.0) + \
                    float(rel.sum())
                self._change_counts[(layer_index, step)] = self._change_counts.get((layer_index, step), 0) + \
                    sketch.shape[0]
            self._previous[series_key] = (step, sketch)
            stride = max(1, sketch.shape[1] // TRAJECTORY_ELEMENTS)
            kept = sketch[:, ::stride]
            series[step] = (kept * (sketch.shape[1] / kept.shape[1]), norm)

    def observe_step(self, step: int, x: torch.Tensor, denoised: torch.Tensor, sigma: float,
                     next_sigma: float) -> None:
        """The latent's relative change over one step, as an Euler step from ``x`` to ``next_sigma``
        would make it: (1 - next_sigma / sigma) |x - denoised|_1 / |x|_1, averaged over the batch."""
        if step in self._step_weights or sigma <= 0:
            return
        x = x.detach().float().reshape(x.shape[0], -1)
        moved = (x - denoised.detach().float().reshape(x.shape[0], -1)).abs().sum(1)
        relative = float((moved / x.abs().sum(1).clamp_min(_NORM_EPSILON)).mean())
        self._step_weights[step] = max(0.0, 1.0 - next_sigma / sigma) * relative

    def finish(self, grid: StepGrid, provenance: dict[str, Any]) -> BlockProfile:
        layers = len(self.block_map.layers)
        change = [[float("nan")] * grid.steps for _ in range(layers)]
        for (layer, step), count in self._change_counts.items():
            if step < grid.steps:
                change[layer][step] = self._change_sums[(layer, step)] / count
        by_layer: dict[int, list[dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
        for (layer, _, _), series in self._series.items():
            by_layer.setdefault(layer, []).append(series)
        trajectory = self._trajectory(grid.steps, by_layer)
        self._series.clear()
        self._previous.clear()
        return BlockProfile(
            block_map=self.block_map,
            grid=grid,
            change=tuple(tuple(row) for row in change),
            layer_flops=tuple(self.layer_flops),
            total_flops=self.total_flops,
            sample_count=max(1, self.samples_per_chunk * len(self.chunks_seen)),
            provenance=provenance,
            trajectory=trajectory,
        )

    def _trajectory(self, steps: int, by_layer: dict[int, list[dict[int, tuple[torch.Tensor, torch.Tensor]]]]
                    ) -> Trajectory:
        sketches: list[torch.Tensor | None] = []
        norms: list[torch.Tensor | None] = []
        for layer in range(len(self.block_map.layers)):
            # Only series measured at every step, with one shape throughout, say how the layer evolves.
            complete = [s for s in by_layer.get(layer, []) if all(step in s for step in range(steps))
                        and len({s[step][0].shape for step in range(steps)}) == 1]
            if not complete or steps == 0:
                sketches.append(None)
                norms.append(None)
                continue
            sketches.append(torch.stack([torch.cat([s[step][0] for s in complete]) for step in range(steps)]).cpu())
            norms.append(torch.stack([torch.cat([s[step][1] for s in complete]) for step in range(steps)]).cpu())
        weights = tuple(self._step_weights.get(step, 0.0) for step in range(steps))
        return Trajectory(tuple(sketches), tuple(norms), weights)
