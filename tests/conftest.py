"""Shared fixtures: ComfyUI in-process (CPU), tiny checkpoints, a real ComfyUI server."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from comfyui_dmd2.comfy_env import ensure_comfy  # noqa: E402

COMFYUI = ensure_comfy(cpu=True)

import torch  # noqa: E402

# One intra-op thread for the tiny models: with torch's default threads on a busy 2-core
# machine, spinning OpenMP workers made tiny UNet calls up to 30x slower (measured: sampler +
# schedule tests 171 s -> 7 s). Tests that train for minutes may raise it for themselves.
torch.set_num_threads(1)

import tiny_models  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402

tiny_models.register()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Single-file tiny checkpoints {'sd15': path, 'sdxl': path} (seed 0)."""
    folder = tmp_path_factory.mktemp("tiny_ckpts")
    return {arch: tiny_models.save_checkpoint(arch, folder / f"tiny_{arch}.safetensors") for arch in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_checkpoints):
    """A real ComfyUI server on loopback with this pack and the tiny checkpoints installed
    (models/checkpoints/tiny_sd15.safetensors, tiny_sdxl.safetensors)."""
    base = tmp_path_factory.mktemp("comfy_base")
    server = ComfyServer(COMFYUI, base)
    for path in tiny_checkpoints.values():
        shutil.copy(path, base / "models" / "checkpoints" / path.name)
    server.start()
    yield server
    server.stop()
