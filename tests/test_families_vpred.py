"""v-prediction and zero-terminal-SNR bases sampled exactly (#24): the tiny SD2.x architecture
read by ComfyUI as SD2 eps or v; the DMD2 and release presets on v and v + ZTSNR models
(checkpoint keys and the stock ModelSamplingDiscrete node alike) against diffusers with
prediction_type="v_prediction" and rescale_betas_zero_snr=True."""

import comfy.sd
import pytest
import tiny_models
import torch
from comfyui_dmd2 import bases
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
