// Block Cache frontend: live pictures on the nodes.
// - Profile Block Changes: the measured change heatmap (layers x steps, colour scale, axes).
// - Build Cache Schedule: the schedule (computed vs reused), the estimated speed-up and its cost in
//   uncached steps, redrawn the moment the speed-up slider moves (from the ladder of best schedules
//   the node sends). Build Cache Schedule (threshold): the same, rebuilt in the browser by
//   schedule_builder.js the moment the threshold or an option changes.
// - Load Cache Schedule: the loaded schedule.
// - Apply Block Cache: after each cached sampling run, computed/total layer evaluations and the
//   time saved against an uncached sampler of the same model in the same graph; and what it cannot
//   cache in this model (or that caching is off for it), with the reason and the fix.
// - Compare Pictures, Save Cache Schedule: their text (PSNR/SSIM per picture; where it was saved).
// Run summaries are found by execution id, also for nodes inside subgraphs ("12:5").
// Pictures are <canvas> elements in DOM widgets, so they show in the classic LiteGraph canvas
// and in the Vue node renderer alike. The data behind them is kept in node.properties, which
// the workflow saves, so a reloaded workflow shows them again without a run.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { buildSchedule, DEFAULT_OPTIONS, rungSchedule, targetSchedule } from "./schedule_builder.js";

const PROFILE_KEY = "block_cache_profile";
const SCHEDULE_KEY = "block_cache_schedule";
const RUN_KEY = "block_cache_run";
const LADDER_KEY = "block_cache_ladder";
const NOTE_KEY = "block_cache_note"; // Apply Block Cache: what it cannot cache, from its last execution
const TEXT_KEY = "block_cache_text"; // the text of TEXT_NODES, kept so it shows again on reload
const OPTION_NAMES = Object.keys(DEFAULT_OPTIONS);
const TARGET_NODE = "BlockCacheBuildTargetSchedule";
const THRESHOLD_NODE = "BlockCacheBuildSchedule";
// The target node's options besides the speed-up: the ladder was built for their values.
const LADDER_OPTIONS = ["forecast_order", "cache_kinds", "always_compute_first", "always_compute_last",
  "max_consecutive_reuse"];
const SAMPLER_TYPES = new Set(["KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"]);
const TEXT_NODES = new Set(["BlockCacheSaveSchedule", "BlockCacheComparePictures"]);

const BACKGROUND = "#18181c";
const TEXT = "#e6e6e6";
const REUSED = "#37373e";
const UNMEASURED = "#282828";
const KIND_COLOURS = { attention: "#ffaa3c", transformer: "#ffaa3c", resblock: "#5aaaff", downsample: "#96dc78", upsample: "#96dc78" };
// Viridis-like anchors, as nodes/heatmap.py uses.
const SCALE = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function colour(value) {
  const position = Math.min(Math.max(value, 0), 1) * (SCALE.length - 1);
  const low = Math.floor(position);
  const high = Math.min(low + 1, SCALE.length - 1);
  const mix = position - low;
  const c = SCALE[low].map((v, i) => Math.round(v * (1 - mix) + SCALE[high][i] * mix));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function percentile(values, q) {
  const sorted = values.filter((v) => v !== null && Number.isFinite(v)).sort((a, b) => a - b);
  if (!sorted.length) return 1;
  const rank = (sorted.length - 1) * q; // numpy's default (linear) percentile
  const low = Math.floor(rank);
  const high = Math.min(low + 1, sorted.length - 1);
  return sorted[low] + (sorted[high] - sorted[low]) * (rank - low);
}

// --- the widget ------------------------------------------------------------------------------------

/** A DOM widget holding a canvas and a text line; created once per node. */
function pictureWidget(node) {
  node.properties ??= {};
  let widget = node.widgets?.find((w) => w.name === "block_cache_picture");
  if (widget) return widget;
  const element = document.createElement("div");
  element.className = "block-cache-picture";
  element.style.cssText =
    "display:flex;flex-direction:column;gap:2px;width:100%;height:100%;min-height:0;box-sizing:border-box;";
  const canvas = document.createElement("canvas");
  canvas.className = "block-cache-canvas";
  canvas.width = 320;
  canvas.height = 80;
  canvas.style.cssText = "flex:1 1 auto;min-height:0;width:100%;object-fit:contain;object-position:left top;";
  const text = document.createElement("div");
  text.className = "block-cache-text";
  text.style.cssText = "flex:0 0 auto;font:11px monospace;white-space:pre-wrap;color:var(--input-text,#ddd);" +
    "opacity:0.9;padding:0 2px;";
  element.append(canvas, text);
  widget = node.addDOMWidget("block_cache_picture", "block_cache_picture", element, {
    serialize: false, // the data lives in node.properties; the picture is redrawn from it
    hideOnZoom: false,
    getMinHeight: () => (textOnly(node) ? 70 : 140),
  });
  widget.canvas = canvas;
  widget.text = text;
  canvas.style.display = "none"; // until there is something to draw
  text.textContent = textOnly(node) ? "" : "Queue the graph to see the picture here.";
  return widget;
}

function textOnly(node) {
  return node.comfyClass === "BlockCacheApply" || TEXT_NODES.has(node.comfyClass);
}

function grow(node) {
  // Give a node that just got its picture room for it (once), in either renderer.
  if (node.block_cache_grown || textOnly(node)) return;
  node.block_cache_grown = true;
  const size = node.computeSize?.();
  if (size && node.size) node.setSize?.([Math.max(node.size[0], 360), Math.max(node.size[1], size[1] + 160)]);
  app.graph?.setDirtyCanvas?.(true, true);
}

// --- drawing ---------------------------------------------------------------------------------------

function layout(layers, steps) {
  const cellW = Math.max(3, Math.min(16, Math.floor(560 / Math.max(1, steps))));
  const cellH = Math.max(3, Math.min(10, Math.floor(360 / Math.max(1, layers))));
  const left = 118;
  const top = 18;
  const width = left + cellW * steps + 78;
  const height = top + cellH * layers + 30;
  return { cellW, cellH, left, top, width, height };
}

function axes(ctx, g, names, steps, title) {
  ctx.fillStyle = TEXT;
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillText(title, 4, 3);
  ctx.font = "9px monospace";
  ctx.textBaseline = "middle";
  const every = Math.max(1, Math.ceil(10 / g.cellH));
  names.forEach((name, row) => {
    if (row % every === 0) ctx.fillText(name.slice(-19), 2, g.top + row * g.cellH + g.cellH / 2);
  });
  const bottom = g.top + names.length * g.cellH;
  ctx.textBaseline = "top";
  const tickEvery = Math.max(1, Math.ceil(steps / 10));
  for (let step = 0; step < steps; step += tickEvery) ctx.fillText(String(step), g.left + step * g.cellW, bottom + 3);
  ctx.fillText("step (0 = noise) \u2192", g.left, bottom + 15);
}

function prepare(canvas, g) {
  canvas.width = g.width;
  canvas.height = g.height;
  canvas.style.display = "";
  canvas.style.aspectRatio = `${g.width} / ${g.height}`;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = BACKGROUND;
  ctx.fillRect(0, 0, g.width, g.height);
  return ctx;
}

function drawProfile(canvas, profile) {
  const names = profile.layers.map((l) => l.name);
  const g = layout(names.length, profile.steps);
  const ctx = prepare(canvas, g);
  if (!profile.change) {
    ctx.fillStyle = TEXT;
    ctx.fillText("profile too large to draw here", 4, 4);
    return;
  }
  // Clip the colour scale at the 95th percentile, as the server's heatmap does, so a few huge
  // values do not flatten everything else.
  let top = percentile(profile.change.flat(), 0.95);
  if (!(top > 0)) top = 1;
  profile.change.forEach((row, r) => {
    row.forEach((value, s) => {
      ctx.fillStyle = value === null ? UNMEASURED : colour(value / top);
      ctx.fillRect(g.left + s * g.cellW, g.top + r * g.cellH, g.cellW - 1, g.cellH - 1);
    });
  });
  const barX = g.left + g.cellW * profile.steps + 12;
  const barH = Math.max(20, names.length * g.cellH);
  for (let i = 0; i < barH; i++) {
    ctx.fillStyle = colour(1 - i / barH);
    ctx.fillRect(barX, g.top + i, 10, 1);
  }
  ctx.fillStyle = TEXT;
  ctx.font = "9px monospace";
  ctx.textBaseline = "top";
  ctx.fillText(`\u2265${top.toPrecision(2)}`, barX + 13, g.top);
  ctx.textBaseline = "bottom";
  ctx.fillText("0", barX + 13, g.top + barH);
  axes(ctx, g, names, profile.steps,
    `relative L1 change per step (${profile.model_type}, ${profile.sample_count} samples)`);
}

function drawSchedule(canvas, layers, steps, mask, title) {
  const names = layers.map((l) => l.name);
  const g = layout(names.length, steps);
  const ctx = prepare(canvas, g);
  mask.forEach((row, r) => {
    for (let s = 0; s < steps; s++) {
      ctx.fillStyle = row[s] ? KIND_COLOURS[layers[r].kind] ?? "#ccc" : REUSED;
      ctx.fillRect(g.left + s * g.cellW, g.top + r * g.cellH, g.cellW - 1, g.cellH - 1);
    }
  });
  const legendX = g.left + g.cellW * steps + 8;
  ctx.font = "9px monospace";
  ctx.textBaseline = "top";
  [["attn", KIND_COLOURS.attention], ["res", KIND_COLOURS.resblock], ["up/dn", KIND_COLOURS.upsample],
    ["reused", REUSED]].forEach(([label, fill], i) => {
    ctx.fillStyle = fill;
    ctx.fillRect(legendX, g.top + i * 13, 9, 9);
    ctx.fillStyle = TEXT;
    ctx.fillText(label, legendX + 12, g.top + i * 13);
  });
  axes(ctx, g, names, steps, title);
}

// --- per node --------------------------------------------------------------------------------------

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

function currentOptions(node) {
  const options = {};
  for (const name of OPTION_NAMES) {
    const value = widgetValue(node, name);
    options[name] = value === undefined ? DEFAULT_OPTIONS[name] : value;
  }
  options.threshold = Number(options.threshold);
  for (const name of ["always_compute_first", "always_compute_last", "max_consecutive_reuse"]) {
    options[name] = Math.round(Number(options[name]));
  }
  return options;
}

function formatEstimate(r) {
  const skipped = r.total - r.computed;
  return `computed ${r.computed}/${r.total} layer evaluations (${r.total ? Math.round((100 * skipped) / r.total) : 0}% ` +
    `reused)\n${(100 * r.flopFraction).toFixed(1)}% of the FLOPs \u2192 estimated speed-up ${r.speedup.toFixed(2)}x`;
}

/** Build Cache Schedule: rebuild and redraw when the options or the profile changed. */
function refreshBuild(node, force = false) {
  const profile = node.properties?.[PROFILE_KEY];
  const widget = pictureWidget(node);
  const options = currentOptions(node);
  const key = JSON.stringify(options);
  if (!force && key === node.block_cache_key) return;
  node.block_cache_key = key;
  if (profile?.change) {
    let result;
    try {
      result = buildSchedule(profile, options);
    } catch (error) {
      widget.text.textContent = `cannot build: ${error.message}`;
      return;
    }
    drawSchedule(widget.canvas, profile.layers, profile.steps, result.mask,
      `schedule at threshold ${options.threshold} (${options.cache_kinds})`);
    const ran = node.properties?.[SCHEDULE_KEY]?.builder;
    const stale = !ran || OPTION_NAMES.some((n) => ran[n] !== options[n]); // not what the last run used
    widget.text.textContent = formatEstimate(result) + (stale ? "\n(preview: queue to use these settings)" : "");
    widget.text.dataset.speedup = result.speedup.toFixed(4);
    grow(node);
  } else if (node.properties?.[SCHEDULE_KEY]) {
    showSchedule(node, node.properties[SCHEDULE_KEY]);
  }
}

/** Build Cache Schedule (speed-up target): redraw from the ladder when the speed-up or an option changed. */
function refreshTarget(node, force = false) {
  const ladder = node.properties?.[LADDER_KEY];
  const widget = pictureWidget(node);
  const values = Object.fromEntries(["speedup", "min_psnr", ...LADDER_OPTIONS].map((n) => [n, widgetValue(node, n)]));
  const key = JSON.stringify(values);
  if (!force && key === node.block_cache_key) return;
  node.block_cache_key = key;
  if (!ladder?.rungs?.length) return;
  const speedup = Number(values.speedup ?? ladder.options.speedup_target);
  // The last run's quality floor moved its target to a slower rung: shown while speed-up and floor are unchanged.
  const floor = ladder.floor;
  const floored = Boolean(floor) && speedup === floor.target && Number(values.min_psnr ?? floor.min_psnr) === floor.min_psnr;
  const result = floored ? rungSchedule(ladder, floor.rung) : targetSchedule(ladder, speedup > 0 ? speedup : 1);
  // Layers the measured choice reuses as they are (order 0); absent from payloads before per-layer orders.
  const asIs = result.rung.as_is_layers ?? [];
  drawSchedule(widget.canvas, ladder.layers, ladder.steps, result.mask,
    `schedule for ${speedup}x (${ladder.options.cache_kinds})`);
  const lines = [formatEstimate(result),
    `the cost of ${result.equivalentSteps.toFixed(1)} uncached steps; computes at steps ${result.rung.steps.join(", ")}` +
      (result.rung.partial ? ` (${result.rung.partial.layers.length} layers reuse at step ${result.rung.partial.step + 1})` : "") +
      `; forecast order ${result.rung.order}` +
      (asIs.length ? `, 0 (reused as they are) on ${asIs.map((i) => ladder.layers[i].name).join(", ")}` : "")];
  const same = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);
  const samePartial = (a, b) => (a ?? null) === null ? (b ?? null) === null
    : (b ?? null) !== null && a.step === b.step && same(a.layers, b.layers);
  // The last reading of this schedule: where a second held-out seed checked it, that of both seeds' pictures.
  const measured = (ladder.measured ?? []).filter((m) => m.order === result.rung.order && same(m.steps, result.rung.steps)
    && samePartial(m.partial, result.rung.partial) && same(m.as_is_layers ?? [], asIs)
    && (m.damping ?? 1) === (result.rung.damping ?? 1)).pop();
  if (measured) {
    const range = measured.low != null && measured.high != null
      ? `; expected ${measured.low.toFixed(1)}-${measured.high.toFixed(1)} dB on other prompts` : "";
    lines.push(`measured: ${measured.psnr.toFixed(1)} dB ${measured.metric} PSNR against uncached${range}`);
  }
  if (floored) lines.push(`stepped down from the ${speedup}x target: it is expected below the ${floor.min_psnr} dB floor`);
  else if (result.flopFraction > 1 / speedup + 1e-12) lines.push(`${speedup}x is beyond these options: the fastest schedule`);
  const otherOptions = LADDER_OPTIONS.some((n) => values[n] !== undefined && String(values[n]) !== String(ladder.options[n]));
  if (otherOptions) lines.push("(preview for the options of the last run: queue to use the new ones)");
  else if (speedup !== ladder.options.speedup_target) lines.push("(preview: queue to use this speed-up)");
  widget.text.textContent = lines.join("\n");
  widget.text.dataset.speedup = result.speedup.toFixed(4);
  grow(node);
}

function showSchedule(node, schedule) {
  const widget = pictureWidget(node);
  const mask = schedule.compute.map((row) => Array.from(row, (c) => c === "1"));
  drawSchedule(widget.canvas, schedule.layers, schedule.steps, mask, `schedule (${schedule.model_type})`);
  widget.text.textContent = formatEstimate({
    computed: schedule.computed, total: schedule.total, flopFraction: schedule.flop_fraction,
    speedup: schedule.speedup,
  });
  widget.text.dataset.speedup = Number(schedule.speedup).toFixed(4);
  grow(node);
}

function showProfile(node) {
  const profile = node.properties?.[PROFILE_KEY];
  if (!profile) return;
  const widget = pictureWidget(node);
  drawProfile(widget.canvas, profile);
  widget.text.textContent = `${profile.layers.length} layers x ${profile.steps} steps, ${profile.sample_count} ` +
    `sample(s), ${profile.sampler}/${profile.scheduler}`;
  grow(node);
}

// --- run summaries on Apply Block Cache ------------------------------------------------------------

const nodeSeconds = new Map(); // execution id -> wall seconds of its last execution, timed here
let running = null; // { id, started }

function rootGraph() {
  return app.rootGraph ?? app.graph; // frontends before rootGraph: app.graph is the root
}

function nodesOf(graph) {
  return graph?.nodes ?? graph?._nodes ?? []; // `nodes` where the frontend has it
}

/** The node of an execution id: "7" in the root graph, "12:5" node 5 inside subgraph node 12, and so on. */
function nodeByExecutionId(id) {
  let graph = rootGraph();
  let node = null;
  for (const part of String(id).split(":")) {
    if (node) graph = node.subgraph;
    node = graph?.getNodeById?.(Number(part)) ?? graph?.getNodeById?.(part);
    if (!node) return null;
  }
  return node;
}

/** Every node with its execution id, into subgraphs. */
function* allNodes(graph = rootGraph(), prefix = "") {
  for (const node of nodesOf(graph)) {
    const id = `${prefix}${node.id}`;
    yield [id, node];
    if (node.subgraph) yield* allNodes(node.subgraph, `${id}:`);
  }
}

function linkOrigin(node, inputName) {
  const slot = node.inputs?.findIndex((i) => i.name === inputName) ?? -1;
  if (slot < 0) return null;
  let link;
  if (typeof node.getInputLink === "function") {
    // Every frontend has it; newer ones (1.58) deprecate reading input.link.
    link = node.graph ? node.getInputLink(slot) : null;
  } else {
    const id = node.inputs[slot].link;
    if (id == null) return null;
    const links = node.graph?.links ?? rootGraph()?.links;
    link = links?.get ? links.get(id) : links?.[id];
  }
  return link ? `${link.origin_id}:${link.origin_slot}` : null;
}

/** Sampler nodes fed by this Apply node (cached) and by the same model without it (uncached), in its graph. */
function samplersAround(apply) {
  const source = linkOrigin(apply, "model");
  const cached = [];
  const uncached = [];
  for (const node of nodesOf(apply.graph ?? rootGraph())) {
    if (!SAMPLER_TYPES.has(node.comfyClass ?? node.type)) continue;
    const origin = linkOrigin(node, "model");
    if (origin === `${apply.id}:0`) cached.push(node);
    else if (source && origin === source) uncached.push(node);
  }
  return { cached, uncached };
}

function showRun(node) {
  const run = node.properties?.[RUN_KEY];
  const note = node.properties?.[NOTE_KEY];
  if (!run && !note) return;
  const widget = pictureWidget(node);
  widget.canvas.style.display = "none";
  const lines = note ? [note] : [];
  if (run) {
    const skipped = run.total - run.computed;
    lines.push(`last run: computed ${run.computed}/${run.total} layer evaluations (${Math.round((100 * skipped) / Math.max(1, run.total))}% reused), ` +
      `${run.steps} steps, sampling ${run.seconds.toFixed(2)} s${run.retimed ? ", re-timed" : ""}`);
    if (run.cached_seconds && run.uncached_seconds) {
      const saved = run.uncached_seconds - run.cached_seconds;
      const times = `uncached sampler ${run.uncached_seconds.toFixed(2)} s \u2192 cached ${run.cached_seconds.toFixed(2)} s, ` +
        `${(run.uncached_seconds / run.cached_seconds).toFixed(2)}x measured`;
      // Both are wall times of this browser's last runs: other load on the machine shows up here.
      lines.push(saved >= 0 ? `time saved: ${saved.toFixed(2)} s (${times})` : `no time saved in this run (${times})`);
    } else {
      const estimate = run.seconds * (run.estimated_speedup - 1);
      lines.push(`time saved: about ${estimate.toFixed(2)} s by the FLOP estimate (${run.estimated_speedup.toFixed(2)}x); ` +
        "add an uncached sampler on the same model to measure it");
    }
    if (run.interpolated) {
      lines.push(`lookahead: ${run.interpolated} of ${run.evaluations} sampler evaluations interpolated, the model not run`);
    }
    if (run.lookahead_off) lines.push(`lookahead off in this run: ${run.lookahead_off} (see the log)`);
    if (run.never_called?.length) {
      lines.push(`never called in this run (another node replaced or skipped them; see the log): ` +
        run.never_called.join(", "));
    }
    if (run.never_reused?.length) {
      lines.push(`never reused although scheduled (their calls did not fit the cache; see the log): ` +
        run.never_reused.join(", "));
    }
    widget.text.dataset.computed = String(run.computed);
  }
  widget.text.textContent = lines.join("\n");
  app.graph?.setDirtyCanvas?.(true, false);
}

function measuredTimes(apply, executionId) {
  // Samplers beside it share its execution id's prefix (the subgraph path).
  const prefix = String(executionId ?? apply.id).split(":").slice(0, -1).map((p) => `${p}:`).join("");
  const { cached, uncached } = samplersAround(apply);
  const pick = (nodes) => nodes.map((n) => nodeSeconds.get(`${prefix}${n.id}`)).find((s) => s !== undefined);
  return { cached_seconds: pick(cached), uncached_seconds: pick(uncached) };
}

function onRunEvent(event) {
  const detail = event.detail;
  const node = detail?.node == null ? null : nodeByExecutionId(detail.node);
  if (!node || node.comfyClass !== "BlockCacheApply") return;
  node.properties[RUN_KEY] = { ...detail, ...measuredTimes(node, detail.node) };
  showRun(node);
}

function onExecuting(event) {
  const detail = event.detail;
  const id = detail && typeof detail === "object" ? detail.node ?? null : detail;
  const now = performance.now();
  if (running) nodeSeconds.set(running.id, (now - running.started) / 1000);
  running = id == null ? null : { id: String(id), started: now };
  if (id == null) {
    // The prompt finished: now both samplers have their times.
    for (const [executionId, node] of allNodes()) {
      const run = node.properties?.[RUN_KEY];
      if (node.comfyClass === "BlockCacheApply" && run) {
        Object.assign(run, measuredTimes(node, run.node ?? executionId));
        showRun(node);
      }
    }
  }
}

// --- registration ----------------------------------------------------------------------------------

function chain(prototype, name, fn) {
  const original = prototype[name];
  prototype[name] = function (...args) {
    const result = original?.apply(this, args);
    try {
      fn.apply(this, args);
    } catch (error) {
      console.error(`[block_cache] ${name} failed`, error); // never break the graph over a picture
    }
    return result;
  };
}

// Per node id: what the node does with its executed message, when a saved graph is loaded
// (configured), and when one of its widgets changes.
const PROFILE_HANDLER = {
  executed(node, message) {
    const profile = message?.[PROFILE_KEY]?.[0];
    if (!profile) return;
    node.properties[PROFILE_KEY] = profile;
    showProfile(node);
    // Below the summary line: what the node warns of (a segment measured on its own latent).
    const notes = String(message?.text?.[0] ?? "").split("\n").slice(1).filter(Boolean);
    if (notes.length) pictureWidget(node).text.textContent += "\n" + notes.join("\n");
  },
  configured: (node) => showProfile(node),
};
const PROFILE_NODES = ["BlockCacheProfile", "BlockCacheProfileAdvanced"];
const NODE_HANDLERS = {
  ...Object.fromEntries(PROFILE_NODES.map((id) => [id, PROFILE_HANDLER])),
  [TARGET_NODE]: {
    executed(node, message) {
      const ladder = message?.[LADDER_KEY]?.[0];
      if (ladder) node.properties[LADDER_KEY] = ladder;
      refreshTarget(node, true);
    },
    configured: (node) => refreshTarget(node, true),
    widgetChanged: (node) => refreshTarget(node),
  },
  [THRESHOLD_NODE]: {
    executed(node, message) {
      const profile = message?.[PROFILE_KEY]?.[0];
      const schedule = message?.[SCHEDULE_KEY]?.[0];
      if (profile) node.properties[PROFILE_KEY] = profile;
      if (schedule) node.properties[SCHEDULE_KEY] = { ...schedule, compute: undefined, layers: undefined };
      if (schedule && !profile?.change) node.properties[SCHEDULE_KEY] = schedule; // no live preview possible
      refreshBuild(node, true);
    },
    configured: (node) => refreshBuild(node, true),
    widgetChanged: (node) => refreshBuild(node),
  },
  BlockCacheLoadSchedule: {
    executed(node, message) {
      const schedule = message?.[SCHEDULE_KEY]?.[0];
      if (!schedule) return;
      node.properties[SCHEDULE_KEY] = schedule;
      showSchedule(node, schedule);
    },
    configured(node) {
      if (node.properties?.[SCHEDULE_KEY]) showSchedule(node, node.properties[SCHEDULE_KEY]);
    },
  },
  BlockCacheApply: {
    executed(node, message) {
      const note = message?.text?.join("\n") ?? "";
      node.properties[NOTE_KEY] = note || undefined;
      if (!note) pictureWidget(node).text.textContent = "";
      showRun(node);
    },
    configured: (node) => showRun(node),
  },
};

// The nodes of TEXT_NODES: their text, kept so it shows again on reload.
const TEXT_HANDLERS = {
  executed(node, message) {
    const text = message?.text?.join("\n");
    if (!text) return;
    node.properties[TEXT_KEY] = text;
    pictureWidget(node).text.textContent = text;
  },
  configured(node) {
    const text = node.properties?.[TEXT_KEY];
    if (text) pictureWidget(node).text.textContent = text;
  },
};

app.registerExtension({
  name: "block_cache.pictures",
  setup() {
    api.addEventListener("block_cache.run", onRunEvent);
    api.addEventListener("executing", onExecuting);
    api.addEventListener("execution_success", () => onExecuting({ detail: null }));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const handlers = NODE_HANDLERS[nodeData.name] ?? (TEXT_NODES.has(nodeData.name) ? TEXT_HANDLERS : undefined);
    if (!handlers) return;
    if (handlers.executed) {
      chain(nodeType.prototype, "onExecuted", function (message) {
        handlers.executed(this, message);
      });
    }
    if (handlers.configured) {
      chain(nodeType.prototype, "onConfigure", function () {
        handlers.configured(this);
      });
    }
    if (handlers.widgetChanged) {
      chain(nodeType.prototype, "onWidgetChanged", function () {
        handlers.widgetChanged(this);
      });
    }
  },
  nodeCreated(node) {
    if (node.comfyClass === THRESHOLD_NODE || node.comfyClass === TARGET_NODE) {
      pictureWidget(node);
      const refresh = node.comfyClass === TARGET_NODE ? refreshTarget : refreshBuild;
      const watched = node.comfyClass === TARGET_NODE ? ["speedup", "min_psnr", ...LADDER_OPTIONS] : OPTION_NAMES;
      // Slider drags and typed values reach us through the widget callbacks; the poll also catches
      // values set by other code (links, undo) and costs one string compare per tick.
      for (const widget of node.widgets ?? []) {
        if (!watched.includes(widget.name)) continue;
        const callback = widget.callback;
        widget.callback = function (...args) {
          const result = callback?.apply(this, args);
          refresh(node);
          return result;
        };
      }
      const timer = setInterval(() => {
        if (node.graph) refresh(node);
      }, 250);
      chain(node, "onRemoved", () => clearInterval(timer));
    } else if ([...PROFILE_NODES, "BlockCacheLoadSchedule", "BlockCacheApply"].includes(node.comfyClass) ||
      TEXT_NODES.has(node.comfyClass)) {
      pictureWidget(node);
    }
  },
});
