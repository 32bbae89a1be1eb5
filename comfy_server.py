"""Drive a real ComfyUI server on loopback over HTTP, the way a client does.

Used by the digits demo (its students are sampled by ComfyUI's own executor) and by the
tests. The server runs ComfyUI's ``main.py --cpu`` in a base directory of its own, with the
custom node folders it is given linked into ``custom_nodes``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


class ComfyServer:
    def __init__(self, comfyui: Path, base: Path, custom_nodes: dict[str, Path], env_defaults: dict[str, str] | None = None,
                 python: str | None = None):
        self.comfyui = Path(comfyui)
        self.python = python or sys.executable  # the Python that runs ComfyUI
        self.base = Path(base)
        self.env_defaults = dict(env_defaults or {})
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        for sub in ("custom_nodes", "models", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        for name, folder in custom_nodes.items():
            link(folder, self.base / "custom_nodes" / name)

    # -- life cycle -----------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "ComfyServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        env.pop("COMFYUI_PATH", None)
        for key, value in self.env_defaults.items():
            env.setdefault(key, value)
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", "--preview-method", "none"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"ComfyUI did not answer in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP -----------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def object_info(self) -> dict:
        return self.get("/object_info")

    def submit(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt. Returns (HTTP status, body); 400 carries ComfyUI's validation errors."""
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt finished (successfully or not); return its entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-5000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link(src: Path, dst: Path) -> None:
    """Install a custom node folder: a symlink, or a copy where symlinks are not allowed."""
    if dst.exists() or dst.is_symlink():
        return
    try:
        dst.symlink_to(src, target_is_directory=True)
    except OSError:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
