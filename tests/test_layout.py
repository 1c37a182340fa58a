"""The pack's layers import only downwards: the runtime knows no method, the methods no node API,
and nothing but the demo node and the scripts knows the demo models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[1]
# Package -> the pack packages it may import (besides itself and the root modules errors, provenance).
ALLOWED = {
    "block_maps": set(),
    "runtime": {"block_maps"},
    "block_caching": {"block_maps", "runtime"},
    "faster_diffusion": {"block_maps", "runtime", "block_caching"},
    "schedule_files": {"block_maps", "runtime", "block_caching"},
    "demo_models": set(),
    "nodes": {"block_maps", "runtime", "block_caching", "faster_diffusion", "schedule_files", "demo_models"},
}
ROOT_MODULES = {"errors", "provenance"}
NODE_API = ("comfy_api", "server", "nodes")


def _pack_imports(path: Path) -> set[str]:
    """The pack packages and modules a file imports (relative imports resolved), and node-API imports."""
    package = path.parent.relative_to(PACK_ROOT).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[:len(package) - node.level + 1])
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                found.add(target[0])
            else:  # "from .. import x": the names are the modules
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add("node API" if node.module.split(".")[0] in NODE_API else "")
        elif isinstance(node, ast.Import):
            found.update("node API" for alias in node.names if alias.name.split(".")[0] in NODE_API)
    return found - {""}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below(package):
    allowed = ALLOWED[package] | ROOT_MODULES | {package}
    if package == "nodes":
        allowed |= {"node API"}
    files = sorted((PACK_ROOT / package).glob("*.py"))
    assert files, f"{package}/ has no modules"
    wrong = {f"{path.name} -> {name}" for path in files for name in _pack_imports(path) if name not in allowed}
    assert not wrong, f"{package}/ imports outside its layer: {sorted(wrong)}"


def test_root_modules_import_no_package():
    for name in ROOT_MODULES:
        assert not _pack_imports(PACK_ROOT / f"{name}.py"), name


def test_only_the_demo_node_loads_demo_models():
    users = {path.name for path in (PACK_ROOT / "nodes").glob("*.py") if "demo_models" in _pack_imports(path)}
    assert users == {"nodes_demo.py"}


# ModelPatcher calls that install or remove patches: only the runtime's installer makes them.
PATCHER_MUTATIONS = {"add_wrapper", "add_wrapper_with_key", "remove_wrappers_with_key", "add_callback",
                     "add_callback_with_key", "add_object_patch", "set_model_patch", "set_model_patch_replace"}
INSTALLER = Path("runtime") / "wrappers.py"


def _patcher_mutations(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {node.func.attr for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in PATCHER_MUTATIONS}
    found |= {"object_patches" for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr == "object_patches"}
    found |= {"WrappersMP" for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and any(alias.name == "WrappersMP" for alias in node.names)}
    return found


def test_only_the_runtime_installer_registers_wrappers_and_patches():
    """Methods plug into the runtime's hooks (runtime/run.py); none registers a wrapper or patch itself."""
    files = [path for package in ALLOWED for path in sorted((PACK_ROOT / package).glob("*.py"))]
    files += [PACK_ROOT / "__init__.py", *(PACK_ROOT / f"{name}.py" for name in ROOT_MODULES)]
    registering = {str(path.relative_to(PACK_ROOT)): sorted(found) for path in files
                   if (found := _patcher_mutations(path))}
    assert set(registering) == {str(INSTALLER)}, registering
    assert {"add_wrapper_with_key", "remove_wrappers_with_key", "add_object_patch"} <= set(registering[str(INSTALLER)])
