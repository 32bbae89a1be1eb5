"""Run ComfyUI graphs for the digits demo: a real ComfyUI server on loopback (ComfyUI's own
``main.py``, prompt validation and executor) with this pack and the demo's custom node
(``training/digits/node``) installed in a throwaway base directory, driven over HTTP.
Students arrive as LoRA files in the server's ``models/loras`` and are put on the teacher
by ComfyUI's stock ``LoraLoaderModelOnly``."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import torch

from ...comfy_env import find_comfyui
from ...comfy_server import ComfyServer

PACK = Path(__file__).resolve().parents[2]
NODES_NEEDED = {"DMD2Generate", "DMD2DigitsModelLoader", "DMD2DigitsClassConditioning", "LoraLoaderModelOnly"}


class DigitsComfyRunner:
    """``with DigitsComfyRunner() as comfy: comfy.generate(model_file, batch, preset, seed, lora=comfy.install_lora(f))``."""

    def __init__(self, start_timeout: float = 120.0):
        self._tmp = tempfile.TemporaryDirectory(prefix="dmd2-digits-comfy-")
        self.server = ComfyServer(
            find_comfyui(), Path(self._tmp.name),
            custom_nodes={"comfyui-dmd2": PACK, "dmd2-digits-demo": PACK / "training" / "digits" / "node"},
        )
        self.base = self.server.base
        self.url = self.server.url
        self.start_timeout = start_timeout

    def __enter__(self) -> "DigitsComfyRunner":
        try:
            self.server.start(self.start_timeout)
            missing = NODES_NEEDED - set(self.server.object_info())
            if missing:
                raise RuntimeError(f"ComfyUI did not load the nodes {sorted(missing)}:\n{self.server.log()[-4000:]}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.server.stop()
        self._tmp.cleanup()

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Submit an API-format prompt and wait for it; returns its /history entry."""
        status, body = self.server.submit(prompt)
        if status != 200:
            raise RuntimeError(f"ComfyUI rejected the prompt: {json.dumps(body)[:4000]}")
        entry = self.server.wait(body["prompt_id"], timeout)
        if entry["status"].get("status_str") != "success":
            raise RuntimeError(f"ComfyUI prompt failed: {json.dumps(entry['status'])[:4000]}")
        return entry

    def install_lora(self, path: Path) -> str:
        """Copy a LoRA file into the server's ``models/loras``; returns its name for the graph."""
        import shutil

        folder = self.base / "models" / "loras"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / Path(path).name)
        return Path(path).name

    def generate(self, model_file: Path, batch: int, preset: str, seed: int, lora: str | None = None, side: int = 8,
                 strength: float = 1.0, custom_timesteps: str = "") -> torch.Tensor:
        """Digits model file [-> LoraLoaderModelOnly(lora, strength)] -> class conditioning ->
        EmptyLatentImage -> DMD2Generate -> SaveLatent; returns the saved latents
        (batch, 1, side, side), labels cycling 0-9."""
        from safetensors.torch import load_file

        prefix = f"digits/{uuid.uuid4().hex}"
        model = ["1", 0]
        prompt = {"1": {"class_type": "DMD2DigitsModelLoader", "inputs": {"path": str(Path(model_file).resolve())}}}
        if lora is not None:
            prompt["6"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora, "strength_model": strength}}
            model = ["6", 0]
        prompt |= {
            "2": {"class_type": "DMD2DigitsClassConditioning", "inputs": {"batch": batch}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": side * 8, "height": side * 8, "batch_size": batch}},
            "4": {"class_type": "DMD2Generate", "inputs": {"model": model, "positive": ["2", 0], "latent_image": ["3", 0],
                                                           "seed": seed, "preset": preset, "custom_timesteps": custom_timesteps}},
            "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}},
        }
        entry = self.run(prompt)
        if lora is not None and "lora key not loaded" in self.server.log():
            raise RuntimeError(f"ComfyUI's LoRA loader left keys of {lora} unloaded:\n{self.server.log()[-4000:]}")
        saved = [item for out in entry["outputs"].values() for item in out.get("latents", [])]
        if len(saved) != 1:
            raise RuntimeError(f"expected one saved latent, got {entry['outputs']}")
        path = self.base / "output" / saved[0].get("subfolder", "") / saved[0]["filename"]
        return load_file(str(path))["latent_tensor"].float()
