"""Every few-step release family sampled exactly: each preset's timesteps against the
scheduler of the release's model card, and the whole sampling against diffusers on the same
tiny SD1.5/SDXL weights and noise (SDXL-Lightning: EulerDiscrete trailing, x0 for its 1-step
UNet; Hyper-SD: DDIM trailing, TCD for the 1-step LoRA, LCM at 800 for the 1-step UNet;
LCM-LoRA: LCMScheduler; TCD: TCDScheduler with eta 0.3; SDXL-Turbo: EulerAncestral trailing).
Also: one UNet evaluation per step, the loaders' release tags, and the warnings."""

import contextlib
import dataclasses
import sys
from unittest import mock

import diffusers
import pytest
import torch

import comfy.model_sampling
import comfy.sample
import tiny_models
import tiny_releases
from comfy_extras.nodes_custom_sampler import SamplerCustom
from comfyui_dmd2.nodes import loaders
from comfyui_dmd2.nodes import sampler as dmd2
from comfyui_dmd2.nodes import schedules
from comfyui_dmd2.nodes.families import (
    RECIPES,
    RECIPES_BY_NAME,
    lcm_timesteps,
    sampling_notes,
    trailing_timesteps,
)
from comfyui_dmd2.nodes.releases import RELEASES, RELEASES_BY_NAME, model_releases
from comfyui_dmd2.nodes.schedules import DMD2Schedule
from test_sampler import (
    counting_unet,
    diffusers_conditioning,
    diffusers_unet,
    empty_latent,
    model_space,
    relative_error,
    text_conditioning,
)

# The SD1.5 / SDXL scheduler configs (both repos): scaled_linear 0.00085..0.012 over 1000 steps;
# from_config keeps what a scheduler knows of it, as the cards' from_config(pipe.scheduler.config) does.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)


@dataclasses.dataclass(frozen=True)
class Card:
    """What a release's model card runs in diffusers, copied from the card (never from the
    pack's RECIPES): scheduler class, from_config overrides, set_timesteps arguments, step kwargs."""

    scheduler: str
    overrides: dict
    set_timesteps: dict
    step: dict
    timesteps: tuple  # what that scheduler visits (diffusers computes it; written out to be read)


_TRAILING = {"timestep_spacing": "trailing"}
CARDS = {
    # https://huggingface.co/tianweiy/DMD2 : "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)",
    # pipe(..., num_inference_steps=4, guidance_scale=0, timesteps=[999, 749, 499, 249]); the 1-step UNet: timesteps=[399].
    "4-step (999,749,499,249)": Card("LCMScheduler", {}, {"timesteps": [999, 749, 499, 249]}, {}, (999, 749, 499, 249)),
    "1-step (399)": Card("LCMScheduler", {}, {"timesteps": [399]}, {}, (399,)),
    # https://huggingface.co/ByteDance/SDXL-Lightning : "Ensure sampler uses \"trailing\" timesteps":
    # EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing"), guidance_scale=0,
    # num_inference_steps = the checkpoint's step count; the 1-step UNet adds prediction_type="sample".
    "SDXL-Lightning 1-step x0 (euler, 999)": Card("EulerDiscreteScheduler", {**_TRAILING, "prediction_type": "sample"},
                                                  {"num_inference_steps": 1}, {}, (999,)),
    "SDXL-Lightning 2-step (euler, trailing)": Card("EulerDiscreteScheduler", _TRAILING, {"num_inference_steps": 2}, {},
                                                    (999, 499)),
    "SDXL-Lightning 4-step (euler, trailing)": Card("EulerDiscreteScheduler", _TRAILING, {"num_inference_steps": 4}, {},
                                                    (999, 749, 499, 249)),
    "SDXL-Lightning 8-step (euler, trailing)": Card("EulerDiscreteScheduler", _TRAILING, {"num_inference_steps": 8}, {},
                                                    (999, 874, 749, 624, 499, 374, 249, 124)),
    # https://huggingface.co/ByteDance/Hyper-SD : Hyper-SDXL-1step-Unet: "LCMScheduler.from_config(pipe.scheduler.config)",
    # "Set start timesteps to 800 in the one-step inference", pipe(..., num_inference_steps=1, guidance_scale=0, timesteps=[800]);
    # the 1-step unified LoRA: TCDScheduler, num_inference_steps=1, guidance_scale=0, eta=1.0;
    # the N-step LoRAs: DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing"), guidance_scale=0.
    "Hyper-SD 1-step UNet (lcm, 800)": Card("LCMScheduler", {}, {"timesteps": [800]}, {}, (800,)),
    "Hyper-SD 1-step LoRA (tcd, gamma 1.0)": Card("TCDScheduler", {}, {"num_inference_steps": 1}, {"eta": 1.0}, (999,)),
    "Hyper-SD 2-step LoRA (ddim, trailing)": Card("DDIMScheduler", _TRAILING, {"num_inference_steps": 2}, {"eta": 0.0},
                                                  (999, 499)),
    "Hyper-SD 4-step LoRA (ddim, trailing)": Card("DDIMScheduler", _TRAILING, {"num_inference_steps": 4}, {"eta": 0.0},
                                                  (999, 749, 499, 249)),
    "Hyper-SD 8-step LoRA (ddim, trailing)": Card("DDIMScheduler", _TRAILING, {"num_inference_steps": 8}, {"eta": 0.0},
                                                  (999, 874, 749, 624, 499, 374, 249, 124)),
    # https://huggingface.co/latent-consistency/lcm-lora-sdxl : "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)",
    # num_inference_steps=4 in the examples ("2 - 8 steps"), guidance_scale 0 or 1 (no CFG pass).
    "LCM 2-step (lcm, 999,499)": Card("LCMScheduler", {}, {"num_inference_steps": 2}, {}, (999, 499)),
    "LCM 4-step (lcm, 999,759,499,259)": Card("LCMScheduler", {}, {"num_inference_steps": 4}, {}, (999, 759, 499, 259)),
    "LCM 8-step (lcm, 999,879,759,639,499,379,259,139)": Card("LCMScheduler", {}, {"num_inference_steps": 8}, {},
                                                              (999, 879, 759, 639, 499, 379, 259, 139)),
    # https://huggingface.co/h1t/TCD-SDXL-LoRA : "pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)",
    # pipe(..., num_inference_steps=4, guidance_scale=0, eta=0.3) ("eta ... referred to as `gamma` in the paper ... 0.3
    # often yields good results").
    "TCD 2-step (tcd, gamma 0.3)": Card("TCDScheduler", {}, {"num_inference_steps": 2}, {"eta": 0.3}, (999, 499)),
    "TCD 4-step (tcd, gamma 0.3)": Card("TCDScheduler", {}, {"num_inference_steps": 4}, {"eta": 0.3}, (999, 759, 499, 259)),
    "TCD 8-step (tcd, gamma 0.3)": Card("TCDScheduler", {}, {"num_inference_steps": 8}, {"eta": 0.3},
                                        (999, 879, 759, 639, 499, 379, 259, 139)),
    # https://huggingface.co/stabilityai/sdxl-turbo : AutoPipelineForText2Image, num_inference_steps=1, guidance_scale=0.0,
    # with the repo's scheduler/scheduler_config.json: EulerAncestralDiscreteScheduler, timestep_spacing "trailing".
    "SDXL-Turbo 1-step (euler ancestral, 999)": Card("EulerAncestralDiscreteScheduler", _TRAILING,
                                                     {"num_inference_steps": 1}, {}, (999,)),
    "SDXL-Turbo 2-step (euler ancestral, trailing)": Card("EulerAncestralDiscreteScheduler", _TRAILING,
                                                          {"num_inference_steps": 2}, {}, (999, 499)),
    "SDXL-Turbo 4-step (euler ancestral, trailing)": Card("EulerAncestralDiscreteScheduler", _TRAILING,
                                                          {"num_inference_steps": 4}, {}, (999, 749, 499, 249)),
}
# A v-prediction base's own scheduler config (e.g. https://huggingface.co/Laxhar/noobai-XL-Vpred-1.0 :
# prediction_type="v_prediction", rescale_betas_zero_snr=True), applied under every card's scheduler.
V_BASE = {"prediction_type": "v_prediction"}
V_ZSNR_BASE = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
FAMILY_RECIPES = [r for r in RECIPES if r.family != "dmd2"]  # DMD2's own parity: tests/test_sampler.py


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_models.build_model(arch) for arch in ("sd15", "sdxl")}


def card_scheduler(name, base=None):
    """The card's diffusers scheduler for preset ``name`` (on ``base``'s scheduler config) and its step kwargs."""
    card = CARDS[name]
    config = {**SD_SCHEDULER, **(base or {})}
    scheduler = getattr(diffusers, card.scheduler).from_config(config, **card.overrides)
    scheduler.set_timesteps(**card.set_timesteps)
    return scheduler, dict(card.step)


@torch.no_grad()
def diffusers_reference(arch, unet, conditioning, start_noise, name, renoise_generator, base=None):
    """The model card's diffusers loop (as the SD/SDXL pipelines run it at guidance 0). The Euler
    schedulers' arithmetic is float64 (the UNet output and the sigmas cast up; their noise still
    drawn in float32): in float32 their first step from sigma 4096 (zero terminal SNR) loses ~5e-4
    to cancellation in x + (x0 - x), ~6e-3 of a tiny model's output, and the ancestral split
    sigma_down = sqrt(sigma_to^2 - sigma_up^2) keeps only a few bits (1.2e-4 of the output
    after SDXL-Turbo's 2 steps)."""
    scheduler, step_kwargs = card_scheduler(name, base)
    euler = "Euler" in CARDS[name].scheduler
    if euler:  # its sigma arithmetic too: the ancestral split from 4096 cancels to ~1e-7 of sigma^2
        scheduler.sigmas = scheduler.sigmas.double()
    context, added = diffusers_conditioning(arch, conditioning, start_noise.shape[-1])
    latents = start_noise.double() * scheduler.init_noise_sigma if euler else start_noise * scheduler.init_noise_sigma
    module = sys.modules[type(scheduler).__module__]
    draw = module.randn_tensor if hasattr(module, "randn_tensor") else None

    def float32_draw(shape, **kwargs):
        dtype = kwargs.pop("dtype", None)
        return draw(shape, **kwargs, dtype=torch.float32).to(dtype)

    with mock.patch.object(module, "randn_tensor", float32_draw) if euler and draw else contextlib.nullcontext():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(latents, t).float(), t, encoder_hidden_states=context,
                       added_cond_kwargs=added).sample
            latents = scheduler.step(out.double() if euler else out, t, latents, generator=renoise_generator,
                                     return_dict=False, **step_kwargs)[0]
    return latents.float()


def test_every_preset_has_a_card():
    assert set(CARDS) == {r.name for r in RECIPES}


@pytest.mark.parametrize("name", list(CARDS))
def test_preset_timesteps_are_the_card_schedulers(name):
    scheduler, _ = card_scheduler(name)
    assert tuple(int(t) for t in scheduler.timesteps) == CARDS[name].timesteps == RECIPES_BY_NAME[name].timesteps


def test_timestep_rules():
    assert trailing_timesteps(4) == (999, 749, 499, 249) and trailing_timesteps(1) == (999,)
    assert trailing_timesteps(8) == (999, 874, 749, 624, 499, 374, 249, 124)
    assert lcm_timesteps(4) == (999, 759, 499, 259) and lcm_timesteps(2) == (999, 499)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            trailing_timesteps(bad)
    with pytest.raises(ValueError):
        lcm_timesteps(51)


def card_error(model, arch, name, seed=2024, base=None):
    """Relative L2 distance of DMD2Generate with preset ``name`` to the card's diffusers loop on
    the same weights, start noise and re-noise draws."""
    conditioning = text_conditioning(arch)
    latent = empty_latent()
    out = dmd2.DMD2Generate.execute(model, conditioning, latent, seed, name, "").result[0]["samples"]
    start_noise = comfy.sample.prepare_noise(latent["samples"], seed)
    renoise = torch.Generator().manual_seed(dmd2.renoise_seed(seed))
    expected = diffusers_reference(arch, diffusers_unet(arch, model), conditioning, start_noise, name, renoise, base)
    return relative_error(model_space(model, out), expected)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("recipe", FAMILY_RECIPES, ids=lambda r: r.name)
def test_generate_matches_the_card_scheduler_in_diffusers(models, arch, recipe):
    """Same weights (the model read as x0 for Lightning's 1-step UNet), same start noise, same
    re-noise draws: DMD2Generate with the family's preset equals the card's diffusers loop."""
    error = card_error(models[arch], arch, recipe.name)
    assert error < 1e-4, error


@pytest.mark.parametrize("name,change", [
    ("TCD 4-step (tcd, gamma 0.3)", {"gamma": 0.35}),
    ("Hyper-SD 1-step UNet (lcm, 800)", {"timesteps": (799,)}),
    ("SDXL-Turbo 2-step (euler ancestral, trailing)", {"rule": "euler"}),
    ("Hyper-SD 4-step LoRA (ddim, trailing)", {"gamma": 0.3}),
], ids=lambda v: str(v))
def test_a_wrong_constant_in_the_packs_table_fails_the_card_comparison(models, monkeypatch, name, change):
    """The references are the cards' literal constants: a recipe changed in the pack's table
    (the mistakes once seen: TCD gamma 0.35, the Hyper-SD UNet at 799, Turbo on plain Euler) is
    caught, where a reference built from the table would have followed it. (A one-timestep shift,
    499 -> 500, moves the tiny models' output by ~1e-6 only: the literal timesteps of
    test_preset_timesteps_are_the_card_schedulers catch that.)"""
    assert card_error(models["sdxl"], "sdxl", name) < 1e-4
    wrong = dataclasses.replace(RECIPES_BY_NAME[name], **change)
    monkeypatch.setitem(RECIPES_BY_NAME, name, wrong)
    monkeypatch.setitem(schedules.PRESETS, name, wrong.timesteps)
    assert card_error(models["sdxl"], "sdxl", name) > 1e-3


@pytest.mark.parametrize("recipe", [RECIPES_BY_NAME[n] for n in (
    "SDXL-Lightning 4-step (euler, trailing)", "TCD 4-step (tcd, gamma 0.3)", "SDXL-Turbo 2-step (euler ancestral, trailing)",
    "Hyper-SD 2-step LoRA (ddim, trailing)", "LCM 4-step (lcm, 999,759,499,259)")], ids=lambda r: r.name)
def test_sampler_custom_with_schedule_and_release_sampler_equals_generate(models, recipe):
    model, seed = models["sd15"], 5
    conditioning = text_conditioning("sd15")
    sigmas = DMD2Schedule.execute(model, recipe.name, "").result[0]
    sampler = dmd2.DMD2ReleaseSampler.execute(recipe.name, "dmd2", 0.3).result[0]
    custom = SamplerCustom.execute(model, True, seed, 1.0, conditioning, conditioning, sampler, sigmas,
                                   empty_latent()).result[0]["samples"]
    generated = dmd2.DMD2Generate.execute(model, conditioning, empty_latent(), seed, recipe.name, "").result[0]["samples"]
    torch.testing.assert_close(custom, generated)


@pytest.mark.parametrize("recipe", FAMILY_RECIPES, ids=lambda r: r.name)
def test_one_unet_evaluation_per_step(models, recipe):
    with counting_unet(models["sdxl"]) as (model, record):
        dmd2.DMD2Generate.execute(model, text_conditioning("sdxl"), empty_latent(), 0, recipe.name, "")
    assert record["forwards"] == recipe.steps and record["batches"] == [1] * recipe.steps
    table = model.get_model_object("model_sampling")
    assert [int(table.timestep(t)) for t in record["timesteps"]] == list(recipe.timesteps)


def test_stock_sgm_uniform_route_differs_from_the_lightning_card(models):
    """The measurement behind the README table can fail: ComfyUI's euler + sgm_uniform (the
    Lightning card's ComfyUI advice) visits 500/250, not 499/249, and lands measurably off."""
    import comfy.samplers

    model, seed = models["sdxl"], 11
    recipe = RECIPES_BY_NAME["SDXL-Lightning 4-step (euler, trailing)"]
    conditioning = text_conditioning("sdxl")
    model_sampling = model.get_model_object("model_sampling")
    stock_sigmas = comfy.samplers.calculate_sigmas(model_sampling, "sgm_uniform", 4)
    assert [int(model_sampling.timestep(s)) for s in stock_sigmas[:-1]] == [999, 749, 500, 250]
    sampler = comfy.samplers.ksampler("euler")
    stock = SamplerCustom.execute(model, True, seed, 1.0, conditioning, conditioning, sampler, stock_sigmas,
                                  empty_latent()).result[0]["samples"]
    start_noise = comfy.sample.prepare_noise(empty_latent()["samples"], seed)
    expected = diffusers_reference("sdxl", diffusers_unet("sdxl", model), conditioning, start_noise, recipe.name, None)
    ours = dmd2.DMD2Generate.execute(model, conditioning, empty_latent(), seed, recipe.name, "").result[0]["samples"]
    assert relative_error(model_space(model, ours), expected) < 1e-5
    assert relative_error(model_space(model, stock), expected) > 10 * relative_error(model_space(model, ours), expected)


# -- loaders tag the model; the sampler warns ---------------------------------------------------------------------
def test_loaders_tag_the_model_and_the_x0_unet_reads_x0(tmp_path, models):
    x0 = RELEASES_BY_NAME["sdxl_lightning_1step_unet_x0.safetensors"]
    path = tiny_releases.write_release(x0, tmp_path)
    loaded = dmd2_unet_with_release(models["sdxl"], path, x0.file_name)
    assert model_releases(loaded) == (x0,)
    assert isinstance(loaded.get_model_object("model_sampling"), comfy.model_sampling.X0)
    assert not isinstance(models["sdxl"].get_model_object("model_sampling"), comfy.model_sampling.X0)
    torch.testing.assert_close(loaded.get_model_object("model_sampling").sigmas,
                               models["sdxl"].get_model_object("model_sampling").sigmas)
    lora = RELEASES_BY_NAME["sdxl_lightning_4step_lora.safetensors"]
    lora_path = tiny_releases.write_release(lora, tmp_path)
    with_lora = loaders.with_release(loaders.load_dmd2_lora(models["sdxl"], lora_path, 1.0), lora.file_name, "lora")
    assert model_releases(with_lora) == (lora,) and model_releases(with_lora.clone()) == (lora,)
    assert model_releases(models["sdxl"]) == ()
    # an unknown file name is not tagged
    assert model_releases(loaders.with_release(models["sdxl"].clone(), "my_lora.safetensors", "lora")) == ()


def dmd2_unet_with_release(base, path, name):
    return loaders.with_release(loaders.load_dmd2_unet(base, path), name, "unet")


def test_x0_unet_loaded_as_an_eps_model_is_read_as_x0_by_its_preset(tmp_path, models):
    """The Lightning 1-step UNet loaded by a loader that knows nothing of it (eps sampling) and
    sampled with its preset: read as x0 all the same, equal to diffusers' prediction_type="sample"."""
    x0 = RELEASES_BY_NAME["sdxl_lightning_1step_unet_x0.safetensors"]
    path = tiny_releases.write_release(x0, tmp_path)
    as_eps = loaders.load_dmd2_unet(models["sdxl"], path)  # untagged, eps
    recipe = RECIPES_BY_NAME["SDXL-Lightning 1-step x0 (euler, 999)"]
    conditioning = text_conditioning("sdxl")
    out = dmd2.DMD2Generate.execute(as_eps, conditioning, empty_latent(), 3, recipe.name, "").result[0]["samples"]
    start_noise = comfy.sample.prepare_noise(empty_latent()["samples"], 3)
    expected = diffusers_reference("sdxl", diffusers_unet("sdxl", as_eps), conditioning, start_noise, recipe.name, None)
    assert relative_error(model_space(as_eps, out), expected) < 1e-3
    # read as eps (another preset) it is far off: the x0 reading is what makes it right
    eps_out = dmd2.DMD2Generate.execute(as_eps, conditioning, empty_latent(), 3, "custom", "999").result[0]["samples"]
    assert relative_error(model_space(as_eps, eps_out), expected) > 0.05


def test_notes_for_mismatched_family_steps_and_prediction():
    lightning_lora = RELEASES_BY_NAME["sdxl_lightning_4step_lora.safetensors"]
    x0_unet = RELEASES_BY_NAME["sdxl_lightning_1step_unet_x0.safetensors"]
    lcm = RECIPES_BY_NAME["LCM 4-step (lcm, 999,759,499,259)"]
    own = RECIPES_BY_NAME["SDXL-Lightning 4-step (euler, trailing)"]
    assert sampling_notes(own, (lightning_lora,), reads_x0=False) == []
    [note] = sampling_notes(lcm, (lightning_lora,), reads_x0=False)
    assert "SDXL-Lightning release" in note and "LCM-LoRA way" in note and own.name in note
    eight = RECIPES_BY_NAME["SDXL-Lightning 8-step (euler, trailing)"]
    [note] = sampling_notes(eight, (lightning_lora,), reads_x0=False)
    assert "distilled for 4 step(s)" in note and "8 step(s)" in note
    assert any("x0" in n for n in sampling_notes(own, (x0_unet,), reads_x0=True))
    assert sampling_notes(RECIPES_BY_NAME["SDXL-Lightning 1-step x0 (euler, 999)"], (x0_unet,), reads_x0=True) == []


def test_custom_list_runs_the_loaded_familys_rule_with_a_note(tmp_path, models):
    """A step count the release was not distilled for is allowed (custom list), sampled with
    the release's own update rule, and the node says so in its UI output."""
    lora = RELEASES_BY_NAME["sdxl_lightning_4step_lora.safetensors"]
    lora_path = tiny_releases.write_release(lora, tmp_path)
    tagged = loaders.with_release(loaders.load_dmd2_lora(models["sdxl"], lora_path, 1.0), lora.file_name, "lora")
    conditioning = text_conditioning("sdxl")
    output = dmd2.DMD2Generate.execute(tagged, conditioning, empty_latent(), 8, "custom", "999,666,333")
    [note] = output.ui["text"]
    assert "distilled for 4 step(s)" in note and "euler" in note
    # the same as SamplerCustom with the euler rule on those timesteps
    sigmas = DMD2Schedule.execute(tagged, "custom", "999,666,333").result[0]
    sampler = dmd2.DMD2ReleaseSampler.execute("custom", "euler", 0.0).result[0]
    custom = SamplerCustom.execute(tagged, True, 8, 1.0, conditioning, conditioning, sampler, sigmas,
                                   empty_latent()).result[0]["samples"]
    torch.testing.assert_close(output.result[0]["samples"], custom)
    # its own preset: an empty note (the frontend replaces the last run's note with it)
    assert dmd2.DMD2Generate.execute(tagged, conditioning, empty_latent(), 8, lora.preset, "").ui == {"text": []}


def test_every_release_of_a_family_names_a_preset_of_its_family():
    for release in RELEASES:
        if release.kind == "t2i_adapter":
            continue
        assert release.recipe is not None or release.family == "dmd2", release
        for steps in release.steps:
            assert any(r.family == release.family and r.steps == steps for r in RECIPES) or release.family == "dmd2", (
                release, steps)
