// JavaScript port of the Python schedule builders (block_caching/schedule.py: build_schedule,
// computed_flop_fraction; block_caching/target_schedule.py: choose_rung and the mask of a rung). The Build Cache Schedule node uses it to redraw the schedule the
// moment the threshold or an option changes, without queueing. tests/test_frontend_builder.py
// runs it with node against the Python builder and requires identical masks and estimates,
// so every arithmetic step here mirrors the Python code in the same order.
// No imports and no side effects: ComfyUI loads every .js file under js/ as an extension.

export const CACHE_KIND_CHOICES = {
  attention: ["attention", "transformer"],
  "attention+resblock": ["attention", "transformer", "resblock"],
  all: ["attention", "transformer", "resblock", "downsample", "upsample"],
};

export const DEFAULT_OPTIONS = {
  threshold: 0.5,
  cache_kinds: "attention",
  always_compute_first: 1,
  always_compute_last: 0,
  max_consecutive_reuse: 0,
};

/** Throws like BuildOptions.validate() does. */
export function validateOptions(options) {
  const t = options.threshold;
  if (typeof t !== "number" || !Number.isFinite(t) || t < 0) {
    throw new Error(`threshold must be a finite number >= 0, got ${t}`);
  }
  if (!Object.hasOwn(CACHE_KIND_CHOICES, options.cache_kinds)) {
    throw new Error(`cache_kinds must be one of ${Object.keys(CACHE_KIND_CHOICES)}, got ${options.cache_kinds}`);
  }
  for (const name of ["always_compute_first", "always_compute_last", "max_consecutive_reuse"]) {
    const value = options[name];
    if (!Number.isInteger(value) || value < 0) throw new Error(`${name} must be an integer >= 0, got ${value}`);
  }
}

/** Eq. 7 for one layer: block_caching/schedule.py _layer_mask. `change[step]` null/NaN = unmeasured. */
export function layerMask(change, options, steps) {
  const compute = new Array(steps).fill(false);
  let accumulated = 0.0;
  let reuseRun = 0;
  const first = Math.max(1, options.always_compute_first);
  for (let step = 0; step < steps; step++) {
    let forced = step < first || step >= steps - options.always_compute_last;
    if (options.max_consecutive_reuse && reuseRun >= options.max_consecutive_reuse) forced = true;
    const value = change[step];
    // An unmeasured step counts as a large change: never reuse on missing data.
    accumulated += value === null || value === undefined || Number.isNaN(value) ? Infinity : value;
    if (forced || accumulated > options.threshold) {
      compute[step] = true;
      accumulated = 0.0;
      reuseRun = 0;
    } else {
      reuseRun += 1;
    }
  }
  return compute;
}

/** block_caching/schedule.py computed_flop_fraction, for a boolean mask [layers][steps]. */
export function computedFlopFraction(mask, layerFlops, totalFlops, steps) {
  if (steps === 0 || totalFlops <= 0) return 1.0;
  let flopSum = 0.0;
  for (const value of layerFlops) flopSum += value;
  const fixed = Math.max(0.0, totalFlops - flopSum);
  let computed = 0.0;
  for (let i = 0; i < layerFlops.length; i++) {
    let count = 0;
    for (const on of mask[i]) if (on) count += 1;
    computed += layerFlops[i] * count;
  }
  return (fixed * steps + computed) / (totalFlops * steps);
}

/**
 * The schedule for a profile payload (nodes/frontend.py profile_payload):
 * {steps, layers: [{name, kind}], change: [[number|null]], layer_flops, total_flops}.
 */
export function buildSchedule(profile, options) {
  const merged = { ...DEFAULT_OPTIONS, ...options };
  validateOptions(merged);
  const allowed = new Set(CACHE_KIND_CHOICES[merged.cache_kinds]);
  const steps = profile.steps;
  const mask = profile.layers.map((layer, i) =>
    allowed.has(layer.kind) ? layerMask(profile.change[i], merged, steps) : new Array(steps).fill(true),
  );
  let computed = 0;
  for (const row of mask) for (const on of row) if (on) computed += 1;
  const flopFraction = computedFlopFraction(mask, profile.layer_flops, profile.total_flops, steps);
  return {
    mask,
    computed,
    total: mask.length * steps,
    flopFraction,
    speedup: flopFraction > 0 ? 1.0 / flopFraction : 1.0,
    options: merged,
  };
}

/**
 * block_caching/target_schedule.py choose_rung: the slowest rung of a speed-up target ladder whose FLOP fraction
 * still reaches the target (ties: the least predicted error), else the fastest rung.
 */
export function chooseRung(rungs, speedup) {
  const limit = 1.0 / speedup + 1e-12;
  let best = null;
  for (const rung of rungs) {
    if (rung.flop_fraction > limit) continue;
    if (best === null || rung.flop_fraction > best.flop_fraction
        || (rung.flop_fraction === best.flop_fraction && rung.error < best.error)) best = rung;
  }
  if (best !== null) return best;
  for (const rung of rungs) if (best === null || rung.flop_fraction < best.flop_fraction) best = rung;
  return best;
}

/** The schedule of a ladder payload (nodes/frontend.py ladder_payload) at a speed-up target. */
export function targetSchedule(ladder, speedup) {
  return rungSchedule(ladder, chooseRung(ladder.rungs, speedup));
}

/**
 * The schedule of one rung ({computes, steps, order, flop_fraction, partial}) of a ladder payload; a fine rung's
 * partial ({step, layers}) names the cached layers that reuse at one of its compute steps.
 */
export function rungSchedule(ladder, rung) {
  const cached = new Set(ladder.cached);
  const row = new Array(ladder.steps).fill(false);
  for (const step of rung.steps) row[step] = true;
  const partial = new Set(rung.partial?.layers ?? []);
  const mask = ladder.layers.map((_, i) => {
    if (!cached.has(i)) return new Array(ladder.steps).fill(true);
    const own = row.slice();
    if (partial.has(i)) own[rung.partial.step] = false;
    return own;
  });
  let computed = 0;
  for (const line of mask) for (const on of line) if (on) computed += 1;
  return {
    mask,
    rung,
    computed,
    total: mask.length * ladder.steps,
    flopFraction: rung.flop_fraction,
    speedup: rung.flop_fraction > 0 ? 1.0 / rung.flop_fraction : 1.0,
    equivalentSteps: rung.flop_fraction * ladder.steps,
  };
}
