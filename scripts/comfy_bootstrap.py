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


def bootstrap() -> None:
    root = str(comfyui_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_all_custom_nodes = True


def load_pack():
    """The pack, imported the way ComfyUI imports a custom node folder."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    bootstrap()
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module
