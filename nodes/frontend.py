"""What the frontend extension (js/) needs from the nodes: JSON-safe payloads and run events.

The payloads travel in a node's ``ui`` dict (the websocket ``executed`` message) and are kept
in the node's properties by the frontend, so the drawings survive saving and reloading a
workflow. They go into every saved workflow and picture's metadata, so the profile's change
matrix is sent to 3 significant digits and only while it stays under MAX_PROFILE_PAYLOAD_BYTES;
the full profile travels only on the node's BLOCK_PROFILE output. Only this node layer talks to the
server; the runtime and method packages stay free of it.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from ..block_caching.cache import BlockCacheHolder, cache_stats
from ..block_caching.profile import BlockProfile
from ..block_caching.run_summary import run_speedup_estimate
from ..block_caching.schedule import CacheSchedule
from ..block_caching.target_build import LadderRung, TargetBuild, forecast_order_label, partial_to_json, reused_share
from ..runtime.run import RunStats

logger = logging.getLogger(__name__)

PAYLOAD_VERSION = 1
RUN_EVENT = "block_cache.run"
# The keys of the payloads in a node's ``ui`` dict; js/block_cache.js reads them under the same names.
PROFILE_UI_KEY = "block_cache_profile"
SCHEDULE_UI_KEY = "block_cache_schedule"
LADDER_UI_KEY = "block_cache_ladder"
# A profile whose change matrix would be larger than this (as the browser saves it) is sent
# without it; the node then shows the server's picture. A 1024x1024 Flux profile (57 blocks,
# 28 steps) takes about 12 KB with the matrix.
MAX_PROFILE_PAYLOAD_BYTES = 50_000
DISPLAY_DIGITS = 3  # significant digits of the change values sent: plenty for a heatmap and a threshold


def display_value(value: float) -> float | None:
    """A change value as sent to the browser: 3 significant digits (about 7 bytes of JSON, not 20).
    None where unmeasured: the browser's JSON.parse rejects the NaN that Python's json writes."""
    return float(f"{value:.{DISPLAY_DIGITS}g}") if math.isfinite(value) else None


def payload_bytes(payload: Any) -> int:
    """The size of a payload as the browser's JSON.stringify writes it into a saved workflow."""
    return len(json.dumps(payload, separators=(",", ":"), allow_nan=False).encode())


def profile_payload(profile: BlockProfile) -> dict[str, Any]:
    """The profile as the JavaScript builder (js/schedule_builder.js) and heatmap read it."""
    steps = profile.grid.steps
    layers = profile.block_map.layers
    payload = {
        "version": PAYLOAD_VERSION,
        "model_type": profile.block_map.model_type,
        "fingerprint": profile.block_map.fingerprint,
        "steps": steps,
        "sampler": profile.grid.sampler,
        "scheduler": profile.grid.scheduler,
        "sample_count": profile.sample_count,
        "layers": [{"name": spec.name, "kind": spec.kind.value} for spec in layers],
        "change": [[display_value(v) for v in row] for row in profile.change],
        "layer_flops": [float(v) for v in profile.layer_flops],
        "total_flops": float(profile.total_flops),
    }
    if payload_bytes(payload) > MAX_PROFILE_PAYLOAD_BYTES:
        logger.info("Block Cache: the %dx%d profile is too large to keep in the workflow; the node shows the "
                    "server's heatmap instead.", len(layers), steps)
        payload["change"] = None
    return payload


def schedule_payload(schedule: CacheSchedule) -> dict[str, Any]:
    """A built or loaded schedule: the masks as 0/1 strings, and the estimate."""
    mask = schedule.evaluated_mask()  # a lookahead's interpolated steps show as skipped
    return {
        "version": PAYLOAD_VERSION,
        "model_type": schedule.block_map.model_type,
        "steps": schedule.grid.steps,
        "layers": [{"name": layer.name, "kind": layer.kind.value} for layer in schedule.layers],
        "compute": ["".join("1" if c else "0" for c in row) for row in mask],
        "computed": int(mask.sum()),
        "total": int(mask.size),
        "flop_fraction": schedule.flop_fraction,
        "speedup": schedule.estimated_speedup,
        "builder": dict(schedule.builder),
    }


def ladder_payload(schedule: CacheSchedule) -> dict[str, Any]:
    """A speed-up target schedule's ladder: the best compute steps for every count of them, so the node
    redraws the schedule for another speed-up at once (js/block_cache.js picks the rung as
    block_caching/target_ladder.py choose_rung does)."""
    build = TargetBuild.of(schedule)
    cacheable = set(build.cached_layers)
    partial = partial_to_json(build.chosen_partial)
    chosen = {"steps": list(build.compute_steps), "order": build.chosen_order, "partial": partial,
              "as_is_layers": list(build.chosen_as_is_layers), "damping": build.chosen_damping}

    def chosen_otherwise(rung: LadderRung) -> bool:
        """The rung the node chose other than by the search (measured, or by the video rule): its preview is what
        was chosen."""
        return (build.chosen_by != "predicted" and rung.computes == len(build.compute_steps)
                and reused_share(rung.partial) == reused_share(build.chosen_partial))

    return {
        "version": PAYLOAD_VERSION,
        "model_type": schedule.block_map.model_type,
        "steps": schedule.grid.steps,
        "layers": [{"name": layer.name, "kind": layer.kind.value} for layer in schedule.layers],
        "cached": [i for i, layer in enumerate(schedule.layers) if layer.name in cacheable],
        "rungs": [{"computes": r.computes, "steps": chosen["steps"] if chosen_otherwise(r) else list(r.steps),
                   "order": chosen["order"] if chosen_otherwise(r) else r.order, "flop_fraction": r.flop_fraction,
                   "error": r.error, "partial": partial if chosen_otherwise(r) else partial_to_json(r.partial),
                   "as_is_layers": chosen["as_is_layers"] if chosen_otherwise(r) else [],
                   "damping": chosen["damping"] if chosen_otherwise(r) else 1.0}  # the ladder's search: undamped
                  for r in build.ladder],
        # Where the quality floor stepped the target down: the schedule the node gave at that target.
        "floor": None if build.stepped_down_from is None else {
            "min_psnr": build.min_psnr, "target": build.speedup_target,
            "rung": {"computes": len(build.compute_steps), **chosen, "flop_fraction": schedule.flop_fraction}},
        # What validation measured on the profiled run (shown while the preview is that schedule).
        "measured": [{"steps": list(t.steps), "order": t.order, "psnr": t.measured_psnr, "low": t.expected_low,
                      "high": t.expected_high, "metric": build.measured_metric,
                      "partial": partial_to_json(t.partial), "as_is_layers": list(t.as_is_layers),
                      "damping": t.damping}
                     for t in build.measured],
        "options": {"speedup_target": build.speedup_target, "forecast_order": forecast_order_label(build.forecast_order),
                    "cache_kinds": build.cache_kinds, "always_compute_first": build.always_compute_first,
                    "always_compute_last": build.always_compute_last,
                    "max_consecutive_reuse": build.max_consecutive_reuse},
    }


def never_reused(holder: BlockCacheHolder, stats: RunStats) -> list[str]:
    """Layers the schedule reuses that this run computed at every call: their calls never fit the cache
    (an output their signature does not describe, or not one batch of the cond chunks). Runs whose plan
    is not the schedule's own (re-timed) are not judged: a sparse re-timing may leave no reuse."""
    if holder.plan is None or cache_stats(stats).retimed:
        return []
    return [name for name, planned, computed, reused in zip(stats.layer_names, holder.plan.reuses_ever,
                                                              stats.computed, stats.reused, strict=True)
            if planned and computed > 0 and reused == 0]


def never_called(holder: BlockCacheHolder, stats: RunStats) -> list[str]:
    """Layers the schedule reuses that no model call of this run reached (while the model ran): another node
    replaced their forward or skipped them for the whole run (a cache pack that patches block forwards, a
    block swap), so Block Cache did nothing for them."""
    if holder.plan is None or not stats.evaluations:
        return []
    return [name for name, planned, computed, reused in zip(stats.layer_names, holder.plan.reuses_ever,
                                                              stats.computed, stats.reused, strict=True)
            if planned and computed == 0 and reused == 0]


def warn_never_reused(holder: BlockCacheHolder, stats: RunStats) -> None:
    """A run listener: say so when scheduled reuse silently never happened."""
    uncalled = never_called(holder, stats)
    if uncalled:
        logger.warning("%s: %d of the layers the schedule reuses were never called in this run's %d model "
                       "evaluations, so Block Cache did nothing for them: %s. Another node replaced their forward or "
                       "skipped them (a cache or block-swap node that patches the blocks itself): use one cache.",
                       holder.name, len(uncalled), stats.evaluations, ", ".join(uncalled))
    names = never_reused(holder, stats)
    if names:
        logger.warning("%s: %d layers the schedule reuses were computed at every call of this run, so they saved "
                       "nothing: %s. Their calls did not fit the cache (an output their block signature does not "
                       "describe, or not one batch of the cond chunks). Fix: add the block class to "
                       "BLOCK_SIGNATURES in block_maps/dit_families.py.", holder.name, len(names), ", ".join(names))


def run_payload(node_id: str, holder: BlockCacheHolder, stats: RunStats) -> dict[str, Any]:
    return {
        "node": node_id,
        "computed": int(stats.computed.sum()),
        "total": stats.total,
        "steps": stats.steps,
        "evaluations": stats.evaluations,
        "seconds": stats.seconds,
        "retimed": cache_stats(stats).retimed,
        "estimated_speedup": run_speedup_estimate(holder, stats),
        "never_reused": never_reused(holder, stats),
        "never_called": never_called(holder, stats),
        "interpolated": stats.unevaluated,
        "lookahead_off": getattr(stats.figures.get("lookahead"), "off", ""),
    }


def send_run_summaries(holder: BlockCacheHolder, node_id: str | None) -> None:
    """After every sampling run with this holder, tell the browser what was computed and how long it took."""
    if not node_id:
        return

    def listener(finished: BlockCacheHolder, stats: RunStats) -> None:
        try:
            from server import PromptServer
        except ImportError:  # used outside a server (scripts, tests): nobody to tell
            return
        instance = getattr(PromptServer, "instance", None)
        if instance is not None:
            instance.send_sync(RUN_EVENT, run_payload(node_id, finished, stats))

    holder.run_listeners.append(listener)
