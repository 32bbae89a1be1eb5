"""The ``dmd2-train`` command: a full tiny run, its outputs, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import comfy.sd
import pytest
import torch
from comfyui_dmd2.training import cli
from comfyui_dmd2.training.backend import Conditioning
from conftest import Loaded
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FAST = ["--resolution", "128", "--lora-rank", "4", "--grad-accum", "1", "--set", "warmup_steps=0", "--set", "fake_updates_per_generator_update=2", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    prompts = folder / "prompts.txt"
    prompts.write_text("a red cube\n\n# a comment\na tree by the sea\nblue sky\n")
    images = folder / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (150 + 10 * i, 128), (60 * i, 90, 160)).save(images / f"{i}.png")
    (images / "0.txt").write_text("a blue square, caption sidecars are allowed")
    (images / "2.caption").write_text("a purple square")
    return {"prompts": prompts, "images": images, "folder": folder}


def _args(ckpt, inputs, output, steps, *extra):
    return ["--checkpoint", str(ckpt), "--prompts", str(inputs["prompts"]), "--output", str(output), "--steps", str(steps), *FAST, *extra]


@pytest.fixture(scope="module")
def finished(tiny_checkpoints, inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "out"
    args = _args(tiny_checkpoints["sd15"], inputs, output, 4, "--images", str(inputs["images"]), "--save-every", "2", "--sample-every", "2", "--export-raw")
    trainer, backend, _ = cli.train(args)
    return trainer, backend, output


def test_run_writes_every_output(finished):
    trainer, backend, output = finished
    assert trainer.step_count == 4
    lora = output / "dmd2_tiny_sd15_lora.safetensors"
    assert lora.is_file()
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all("loss_fake" in r and "loss_gan_discriminator" in r for r in rows)
    assert "loss_dm" in rows[0] and "loss_dm" not in rows[1]  # 2 fake updates per generator update
    assert (output / "metrics.csv").read_text().splitlines()[0].startswith("step,")
    assert len((output / "metrics.csv").read_text().splitlines()) == 5
    with Image.open(output / "loss_curve.png") as im:
        assert im.width > 100 and im.height > 100
    with Image.open(output / "samples" / "step_0000004.png") as im:
        # three sample prompts in one row, with a title line above and captions below
        assert im.width == 3 * 128 and im.height > 128 + 30
    # The progress bar's count: generator updates (2 fake-score updates per generator update).
    assert sum(r["generator_updated"] for r in rows) == trainer.config.generator_updates(4) == 2
    # Files get the mode a plain open() gives under the umask (not mkstemp's 0o600), so a
    # ComfyUI running as another user can read the LoRA.
    mask = os.umask(0o022)
    os.umask(mask)
    files = [p for p in output.rglob("*") if p.is_file()]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}, sorted((p.name, oct(p.stat().st_mode & 0o777)) for p in files)
    assert (output / "samples" / "step_0000002.png").is_file()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    with safe_open(str(lora), "pt") as fh:
        meta = fh.metadata()
    assert meta["dmd2_steps"] == "4" and meta["dmd2_timesteps"] == "999,749,499,249"
    assert len(meta["dmd2_base_model_sha256"]) == 64 and float(meta["dmd2_guidance"]) == 1.75
    assert json.loads(meta["dmd2_config"])["run"]["lora_rank"] == 4
    assert meta["dmd2_generator_weights"] == "moving average"
    graph = json.loads((output / "workflow_api.json").read_text())
    nodes = {n["class_type"]: n["inputs"] for n in graph.values()}
    assert nodes["LoraLoaderModelOnly"]["lora_name"] == lora.name
    assert nodes["DMD2Generate"]["preset"] == "4-step (999,749,499,249)"
    assert nodes["CheckpointLoaderSimple"]["ckpt_name"] == "tiny_sd15.safetensors"
    ui = json.loads((output / "workflow.json").read_text())
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert {n["type"] for n in ui["nodes"]} == set(nodes)
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:  # links agree on both ends
        assert link_id in by_id[src]["outputs"][src_slot]["links"] and by_id[src]["outputs"][src_slot]["type"] == kind
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id and by_id[dst]["inputs"][dst_slot]["type"] == kind
    ui_lora = next(n for n in ui["nodes"] if n["type"] == "LoraLoaderModelOnly")
    assert ui_lora["widgets_values"] == [lora.name, 1.0]
    # The exported LoRA is the generator's moving average, rounded to fp16; the raw adapter
    # goes to <name>_raw only when asked for.
    exported, raw = load_file(str(lora)), load_file(str(lora.with_name(lora.stem + "_raw.safetensors")))
    assert set(exported) == set(raw)
    moved = False
    for d_path, layer in backend.adapters.layers.items():
        key = "lora_unet_" + d_path.replace(".", "_")
        average = trainer.generator_ema[f"generator.{d_path}.lora_up.weight"]
        torch.testing.assert_close(exported[f"{key}.lora_up.weight"].float(), average, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(raw[f"{key}.lora_up.weight"].float(), layer.adapters["generator"].up.weight.detach(), rtol=1e-3, atol=1e-6)
        moved |= not torch.equal(average, layer.adapters["generator"].up.weight.detach())
    assert moved  # the average is not the raw adapter
    assert any(layer.adapters["generator"].up.weight.abs().sum() > 0 for layer in backend.adapters.layers.values())


@pytest.mark.parametrize("loader", ["stock", "dmd2"])
def test_exported_lora_reproduces_the_generator_in_comfyui(finished, tiny_checkpoints, loader, caplog):
    trainer, backend, output = finished
    lora_path = output / "dmd2_tiny_sd15_lora.safetensors"
    model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoints["sd15"]), output_vae=False, output_clip=False)[0]
    with caplog.at_level(logging.WARNING):
        if loader == "stock":
            lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
            patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        else:
            from comfyui_dmd2.nodes.loaders import load_dmd2_lora

            patched = load_dmd2_lora(model, lora_path, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) == len(backend.adapters.layers)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([999, 499])
    cond = Conditioning(torch.randn(2, 77, 32, generator=gen))
    with torch.no_grad(), trainer.averaged_generator():
        ours = backend.raw(x, t, cond, "generator")
        base = backend.raw(x, t, cond, None)
        patched.patch_model()
        try:
            stock = patched.model.diffusion_model(x, t.float(), context=cond.context)
        finally:
            patched.unpatch_model()
    assert (ours - base).abs().max() > 0  # training moved the generator
    assert (stock - ours).abs().max() / ours.abs().max() < 1e-3


def test_more_steps_continue_and_no_resume_starts_over(finished, tiny_checkpoints, inputs, tmp_path):
    import shutil

    output = tmp_path / "copy"
    shutil.copytree(finished[2], output)

    def args(steps, *extra):
        return _args(tiny_checkpoints["sd15"], inputs, output, steps, "--images", str(inputs["images"]), "--save-every", "2", "--sample-every", "0", *extra)

    trainer, _, _ = cli.train(args(6))  # resumes at 4
    assert trainer.step_count == 6
    assert [json.loads(l)["step"] for l in (output / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4, 5]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    trainer, _, _ = cli.train(args(2, "--no-resume"))
    assert trainer.step_count == 2
    assert [json.loads(l)["step"] for l in (output / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_0000002"]


def _entry(args, env_extra=None, **kwargs):
    env = {**os.environ, **(env_extra or {})}
    return [sys.executable, str(TESTS / "train_entry.py"), *args], env


def _six_steps(tiny_checkpoints, inputs, output, *extra):
    return _args(tiny_checkpoints["sdxl"], inputs, output, 6, "--save-every", "2", "--sample-every", "0", *extra)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints, inputs, tmp_path_factory):
    """An uninterrupted 6-step run: what an interrupted and resumed one must end with."""
    output = tmp_path_factory.mktemp("reference") / "out"
    cli.train(_six_steps(tiny_checkpoints, inputs, output))
    return output


def _same_run(got: Path, reference: Path) -> None:
    ref = load_file(str(reference / "checkpoints" / "step_0000006" / "tensors.safetensors"))
    now = load_file(str(got / "checkpoints" / "step_0000006" / "tensors.safetensors"))
    assert any(k.startswith("generator_ema/") for k in ref)
    assert set(ref) == set(now)
    for key in ref:
        assert torch.equal(ref[key], now[key]), key
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "time"} for l in path.read_text().splitlines()]  # noqa: E731
    assert strip(got / "metrics.jsonl") == strip(reference / "metrics.jsonl")
    lora = "dmd2_tiny_sdxl_lora.safetensors"
    exported, expected = load_file(str(got / lora)), load_file(str(reference / lora))
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_says_so_and_the_same_command_resumes(tiny_checkpoints, inputs, tmp_path, reference, signum):
    """Ctrl-C / SIGTERM mid-run: a checkpoint at the current step, one line saying so, exit
    128+signal, no traceback; the same command then resumes and ends bit-identical to an
    uninterrupted run. The progress bar counts generator updates."""
    output = tmp_path / "stopped"
    args = [a for a in _six_steps(tiny_checkpoints, inputs, output) if a != "--quiet"]
    cmd, env = _entry(args, {"DMD2_TEST_STEP_DELAY": "1.0"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (output / "metrics.jsonl").is_file() or not (output / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "starting a new run" in err
    stopped = [line for line in err.splitlines() if "stopped at step" in line]
    assert len(stopped) == 1 and stopped[0].strip().endswith("; run the same command to resume"), err[-2000:]
    step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
    assert 1 <= step < 6 and (output / "checkpoints" / f"step_{step:07d}").is_dir()
    assert not list(output.glob("*.safetensors"))  # no LoRA from an unfinished run

    cmd, env = _entry(args)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming at step {step} of 6" in done.stderr
    assert "DMD2 generator updates" in done.stderr and "3/3" in done.stderr  # 6 iterations, 2 fake updates each
    _same_run(output, reference)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_checkpoints, inputs, tmp_path, reference):
    args = lambda out: _six_steps(tiny_checkpoints, inputs, out)

    killed = tmp_path / "killed"
    cmd, env = _entry(args(killed), {"DMD2_TEST_STEP_DELAY": "1.5"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step_0000002").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (killed / "checkpoints" / "step_0000006").exists()
    assert not list(killed.glob("*.safetensors"))  # no LoRA from a run that did not finish
    lines_before = len((killed / "metrics.jsonl").read_text().splitlines())
    assert lines_before >= 2

    cmd, env = _entry(args(killed))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming at step 2 of 6" in done.stderr
    _same_run(killed, reference)


def _bad(argv, capsys, match):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "dmd2-train: error:" in err and match in err, err
    return err


def test_bad_input_fails_clearly_and_writes_nothing(tiny_checkpoints, inputs, tmp_path, capsys):
    from safetensors.torch import save_file

    out = tmp_path / "out"
    ck = tiny_checkpoints["sd15"]
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a model" * 50)
    other = tmp_path / "other.safetensors"
    save_file({"text_model.weight": torch.zeros(2, 2)}, str(other))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only comments\n\n")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 64)).save(mixed / "ok.png")
    (mixed / "notes.pdf").write_bytes(b"%PDF-1.4")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    toml = tmp_path / "bad.toml"
    toml.write_text("learning_rate = 3\n")

    _bad(["--checkpoint", str(tmp_path / "missing.safetensors"), "--prompts", str(inputs["prompts"]), "--output", str(out)], capsys, "checkpoint not found")
    _bad(["--checkpoint", str(corrupt), "--prompts", str(inputs["prompts"]), "--output", str(out)], capsys, "corrupt")
    _bad(["--checkpoint", str(other), "--prompts", str(inputs["prompts"]), "--output", str(out)], capsys, "is a text encoder (CLIP) only, not a checkpoint")
    unknown = tmp_path / "unknown.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(unknown))
    _bad(["--checkpoint", str(unknown), "--prompts", str(inputs["prompts"]), "--output", str(out)], capsys, "unsupported architecture")
    _bad(["--checkpoint", str(ck), "--prompts", str(empty), "--output", str(out)], capsys, "holds no prompts")
    _bad(["--checkpoint", str(ck), "--prompts", str(tmp_path / "nope.txt"), "--output", str(out)], capsys, "prompts file not found")
    _bad(["--checkpoint", str(ck), "--prompts", str(inputs["prompts"]), "--images", str(mixed), "--output", str(out)], capsys, "notes.pdf")
    _bad(["--checkpoint", str(ck), "--prompts", str(inputs["prompts"]), "--images", str(broken), "--output", str(out)], capsys, "cut.png")
    _bad(["--checkpoint", str(ck), "--prompts", str(inputs["prompts"]), "--output", str(out), "--resolution", "100"], capsys, "multiple of 8")
    _bad(["--checkpoint", str(ck), "--prompts", str(inputs["prompts"]), "--output", str(out), "--config", str(toml)], capsys, "unknown key 'learning_rate'")
    _bad(["--checkpoint", str(ck), "--prompts", str(inputs["prompts"]), "--output", str(out), "--set", "arch=sdxl"], capsys, "sd15 checkpoint")
    _bad(["--checkpoint", str(ck), "--prompts", str(inputs["prompts"]), "--output", str(out), "--set", "real_guidance_scale=abc"], capsys, "real_guidance_scale")
    _bad(["--prompts", str(inputs["prompts"]), "--output", str(out)], capsys, "checkpoint is required")
    common = ["--checkpoint", str(ck), "--prompts", str(inputs["prompts"]), "--output", str(out)]
    _bad([*common, "--grad-accum", "0"], capsys, "grad_accum must be >= 1, got 0")
    _bad([*common, "--batch-size", "0"], capsys, "batch_size must be >= 1, got 0")
    _bad([*common, "--ema-decay", "1"], capsys, "ema_decay must be in [0, 1)")
    _bad([*common, "--regression-steps", "-3"], capsys, "regression_steps must be >= 0, got -3")
    _bad([*common, "--fake-score-rank", "-1"], capsys, "fake_score_rank must be >= 1 (0: lora_rank), got -1")
    _bad([*common, "--set", "fake_score=half"], capsys, "fake_score must be lora or full, got 'half'")
    _bad([*common, "--lora-targets", "all,to_qq", "--steps", "1"], capsys, "LoRA target 'to_qq' matches no Linear/Conv2d layer")
    _bad([*common, "--timesteps", "fast"], capsys, "--timesteps: expected 4-step, 1-step")
    _bad([*common, "--timesteps", "249,999"], capsys, "strictly decrease")
    captioned = tmp_path / "captioned"
    captioned.mkdir()
    Image.new("RGB", (64, 64)).save(captioned / "ok.png")
    (captioned / "ok.txt").write_bytes(b"\xff\xfe caption in another encoding \xe9")
    _bad([*common, "--images", str(captioned)], capsys, "ok.txt is not UTF-8 text")
    _bad([*common, "--steps", "0"], capsys, "steps must be >= 1, got 0 (with 0 the LoRA would be exported untrained)")
    assert not out.exists()


def test_files_that_are_not_checkpoints_are_named(tiny_checkpoints, inputs, tmp_path, capsys, no_loading):
    """A LoRA, a VAE, a text encoder or a UNet-only file (ComfyUI LDM names or the diffusers
    names of the DMD2 UNet releases) is named as what it is, before anything is loaded."""
    import tiny_models
    import tiny_releases
    from comfyui_dmd2.nodes.releases import RELEASES_BY_NAME
    from safetensors.torch import save_file

    out = tmp_path / "out"
    files = {
        "a LoRA": tiny_releases.write_release(RELEASES_BY_NAME["dmd2_sdxl_4step_lora_fp16.safetensors"], tmp_path),
        "a VAE": tmp_path / "vae.safetensors",
        "a text encoder (CLIP) only": tmp_path / "clip_l.safetensors",
        "a UNet-only file": tmp_path / "unet.safetensors",
        "a UNet-only file ": tiny_releases.write_release(RELEASES_BY_NAME["dmd2_sdxl_4step_unet_fp16.bin"], tmp_path),
    }
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1), "decoder.up.0.block.0.conv1.weight": torch.zeros(1),
               "quant_conv.weight": torch.zeros(1)}, str(files["a VAE"]))
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(1), "text_model.embeddings.token_embedding.weight": torch.zeros(1)},
              str(files["a text encoder (CLIP) only"]))
    save_file(tiny_models.unet_state_dict(tiny_models.build_model("sd15")), str(files["a UNet-only file"]))
    for what, path in files.items():
        err = _bad(["--checkpoint", str(path), "--prompts", str(inputs["prompts"]), "--output", str(out)], capsys, f"is {what.strip()}")
        assert "--checkpoint takes a full single-file SD1.5/SD2.x/SDXL checkpoint" in err and "Traceback" not in err
    assert not out.exists()


def test_pickle_checkpoint_is_refused_in_one_plain_line(tmp_path, inputs, capsys):
    """torch's own refusal (a page of advice to set weights_only=False, with colour codes) is
    not passed on: one line saying why the file is refused and what to use instead."""
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "optimizer": Loaded("an object")}, path)
    err = _bad(["--checkpoint", str(path), "--prompts", str(inputs["prompts"]), "--output", str(tmp_path / "out")], capsys, "is a pickle that holds more than tensors")
    assert "weights_only" not in err and "\x1b" not in err and len(err.strip().splitlines()) == 1, err
    assert cli.one_line(RuntimeError("\x1b[1mbold\x1b[0m and\n  more")) == "bold and more"
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a pickle" * 40)
    err = _bad(["--checkpoint", str(garbage), "--prompts", str(inputs["prompts"]), "--output", str(tmp_path / "out")], capsys, "is corrupt or not a model file")
    assert "weights_only" not in err and "pickle that holds more" not in err, err


def test_checks_come_before_loading_and_leave_nothing(tiny_checkpoints, inputs, tmp_path, capsys, no_loading):
    ck = tiny_checkpoints["sd15"]
    common = ["--checkpoint", str(ck), "--prompts", str(inputs["prompts"])]
    # An output folder that cannot be written (even as root), or that is under a file.
    _bad([*common, "--output", "/sys/dmd2-train-output/run"], capsys, "cannot write to the output folder /sys/dmd2-train-output/run")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    _bad([*common, "--output", str(a_file / "run")], capsys, f"{a_file} is a file")
    out = tmp_path / "new" / "out"
    if torch.cuda.is_available():
        _bad([*common, "--output", str(out), "--device", f"cuda:{torch.cuda.device_count()}"], capsys, "CUDA device(s)")
    else:
        err = _bad([*common, "--output", str(out), "--device", "cuda"], capsys, "--device cuda: CUDA is not available here")
        assert "--device cpu" in err
    _bad([*common, "--output", str(out), "--device", "tpu"], capsys, "--device 'tpu' is not a device")
    _bad([*common, "--output", str(out), "--steps", "0"], capsys, "steps must be >= 1")
    assert not (tmp_path / "new").exists()  # no output folder, no cache folder left behind
    # Past the checks, a failure while loading removes the folders this run created.
    with pytest.raises(Loaded):
        cli.train([*common, "--output", str(out)])
    assert not (tmp_path / "new").exists()


def test_help_explains_every_flag_with_examples():
    parser = cli.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and ("default" in action.help or "required" in action.help), (action.option_strings, action.help)
    text = parser.format_help()
    assert text.count("dmd2-train --checkpoint") == 4 and "--timesteps 1-step" in text and "--images" in text
    assert "--text-encoder ComfyUI/models/text_encoders/t5xxl_fp16.safetensors" in text  # the Flux.1 [dev] example
    assert "--init-lora ComfyUI/models/loras/dmd2_sdxl_4step_lora_fp16.safetensors" in text
    assert "COMFYUI_PATH" in text and "custom_nodes/comfyui-dmd2" in text and "resume" in text


def test_sample_grid_is_labelled_with_prompt_and_step():
    images = torch.full((2, 256, 256, 3), 0.5)
    plain = cli.image_grid(images)
    labelled = cli.image_grid(images, labels=["a red cube (seed 0)", "a tree by the sea (seed 1)"], title="step 500/2000")
    other = cli.image_grid(images, labels=["a blue sphere (seed 0)", "a tree by the sea (seed 1)"], title="step 500/2000")
    assert plain.size == (512, 256) and labelled.width == 512 and labelled.height > 256 + 30
    import numpy as np

    a, b = np.asarray(labelled), np.asarray(other)
    assert (a[:10] != 255).any()  # the title line
    assert (a[-(labelled.height - 256 - 10):, :256] != 255).any()  # captions under the tiles
    assert (a[:, :256] != b[:, :256]).any() and (a[:, 256:] == b[:, 256:]).all()  # each tile its own prompt


def test_generator_updates_are_counted_like_the_trainer():
    from comfyui_dmd2.training.config import DMD2Config

    config = DMD2Config.for_arch("sd15", steps=25, regression_steps=3)  # 10 fake updates per generator update
    assert [config.generator_updates(i) for i in (0, 1, 3, 4, 13, 14, 28)] == [0, 1, 3, 4, 4, 5, 6]


def test_files_follow_the_umask(tmp_path):
    from comfyui_dmd2.training.data import write_text_atomic
    from comfyui_dmd2.training.lora import save_safetensors_atomic

    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        save_safetensors_atomic({"x": torch.zeros(1)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct(0o640)
    assert oct((tmp_path / "b.safetensors").stat().st_mode & 0o777) == oct(0o640)


def test_resume_with_other_settings_is_refused_naming_the_key(finished, tiny_checkpoints, inputs, tmp_path, capsys, no_loading):
    import shutil

    output = tmp_path / "copy"
    shutil.copytree(finished[2], output)
    before = sorted(p.name for p in (output / "checkpoints").iterdir())
    args = lambda *extra: _args(tiny_checkpoints["sd15"], inputs, output, 6, "--images", str(inputs["images"]), *extra)
    err = _bad(args("--lora-rank", "8"), capsys, "lora_rank is 8 now but the saved run used 4")
    assert "--no-resume" in err and "Traceback" not in err
    _bad(args("--grad-accum", "2"), capsys, "grad_accum is 2 now but the saved run used 1")
    _bad(args("--fake-score-rank", "16"), capsys, "fake_score is {'rank': 16} now but the saved run used {'rank': 4}")
    _bad(args("--fake-score", "full"), capsys, "fake_score is 'full' now but the saved run used {'rank': 4}")
    _bad(args("--lora-targets", "all"), capsys, "lora_targets is")
    _bad(args("--ema-decay", "0.5"), capsys, "ema_decay is 0.5 now but the saved run used 0.99")
    _bad(args("--resolution", "64"), capsys, "resolution is 64 now but the saved run used 128")
    _bad(args("--timesteps", "1-step"), capsys, "generator_timesteps is [999] now but the saved run used [999, 749, 499, 249]")  # SD1.5: 999
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == before  # nothing touched


def test_resume_with_other_training_data_is_refused_naming_it(finished, tiny_checkpoints, inputs, tmp_path, capsys, no_loading):
    """Another prompts file, an edited image, a changed caption or no images at all in the same
    --output: refused by name before anything is loaded (a finished run would otherwise
    re-export the old LoRA as if trained on the new data)."""
    import shutil

    output = tmp_path / "copy"
    shutil.copytree(finished[2], output)
    before = sorted(p.name for p in (output / "checkpoints").iterdir())
    saved = json.loads((output / "checkpoints" / before[-1] / "settings.json").read_text())
    assert saved["prompts"].startswith("3 prompts, sha256 ") and saved["images"].startswith("3 images, sha256 ")
    assert saved["captions"].startswith("2 captioned, sha256 ")

    def args(prompts=inputs["prompts"], images=inputs["images"]):
        extra = ["--images", str(images)] if images else []
        return ["--checkpoint", str(tiny_checkpoints["sd15"]), "--prompts", str(prompts), "--output", str(output), "--steps", "6", *FAST, *extra]

    other = tmp_path / "other.txt"
    other.write_text("a red cube\na tree by the sea\na green field\n")
    err = _bad(args(prompts=other), capsys, "the prompts differ from the saved run's (3 prompts, sha256 ")
    assert "--no-resume" in err and "Traceback" not in err
    reordered = tmp_path / "reordered.txt"
    reordered.write_text("blue sky\na red cube\na tree by the sea\n")
    _bad(args(prompts=reordered), capsys, "the prompts differ")
    _bad(args(images=None), capsys, "the images differ from the saved run's (none now, 3 images, sha256 ")
    edited = tmp_path / "edited"
    shutil.copytree(inputs["images"], edited)
    Image.new("RGB", (150, 128), (200, 10, 10)).save(edited / "0.png")
    _bad(args(images=edited), capsys, "the images differ")
    recaptioned = tmp_path / "recaptioned"
    shutil.copytree(inputs["images"], recaptioned)
    (recaptioned / "2.caption").write_text("a violet square")
    _bad(args(images=recaptioned), capsys, "the captions differ")
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == before  # nothing touched


def test_a_checkpoint_saved_without_data_fingerprints_still_resumes(finished, tiny_checkpoints, inputs, tmp_path):
    """Checkpoints of earlier versions have no prompts/images/captions keys: they resume (only
    keys both sides have are compared), and the next checkpoint saves them."""
    import shutil

    output = tmp_path / "old"
    shutil.copytree(finished[2], output)
    for settings in (output / "checkpoints").glob("step_*/settings.json"):
        old = {k: v for k, v in json.loads(settings.read_text()).items() if k not in ("prompts", "images", "captions")}
        settings.write_text(json.dumps(old))
    trainer, _, _ = cli.train(_args(tiny_checkpoints["sd15"], inputs, output, 5, "--images", str(inputs["images"]), "--sample-every", "0"))
    assert trainer.step_count == 5
    assert "prompts" in json.loads((output / "checkpoints" / "step_0000005" / "settings.json").read_text())


def test_an_sdxl_checkpoint_from_before_uncond_resumes_only_with_the_empty_prompt(tiny_checkpoints, inputs, tmp_path, capsys):
    """An SDXL run saved before ``uncond`` and ``init_lora`` existed trained against the empty
    prompt: resuming it with today's default (zeros) is refused naming uncond, with
    ``--uncond empty`` it resumes (and the missing init_lora key means: started from zero)."""
    output = tmp_path / "old_sdxl"
    cli.train(_args(tiny_checkpoints["sdxl"], inputs, output, 2, "--save-every", "2", "--sample-every", "0", "--uncond", "empty"))
    for settings in (output / "checkpoints").glob("step_*/settings.json"):
        old = {k: v for k, v in json.loads(settings.read_text()).items() if k not in ("uncond", "init_lora")}
        settings.write_text(json.dumps(old))
    err = _bad(_args(tiny_checkpoints["sdxl"], inputs, output, 3, "--sample-every", "0"), capsys, "uncond is 'zeros' now but the saved run used 'empty'")
    assert "Traceback" not in err
    trainer, _, _ = cli.train(_args(tiny_checkpoints["sdxl"], inputs, output, 3, "--sample-every", "0", "--uncond", "empty"))
    assert trainer.step_count == 3


def test_one_step_preset_flag_trains_a_399_student(tiny_checkpoints, inputs, tmp_path, caplog):
    """``--timesteps 1-step`` on SDXL: timestep 399 and the 1-step layout (a rank-2x LoRA fake
    score, every layer adapted), said at start-up with its estimated peak."""
    caplog.set_level("INFO", logger="dmd2-train")
    trainer, backend, output = cli.train(_args(tiny_checkpoints["sdxl"], inputs, tmp_path / "one", 2, "--timesteps", "1-step", "--grad-accum", "2", "--sample-every", "0"))
    assert trainer.config.generator_timesteps == (399,) and trainer.config.grad_accum == 2
    assert backend.adapters.ranks == {"generator": 4, "fake_score": 8} and "conv_in" in backend.adapters.layers
    assert "1-step layout for SDXL: the fake score is a LoRA of rank 8, the LoRAs adapt every layer (lora_targets all); estimated peak" in caplog.text
    with safe_open(str(output / "dmd2_tiny_sdxl_lora.safetensors"), "pt") as fh:
        assert fh.metadata()["dmd2_timesteps"] == "399"
    graph = json.loads((output / "workflow_api.json").read_text())
    assert {n["class_type"]: n["inputs"] for n in graph.values()}["DMD2Generate"]["preset"] == "1-step (399)"


def test_one_step_layout_fills_only_what_the_run_leaves_unset():
    """The 1-step layout (run.ONE_STEP_LAYOUT): SD1.5 gets a full fake score and every layer,
    SDXL a LoRA fake score at 2x the generator's rank and every layer; a key the run sets is
    kept; multi-step students keep the reference's layout; each line names the estimate."""
    from comfyui_dmd2.training.run import RunConfig, one_step_layout

    run = RunConfig(lora_rank=64)
    sd15, line = one_step_layout(run, "sd15", (999,), set())
    assert (sd15.fake_score, sd15.fake_score_rank, sd15.lora_targets) == ("full", 0, ("all",))
    assert line.startswith("1-step layout for SD1.5: the fake score is a full fp32 copy of the UNet") and "19.8 GiB at 512 px" in line
    sdxl, line = one_step_layout(run, "sdxl", (399,), set())
    assert (sdxl.fake_score, sdxl.fake_score_rank, sdxl.lora_targets) == ("lora", 128, ("all",)) and "18.1 GiB at 1024 px" in line
    kept, _ = one_step_layout(RunConfig(lora_rank=64, lora_targets=("dmd2",)), "sdxl", (399,), {"lora_targets"})
    assert (kept.fake_score_rank, kept.lora_targets) == (128, ("dmd2",))
    lora_f, _ = one_step_layout(RunConfig(lora_rank=32, fake_score="lora"), "sd15", (999,), {"fake_score"})
    assert (lora_f.fake_score, lora_f.fake_score_rank, lora_f.lora_targets) == ("lora", 128, ("all",))
    assert one_step_layout(run, "sdxl", (999, 749, 499, 249), set()) == (run, None)
    assert one_step_layout(run, "sdxl", (399,), {"fake_score", "fake_score_rank", "lora_targets"}) == (run, None)


def test_full_fake_score_and_all_targets_train_resume_and_export_the_generator(tiny_checkpoints, inputs, tmp_path):
    """``--fake-score full --lora-targets all`` (the digits' 1-step student): the fake score is
    an fp32 copy of the UNet saved in the checkpoints, a run stopped at 2 and resumed to 4
    ends where an uninterrupted one does, and the exported LoRA holds the generator's every
    layer (embeddings too) and nothing of the fake score."""
    def args(output, steps, *extra):
        return _args(tiny_checkpoints["sdxl"], inputs, output, steps, "--save-every", "2", "--sample-every", "0",
                     "--fake-score", "full", "--lora-targets", "all", *extra)

    trainer, backend, whole = cli.train(args(tmp_path / "whole", 4))
    assert trainer.config.lr_fake_score == 5e-5  # the reference's full fake score rate for SDXL, not LoRA F's
    assert "fake_score.input_blocks.0.0.weight" in dict(trainer.fake_named)
    assert all(p.dtype == torch.float32 for p in trainer.fake_params)
    assert not any(".lora_" in name for name, _ in trainer.fake_named)
    cli.train(args(tmp_path / "resumed", 2))
    trainer, _, resumed = cli.train(args(tmp_path / "resumed", 4))
    assert trainer.step_count == 4
    ref = load_file(str(whole / "checkpoints" / "step_0000004" / "tensors.safetensors"))
    now = load_file(str(resumed / "checkpoints" / "step_0000004" / "tensors.safetensors"))
    assert any(k.startswith("fake_score/fake_score.input_blocks.") for k in ref), sorted(ref)[:3]
    assert set(ref) == set(now) and all(torch.equal(ref[k], now[k]) for k in ref)
    lora = load_file(str(whole / "dmd2_tiny_sdxl_lora.safetensors"))
    for layer in ("conv_in", "conv_out", "time_embedding_linear_1", "add_embedding_linear_2"):
        assert f"lora_unet_{layer}.lora_down.weight" in lora
    assert len(lora) == 3 * len(trainer.generator_params) // 2  # down, up, alpha per adapted layer


def test_toml_then_set_then_flags(tmp_path, inputs):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'checkpoint = "model.safetensors"\nprompts = "p.txt"\noutput = "out"\nresolution = 256\n'
        "[run]\nlora_rank = 16\nsample_seeds = [5, 6]\n[dmd2]\nsteps = 100\nreal_guidance_scale = 4.5\n"
    )
    args = cli.build_parser().parse_args(
        ["--config", str(toml), "--set", "lora_rank=8", "--set", "steps=50", "--steps", "70", "--resolution", "512",
         "--grad-accum", "4", "--batch-size", "2", "--timesteps", "999,499"]
    )
    run, dmd2, given = cli.resolve_settings(args)
    assert given == {"checkpoint", "prompts", "output", "resolution", "lora_rank", "sample_seeds"}
    assert run.checkpoint == str(tmp_path / "model.safetensors")
    assert (run.lora_rank, run.resolution, run.sample_seeds) == (8, 512, (5, 6))
    assert dmd2 == {"steps": 70, "real_guidance_scale": 4.5, "grad_accum": 4, "batch_size": 2, "generator_timesteps": (999, 499)}


def test_module_entry_point_help():
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-m", "comfyui_dmd2.training", "--help"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "--checkpoint" in done.stdout and "--set KEY=VALUE" in done.stdout


@pytest.mark.server
def test_written_workflow_runs_in_a_real_comfyui(finished, comfy_server):
    """The exported LoRA + workflow_api.json, queued as they are on a ComfyUI server."""
    import shutil

    from comfy_server import execution_error, output_images

    _, _, output = finished
    shutil.copy(output / "dmd2_tiny_sd15_lora.safetensors", comfy_server.base / "models" / "loras")
    graph = json.loads((output / "workflow_api.json").read_text())
    entry = comfy_server.run(graph)
    assert execution_error(entry) is None, execution_error(entry)
    images = output_images(comfy_server, entry)
    assert len(images) == 1
    with Image.open(images[0]) as im:
        assert im.size == (128, 128)
    assert "lora key not loaded" not in comfy_server.log()


def _pool_args(tiny_checkpoints, inputs, output, *extra):
    """A tiny run with a regression pool of 5 pairs (teacher DDIM 2, guidance 1.75: 4 UNet
    passes each), 3 warm-start iterations drawing from it, then 2 DMD2 iterations."""
    return _args(tiny_checkpoints["sd15"], inputs, output, 2, "--regression-steps", "3", "--regression-pairs", "5", "--set",
                 "regression_teacher_steps=2", "--save-every", "1", "--sample-every", "0", *extra)


def _same_tensors(got: Path, reference: Path, step: int) -> None:
    for name in (f"checkpoints/step_{step:07d}/tensors.safetensors", "dmd2_tiny_sd15_lora.safetensors", "regression_pool.safetensors"):
        ref, now = load_file(str(reference / name)), load_file(str(got / name))
        assert set(ref) == set(now) and all(torch.equal(ref[k], now[k]) for k in ref), name


@pytest.fixture(scope="module")
def pool_reference(tiny_checkpoints, inputs, tmp_path_factory):
    """An uninterrupted run with a regression pool, and the rows its teacher saw."""
    from comfyui_dmd2.training.backend import SharedBaseBackend

    output = tmp_path_factory.mktemp("pool") / "out"
    rows, plain = [], SharedBaseBackend.real_x0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SharedBaseBackend, "real_x0", lambda self, x_t, *rest: rows.append(len(x_t)) or plain(self, x_t, *rest))
        trainer, _, _ = cli.train(_pool_args(tiny_checkpoints, inputs, output))
    return output, trainer, rows


def test_regression_pool_is_built_once_cached_and_reused(pool_reference):
    """The teacher runs for the pool's 5 pairs x 2 DDIM steps and then only for DMD2's one
    generator update, not for the 3 warm-start iterations; the pool is in the run folder
    with the settings that define it."""
    output, trainer, rows = pool_reference
    assert trainer.step_count == 5 and trainer.config.regression_pairs == 5
    assert len(rows) == 5 * 2 + 1 and set(rows) == {1}  # batch 1: one row per teacher call
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [("loss_regression" in m, "loss_dm" in m) for m in metrics] == [(True, False)] * 3 + [(False, True), (False, False)]
    with safe_open(str(output / "regression_pool.safetensors"), "pt") as fh:
        settings = json.loads(fh.metadata()["dmd2_regression_pool"])
        assert fh.get_tensor("target").shape == (5, 4, 16, 16) and fh.get_tensor("prompt_index").dtype == torch.int64
    assert settings["regression_pairs"] == 5 and settings["regression_teacher_steps"] == 2 and settings["real_guidance_scale"] == 1.75
    assert settings["sampling"] == "eps" and settings["prompts"].startswith("3 prompts, sha256") and len(settings["base_model_sha256"]) == 64
    saved = json.loads((output / "checkpoints" / "step_0000005" / "settings.json").read_text())
    assert saved["regression_pairs"] == 5  # part of what a resume must match


def test_regression_pool_stopped_while_building_resumes_to_the_uninterrupted_run(pool_reference, tiny_checkpoints, inputs, tmp_path,
                                                                                 monkeypatch, caplog):
    """A stop request (SIGTERM) after 2 of the 5 pairs keeps them in regression_pool.safetensors
    and writes no checkpoint; the same command continues the build from there and ends
    bit-identical to the uninterrupted run (pool, checkpoint tensors, exported LoRA)."""
    reference, _, _ = pool_reference
    output = tmp_path / "stopped"
    asked = []

    def requested(self, dist):
        asked.append(1)
        return signal.SIGTERM if len(asked) >= 2 else None

    monkeypatch.setattr(cli.StopSignals, "requested", requested)
    with pytest.raises(cli.Stopped) as stop:
        cli.train(_pool_args(tiny_checkpoints, inputs, output))
    assert stop.value.step == 0 and stop.value.reason == signal.SIGTERM
    assert len(load_file(str(output / "regression_pool.safetensors"))["target"]) == 2
    assert not list((output / "checkpoints").glob("step_*")) and not (output / "dmd2_tiny_sd15_lora.safetensors").exists()

    monkeypatch.undo()
    monkeypatch.setattr(cli.log, "propagate", True)
    caplog.set_level("INFO", logger="dmd2-train")
    from comfyui_dmd2.training import pool as pool_module

    draws, draw = [], pool_module.pool_inputs
    monkeypatch.setattr(pool_module, "pool_inputs", lambda *a: draws.append(1) or draw(*a))
    trainer, _, _ = cli.train(_pool_args(tiny_checkpoints, inputs, output))
    assert "building the regression pool: 5 pairs x 4 teacher UNet forwards, continuing after 2" in caplog.text
    assert len(draws) == 1  # the saved pairs' check and the build share one draw of the pool's noise
    assert trainer.step_count == 5
    _same_tensors(output, reference, 5)


def test_regression_pool_of_other_settings_is_rebuilt_and_a_damaged_one_refused(pool_reference, tiny_checkpoints, inputs, tmp_path,
                                                                                monkeypatch, caplog, capsys):
    """A pool file made with other settings (here 3 teacher steps, not 2) is rebuilt, the log
    says which setting differs; a damaged one stops the run with one line naming the file."""
    reference, _, _ = pool_reference
    output = tmp_path / "other"
    output.mkdir()
    shutil.copy(reference / "regression_pool.safetensors", output / "regression_pool.safetensors")
    monkeypatch.setattr(cli.log, "propagate", True)
    caplog.set_level("INFO", logger="dmd2-train")
    cli.train(_pool_args(tiny_checkpoints, inputs, output, "--set", "regression_teacher_steps=3"))
    assert "rebuilding regression_pool.safetensors: its regression_teacher_steps is 2, the run's 3" in caplog.text
    with safe_open(str(output / "regression_pool.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["dmd2_regression_pool"])["regression_teacher_steps"] == 3

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "regression_pool.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert cli.main(_pool_args(tiny_checkpoints, inputs, damaged)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert errors[0].startswith(f"dmd2-train: error: {damaged / 'regression_pool.safetensors'} is not a readable regression pool")
    assert errors[0].endswith("delete it to build the pool again")
    assert (damaged / "regression_pool.safetensors").read_bytes().endswith(b"{not json at all")  # left for the user to look at


def test_resume_reads_a_checkpoint_without_regression_pairs_as_fresh_pairs():
    from comfyui_dmd2.training.run import resume_mismatch

    assert resume_mismatch({"regression_steps": 3}, {"regression_steps": 3, "regression_pairs": 0}) is None
    assert resume_mismatch({"regression_steps": 3}, {"regression_steps": 3, "regression_pairs": 5}) == ("regression_pairs", 5, 0)
