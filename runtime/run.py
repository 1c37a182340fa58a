"""One sampling run: its context, its model calls, and the methods that act in it.

The runtime knows no method. A ``RunHolder`` is what one node installed (the block map, read-only
while sampling); each sampling run gets a ``RunContext``, which maps every solver evaluation onto
the run's steps once (tau, the step, one host sync) and hands the evaluation's boundaries and the
patched layers' calls to the run's ``RunMethod`` objects:

* the holder's *layer method* (Block Caching's cache or profile recording) answers every layer
  call: compute, or stand in with something else;
* run extensions (Faster Diffusion's noise injection) act at the evaluation boundaries.

Each patched layer's ``forward`` is a ``LayerForward`` object patch: inside a run it hands its
calls to the context, everywhere else it is the forward it replaced. Other wrappers of the same
node (parallel decoding) keep their per-run state in ``RunContext.attachments``. The context is
published in the run's ``transformer_options`` under ``WRAPPER_KEY``; layer patches reach it
through the current ``ModelCall`` (a ContextVar), so conds run in parallel threads keep apart.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..block_maps.block_map import BlockMap, LayerSpec
from .time_grid import StepGrid, TimeNormalizer

logger = logging.getLogger(__name__)

WRAPPER_KEY = "block_cache"


@dataclass
class RunStats:
    """What one sampling run computed; kept on the holder after the run for display and tests."""

    layer_names: tuple[str, ...]
    computed: np.ndarray  # [layers] real layer computations
    reused: np.ndarray  # [layers] calls served without computing
    evaluations: int = 0
    steps: int = 0
    retimed: bool = False  # the plan was moved onto this run's steps
    cache_resets: int = 0
    seconds: float = 0.0  # wall time of the sampling run
    peak_cache_bytes: int = 0  # the most memory the cached tensors held at once
    peak_history_bytes: int = 0  # of it, the most that forecast history (points beyond the newest) held
    stores: int = 0  # layer calls whose output was cached (a reuse could follow)
    offloaded: int = 0  # cached tensors copied to CPU memory
    sample_sigmas: torch.Tensor | None = None  # the run's sigmas, on the CPU
    sampler: str = ""  # the k-diffusion sampler's name, where known
    cfg: float | None = None  # the guider's CFG scale, where it has one
    latent_shape: tuple[int, ...] = ()
    injected_steps: list[int] = field(default_factory=list)  # prior noise injection's steps (Faster Diffusion)

    @property
    def total(self) -> int:
        return int(self.computed.sum() + self.reused.sum())


class RunMethod:
    """One method's state for one run. The run context calls these at its boundaries; each default
    does nothing."""

    def begin_evaluation(self, run: RunContext, x: torch.Tensor, sigma: torch.Tensor) -> None:
        """A solver evaluation starts (``run`` has its tau and step); ``x`` may be changed in place."""

    def end_evaluation(self, run: RunContext) -> None:
        """The evaluation is over, whether it completed or not."""

    def observe_denoised(self, run: RunContext, x: torch.Tensor, sigma: torch.Tensor,
                         denoised: torch.Tensor) -> None:
        """The evaluation completed with ``denoised``."""

    def reset(self, run: RunContext) -> None:
        """The latent changed shape, dtype or device: drop what was kept for the old one."""

    def close(self, run: RunContext) -> None:
        """The run is over: free everything, leave the figures in ``run.stats``."""


class LayerMethod(RunMethod):
    """The run method that answers the patched layers' calls (one per run: the holder's)."""

    def call_layer(self, run: RunContext, layer: LayerForward, call: ModelCall, occurrence: int,
                   module: torch.nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The layer's output for this call; ``forward`` computes it (on ``module``)."""
        return forward(*args, **kwargs)

    def call_model(self, run: RunContext, executor: Any, args: tuple, kwargs: dict) -> Any:
        """One diffusion-model call, inside its ``ModelCall`` scope."""
        return executor(*args, **kwargs)


class RunExtension(Protocol):
    """A method's configuration that acts in the holder's runs besides its layer method."""

    def start(self, run: RunContext) -> RunMethod | None: ...


class RunHolder:
    """What one node installed: the block map, never run state.

    Clones of the patched model share it (through their wrappers and object patches), so it is
    read-only during sampling. Each run gets its own ``RunContext``; the holder keeps only the
    last finished run's figures (``last_run``) for the node's display and for tests.
    """

    def __init__(self, block_map: BlockMap, name: str) -> None:
        self.block_map = block_map
        self.name = name
        self.extensions: list[RunExtension] = []
        # Called with (holder, stats) after every completed run, e.g. to show a summary in the UI.
        self.run_listeners: list[Callable[[RunHolder, RunStats], None]] = []
        self.last_run: RunStats | None = None

    @property
    def last_sample_sigmas(self) -> torch.Tensor | None:
        return self.last_run.sample_sigmas if self.last_run is not None else None

    def start_layer_method(self, run: RunContext) -> LayerMethod:
        """The layer method of a new run."""
        raise NotImplementedError

    def finish_run(self, run: RunContext, completed: bool) -> None:
        """After the run's context closed: keep what the node shows, log the run (if completed)."""


class RunContext:
    """Everything that lives for one sampling run, and nothing longer."""

    def __init__(self, holder: RunHolder, model_sampling: Any, sample_sigmas: torch.Tensor,
                 sampler_name: str = "") -> None:
        self.holder = holder
        self.model_sampling = model_sampling
        names = tuple(layer.name for layer in holder.block_map.layers)
        layers = len(names)
        sigmas = sample_sigmas.detach().to("cpu").reshape(-1)
        self.normalized_time = TimeNormalizer(model_sampling)
        step_taus = self.normalized_time(sigmas[:-1]) if sigmas.numel() > 1 else []
        self.stats = RunStats(names, np.zeros(layers, dtype=np.int64), np.zeros(layers, dtype=np.int64),
                              steps=len(step_taus), sample_sigmas=sigmas, sampler=sampler_name)
        self.sampler_name = sampler_name
        self.run_grid = StepGrid(sigmas=tuple(float(s) for s in sigmas), taus=tuple(step_taus))
        self.run_step: int | None = None  # the current evaluation's step of ``run_grid``
        self.evaluation_tau = 1.0  # its normalized time
        self.previous_run_step: int | None = None
        self.first_of_step = False  # the first evaluation of a new run step
        self.in_evaluation = False
        # Model calls per cond chunk in the current evaluation. Post-CFG patches (PAG, Skip-Layer
        # Guidance) call the model again with the same cond uuid; each such pass is a chunk of its own.
        self.passes: dict[Any, int] = {}
        self.latent_signature: tuple | None = None
        # Per-run state of wrappers installed beside the holder's (parallel decoding), by their patch.
        self.attachments: dict[Any, Any] = {}
        # Multi-GPU runs the conds of one evaluation in one thread per device: the methods take this lock
        # to count and to change their tables (the computations themselves run outside it).
        self.lock = threading.Lock()
        self.layer_method = holder.start_layer_method(self)
        extensions = [extension.start(self) for extension in holder.extensions]
        self.methods: list[RunMethod] = [self.layer_method, *(m for m in extensions if m is not None)]

    def close(self) -> RunStats:
        """Frees everything the methods kept; the run's figures stay in the returned stats."""
        for method in self.methods:
            method.close(self)
        return self.stats

    def begin_evaluation(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        signature = (tuple(x.shape), x.dtype, x.device)
        if self.latent_signature is not None and signature != self.latent_signature:
            # A new batch size, resolution, dtype or device: nothing kept for the old one fits.
            logger.info("%s: latent changed from %s to %s; cache reset.", self.holder.name, self.latent_signature,
                        signature)
            for method in self.methods:
                method.reset(self)
            self.previous_run_step = None
            self.stats.cache_resets += 1
        self.latent_signature = signature
        self.stats.latent_shape = tuple(x.shape)
        tau = self.normalized_time(sigma.reshape(-1)[:1])[0]  # the evaluation's one host sync
        self.run_step = self.run_grid.step_of(tau)
        self.first_of_step = self.previous_run_step is None or self.run_step != self.previous_run_step
        self.evaluation_tau = tau
        self.passes = {}
        self.in_evaluation = True
        self.stats.evaluations += 1
        for method in self.methods:
            method.begin_evaluation(self, x, sigma)

    def observe_denoised(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
        for method in self.methods:
            method.observe_denoised(self, x, sigma, denoised)

    def end_evaluation(self) -> None:
        self.previous_run_step = self.run_step
        self.in_evaluation = False
        for method in self.methods:
            method.end_evaluation(self)

    def model_call(self, chunk_keys: list[Any], base_model: Any = None) -> contextlib.AbstractContextManager[ModelCall]:
        """The scope of one diffusion-model call: layer patches called inside it act for this run."""
        return activate(ModelCall(self, chunk_keys, base_model))

    def call_layer(self, layer: LayerForward, call: ModelCall, args: tuple, kwargs: dict) -> Any:
        module, forward = layer.resolve(call.base_model)
        if not self.in_evaluation:
            return forward(*args, **kwargs)
        index = layer.layer_index
        occurrence = call.occurrences.get(index, 0)
        call.occurrences[index] = occurrence + 1
        return self.layer_method.call_layer(self, layer, call, occurrence, module, forward, args, kwargs)


@dataclass
class ModelCall:
    """One diffusion-model call of a run: the cond chunks it carries, and the calls of each layer in it.

    A block list may run a block more than once per call (OmniGen2's refiners, Wan VACE per control
    video), each with its own cache. Kept per call, not per run, so that conds run in parallel
    threads (multi-GPU) each count their own.
    """

    run: RunContext
    chunk_keys: list[Any]
    base_model: Any = None  # the model this call runs on: a clone's on another device, under multi-GPU
    occurrences: dict[int, int] = field(default_factory=dict)


_ACTIVE_CALL: contextvars.ContextVar[ModelCall | None] = contextvars.ContextVar("block_cache_model_call",
                                                                                default=None)


@contextlib.contextmanager
def activate(call: ModelCall) -> Iterator[ModelCall]:
    """Layer patches called inside this scope act for ``call``."""
    token = _ACTIVE_CALL.set(call)
    try:
        yield call
    finally:
        _ACTIVE_CALL.reset(token)


def active_call() -> ModelCall | None:
    """The model call running in this thread, if a Block Cache run started it."""
    return _ACTIVE_CALL.get()


class LayerForward:
    """The object patch that replaces one layer's ``forward``.

    It keeps the forward it replaced (the layer's own, or another pack's patch) and calls it
    whenever the layer must compute, so patches chain rather than overwrite. Outside a run of its
    holder it is that forward, untouched.
    """

    def __init__(self, holder: RunHolder, layer_index: int, spec: LayerSpec,
                 module: torch.nn.Module, original: Callable[..., Any], diffusion_model: torch.nn.Module) -> None:
        self.holder = holder
        self.layer_index = layer_index
        self.spec = spec
        self.module = module
        self.original = original
        self.diffusion_model = diffusion_model  # the model the patch was made on
        self._other_module_logged = False

    def resolve(self, base_model: Any) -> tuple[torch.nn.Module, Callable[..., Any]]:
        """The layer module this call runs on, and its forward. A clone moved onto other modules
        (multi-GPU, dynamic VRAM) carries this patch too: there the layer is looked up by name."""
        diffusion_model = getattr(base_model, "diffusion_model", None)
        if diffusion_model is None or diffusion_model is self.diffusion_model:
            return self.module, self.original
        module = diffusion_model.get_submodule(self.spec.name)
        if not self._other_module_logged:
            self._other_module_logged = True
            logger.info("%s: %s runs on another copy of the model (multi-GPU or dynamic VRAM); its own forward "
                        "is used there.", self.holder.name, self.spec.name)
        return module, type(module).forward.__get__(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = _ACTIVE_CALL.get()
        if call is None or call.run.holder is not self.holder:
            return self.original(*args, **kwargs)
        return call.run.call_layer(self, call, args, kwargs)

    def __repr__(self) -> str:
        return f"<Block Cache forward of {self.spec.name}>"


def run_context(options: dict | None) -> RunContext | None:
    """The run context published in ``transformer_options`` (or in ``model_options``' ones)."""
    if not options:
        return None
    transformer_options = options.get("transformer_options", options)
    context = transformer_options.get(WRAPPER_KEY) if isinstance(transformer_options, dict) else None
    return context if isinstance(context, RunContext) else None


def sampler_name_of(sampler: Any) -> str:
    """The k-diffusion name of a ComfyUI sampler object, e.g. 'heun' (empty when unknown)."""
    function = getattr(sampler, "sampler_function", None)
    return getattr(function, "__name__", "").removeprefix("sample_")
