"""The versioned JSON documents: schedules (saved and shared) and profiles.

Reading is strict: any malformed, truncated, out-of-range or foreign document raises
ScheduleFormatError naming the field at fault and what to do, before anything is patched.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..block_caching.forecast import MAX_FORECAST_ORDER
from ..block_caching.profile import BlockProfile
from ..block_caching.schedule import CacheSchedule, LayerSchedule, lookahead_steps_valid
from ..block_maps.block_map import BlockMap, LayerKind, LayerSpec, ResidualForm, ReuseMode
from ..errors import ScheduleFormatError
from ..runtime.time_grid import StepGrid

SCHEDULE_FORMAT = "block-cache-schedule"
PROFILE_FORMAT = "block-cache-profile"
# Version 2 added each layer's forecast_order; version 1 schedules load with order 0. Version 3 added
# forecast_damping: a schedule that damps a forecast is written as version 3 (so that an older Block Cache
# refuses it rather than running it undamped), every other one still as version 2.
SCHEDULE_VERSION = 2
DAMPED_SCHEDULE_VERSION = 3
LOOKAHEAD_SCHEDULE_VERSION = 4
SCHEDULE_VERSIONS_READ = (1, 2, 3, 4)
PROFILE_VERSION = 1
PROFILE_VERSIONS_READ = (1,)

MAX_STEPS = 10_000
MAX_LAYERS = 10_000
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
_LAYER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+){0,15}$")
_FIX = "Rebuild it with Build Cache Schedule, or re-save it from this version of Block Cache."


# -- writing ----------------------------------------------------------------------------------------

def _block_map_dict(block_map: BlockMap) -> dict[str, Any]:
    return {"family": block_map.family, "model_type": block_map.model_type,
            "model_class": block_map.model_class, "fingerprint": block_map.fingerprint}


def schedule_to_dict(schedule: CacheSchedule, calibration_file: str | None = None) -> dict[str, Any]:
    """The schedule document; ``calibration_file`` names the saved scale-shift parameters, if any."""
    mask = schedule.evaluated_mask()
    specs = {spec.name: spec for spec in schedule.block_map.layers}
    damped = any(layer.forecast_damping != 1.0 for layer in schedule.layers)
    # The oldest version that has what the schedule uses: an older Block Cache refuses it rather than run it wrong.
    version = (LOOKAHEAD_SCHEDULE_VERSION if schedule.lookahead_steps else DAMPED_SCHEDULE_VERSION if damped
               else SCHEDULE_VERSION)
    document = {
        "format": SCHEDULE_FORMAT,
        "version": version,
        "model": _block_map_dict(schedule.block_map),
        "grid": schedule.grid.to_dict(),
        "layers": [
            {
                "name": layer.name,
                "kind": layer.kind.value,
                "stage": specs[layer.name].stage,
                "residual": specs[layer.name].residual.value,
                "reuse": layer.reuse.value,
                "flops": flops,
                "compute": "".join("1" if c else "0" for c in layer.compute),
                "forecast_order": layer.forecast_order,
                **({"forecast_damping": layer.forecast_damping} if layer.forecast_damping != 1.0 else {}),
            }
            for layer, flops in zip(schedule.layers, schedule.layer_flops, strict=True)
        ],
        "total_flops": schedule.total_flops,
        "builder": schedule.builder,
        "estimate": {
            "speedup": round(schedule.estimated_speedup, 4),
            "flop_fraction": round(schedule.flop_fraction, 6),
            "computed": int(mask.sum()),
            "total": int(mask.size),
        },
        "provenance": schedule.provenance,
    }
    if schedule.lookahead_steps:
        document["lookahead_steps"] = list(schedule.lookahead_steps)
    if calibration_file is not None:
        document["calibration"] = {"file": calibration_file, "fingerprint": schedule.fingerprint}
    return document


def schedule_to_json(schedule: CacheSchedule, calibration_file: str | None = None) -> str:
    return json.dumps(schedule_to_dict(schedule, calibration_file), indent=1)


def profile_to_dict(profile: BlockProfile) -> dict[str, Any]:
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "model": _block_map_dict(profile.block_map),
        "grid": profile.grid.to_dict(),
        "layers": [
            {"name": spec.name, "kind": spec.kind.value, "stage": spec.stage, "residual": spec.residual.value,
             "flops": flops, "change": [None if math.isnan(v) else v for v in change]}
            for spec, flops, change in zip(profile.block_map.layers, profile.layer_flops, profile.change, strict=True)
        ],
        "total_flops": profile.total_flops,
        "sample_count": profile.sample_count,
        "provenance": profile.provenance,
    }


# -- reading ----------------------------------------------------------------------------------------

def _fail(where: str, problem: str, kind: str = "schedule") -> ScheduleFormatError:
    fix = _FIX if kind == "schedule" else "Run Profile Block Changes again."
    return ScheduleFormatError(f"Invalid Block Cache {kind}: {where}: {problem}. {fix}")


class _Reader:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def fail(self, where: str, problem: str) -> ScheduleFormatError:
        return _fail(where, problem, self.kind)

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {type(value).__name__}")
        return value

    def field(self, parent: dict[str, Any], key: str, where: str) -> Any:
        if key not in parent:
            raise self.fail(f"{where}.{key}" if where else key, "missing")
        return parent[key]

    def string(self, value: Any, where: str, max_length: int = 256) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, got {type(value).__name__}")
        if len(value) > max_length:
            raise self.fail(where, f"string longer than {max_length} characters")
        return value

    def number(self, value: Any, where: str, minimum: float | None = None, maximum: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"expected a number, got {type(value).__name__}")
        number = float(value)
        if not math.isfinite(number):
            raise self.fail(where, "expected a finite number")
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            raise self.fail(where, f"{number} is outside [{minimum}, {maximum}]")
        return number

    def integer(self, value: Any, where: str, minimum: int, maximum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {type(value).__name__}")
        if not minimum <= value <= maximum:
            raise self.fail(where, f"{value} is outside [{minimum}, {maximum}]")
        return value

    def array(self, value: Any, where: str, max_length: int) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {type(value).__name__}")
        if len(value) > max_length:
            raise self.fail(where, f"more than {max_length} entries")
        return value

    def enum(self, enum_type: type, value: Any, where: str) -> Any:
        text = self.string(value, where)
        try:
            return enum_type(text)
        except ValueError:
            choices = ", ".join(member.value for member in enum_type)
            raise self.fail(where, f"{text!r} is not one of {choices}") from None

    def header(self, doc: Any, expected_format: str, versions: tuple[int, ...]) -> dict[str, Any]:
        doc = self.obj(doc, "document")
        fmt = doc.get("format")
        if fmt != expected_format:
            raise self.fail("format", f"expected {expected_format!r}, got {fmt!r}; this is not a {self.kind} file")
        version = doc.get("version")
        if isinstance(version, bool) or version not in versions:
            raise ScheduleFormatError(
                f"Block Cache {self.kind} version {version!r} is not supported: this Block Cache reads version "
                f"{' and '.join(str(v) for v in versions)}. Update Block Cache, or rebuild the {self.kind} with "
                "this version."
            )
        return doc

    def model(self, doc: dict[str, Any]) -> dict[str, str]:
        model = self.obj(self.field(doc, "model", ""), "model")
        return {key: self.string(self.field(model, key, "model"), f"model.{key}")
                for key in ("family", "model_type", "model_class", "fingerprint")}

    def grid(self, doc: dict[str, Any]) -> StepGrid:
        grid = self.obj(self.field(doc, "grid", ""), "grid")
        steps = self.integer(self.field(grid, "steps", "grid"), "grid.steps", 1, MAX_STEPS)
        sigmas = [self.number(v, f"grid.sigmas[{i}]", 0.0)
                  for i, v in enumerate(self.array(self.field(grid, "sigmas", "grid"), "grid.sigmas", MAX_STEPS + 1))]
        taus = [self.number(v, f"grid.normalized_timesteps[{i}]", 0.0, 1.0)
                for i, v in enumerate(self.array(self.field(grid, "normalized_timesteps", "grid"),
                                                 "grid.normalized_timesteps", MAX_STEPS))]
        if len(taus) != steps:
            raise self.fail("grid.normalized_timesteps", f"has {len(taus)} entries for {steps} steps")
        if len(sigmas) != steps + 1:
            raise self.fail("grid.sigmas", f"has {len(sigmas)} entries; {steps} steps need {steps + 1}")
        if any(b > a + 1e-9 for a, b in zip(taus, taus[1:], strict=False)):
            raise self.fail("grid.normalized_timesteps", "must not increase from step to step")
        shape = [self.integer(v, f"grid.latent_shape[{i}]", 0, 1 << 20)
                 for i, v in enumerate(self.array(grid.get("latent_shape", []), "grid.latent_shape", 8))]
        return StepGrid(
            sigmas=tuple(sigmas),
            taus=tuple(taus),
            sampler=self.string(grid.get("sampler", ""), "grid.sampler"),
            scheduler=self.string(grid.get("scheduler", ""), "grid.scheduler"),
            cfg=self.number(grid.get("cfg", 0.0), "grid.cfg"),
            denoise=self.number(grid.get("denoise", 1.0), "grid.denoise", 0.0, 1.0),
            latent_shape=tuple(shape),
        )

    def layer_spec(self, entry: dict[str, Any], where: str) -> LayerSpec:
        name = self.string(self.field(entry, "name", where), f"{where}.name")
        if not _LAYER_NAME.match(name):
            raise self.fail(f"{where}.name", f"{name!r} is not a layer path such as 'input_blocks.1.1'")
        stage = self.string(entry.get("stage", ""), f"{where}.stage")
        return LayerSpec(
            name=name,
            kind=self.enum(LayerKind, self.field(entry, "kind", where), f"{where}.kind"),
            stage=stage,
            residual=self.enum(ResidualForm, entry.get("residual", "none"), f"{where}.residual"),
        )

    def layers(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        entries = self.array(self.field(doc, "layers", ""), "layers", MAX_LAYERS)
        if not entries:
            raise self.fail("layers", "is empty")
        checked = [self.obj(entry, f"layers[{i}]") for i, entry in enumerate(entries)]
        names = [entry.get("name") for entry in checked]
        duplicates = {n for n in names if isinstance(n, str) and names.count(n) > 1}
        if duplicates:
            raise self.fail("layers", f"names a layer more than once ({', '.join(sorted(duplicates)[:3])})")
        return checked


def _parse_json(text: str | bytes, kind: str) -> Any:
    if len(text) > MAX_DOCUMENT_BYTES:
        raise _fail("document", f"larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MB", kind)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ScheduleFormatError(
            f"Block Cache {kind} is not valid JSON ({error}); the file may be truncated or not a {kind}. {_FIX}"
        ) from None
    except RecursionError:
        raise _fail("document", "nested too deeply", kind) from None


def schedule_from_dict(doc: Any) -> CacheSchedule:
    r = _Reader("schedule")
    doc = r.header(doc, SCHEDULE_FORMAT, SCHEDULE_VERSIONS_READ)
    model = r.model(doc)
    grid = r.grid(doc)
    specs, layers, flops = [], [], []
    for i, entry in enumerate(r.layers(doc)):
        where = f"layers[{i}]"
        spec = r.layer_spec(entry, where)
        reuse = r.enum(ReuseMode, r.field(entry, "reuse", where), f"{where}.reuse")
        if reuse not in spec.reuse_modes:
            raise r.fail(f"{where}.reuse", f"a {spec.kind.value} layer with residual form "
                                           f"'{spec.residual.value}' cannot be reused as '{reuse.value}'")
        mask = r.string(r.field(entry, "compute", where), f"{where}.compute", MAX_STEPS)
        if len(mask) != grid.steps or set(mask) - {"0", "1"}:
            raise r.fail(f"{where}.compute", f"expected {grid.steps} characters of '0'/'1', got {mask[:40]!r}")
        if mask[0] != "1":
            raise r.fail(f"{where}.compute", "the first step must compute (there is nothing cached before it)")
        order = r.integer(entry.get("forecast_order", 0), f"{where}.forecast_order", 0, MAX_FORECAST_ORDER)
        damping = r.number(entry.get("forecast_damping", 1.0), f"{where}.forecast_damping", 0.0, 1.0)
        specs.append(spec)
        flops.append(r.number(entry.get("flops", 0.0), f"{where}.flops", 0.0))
        layers.append(LayerSchedule(name=spec.name, kind=spec.kind, reuse=reuse, compute=tuple(c == "1" for c in mask),
                                    forecast_order=order, forecast_damping=damping))
    lookahead = _lookahead_steps(r, doc, grid.steps, layers)
    builder = r.obj(doc.get("builder", {}), "builder")
    prov = r.obj(doc.get("provenance", {}), "provenance")
    return CacheSchedule(
        block_map=BlockMap(layers=tuple(specs), **model),
        grid=grid,
        layers=tuple(layers),
        layer_flops=tuple(flops),
        total_flops=r.number(doc.get("total_flops", 0.0), "total_flops", 0.0),
        builder=builder,
        provenance=prov,
        lookahead_steps=lookahead,
    )


def _lookahead_steps(r: _Reader, doc: dict[str, Any], steps: int, layers: list[LayerSchedule]) -> tuple[int, ...]:
    """The schedule's lookahead steps (version 4): increasing, from the first step; its layers compute at every
    step (a lookahead with reused layers is not supported)."""
    if "lookahead_steps" not in doc:
        return ()
    where = "lookahead_steps"
    values = [r.integer(v, f"{where}[{i}]", 0, steps - 1)
              for i, v in enumerate(r.array(doc["lookahead_steps"], where, MAX_STEPS))]
    if not lookahead_steps_valid(values, steps):
        raise r.fail(where, f"expected increasing steps from 0 to {steps - 1}, got {values[:20]}")
    reused = [layer.name for layer in layers if not all(layer.compute)]
    if reused:
        raise r.fail(where, f"a lookahead schedule computes every layer wherever the model runs; {reused[0]} is "
                            "reused at some steps")
    return tuple(values)


def parse_schedule_document(text: str | bytes) -> Any:
    """The JSON of a schedule file, parsed but not yet checked (``schedule_from_dict`` checks)."""
    return _parse_json(text, "schedule")


def schedule_from_json(text: str | bytes) -> CacheSchedule:
    return schedule_from_dict(parse_schedule_document(text))


_CALIBRATION_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,119}\.scale_shift\.safetensors$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")


def calibration_reference(doc: dict[str, Any]) -> tuple[str, str] | None:
    """(file name, schedule fingerprint) of a checked schedule document's scale-shift parameters, if any."""
    if doc.get("calibration") is None:
        return None
    r = _Reader("schedule")
    entry = r.obj(doc["calibration"], "calibration")
    file_name = r.string(r.field(entry, "file", "calibration"), "calibration.file", 160)
    if not _CALIBRATION_FILE.match(file_name) or ".." in file_name:
        raise r.fail("calibration.file", f"{file_name!r} is not a plain '<name>.scale_shift.safetensors' file name")
    fingerprint = r.string(r.field(entry, "fingerprint", "calibration"), "calibration.fingerprint", 16)
    if not _FINGERPRINT.match(fingerprint):
        raise r.fail("calibration.fingerprint", f"{fingerprint!r} is not a 16-digit hex fingerprint")
    return file_name, fingerprint


def profile_from_dict(doc: Any) -> BlockProfile:
    r = _Reader("profile")
    doc = r.header(doc, PROFILE_FORMAT, PROFILE_VERSIONS_READ)
    model = r.model(doc)
    grid = r.grid(doc)
    specs, changes, flops = [], [], []
    for i, entry in enumerate(r.layers(doc)):
        where = f"layers[{i}]"
        specs.append(r.layer_spec(entry, where))
        flops.append(r.number(entry.get("flops", 0.0), f"{where}.flops", 0.0))
        values = r.array(r.field(entry, "change", where), f"{where}.change", MAX_STEPS)
        if len(values) != grid.steps:
            raise r.fail(f"{where}.change", f"has {len(values)} entries for {grid.steps} steps")
        changes.append(tuple(float("nan") if v is None else r.number(v, f"{where}.change[{j}]", 0.0)
                             for j, v in enumerate(values)))
    return BlockProfile(
        block_map=BlockMap(layers=tuple(specs), **model),
        grid=grid,
        change=tuple(changes),
        layer_flops=tuple(flops),
        total_flops=r.number(doc.get("total_flops", 0.0), "total_flops", 0.0),
        sample_count=r.integer(doc.get("sample_count", 1), "sample_count", 1, 1 << 40),
        provenance=r.obj(doc.get("provenance", {}), "provenance"),
    )
