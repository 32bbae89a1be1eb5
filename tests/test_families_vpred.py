"""v-prediction and zero-terminal-SNR bases sampled exactly (#24): the tiny SD2.x architecture
read by ComfyUI as SD2 eps or v; the DMD2 and release presets on v and v + ZTSNR models
(checkpoint keys and the stock ModelSamplingDiscrete node alike) against diffusers with
prediction_type="v_prediction" and rescale_betas_zero_snr=True."""

import comfy.sd
import pytest
import tiny_models
import torch
from comfyui_dmd2 import bases
from test_families import CARDS, V_BASE, V_ZSNR_BASE, card_error
from test_sampler import diffusers_unet, relative_error


@pytest.mark.parametrize("v_pred", [False, True], ids=["eps", "v"])
def test_tiny_sd2_checkpoint_loads_as_sd2_eps_or_v(tmp_path, v_pred):
    """ComfyUI's own detection reads the file: SD2 by its layout and text encoder width, v by the
    norm bias test of supported_models.SD20; its UNet equals diffusers' on the same weights."""
    path = tiny_models.save_checkpoint("sd2", tmp_path / "sd2.safetensors", seed=3, v_pred=v_pred)
    model, clip, _vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    family = bases.family_of(model)
    assert (family.name, family.sampling_label) == ("sd2", "v" if v_pred else "eps")
    assert isinstance(model.model.model_config, tiny_models.TinySD2)
    built = tiny_models.build_model("sd2", 3, v_pred=v_pred)
    for key, value in tiny_models.unet_state_dict(built).items():
        assert torch.equal(model.model.diffusion_model.state_dict()[key], value), key
    cond = clip.encode_from_tokens(clip.tokenize("a photo"))
    assert cond.shape == (1, 77, tiny_models.UNET_CONFIGS["sd2"]["context_dim"])
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, cond.shape[-1], generator=gen)
    t = torch.tensor([500.0])
    with torch.no_grad():
        ours = model.model.diffusion_model(x, t, context=context)
        theirs = diffusers_unet("sd2", model)(x, t, encoder_hidden_states=context).sample
    assert relative_error(ours, theirs) < 1e-5


def test_tiny_architectures_are_told_apart(tmp_path):
    for arch in ("sd15", "sdxl"):
        path = tiny_models.save_checkpoint(arch, tmp_path / f"{arch}.safetensors")
        assert bases.family_of(comfy.sd.load_checkpoint_guess_config(str(path))[0]).name == arch
    with pytest.raises(ValueError, match="SD2"):
        tiny_models.save_checkpoint("sd2", tmp_path / "z.safetensors", ztsnr=True)


# -- sampling v and v + ZTSNR models against diffusers ---------------------------------------------
def _loaded(path):
    return comfy.sd.load_checkpoint_guess_config(str(path))[0]


def _node(model, zsnr):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    return ModelSamplingDiscrete().patch(model, "v_prediction", zsnr)[0]


@pytest.fixture(scope="module")
def v_models(tmp_path_factory):
    """(arch, how it is loaded) -> a v-prediction MODEL. Checkpoint keys: SDXL's v_pred/ztsnr
    markers, SD2's weights (ComfyUI has no ZTSNR marker for SD2: the node adds it); the stock
    ModelSamplingDiscrete node on an eps-loaded file."""
    folder = tmp_path_factory.mktemp("vpred")
    save = tiny_models.save_checkpoint
    return {
        ("sdxl", "keys v+zsnr"): _loaded(save("sdxl", folder / "xl_vz.safetensors", v_pred=True, ztsnr=True)),
        ("sdxl", "keys v"): _loaded(save("sdxl", folder / "xl_v.safetensors", v_pred=True)),
        ("sdxl", "node v+zsnr"): _node(_loaded(save("sdxl", folder / "xl.safetensors")), True),
        ("sd2", "weights v"): _loaded(save("sd2", folder / "sd2_v.safetensors", v_pred=True)),
        ("sd2", "weights v + node zsnr"): _node(_loaded(save("sd2", folder / "sd2_v2.safetensors", v_pred=True)), True),
        ("sd2", "node v+zsnr"): _node(_loaded(save("sd2", folder / "sd2.safetensors")), True),
    }


def test_v_models_read_as_their_family(v_models):
    labels = {key: (bases.family_of(m).name, bases.family_of(m).sampling_label) for key, m in v_models.items()}
    assert labels == {key: (key[0], "v + zsnr" if "zsnr" in key[1] else "v") for key in v_models}
    table = v_models[("sdxl", "keys v+zsnr")].get_model_object("model_sampling").sigmas
    assert float(table[-1]) == pytest.approx(4519, rel=1e-3)  # ComfyUI's finite terminal sigma


V_PRESETS = [name for name in CARDS if "x0" not in name]  # the Lightning x0 UNet is no v model
ALL_LOADINGS = [("sdxl", "keys v+zsnr"), ("sd2", "node v+zsnr")]
DMD2_LOADINGS = [("sdxl", "keys v"), ("sdxl", "node v+zsnr"), ("sd2", "weights v"), ("sd2", "weights v + node zsnr")]
CASES = [(key, name) for key in ALL_LOADINGS for name in V_PRESETS] + [
    (key, name) for key in DMD2_LOADINGS for name in ("4-step (999,749,499,249)", "1-step (399)")]


@pytest.mark.parametrize("key,name", CASES, ids=lambda v: "/".join(v) if isinstance(v, tuple) else v)
def test_v_and_zsnr_presets_match_the_card_scheduler(v_models, key, name):
    """Every preset on a v (+ ZTSNR) model equals its card's diffusers scheduler configured as the
    base's (prediction_type="v_prediction", rescale_betas_zero_snr=True): the terminal step at the
    card's abar (0: x0 = -v), where ComfyUI's table alone is off by up to 7e-3 (docs/families.md)."""
    arch, loading = key
    base = V_ZSNR_BASE if "zsnr" in loading else V_BASE
    error = card_error(v_models[key], arch, name, base=base)
    assert error < 1e-4, error


def test_zsnr_terminal_step_is_what_makes_the_one_step_presets_exact(v_models, monkeypatch):
    """Without the alpha = 0 terminal step (ComfyUI's sigma 4519 taken as is), the 1-step TCD
    preset is measurably off the card on a v + ZTSNR model: the fix is not a no-op."""
    from comfyui_dmd2.nodes import sampler as dmd2

    key, name = ("sdxl", "keys v+zsnr"), "Hyper-SD 1-step LoRA (tcd, gamma 1.0)"
    assert card_error(v_models[key], "sdxl", name, base=V_ZSNR_BASE) < 1e-4
    monkeypatch.setattr(dmd2, "zero_snr_terminal", lambda model_sampling, rule: None)
    assert card_error(v_models[key], "sdxl", name, base=V_ZSNR_BASE) > 1e-3


# -- notes: a LoRA of another sampling, a ZTSNR model started below 999 --------------------------
def _lora_with_sampling(tmp_path, name, sampling):
    import safetensors.torch
    import tiny_releases
    from comfyui_dmd2.nodes.families import SAMPLING_METADATA_KEY
    from comfyui_dmd2.nodes.releases import RELEASES_BY_NAME

    source = tiny_releases.write_release(RELEASES_BY_NAME["sdxl_lightning_4step_lora.safetensors"], tmp_path / "src")
    path = tmp_path / name
    safetensors.torch.save_file(safetensors.torch.load_file(str(source)), str(path),
                                metadata={SAMPLING_METADATA_KEY: sampling})
    return path


def _notes(model, preset="4-step (999,749,499,249)"):
    from comfyui_dmd2.nodes import sampler as dmd2
    from test_sampler import empty_latent, text_conditioning

    return dmd2.DMD2Generate.execute(model, text_conditioning("sdxl"), empty_latent(), 0, preset, "").ui["text"]


def test_lora_of_another_sampling_gets_a_note_naming_both(tmp_path, v_models):
    from comfyui_dmd2.nodes import loaders

    eps_model = tiny_models.build_model("sdxl")
    v_lora = _lora_with_sampling(tmp_path, "my_v_lora.safetensors", "v + zsnr")
    eps_lora = _lora_with_sampling(tmp_path, "my_eps_lora.safetensors", "eps")
    [note] = _notes(loaders.load_dmd2_lora(eps_model, v_lora, 1.0))
    assert "my_v_lora.safetensors" in note and "'v + zsnr' base" in note and "samples as 'eps'" in note
    v_model = v_models[("sdxl", "keys v+zsnr")]
    [note] = _notes(loaders.load_dmd2_lora(v_model, eps_lora, 1.0))
    assert "my_eps_lora.safetensors" in note and "'eps' base" in note and "samples as 'v + zsnr'" in note
    assert _notes(loaders.load_dmd2_lora(v_model, v_lora, 1.0)) == []
    assert _notes(loaders.load_dmd2_lora(eps_model, eps_lora, 1.0)) == []


def test_zsnr_model_with_a_preset_below_999_runs_with_a_note(v_models):
    model = v_models[("sdxl", "keys v+zsnr")]
    [note] = _notes(model, "1-step (399)")
    assert "zero terminal SNR" in note and "399" in note and "999" in note
    assert _notes(model) == []
    assert _notes(v_models[("sdxl", "keys v")], "1-step (399)") == []  # v without ZTSNR: nothing to say
