"""``dmd2-train`` on a Flux.1 [dev] model (#25): the tiny Flux as a user has it (a diffusion-model
file, its clip_l and t5xxl text encoder files, its VAE), trained, stopped, resumed bit-identically,
exported as a LoRA the stock loader applies key for key, with a workflow that samples it; and the
bad inputs, each refused in one line before anything is loaded or written."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import comfy.sd
import comfy.utils
import pytest
import tiny_models
import torch
from comfyui_dmd2 import bases
from comfyui_dmd2.training import checkpoint as C
from comfyui_dmd2.training import cli
from comfyui_dmd2.training.config import RUN_ARCH_DEFAULTS, TIMESTEP_PRESETS, DMD2Config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_cli import inputs  # noqa: F401 (the fixture: prompts and captioned real images)

TESTS = Path(__file__).resolve().parent
RES = 64  # 8x8 latents: a 4x4 token grid
FAST = ["--resolution", str(RES), "--grad-accum", "1", "--set", "warmup_steps=0", "--set", "fake_updates_per_generator_update=2", "--quiet"]
LORA = "dmd2_tiny_flux_dev_lora.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory, inputs):  # noqa: F811 (inputs: the fixture)
    """The tiny Flux files ([dev], and a [schnell] diffusion model), with ``dmd2-train``'s test
    prompts and captioned real images."""
    tiny_models.register_flux()
    folder = tmp_path_factory.mktemp("flux_files")
    paths = tiny_models.save_flux_files(folder)
    paths["schnell"] = tiny_models.save_flux_files(folder / "schnell", schnell=True)["diffusion_model"]
    return {**paths, "prompts": inputs["prompts"], "images": inputs["images"]}


def _args(files, output, steps, *extra, encoders=("clip_l", "t5xxl"), vae=True):
    args = ["--checkpoint", str(files["diffusion_model"]), "--prompts", str(files["prompts"]), "--output", str(output),
            "--steps", str(steps), *FAST, *extra]
    for role in encoders:
        args += ["--text-encoder", str(files[role])]
    return args + (["--vae", str(files["vae"])] if vae else [])


@pytest.fixture(scope="module")
def finished(files, tmp_path_factory):
    output = tmp_path_factory.mktemp("flux_run") / "out"
    trainer, backend, _ = cli.train(_args(files, output, 4, "--lora-rank", "4", "--images", str(files["images"]), "--save-every", "2",
                                          "--sample-every", "2"))
    return trainer, backend, output


def test_flux_run_writes_the_lora_its_metadata_samples_and_checkpoints(finished):
    trainer, backend, output = finished
    assert trainer.step_count == 4 and backend.family.name == "flux_dev" and backend.latent_shape == (16, RES // 8, RES // 8)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all("loss_fake" in r and "loss_gan_discriminator" in r for r in rows)  # the real images (VAE-encoded) feed the GAN
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    with Image.open(output / "samples" / "step_0000004.png") as im:  # decoded with the --vae file
        assert im.width == 3 * RES
    with safe_open(str(output / LORA), "pt") as fh:
        meta = fh.metadata()
    assert meta["dmd2_arch"] == "flux_dev" and meta["dmd2_sampling"] == "flow" and meta["ss_base_model_version"] == "flux1"
    assert meta["dmd2_timesteps"] == "999,749,499,249"
    assert float(meta["dmd2_guidance"]) == 1.0 and float(meta["dmd2_embedded_guidance"]) == bases.FLUX_DEV.guidance == 3.5
    run_config = json.loads((output / "run_config.json").read_text())
    assert run_config["arch"] == "flux_dev" and run_config["dmd2"]["real_guidance_scale"] == 1.0
    # the conditions come from the two text encoder files: T5 tokens as context, CLIP-L pooled as y
    cache = load_file(str(next((output / "cache").glob("text-*.safetensors"))))
    assert cache["1.context"].shape == (1, 256, tiny_models.TINY_T5["d_model"]) and cache["1.y"].shape == (1, tiny_models.TINY_CLIP["hidden_size"])


def test_flux_lora_is_applied_key_for_key_by_the_stock_loader_and_matches_the_generator(finished, files, caplog):
    trainer, backend, output = finished
    model = comfy.sd.load_diffusion_model(str(files["diffusion_model"]))  # UNETLoader's route
    lora = comfy.utils.load_torch_file(str(output / LORA), safe_load=True)
    assert all(k.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_")) for k in lora)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)  # LoraLoaderModelOnly's call
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) == len(backend.adapters.layers) == 10  # 8 double-block + 2 single-block linears
    cond = backend.data.prompts[0]
    x = torch.randn(1, *backend.latent_shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([499])
    sigma = backend.family.process.time(t).float()
    with torch.no_grad(), trainer.averaged_generator():
        ours = backend.generator_x0(x, t, cond)
        base = backend._x0(x, t, cond, None)
        patched.patch_model()
        try:
            stock = patched.model.apply_model(x, sigma, c_crossattn=cond.context, y=cond.y, guidance=torch.tensor([3.5]))
        finally:
            patched.unpatch_model()
    assert (ours - base).abs().max() > 0  # training moved the generator
    torch.testing.assert_close(stock.float(), ours, rtol=2e-3, atol=2e-3)  # the file is fp16


def _check_ui_links(ui: dict) -> None:
    by_id = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:  # links agree on both ends
        assert link_id in by_id[src]["outputs"][src_slot]["links"] and by_id[src]["outputs"][src_slot]["type"] == kind
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id and by_id[dst]["inputs"][dst_slot]["type"] == kind
    for node in ui["nodes"]:  # every input is linked
        assert all(i["link"] is not None for i in node["inputs"]), node["type"]


def test_flux_workflow_loads_the_files_and_samples_on_the_flow_preset(finished, files):
    _, _, output = finished
    graph = json.loads((output / "workflow_api.json").read_text())
    nodes = {n["class_type"]: n["inputs"] for n in graph.values()}
    assert set(nodes) == {"UNETLoader", "DualCLIPLoader", "VAELoader", "LoraLoaderModelOnly", "CLIPTextEncode", "EmptySD3LatentImage",
                          "DMD2Generate", "VAEDecode", "SaveImage"}
    assert nodes["UNETLoader"]["unet_name"] == files["diffusion_model"].name
    assert (nodes["DualCLIPLoader"]["clip_name1"], nodes["DualCLIPLoader"]["clip_name2"], nodes["DualCLIPLoader"]["type"]) == (
        files["clip_l"].name, files["t5xxl"].name, "flux")
    assert nodes["VAELoader"]["vae_name"] == files["vae"].name and nodes["LoraLoaderModelOnly"]["lora_name"] == LORA
    assert nodes["DMD2Generate"]["preset"] == "DMD2 flow 4-step (Flux dev shift)" and nodes["DMD2Generate"]["cfg"] == 1.0
    assert nodes["EmptySD3LatentImage"]["width"] == RES
    ui = json.loads((output / "workflow.json").read_text())
    assert {n["type"] for n in ui["nodes"]} == set(nodes)
    _check_ui_links(ui)
    # every API input that links, links where the UI graph does
    by_id = {n["id"]: n for n in ui["nodes"]}
    for node_id, node in graph.items():
        linked = [v for v in node["inputs"].values() if isinstance(v, list)]
        assert len(linked) == len(by_id[int(node_id)]["inputs"])


@pytest.mark.server
def test_written_flux_workflow_runs_in_a_real_comfyui(finished, files, comfy_server):
    """The exported LoRA and workflow_api.json, queued as they are on a ComfyUI server holding the
    tiny Flux files in its models folders: the stock loaders read them, every LoRA key applies,
    DMD2Generate samples the flow preset, the VAE decodes."""
    import shutil

    from comfy_server import execution_error, output_images

    _, _, output = finished
    models = comfy_server.base / "models"
    for role, folder in (("diffusion_model", "diffusion_models"), ("clip_l", "text_encoders"), ("t5xxl", "text_encoders"), ("vae", "vae")):
        (models / folder).mkdir(exist_ok=True)
        shutil.copy(files[role], models / folder / files[role].name)
    shutil.copy(output / LORA, models / "loras" / LORA)
    entry = comfy_server.run(json.loads((output / "workflow_api.json").read_text()))
    assert execution_error(entry) is None, execution_error(entry)
    (image,) = output_images(comfy_server, entry)
    with Image.open(image) as im:
        assert im.size == (RES, RES)
    assert "lora key not loaded" not in comfy_server.log()


def test_flux_presets_map_the_trained_timesteps():
    assert cli.flux_preset((999, 749, 499, 249)) == "DMD2 flow 4-step (Flux dev shift)"
    assert cli.flux_preset(bases.FLUX_DEV.trailing_timesteps(8)) == "DMD2 flow 8-step (Flux dev shift)"
    assert cli.flux_preset((999,)) == "DMD2 flow 1-step (Flux dev shift)"
    assert cli.flux_preset((999, 499)) is None and cli.flux_preset((749,)) is None  # no preset samples those


def test_flux_dev_defaults_and_the_sd_ones_unchanged():
    config = DMD2Config.for_arch("flux_dev")
    assert config.real_guidance_scale == 1.0 and config.generator_timesteps == (999, 749, 499, 249) and config.uncond == "empty"
    assert TIMESTEP_PRESETS["flux_dev"] == {"4-step": (999, 749, 499, 249), "1-step": (999,)}
    assert DMD2Config.for_arch("flux_dev", generator_timesteps="1-step").generator_timesteps == (999,)
    # the 4-step list on the flow grid is the sampler's 4 times, shifted by [dev]'s own shift
    torch.testing.assert_close(bases.FLUX_DEV.process.time(torch.tensor(config.generator_timesteps)), bases.FLUX_DEV.process.sigmas(4))
    assert RUN_ARCH_DEFAULTS["flux_dev"] == {"lora_rank": 32, "lora_alpha": 4.0}
    sdxl = DMD2Config.for_arch("sdxl")
    assert (sdxl.real_guidance_scale, sdxl.uncond, sdxl.lr_generator) == (8.0, "zeros", 5e-5)


def test_a_flux_init_lora_is_where_the_generator_starts(finished, files, tmp_path):
    """--init-lora of a Flux LoRA (the run above's): with the generator's rate at 0 the exported
    LoRA is the init LoRA, layer for layer (ComfyUI's parser maps its keys onto the adapted layers)."""
    init = finished[2] / LORA
    output = tmp_path / "from_init"
    cli.train(_args(files, output, 2, "--init-lora", str(init), "--set", "lr_generator=0", vae=False))
    start, exported = load_file(str(init)), load_file(str(output / LORA))
    assert start.keys() == exported.keys()
    for key in start:
        torch.testing.assert_close(exported[key].float(), start[key].float(), rtol=1e-3, atol=1e-6)
    assert json.loads((output / "run_config.json").read_text())["run"]["lora_rank"] == 4  # the file's rank


def test_a_one_step_flux_run_trains_at_999_and_its_workflow_samples_the_1_step_preset(files, tmp_path):
    output = tmp_path / "one"
    cli.train(_args(files, output, 1, "--timesteps", "1-step", "--lora-rank", "4", vae=False))
    with safe_open(str(output / LORA), "pt") as fh:
        assert fh.metadata()["dmd2_timesteps"] == "999"
    api = json.loads((output / "workflow_api.json").read_text())
    (generate,) = [node for node in api.values() if node["class_type"] == "DMD2Generate"]
    assert generate["inputs"]["preset"] == "DMD2 flow 1-step (Flux dev shift)"


def test_a_flux_run_on_timesteps_no_preset_samples_writes_no_workflow(files, tmp_path, caplog):
    output = tmp_path / "odd"
    with caplog.at_level(logging.INFO, logger="dmd2-train"):
        cli.train(_args(files, output, 1, "--timesteps", "749", "--lora-rank", "4", vae=False))
    assert not (output / "workflow.json").exists() and not (output / "workflow_api.json").exists()
    assert any("no workflow written" in r.getMessage() for r in caplog.records)


# -- stopped and resumed ----------------------------------------------------------------------------
def _six(files, output):
    return _args(files, output, 6, "--save-every", "2", "--sample-every", "0", vae=False)


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """An uninterrupted 6-step run at the Flux defaults (rank 32, alpha 4), no VAE."""
    output = tmp_path_factory.mktemp("flux_reference") / "out"
    cli.train(_six(files, output))
    return output


def test_flux_run_takes_rank_32_alpha_4_and_runs_without_a_vae(reference):
    run = json.loads((reference / "run_config.json").read_text())["run"]
    assert (run["lora_rank"], run["lora_alpha"]) == (32, 4.0)
    assert not (reference / "samples").exists()  # no VAE: no sample grids
    assert json.loads((reference / "workflow_api.json").read_text())["9"]["inputs"]["vae_name"] == "ae.safetensors"


def test_flux_run_stopped_by_a_signal_resumes_bit_identically(files, tmp_path, reference):
    output = tmp_path / "stopped"
    args = _six(files, output)
    env = {**os.environ, "DMD2_TEST_STEP_DELAY": "1.0"}
    proc = subprocess.Popen([sys.executable, str(TESTS / "train_entry.py"), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (output / "metrics.jsonl").is_file() or not (output / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and not list(output.glob("*.safetensors"))
    step = int(next(line for line in err.splitlines() if "stopped at step" in line).split("stopped at step ")[1].split(";")[0])
    assert 1 <= step < 6

    done = subprocess.run([sys.executable, str(TESTS / "train_entry.py"), *args], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming at step {step} of 6" in done.stderr
    ref = load_file(str(reference / "checkpoints" / "step_0000006" / "tensors.safetensors"))
    now = load_file(str(output / "checkpoints" / "step_0000006" / "tensors.safetensors"))
    assert set(ref) == set(now) and any(k.startswith("generator_ema/") for k in ref)
    assert all(torch.equal(ref[k], now[k]) for k in ref)
    exported, expected = load_file(str(output / LORA)), load_file(str(reference / LORA))
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)


# -- bad input ----------------------------------------------------------------------------------------
def _bad(argv, capsys, *expected):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "dmd2-train: error:" in line)
    assert all(text in line for text in expected), line
    assert "Traceback" not in err
    return line


def test_flux_bad_input_is_refused_in_one_line_before_loading(files, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    # a diffusion-model file without its text encoders: the message names both files and the flag
    _bad(_args(files, out, 2, encoders=()), capsys, "without its text encoders", "--text-encoder clip_l.safetensors",
         "--text-encoder t5xxl_fp16.safetensors", "DualCLIPLoader")
    _bad(_args(files, out, 2, encoders=("clip_l",)), capsys, "without its text encoders", "t5xxl", "--text-encoder")
    _bad(_args(files, out, 2, encoders=("clip_l", "clip_l")), capsys, "both clip_l")
    line = _bad(_args(files, out, 2, encoders=("clip_l", "vae")), capsys, files["vae"].name, "not one of Flux.1's text encoders")
    assert "a VAE" in line
    _bad(_args(files, out, 2, "--images", str(files["images"]), vae=False), capsys, "--images", "--vae ae.safetensors")
    _bad(_args(files, out, 2, "--vae", str(files["clip_l"]), vae=False), capsys, "not a VAE")
    # [schnell] as the teacher: refused with the reason
    schnell = _args(files, out, 2)
    schnell[schnell.index("--checkpoint") + 1] = str(files["schnell"])
    _bad(schnell, capsys, "FLUX.1 [schnell]", "already distilled", "not the data's score", "FLUX.1 [dev]")
    assert not out.exists()  # nothing written


def test_an_init_lora_of_the_other_family_is_refused_naming_both(files, finished, tiny_checkpoints, tmp_path, capsys, no_loading):
    sd_lora = tmp_path / "sd15_lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0)}, str(sd_lora))
    _bad(_args(files, tmp_path / "a", 2, "--init-lora", str(sd_lora)), capsys, "sd15_lora.safetensors", "SD1.5",
         "tiny_flux_dev.safetensors (Flux.1 [dev])", "a Flux.1 model")
    flux_lora = finished[2] / LORA
    argv = ["--checkpoint", str(tiny_checkpoints["sd15"]), "--prompts", str(files["prompts"]), "--output", str(tmp_path / "b"),
            "--steps", "2", "--init-lora", str(flux_lora)]
    _bad(argv, capsys, LORA, "Flux.1", "tiny_sd15.safetensors (SD1.5)", "an SD UNet")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_text_encoder_and_vae_flags_are_for_flux_only(files, tiny_checkpoints, tmp_path, capsys, no_loading):
    argv = ["--checkpoint", str(tiny_checkpoints["sd15"]), "--prompts", str(files["prompts"]), "--output", str(tmp_path / "o"),
            "--steps", "2", "--text-encoder", str(files["clip_l"])]
    _bad(argv, capsys, "--text-encoder is for Flux.1 models")


def test_flux_files_are_told_apart_from_their_headers(files):
    assert C.peek_checkpoint(files["diffusion_model"]) == ("unet", "flux_dev")
    assert C.peek_checkpoint(files["schnell"]) == ("unet", "flux_schnell")
    assert C.text_encoder_role(files["clip_l"]) == "clip_l" and C.text_encoder_role(files["t5xxl"]) == "t5xxl"
    assert C.text_encoder_role(files["vae"]) is None
    assert C.peek_family(files["diffusion_model"]).name == "flux_dev"
    assert C.classify_keys(load_file(str(files["vae"])))[0] == "vae"


def test_a_full_flux_checkpoint_loads_with_its_own_text_encoders(files, tmp_path):
    """A single-file Flux checkpoint (CheckpointSave's layout: the transformer, text_encoders.*, vae.*)."""
    path = tmp_path / "tiny_flux_full.safetensors"
    comfy.sd.save_checkpoint(str(path), tiny_models.build_flux(file_widths=True), tiny_models.build_clip("flux_dev"), tiny_models.build_vae(latent_channels=16))
    assert C.peek_checkpoint(path) == ("checkpoint", "flux_dev")
    assert C.check_text_encoders(path, "checkpoint", "flux_dev", ()) == {}  # it carries them
    loaded = C.load_checkpoint(path)
    assert loaded.family.name == "flux_dev" and loaded.vae.latent_channels == 16
    (cond,) = C.encode_prompts(loaded, ["a red cube"], RES)
    assert cond.context.shape[-1] == tiny_models.TINY_T5["d_model"] and cond.y.shape == (1, tiny_models.TINY_CLIP["hidden_size"])


# -- the DMD2 Train LoRA node on a Flux MODEL --------------------------------------------------------
@pytest.fixture
def flux_graph(files, tmp_path, monkeypatch):
    """(MODEL, CLIP, VAE) as UNETLoader, DualCLIPLoader (type flux) and VAELoader give them; ComfyUI's
    output and loras folders in tmp_path."""
    import folder_paths

    (tmp_path / "loras").mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path / "loras")], {".safetensors"}))
    model = comfy.sd.load_diffusion_model(str(files["diffusion_model"]))
    clip = comfy.sd.load_clip([str(files["clip_l"]), str(files["t5xxl"])], clip_type=comfy.sd.CLIPType.FLUX)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files["vae"])))
    return model, clip, vae


class _InterruptAt:
    """A progress bar that asks ComfyUI to interrupt once the run reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def update_absolute(self, value, total=None, preview=None):
        import comfy.model_management

        if value == self.step:
            comfy.model_management.interrupt_current_processing(True)


def _node(graph, name: str, steps: int = 4, preset: str = "4-step (999,749,499,249)", status=lambda text, toast=False: None, **kwargs):
    from comfyui_dmd2.nodes.training import train_lora

    return train_lora(*graph, "a red cube\na tree by the sea", name, preset, "", steps, 0, 4, 4.0, 1e-3, 1e-3, 0.0,
                      RES, 1, 1, 0, 0, 0, 2, status=status, **kwargs)


def test_the_train_nodes_1_step_preset_trains_a_flux_model_at_999(flux_graph, tmp_path):
    """The node's "1-step (399)" is SDXL's time; on a flow model one step starts from pure noise:
    trained at 999 (t = 1, what DMD2 Generate's flow 1-step preset samples), and it says so."""
    said = []
    _, name, _ = _node(flux_graph, "one", steps=1, preset="1-step (399)", status=lambda text, toast=False: said.append(text))
    with safe_open(str(tmp_path / "loras" / name), "pt") as fh:
        assert fh.metadata()["dmd2_timesteps"] == "999"
    assert any("trained at 999 (t = 1, pure noise)" in text for text in said)


def test_the_train_node_distils_a_flux_model_and_resumes_an_interrupted_run_bit_identically(flux_graph, tmp_path):
    import comfy.model_management

    patched, name, plot = _node(flux_graph, "straight")
    straight = load_file(str(tmp_path / "loras" / name))
    assert len(patched.patches) == 10 and plot.shape[-1] == 3
    with safe_open(str(tmp_path / "loras" / name), "pt") as fh:
        meta = fh.metadata()
    assert meta["dmd2_arch"] == "flux_dev" and float(meta["dmd2_embedded_guidance"]) == 3.5 and meta["dmd2_timesteps"] == "999,749,499,249"
    saved = json.loads(next((tmp_path / "output" / "dmd2_training" / "straight" / "checkpoints").glob("step_*/settings.json")).read_text())
    assert saved["sampling"] == "flow" and saved["real_guidance_scale"] == 1.0 and "single_blocks" not in json.dumps(saved)
    assert saved["lora_targets"] == list(bases.FLUX_NETWORK.resolve_targets(("dmd2",)))

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _node(flux_graph, "stopped", progress=_InterruptAt(2))
    assert not (tmp_path / "loras" / "stopped.safetensors").exists()
    assert (tmp_path / "output" / "dmd2_training" / "stopped" / "checkpoints" / "step_0000002").is_dir()
    _node(flux_graph, "stopped")  # the same graph queued again
    resumed = load_file(str(tmp_path / "loras" / "stopped.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_train_node_refuses_a_schnell_model_with_its_reason():
    from comfyui_dmd2.nodes.training import TrainingInputError, model_family

    assert model_family(tiny_models.build_flux()).name == "flux_dev"
    with pytest.raises(TrainingInputError) as info:
        model_family(tiny_models.build_flux(schnell=True))
    assert "already distilled" in str(info.value) and "\n" not in str(info.value)


def test_estimate_reads_a_flux_file_and_names_the_fp8_base(files, capsys, no_loading):
    """`dmd2-train --estimate` on a Flux diffusion-model file: no text encoder, no weight read,
    the run's own code on fake tensors; the banner names the family and the base's storage."""
    cli.main(["--checkpoint", str(files["diffusion_model"]), "--estimate", "--resolution", "128", "--base-dtype", "fp8"])
    out = capsys.readouterr().out
    assert "Flux.1 [dev] at 128 px" in out and "base weights float8_e4m3fn computed in bf16" in out
    assert "peak memory:" in out and "trained weights: G, F, GAN head (fp32)" in out


def test_estimate_with_a_24_gib_budget_holds_a_flux_base_in_fp8(files, capsys, no_loading):
    """--memory-budget 24 on a Flux file, --base-dtype left at auto: the estimate is for the fp8
    base the run would hold on such a card, and says why."""
    cli.main(["--checkpoint", str(files["diffusion_model"]), "--estimate", "--resolution", "128", "--memory-budget", "24"])
    out = capsys.readouterr().out
    assert "Flux.1 [dev] with a bfloat16 base needs about 30 GiB to train at 1024 px: on 24 GiB the base is held in fp8" in out
    assert "base weights float8_e4m3fn computed in" in out
