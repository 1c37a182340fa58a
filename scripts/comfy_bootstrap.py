"""Puts the real ComfyUI on sys.path (CPU mode) and loads this pack as a package.

ComfyUI is found through COMFYUI_PATH, else the host ``scripts/setup.sh`` recorded in the running
venv (each host has its own venv), else the default host's folder.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "comfyui_block_cache"


def comfyui_path() -> Path:
    if os.environ.get("COMFYUI_PATH"):
        path = Path(os.environ["COMFYUI_PATH"])
    else:
        recorded = Path(sys.prefix) / "comfyui-path"
        path = Path(recorded.read_text().strip()) if recorded.exists() else PACK_ROOT / ".comfyui" / "ComfyUI"
    if not (path / "comfy").is_dir():
        raise RuntimeError(f"No ComfyUI at {path}: run scripts/setup.sh (make setup) or set COMFYUI_PATH")
    return path


def bootstrap(cpu: bool = True, dynamic_vram: bool = False) -> str:
    """ComfyUI on sys.path with its arguments as ``main.py --cpu`` (or on its GPU with ``cpu=False``).

    ``dynamic_vram`` does what ComfyUI's main.py does on CUDA where the host has it (0.33 on, with
    comfy-aimdo): the aimdo VRAM manager, and ModelPatcherDynamic as the patcher loaders build.
    Returns the name of the patcher class that loaders build (``comfy.model_patcher.CoreModelPatcher``).
    """
    root = str(comfyui_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.disable_all_custom_nodes = True
    if dynamic_vram and not cpu:
        _enable_dynamic_vram()
    import comfy.model_patcher

    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher).__name__


def _enable_dynamic_vram() -> None:
    """main.py's dynamic VRAM start-up, by feature: aimdo first, then its devices, then the patcher."""
    try:
        import comfy_aimdo.control
    except ImportError:
        return  # a host without dynamic VRAM
    try:
        comfy_aimdo.control.init(nvml_pressure=True)
    except TypeError:  # older comfy-aimdo protocols
        comfy_aimdo.control.init()
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    devices = comfy.model_management.get_all_torch_devices()
    try:
        initialized = comfy_aimdo.control.init_devices((device.index, 0) for device in devices)
    except TypeError:
        initialized = comfy_aimdo.control.init_devices(device.index for device in devices)
    if initialized and hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True


def load_pack(cpu: bool = True, dynamic_vram: bool = False):
    """The pack, imported the way ComfyUI imports a custom node folder (ComfyUI set up by ``bootstrap``)."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    bootstrap(cpu=cpu, dynamic_vram=dynamic_vram)
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module
