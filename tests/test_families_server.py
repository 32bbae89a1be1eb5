"""Release families through the real server, with bad input: each case a test, and the
server renders a good graph right after. Warnings (a case where both would run) come back as
the node's UI output; refusals as the loader's execution error."""

from __future__ import annotations

import pytest
from comfy_server import execution_error, output_images

pytestmark = pytest.mark.server

_seed = iter(range(500, 10_000))
LIGHTNING_4 = "SDXL-Lightning 4-step (euler, trailing)"


def graph(loader: dict, preset: str, custom: str = "999,749,499,249", ckpt: str = "tiny_sdxl.safetensors") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": loader,
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "DMD2Generate", "inputs": {"model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0],
                                                     "seed": next(_seed), "preset": preset, "custom_timesteps": custom}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "families_check"}},
    }


def lora(name: str) -> dict:
    return {"class_type": "DMD2LoraLoader", "inputs": {"model": ["1", 0], "lora_name": name, "strength": 1.0}}


def unet(name: str) -> dict:
    return {"class_type": "DMD2UNetLoader", "inputs": {"model": ["1", 0], "unet_name": name,
                                                      "convert_to_safetensors": False}}


def run_ok(server, prompt: dict) -> list[str]:
    """Run a graph that must render; return the notes DMD2Generate gave back."""
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert len(output_images(server, entry)) == 1
    return list(entry["outputs"].get("5", {}).get("text", []))


def test_release_with_its_own_preset_runs_without_a_note(workflow_files):
    assert run_ok(workflow_files, graph(lora("sdxl_lightning_4step_lora.safetensors"), LIGHTNING_4)) == []


def test_lora_of_one_family_with_another_familys_preset_warns(workflow_files):
    notes = run_ok(workflow_files, graph(lora("lcm-lora-sdxl.safetensors"), LIGHTNING_4))
    assert len(notes) == 1 and "LCM-LoRA release" in notes[0] and "SDXL-Lightning way" in notes[0], notes
    assert "LCM 4-step" in notes[0]  # names its own preset


def test_lightning_x0_unet_with_an_eps_preset_warns(workflow_files):
    notes = run_ok(workflow_files, graph(unet("sdxl_lightning_1step_unet_x0.safetensors"), "4-step (999,749,499,249)"))
    assert any("x0" in n for n in notes), notes
    assert run_ok(workflow_files, graph(unet("sdxl_lightning_1step_unet_x0.safetensors"),
                                        "SDXL-Lightning 1-step x0 (euler, 999)")) == []


def test_custom_step_count_the_release_was_not_distilled_for_runs_with_a_note(workflow_files):
    notes = run_ok(workflow_files, graph(lora("sdxl_lightning_4step_lora.safetensors"), "custom", "999,666,333"))
    assert len(notes) == 1 and "distilled for 4 step(s)" in notes[0] and "euler" in notes[0], notes


def test_sd15_lora_on_sdxl_is_refused_and_the_server_goes_on(workflow_files):
    entry = workflow_files.run(graph(lora("lcm-lora-sdv1-5.safetensors"), "LCM 4-step (lcm, 999,759,499,259)"))
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "DMD2LoraLoader", error
    message = error["exception_message"]
    # names the mismatch (tiny models: by cross-attention width; the real widths name SD1.5/SDXL)
    assert "LoRA was made for cross-attention dim 32" in message and "the model is SDXL" in message, message
    # the server keeps serving
    assert run_ok(workflow_files, graph(lora("sdxl_lightning_4step_lora.safetensors"), LIGHTNING_4)) == []


def test_turbo_checkpoint_loader_tags_the_model(workflow_files):
    prompt = graph({"class_type": "DMD2CheckpointLoader", "inputs": {"ckpt_name": "sd_xl_turbo_1.0_fp16.safetensors"}},
                   "SDXL-Turbo 1-step (euler ancestral, 999)")
    prompt["3"]["inputs"]["clip"] = ["2", 1]
    prompt["6"]["inputs"]["vae"] = ["2", 2]
    assert run_ok(workflow_files, prompt) == []
    prompt["5"]["inputs"]["preset"] = LIGHTNING_4
    prompt["5"]["inputs"]["seed"] = next(_seed)
    notes = run_ok(workflow_files, prompt)
    assert len(notes) == 1 and "SDXL-Turbo release" in notes[0], notes
