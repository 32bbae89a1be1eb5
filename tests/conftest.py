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


# tiny_sdxl's weights (seed 0) with the v_pred and ztsnr keys of community v-prediction,
# zero-terminal-SNR SDXL checkpoints: ComfyUI loads it as v + zsnr (issue #24).
VPRED_ZTSNR_CHECKPOINT = "tiny_sdxl_vpred_ztsnr.safetensors"


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_checkpoints):
    """A real ComfyUI server on loopback with this pack and the tiny checkpoints installed
    (models/checkpoints/tiny_sd15.safetensors, tiny_sdxl.safetensors and its v-prediction
    ZTSNR twin ``VPRED_ZTSNR_CHECKPOINT``)."""
    base = tmp_path_factory.mktemp("comfy_base")
    server = ComfyServer(COMFYUI, base)
    for path in tiny_checkpoints.values():
        shutil.copy(path, base / "models" / "checkpoints" / path.name)
    tiny_models.save_checkpoint("sdxl", base / "models" / "checkpoints" / VPRED_ZTSNR_CHECKPOINT, v_pred=True, ztsnr=True)
    server.start()
    yield server
    server.stop()


# Names the shipped workflows use (workflows/*.json); tiny stand-ins are installed under them.
WORKFLOW_BASE_CHECKPOINTS = {"sd_xl_base_1.0.safetensors": "sdxl", "v1-5-pruned-emaonly.safetensors": "sd15",
                             "juggernautXL_v9.safetensors": "sdxl"}  # a community SDXL finetune
WORKFLOW_ADAPTER = "t2i-adapter-canny-sdxl-1.0.safetensors"
WORKFLOW_INPUT_IMAGE = "example.png"


@pytest.fixture(scope="session")
def workflow_files(comfy_server, tiny_checkpoints):
    """The shared server with a tiny, loadable file under every name the shipped workflows use:
    the base checkpoints, every DMD2 release (seed = its index in RELEASES), the canny
    T2I-Adapter and the input image. One place, so every test sees the same files."""
    import tiny_adapters
    import tiny_releases
    from comfyui_dmd2.nodes.releases import RELEASES
    from PIL import Image

    models = comfy_server.base / "models"
    for name, arch in WORKFLOW_BASE_CHECKPOINTS.items():
        shutil.copy(tiny_checkpoints[arch], models / "checkpoints" / name)
    for seed, release in enumerate(RELEASES):
        tiny_releases.write_release(release, models / release.folder, seed=seed)
    tiny_adapters.save_adapter("sdxl", models / "controlnet" / WORKFLOW_ADAPTER, dtype=torch.float16)
    # A photo-like input: a bright disc and a bar on a gradient, not square (the edge node crops).
    x = torch.linspace(0, 1, 120)
    y = torch.linspace(0, 1, 90)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    pixels = 0.3 * xx + 0.6 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.06).float()
    pixels[:, 20:26] = 1.0
    rgb = (pixels.clamp(0, 1)[..., None].expand(-1, -1, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(rgb).save(comfy_server.base / "input" / WORKFLOW_INPUT_IMAGE)
    return comfy_server


class Loaded(Exception):
    """Raised in place of loading the checkpoint: proves a check came before the heavy load."""


@pytest.fixture
def no_loading(monkeypatch):
    """``dmd2-train`` must refuse before it loads the checkpoint: loading raises ``Loaded``."""
    from comfyui_dmd2.training import checkpoint

    def refuse(*args, **kwargs):
        raise Loaded("the checkpoint was loaded before the check")

    monkeypatch.setattr(checkpoint, "load_checkpoint", refuse)


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    """``dmd2-train``'s ``main`` gives the command's logger a handler on the stderr of its time,
    which a later test's capture has closed ("--- Logging error ---" in that test's output):
    each test starts without one, logging through the root logger, and gets the old ones back."""
    from comfyui_dmd2.training import cli

    saved = (list(cli.log.handlers), cli.log.propagate, cli.log.level)
    cli.log.handlers.clear()
    cli.log.propagate = True
    yield
    cli.log.handlers[:], cli.log.propagate = saved[0], saved[1]
    cli.log.setLevel(saved[2])
