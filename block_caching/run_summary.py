"""The FLOP-weighted speed-up a finished run achieved, from what it really computed (the cache's log and
the frontend's run summary on Apply Block Cache)."""

from __future__ import annotations

import numpy as np

from ..runtime.run import RunHolder, RunStats
from .schedule import computed_flop_fraction


def run_speedup_estimate(holder: RunHolder, stats: RunStats) -> float:
    """FLOP-weighted speed-up of a finished run, from what it really computed."""
    plan = getattr(holder, "plan", None)  # a profiler's runs compute everything
    calls = stats.computed + stats.reused
    if plan is None or plan.total_flops <= 0 or calls.max(initial=0) == 0:
        return 1.0
    # One column holding each layer's computed share of its calls.
    compute_rate = (stats.computed / np.maximum(calls, 1))[:, None]
    fraction = computed_flop_fraction(compute_rate, plan.layer_flops, plan.total_flops)
    if stats.evaluations:  # evaluations answered without the model (a lookahead's) cost nothing
        fraction *= (stats.evaluations - stats.unevaluated) / stats.evaluations
    return 1.0 / fraction if fraction > 0 else 1.0
