"""One sampling run: its context, its model calls, and the methods that act in it.

The runtime knows no method. A ``RunHolder`` is what one node installed (the block map and the
run extensions, read-only while sampling); each sampling run gets a ``RunContext``, which maps
every solver evaluation onto the run's steps once (tau, the step, one host sync) and hands the
run's boundaries and calls to the run's ``RunMethod`` objects, in one declared order: the holder's
layer method first, then each extension's method in the order the extensions were installed.

* the holder's *layer method* (Block Caching's cache or profile recording) answers every mapped
  layer call (compute, or stand in with something else) and says which layers compute in each
  evaluation (``RunContext.computes``);
* run extensions (Faster Diffusion's noise injection and parallel decoding, calibration) act at the
  evaluation boundaries, around each evaluation, around each diffusion-model call, and on the extra
  layers they name (``RunExtension.patched_layers``).

Around-hooks nest in that order: the first method's is the outermost. Only runtime/wrappers.py
registers ComfyUI wrappers and object patches. Each patched layer's ``forward`` is a
``LayerForward`` (or ``ExtensionLayerForward``) object patch: inside a run it hands its calls to
the context, everywhere else it is the forward it replaced. The context is published in the run's
``transformer_options`` under ``WRAPPER_KEY``; layer patches reach it through the current
``ModelCall`` (a ContextVar), so conds run in parallel threads keep apart.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..block_maps.block_map import BlockMap, LayerSpec
from .time_grid import StepGrid, TimeNormalizer

logger = logging.getLogger(__name__)

WRAPPER_KEY = "block_cache"


@dataclass
class RunStats:
    """What one sampling run computed; kept on the holder after the run for display and tests. The
    runtime's own figures, and each method's under its name (``RunMethod.name``)."""

    layer_names: tuple[str, ...]
    computed: np.ndarray  # [layers] real layer computations
    reused: np.ndarray  # [layers] calls served without computing
    evaluations: int = 0
    unevaluated: int = 0  # evaluations a method answered without running the model (a lookahead's)
    steps: int = 0
    cache_resets: int = 0  # the latent changed inside the run: every method dropped what it kept
    seconds: float = 0.0  # wall time of the sampling run
    sample_sigmas: torch.Tensor | None = None  # the run's sigmas, on the CPU
    sampler: str = ""  # the k-diffusion sampler's name, where known
    cfg: float | None = None  # the guider's CFG scale, where it has one
    latent_shape: tuple[int, ...] = ()
    figures: dict[str, Any] = field(default_factory=dict)  # each method's ``figures()``, by its name

    @property
    def total(self) -> int:
        return int(self.computed.sum() + self.reused.sum())


class RunMethod:
    """One method's state for one run. The run context calls these at its boundaries; each default
    does nothing (or, for the around-hooks, just proceeds)."""

    name = ""  # where its figures are kept in ``RunStats.figures``

    def begin_evaluation(self, run: RunContext, x: torch.Tensor, sigma: torch.Tensor) -> None:
        """A solver evaluation starts (``run`` has its tau, step and ``computes``); ``x`` may be changed in place."""

    def around_evaluation(self, run: RunContext, evaluate: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The evaluation's denoised output. Each call of ``evaluate`` is a fresh pass of all model calls
        (calibration runs a teacher pass before the student's); ``run.evaluate_at`` runs one on other inputs, and
        not calling it answers the evaluation without the model."""
        return evaluate()

    def around_diffusion_model(self, run: RunContext, call: ModelCall, proceed: Callable[..., Any], args: tuple,
                               kwargs: dict, others_inside: bool) -> Any:
        """One diffusion-model call (ComfyUI's arguments); ``others_inside``: another node's
        DIFFUSION_MODEL wrapper runs inside the runtime's. Only for extensions that ask for it
        (``RunExtension.wraps_diffusion_model``)."""
        return proceed(*args, **kwargs)

    def call_patched_layer(self, run: RunContext, call: ModelCall, name: str, module: torch.nn.Module,
                           forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """A call of one of the extension's ``patched_layers`` inside an evaluation."""
        return forward(*args, **kwargs)

    def end_evaluation(self, run: RunContext) -> None:
        """The evaluation is over, whether it completed or not."""

    def observe_denoised(self, run: RunContext, x: torch.Tensor, sigma: torch.Tensor,
                         denoised: torch.Tensor) -> None:
        """The evaluation completed with ``denoised``."""

    def reset(self, run: RunContext) -> None:
        """The latent changed shape, dtype or device: drop what was kept for the old one."""

    def close(self, run: RunContext) -> None:
        """The run is over: free everything (``figures`` is read after)."""

    def figures(self) -> Any:
        """This method's own figures of the run, kept in ``RunStats.figures`` (None: it has none)."""
        return None


class LayerMethod(RunMethod):
    """The run method that answers the patched layers' calls (one per run: the holder's)."""

    def decisions(self, run: RunContext, previous_step: int | None, step: int) -> np.ndarray | None:
        """Per layer: computed at an evaluation of run step ``step`` after one of ``previous_step``
        (None: the first, or after a reset)? None: every layer computes."""
        return None

    def call_layer(self, run: RunContext, layer: LayerForward, call: ModelCall, occurrence: int,
                   module: torch.nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The layer's output for this call; ``forward`` computes it (on ``module``)."""
        return forward(*args, **kwargs)

    def call_model(self, run: RunContext, executor: Any, args: tuple, kwargs: dict) -> Any:
        """One diffusion-model call, inside its ``ModelCall`` scope."""
        return executor(*args, **kwargs)


class RunExtension:
    """A method's configuration, installed on a holder, that acts in its runs besides the layer method."""

    # Modules of the diffusion model (by name) whose forward this extension's run method answers.
    patched_layers: tuple[str, ...] = ()
    # Whether its run method acts around each diffusion-model call (a DIFFUSION_MODEL wrapper is installed).
    wraps_diffusion_model: bool = False

    def start(self, run: RunContext) -> RunMethod | None:
        """This run's method; None when it has nothing to do in this run."""
        raise NotImplementedError


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
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None  # the model's inputs where not the sampler's
        # Per layer: computed in the current evaluation (the layer method's decisions; None: all).
        self.computes: np.ndarray | None = None
        # Multi-GPU runs the conds of one evaluation in one thread per device: the methods take this lock
        # to count and to change their tables (the computations themselves run outside it).
        self.lock = threading.Lock()
        self.layer_method = holder.start_layer_method(self)
        # Each extension's method of this run, in the holder's order.
        self.extension_methods: dict[RunExtension, RunMethod] = {}
        for extension in holder.extensions:
            method = extension.start(self)
            if method is not None:
                self.extension_methods[extension] = method
        self.methods: list[RunMethod] = [self.layer_method, *self.extension_methods.values()]

    def close(self) -> RunStats:
        """Frees everything the methods kept; the run's figures stay in the returned stats."""
        for method in self.methods:
            method.close(self)
            figures = method.figures()
            if figures is not None:
                self.stats.figures[method.name] = figures
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
        self.computes = self.layer_method.decisions(self, self.previous_run_step, self.run_step)
        self.passes = {}
        self.in_evaluation = True
        self.stats.evaluations += 1
        for method in self.methods:
            method.begin_evaluation(self, x, sigma)

    def planned_computes(self, previous_step: int | None, step: int) -> np.ndarray | None:
        """``computes`` of a coming evaluation at run step ``step`` after one at ``previous_step``."""
        return self.layer_method.decisions(self, previous_step, step)

    def evaluate(self, model_evaluation: Callable[[tuple[torch.Tensor, torch.Tensor] | None], torch.Tensor]
                 ) -> torch.Tensor:
        """The current evaluation's output, through every method's ``around_evaluation``.
        ``model_evaluation(inputs)`` runs the model on the sampler's (x, sigma), or on ``inputs`` (``evaluate_at``)."""
        model_passes = 0

        def fresh_pass() -> torch.Tensor:
            nonlocal model_passes
            model_passes += 1
            self.passes = {}  # the pass's model calls are the evaluation's first again
            return model_evaluation(self._inputs)

        evaluate = fresh_pass
        for method in reversed(self.methods):
            evaluate = functools.partial(method.around_evaluation, self, evaluate)
        denoised = evaluate()
        if not model_passes:
            self.stats.unevaluated += 1
        return denoised

    def evaluate_at(self, evaluate: Callable[[], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor
                    ) -> torch.Tensor:
        """``evaluate`` (an ``around_evaluation``'s) with the model run on ``x`` at ``sigma`` instead of the
        sampler's inputs: a lookahead's predicted point (block_caching/lookahead.py)."""
        self._inputs = (x, sigma)
        try:
            return evaluate()
        finally:
            self._inputs = None

    def call_diffusion_model(self, call: ModelCall, executor: Callable[..., Any], args: tuple, kwargs: dict,
                             others_inside: bool) -> Any:
        """One diffusion-model call, through every method's ``around_diffusion_model``."""
        proceed = executor
        for method in reversed(self.methods):
            proceed = _around_diffusion_model(method, self, call, proceed, others_inside)
        return proceed(*args, **kwargs)

    def observe_denoised(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
        for method in self.methods:
            method.observe_denoised(self, x, sigma, denoised)

    def end_evaluation(self) -> None:
        self.previous_run_step = self.run_step
        self.in_evaluation = False
        self.computes = None
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

    def call_patched_layer(self, layer: ExtensionLayerForward, call: ModelCall, args: tuple, kwargs: dict) -> Any:
        module, forward = layer.resolve(call.base_model)
        method = self.extension_methods.get(layer.extension)
        if method is None or not self.in_evaluation:
            return forward(*args, **kwargs)
        return method.call_patched_layer(self, call, layer.name, module, forward, args, kwargs)


def _around_diffusion_model(method: RunMethod, run: RunContext, call: ModelCall, inner: Callable[..., Any],
                            others_inside: bool) -> Callable[..., Any]:
    def proceed(*args: Any, **kwargs: Any) -> Any:
        return method.around_diffusion_model(run, call, inner, args, kwargs, others_inside)
    return proceed


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


class ForwardPatch:
    """An object patch that replaces one module's ``forward`` for the runs of its holder.

    It keeps the forward it replaced (the module's own, or another pack's patch) and calls it
    whenever the module must compute, so patches chain rather than overwrite. Outside a run of its
    holder it is that forward, untouched.
    """

    def __init__(self, holder: RunHolder, name: str, module: torch.nn.Module, original: Callable[..., Any],
                 diffusion_model: torch.nn.Module, replaced_a_patch: bool = False) -> None:
        self.holder = holder
        self.name = name  # the module's name in the diffusion model
        self.module = module
        self.original = original
        self.diffusion_model = diffusion_model  # the model the patch was made on
        self.replaced_a_patch = replaced_a_patch  # ``original`` is another object patch (restored on removal)
        self._other_module_logged = False

    def resolve(self, base_model: Any) -> tuple[torch.nn.Module, Callable[..., Any]]:
        """The module this call runs on, and its forward. A clone moved onto other modules
        (multi-GPU, dynamic VRAM) carries this patch too: there the module is looked up by name."""
        diffusion_model = getattr(base_model, "diffusion_model", None)
        if diffusion_model is None or diffusion_model is self.diffusion_model:
            return self.module, self.original
        module = diffusion_model.get_submodule(self.name)
        if not self._other_module_logged:
            self._other_module_logged = True
            logger.info("%s: %s runs on another copy of the model (multi-GPU or dynamic VRAM); its own forward "
                        "is used there.", self.holder.name, self.name)
        return module, type(module).forward.__get__(module)

    def active_call(self) -> ModelCall | None:
        """The model call of a run of this patch's holder, if one is running in this thread."""
        call = _ACTIVE_CALL.get()
        return call if call is not None and call.run.holder is self.holder else None


class LayerForward(ForwardPatch):
    """The object patch on a mapped layer's ``forward``: the holder's layer method answers it."""

    def __init__(self, holder: RunHolder, layer_index: int, spec: LayerSpec, module: torch.nn.Module,
                 original: Callable[..., Any], diffusion_model: torch.nn.Module, replaced_a_patch: bool = False) -> None:
        super().__init__(holder, spec.name, module, original, diffusion_model, replaced_a_patch)
        self.layer_index = layer_index
        self.spec = spec

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.active_call()
        if call is None:
            return self.original(*args, **kwargs)
        return call.run.call_layer(self, call, args, kwargs)

    def __repr__(self) -> str:
        return f"<Block Cache forward of {self.name}>"


class ExtensionLayerForward(ForwardPatch):
    """The object patch on a module an extension names (parallel decoding's conv_in): its run method answers it."""

    def __init__(self, holder: RunHolder, extension: RunExtension, name: str, module: torch.nn.Module,
                 original: Callable[..., Any], diffusion_model: torch.nn.Module, replaced_a_patch: bool = False) -> None:
        super().__init__(holder, name, module, original, diffusion_model, replaced_a_patch)
        self.extension = extension

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.active_call()
        if call is None:
            return self.original(*args, **kwargs)
        return call.run.call_patched_layer(self, call, args, kwargs)

    def __repr__(self) -> str:
        return f"<Block Cache forward of {self.name} ({type(self.extension).__name__})>"


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
