"""Run ComfyUI graphs for the digits demo: a real ComfyUI server on loopback (ComfyUI's own
``main.py``, prompt validation and executor) with this pack and the demo's custom node
(``training/digits_node``) installed in a throwaway base directory, driven over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch

from ..comfy_env import find_comfyui

PACK = Path(__file__).resolve().parent.parent


class DigitsComfyRunner:
    """``with DigitsComfyRunner() as comfy: comfy.generate(model_file, batch, preset, seed)``."""

    def __init__(self, start_timeout: float = 120.0):
        self.comfyui = find_comfyui()
        self._tmp = tempfile.TemporaryDirectory(prefix="dmd2-digits-comfy-")
        self.base = Path(self._tmp.name)
        for sub in ("custom_nodes", "models", "input", "output", "user", "temp"):
            (self.base / sub).mkdir()
        _link(PACK, self.base / "custom_nodes" / "comfyui-dmd2")
        _link(PACK / "training" / "digits_node", self.base / "custom_nodes" / "dmd2-digits-demo")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "DigitsComfyRunner":
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        env.pop("COMFYUI_PATH", None)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
               "--preview-method", "none"]
        self._log = open(self.base / "server.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start:\n{self.log()[-4000:]}")
            try:
                self._get("/system_stats")
                break
            except OSError:
                if time.time() > deadline:
                    self.close()
                    raise TimeoutError(f"ComfyUI did not answer in {self.start_timeout}s:\n{self.log()[-4000:]}")
                time.sleep(0.3)
        missing = {"DMD2Generate", "DMD2DigitsModelLoader", "DMD2DigitsClassConditioning"} - set(self._get("/object_info"))
        if missing:
            self.close()
            raise RuntimeError(f"ComfyUI did not load the nodes {sorted(missing)}:\n{self.log()[-4000:]}")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        self._tmp.cleanup()

    def log(self) -> str:
        path = self.base / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Submit an API-format prompt and wait for it; returns its /history entry."""
        body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"ComfyUI rejected the prompt: {e.read()[:4000]!r}") from e
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self._get(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status", {}).get("status_str")
            if status == "success":
                return entry
            if status == "error":
                raise RuntimeError(f"ComfyUI prompt failed: {json.dumps(entry['status'])[:4000]}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def generate(self, model_file: Path, batch: int, preset: str, seed: int, side: int = 8) -> torch.Tensor:
        """Digits model file -> class conditioning -> EmptyLatentImage -> DMD2Generate ->
        SaveLatent; returns the saved latents (batch, 1, side, side), labels cycling 0-9."""
        from safetensors.torch import load_file

        prefix = f"digits/{uuid.uuid4().hex}"
        prompt = {
            "1": {"class_type": "DMD2DigitsModelLoader", "inputs": {"path": str(Path(model_file).resolve())}},
            "2": {"class_type": "DMD2DigitsClassConditioning", "inputs": {"batch": batch}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": side * 8, "height": side * 8, "batch_size": batch}},
            "4": {"class_type": "DMD2Generate", "inputs": {"model": ["1", 0], "positive": ["2", 0], "latent_image": ["3", 0],
                                                           "seed": seed, "preset": preset, "custom_timesteps": ""}},
            "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}},
        }
        entry = self.run(prompt)
        saved = [item for out in entry["outputs"].values() for item in out.get("latents", [])]
        if len(saved) != 1:
            raise RuntimeError(f"expected one saved latent, got {entry['outputs']}")
        path = self.base / "output" / saved[0].get("subfolder", "") / saved[0]["filename"]
        return load_file(str(path))["latent_tensor"].float()


def _link(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src, target_is_directory=True)
    except OSError:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
