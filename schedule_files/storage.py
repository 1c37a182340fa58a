"""Schedule files: ``<ComfyUI user directory>/block_cache/*.json``, never inside the pack.

A calibrated schedule's scale-shift parameters are saved beside it as
``<name>.scale_shift.safetensors``, and its JSON references them.
File names are checked before any disk access: nothing is read or written outside
the folder, whatever name arrives from a workflow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..block_caching.scale_shift import FILE_SUFFIX, MAX_FILE_BYTES, ScaleShiftTable
from ..block_caching.schedule import CacheSchedule
from ..errors import ScheduleFileError
from .schema import (
    MAX_DOCUMENT_BYTES,
    calibration_reference,
    parse_schedule_document,
    schedule_from_dict,
    schedule_to_json,
)

logger = logging.getLogger(__name__)

FOLDER_NAME = "block_cache"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,119}$")


def schedule_directory() -> Path:
    import folder_paths

    return Path(folder_paths.get_user_directory()) / FOLDER_NAME


def list_schedules(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".json" and p.is_file() and _SAFE_NAME.match(p.name))


def resolve(directory: Path, file_name: str, suffix: str = ".json") -> Path:
    """The path of ``file_name`` in ``directory``; raises on anything that is not a plain name."""
    if not isinstance(file_name, str):
        raise ScheduleFileError(f"schedule file name must be text, got {type(file_name).__name__}")
    name = file_name.strip()
    if not name.endswith(suffix):
        name += suffix
    if not _SAFE_NAME.match(name) or ".." in name:
        raise ScheduleFileError(
            f"unsafe schedule file name {file_name!r}: use letters, digits, spaces, '_', '-' and '.', "
            "at most 120 characters, with no folders")
    root = directory.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise ScheduleFileError(f"schedule file name {file_name!r} points outside {root}")
    return path


def _write_then_rename(path: Path, write: Callable[[str], None]) -> None:
    """``write(temporary name)`` in ``path``'s folder, then a rename onto ``path``: an interrupted save
    never leaves a truncated file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".saving-", suffix=path.suffix)
    os.close(handle)
    try:
        write(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def save_schedule(directory: Path, file_name: str, schedule: CacheSchedule, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    path = resolve(directory, file_name)
    if path.exists() and not overwrite:
        raise ScheduleFileError(f"{path.name} already exists in {directory}; pick another name or allow overwrite")
    parameters = None
    if schedule.scale_shift is not None:
        parameters = resolve(directory, path.name.removesuffix(".json"), FILE_SUFFIX)
        tensors, metadata = schedule.scale_shift.to_tensors()
        # First: the JSON never references a file not written.
        _write_then_rename(parameters, lambda name: save_file(tensors, name, metadata=metadata))
    text = schedule_to_json(schedule, calibration_file=parameters.name if parameters is not None else None)
    _write_then_rename(path, lambda name: Path(name).write_text(text, encoding="utf-8"))
    logger.info("Block Cache: saved schedule to %s%s", path,
                f" and its scale-shift parameters to {parameters.name}" if parameters is not None else "")
    return path


def load_schedule(directory: Path, file_name: str) -> CacheSchedule:
    path = resolve(directory, file_name)
    if not path.is_file():
        raise ScheduleFileError(f"no schedule named {path.name} in {directory}; save one with Save Cache Schedule")
    if path.stat().st_size > MAX_DOCUMENT_BYTES:
        raise ScheduleFileError(f"{path.name} is larger than a schedule can be ({MAX_DOCUMENT_BYTES} bytes)")
    document = parse_schedule_document(path.read_bytes())
    schedule = schedule_from_dict(document)
    reference = calibration_reference(document)
    if reference is None:
        return schedule
    file_name, fingerprint = reference
    if fingerprint != schedule.fingerprint:
        raise ScheduleFileError(
            f"{path.name} was changed after it was calibrated (its layers or steps no longer match the scale-shift "
            f"parameters in {file_name}). Calibrate it again, or remove its 'calibration' entry.")
    table = _load_scale_shift(resolve(directory, file_name, FILE_SUFFIX))
    table.check_matches(schedule.fingerprint)
    return dataclasses.replace(schedule, scale_shift=table)


def _load_scale_shift(path: Path) -> ScaleShiftTable:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ScheduleFileError(f"the schedule references scale-shift parameters {path.name}, which are missing "
                                f"from {path.parent}; copy them beside the schedule or calibrate again")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ScheduleFileError(f"{path.name} is larger than scale-shift parameters can be")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ScheduleFileError(f"{path.name} is not a readable safetensors file ({error})") from None
    return ScaleShiftTable.from_tensors(tensors, metadata, path.name)
