"""Bad DMD2 files through the real server: an SD1.5 UNet on an SDXL graph, a truncated file,
a .bin carrying a pickle payload (never executed), a missing release while offline. Each
gives a clear error from the loader node, and the server goes on serving: the good graph
submitted right after each one renders."""

from __future__ import annotations

import shutil

import pytest
import tiny_releases
import torch
from comfy_server import execution_error, output_images
from comfyui_dmd2.nodes.releases import RELEASES_BY_NAME

pytestmark = pytest.mark.server

_seed = iter(range(100, 10_000))


def unet_graph(unet_name: str, ckpt: str = "tiny_sdxl.safetensors") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "DMD2UNetLoader", "inputs": {"model": ["1", 0], "unet_name": unet_name,
                                                       "convert_to_safetensors": False}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "DMD2Generate", "inputs": {"model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0],
                                                     "seed": next(_seed), "preset": "4-step (999,749,499,249)",
                                                     "custom_timesteps": "999,749,499,249"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bad_input_check"}},
    }


def lora_graph(lora_name: str) -> dict:
    graph = unet_graph("unused")
    graph["2"] = {"class_type": "DMD2LoraLoader", "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength": 1.0}}
    return graph


@pytest.fixture(scope="module")
def unet_folder(comfy_server):
    folder = comfy_server.base / "models" / "diffusion_models"
    tiny_releases.write_unet_release(folder / "good_tiny_sdxl_dmd2.bin", "sdxl", torch.float16, seed=1)
    return folder


def expect_loader_error(server, prompt: dict, node_type: str, *fragments: str) -> str:
    entry = server.run(prompt)
    error = execution_error(entry)
    assert error is not None, "the bad graph succeeded"
    assert error["node_type"] == node_type and error["exception_type"].endswith("DMD2LoadError"), error
    for fragment in fragments:
        assert fragment in error["exception_message"], error["exception_message"]
    # the server keeps serving: a good graph renders right after
    good = server.run(unet_graph("good_tiny_sdxl_dmd2.bin"))
    assert execution_error(good) is None, execution_error(good)
    assert len(output_images(server, good)) == 1
    return error["exception_message"]


def test_sd15_unet_offered_to_sdxl_graph(comfy_server, unet_folder):
    tiny_releases.write_unet_release(unet_folder / "bad_sd15_unet.bin", "sd15", torch.float32)
    expect_loader_error(comfy_server, unet_graph("bad_sd15_unet.bin"), "DMD2UNetLoader",
                        "bad_sd15_unet.bin is an SD1.5 UNet", "connected model is SDXL")


def test_truncated_unet_file(comfy_server, unet_folder):
    tiny_releases.write_truncated(unet_folder / "good_tiny_sdxl_dmd2.bin", unet_folder / "bad_truncated.bin", 0.6)
    expect_loader_error(comfy_server, unet_graph("bad_truncated.bin"), "DMD2UNetLoader",
                        "bad_truncated.bin", "truncated or corrupt", "download it again")


def test_pickle_payload_is_not_executed_by_the_server(comfy_server, unet_folder, tmp_path):
    marker = tmp_path / "server_ran_the_payload"
    tiny_releases.write_pickle_bomb(unet_folder / "bad_pickle.bin", marker)
    expect_loader_error(comfy_server, unet_graph("bad_pickle.bin"), "DMD2UNetLoader",
                        "Refused to load bad_pickle.bin", "Nothing from it was executed")
    assert not marker.exists()


@pytest.mark.parametrize("node_type,name", [("DMD2UNetLoader", "dmd2_sdxl_1step_unet_fp16.bin"),
                                            ("DMD2LoraLoader", "dmd2_sdxl_4step_lora.safetensors")])
def test_missing_release_offline(comfy_server, unet_folder, tmp_path, node_type, name):
    release = RELEASES_BY_NAME[name]
    models = comfy_server.base / "models"
    present = [p for p in (models / release.folder / name, models / "unet" / name) if p.exists()]
    for p in present:  # another test file may have installed a stand-in: put it aside
        shutil.move(p, tmp_path / p.parent.name)
    try:
        prompt = unet_graph(name) if node_type == "DMD2UNetLoader" else lora_graph(name)
        message = expect_loader_error(comfy_server, prompt, node_type, name, "offline",
                                      str(models / release.folder / name))
        assert release.url in message and "/resolve/main/" in release.url  # the file itself, not its web page
        assert not (models / release.folder / name).exists()
    finally:
        for p in present:
            shutil.move(tmp_path / p.parent.name, p)


def test_files_outside_the_model_folders_are_not_reachable(comfy_server, unet_folder):
    """Names that are no release and no file of the folder (../ included) are rejected at submit
    time; ComfyUI itself does not check V3 combo values."""
    for name in ("../checkpoints/tiny_sdxl.safetensors", "no_such_file.bin"):
        status, body = comfy_server.submit(unet_graph(name))
        assert status == 400 and "is neither a few-step UNet release nor a file" in str(body), body
    status, body = comfy_server.submit(lora_graph("../checkpoints/tiny_sdxl.safetensors"))
    assert status == 400 and "is neither a few-step LoRA release nor a file" in str(body), body
    good = comfy_server.run(unet_graph("good_tiny_sdxl_dmd2.bin"))
    assert execution_error(good) is None, execution_error(good)
