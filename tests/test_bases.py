"""The model-family interface (bases/) against independent oracles: ComfyUI's own sigma
tables and diffusers' schedulers and formulas (literal configs from the SD model cards'
scheduler_config.json: 1000 steps, scaled_linear, 0.00085..0.012)."""

from __future__ import annotations

import pytest
import torch

import comfy.model_sampling as ms
import tiny_models
from comfyui_dmd2 import bases

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _comfy_sampling(kind, zsnr: bool):
    class Sampling(ms.ModelSamplingDiscrete, kind):
        pass

    return Sampling(None, zsnr=zsnr)


@pytest.mark.parametrize("zsnr", [False, True])
def test_process_matches_comfy_and_diffusers_tables(zsnr):
    from diffusers import DDPMScheduler

    process = bases.get_family("sdxl", "v", zsnr).process
    comfy_table = bases.DiscreteVP.from_sigmas(_comfy_sampling(ms.V_PREDICTION, zsnr).sigmas)
    torch.testing.assert_close(process.alphas_cumprod[:-1], comfy_table.alphas_cumprod[:-1], rtol=2e-6, atol=0)
    reference = DDPMScheduler(**SD_SCHEDULER, rescale_betas_zero_snr=zsnr).alphas_cumprod.double()
    torch.testing.assert_close(process.alphas_cumprod, reference, rtol=2e-5, atol=1e-9)
    # Under ZTSNR a v family's last abar is diffusers' exact 0 (x0 = -v); ComfyUI keeps 4.897e-8
    # there (finite sigma), and so does an eps family, whose x0 has no limit at alpha = 0.
    assert process.alphas_cumprod[-1].item() == (0.0 if zsnr else pytest.approx(reference[-1].item(), rel=1e-5))
    eps_last = bases.get_family("sdxl", "eps", zsnr).process.alphas_cumprod[-1].item()
    assert eps_last == pytest.approx(comfy_table.alphas_cumprod[-1].item(), rel=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("zsnr", [False, True])
def test_x0_conversion_matches_diffusers_step(prediction, zsnr):
    """``to_x0`` is what diffusers' DDIMScheduler calls pred_original_sample, at every
    timestep including 999 under ZTSNR (finite for v; diffusers' own abar there is 0)."""
    from diffusers import DDIMScheduler

    pred_type = {"eps": "epsilon", "v": "v_prediction"}[prediction]
    scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type=pred_type, rescale_betas_zero_snr=zsnr,
                              timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(4)
    family = bases.get_family("sdxl", prediction, zsnr).with_process(bases.DiscreteVP(scheduler.alphas_cumprod))
    gen = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps.tolist():
        x_t, out = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
        if prediction == "eps" and zsnr and t == 999:
            continue  # x0 from eps at alpha = 0 is undefined: why DMD2 works in x0 (docs/training.md)
        expected = scheduler.step(out, t, x_t).pred_original_sample
        got = family.to_x0(x_t, out, torch.full((2,), t))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # diffusers holds abar in float32
        torch.testing.assert_close(family.from_x0(x_t, got, torch.full((2,), t)), out, rtol=1e-6, atol=1e-6)


def test_output_weight_turns_x0_error_into_output_error():
    gen = torch.Generator().manual_seed(1)
    for prediction in ("eps", "v"):
        family = bases.get_family("sd15", prediction)
        t = torch.tensor([10, 500, 990])
        x_t, x0, x0_pred = (torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
        out_err = family.from_x0(x_t, x0_pred, t) - family.from_x0(x_t, x0, t)
        torch.testing.assert_close(out_err.abs(), family.output_weight(t, x_t) * (x0_pred - x0).abs(), rtol=1e-9, atol=1e-12)


def test_family_of_reads_patched_sampling_and_refuses_other_processes():
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM, ModelSamplingDiscrete

    model = tiny_models.build_model("sdxl")
    assert bases.family_of(model).sampling_label == "eps"
    (patched,) = ModelSamplingDiscrete().patch(model, "v_prediction", True)
    family = bases.family_of(patched)
    assert (family.name, family.prediction, family.zsnr) == ("sdxl", "v", True)
    assert family.process.alphas_cumprod[-1].item() == 0.0  # x0 = -v; ComfyUI's table ends at 4.9e-8
    (lcm,) = ModelSamplingDiscrete().patch(model, "lcm", False)
    with pytest.raises(bases.FamilyError, match="ModelSamplingAdvanced"):
        bases.family_of(lcm)
    (edm,) = ModelSamplingContinuousEDM().patch(model, "v_prediction", 120.0, 0.002)
    with pytest.raises(bases.FamilyError, match="not a discrete"):
        bases.family_of(edm)
    assert bases.family_of(tiny_models.build_model("sd15")).name == "sd15"
