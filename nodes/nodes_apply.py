"""Apply Block Cache."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..block_caching.cache import CACHE_DEVICES, CACHE_ON_MODEL_DEVICE
from ..block_caching.patching import apply_block_cache
from ..errors import UnsupportedModelError
from ..faster_diffusion.noise_injection import DEFAULT_TAU_CUTOFF, NoiseInjection
from ..faster_diffusion.parallel_decoding import ParallelDecoding
from .frontend import send_run_summaries, warn_never_reused
from .types import CATEGORY, CacheScheduleSocket

logger = logging.getLogger(__name__)


class ApplyBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BlockCacheApply",
            display_name="Apply Block Cache",
            category=CATEGORY,
            description="Returns a copy of the model that reuses cached layer outputs as the schedule says. Put it "
                        "between the model loader and any sampler. Each run logs how many layer evaluations it "
                        "computed and skipped. Schedules for another step count or sampler are re-timed.",
            inputs=[
                io.Model.Input("model", tooltip="The model to accelerate. It is not changed; a patched copy is "
                                                "returned."),
                CacheScheduleSocket.Input("schedule", tooltip="From Build Cache Schedule or Load Cache Schedule, "
                                                              "made for this model."),
                io.Combo.Input("cache_device", options=list(CACHE_DEVICES), default=CACHE_ON_MODEL_DEVICE,
                               optional=True,
                               tooltip="Where cached block outputs are kept. 'model device' is fastest. 'cpu' "
                                       "keeps them in system RAM: use it for video models (Wan, HunyuanVideo, "
                                       "LTXV), where one cached block can take hundreds of MB of VRAM, at the "
                                       "cost of a copy each time a block is cached or reused."),
                io.Float.Input("noise_injection_alpha", default=0.0, min=0.0, max=0.1, step=0.001, optional=True,
                               tooltip="Faster Diffusion's prior noise injection: adds alpha x the run's initial "
                                       "noise to the latent at every step below the cut-off time, which restores "
                                       "high-frequency detail lost to encoder propagation. 0 turns it off (the "
                                       "default); the paper uses 0.003 with its key-step schedules."),
                io.Float.Input("noise_injection_until", default=DEFAULT_TAU_CUTOFF, min=0.0, max=1.0, step=0.01,
                               optional=True,
                               tooltip="Noise injection applies once normalized time (1 = pure noise, 0 = clean) "
                                       "falls below this; the paper's 0.5 means the second half of the run."),
                io.Boolean.Input("parallel_decoding", default=False, optional=True,
                                 tooltip="Faster Diffusion's parallel decoding, for Faster Diffusion Schedule "
                                         "(encoder propagation) on UNet models only; ignored, with a log line, for "
                                         "other schedules. The decoder passes of the steps between two key steps "
                                         "run as one batch, so a GPU is used better (no fewer FLOPs). conv_in is "
                                         "then reused with the encoder, as in the paper, which changes the output "
                                         "slightly. Memory: the decoder's activations grow with the number of "
                                         "steps batched (up to the gap between key steps, x the CFG batch), "
                                         "capped to what ComfyUI reports free; limit it further below. Off by "
                                         "default."),
                io.Int.Input("parallel_decoding_max_steps", default=0, min=0, max=1000, optional=True,
                             tooltip="Parallel decoding: the most steps decoded in one batch (0: every step up to "
                                     "the next key step). Lower it if the batched pass runs out of memory."),
            ],
            outputs=[io.Model.Output(tooltip="The model with Block Cache; use it in any KSampler.")],
            hidden=[io.Hidden.unique_id],  # to show each run's summary on this node in the browser
        )

    @classmethod
    def execute(cls, model, schedule, cache_device=CACHE_ON_MODEL_DEVICE, noise_injection_alpha=0.0,
                noise_injection_until=DEFAULT_TAU_CUTOFF, parallel_decoding=False,
                parallel_decoding_max_steps=0) -> io.NodeOutput:
        injection = NoiseInjection(alpha=float(noise_injection_alpha), tau_cutoff=float(noise_injection_until))
        injection.validate()
        parallel = ParallelDecoding(enabled=bool(parallel_decoding), max_steps=int(parallel_decoding_max_steps))
        parallel.validate()
        try:
            # A previous Apply's options (parallel decoding included) go with its install.
            patched, holder = apply_block_cache(model, schedule, cache_device=cache_device,
                                                options=[injection, parallel])
        except UnsupportedModelError as error:
            # Not an error that should stop the graph: the model runs as it is, and the node says so.
            message = f"Block Cache is OFF for this model; it runs uncached. {error}"
            logger.warning("Apply Block Cache: %s", message)
            return io.NodeOutput(model, ui={"text": [message]})
        holder.run_listeners.append(warn_never_reused)
        send_run_summaries(holder, cls.hidden.unique_id if cls.hidden else None)
        notes = list(holder.declined)  # logged where they were declined
        skipped = holder.block_map.skipped
        if skipped:
            message = (f"{len(skipped)} blocks of this model cannot be cached and always run (the rest are "
                       "cached):\n" + "\n".join(f"- {layer.describe()}" for layer in skipped))
            logger.warning("Apply Block Cache: %s", message)
            notes.append(message)
        return io.NodeOutput(patched, ui={"text": ["\n".join(notes)]})  # empty: clears an earlier run's note
