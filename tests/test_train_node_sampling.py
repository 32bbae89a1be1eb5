"""Which samplings DMD2TrainLoRA distils (issue #24): eps or v prediction, with or without
zero terminal SNR, from the checkpoint's keys or a stock ModelSamplingDiscrete node; every
other sampling is refused in one line naming what it found. In-process, on tiny models (the
server runs are in test_train_node.py)."""

from __future__ import annotations

import comfy.model_sampling as ms
import pytest
import tiny_models
import torch
from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM, ModelSamplingDiscrete

from comfyui_dmd2 import bases
from comfyui_dmd2.nodes.training import TrainingInputError, model_family, trained_release


@pytest.fixture(scope="module")
def sdxl():
    return tiny_models.build_model("sdxl")


def discrete(model, sampling: str, zsnr: bool):
    return ModelSamplingDiscrete().patch(model, sampling, zsnr)[0]


@pytest.mark.parametrize(("sampling", "zsnr", "label"),
                         [("eps", False, "eps"), ("v_prediction", False, "v"), ("v_prediction", True, "v + zsnr")])
def test_a_model_sampling_discrete_node_sets_the_family(sdxl, sampling, zsnr, label):
    family = model_family(discrete(sdxl, sampling, zsnr))
    assert (family.name, family.sampling_label) == ("sdxl", label)
    # The family carries the patched model's own table, but under zsnr a v model's last abar
    # is exactly 0 (x0 = -v), where ComfyUI keeps 4.9e-8 to keep its sigma finite.
    torch.testing.assert_close(family.process.alphas_cumprod[:-1],
                               bases.DiscreteVP.from_sigmas(discrete(sdxl, sampling, zsnr).get_model_object("model_sampling").sigmas).alphas_cumprod[:-1])
    last = float(family.process.alphas_cumprod[-1])
    assert last == 0.0 if zsnr else last == pytest.approx(0.0047, rel=1e-2)


def test_eps_with_zero_terminal_snr_is_refused_in_one_line(sdxl):
    with pytest.raises(TrainingInputError, match="eps prediction and zero terminal SNR") as info:
        model_family(discrete(sdxl, "eps", True))
    assert "\n" not in str(info.value)


def test_the_checkpoint_keys_set_the_family(tmp_path):
    import comfy.sd

    path = tiny_models.save_checkpoint("sdxl", tmp_path / "vpred.safetensors", v_pred=True, ztsnr=True)
    model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    family = model_family(model)
    assert family.sampling_label == "v + zsnr" and family.process.alphas_cumprod[-1] < 1e-7
    # ... and a ModelSamplingDiscrete node in front of it wins, as it does when ComfyUI samples.
    assert model_family(discrete(model, "eps", False)).sampling_label == "eps"


@pytest.mark.parametrize(("sampling", "found"), [("lcm", "ModelSamplingDiscreteDistilled"), ("x0", "x0 prediction")])
def test_other_discrete_samplings_are_refused_in_one_line(sdxl, sampling, found):
    with pytest.raises(TrainingInputError) as info:
        model_family(discrete(sdxl, sampling, False))
    message = str(info.value)
    assert found in message and "eps" in message and "\n" not in message


def test_continuous_and_custom_tables_are_refused(sdxl):
    edm = ModelSamplingContinuousEDM().patch(sdxl, "v_prediction", 120.0, 0.002)[0]
    with pytest.raises(TrainingInputError, match="ModelSamplingContinuousEDM.*not a discrete SD-style timestep table"):
        model_family(edm)

    class Custom(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    table = Custom(sdxl.model.model_config)
    table._register_schedule(beta_schedule="sqrt_linear", linear_start=1e-4, linear_end=2e-2)  # DDPM's own linear betas
    custom = sdxl.clone()
    custom.add_object_patch("model_sampling", table)
    with pytest.raises(TrainingInputError, match=r"sigma table \(Custom .*1000 steps.*is not SDXL's schedule"):
        model_family(custom)
    # The same schedule rescaled to zero terminal SNR by hand, without saying zsnr: refused too.
    table = Custom(sdxl.model.model_config)
    table.set_sigmas(bases.core.FAMILIES["sdxl"].with_sampling("v", True).process.sigmas.float())
    custom = sdxl.clone()
    custom.add_object_patch("model_sampling", table)
    with pytest.raises(TrainingInputError, match="is not SDXL's schedule"):
        model_family(custom)


def test_the_trained_release_carries_the_sampling(sdxl):
    release = trained_release("mine.safetensors", model_family(discrete(sdxl, "v_prediction", True)), (999, 749, 499, 249))
    assert (release.arch, release.prediction, release.zsnr, release.timesteps) == ("sdxl", "v", True, (999, 749, 499, 249))
    release = trained_release("mine.safetensors", model_family(sdxl), (399,))
    assert (release.prediction, release.zsnr) == ("eps", False)


@pytest.mark.parametrize(("config_class", "in_channels", "message"),
                         [("SD15_instructpix2pix", 8, "model family SD15_instructpix2pix is not supported yet"),
                          ("SD15", 9, "the MODEL's UNet has 9 input channels: inpainting and instruct models are not supported")])
def test_other_families_and_inpainting_unets_are_named(config_class, in_channels, message):
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_class)(dict(tiny_models.UNET_CONFIGS["sd15"], in_channels=in_channels))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_patcher.ModelPatcher(config.get_model({}), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(TrainingInputError) as info:
        model_family(model)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_an_sd2_v_model_is_distilled_at_768_by_default():
    family = model_family(tiny_models.build_model("sd2", v_pred=True))
    assert (family.name, family.sampling_label, bases.default_resolution(family)) == ("sd2", "v", 768)
