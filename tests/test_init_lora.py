"""``--init-lora`` / the node's ``init_lora``: the generator starts from an existing few-step LoRA
(the released DMD2 LoRA on a finetune). The file's update comes out unchanged when nothing is
learned, the moving average and a resume keep it, other layouts (diffusers, PEFT) read as
ComfyUI reads them, and a file that does not fit is refused in one line before any weight loads."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import tiny_releases
import torch
from comfyui_dmd2.training import cli
from comfyui_dmd2.training.lora import LoRAError, read_init_lora
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FAST = ["--resolution", "128", "--grad-accum", "1", "--set", "warmup_steps=0", "--set", "fake_updates_per_generator_update=2",
        "--sample-every", "0", "--quiet"]
FROZEN = ["--set", "lr_generator=0", "--set", "lr_fake_score=0"]  # nothing learned: the file must come out as it went in


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("init_inputs") / "prompts.txt"
    path.write_text("a red cube\na tree by the sea\n")
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins for the DMD2 4-step LoRA (kohya keys, rank 4, alpha 8, fp16) per arch."""
    folder = tmp_path_factory.mktemp("init_releases")
    return {arch: _write(folder / f"release_{arch}.safetensors", tiny_releases.lora_state_dict(tiny_releases.diffusers_unet(arch, 0), seed=7))
            for arch in ("sd15", "sdxl")}


def _write(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


def _args(ckpt, prompts, output, steps, *extra):
    return ["--checkpoint", str(ckpt), "--prompts", str(prompts), "--output", str(output), "--steps", str(steps), *FAST, *extra]


def _lora(output: Path, arch: str = "sdxl") -> dict[str, torch.Tensor]:
    return load_file(str(output / f"dmd2_tiny_{arch}_lora.safetensors"))


def _bad(argv, capsys, expected: str) -> str:
    """The command exits 2 with one ``dmd2-train: error:`` line holding ``expected``."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dmd2-train: error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err
    return errors[0]


def test_frozen_run_exports_the_init_lora_unchanged(tiny_checkpoints, prompts, release, tmp_path, caplog):
    """Learning rates 0: the exported file is the init LoRA's update, key for key, bit for bit
    (fp16 in, fp16 out); the file's rank 4 and alpha 8 are taken over the run's rank 8, and the
    run says so."""
    caplog.set_level("INFO", logger="dmd2-train")
    trainer, backend, out = cli.train(_args(tiny_checkpoints["sdxl"], prompts, tmp_path / "out", 2, "--lora-rank", "8",
                                            "--init-lora", str(release["sdxl"]), *FROZEN))
    assert "has rank 4, alpha 8: the run takes them (lora_rank 8" in caplog.text
    init, exported = load_file(str(release["sdxl"])), _lora(out)
    assert exported.keys() == init.keys()
    for key in init:
        assert exported[key].dtype == torch.float16
        torch.testing.assert_close(exported[key], init[key], rtol=0, atol=0, msg=key)
    assert trainer.generator_ema is not None and backend.adapters.ranks == {"generator": 4, "fake_score": 4}
    # The fake score starts from the base by default: its up factors are zero.
    assert all(float(layer.adapters["fake_score"].up.weight.detach().abs().max()) == 0 for layer in backend.adapters.layers.values())
    with safe_open(str(out / "dmd2_tiny_sdxl_lora.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["dmd2_init_lora"].startswith("release_sdxl.safetensors (sha256 ") and meta["ss_network_dim"] == "4"


def test_trained_run_exports_the_whole_adapter_and_resumes_with_its_init(tiny_checkpoints, prompts, release, tmp_path, capsys):
    """With learning, the export is init + learned (alone, not a difference to add to the file):
    close to the init, not equal; a run stopped at 2 and resumed to 4 ends where an uninterrupted
    one does; a resume without the init, or with another file, is refused naming init_lora."""
    def args(output, steps, *extra):
        return _args(tiny_checkpoints["sdxl"], prompts, output, steps, "--lora-rank", "4", "--save-every", "2",
                     "--set", "lr_generator=1e-3", *extra)

    init = load_file(str(release["sdxl"]))
    cli.train(args(tmp_path / "whole", 4, "--init-lora", str(release["sdxl"])))
    exported = _lora(tmp_path / "whole")
    ups = [k for k in init if k.endswith("lora_up.weight")]
    change = max(float((exported[k].float() - init[k].float()).abs().max()) for k in ups)
    size = max(float(init[k].float().abs().max()) for k in ups)
    assert 0 < change < 0.5 * size, (change, size)
    cli.train(args(tmp_path / "resumed", 2, "--init-lora", str(release["sdxl"])))
    trainer, _, _ = cli.train(args(tmp_path / "resumed", 4, "--init-lora", str(release["sdxl"])))
    assert trainer.step_count == 4
    ref = load_file(str(tmp_path / "whole" / "checkpoints" / "step_0000004" / "tensors.safetensors"))
    now = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_0000004" / "tensors.safetensors"))
    assert set(ref) == set(now) and all(torch.equal(ref[k], now[k]) for k in ref)
    _bad(args(tmp_path / "resumed", 6), capsys, "init_lora is None now but the saved run used {'file': 'release_sdxl.safetensors', 'sha256'")
    other = _write(tmp_path / "other.safetensors", tiny_releases.lora_state_dict(tiny_releases.diffusers_unet("sdxl", 0), seed=8))
    _bad(args(tmp_path / "resumed", 6, "--init-lora", str(other)), capsys, "init_lora is {'file': 'other.safetensors', 'sha256'")


def test_fake_score_can_start_from_the_init_lora(tiny_checkpoints, prompts, release, tmp_path, capsys):
    """``--init-fake-score``: LoRA F holds the file's factors; a full fake score holds the base
    weights plus the file's update; a LoRA F of another rank is refused by name."""
    _, backend, _ = cli.train(_args(tiny_checkpoints["sdxl"], prompts, tmp_path / "lora_f", 2, "--init-lora", str(release["sdxl"]),
                                    "--init-fake-score", *FROZEN))
    for layer in backend.adapters.layers.values():
        torch.testing.assert_close(layer.adapters["fake_score"].up.weight, layer.adapters["generator"].up.weight, rtol=0, atol=0)
        assert float(layer.adapters["fake_score"].up.weight.detach().abs().max()) > 0
    _, backend, _ = cli.train(_args(tiny_checkpoints["sdxl"], prompts, tmp_path / "full_f", 2, "--init-lora", str(release["sdxl"]),
                                    "--init-fake-score", "--fake-score", "full", *FROZEN))
    init = load_file(str(release["sdxl"]))
    d_path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    key = "lora_unet_" + d_path.replace(".", "_")
    layer = backend.adapters.layers[d_path]
    expected = layer.base.weight + (init[f"{key}.lora_up.weight"].float() @ init[f"{key}.lora_down.weight"].float()) * (8 / 4)
    copy_weight = backend.copies["fake_score"].get_submodule(backend.adapters.paths[d_path]).weight
    torch.testing.assert_close(copy_weight, expected, rtol=1e-5, atol=1e-6)
    _bad(_args(tiny_checkpoints["sdxl"], prompts, tmp_path / "bad", 2, "--init-lora", str(release["sdxl"]), "--init-fake-score",
               "--fake-score-rank", "16"), capsys, "init_fake_score: the fake score LoRA has rank 16, init LoRA release_sdxl.safetensors rank 4")
    _bad(_args(tiny_checkpoints["sdxl"], prompts, tmp_path / "bad", 2, "--init-fake-score"), capsys, "give --init-lora too")
    assert not (tmp_path / "bad").exists()


def _relayout(kohya: dict[str, torch.Tensor], unet, down: str, up: str, processor: bool) -> dict[str, torch.Tensor]:
    """The same LoRA under diffusers-style keys: ``unet.<module path>.<down|up>``, attention
    projections as ``attnN.processor.to_q`` (``to_out.0`` as ``to_out``) where ``processor``."""
    names = {}
    for name, _ in tiny_releases.lora_modules(unet):
        path = name
        if processor and ".attn" in name:
            path = name.replace(".to_", ".processor.to_").removesuffix(".0")
        names["lora_unet_" + name.replace(".", "_")] = path
    out = {}
    for key, value in kohya.items():
        module, _, part = key.partition(".")
        out[f"unet.{names[module]}.{ {'lora_down.weight': down, 'lora_up.weight': up, 'alpha': 'alpha'}[part] }"] = value
    return out


@pytest.mark.parametrize(("down", "up"), [("lora.down.weight", "lora.up.weight"), ("lora_A.weight", "lora_B.weight")],
                         ids=["diffusers", "diffusers-peft"])
def test_diffusers_layouts_start_the_same_generator(tiny_checkpoints, prompts, release, tmp_path, capsys, down, up):
    """The diffusers layouts ComfyUI reads (``unet.…processor.to_q.lora.down`` / ``lora_A``) give the
    generator the same factors as the kohya file, and the export is in kohya keys. The same PEFT
    keys without ``processor`` lose every attention layer in ComfyUI: refused, not half-loaded."""
    unet = tiny_releases.diffusers_unet("sdxl", 0)
    kohya = load_file(str(release["sdxl"]))
    layout = _write(tmp_path / "layout.safetensors", _relayout(kohya, unet, down, up, processor=True))
    cli.train(_args(tiny_checkpoints["sdxl"], prompts, tmp_path / "kohya", 2, "--init-lora", str(release["sdxl"]), *FROZEN))
    cli.train(_args(tiny_checkpoints["sdxl"], prompts, tmp_path / "layout", 2, "--init-lora", str(layout), *FROZEN))
    a, b = _lora(tmp_path / "kohya"), _lora(tmp_path / "layout")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    unread = _write(tmp_path / "peft.safetensors", _relayout(kohya, unet, down, up, processor=False))
    _bad(_args(tiny_checkpoints["sdxl"], prompts, tmp_path / "peft", 2, "--init-lora", str(unread)), capsys,
         "keys match no weight of the connected model")
    assert not (tmp_path / "peft").exists()


def test_a_subset_of_layers_starts_there_and_the_rest_at_zero(tiny_checkpoints, prompts, release, tmp_path):
    init = load_file(str(release["sdxl"]))
    attention = {k: v for k, v in init.items() if "_attn" in k}
    part = _write(tmp_path / "attn_only.safetensors", attention)
    cli.train(_args(tiny_checkpoints["sdxl"], prompts, tmp_path / "out", 2, "--init-lora", str(part), *FROZEN))
    exported = _lora(tmp_path / "out")
    assert attention.keys() < exported.keys()
    assert all(torch.equal(exported[k], attention[k]) for k in attention)
    rest = [k for k in exported if k.endswith("lora_up.weight") and k not in attention]
    assert rest and all(float(exported[k].abs().max()) == 0 for k in rest)


def test_files_that_do_not_fit_are_refused_before_the_model_loads(tiny_checkpoints, prompts, release, tmp_path, capsys, no_loading):
    """Another architecture (named both ways), a checkpoint, a VAE, a pickle with objects, a
    LoHa, mixed ranks or alphas: one line each, before any weight loads, nothing written."""
    out = tmp_path / "out"

    def refused(init: Path, expected: str, ckpt: str = "sdxl") -> str:
        return _bad(_args(tiny_checkpoints[ckpt], prompts, out, 2, "--init-lora", str(init)), capsys, expected)

    err = refused(release["sd15"], "init LoRA release_sd15.safetensors was made for cross-attention dim 32, but tiny_sdxl.safetensors (SDXL)")
    assert "cross-attention dim 64" in err
    refused(release["sdxl"], "but tiny_sd15.safetensors (SD1.5) is cross-attention dim 32", ckpt="sd15")
    refused(tiny_checkpoints["sd15"], "is a full checkpoint, not a LoRA: --init-lora takes a few-step LoRA file")
    vae = _write(tmp_path / "vae.safetensors", {"encoder.down.0.block.0.conv1.weight": torch.zeros(1), "decoder.up.0.block.0.conv1.weight": torch.zeros(1)})
    refused(vae, "is a VAE, not a LoRA")
    pickled = tmp_path / "lora.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "extra": LoRAError("an object")}, pickled)
    refused(pickled, "is a pickle that holds more than tensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    refused(garbage, "cannot read init LoRA")
    refused(tmp_path / "missing.safetensors", "init LoRA not found")
    init = load_file(str(release["sdxl"]))
    loha = _write(tmp_path / "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), **init})
    refused(loha, "is not a plain LoRA (lora_unet_x.hada_w1_a")
    mixed = dict(init)
    key = next(k for k in mixed if k.endswith("to_q.lora_down.weight"))
    mixed[key] = torch.zeros(8, mixed[key].shape[1], dtype=torch.float16)
    refused(_write(tmp_path / "ranks.safetensors", mixed), "has layers of ranks [4, 8]: the generator adapter has one rank")
    alphas = dict(init)
    alphas[next(k for k in alphas if k.endswith(".alpha"))] = torch.tensor(16.0, dtype=torch.float16)
    refused(_write(tmp_path / "alphas.safetensors", alphas), "has layers with alphas [8.0, 16.0]")
    assert not out.exists()


def test_layers_outside_the_targets_and_unread_keys_are_refused(tiny_checkpoints, prompts, release, tmp_path, capsys):
    """A file adapting the input convolution on a dmd2-targets run is refused naming the layer
    and the setting that includes it; a key ComfyUI would skip is refused; nothing is left."""
    init = load_file(str(release["sdxl"]))
    conv_in = {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3, dtype=torch.float16),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1, dtype=torch.float16),
               "lora_unet_conv_in.alpha": torch.tensor(8.0, dtype=torch.float16)}
    wider = _write(tmp_path / "wider.safetensors", init | conv_in)
    out = tmp_path / "out"
    _bad(_args(tiny_checkpoints["sdxl"], prompts, out, 2, "--init-lora", str(wider)), capsys,
         "adapts 1 layers that lora_targets dmd2 leaves out, e.g. conv_in (run with lora_targets all)")
    assert not out.exists()
    cli.train(_args(tiny_checkpoints["sdxl"], prompts, out, 2, "--init-lora", str(wider), "--lora-targets", "all", *FROZEN))
    assert set(conv_in) <= set(_lora(out))
    stray = _write(tmp_path / "stray.safetensors", init | {"lora_unet_not_a_layer.lora_down.weight": torch.zeros(4, 8, dtype=torch.float16),
                                                            "lora_unet_not_a_layer.lora_up.weight": torch.zeros(8, 4, dtype=torch.float16),
                                                            "lora_unet_not_a_layer.alpha": torch.tensor(8.0, dtype=torch.float16)})
    _bad(_args(tiny_checkpoints["sdxl"], prompts, tmp_path / "out2", 2, "--init-lora", str(stray)), capsys,
         "keys match no weight of the connected model")
    assert not (tmp_path / "out2").exists()


def test_read_init_lora_reports_rank_alpha_and_width(release, tmp_path):
    init = read_init_lora(release["sdxl"])
    assert (init.rank, init.alpha, init.context_dim()) == (4, 8.0, 64)
    assert len(init.sha256) == 64
    diffusers = _write(tmp_path / "diffusers.safetensors", _relayout(load_file(str(release["sd15"])), tiny_releases.diffusers_unet("sd15", 0),
                                                                    "lora.down.weight", "lora.up.weight", processor=True))
    assert read_init_lora(diffusers).context_dim() == 32  # attn2.processor.to_k: SD1.5's width, checked before loading


# --- the node -----------------------------------------------------------------------------

@pytest.mark.server
@pytest.mark.slow
def test_node_init_lora_equals_the_command_and_resume_keeps_it(workflow_files, tiny_checkpoints, tmp_path):
    """``init_lora`` on DMD2 Train LoRA (a name in models/loras: the tiny DMD2 4-step LoRA the
    workflows use) gives the command's LoRA for the same file; re-queued with another init LoRA
    the run is refused naming init_lora; an init LoRA made for SD1.5 is refused on the SDXL
    MODEL, naming both, as an execution error with the server up."""
    from test_train_node import (
        CLI_FLAGS,
        PROMPTS,
        assert_same_lora,
        lora_file,
        submit,
        training_graph,
    )

    from comfy_server import execution_error

    server = workflow_files
    name = "dmd2_sdxl_4step_lora_fp16.safetensors"
    entry = server.wait(submit(server, training_graph("node_init", init_lora=name, preview_every=0)))
    assert execution_error(entry) is None, execution_error(entry)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS + "\n")
    cli.train(["--checkpoint", str(tiny_checkpoints["sdxl"]), "--prompts", str(prompts), "--output", str(tmp_path / "out"),
               "--init-lora", str(server.base / "models" / "loras" / name), *CLI_FLAGS])
    assert_same_lora(lora_file(server, "node_init"), tmp_path / "out" / "dmd2_tiny_sdxl_lora.safetensors")
    settings = json.loads(next((server.base / "output" / "dmd2_training" / "node_init" / "checkpoints").glob("step_*/settings.json")).read_text())
    assert settings["init_lora"]["sha256"] == read_init_lora(server.base / "models" / "loras" / name).sha256

    tiny_releases.write_lora_release(server.base / "models" / "loras" / "other_init.safetensors", "sdxl", seed=11)
    tiny_releases.write_lora_release(server.base / "models" / "loras" / "sd15_init.safetensors", "sd15", seed=11)
    refusals = (("node_init", "other_init.safetensors", ("a run named 'node_init' exists", "with init_lora file dmd2_sdxl_4step_lora_fp16.safetensors",
                                                          "this graph has init_lora file other_init.safetensors")),
                ("node_init_sd15", "sd15_init.safetensors", ("was made for cross-attention dim 32, but the MODEL (SDXL)",)))
    for lora_name, init, messages in refusals:
        status, body = server.post("/prompt", {"prompt": training_graph(lora_name, init_lora=init, steps=8), "client_id": uuid.uuid4().hex})
        assert status == 200, body
        error = execution_error(server.wait(body["prompt_id"]))
        assert error is not None and all(m in error["exception_message"] for m in messages), error
    assert not lora_file(server, "node_init_sd15").exists()
    assert "system" in server.get("/system_stats")  # the server is still up
