"""DMD2TrainLoRA's layout inputs (issue #23, section 4): ``auto`` (and fake_score_rank 0)
resolves through ``run.one_step_layout`` as an unset option of ``dmd2-train`` does, a value
set in the node is kept, 4-step runs of the old lora/dmd2 defaults still resume, and a 1-step
run says which layout it took. In-process on the tiny models (the server runs are in
test_train_node.py)."""

from __future__ import annotations

import json
import logging

import comfy.sd
import folder_paths
import pytest
from comfyui_dmd2.nodes.training import AUTO, resolve_layout, resume_refusal, train_lora
from comfyui_dmd2.training import cli
from comfyui_dmd2.training.config import DMD2Config
from comfyui_dmd2.training.run import RunConfig, resume_settings

FOUR_STEP = (999, 749, 499, 249)
PROMPTS = "a red cube\na tree by the sea"


def _settings(run: RunConfig, arch: str, timesteps) -> dict:
    return resume_settings(run, DMD2Config.for_arch(arch, generator_timesteps=timesteps), 512)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_auto_on_four_steps_is_the_old_lora_dmd2_layout(arch):
    """4-step auto resolves to the resume settings the old node defaults (lora, 0, dmd2) saved,
    so such a run resumes under auto; nothing is said."""
    auto, line = resolve_layout(RunConfig(lora_rank=8), arch, FOUR_STEP, AUTO, 0, AUTO)
    old = RunConfig(lora_rank=8, fake_score="lora", fake_score_rank=0, lora_targets=("dmd2",))
    assert line is None and (auto.fake_score, auto.fake_score_rank) == ("lora", 0)
    assert _settings(auto, arch, FOUR_STEP) == _settings(old, arch, FOUR_STEP)
    assert _settings(auto, arch, FOUR_STEP)["fake_score"] == {"rank": 8}


def test_auto_on_one_step_is_the_one_step_layout_and_a_set_value_is_kept():
    run = RunConfig(lora_rank=8)
    sdxl, line = resolve_layout(run, "sdxl", (399,), AUTO, 0, AUTO)
    assert (sdxl.fake_score, sdxl.fake_score_rank, sdxl.lora_targets) == ("lora", 16, ("all",))
    assert line.startswith("1-step layout for SDXL: the fake score is a LoRA of rank 16, the LoRAs adapt every layer")
    assert line.endswith("(dmd2-train --estimate gives yours; the fake_score, fake_score_rank and lora_targets inputs choose another layout)")
    sd15, line = resolve_layout(run, "sd15", (999,), AUTO, 0, AUTO)  # a custom list of one timestep
    assert (sd15.fake_score, sd15.lora_targets) == ("full", ("all",)) and "full fp32 copy" in line
    # Values set in the node are kept; what is left at auto still follows the layout.
    kept, line = resolve_layout(run, "sdxl", (399,), "lora", 24, "dmd2")
    assert (kept.fake_score, kept.fake_score_rank, kept.lora_targets, line) == ("lora", 24, ("dmd2",), None)
    mixed, _ = resolve_layout(run, "sd15", (999,), "lora", 0, "dmd2")
    assert (mixed.fake_score, mixed.fake_score_rank, mixed.lora_targets) == ("lora", 32, ("dmd2",))  # SD1.5's 4x
    full, _ = resolve_layout(run, "sdxl", FOUR_STEP, "full", 0, "all")
    assert (full.fake_score, full.lora_targets) == ("full", ("all",))
    # SD2 has no 1-step layout: auto is the reference's, as in the command.
    sd2, line = resolve_layout(run, "sd2", (399,), AUTO, 0, AUTO)
    assert (sd2.fake_score, sd2.fake_score_rank, sd2.lora_targets, line) == ("lora", 0, (), None)


def test_a_changed_fake_score_rank_names_the_input_to_set_back():
    """An old SDXL 1-step node run with fake_score lora and rank 0 trained F at lora_rank; rank 0
    is auto (2x) now, and the refusal says which inputs give the old run back."""
    line = resume_refusal("old", 3, 10, "fake_score", {"rank": 128}, {"rank": 64}, "old_2")
    assert "with fake_score rank 64; this graph has fake_score rank 128. To continue it, set fake_score to lora and " \
           "fake_score_rank to 64;" in line


@pytest.fixture
def node_env(tmp_path, monkeypatch, tiny_checkpoints):
    """load(arch): the tiny checkpoint as ComfyUI's loader gives it; ComfyUI's output and loras
    folders in tmp_path."""
    (tmp_path / "loras").mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path / "loras")], {".safetensors"}))
    return lambda arch: comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoints[arch]))[:3]


def _node(loaded, name: str, preset: str, steps: int, lines: list, custom: str = "", **layout):
    """train_lora on ``loaded`` (model, clip, vae) at the node's default rates, tiny sizes."""
    return train_lora(*loaded, PROMPTS, name, preset, custom, steps, 0, 4, 8.0, 5e-5, 5e-4, 0.0, 64, 1, 1, 0, 0, 0, 1000,
                      status=lambda text, toast=False: lines.append((text, toast)), **layout)


def _saved(folder) -> dict:
    (checkpoint,) = (folder / "checkpoints").glob("step_*")
    return json.loads((checkpoint / "settings.json").read_text())


@pytest.mark.parametrize(("arch", "preset", "custom", "timesteps", "fake_score", "said"), [
    ("sdxl", "1-step (399)", "", "1-step", {"rank": 8}, "1-step layout for SDXL: the fake score is a LoRA of rank 8, the LoRAs adapt every layer"),
    ("sd15", "custom", "999", "999", "full", "1-step layout for SD1.5: the fake score is a full fp32 copy of the UNet, the LoRAs adapt every layer"),
], ids=["sdxl-1-step-preset", "sd15-custom-999"])
def test_node_auto_one_step_trains_the_commands_layout(node_env, tiny_checkpoints, tmp_path, caplog, arch, preset, custom,
                                                       timesteps, fake_score, said):
    """The node with auto and one timestep saves the settings ``dmd2-train --timesteps`` saves
    with that timestep on the same model (layout, targets, and a full fake score's rate), and
    says the command's sentence in its status, as a toast and in the server log."""
    caplog.set_level(logging.INFO)
    lines: list = []
    _node(node_env(arch), "one", preset, 1, lines, custom)
    node = _saved(tmp_path / "output" / "dmd2_training" / "one")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS + "\n")
    cli.train(["--checkpoint", str(tiny_checkpoints[arch]), "--prompts", str(prompts), "--output", str(tmp_path / "cmd"),
               "--steps", "1", "--resolution", "64", "--lora-rank", "4", "--grad-accum", "1", "--set", "warmup_steps=0",
               "--sample-every", "0", "--timesteps", timesteps, "--quiet"])
    command = _saved(tmp_path / "cmd")
    assert node["fake_score"] == fake_score and "conv_in" in node["lora_targets"]
    assert node["lr_fake_score"] == (2.5e-5 if fake_score == "full" else 5e-4)
    assert len(command) > 30 and {k: v for k, v in node.items() if k in command} == command
    status = [(text, toast) for text, toast in lines if text.startswith("1-step layout")]
    assert len(status) == 1 and status[0][0].startswith(said) and status[0][1]
    assert f"DMD2TrainLoRA: {status[0][0]}" in caplog.text


def test_an_old_four_step_node_run_resumes_under_auto(node_env):
    """A run the old node started with its lora/dmd2 defaults resumes when the graph says auto."""
    lines: list = []
    loaded = node_env("sdxl")
    _node(loaded, "old", "4-step (999,749,499,249)", 1, lines, fake_score="lora", fake_score_rank=0, lora_targets="dmd2")
    _node(loaded, "old", "4-step (999,749,499,249)", 2, lines)
    assert ("resuming at step 1 of 2", False) in lines and not any(text.startswith("1-step layout") for text, _ in lines)
