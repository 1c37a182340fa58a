"""Block Caching's profiling run method: every layer computes, and the recorder sketches each change.

``attach_profiler`` (block_caching/patching.py) installs a ``ProfilerHolder``; in each of its
runs a ``ProfilingRun`` hands the first computation of every step to a ``ProfileRecorder``
(block_caching/profile.py), measures the layers' FLOPs at the first evaluation, and how far each
step moves the latent (the error model's step weights).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..block_maps.block_map import LayerSpec, ResidualForm
from ..runtime.run import LayerForward, LayerMethod, ModelCall, RunContext, RunHolder
from .layer_calls import layer_outputs, residual_branches, stream_inputs
from .profile import ProfileRecorder

logger = logging.getLogger(__name__)


class ProfilerHolder(RunHolder):
    """What one Profile (or Record) node installed; its last run's recording stays for collecting."""

    def __init__(self, block_map: Any, name: str = "Block Cache profiler") -> None:
        super().__init__(block_map, name)
        self.last_recording: ProfileRecorder | None = None

    def start_layer_method(self, run: RunContext) -> ProfilingRun:
        return ProfilingRun(ProfileRecorder(self.block_map))

    def finish_run(self, run: RunContext, completed: bool) -> None:
        recording = run.layer_method
        self.last_recording = recording.recorder if isinstance(recording, ProfilingRun) else None
        if completed:
            stats = run.stats
            logger.info("%s: profiled %d layers over %d steps (%d model evaluations).",
                        self.name, len(stats.layer_names), stats.steps, stats.evaluations)


class ProfilingRun(LayerMethod):
    """One profiling run: every layer computes; the first evaluation of each step is recorded."""

    def __init__(self, recorder: ProfileRecorder) -> None:
        self.recorder = recorder
        self.measure_flops = True  # at the first evaluation only: FLOPs do not change between steps

    def end_evaluation(self, run: RunContext) -> None:
        self.measure_flops = False

    def call_model(self, run: RunContext, executor: Any, args: tuple, kwargs: dict) -> Any:
        if not self.measure_flops:
            return executor(*args, **kwargs)
        counter = FlopCounterMode(display=False)
        with counter:
            out = executor(*args, **kwargs)
        self.recorder.total_flops = float(counter.get_total_flops())
        return out

    def call_layer(self, run: RunContext, layer: LayerForward, call: ModelCall, occurrence: int,
                   module: torch.nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        index = layer.layer_index
        spec = layer.spec
        recording = run.first_of_step
        identity = spec.residual is ResidualForm.IDENTITY
        inputs = None
        if recording:
            inputs = stream_inputs(spec, args, kwargs, copy=spec.mutates_inputs and not identity)
            if identity:
                # The inputs' sketches, taken before the block may update them in place: a residual's
                # sketch is the output's minus the input's, so no input is copied and no full-size
                # residual is made (a DiT block's stream is tens of MB).
                inputs = [(self.recorder.sketch(v), v.shape) if _batched(v) else None for v in inputs]
        if self.measure_flops:
            counter = FlopCounterMode(display=False)
            with counter:
                out = forward(*args, **kwargs)
            self.recorder.layer_flops[index] = float(counter.get_total_flops())
        else:
            out = forward(*args, **kwargs)
        with run.lock:
            run.stats.computed[index] += 1
        if inputs is not None:
            keys = call.chunk_keys
            if identity:
                self._observe_identity(run, index, keys, occurrence, spec, inputs, out)
            else:
                branches = residual_branches(spec, module, inputs, out, True, len(keys))
                outputs = layer_outputs(spec, out) if branches is not None else None
                if outputs is not None:
                    with run.lock:
                        self.recorder.observe(index, run.run_step, keys, occurrence, [b for b, _ in branches],
                                              outputs)
        return out

    def _observe_identity(self, run: RunContext, index: int, keys: list[Any], occurrence: int, spec: LayerSpec,
                          input_sketches: list[tuple[torch.Tensor, torch.Size] | None], out: Any) -> None:
        outputs = layer_outputs(spec, out)
        if outputs is None:
            return  # the block returned something its signature does not describe
        branches: list[torch.Tensor | None] = []
        output_sketches: list[torch.Tensor | None] = []
        for before, output in zip(input_sketches, outputs, strict=True):
            if output is None:
                branches.append(None)
                output_sketches.append(None)
                continue
            if not _batched(output) or output.shape[0] % len(keys) != 0:
                return  # not a batch of the call's cond chunks
            after = self.recorder.sketch(output)
            residual = before is not None and before[1] == output.shape  # as residual_branches decides
            branches.append(after - before[0] if residual else after)
            output_sketches.append(after)
        with run.lock:
            self.recorder.observe_sketches(index, run.run_step, keys, occurrence, branches, output_sketches)

    def observe_denoised(self, run: RunContext, x: torch.Tensor, sigma: torch.Tensor,
                         denoised: torch.Tensor) -> None:
        """How far each step moves the latent (the error model's step weights)."""
        sigmas = run.stats.sample_sigmas
        step = run.run_step
        if not run.first_of_step or step is None or sigmas is None or step + 1 >= sigmas.numel():
            return
        self.recorder.observe_step(step, x, denoised, float(sigma.reshape(-1)[0]), float(sigmas[step + 1]))


def _batched(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0
