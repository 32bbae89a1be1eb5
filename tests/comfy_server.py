"""A real ComfyUI server on loopback, driven over HTTP the way a client drives it."""

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

REPO = Path(__file__).resolve().parent.parent


class ComfyServer:
    def __init__(self, comfyui: Path, base: Path):
        self.comfyui = Path(comfyui)
        self.base = Path(base)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        for sub in ("custom_nodes", "models/checkpoints", "models/loras", "models/diffusion_models",
                    "models/controlnet", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        _link(REPO, self.base / "custom_nodes" / "comfyui-dmd2")
        _link(REPO / "tests" / "tiny_node", self.base / "custom_nodes" / "dmd2-tiny-test-models")

    # -- life cycle -----------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "ComfyServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny models; spinning threads on shared cores
        env.pop("COMFYUI_PATH", None)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", "--preview-method", "none"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"ComfyUI did not answer in {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
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

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Submit and wait. Raises with the server's own message on a validation error."""
        status, body = self.submit(prompt)
        if status != 200:
            raise PromptRejected(body)
        return self.wait(body["prompt_id"], timeout)


class PromptRejected(Exception):
    def __init__(self, body: dict):
        super().__init__(json.dumps(body)[:4000])
        self.body = body


def execution_error(entry: dict) -> dict | None:
    """The 'execution_error' message of a finished /history entry, or None on success."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def output_images(server: ComfyServer, entry: dict) -> list[Path]:
    paths = []
    for node_out in entry.get("outputs", {}).values():
        for img in node_out.get("images", []):
            if img.get("type") == "output":
                paths.append(server.base / "output" / img.get("subfolder", "") / img["filename"])
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        return
    try:
        dst.symlink_to(src, target_is_directory=True)
    except OSError:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
