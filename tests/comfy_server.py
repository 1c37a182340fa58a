"""A real ComfyUI server (main.py --cpu) with this pack symlinked into a temporary base directory.

Shared by tests/test_server.py, tests/test_workflows.py and tests/test_browser.py. The server
serves the frontend ComfyUI pins, or another one (``frontend_root``): scripts/setup.sh installs
the newest frontend apart, in FRONTEND_LATEST, for the browser test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from comfy_bootstrap import PACK_ROOT, comfyui_path

# Where scripts/setup.sh installs the newest comfyui-frontend-package (pip --target).
FRONTEND_LATEST = Path(os.environ.get("BLOCK_CACHE_FRONTEND_LATEST", PACK_ROOT / ".comfyui" / "frontend-latest"))


def frontend_latest() -> tuple[Path, str] | None:
    """(static folder for --front-end-root, version) of the newest frontend setup installed; None if absent."""
    static = FRONTEND_LATEST / "comfyui_frontend_package" / "static"
    infos = sorted(FRONTEND_LATEST.glob("comfyui_frontend_package-*.dist-info"))
    if not static.is_dir() or not infos:
        return None
    return static, infos[-1].name.removeprefix("comfyui_frontend_package-").removesuffix(".dist-info")

# Empty stand-ins, so the example workflows' model file names are valid choices (they are never loaded).
PLACEHOLDER_MODELS = {
    "checkpoints": ("v1-5-pruned-emaonly-fp16.safetensors", "sd_xl_base_1.0.safetensors"),
    "diffusion_models": ("flux1-dev.safetensors", "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                         "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
    "text_encoders": ("clip_l.safetensors", "t5xxl_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "vae": ("ae.safetensors", "wan_2.1_vae.safetensors"),
}


@dataclass
class Server:
    url: str
    base: Path
    log_path: Path

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=60) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{path} refused: {error.read().decode()[:3000]}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
                return entry["outputs"]
            time.sleep(0.5)
        raise AssertionError(f"prompt did not finish:\n{self.log()[-4000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def comfy_server(base: Path, extra_args: tuple[str, ...] = (), frontend_root: Path | None = None) -> Iterator[Server]:
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "user").mkdir(exist_ok=True)
    (base / "custom_nodes" / "block_cache").symlink_to(PACK_ROOT, target_is_directory=True)
    for folder, names in PLACEHOLDER_MODELS.items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / "models" / folder / name).touch()
    if frontend_root is not None:
        extra_args = (*extra_args, "--front-end-root", str(frontend_root))
    port = _free_port()
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
             str(base), "--disable-auto-launch", *extra_args],
            cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        server = Server(f"http://127.0.0.1:{port}", base, log_path)
        try:
            deadline = time.time() + 240
            while True:
                try:
                    server.get("/system_stats")
                    break
                except OSError:
                    if process.poll() is not None or time.time() > deadline:
                        raise AssertionError(f"server did not start:\n{server.log()[-4000:]}") from None
                    time.sleep(0.5)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
