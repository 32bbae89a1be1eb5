"""The real ComfyUI server the tests drive: the pack's own driver (comfyui_dmd2.comfy_server)
with this pack and the tiny-model test node installed, plus helpers to read /history."""

from __future__ import annotations

import json
from pathlib import Path

from comfyui_dmd2.comfy_server import ComfyServer as _ComfyServer

REPO = Path(__file__).resolve().parent.parent


class ComfyServer(_ComfyServer):
    def __init__(self, comfyui: Path, base: Path):
        super().__init__(
            comfyui, base,
            custom_nodes={"comfyui-dmd2": REPO, "dmd2-tiny-test-models": REPO / "tests" / "tiny_node"},
            env_defaults={"OMP_NUM_THREADS": "1"},  # tiny models; spinning threads on shared cores
        )
        for sub in ("checkpoints", "loras", "diffusion_models", "controlnet"):
            (self.base / "models" / sub).mkdir(parents=True, exist_ok=True)

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
