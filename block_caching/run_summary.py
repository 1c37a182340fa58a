"""What a finished Block Cache run did: the log line, and the FLOP-weighted speed-up it achieved (which
the frontend shows on Apply Block Cache)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ..runtime.run import RunHolder, RunStats
from .schedule import computed_flop_fraction

if TYPE_CHECKING:
    from .cache import BlockCacheHolder

logger = logging.getLogger(__name__)


def log_run_summary(holder: BlockCacheHolder, stats: RunStats) -> None:
    total = stats.total
    skipped = int(stats.reused.sum())
    estimate = run_speedup_estimate(holder, stats)
    orders = sorted({order for order, reused in zip(holder.plan.orders, holder.plan.reuses_ever, strict=True)
                     if reused})
    forecast = ""
    if any(orders):
        forecast = (f", of which forecast history (order {'/'.join(str(o) for o in orders)}) "
                    f"{stats.peak_history_bytes / 2**20:.1f} MB")
    logger.info(
        "%s: computed %d/%d layer evaluations, skipped %d (%.0f%%) over %d steps / %d model evaluations%s; "
        "estimated speed-up %.2fx (FLOP-weighted); the cache held at most %.1f MB (%s)%s; %d computations "
        "were stored for a reuse.",
        holder.name, int(stats.computed.sum()), total, skipped, 100.0 * skipped / max(1, total), stats.steps,
        stats.evaluations, ", schedule re-timed" if stats.retimed else "", estimate,
        stats.peak_cache_bytes / 2**20, holder.cache_device, forecast, stats.stores)


def run_speedup_estimate(holder: RunHolder, stats: RunStats) -> float:
    """FLOP-weighted speed-up of a finished run, from what it really computed."""
    plan = getattr(holder, "plan", None)  # a profiler's runs compute everything
    calls = stats.computed + stats.reused
    if plan is None or plan.total_flops <= 0 or calls.max(initial=0) == 0:
        return 1.0
    # One column holding each layer's computed share of its calls.
    compute_rate = (stats.computed / np.maximum(calls, 1))[:, None]
    fraction = computed_flop_fraction(compute_rate, plan.layer_flops, plan.total_flops)
    return 1.0 / fraction if fraction > 0 else 1.0
