"""Every few-step release family sampled exactly: each preset's timesteps against the
scheduler of the release's model card, and the whole sampling against diffusers on the same
tiny SD1.5/SDXL weights and noise (SDXL-Lightning: EulerDiscrete trailing, x0 for its 1-step
UNet; Hyper-SD: DDIM trailing, TCD for the 1-step LoRA, LCM at 800 for the 1-step UNet;
LCM-LoRA: LCMScheduler; TCD: TCDScheduler with eta 0.3; SDXL-Turbo: EulerAncestral trailing).
Also: one UNet evaluation per step, the loaders' release tags, and the warnings."""

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
FAMILY_RECIPES = [r for r in RECIPES if r.family != "dmd2"]  # DMD2's own parity: tests/test_sampler.py


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_models.build_model(arch) for arch in ("sd15", "sdxl")}


def card_scheduler(recipe):
    """The diffusers scheduler (and step kwargs) the release's model card uses."""
    if recipe.rule == "euler":
        prediction = "sample" if recipe.prediction == "x0" else "epsilon"
        return diffusers.EulerDiscreteScheduler.from_config(SD_SCHEDULER, timestep_spacing="trailing",
                                                            prediction_type=prediction), {}
    if recipe.rule == "euler_ancestral":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER, timestep_spacing="trailing"), {}
    if recipe.rule == "dmd2":  # DMD2's card: LCMScheduler with its timesteps passed explicitly
        return diffusers.LCMScheduler.from_config(SD_SCHEDULER, original_inference_steps=1000), {}
    if recipe.rule == "lcm":
        return diffusers.LCMScheduler.from_config(SD_SCHEDULER), {}
    if recipe.rule == "tcd" and recipe.family == "hyper" and recipe.gamma == 0:
        return diffusers.DDIMScheduler.from_config(SD_SCHEDULER, timestep_spacing="trailing"), {"eta": 0.0}
    if recipe.rule == "tcd":
        return diffusers.TCDScheduler.from_config(SD_SCHEDULER), {"eta": recipe.gamma}
    raise AssertionError(recipe)


def card_set_timesteps(scheduler, recipe):
    if recipe.rule == "dmd2" or (recipe.family == "hyper" and recipe.rule == "lcm"):  # DMD2; Hyper-SDXL-1step-Unet: [800]
        scheduler.set_timesteps(timesteps=list(recipe.timesteps))
    else:
        scheduler.set_timesteps(recipe.steps)


@torch.no_grad()
def diffusers_reference(arch, unet, conditioning, start_noise, recipe, renoise_generator):
    """The model card's diffusers loop (as the SD/SDXL pipelines run it at guidance 0)."""
    scheduler, step_kwargs = card_scheduler(recipe)
    card_set_timesteps(scheduler, recipe)
    context, added = diffusers_conditioning(arch, conditioning, start_noise.shape[-1])
    latents = start_noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=context,
                   added_cond_kwargs=added).sample
        latents = scheduler.step(out, t, latents, generator=renoise_generator, return_dict=False, **step_kwargs)[0]
    return latents


@pytest.mark.parametrize("recipe", FAMILY_RECIPES, ids=lambda r: r.name)
def test_preset_timesteps_are_the_card_schedulers(recipe):
    scheduler, _ = card_scheduler(recipe)
    card_set_timesteps(scheduler, recipe)
    assert [int(t) for t in scheduler.timesteps] == list(recipe.timesteps)


def test_timestep_rules():
    assert trailing_timesteps(4) == (999, 749, 499, 249) and trailing_timesteps(1) == (999,)
    assert trailing_timesteps(8) == (999, 874, 749, 624, 499, 374, 249, 124)
    assert lcm_timesteps(4) == (999, 759, 499, 259) and lcm_timesteps(2) == (999, 499)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            trailing_timesteps(bad)
    with pytest.raises(ValueError):
        lcm_timesteps(51)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("recipe", FAMILY_RECIPES, ids=lambda r: r.name)
def test_generate_matches_the_card_scheduler_in_diffusers(models, arch, recipe):
    """Same weights (the model read as x0 for Lightning's 1-step UNet), same start noise, same
    re-noise draws: DMD2Generate with the family's preset equals the card's diffusers loop."""
    model, seed = models[arch], 2024
    conditioning = text_conditioning(arch)
    latent = empty_latent()
    out = dmd2.DMD2Generate.execute(model, conditioning, latent, seed, recipe.name, "").result[0]["samples"]
    start_noise = comfy.sample.prepare_noise(latent["samples"], seed)
    renoise = torch.Generator().manual_seed(dmd2.renoise_seed(seed))
    expected = diffusers_reference(arch, diffusers_unet(arch, model), conditioning, start_noise, recipe, renoise)
    error = relative_error(model_space(model, out), expected)
    assert error < 1e-3, error


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
    expected = diffusers_reference("sdxl", diffusers_unet("sdxl", model), conditioning, start_noise, recipe, None)
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
    expected = diffusers_reference("sdxl", diffusers_unet("sdxl", as_eps), conditioning, start_noise, recipe, None)
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
