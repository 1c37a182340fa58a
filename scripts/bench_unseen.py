"""What the Build node measures on the profiled prompts against what unseen prompts get (issue 22).

For each sampler setting of a reference model: one profile on the profiling prompts, then for every
rung of the speed-up ladder (and for fewer steps at every step count) the PSNR of each picture
against its uncached picture, on the profiled prompts (what validation measures) and on the
disjoint evaluation sets A and B (16 prompt x seed pairs each). Writes every per-picture value to
``--out/unseen_<model>.json``; ``--report`` turns such files into the tables of
docs/benchmark/unseen/README.md. The profiling, tuning (A) and checking (B) prompts are disjoint.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_unseen.py --model dit --out out/unseen
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_unseen.py --model video --node-choice 2.25,2.5 --out out/x
    .venv/bin/python scripts/bench_unseen.py --report out/unseen
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from comfy_bootstrap import load_pack  # noqa: E402

MIN_SPEEDUP, MAX_SPEEDUP = 1.15, 4.0
CALIBRATION_SET = (777, 3001)  # prompt seed, first noise seed: disjoint from the profiling and evaluation sets
MAX_COMBINED_CACHE_SPEEDUP = 1.8  # the cache's share of a combined row: where it loses least


def fewer_steps_rows(args: argparse.Namespace, steps: int, model: Any, measure: Any, show: Any
                     ) -> list[dict[str, Any]]:
    """Uncached sampling at every step count from ``steps`` - 1 down to a MAX_SPEEDUP speed-up (none with
    --skip-fewer), each measured against ``steps``' uncached pictures."""
    rows = []
    for n in ([] if args.skip_fewer else range(steps - 1, max(2, math.ceil(steps / MAX_SPEEDUP)) - 1, -args.stride)):
        rows.append({"family": "fewer_steps", "computes": n, "speedup": steps / n, "psnr": measure(model, n)})
        show(f"{n} steps", rows[-1])
    return rows


def reference_distance_rows(args: argparse.Namespace, steps: int, model: Any, measure: Any, show: Any
                            ) -> list[dict[str, Any]]:
    """Uncached pictures of sets A and B with other samplers and step counts (--reference-distance
    SAMPLER:STEPS,...) against the setting's own: how far those lie from a more converged solution of the same ODE."""
    import benchmark

    rows = []
    for item in args.reference_distance.split(","):
        solver, n = item.split(":")
        rows.append({"family": "reference_distance", "sampler": solver, "sampler_steps": int(n),
                     "speedup": steps / int(n), "psnr": measure(model, int(n), tuple(benchmark.EVAL_SETS), solver)})
        show(f"{solver} {n} steps", rows[-1])
    return rows


def step_at(sigmas: list[float], sigma: float) -> int:
    """The sampler step whose sigma ``sigma`` is (the nearest of ``sigmas``, the run's schedule)."""
    return min(range(len(sigmas) - 1), key=lambda i: abs(sigmas[i] - sigma))


def pack_modules(*names: str) -> tuple[Any, ...]:
    """Modules of the loaded pack by name, e.g. 'target_ladder' (scripts/benchmark.py's PACKAGES says where)."""
    import benchmark

    return tuple(benchmark._module(name) for name in names)


def in_band(args: argparse.Namespace, speedup: float) -> bool:
    """Whether a rung's speed-up lies in the range this run measures (--min-speedup to --max-speedup)."""
    return max(MIN_SPEEDUP, args.min_speedup) <= speedup <= args.max_speedup


def mean_squared_error(psnrs: list[float]) -> float:
    """The mean over pictures of the squared error behind each PSNR (pictures in [0, 1])."""
    return statistics.mean(10 ** (-v / 10) for v in psnrs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_pack()
    import benchmark

    torch.set_num_threads(args.threads)
    setup = benchmark.MODELS[args.model]
    settings = setup.settings
    reference = getattr(benchmark._module(setup.module), setup.loader)()
    results: dict[str, Any] = {"model": args.model, "settings": {}}
    for name in (args.settings.split(",") if args.settings else settings):
        results["settings"][name] = measure_setting(args, benchmark, reference, name,
                                                    *benchmark.setting_named(settings, name))
        save(args, results)  # each setting as it is done: a long run can be stopped between them
    return results


def save(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Writes the results, keeping other settings' results already in the file."""
    path = args.out / f"unseen_{args.model}{args.tag}.json"
    merged = json.loads(path.read_text()) if path.exists() else {"model": args.model, "settings": {}}
    for name, setting in results["settings"].items():
        if args.combined and name in merged["settings"]:  # combined rows join the setting's other rows
            kept = [r for r in merged["settings"][name]["rows"] if r["family"] != "combined"]
            merged["settings"][name]["rows"] = kept + setting["rows"]
        else:
            merged["settings"][name] = setting
    path.write_text(json.dumps(merged, indent=1))


def measure_setting(args: argparse.Namespace, benchmark: Any, reference: Any, name: str, sampler: str,
                    scheduler: str, steps: int) -> dict[str, Any]:
    import nodes as comfy_nodes

    setup = benchmark.MODELS[args.model]
    reference_module, prompt_source = benchmark._module(setup.module), benchmark._module(setup.prompts)
    patching, target = benchmark._module("patching"), benchmark._module("target_schedule")
    target_ladder, target_build = pack_modules("target_ladder", "target_build")
    model = reference.patcher
    negative = reference.conditioning("")
    started = time.perf_counter()

    def batch(prompt_seed: int, count: int, repeats: int) -> tuple[Any, dict]:
        prompts = prompt_source.benchmark_prompts(count, seed=prompt_seed)
        items = [p for p in prompts for _ in range(repeats)]
        return reference.conditioning_batch(items), reference_module.empty_latent(len(items))

    def sample(m: Any, positive: Any, latent: dict, seed: int, n: int = steps, solver: str = sampler) -> torch.Tensor:
        (out,) = comfy_nodes.common_ksampler(m, seed, n, args.cfg, solver, scheduler, positive, negative, latent)
        return out["samples"]

    profile_positive, profile_latent = batch(benchmark.PROFILE_SET[0], args.profile_prompts, 1)

    def profile_at(n: int) -> Any:
        profiled, holder = patching.attach_profiler(model)
        sample(profiled, profile_positive, profile_latent, benchmark.PROFILE_SET[1], n)
        return patching.collect_profile(holder, model, sampler=sampler, scheduler=scheduler, cfg=args.cfg,
                                        denoise=1.0, latent_shape=tuple(profile_latent["samples"].shape))

    profile = profile_at(steps)

    def setting_result(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"sampler": sampler, "scheduler": scheduler, "steps": steps, "cfg": args.cfg, "rows": rows,
                "seconds": time.perf_counter() - started, "profiled_pictures": len(profile_latent["samples"])}

    if args.error_feedback:  # measured in the error model only: nothing is sampled again
        return setting_result(error_feedback_rows(profile, target))
    # The profiled prompts again with another noise seed: out of sample for the search, as validation can be.
    sets = {"profiled": (profile_positive, profile_latent, benchmark.PROFILE_SET[1]),
            "heldout": (profile_positive, profile_latent, benchmark.PROFILE_SET[1] + 1)}
    if args.node_choice:  # the node's second held-out seed (replay.SECOND_SEED_OFFSET)
        sets["second"] = (profile_positive, profile_latent, benchmark.PROFILE_SET[1] + 2)
    for key, (prompt_seed, seed) in benchmark.EVAL_SETS.items():
        sets[key] = (*batch(prompt_seed, args.prompts, args.seeds), seed)
    uncached = {key: benchmark._pictures(sample(model, *value)) for key, value in sets.items()}

    def measure(m: Any, n: int, keys: tuple[str, ...] = tuple(sets), solver: str = sampler) -> dict[str, list[float]]:
        return {key: [float(v) for v in benchmark.psnr(benchmark._pictures(sample(m, *sets[key], n, solver)),
                                                        uncached[key])] for key in keys}

    def show(label: str, row: dict[str, Any]) -> None:
        print(f"[{args.model} {name}] {label} {row['speedup']:.2f}x: "
              + ", ".join(f"{k} {statistics.mean(v):.1f}" for k, v in row["psnr"].items()), flush=True)

    experiments = {  # each measures its own rows instead of the ladder's
        "combined": lambda: combined_rows(args, steps, profile_at, target, patching, model, measure, show),
        "chains": lambda: chain_rows(args, profile, target, patching, model, measure, show),
        "layer_orders": lambda: layer_order_rows(args, profile, target, patching, model, measure, show),
        "node_choice": lambda: node_choice_rows(args, profile, target, patching, model, measure, show),
        "greedy_measured": lambda: greedy_measured_rows(args, profile, target, patching, model, measure, show),
        "step_sensitivity": lambda: step_sensitivity_rows(profile, target, patching, model, measure, show),
        "output_forecast": lambda: output_forecast_rows(args, profile, target, model, measure, show),
        "spectral": lambda: forecast_variant_rows(args, profile, target, model, measure, show),
        "damped": lambda: forecast_variant_rows(args, profile, target, model, measure, show),
        "even_steps": lambda: even_step_rows(args, profile, target, patching, model, measure, show),
        "cfg_reuse": lambda: cfg_reuse_rows(args, profile, target, patching, model, measure, show),
        "lookahead": lambda: lookahead_rows(args, profile, model, measure, show),
        "lookahead_variants": lambda: lookahead_variant_rows(args, profile, model, measure, show),
        "lookahead_cache": lambda: lookahead_cache_rows(args, profile, model, measure, show),
        "lookahead_search": lambda: lookahead_search_rows(args, profile, model, measure, show),
        "lookahead_path": lambda: lookahead_path_rows(
            args, profile, model, measure, show,
            lambda m: sample(m, profile_positive, profile_latent, benchmark.PROFILE_SET[1])),
        "lookahead_cfg": lambda: lookahead_cfg_rows(args, profile, model, measure, show),
        "lookahead_combined": lambda: lookahead_combined_rows(args, profile, profile_at, model, measure, show),
        "reference_distance": lambda: reference_distance_rows(args, steps, model, measure, show),
        "teacache_steps": lambda: teacache_step_rows(
            args, profile, target, patching, model, measure, show,
            lambda m: sample(m, profile_positive, profile_latent, benchmark.PROFILE_SET[1])),
        "calibrate": lambda: calibration_rows(args, profile, target, patching, model, measure, show,
                                              benchmark._module("calibration"), negative,
                                              *batch(CALIBRATION_SET[0], args.prompts, 1)),
    }
    for flag, rows_of in experiments.items():
        if getattr(args, flag):
            return setting_result(rows_of())
    # --flat-weights: an experiment, every step's error weighted alike (the Build node's alternative search);
    # --layer-damping: every forecast damped, in the search's error model and in the schedules' layers
    found = target_ladder.search(profile, target_build.TargetOptions(), even_step_weights=args.flat_weights,
                                 damping=args.layer_damping)
    if args.always_compute:  # an experiment: the first / last cached blocks always compute (DBCache's Fn / Bn)
        first, last = (int(v) for v in args.always_compute.split(","))
        layers = found.layers[first:len(found.layers) - last]
        error_model = target_ladder.StepErrorModel(profile, layers)
        found = searched_again(dataclasses.replace(found, layers=layers, model=error_model), target, steps)
    if args.sensitivity:  # an experiment: the error model's step weights scaled by the measured sensitivity
        found = with_measured_sensitivity(found, target, steps, args.sensitivity, name)
    if args.orders:  # another set of forecast orders for the ladder (an experiment)
        found = searched_again(found, target, steps, tuple(int(o) for o in args.orders.split(",")))
    ladder, layers = target_ladder.ladder_of(found, profile), found.layers
    rows = []
    for rung in ladder[::-1][::args.stride][::-1]:
        speedup = 1.0 / rung.flop_fraction
        if not in_band(args, speedup):
            continue
        patched, _ = patching.apply_block_cache(model, target_ladder.rung_schedule(profile, layers, rung, {}))
        rows.append({"family": "block_cache", "computes": rung.computes, "order": rung.order,
                     "steps": list(rung.steps), "partial": target_build.partial_to_json(rung.partial),
                     "speedup": speedup, "psnr": measure(patched, steps)})
        show(rung.label, rows[-1])
    rows += fewer_steps_rows(args, steps, model, measure, show)
    return setting_result(rows)


def combined_rows(args: argparse.Namespace, steps: int, profile_at: Any, target: Any, patching: Any, model: Any,
                  measure: Any, show: Any) -> list[dict[str, Any]]:
    """Fewer sampler steps and Block Cache together: for each step count n < ``steps``, a profile at n steps
    and the ladder's mild rungs (at most MAX_COMBINED_CACHE_SPEEDUP), measured against the ``steps``-step
    uncached pictures. The speed-up counts both: steps / (n * the rung's FLOP fraction)."""
    target_ladder, target_build = pack_modules("target_ladder", "target_build")
    rows = []
    low, high = (int(v) for v in args.combined.split("-"))
    for n in range(high, low - 1, -1):
        profile = profile_at(n)
        found = target_ladder.search(profile, target_build.TargetOptions(), damping=args.layer_damping)
        for rung in target_ladder.ladder_of(found, profile):
            cache_speedup, speedup = 1.0 / rung.flop_fraction, steps / (n * rung.flop_fraction)
            if not (MIN_SPEEDUP <= cache_speedup <= MAX_COMBINED_CACHE_SPEEDUP and speedup <= MAX_SPEEDUP):
                continue
            patched, _ = patching.apply_block_cache(model, target_ladder.rung_schedule(profile, found.layers, rung, {}))
            rows.append({"family": "combined", "sampler_steps": n, "computes": rung.computes, "order": rung.order,
                         "damping": rung.damping, "steps": list(rung.steps), "speedup": speedup,
                         "psnr": measure(patched, n)})
            show(f"{n} steps, rung {rung.computes}", rows[-1])
    return rows


def spectral_weights(sigmas: list[float], sigma: float, span: tuple[float, float], degree: int,
                     ridge: float) -> list[float]:
    """Weights w_i with sum_i w_i y_i = the ridge-regression fit of Chebyshev polynomials up to ``degree``
    through the points (sigmas[i], y_i), evaluated at ``sigma`` (Spectrum's global forecast, CVPR 2026, as
    its paper describes it: time mapped to [-1, 1] over the run's ``span`` of sigmas). The weights sum to 1: a
    constant is forecast as itself."""
    low, high = span

    def basis(value: float) -> np.ndarray:
        x = 2.0 * (value - low) / (high - low) - 1.0
        terms = [1.0, x]
        while len(terms) <= degree:
            terms.append(2.0 * x * terms[-1] - terms[-2])
        return np.array(terms[:degree + 1])

    design = np.stack([basis(v) for v in sigmas])  # points x basis
    gram = design.T @ design + ridge * np.diag([0.0] + [1.0] * degree)  # the constant term unpenalised
    return [float(w) for w in design @ np.linalg.solve(gram, basis(sigma))]


def output_forecast(model: Any, compute_steps: tuple[int, ...], order: int, variable: str,
                    spectral: tuple[int, float] | None = None, damping: float = 1.0) -> Any:
    """An experiment (issue 22, "forecast in the sampler's own variable"), benchmark only: the whole
    diffusion model computes at ``compute_steps`` only; at the other steps its output is forecast from
    its last ``order + 1`` computations by Lagrange extrapolation in sigma, either of the model's output
    itself (``variable`` "output": a flow model's velocity) or of the denoised picture ("denoised"), per
    cond chunk. Order 0 of either is one longer Euler step: the same as fewer steps. With ``spectral``
    (degree, ridge) the forecast is instead ``spectral_weights``' fit through every computation of the run
    (order ``order`` Lagrange until it has more points than the degree). ``damping`` scales the Lagrange
    forecast's change from the newest computation (ScalingCache's blend of orders 0 and 1: 0 is order 0)."""
    import comfy.patcher_extension

    (forecast,) = pack_modules("forecast")
    state: dict[str, Any] = {}
    computes = set(compute_steps)

    def outer(executor: Any, *args: Any, **kwargs: Any) -> Any:
        state.clear()
        return executor(*args, **kwargs)

    def diffusion_model(executor: Any, *args: Any, **kwargs: Any) -> Any:
        x = args[0]
        transformer_options = kwargs.get("transformer_options") or next(a for a in args if isinstance(a, dict))
        sigma = float(transformer_options["sigmas"].reshape(-1)[0])
        sigmas = [float(v) for v in transformer_options["sample_sigmas"]]
        step = step_at(sigmas, sigma)
        key = tuple(transformer_options.get("cond_or_uncond") or ())
        points = state.setdefault(key, [])
        if step in computes or not points:
            out = executor(*args, **kwargs)
            value = out if variable == "output" else x - sigma * out  # denoised of a flow (CONST) model
            points.insert(0, (sigma, value.detach().clone()))
            if spectral is None:
                del points[order + 1:]
            return out
        if spectral is not None and len(points) > spectral[0]:
            known = points
            weights = spectral_weights([point[0] for point in known], sigma, (sigmas[len(sigmas) - 2], sigmas[0]),
                                       *spectral)
        else:
            known = points[:order + 1]
            weights = forecast.forecast_weights([point[0] for point in known], sigma, damping)
        value = sum(w * point[1] for w, point in zip(weights, known, strict=True))
        return value if variable == "output" else (x - value) / sigma

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "bench_output_forecast", outer)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_output_forecast",
                                 diffusion_model)
    return patched


FEEDBACK_WEIGHTS = (0.25, 0.5, 1.0)


def error_feedback_rows(profile: Any, target: Any) -> list[dict[str, Any]]:
    """An experiment in the spirit of FoCa's forecast-then-calibrate, measured where the search measures: on
    the profile's trajectory, each whole-step rung's summed weighted forecast error (order 1) against the
    same forecast corrected by the error it made at the last computed step (``weight`` times that error,
    constant or scaled by the distance from that step), as a ratio (below 1: the correction helps)."""
    target_ladder, target_build, forecast_module = pack_modules("target_ladder", "target_build", "forecast")
    steps = profile.grid.steps
    found = target_ladder.search(profile, target_build.TargetOptions(forecast_order=1))
    model = found.model
    values, taus = model._values, model.taus

    def forecast(history: list[int], at: int) -> torch.Tensor:
        weights = forecast_module.lagrange_weights([taus[h] for h in history], taus[at])
        return sum(w * values[h] for w, h in zip(weights, history, strict=True))

    def total(compute: list[int], weight: float, scaled: bool) -> float:
        error = 0.0
        for step in range(steps):
            if step in compute:
                continue
            history = [c for c in reversed(compute) if c < step][:2]
            value = forecast(history, step)
            earlier = [c for c in reversed(compute) if c < history[0]][:2] if len(history) == 2 else []
            if weight and len(earlier) == 2:
                seen = values[history[0]] - forecast(earlier, history[0])
                scale = (taus[step] - taus[history[0]]) / (taus[history[0]] - taus[earlier[0]]) if scaled else 1.0
                value = value + weight * scale * seen
            parts = torch.split((value - values[step]).abs(), model._sizes, dim=1)
            error += sum(float((part.sum(1) / norm[step]).mean())
                         for part, norm in zip(parts, model._norms, strict=True)) * model.weights[step]
        return error

    rows = []
    for rung in target_ladder.whole_step_ladder(found, profile):
        speedup = 1.0 / rung.flop_fraction
        if not 1.5 <= speedup <= MAX_SPEEDUP:
            continue
        base = total(list(rung.steps), 0.0, False)
        ratios = {f"{weight:g} {'scaled' if scaled else 'constant'}": total(list(rung.steps), weight, scaled) / base
                  for weight in FEEDBACK_WEIGHTS for scaled in (False, True)}
        rows.append({"family": "error_feedback", "computes": rung.computes, "speedup": speedup, "error": base,
                     "ratios": ratios})
        print(f"{speedup:.2f}x: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
    return rows


def layer_order_rows(args: argparse.Namespace, profile: Any, target: Any, patching: Any, model: Any,
                     measure: Any, show: Any) -> list[dict[str, Any]]:
    """An experiment: forecast order 0 (reuse as is) on some of the cached layers of each whole-step rung, the
    others at the rung's own order. Every variant is measured on every set (family ``layer_orders``); the one
    with the best held-out-seed PSNR, what the Build node could measure, is the rung's ``block_cache`` row."""
    target_ladder, target_build = pack_modules("target_ladder", "target_build")
    found = target_ladder.search(profile, target_build.TargetOptions())
    rows = []
    for rung in target_ladder.whole_step_ladder(found, profile):
        speedup = 1.0 / rung.flop_fraction
        if not in_band(args, speedup):
            continue
        variants = []
        for group, varied in [("none", rung), *target_ladder.as_is_variants(found, profile, rung)]:
            schedule = target_ladder.rung_schedule(profile, found.layers, varied, {})
            patched, _ = patching.apply_block_cache(model, schedule)
            variants.append({"family": "layer_orders", "computes": rung.computes, "order": rung.order,
                             "order0_layers": group, "steps": list(rung.steps), "partial": None, "speedup": speedup,
                             "psnr": measure(patched, profile.grid.steps)})
            show(f"{rung.computes} compute steps, order 0 on {group}", variants[-1])
        chosen = max(variants, key=lambda row: statistics.mean(row["psnr"]["heldout"]))
        rows += variants + [{**chosen, "family": "block_cache"}]
        show(f"{rung.computes} compute steps, chosen by the held-out seed: order 0 on {chosen['order0_layers']}",
             rows[-1])
    return rows


def node_choice_rows(args: argparse.Namespace, profile: Any, target: Any, patching: Any, model: Any,
                     measure: Any, show: Any) -> list[dict[str, Any]]:
    """The Build node's own choice at each target of --node-choice (its floor, --floor): its validation
    measures on the profiled prompts with the held-out seed, as the node does, 'measure PSNR' (family
    ``node_measure``) and 'choose by measured PSNR' (``node_choose``, per-layer orders included); the schedule
    it gives is then measured on every set."""
    target_build, replay, target_lookahead = pack_modules("target_build", "replay", "target_lookahead")

    def held_out(schedule: Any, seed: str = "heldout") -> Any:
        patched, _ = patching.apply_block_cache(model, schedule)
        return replay.Measurement(tuple(measure(patched, schedule.grid.steps, (seed,))[seed]))

    class Runs:
        """HeldOutRuns' interface on this benchmark's held-out seed ``seed``."""

        def __init__(self, seed: str) -> None:
            self.seed = seed

        def schedule(self, schedule: Any) -> Any:
            return held_out(schedule, self.seed)

        def fewer_steps(self, steps: int) -> Any:
            return replay.Measurement(tuple(measure(model, steps, (self.seed,))[self.seed]))

    validation = replay.HeldOutValidation(Runs("heldout"), Runs("second"), "picture")
    rows = []
    for speedup in (float(v) for v in args.node_choice.split(",")):
        for family, choose in (("node_measure", False), ("node_choose", True), ("node_lookahead", False)):
            if family not in args.node_families.split(","):
                continue
            options = target_build.TargetOptions(speedup=speedup, min_psnr=args.floor)
            schedule = target.build_target_schedule(profile, options, held_out, choose_by_measure=choose,
                                                    confirm=lambda s: held_out(s, "second"))
            if family == "node_lookahead":  # the Build node's default: lookahead measured beside the cache
                schedule, lines = target_lookahead.choose_lookahead(profile, options, validation, schedule, False)
                print("\n".join(lines), flush=True)
            build = target_build.TargetBuild.of(schedule)
            patched, _ = patching.apply_block_cache(model, schedule)
            rows.append({"family": family, "target": speedup, "floor": args.floor, "computes": len(build.compute_steps),
                         "order": build.chosen_order, "steps": list(build.compute_steps),
                         "partial": None if build.chosen_partial is None else build.chosen_partial.to_json(),
                         "as_is_layers": list(build.chosen_as_is_layers), "damping": build.chosen_damping,
                         "lookahead": list(schedule.lookahead_steps),
                         "speedup": schedule.estimated_speedup, "samplings": len(build.measured),
                         "tried": [tried.label for tried in build.measured],
                         "tried_psnr": [[tried.measured_psnr, tried.expected_low] for tried in build.measured],
                         "psnr": measure(patched, profile.grid.steps)})
            show(f"target {speedup:g}, {family}, {len(build.compute_steps)} compute steps, as is "
                 f"{list(build.chosen_as_is_layers)}, damping {build.chosen_damping:g}", rows[-1])
    return rows


def calibration_rows(args: argparse.Namespace, profile: Any, target: Any, patching: Any, model: Any,
                     measure: Any, show: Any, calibration: Any, negative: Any, positive: Any,
                     latent: dict) -> list[dict[str, Any]]:
    """An experiment: Block Caching's learned scale-shift correction (Calibrate Block Cache's training) on
    each whole-step rung in the band, trained on prompts disjoint from every other set (``CALIBRATION_SET``,
    one batch per iteration, a fresh noise seed each); the rung without (``block_cache``) and with it
    (``calibrated``) measured on every set."""
    target_ladder, target_build = pack_modules("target_ladder", "target_build")
    found = target_ladder.search(profile, target_build.TargetOptions())
    options = calibration.CalibrationOptions(iterations=args.calibrate, seed=CALIBRATION_SET[1])
    rows = []
    for rung in target_ladder.whole_step_ladder(found, profile):
        speedup = 1.0 / rung.flop_fraction
        if not in_band(args, speedup):
            continue
        schedule = target_ladder.rung_schedule(profile, found.layers, rung, {})
        row = {"computes": rung.computes, "order": rung.order, "steps": list(rung.steps), "partial": None,
               "speedup": speedup}
        patched, _ = patching.apply_block_cache(model, schedule)
        rows.append({**row, "family": "block_cache", "psnr": measure(patched, profile.grid.steps)})
        show(f"{rung.computes} compute steps", rows[-1])
        result = calibration.calibrate(model, schedule, [(positive, negative)], latent["samples"], options)
        patched, _ = patching.apply_block_cache(model, result.schedule)
        rows.append({**row, "family": "calibrated", "iterations": args.calibrate,
                     "losses": [round(v, 6) for v in result.losses], "psnr": measure(patched, profile.grid.steps)})
        show(f"{rung.computes} compute steps, calibrated ({args.calibrate} iterations, loss "
             f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f})", rows[-1])
    return rows


def teacache_step_rows(args: argparse.Namespace, profile: Any, target: Any, patching: Any, model: Any,
                       measure: Any, show: Any, sample_profiled: Any) -> list[dict[str, Any]]:
    """An experiment (video only): the steps the TeaCache rule for Wan computes at each --teacache-steps
    threshold, as a fixed Block Cache schedule at forecast orders 0 and 1, against the ladder's rung of the
    same count. Wan's indicator (the time modulation ``e0``) depends on the step alone, so the rule's
    decisions are the same for every prompt: replayed here from one uncached run of the profiled prompts,
    with the polynomial fitted on that run as the benchmark fits it."""
    target_ladder, target_build = pack_modules("target_ladder", "target_build")
    import bench_peers

    steps = profile.grid.steps
    indicators, outputs = bench_peers.record_teacache_run(model, sample_profiled, "blocks.0",
                                                          bench_peers.wan_time_modulation)
    coefficients = bench_peers.fit_polynomial(indicators, outputs)
    per_step = indicators[::len(indicators) // steps]  # one per step when cond and uncond come in two calls
    found = target_ladder.search(profile, target_build.TargetOptions())
    whole = {rung.computes: rung for rung in target_ladder.whole_step_ladder(found, profile)}
    rows = []
    for threshold in (float(v) for v in args.teacache_steps.split(",")):
        accumulated, chosen = 0.0, [0]
        for step in range(1, steps):
            accumulated, compute = bench_peers.teacache_accumulate(
                accumulated, bench_peers._relative_l1(per_step[step], per_step[step - 1]), coefficients, threshold)
            if compute or step == steps - 1:
                chosen.append(step)
        print(f"TeaCache {threshold:g}: computes {len(chosen)} steps: {[s + 1 for s in chosen]}", flush=True)
        for order in (0, 1):
            rung = target_ladder.with_flop_fraction(profile, found.layers,
                                                    target_ladder.Rung(len(chosen), tuple(chosen), order, 0.0, 0.0))
            patched, _ = patching.apply_block_cache(model, target_ladder.rung_schedule(profile, found.layers, rung, {}))
            rows.append({"family": f"teacache_steps_order{order}", "threshold": threshold, "computes": len(chosen),
                         "order": order, "steps": chosen, "speedup": 1.0 / rung.flop_fraction,
                         "psnr": measure(patched, steps)})
            show(f"TeaCache {threshold:g}'s steps, order {order}", rows[-1])
        if len(chosen) in whole:
            rung = whole[len(chosen)]
            patched, _ = patching.apply_block_cache(model, target_ladder.rung_schedule(profile, found.layers, rung, {}))
            rows.append({"family": "block_cache", "computes": rung.computes, "order": rung.order,
                         "steps": list(rung.steps), "speedup": 1.0 / rung.flop_fraction,
                         "psnr": measure(patched, steps)})
            show(f"the ladder's {rung.computes} compute steps {[s + 1 for s in rung.steps]}", rows[-1])
    return rows


def even_step_rows(args: argparse.Namespace, profile: Any, target: Any, patching: Any, model: Any,
                   measure: Any, show: Any) -> list[dict[str, Any]]:
    """An experiment: for each whole-step rung in the band, the same count of compute steps spread evenly from
    the first step to the last (both computed, as TeaCache's rule does), at the rung's order; both measured."""
    target_ladder, target_build = pack_modules("target_ladder", "target_build")
    steps = profile.grid.steps
    found = target_ladder.search(profile, target_build.TargetOptions(), damping=args.layer_damping)
    rows = []
    for rung in target_ladder.whole_step_ladder(found, profile):
        speedup = 1.0 / rung.flop_fraction
        if not in_band(args, speedup) or rung.computes < 2:
            continue
        even = target_ladder.evenly_spread_steps(steps, rung.computes)
        for family, chosen in (("block_cache", rung.steps), ("even_with_last", even)):
            varied = target_ladder.with_flop_fraction(profile, found.layers, dataclasses.replace(
                rung, computes=len(chosen), steps=tuple(chosen), error=0.0))
            schedule = target_ladder.rung_schedule(profile, found.layers, varied, {})
            patched, _ = patching.apply_block_cache(model, schedule)
            rows.append({"family": family, "computes": len(chosen), "order": rung.order, "steps": list(chosen),
                         "speedup": 1.0 / varied.flop_fraction, "psnr": measure(patched, steps)})
            show(f"{family} {[s + 1 for s in chosen]}, order {rung.order}", rows[-1])
    return rows


def greedy_measured_rows(args: argparse.Namespace, profile: Any, target: Any, patching: Any, model: Any,
                         measure: Any, show: Any) -> list[dict[str, Any]]:
    """An experiment, the search by pictures instead of the error model: from computing every step, take away
    one compute step at a time, the one whose reuse (every cached layer, order-1 forecast) keeps the profiled
    pictures closest to their uncached pictures (least mean squared error, each candidate sampled); each
    schedule on the way is then measured on the held-out seed and sets A and B. About steps^2 / 2 samplings of
    the profiled prompts: a bound on what choosing steps by measurement can do, not a node's cost."""
    target_ladder, target_build = pack_modules("target_ladder", "target_build")
    steps = profile.grid.steps
    found = target_ladder.search(profile, target_build.TargetOptions(forecast_order=1))
    compute, rows = tuple(range(steps)), []

    def rung_of(chosen: tuple[int, ...]) -> Any:
        rung = target_ladder.Rung(len(chosen), chosen, 1, 0.0, 0.0)
        return target_ladder.with_flop_fraction(profile, found.layers, rung)

    while True:
        best: tuple[float, tuple[int, ...]] | None = None
        for step in compute:
            trial = tuple(c for c in compute if c != step)
            if found.forced[step] or not target_ladder.gaps_fit(trial, steps, found.max_gap):
                continue
            schedule = target_ladder.rung_schedule(profile, found.layers, rung_of(trial), {})
            patched, _ = patching.apply_block_cache(model, schedule)
            mse = mean_squared_error(measure(patched, steps, ("profiled",))["profiled"])
            if best is None or mse < best[0]:
                best = (mse, trial)
        if best is None:
            break
        compute = best[1]
        rung = rung_of(compute)
        speedup = 1.0 / rung.flop_fraction
        if speedup > args.max_speedup:
            break
        if not in_band(args, speedup):
            continue
        patched, _ = patching.apply_block_cache(model, target_ladder.rung_schedule(profile, found.layers, rung, {}))
        rows.append({"family": "block_cache", "computes": rung.computes, "order": 1, "steps": list(compute),
                     "partial": None, "speedup": speedup, "psnr": measure(patched, steps)})
        show(f"greedy by pictures, {rung.computes} compute steps", rows[-1])
    return rows


def searched_again(found: Any, target: Any, steps: int, orders: tuple[int, ...] = (),
                   weights: list[float] | None = None) -> Any:
    """``found`` with its ladder searched again on its own error model (with new step ``weights``, where
    an experiment gives them), for ``orders`` or the orders it was searched for."""
    (target_ladder,) = pack_modules("target_ladder")
    if weights is not None:
        found.model.weights = list(weights)
        found.model._cache.clear()  # it holds weighted errors
    return dataclasses.replace(found, per_order={
        order: target_ladder.best_schedules(found.model, steps, order, found.forced, found.max_gap)
        for order in (orders or tuple(found.per_order))})


def with_measured_sensitivity(found: Any, target: Any, steps: int, path: Path, setting: str) -> Any:
    """The search again, each step's error weighted by what reusing that step alone measured (a
    ``--step-sensitivity`` file): the measured picture error over the predicted one; the first steps, which
    that run does not measure, take the first measured step's ratio."""
    rows = json.loads(path.read_text())["settings"][setting]["rows"]
    ratios = {row["step"]: row["mse"] / max(row["predicted"], 1e-12) for row in rows}
    first = ratios[min(ratios)]
    return searched_again(found, target, steps,
                          weights=[w * ratios.get(step, first) for step, w in enumerate(found.model.weights)])


def step_sensitivity_rows(profile: Any, target: Any, patching: Any, model: Any, measure: Any,
                          show: Any) -> list[dict[str, Any]]:
    """An experiment: does the error model rank the steps as the pictures do? For each step with two
    computed steps before it, every cached layer reused there alone (order-1 forecast from the two steps
    before), its predicted error against the measured picture error (mean squared error, from the PSNR)
    on the profiled prompts and the held-out seed."""
    target_ladder, target_build = pack_modules("target_ladder", "target_build")
    steps = profile.grid.steps
    found = target_ladder.search(profile, target_build.TargetOptions(forecast_order=1))
    rows = []
    for step in range(2, steps):
        compute = tuple(s for s in range(steps) if s != step)
        rung = target_ladder.Rung(steps - 1, compute, 1, 0.0, 1.0)
        patched, _ = patching.apply_block_cache(model, target_ladder.rung_schedule(profile, found.layers, rung, {}))
        predicted = found.model.error(step, (step - 1, step - 2))
        psnr = measure(patched, steps, ("profiled", "heldout"))
        mse = mean_squared_error([v for values in psnr.values() for v in values])
        rows.append({"family": "step_sensitivity", "computes": steps - 1, "step": step, "speedup": 1.0,
                     "predicted": predicted, "mse": mse, "psnr": psnr})
        print(f"step {step + 1}: weight {found.model.weights[step]:.4f}, predicted {predicted:.5f}, "
              f"measured mse {mse:.2e} ({10 * math.log10(1 / mse):.1f} dB), ratio {mse / max(predicted, 1e-12):.2e}",
              flush=True)
    return rows


def chain_rows(args: argparse.Namespace, profile: Any, target: Any, patching: Any, model: Any, measure: Any,
                show: Any) -> list[dict[str, Any]]:
    """An experiment: from each whole-step rung, a chain of schedules, each link reusing one more run of a
    third of the cached layers at one more of the rung's compute steps, the one whose reuse adds the least
    predicted error per FLOP saved (a fine rung is the first link; the chain goes on past the next rung)."""
    target_ladder, target_build, schedules, block_map = pack_modules("target_ladder", "target_build", "schedule",
                                                                     "block_map")
    steps = profile.grid.steps
    found = target_ladder.search(profile, target_build.TargetOptions())
    layers, error_model = found.layers, found.model
    size = max(1, round(len(layers) / 3))
    flops = [float(profile.layer_flops[layer]) for layer in layers]
    low, high = (float(v) for v in args.chains.split("-"))

    def layer_total(index: int, computed: frozenset[int], order: int) -> float:
        return target_ladder.layer_error_totals(error_model, steps, tuple(sorted(computed)), order)[index]

    def fits(computed: frozenset[int]) -> bool:
        return target_ladder.gaps_fit(tuple(sorted(computed)), steps, found.max_gap)

    rows = []
    for base in target_ladder.whole_step_ladder(found, profile):
        if not low <= 1.0 / base.flop_fraction <= high:
            continue
        computed = [frozenset(base.steps) for _ in layers]
        for link in range(1, args.chain_links + 1):
            best = None
            for step in base.steps:
                if found.forced[step]:
                    continue
                for start in range(len(layers) - size + 1):
                    window = range(start, start + size)
                    if any(step not in computed[i] or not fits(computed[i] - {step}) for i in window):
                        continue
                    added = sum(layer_total(i, computed[i] - {step}, base.order)
                                - layer_total(i, computed[i], base.order) for i in window)
                    cost = added / sum(flops[i] for i in window)
                    if best is None or cost < best[0]:
                        best = (cost, step, window)
            if best is None:
                break
            _, step, window = best
            for i in window:
                computed[i] = computed[i] - {step}
            mask = np.ones((len(profile.block_map.layers), steps), dtype=bool)
            layer_schedules = []
            for index, spec in enumerate(profile.block_map.layers):
                if index in layers:
                    row = tuple(s in computed[layers.index(index)] for s in range(steps))
                    mask[index] = row
                    layer_schedules.append(schedules.LayerSchedule(spec.name, spec.kind, block_map.ReuseMode.RESIDUAL,
                                                                   row, forecast_order=base.order))
                else:
                    reuse = (block_map.ReuseMode.RESIDUAL if block_map.ReuseMode.RESIDUAL in spec.reuse_modes
                             else block_map.ReuseMode.OUTPUT)
                    layer_schedules.append(schedules.LayerSchedule(spec.name, spec.kind, reuse, (True,) * steps))
            fraction = schedules.computed_flop_fraction(mask, profile.layer_flops, profile.total_flops)
            patched, _ = patching.apply_block_cache(model, schedules.schedule_of_profile(profile, layer_schedules, {}))
            rows.append({"family": "chain", "computes": base.computes, "links": link, "order": base.order,
                         "steps": list(base.steps), "speedup": 1.0 / fraction, "psnr": measure(patched, steps)})
            show(f"chain from {base.computes} compute steps, link {link} (step {step + 1}, layers {window.start}-"
                 f"{window.stop - 1})", rows[-1])
    return rows


def output_forecast_rows(args: argparse.Namespace, profile: Any, target: Any, model: Any, measure: Any,
                         show: Any) -> list[dict[str, Any]]:
    """The output forecast on the compute steps of the ladder's rungs (orders 1 and 2, both variables), and
    the rungs as Block Cache schedules for comparison. Its speed-up is steps / computes: nothing of the
    model runs at a forecast step."""
    target_ladder, target_build = pack_modules("target_ladder", "target_build")
    steps = profile.grid.steps
    found = target_ladder.search(profile, target_build.TargetOptions())
    rows = []
    for rung in target_ladder.ladder_of(found, profile)[::-1][::args.stride][::-1]:
        speedup = steps / rung.computes
        if not MIN_SPEEDUP <= speedup <= MAX_SPEEDUP:
            continue
        for variable in ("output", "denoised"):
            for order in (1, 2):
                patched = output_forecast(model, rung.steps, order, variable)
                rows.append({"family": "output_forecast", "variable": variable, "computes": rung.computes,
                             "order": order, "steps": list(rung.steps), "speedup": speedup,
                             "psnr": measure(patched, steps)})
                show(f"output forecast ({variable}, order {order}) at rung {rung.computes}", rows[-1])
    return rows


def forecast_variant_rows(args: argparse.Namespace, profile: Any, target: Any, model: Any, measure: Any,
                  show: Any) -> list[dict[str, Any]]:
    """Experiments (issue 22): the output forecast by a Chebyshev fit through every computation of the run
    (each --spectral DEGREE:RIDGE, Spectrum) or with its change damped (each --damped value) against the
    plain order-1 output forecast, at each whole-step rung's compute steps and at as many steps spread evenly
    from the first to the last."""
    target_ladder, target_build = pack_modules("target_ladder", "target_build")
    steps = profile.grid.steps
    fits = [(int(d), float(r)) for d, r in (item.split(":") for item in args.spectral.split(","))] if args.spectral else []
    dampings = [float(v) for v in args.damped.split(",")] if args.damped else []
    found = target_ladder.search(profile, target_build.TargetOptions())
    rows = []
    for rung in target_ladder.whole_step_ladder(found, profile)[::-1][::args.stride][::-1]:
        speedup = steps / rung.computes
        if not in_band(args, speedup) or rung.computes < 2:
            continue
        even = target_ladder.evenly_spread_steps(steps, rung.computes)
        for placement, chosen in (("ladder", rung.steps), ("even", even)):
            variants = [(None, 1.0), *((fit, 1.0) for fit in fits), *((None, d) for d in dampings)]
            for fit, damping in variants:
                patched = output_forecast(model, tuple(chosen), 1, "output", fit, damping)
                forecast = ("order 1" if fit is None else f"Chebyshev degree {fit[0]}, ridge {fit[1]:g}") + (
                    "" if damping == 1.0 else f", damped {damping:g}")
                family = "spectral_forecast" if fit else "output_forecast" if damping == 1.0 else "damped_forecast"
                rows.append({"family": family, "variable": "output", "damping": damping,
                             "placement": placement, "forecast": forecast, "computes": rung.computes, "order": 1,
                             "steps": list(chosen), "speedup": speedup, "psnr": measure(patched, steps)})
                show(f"output forecast, {forecast}, {placement} steps, {rung.computes} computes", rows[-1])
    return rows


def lookahead_rows(args: argparse.Namespace, profile: Any, model: Any, measure: Any, show: Any
                   ) -> list[dict[str, Any]]:
    """The lookahead experiment with every count of model calls spread evenly from the first step to the last,
    and with the ladder's whole-step rungs' compute steps (the last step added), against fewer steps."""
    target_ladder, target_build, lookahead, patching = pack_modules("target_ladder", "target_build", "lookahead",
                                                                    "patching")
    steps = profile.grid.steps
    found = target_ladder.search(profile, target_build.TargetOptions())
    placements = [("even", tuple(target_ladder.evenly_spread_steps(steps, n))) for n in range(2, steps)]
    placements += [("ladder", tuple(sorted({*rung.steps, steps - 1})))
                   for rung in target_ladder.whole_step_ladder(found, profile)]
    rows = []
    for placement, evaluated in placements:
        speedup = steps / len(set(evaluated))
        if not in_band(args, speedup):
            continue
        rows.append({"family": "lookahead", "placement": placement, "computes": len(set(evaluated)),
                     "steps": list(evaluated), "speedup": speedup,
                     "psnr": measure(patching.apply_block_cache(model, lookahead.lookahead_schedule(profile, evaluated))[0],
                                     steps)})
        show(f"lookahead, {placement} steps {list(evaluated)}", rows[-1])
    return rows + fewer_steps_rows(args, steps, model, measure, show)


def lookahead_combined_rows(args: argparse.Namespace, profile: Any, profile_at: Any, model: Any, measure: Any,
                            show: Any) -> list[dict[str, Any]]:
    """Fewer sampler steps with the step lookahead: for each count K (or K:LOW) of --lookahead-combined and each
    sampler step count n from ``steps`` down to K + 1 (or LOW), the lookahead at K model calls of n steps (spread
    evenly, and at the ladder's steps for n where a rung gives K calls), measured against ``steps``' uncached
    pictures: shorter gaps on a coarser grid, against longer gaps on the user's."""
    steps = profile.grid.steps
    target_ladder, lookahead, patching = pack_modules("target_ladder", "lookahead", "patching")
    profiles = {steps: profile}  # one profile per step count, shared by the counts of calls
    rows = []
    for item in args.lookahead_combined.split(","):
        count, _, low = item.partition(":")
        calls = int(count)
        for n in range(steps, max(calls, int(low or 0) - 1), -1):
            if n not in profiles:
                profiles[n] = profile_at(n)
            profile_n = profiles[n]
            placements = [("even", tuple(target_ladder.evenly_spread_steps(n, calls)))]
            placements += [("ladder", planned) for planned in ladder_lookahead_steps(profile_n)
                           if len(planned) == calls]
            for placement, evaluated in placements:
                patched, _ = patching.apply_block_cache(model, lookahead.lookahead_schedule(profile_n, evaluated))
                rows.append({"family": "lookahead_combined", "sampler_steps": n, "placement": placement,
                             "computes": calls, "steps": list(evaluated), "speedup": steps / calls,
                             "psnr": measure(patched, n)})
                show(f"{n} steps, lookahead {placement} {list(evaluated)}", rows[-1])
    return rows


def lookahead_variant(model: Any, planned: tuple[int, ...], predict: str, reuse: str) -> Any:
    """An experiment, benchmark only: step lookahead (block_caching/lookahead.py, written out as a PREDICT_NOISE
    wrapper) with another predicted point or another reused variable. ``predict``: "euler" (the pack's: one Euler
    step with the last evaluation's derivative, as taken at the point it was evaluated at), "slope:D" (the
    derivative extrapolated linearly in sigma from the last two evaluations, its change damped by D, and integrated
    over the gap: a second-order predictor) or "pulled:J" (one Euler step with the derivative at the latent the
    sampler really has, ``(x - denoised) / sigma``, its denoised picture moved by J times that latent's distance
    from the point it was evaluated at: J = 1 is "euler", J = 0 the step with the denoised picture held).
    ``reuse``: "derivative" (the first version's: interpolated linearly in sigma, the evaluated one at the planned
    step), "denoised" (the pack's since: the same of the denoised picture, so the derivative follows where the
    sampler really is), "logsnr" (the same, linear in the flow's log-SNR log((1 - sigma) / sigma) instead of
    sigma, where finite over the gap), "quadratic" (the denoised picture interpolated through the evaluation
    before the last too), "jacobian:J" (the denoised picture moved by J times the latent's distance from the
    straight line the predicted point was taken on; J a number, or "gauss:S" for a Gaussian latent of deviation
    S: the denoiser's slope on the flow path, (1 - sigma) S^2 / ((1 - sigma)^2 S^2 + sigma^2)) or
    "lastjacobian:J" (the same at the last step only, whose denoised picture is the sampler's result: the
    denoiser's slope goes to 1 as sigma goes to 0)."""
    import comfy.patcher_extension

    state: dict[str, Any] = {}

    def outer(executor: Any, *args: Any, **kwargs: Any) -> Any:
        state.clear()
        return executor(*args, **kwargs)

    def value_of(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
        return (x - denoised) / sigma if reuse == "derivative" else denoised

    def denoiser_slope(sigma: float) -> float:
        kind, _, spread = reuse.partition(":")[2].partition(":")
        if kind != "gauss":
            return float(kind)
        variance = float(spread) ** 2
        return (1 - sigma) * variance / ((1 - sigma) ** 2 * variance + sigma ** 2)

    def returned(x: torch.Tensor, value: torch.Tensor, sigma: float, last_step: bool = False) -> torch.Tensor:
        if reuse == "derivative":
            return x - sigma * value
        if reuse.startswith("jacobian") or (last_step and reuse.startswith("lastjacobian")):
            anchor, anchor_sigma, derivative = state["line"]  # the line the predicted point was taken on
            return value + denoiser_slope(sigma) * (x - anchor - (sigma - anchor_sigma) * derivative)
        return value

    def between(before: Any, known: Any, ahead: Any, sigma: float) -> torch.Tensor:
        share = (sigma - known[1]) / (ahead[1] - known[1])
        if reuse == "logsnr" and 0 < ahead[1] <= known[1] < 1:  # the log-SNR is finite inside the gap
            def log_snr(value: float) -> float:
                return math.log((1 - value) / value)
            share = (log_snr(sigma) - log_snr(known[1])) / (log_snr(ahead[1]) - log_snr(known[1]))
        linear = known[3] + share * (ahead[3] - known[3])
        if reuse != "quadratic" or before is None:
            return linear
        # Newton's form: the linear term plus the second divided difference through the evaluation before.
        first_left = (known[3] - before[3]) / (known[1] - before[1])
        first_right = (ahead[3] - known[3]) / (ahead[1] - known[1])
        second = (first_right - first_left) / (ahead[1] - before[1])
        return linear + second * (sigma - known[1]) * (sigma - ahead[1])

    def predict_noise(executor: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict[str, Any],
                      seed: Any) -> torch.Tensor:
        sigmas = [float(v) for v in model_options["transformer_options"]["sample_sigmas"]]
        sigma = float(timestep.reshape(-1)[0])
        step = step_at(sigmas, sigma)
        known, ahead = state.get("known"), state.get("ahead")
        if ahead is None and (known is None or step in planned):
            denoised = executor(x, timestep, model_options, seed)
            state["before"], state["known"] = known, (step, sigma, (x - denoised) / sigma, value_of(x, denoised, sigma))
            return denoised
        if ahead is None:
            target = next((p for p in planned if p > step), len(sigmas) - 2)
            slope_through = state.get("before")
            derivative = known[2]
            if predict.startswith("pulled"):
                if reuse == "derivative":
                    raise ValueError("pulled:J predicts from the denoised picture: reuse it, not the derivative")
                held = (x - known[3]) / sigma  # equal to the evaluated step's, since the sampler stepped with it
                derivative = held + float(predict.split(":")[1]) * (known[2] - held)
            elif predict != "euler" and slope_through is not None:
                damping = float(predict.split(":")[1])
                slope = (known[2] - slope_through[2]) / (known[1] - slope_through[1])
                derivative = derivative + damping * slope * ((sigma + sigmas[target]) / 2 - known[1])
            predicted = x + (sigmas[target] - sigma) * derivative
            state["line"] = (x, sigma, derivative)
            denoised = executor(predicted, torch.full_like(timestep, sigmas[target]), model_options, seed)
            ahead = state["ahead"] = (target, sigmas[target], (predicted - denoised) / sigmas[target],
                                      value_of(predicted, denoised, sigmas[target]))
        if step >= ahead[0]:
            state["before"], state["known"], state["ahead"] = known, ahead, None
            return returned(x, ahead[3], sigma, last_step=step == len(sigmas) - 2)
        return returned(x, between(state.get("before"), known, ahead, sigma), sigma)

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "bench_lookahead_variant", outer)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "bench_lookahead_variant",
                                 predict_noise)
    return patched


def ladder_lookahead_steps(profile: Any) -> list[tuple[int, ...]]:
    """The lookahead steps of each of the default search's whole-step rungs (``rung_lookahead_steps``)."""
    target_ladder, target_build, target_lookahead = pack_modules("target_ladder", "target_build", "target_lookahead")
    found = target_ladder.search(profile, target_build.TargetOptions())
    return [target_lookahead.rung_lookahead_steps(rung.steps, profile.grid.steps)
            for rung in target_ladder.whole_step_ladder(found, profile)]


def lookahead_variant_rows(args: argparse.Namespace, profile: Any, model: Any, measure: Any, show: Any
                           ) -> list[dict[str, Any]]:
    """Each --lookahead-variants PREDICT:REUSE (``lookahead_variant``) at the counts in the band, with the steps
    spread evenly and at the ladder's whole-step rungs' compute steps (first and last steps added)."""
    (target_ladder,) = pack_modules("target_ladder")
    steps = profile.grid.steps
    placements = [("even", tuple(target_ladder.evenly_spread_steps(steps, n))) for n in range(2, steps)]
    placements += [("ladder", planned) for planned in ladder_lookahead_steps(profile)]
    rows = []
    for variant in args.lookahead_variants.split(","):
        parts = variant.split(":")
        split_at = 2 if parts[0] in ("slope", "pulled") else 1  # slope:D and pulled:J take their number along
        predict, reuse = ":".join(parts[:split_at]), ":".join(parts[split_at:])
        for placement, evaluated in placements:
            speedup = steps / len(evaluated)
            if not in_band(args, speedup):
                continue
            rows.append({"family": "lookahead_variant", "predict": predict, "reuse": reuse, "placement": placement,
                         "computes": len(evaluated), "steps": list(evaluated), "speedup": speedup,
                         "psnr": measure(lookahead_variant(model, evaluated, predict, reuse), steps)})
            show(f"lookahead {predict}, {reuse} reused, {placement} steps {list(evaluated)}", rows[-1])
    return rows


def lookahead_cache_schedule(profile: Any, found: Any, planned: tuple[int, ...], share: float) -> Any:
    """An experiment's schedule: at the lookahead's evaluations, the cached layers whose forecast (order 1, from
    the two planned steps before) the error model finds cheapest per FLOP reuse, until ``share`` of the evaluations'
    FLOPs is saved. Never at the first two planned steps nor the last, nor one layer at two planned steps in a row.
    Its layers' rows are False between planned steps: a layer computes at a planned step only where its row does."""
    (lookahead,) = pack_modules("lookahead")
    steps, flops = profile.grid.steps, profile.layer_flops
    budget = share * len(planned) * profile.total_flops
    candidates = []
    for position in range(2, len(planned) - 1):
        step, history = planned[position], (planned[position - 1], planned[position - 2])
        for layer, error in zip(found.layers, found.model.layer_errors(step, history), strict=True):
            candidates.append((error / max(flops[layer], 1.0), layer, position))
    reused: set[tuple[int, int]] = set()
    saved = 0.0
    for _, layer, position in sorted(candidates):
        if saved >= budget:
            break
        if (layer, position - 1) in reused or (layer, position + 1) in reused:
            continue
        reused.add((layer, position))
        saved += flops[layer]
    base = lookahead.lookahead_schedule(profile, planned)
    layer_rows = []
    for index, layer_schedule in enumerate(base.layers):
        positions = [position for layer, position in reused if layer == index]
        if not positions:
            layer_rows.append(layer_schedule)
            continue
        row = [False] * steps
        for position, step in enumerate(planned):
            row[step] = position not in positions
        layer_rows.append(dataclasses.replace(layer_schedule, compute=tuple(row), forecast_order=1))
    schedule = dataclasses.replace(base, layers=tuple(layer_rows), lookahead_steps=())
    speedup = 1.0 / dataclasses.replace(schedule, lookahead_steps=planned).flop_fraction
    return schedule, speedup


def lookahead_cache_rows(args: argparse.Namespace, profile: Any, model: Any, measure: Any, show: Any
                         ) -> list[dict[str, Any]]:
    """An experiment: the lookahead (the benchmark's copy, ``lookahead_variant``) at each --lookahead-cache count,
    with the steps spread evenly, and with the cache reusing layers at its evaluations (``lookahead_cache_schedule``)
    for each --lookahead-cache-shares share of their FLOPs: speed-ups between two whole counts."""
    target_ladder, target_build, patching = pack_modules("target_ladder", "target_build", "patching")
    steps = profile.grid.steps
    found = target_ladder.search(profile, target_build.TargetOptions())
    rows = []
    for count in (int(c) for c in args.lookahead_cache.split(",")):
        planned = tuple(target_ladder.evenly_spread_steps(steps, count))
        for share in (float(v) for v in args.lookahead_cache_shares.split(",")):
            schedule, speedup = lookahead_cache_schedule(profile, found, planned, share)
            patched, _ = patching.apply_block_cache(lookahead_variant(model, planned, "euler", "denoised"), schedule)
            rows.append({"family": "lookahead_cache", "computes": count, "share": share, "steps": list(planned),
                         "speedup": speedup, "psnr": measure(patched, steps)})
            show(f"lookahead {count} of {steps} calls, layers reused for {share:.0%} of their FLOPs", rows[-1])
    return rows


def climbed(start: tuple[int, ...], steps: int, score: Any, margin: float, budget: int) -> tuple[tuple[int, ...], int]:
    """Lookahead steps hill-climbed from ``start``: one interior planned step moved by one at a time, kept where
    ``score`` rises by more than ``margin``, until no move does or ``budget`` scores are spent; the steps found
    and the scores spent."""
    best, best_score, tried = start, score(start), 1
    improved = True
    while improved and tried < budget:
        improved = False
        for position in range(1, len(best) - 1):
            for move in (-1, 1):
                candidate = list(best)
                candidate[position] += move
                if candidate[position] in best or not 0 < candidate[position] < steps - 1:
                    continue
                value = score(tuple(candidate))
                tried += 1
                if value > best_score + margin:
                    best, best_score, improved = tuple(candidate), value, True
                    break
            if improved or tried >= budget:
                break
    return best, tried


def lookahead_search_rows(args: argparse.Namespace, profile: Any, model: Any, measure: Any, show: Any
                          ) -> list[dict[str, Any]]:
    """An experiment: for each --lookahead-search count, the lookahead's planned steps hill-climbed on the profiled
    pictures (one interior step moved by one at a time, kept where the profiled mean PSNR rises by more than
    0.05 dB) from the steps spread evenly and from the ladder's, then measured on every set: how much placement
    can still give, and whether the profiled pictures find it."""
    target_ladder, lookahead, patching = pack_modules("target_ladder", "lookahead", "patching")
    steps = profile.grid.steps
    ladder = ladder_lookahead_steps(profile)

    def patched(planned: tuple[int, ...]) -> Any:
        return patching.apply_block_cache(model, lookahead.lookahead_schedule(profile, planned))[0]

    def profiled_mean(planned: tuple[int, ...]) -> float:
        return statistics.mean(measure(patched(planned), steps, ("profiled",))["profiled"])

    rows = []
    for count in (int(c) for c in args.lookahead_search.split(",")):
        starts = [("even", tuple(target_ladder.evenly_spread_steps(steps, count)))]
        starts += [("ladder", placed) for placed in ladder if len(placed) == count]
        for start_name, start in starts:
            best, tried = climbed(start, steps, profiled_mean, 0.05, args.lookahead_search_budget)
            for label, planned in ((start_name, start), (f"{start_name}, searched", best)):
                rows.append({"family": "lookahead_search", "start": start_name, "searched": planned != start,
                             "tried": tried, "computes": count, "steps": list(planned), "speedup": steps / count,
                             "psnr": measure(patched(planned), steps)})
                show(f"lookahead {count} of {steps} calls, {label} {list(planned)} ({tried} tried)", rows[-1])
    return rows


PATH_SLOPE_SCALES = (0.3, 1.0)
PATH_ELEMENTS = 4096  # elements per picture of the latent and the denoised picture kept at every step


@dataclasses.dataclass(frozen=True)
class SampledPath:
    """The uncached run's latent and denoised picture at the same elements of every picture at every step,
    [steps, pictures, elements], and per step the ``(a, b)`` of the latent ``a x0 + b noise``."""

    latents: torch.Tensor
    denoised: torch.Tensor
    latent_scales: list[tuple[float, float]]


def sampled_path(model: Any, sample_profiled: Any) -> SampledPath:
    """The profiled pictures sampled uncached again, their path kept (a post-CFG hook that returns the denoised
    picture as it is)."""
    kept: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    index: list[torch.Tensor] = []

    def record(args: dict[str, Any]) -> torch.Tensor:
        x, denoised = args["input"], args["denoised"]
        flat = x.detach().float().reshape(x.shape[0], -1)
        if not index:
            index.append(torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))[:PATH_ELEMENTS])
        kept.append((float(args["sigma"].reshape(-1)[0]), flat[:, index[0]].cpu(),
                     denoised.detach().float().reshape(x.shape[0], -1)[:, index[0]].cpu()))
        return denoised

    recording = model.clone()
    recording.set_model_sampler_post_cfg_function(record)
    sample_profiled(recording)
    sampling = model.get_model_object("model_sampling")

    def scales(sigma: float) -> tuple[float, float]:
        at = torch.tensor([sigma])
        return (float(sampling.noise_scaling(at, torch.zeros(1), torch.ones(1)).reshape(-1)[0]),
                float(sampling.noise_scaling(at, torch.ones(1), torch.zeros(1)).reshape(-1)[0]))

    sigmas = [sigma for sigma, _, _ in kept]
    if len(sigmas) != len(set(sigmas)):
        raise ValueError("the sampler evaluated the model more than once per step: the path is for Euler")
    return SampledPath(torch.stack([x for _, x, _ in kept]), torch.stack([d for _, _, d in kept]),
                       [scales(sigma) for sigma in sigmas])


def surrogate_slopes(path: SampledPath) -> list[float]:
    """Per step, how much the denoised picture moves with the latent in the surrogate model: ``a c^2 / (a^2 c^2 +
    b^2)``, the slope of the posterior mean of an ``x0`` of variance ``c^2`` (the last denoised picture's) given the
    latent ``a x0 + b noise``."""
    variance = float(path.denoised[-1].var())
    return [a * variance / max(a * a * variance + b * b, 1e-12) for a, b in path.latent_scales]


def simulated_error(path: SampledPath, sigmas: list[float], planned: tuple[int, ...], slopes: list[float]
                    ) -> float:
    """The mean squared distance between the final latent of a lookahead at ``planned`` (as
    block_caching/lookahead.py runs it with Euler) and the uncached run's, on the surrogate model: the denoised
    picture at a step is the uncached one plus the step's slope times the latent's distance from the uncached
    latent."""
    latents, denoised = path.latents, path.denoised
    steps = latents.shape[0]

    def model(step: int, x: torch.Tensor) -> torch.Tensor:
        return denoised[step] + slopes[step] * (x - latents[step])

    x = latents[0].clone()
    known: tuple[int, torch.Tensor, torch.Tensor] | None = None  # step, denoised, derivative
    ahead: tuple[int, torch.Tensor, torch.Tensor] | None = None
    for step in range(steps):
        sigma = sigmas[step]
        if ahead is None and (known is None or step in planned):
            value = model(step, x)
            known = (step, value, (x - value) / sigma)
        else:
            if ahead is None:
                target = next((p for p in planned if p > step), steps - 1)
                predicted = x + (sigmas[target] - sigma) * known[2]
                value = model(target, predicted)
                ahead = (target, value, (predicted - value) / sigmas[target])
            if step >= ahead[0]:
                known, ahead = ahead, None
                value = known[1]
            else:
                share = (sigma - sigmas[known[0]]) / (sigmas[ahead[0]] - sigmas[known[0]])
                value = known[1] + share * (ahead[1] - known[1])
        x = x + (sigmas[step + 1] - sigma) * (x - value) / sigma
    last = steps - 1
    uncached = latents[last] + (sigmas[last + 1] - sigmas[last]) * (latents[last] - denoised[last]) / sigmas[last]
    return float((x - uncached).pow(2).mean())


def placement_on_path(path: SampledPath, sigmas: list[float], start: tuple[int, ...], slopes: list[float]
                      ) -> tuple[int, ...]:
    """The lookahead steps ``climbed`` from ``start`` on the simulated error (in dB, kept where it falls by more
    than 0.005 dB)."""
    def score(planned: tuple[int, ...]) -> float:
        return -10 * math.log10(max(simulated_error(path, sigmas, planned, slopes), 1e-20))

    return climbed(start, len(sigmas) - 1, score, 0.005, 400)[0]


def lookahead_path_rows(args: argparse.Namespace, profile: Any, model: Any, measure: Any, show: Any,
                        sample_profiled: Any) -> list[dict[str, Any]]:
    """An experiment (LeMiCa's idea, placement from the uncached trajectory): for each --lookahead-path count, the
    lookahead's planned steps chosen on the profiled pictures' uncached path (``placement_on_path``: simulated on
    the kept latents and denoised pictures, no sampling) from the steps spread evenly, at PATH_SLOPE_SCALES times
    the surrogate's slope, measured beside the node's own placements (the even spread and the ladder's). Prints
    which one the node's rule (the held-out seed's higher reading) takes with and without the path's, and what
    sets A and B read for it."""
    target_ladder, lookahead, patching = pack_modules("target_ladder", "lookahead", "patching")
    steps, sigmas = profile.grid.steps, list(profile.grid.sigmas)
    path = sampled_path(model, sample_profiled)
    slopes = surrogate_slopes(path)
    ladder = ladder_lookahead_steps(profile)
    rows = []
    for count in (int(c) for c in args.lookahead_path.split(",")):
        even = tuple(target_ladder.evenly_spread_steps(steps, count))
        chosen = {even: "even"}
        for planned in ladder:
            if len(planned) == count:
                chosen.setdefault(planned, "ladder")
        for scale in PATH_SLOPE_SCALES:
            chosen.setdefault(placement_on_path(path, sigmas, even, [scale * v for v in slopes]), f"path x{scale:g}")
        measured = []
        for planned, label in chosen.items():
            patched = patching.apply_block_cache(model, lookahead.lookahead_schedule(profile, planned))[0]
            rows.append({"family": "lookahead_path", "label": label, "computes": count, "steps": list(planned),
                         "speedup": steps / count, "psnr": measure(patched, steps)})
            measured.append(rows[-1])
            show(f"lookahead {count} of {steps} calls, {label} {list(planned)}", rows[-1])
        for scale in (None, *PATH_SLOPE_SCALES):
            pool = [r for r in measured if not r["label"].startswith("path")
                    or (scale is not None and r["label"] == f"path x{scale:g}")]
            best = max(pool, key=lambda r: statistics.mean(r["psnr"]["heldout"]))
            print(f"[{args.model} {steps}] {count} calls, held-out pick among the node's"
                  + (f" and path x{scale:g}" if scale else "") + f": {best['label']} {best['steps']}, A "
                  f"{statistics.mean(best['psnr']['A']):.2f}, B {statistics.mean(best['psnr']['B']):.2f}", flush=True)
    return rows


def cfg_reuse(model: Any, uncond_steps: tuple[int, ...], order: int, damping: float = 1.0) -> Any:
    """An experiment, benchmark only (FasterCache's CFG reuse, from its published description): the negative
    prompt's prediction is computed at ``uncond_steps`` only; at the other steps only the positive one is, and
    the negative one is the positive one less the difference between the two, forecast (order ``order``,
    ``damping``: block_caching/forecast.py) in sigma from the steps where both were computed. Acts on the
    sampler's cond batch (ComfyUI's calc_cond_batch wrapper), so it composes with a patched model's layers."""
    import comfy.patcher_extension

    (forecast,) = pack_modules("forecast")
    differences: list[list[torch.Tensor | None]] = []  # positive - negative, newest first
    sigmas_of_differences: list[float] = []
    computes = set(uncond_steps)

    def outer(executor: Any, *args: Any, **kwargs: Any) -> Any:
        differences.clear()
        sigmas_of_differences.clear()
        return executor(*args, **kwargs)

    def calc_cond_batch(executor: Any, model_: Any, conds: list[Any], x_in: torch.Tensor, timestep: torch.Tensor,
                        model_options: dict[str, Any]) -> Any:
        if len(conds) != 2 or conds[1] is None:
            return executor(model_, conds, x_in, timestep, model_options)
        sigma = float(timestep.reshape(-1)[0])
        sigmas = [float(v) for v in model_options["transformer_options"]["sample_sigmas"]]
        step = step_at(sigmas, sigma)
        if step in computes or len(differences) <= order:
            positive, negative = executor(model_, conds, x_in, timestep, model_options)
            differences[:], sigmas_of_differences[:] = forecast.push_point(
                differences, sigmas_of_differences, [(positive - negative).detach().clone()], sigma, order)
            return [positive, negative]
        positive, _ = executor(model_, [conds[0], None], x_in, timestep, model_options)
        weights = forecast.forecast_weights(sigmas_of_differences, sigma, damping)
        return [positive, positive - forecast.combine([point[0] for point in differences], weights)]

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "bench_cfg_reuse", outer)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "bench_cfg_reuse",
                                 calc_cond_batch)
    return patched


def lookahead_cfg_rows(args: argparse.Namespace, profile: Any, model: Any, measure: Any, show: Any
                       ) -> list[dict[str, Any]]:
    """An experiment: the lookahead (``lookahead_variant``, steps spread evenly) at each --lookahead-cfg COUNT:SKIPS,
    the negative prompt left out at SKIPS of its evaluations spread evenly from the third to the one before the
    last and forecast there (``cfg_reuse``, each --cfg-reuse-forecasts): speed-ups between two whole counts of
    calls. Speed-up: two conds per evaluation, one where the negative prompt is left out, against two per step."""
    (target_ladder,) = pack_modules("target_ladder")
    steps = profile.grid.steps
    forecasts = [(int(order), float(damping)) for order, damping in
                 (item.split(":") for item in args.cfg_reuse_forecasts.split(","))]
    rows = []
    for item in args.lookahead_cfg.split(","):
        count, skips = (int(v) for v in item.split(":"))
        planned = tuple(target_ladder.evenly_spread_steps(steps, count))
        interior = planned[2:-1]
        left_out = {interior[round((i + 1) * (len(interior) + 1) / (skips + 1)) - 1] for i in range(skips)}
        uncond_steps = tuple(step for step in planned if step not in left_out)
        speedup = 2 * steps / (2 * count - len(left_out))
        for order, damping in forecasts:
            patched = lookahead_variant(cfg_reuse(model, uncond_steps, order, damping), planned, "euler", "denoised")
            rows.append({"family": "lookahead_cfg", "computes": count, "steps": list(planned),
                         "uncond_left_out": sorted(left_out), "order": order, "damping": damping, "speedup": speedup,
                         "psnr": measure(patched, steps)})
            show(f"lookahead {count} of {steps} calls, negative prompt left out at {sorted(left_out)}, order {order} "
                 f"damped {damping}", rows[-1])
    return rows


def cfg_reuse_rows(args: argparse.Namespace, profile: Any, target: Any, patching: Any, model: Any,
                   measure: Any, show: Any) -> list[dict[str, Any]]:
    """The CFG reuse experiment: the negative prompt computed at as many steps as --cfg-reuse lists, spread
    evenly from the first step to the last, with each --cfg-reuse-forecasts forecast of the difference; with
    --cfg-reuse-cache, also on top of each whole-step rung of the damped ladder (as the Build node searches it)
    in the band, and that rung alone: 'even' with the same steps, 'compute-steps' with the negative prompt at a
    --cfg-reuse-share of the rung's compute steps spread evenly over them (and nowhere else). Speed-up: the
    model's FLOPs per cond at each step (the rung's share of them at that step), one cond at a step without
    the negative prompt, two at the others, against two at every step."""
    target_ladder, target_build, schedules = pack_modules("target_ladder", "target_build", "schedule")
    steps = profile.grid.steps
    counts = [int(v) for v in args.cfg_reuse.split(",")]
    forecasts = [(int(order), float(damping)) for order, damping in
                 (item.split(":") for item in args.cfg_reuse_forecasts.split(","))]
    rows = []
    rungs = [None]
    if args.cfg_reuse_cache:
        found = target_ladder.search(profile, target_build.TargetOptions(forecast_order=1), damping=0.5)
        rungs += [rung for rung in target_ladder.whole_step_ladder(found, profile)
                  if in_band(args, 1.0 / rung.flop_fraction) and rung.computes >= 2]
    for rung in rungs:
        if rung is None:
            per_step, cached = [1.0] * steps, model
        else:
            schedule = target_ladder.rung_schedule(profile, found.layers, rung, {})
            mask = schedule.compute_mask()
            per_step = [schedules.computed_flop_fraction(mask[:, s:s + 1], profile.layer_flops, profile.total_flops)
                        for s in range(steps)]
            cached, _ = patching.apply_block_cache(model, schedule)
            rows.append({"family": "block_cache", "computes": rung.computes, "order": rung.order,
                         "damping": rung.damping, "steps": list(rung.steps), "speedup": 1.0 / rung.flop_fraction,
                         "psnr": measure(cached, steps)})
            show(f"the {rung.computes}-step rung alone", rows[-1])
        placements = [target_ladder.evenly_spread_steps(steps, count) for count in counts]
        if rung is not None and args.cfg_reuse_cache == "compute-steps":
            share = max(2, round(args.cfg_reuse_share * rung.computes))
            placements = [tuple(rung.steps[i] for i in target_ladder.evenly_spread_steps(rung.computes, share))]
        for uncond_steps in placements:
            count = len(uncond_steps)
            cost = sum(f * (2 if s in uncond_steps else 1) for s, f in enumerate(per_step)) / (2 * steps)
            for order, damping in forecasts:
                rows.append({"family": "cfg_reuse" if rung is None else "cfg_reuse_cache", "uncond_computes": count,
                             "uncond_steps": list(uncond_steps), "order": order, "damping": damping,
                             "computes": steps if rung is None else rung.computes,
                             "steps": list(range(steps)) if rung is None else list(rung.steps),
                             "cache_speedup": 1.0 if rung is None else 1.0 / rung.flop_fraction,
                             "speedup": 1.0 / cost,
                             "psnr": measure(cfg_reuse(cached, uncond_steps, order, damping), steps)})
                show(f"negative prompt at {count} steps, difference order {order} damped {damping:g}"
                     + ("" if rung is None else f", on the {rung.computes}-step rung"), rows[-1])
    rows += fewer_steps_rows(args, steps, model, measure, show)
    return rows


# ---- report ---------------------------------------------------------------------------------------

def report(folder: Path) -> str:
    lines = []
    for path in sorted(folder.glob("unseen_*.json")):
        data = json.loads(path.read_text())
        for name, setting in data["settings"].items():
            lines += [f"### {data['model']} {name} ({setting['sampler']}/{setting['scheduler']} {setting['steps']})", "",
                      "| method | FLOP speed-up | profiled mean (sd) | held-out seed mean (sd) | A mean / worst | B mean / worst | gap A, B (profiled; held-out) |",
                      "|---|---|---|---|---|---|---|"]
            for row in setting["rows"]:
                if "profiled" not in row.get("psnr", {}):  # error-model or reference-distance rows
                    continue
                p = row["psnr"]
                profiled = p["profiled"]
                sd = statistics.stdev(profiled) if len(profiled) > 1 else float("nan")
                gap_a = statistics.mean(profiled) - statistics.mean(p["A"])
                gap_b = statistics.mean(profiled) - statistics.mean(p["B"])
                partial = row.get("partial")
                fine = "" if not partial else f", {len(partial['layers'])} layers reused at step {partial['step'] + 1}"
                if "order0_layers" in row:
                    fine += f", order 0 on {row['order0_layers']}"
                label = {"block_cache": f"Block Cache, {row['computes']} compute steps{fine}, order {row.get('order')}",
                         "layer_orders": f"variant: {row['computes']} compute steps{fine}, order {row.get('order')}",
                         "output_forecast": f"output forecast ({row.get('variable')}, order {row.get('order')}), "
                                            f"{row['computes']} compute steps",
                         "chain": f"chain from {row['computes']} compute steps, link {row.get('links')}",
                         "combined": f"{row.get('sampler_steps')} steps + Block Cache, {row['computes']} compute "
                                     f"steps, order {row.get('order')}",
                         "node_measure": f"node, target {row.get('target')}, 'measure PSNR': {row['computes']} compute "
                                         f"steps{fine}, order {row.get('order')}",
                         "node_choose": f"node, target {row.get('target')}, 'choose by measured PSNR': "
                                        f"{row['computes']} compute steps{fine}, order {row.get('order')}, "
                                        f"{len(row.get('as_is_layers') or [])} layers as is",
                         "node_lookahead": f"node, target {row.get('target')}, lookahead beside the cache: " + (
                             f"lookahead at {len(row['lookahead'])} steps" if row.get("lookahead") else
                             f"the cache, {row['computes']} compute steps{fine}, order {row.get('order')}"),
                         "lookahead": f"lookahead ({row.get('placement')}) at {row['computes']} steps",
                         "cfg_reuse": f"negative prompt at {row.get('uncond_computes')} steps, difference order "
                                      f"{row.get('order')} damped {row.get('damping')}",
                         "cfg_reuse_cache": f"negative prompt at {row.get('uncond_computes')} steps, on Block Cache's "
                                            f"{row['computes']} compute steps",
                         }.get(row["family"], f"fewer steps: {row['computes']}")
                heldout = p.get("heldout")
                held = (f"{statistics.mean(heldout):.1f} ({statistics.stdev(heldout) if len(heldout) > 1 else math.nan:.1f})"
                        if heldout else "–")
                held_gap = (f"; {statistics.mean(heldout) - statistics.mean(p['A']):+.1f}, "
                            f"{statistics.mean(heldout) - statistics.mean(p['B']):+.1f}" if heldout else "")
                lines.append(f"| {label} | {row['speedup']:.2f}x | {statistics.mean(profiled):.1f} ({sd:.1f}) | "
                             f"{held} | {statistics.mean(p['A']):.1f} / {min(p['A']):.1f} | "
                             f"{statistics.mean(p['B']):.1f} / {min(p['B']):.1f} | {gap_a:+.1f}, {gap_b:+.1f}{held_gap} |")
            lines.append("")
    return "\n".join(lines)


def gaps(folder: Path, low: float = 1.3, high: float = 3.0) -> str:
    """Per setting: how far the profiled run's and the held-out seed's mean PSNR read above the unseen sets'
    (mean of A and B), over the Block Cache rungs and the step counts between ``low``x and ``high``x."""
    lines = [f"How far the Build node's measurement reads above unseen prompts (its mean minus the mean of sets A "
             f"and B), over the rungs and step counts between {low:g}x and {high:g}x: mean (min to max), dB", "",
             "| setting | Block Cache: profiled run | Block Cache: held-out seed | fewer steps: profiled run | "
             "fewer steps: held-out seed |", "|---|---|---|---|---|"]

    def summary(values: list[float]) -> str:
        return f"{statistics.mean(values):+.1f} ({min(values):+.1f} to {max(values):+.1f})" if values else "–"

    for path in sorted(folder.glob("unseen_*.json")):
        data = json.loads(path.read_text())
        for name, setting in data["settings"].items():
            cells = []
            for family in ("block_cache", "fewer_steps"):
                rows = [r for r in setting["rows"] if r["family"] == family and low <= r["speedup"] <= high]
                for key in ("profiled", "heldout"):
                    cells.append(summary([statistics.mean(r["psnr"][key])
                                          - (statistics.mean(r["psnr"]["A"]) + statistics.mean(r["psnr"]["B"])) / 2
                                          for r in rows if key in r["psnr"]]))
            lines.append(f"| {data['model']} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto(folder: Path, floors: tuple[float, ...] = (35.0, 30.0, 27.0)) -> str:
    """Per setting and set: the best FLOP speed-up whose mean PSNR stays at or above each floor, for Block
    Cache's rungs, for fewer steps with Block Cache (where measured) and for fewer steps; and the ratios to
    fewer steps (the issue's measure: above 1 the cache wins)."""
    lines = ["Best FLOP speed-up at mean PSNR >= " + " / ".join(f"{f:g}" for f in floors) + " dB, and its ratio "
             "to fewer steps' (combined: fewer steps + Block Cache, where measured)", "",
             "| setting | set | Block Cache | combined | fewer steps | Block Cache ÷ fewer steps | combined ÷ fewer steps |",
             "|---|---|---|---|---|---|---|"]

    def best(rows: list[dict[str, Any]], part: str) -> list[float]:
        return [max([1.0] + [r["speedup"] for r in rows if statistics.mean(r["psnr"][part]) >= f]) for f in floors]

    def cells(values: list[float], suffix: str = "x") -> str:
        return " / ".join(f"{v:.2f}{suffix}" for v in values)

    for path in sorted(folder.glob("unseen_*.json")):
        data = json.loads(path.read_text())
        for name, setting in data["settings"].items():
            by_family = {family: [r for r in setting["rows"] if r["family"] == family]
                         for family in ("block_cache", "combined", "fewer_steps")}
            for part in ("A", "B"):
                cache, fewer = best(by_family["block_cache"], part), best(by_family["fewer_steps"], part)
                combined = best(by_family["combined"], part) if by_family["combined"] else None
                ratio = [c / f for c, f in zip(cache, fewer, strict=True)]
                ratio_combined = [c / f for c, f in zip(combined, fewer, strict=True)] if combined else None
                lines.append(f"| {data['model']} {name} | {part} | {cells(cache)} | "
                             f"{cells(combined) if combined else '–'} | {cells(fewer)} | {cells(ratio, '')} | "
                             f"{cells(ratio_combined, '') if ratio_combined else '–'} |")
    return "\n".join(lines)


def frontier(rows: list[dict[str, Any]], part: str) -> list[dict[str, Any]]:
    """The rows no other row beats on both speed-up (within 2 %) and mean PSNR on ``part``, by speed-up."""
    def mean(r: dict[str, Any]) -> float:
        return statistics.mean(r["psnr"][part])

    return sorted((r for r in rows if not any(o["speedup"] >= 0.98 * r["speedup"] and mean(o) > mean(r) for o in rows)),
                  key=lambda r: r["speedup"])


def curves(folder: Path) -> list[Path]:
    """One plot per setting: mean PSNR on sets A and B against FLOP speed-up, every rung and step count."""
    written = []
    for path in sorted(folder.glob("unseen_*.json")):
        data = json.loads(path.read_text())
        if path.stem != f"unseen_{data['model']}":  # an experiment's file (--tag): not the curve
            continue
        for name, setting in data["settings"].items():
            series = []
            for family, label in (("block_cache", "Block Cache rungs"), ("fewer_steps", "fewer steps"),
                                  ("combined", "fewer steps + Block Cache (best)")):
                rows = sorted((r for r in setting["rows"] if r["family"] == family), key=lambda r: r["speedup"])
                for key in ("A", "B") if rows else ():
                    series.append(_psnr_series(f"{label}, set {key}",
                                               frontier(rows, key) if family == "combined" else rows, key))
            written.append(_plot_curve(series, folder / f"curve_{data['model']}_{name}.png",
                                       f"{data['model']} {name}: mean PSNR on unseen prompts"))
    return written


def _psnr_series(label: str, rows: list[dict[str, Any]], key: str) -> Any:
    from plotting import Series

    return Series(label, [r["speedup"] for r in rows], [statistics.mean(r["psnr"][key]) for r in rows])


def _plot_curve(series: list[Any], out: Path, title: str) -> Path:
    from plotting import plot

    plot(series, str(out), title=title, xlabel="FLOP speed-up", ylabel="mean PSNR (dB)")
    return out


def fine_curves(folder: Path) -> list[Path]:
    """Per fine_<model>.json (a ``--tag _fine`` run: whole-step and fine rungs) and setting: mean PSNR on sets
    A and B against FLOP speed-up for the whole-step rungs alone, with the fine rungs, and fewer steps (from
    unseen_<model>.json)."""
    written = []
    for path in sorted(folder.glob("fine_*.json")):
        data = json.loads(path.read_text())
        plain = json.loads((folder / f"unseen_{data['model']}.json").read_text())
        for name, setting in data["settings"].items():
            rows = sorted((r for r in setting["rows"] if r["family"] == "block_cache"), key=lambda r: r["speedup"])
            fewer = sorted((r for r in plain["settings"][name]["rows"] if r["family"] == "fewer_steps"),
                           key=lambda r: r["speedup"])
            series = [_psnr_series(f"{label}, set {key}", shown, key) for key in ("A", "B")
                      for label, shown in (("whole-step rungs", [r for r in rows if not r.get("partial")]),
                                           ("with fine rungs", rows), ("fewer steps", fewer))]
            written.append(_plot_curve(series, folder / f"curve_fine_{data['model']}_{name}.png",
                                       f"{data['model']} {name}: whole-step and fine rungs on unseen prompts"))
    return written


def floor_rule(folder: Path, target: float = 2.25, floor: float = 30.0) -> str:
    """The Build node's floor on these measurements: the target's rung, stepped down to the fastest rung whose
    held-out range reaches the floor, per range width (z); with what sets A and B then get."""
    import statistics as st

    def low(values: list[float], z: float, min_sd: float) -> float:
        sd = max(st.stdev(values), min_sd) if len(values) > 1 else min_sd
        return st.mean(values) - z * sd / math.sqrt(len(values))

    lines = [f"Floor {floor:g} dB, target {target:g}x: the rung chosen per rule, and sets A / B (mean PSNR)", "",
             "| setting | rule | chosen | held-out mean, low | A | B | fewer steps at that cost: held-out, A, B |",
             "|---|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("unseen_*.json")):
        data = json.loads(path.read_text())
        for name, setting in data["settings"].items():
            # Fastest first: fine rungs share a compute count with the whole-step rung they are made from.
            rungs = sorted((r for r in setting["rows"] if r["family"] == "block_cache"), key=lambda r: -r["speedup"])
            fewer = {r["computes"]: r for r in setting["rows"] if r["family"] == "fewer_steps"}
            if not rungs or "heldout" not in rungs[0]["psnr"]:  # an experiment's file: no ladder measured
                continue
            start = next((r for r in reversed(rungs) if r["speedup"] >= target), rungs[0])
            for label, key, z, min_sd in (("profiled run (before)", "profiled", 0.0, 0.0),
                                          ("held-out seed, mean", "heldout", 0.0, 0.0),
                                          ("held-out seed, z 0.5", "heldout", 0.5, 3.0),
                                          ("held-out seed, z 1", "heldout", 1.0, 3.0),
                                          ("held-out seed, z 1.5", "heldout", 1.5, 3.0)):
                if key not in start["psnr"]:
                    continue
                chosen = next((r for r in rungs if r["speedup"] <= start["speedup"]
                               and low(r["psnr"][key], z, min_sd) >= floor), None)
                if chosen is None:
                    lines.append(f"| {data['model']} {name} | {label} | everything | | | | |")
                    continue
                p = chosen["psnr"]
                # The measured step count nearest the rung's cost (a --stride run measured every n-th).
                count = min(fewer, key=lambda n: abs(n - setting["steps"] / chosen["speedup"]), default=0)
                f = fewer.get(count)
                versus = (f"{count} steps: {st.mean(f['psnr']['heldout']):.1f}, {st.mean(f['psnr']['A']):.1f}, "
                          f"{st.mean(f['psnr']['B']):.1f}" if f and "heldout" in f["psnr"] else "")
                lines.append(f"| {data['model']} {name} | {label} | {chosen['speedup']:.2f}x | "
                             f"{st.mean(p[key]):.1f}, {low(p[key], z, min_sd):.1f} | {st.mean(p['A']):.1f} | "
                             f"{st.mean(p['B']):.1f} | {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("unet", "dit", "video"), default="dit")
    parser.add_argument("--settings", default="", help="the model's settings by name (default: all), or "
                        "SAMPLER/SCHEDULER/STEPS, e.g. euler/normal/28")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--profile-prompts", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--orders", default="", help="forecast orders the ladder may use, e.g. 0,1,2 (default: auto's)")
    parser.add_argument("--skip-fewer", action="store_true", help="only the ladder's rungs")
    parser.add_argument("--always-compute", default="", help="an experiment: FIRST,LAST cached blocks that always "
                                                                 "compute, e.g. 1,0 (DBCache's F1B0)")
    parser.add_argument("--output-forecast", action="store_true",
                        help="an experiment: the whole model's output forecast at the rungs' reuse steps")
    parser.add_argument("--spectral", default="", help="an experiment: the output forecast by Chebyshev fits "
                        "through every computation, DEGREE:RIDGE each, e.g. 2:0.1,3:0.1 (Spectrum)")
    parser.add_argument("--damped", default="", help="an experiment: the order-1 output forecast's change "
                        "scaled by each of these, e.g. 0.5 (a blend of orders 0 and 1, as ScalingCache)")
    parser.add_argument("--layer-damping", type=float, default=1.0, help="an experiment: every layer's "
                        "forecast damped by this factor (0.5: halfway between orders 0 and 1), search included")
    parser.add_argument("--chains", default="", help="an experiment: chains of partial reuse from the whole-step "
                        "rungs with speed-ups LOW-HIGH, e.g. 1.4-2.6")
    parser.add_argument("--chain-links", type=int, default=5)
    parser.add_argument("--error-feedback", action="store_true", help="an experiment: the forecast corrected by "
                        "the error seen at the last computed step, measured in the error model (no sampling)")
    parser.add_argument("--layer-orders", action="store_true", help="an experiment: forecast order 0 on a third "
                        "or all of the cached layers of each whole-step rung, chosen by the held-out seed")
    parser.add_argument("--node-choice", default="", help="the Build node's choice at these targets, e.g. 2,2.25: "
                        "'measure PSNR' and 'choose by measured PSNR' (families node_measure, node_choose)")
    parser.add_argument("--floor", type=float, default=30.0, help="--node-choice's min_psnr")
    parser.add_argument("--node-families", default="node_measure,node_choose",
                        help="--node-choice's validations (node_lookahead: 'measure PSNR' with lookahead beside it)")
    parser.add_argument("--greedy-measured", action="store_true", help="an experiment: compute steps taken away "
                        "one at a time by the profiled pictures' measured error instead of the error model")
    parser.add_argument("--step-sensitivity", action="store_true", help="an experiment: each step reused alone, "
                        "the error model's prediction against the measured picture error")
    parser.add_argument("--sensitivity", type=Path, default=None, help="an experiment: a --step-sensitivity "
                        "results file; the ladder's search weights each step by its measured sensitivity")
    parser.add_argument("--calibrate", type=int, default=0, help="an experiment: each whole-step rung with a "
                        "scale-shift correction trained for this many iterations on other prompts")
    parser.add_argument("--flat-weights", action="store_true", help="an experiment: the ladder searched with "
                        "every step's error weighted alike")
    parser.add_argument("--even-steps", action="store_true", help="an experiment: each whole-step rung's count "
                        "of compute steps spread evenly from the first step to the last")
    parser.add_argument("--teacache-steps", default="", help="an experiment (video): the TeaCache rule's compute "
                        "steps at these thresholds, e.g. 0.1,0.15,0.2, as Block Cache schedules")
    parser.add_argument("--lookahead", action="store_true", help="an experiment (Euler): the model evaluated one "
                        "gap ahead at the predicted point, the steps between interpolated, against fewer steps")
    parser.add_argument("--lookahead-variants", default="", help="an experiment (Euler): the lookahead with these "
                        "PREDICT:REUSE variants, e.g. euler:denoised,euler:logsnr,euler:jacobian:0.3,"
                        "slope:0.5:derivative,pulled:0:denoised (lookahead_variant)")
    parser.add_argument("--lookahead-cache", default="", help="an experiment (Euler): the lookahead at these counts "
                        "of model calls, e.g. 9,10, with layers reused at its evaluations (lookahead_cache_schedule)")
    parser.add_argument("--lookahead-cache-shares", default="0,0.05,0.1,0.15,0.2",
                        help="--lookahead-cache's shares of the evaluations' FLOPs saved by layer reuse")
    parser.add_argument("--lookahead-search", default="", help="an experiment (Euler): the lookahead's planned steps "
                        "at these counts, e.g. 8,9, hill-climbed on the profiled pictures (lookahead_search_rows)")
    parser.add_argument("--lookahead-search-budget", type=int, default=60,
                        help="--lookahead-search's samplings of the profiled pictures per start")
    parser.add_argument("--lookahead-path", default="", help="an experiment (Euler): the lookahead's planned steps "
                        "at these counts, e.g. 8,9, chosen on the profiled run's path (lookahead_path_rows)")
    parser.add_argument("--lookahead-cfg", default="", help="an experiment (Euler): the lookahead at COUNT calls with "
                        "the negative prompt left out at SKIPS of them, e.g. 9:1,9:2 (lookahead_cfg_rows)")
    parser.add_argument("--lookahead-combined", default="", help="an experiment (Euler): the lookahead at these "
                        "counts of model calls, e.g. 8,9 or 8:19 (down to 19 sampler steps), on shorter sampler step counts "
                        "(lookahead_combined_rows)")
    parser.add_argument("--reference-distance", default="", help="the setting's uncached pictures against other "
                        "samplers' and step counts', SAMPLER:STEPS each, e.g. euler:40,euler:160,dpmpp_2m:40 "
                        "(reference_distance_rows; speed-up is steps per sampler step, not per model call)")
    parser.add_argument("--tag", default="", help="a suffix for the results file")
    parser.add_argument("--combined", default="", help="fewer steps with Block Cache: step counts LOW-HIGH, e.g. "
                        "11-17; measures only these rows and adds them to the results file")
    parser.add_argument("--max-speedup", type=float, default=MAX_SPEEDUP, help="only the rungs at most this fast")
    parser.add_argument("--min-speedup", type=float, default=MIN_SPEEDUP,
                        help="only the rungs at least this fast (fills in a --stride run's fast end)")
    parser.add_argument("--cfg-reuse", default="", help="an experiment: the negative prompt computed at this many "
                        "steps (each of a list, e.g. 16,10,4) spread evenly, its difference to the positive one "
                        "forecast at the others (FasterCache's CFG reuse)")
    parser.add_argument("--cfg-reuse-forecasts", default="0:1,1:0.5,1:1", help="--cfg-reuse's forecasts of the "
                        "difference, ORDER:DAMPING each")
    parser.add_argument("--cfg-reuse-share", type=float, default=0.5, help="--cfg-reuse-cache compute-steps' share")
    parser.add_argument("--cfg-reuse-cache", choices=("", "even", "compute-steps"), default="",
                        help="--cfg-reuse on the damped ladder's whole-step rungs in the band too")
    parser.add_argument("--stride", type=int, default=1, help="every n-th rung and step count (long runs: ddim 50)")
    parser.add_argument("--out", type=Path, default=Path("out/unseen"))
    parser.add_argument("--report", type=Path, default=None, help="a folder of unseen_*.json: print the tables")
    args = parser.parse_args()
    if args.report is not None:
        sys.stdout.write("\n\n".join((report(args.report), pareto(args.report), gaps(args.report),
                                         floor_rule(args.report))) + "\n")
        curves(args.report)
        fine_curves(args.report)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    run(args)
    if not (args.step_sensitivity or args.error_feedback or args.reference_distance):
        sys.stdout.write(report(args.out) + "\n")  # the others' rows are not measured on the profiled pictures


if __name__ == "__main__":
    main()
