"""Block Caching's scale-shift adjustment (Sec. 3.4): a learned correction of reused features.

Where a layer is served from the cache, its stale tensor (the residual branch, or the
output in ``output`` mode) is corrected per channel before the next layer receives it:

    corrected = cached * (1 + scale[step]) + shift[step]

The paper predicts scale and shift from the timestep embedding with a linear layer. We keep
a table with one row per step of the schedule's grid instead: a schedule is a fixed list of
steps, re-timed runs map every evaluation onto one of them, and staleness (how many steps ago
the cache was filled) is a function of the step, so a per-step row can express everything the
linear layer can on that grid, with no embedding-width dependence (UNets and DiTs alike), and
each row trains from the first iteration instead of through a shared projection.
Zero rows are the identity, so an untrained table changes nothing, bit for bit.

Files are safetensors: ``<layer>#<stream>.scale`` / ``.shift`` tensors of [steps, channels]
float32, with metadata tying them to one schedule and one model structure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..block_maps.block_map import BlockMap, LayerKind, LayerSpec
from ..errors import ScheduleFileError, ScheduleMismatchError

FILE_FORMAT = "block-cache-scale-shift"
FILE_VERSION = 1
FILE_SUFFIX = ".scale_shift.safetensors"  # the file itself is written and read by schedule_files/storage.py
MAX_FILE_BYTES = 2 * 1024**3


def channel_dim(spec: LayerSpec) -> int:
    """Where a layer's stream tensors keep their channels once the batch is first: UNet layers
    return N, C, H, W (or N, C, T, H, W); DiT blocks return tokens, N, L, C."""
    return -1 if spec.kind is LayerKind.TRANSFORMER else 1


@dataclass
class StreamCorrection:
    """One cached stream's per-step, per-channel correction; all zeros is the identity."""

    scale: torch.Tensor  # [steps, channels]; the factor applied is 1 + scale
    shift: torch.Tensor  # [steps, channels]
    dim: int  # the channel dimension of the corrected tensor (batch first)
    # (1 + scale, shift) converted to each (device, dtype) they were applied in: a sampling run applies
    # them at every reuse, and must not copy them to the device each time. Not kept while training.
    _converted: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False)

    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._converted.get((device, dtype))
        if tables is None:
            tables = ((1 + self.scale).to(device=device, dtype=dtype), self.shift.to(device=device, dtype=dtype))
            self._converted[(device, dtype)] = tables
        return tables

    def apply(self, cached: torch.Tensor, step: int) -> torch.Tensor:
        channels = cached.shape[self.dim]
        if channels != self.scale.shape[1]:
            raise ScheduleMismatchError(
                f"Scale-shift parameters hold {self.scale.shape[1]} channels but the cached tensor has {channels}: "
                "they were trained for another model. Calibrate again for this model, or load the schedule "
                "without its calibration.")
        shape = [1] * cached.ndim
        shape[self.dim] = channels
        if self.scale.requires_grad:  # training: the tensors change every step and must stay in the graph
            factor = (1 + self.scale[step]).to(device=cached.device, dtype=cached.dtype)
            offset = self.shift[step].to(device=cached.device, dtype=cached.dtype)
        else:
            factors, offsets = self._tables(cached.device, cached.dtype)
            factor, offset = factors[step], offsets[step]
        return cached * factor.reshape(shape) + offset.reshape(shape)


class ScaleShiftTable:
    """The corrections of one schedule: per (layer name, stream index), a ``StreamCorrection``."""

    def __init__(self, schedule_fingerprint: str, model_fingerprint: str, steps: int,
                 entries: dict[tuple[str, int], StreamCorrection] | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        self.schedule_fingerprint = schedule_fingerprint
        self.model_fingerprint = model_fingerprint
        self.steps = steps
        self.entries: dict[tuple[str, int], StreamCorrection] = dict(entries or {})
        self.metadata: dict[str, str] = dict(metadata or {})  # training facts, shown to users

    def entry(self, layer: str, stream: int, spec: LayerSpec, channels: int,
              device: torch.device | None = None) -> StreamCorrection:
        """The stream's correction, created as the identity when missing (training)."""
        found = self.entries.get((layer, stream))
        if found is None:
            zeros = torch.zeros(self.steps, channels, dtype=torch.float32, device=device)
            found = StreamCorrection(zeros, zeros.clone(), channel_dim(spec))
            self.entries[(layer, stream)] = found
        return found

    def bind(self, block_map: BlockMap) -> list[list[StreamCorrection | None]]:
        """Per layer of ``block_map`` (in its order), per stream: the correction or None."""
        bound = []
        for spec in block_map.layers:
            row: list[StreamCorrection | None] = []
            for stream in range(len(spec.streams)):
                entry = self.entries.get((spec.name, stream))
                if entry is not None:
                    entry.dim = channel_dim(spec)
                row.append(entry)
            bound.append(row)
        return bound

    def check_matches(self, schedule_fingerprint: str, model_fingerprint: str | None = None) -> None:
        if schedule_fingerprint != self.schedule_fingerprint:
            raise ScheduleMismatchError(
                f"These scale-shift parameters were calibrated for another schedule (fingerprint "
                f"{self.schedule_fingerprint}, this schedule {schedule_fingerprint}). Calibrate this schedule with "
                "Calibrate Block Cache, or use the schedule they were saved with.")
        if model_fingerprint is not None and model_fingerprint != self.model_fingerprint:
            raise ScheduleMismatchError(
                f"These scale-shift parameters were calibrated on a model with another structure (fingerprint "
                f"{self.model_fingerprint}, this model {model_fingerprint}); per-channel corrections cannot carry "
                "over. Calibrate the schedule on this model.")

    def detached(self) -> ScaleShiftTable:
        """A copy on the CPU with no autograd history: what is saved and applied after training."""
        entries = {key: StreamCorrection(e.scale.detach().float().cpu().clone(), e.shift.detach().float().cpu().clone(),
                                         e.dim) for key, e in self.entries.items()}
        return ScaleShiftTable(self.schedule_fingerprint, self.model_fingerprint, self.steps, entries, self.metadata)

    # -- the safetensors file's contents ----------------------------------------------------------
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The file's tensors and metadata (``from_tensors`` reads them back)."""
        tensors = {}
        for (layer, stream), entry in sorted(self.entries.items()):
            tensors[f"{layer}#{stream}.scale"] = entry.scale.detach().float().cpu().contiguous()
            tensors[f"{layer}#{stream}.shift"] = entry.shift.detach().float().cpu().contiguous()
        metadata = {
            "format": FILE_FORMAT, "version": str(FILE_VERSION), "schedule_fingerprint": self.schedule_fingerprint,
            "model_fingerprint": self.model_fingerprint, "steps": str(self.steps),
            "training": json.dumps(self.metadata, sort_keys=True),
        }
        return tensors, metadata

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> ScaleShiftTable:
        def fail(problem: str) -> ScheduleFileError:
            return ScheduleFileError(f"{name} is not valid Block Cache scale-shift parameters: {problem}. "
                                     "Calibrate the schedule again with Calibrate Block Cache.")

        if metadata.get("format") != FILE_FORMAT:
            raise fail(f"format {metadata.get('format')!r}, expected {FILE_FORMAT!r}")
        if metadata.get("version") != str(FILE_VERSION):
            raise fail(f"version {metadata.get('version')!r}; this Block Cache reads version {FILE_VERSION}")
        try:
            steps = int(metadata.get("steps", ""))
            training = json.loads(metadata.get("training", "{}"))
        except ValueError:
            raise fail("bad steps or training metadata") from None
        if not 1 <= steps <= 10_000 or not isinstance(training, dict):
            raise fail("bad steps or training metadata")
        entries: dict[tuple[str, int], StreamCorrection] = {}
        for key, tensor in tensors.items():
            stem, _, part = key.rpartition(".")
            layer, _, stream = stem.rpartition("#")
            if part not in ("scale", "shift") or not layer or not stream.isdigit():
                raise fail(f"unexpected tensor {key!r}")
            if tensor.ndim != 2 or tensor.shape[0] != steps or not tensor.is_floating_point():
                raise fail(f"{key} has shape {tuple(tensor.shape)}, expected [{steps}, channels]")
            if not torch.isfinite(tensor).all():
                raise fail(f"{key} holds NaN or infinite values")
            if part == "scale":  # the pair is completed below
                entries[(layer, int(stream))] = StreamCorrection(tensor.float(), torch.empty(0), 1)
        for (layer, stream), entry in entries.items():
            shift = tensors.get(f"{layer}#{stream}.shift")
            if shift is None or shift.shape != entry.scale.shape:
                raise fail(f"{layer}#{stream} has a scale without a matching shift")
            entry.shift = shift.float()
        if len(tensors) != 2 * len(entries):
            raise fail("a shift without a matching scale")
        return cls(str(metadata.get("schedule_fingerprint", "")), str(metadata.get("model_fingerprint", "")), steps,
                   entries, {str(k): str(v) for k, v in training.items()})
