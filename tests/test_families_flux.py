"""Flux.1 as a family (#25): rectified flow read from ComfyUI's own Flux model classes, and the
flow few-step presets (DMD2 in flow time, FLUX.1-schnell, FLUX.1-Turbo-Alpha, Hyper-FLUX)
sampled by DMD2Generate on a tiny Flux against the card's diffusers FlowMatchEulerDiscreteScheduler
driven as FluxPipeline drives it, calling the same network."""

import dataclasses
import math

import comfy.sample
import diffusers
import numpy as np
import pytest
import tiny_models
import torch
from comfyui_dmd2 import bases
from comfyui_dmd2.nodes import sampler as dmd2
from comfyui_dmd2.nodes import schedules
from comfyui_dmd2.nodes.families import FLOW_RECIPES, FLOW_RECIPES_BY_NAME
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from test_sampler import empty_latent, text_conditioning

# The schedulers' configs as diffusers ships them (black-forest-labs/FLUX.1-dev and
# FLUX.1-schnell, scheduler/scheduler_config.json).
DEV_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
SCHNELL_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                     "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


@dataclasses.dataclass(frozen=True)
class FlowCard:
    """What a release's card runs: FluxPipeline(num_inference_steps, guidance_scale, height x width)
    on this scheduler config (its sigmas linspace(1, 1/N, N), mu = calculate_shift(tokens))."""

    config: dict
    steps: int
    guidance: float | None  # None: the transformer has no guidance input (schnell)
    seq_len: int = 4096  # FluxPipeline's default 1024 x 1024: (1024/16)^2 tokens
    stochastic: bool = False  # FlowMatchEulerDiscreteScheduler(stochastic_sampling=True): the DMD2 update


FLOW_CARDS = {
    # DMD2 in flow time (x0 = x - t*v, then (1-t_next)*x0 + t_next*fresh noise) on [dev]'s own shifted grid at
    # 1024 px and guidance 3.5 (NVIDIA FastGen's Flux DMD2 config: net.guidance_scale = 3.5, 4 student steps).
    "DMD2 flow 1-step (Flux dev shift)": FlowCard(DEV_SCHEDULER, 1, 3.5, stochastic=True),
    "DMD2 flow 4-step (Flux dev shift)": FlowCard(DEV_SCHEDULER, 4, 3.5, stochastic=True),
    "DMD2 flow 8-step (Flux dev shift)": FlowCard(DEV_SCHEDULER, 8, 3.5, stochastic=True),
    # https://huggingface.co/black-forest-labs/FLUX.1-schnell : pipe(prompt, guidance_scale=0.0, num_inference_steps=4,
    # max_sequence_length=256)
    "FLUX.1-schnell 4-step (euler, unshifted)": FlowCard(SCHNELL_SCHEDULER, 4, None),
    # https://huggingface.co/alimama-creative/FLUX.1-Turbo-Alpha : FLUX.1-dev + the LoRA fused, height=1024, width=1024,
    # num_inference_steps=8, guidance_scale=3.5
    "FLUX.1-Turbo-Alpha 8-step (euler, dev shift, guidance 3.5)": FlowCard(DEV_SCHEDULER, 8, 3.5),
    # https://huggingface.co/ByteDance/Hyper-SD : Hyper-FLUX.1-dev-8steps-lora / 16steps: pipe.fuse_lora(lora_scale=0.125),
    # num_inference_steps=8 (16), guidance_scale=3.5
    "Hyper-FLUX 8-step LoRA 0.125 (euler, dev shift, guidance 3.5)": FlowCard(DEV_SCHEDULER, 8, 3.5),
    "Hyper-FLUX 16-step LoRA 0.125 (euler, dev shift, guidance 3.5)": FlowCard(DEV_SCHEDULER, 16, 3.5),
}
LATENT_SIDE = 8  # 16 latent channels, 8x8: 16 tokens


@pytest.fixture(scope="module")
def flux_models():
    return {"flux_dev": tiny_models.build_flux(), "flux_schnell": tiny_models.build_flux(schnell=True)}


def flux_conditioning(seed=7):
    """T5-XXL-wide tokens and a CLIP-L pooled vector, as the Flux text encoders give them."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 6, 4096, generator=gen), {"pooled_output": torch.randn(1, 768, generator=gen)}]]


def flux_latent():
    return {"samples": torch.zeros(1, 16, LATENT_SIDE, LATENT_SIDE)}


def card_scheduler(card):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config({**card.config, "stochastic_sampling": card.stochastic})
    c = card.config
    mu = calculate_shift(card.seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / card.steps, card.steps), mu=mu)
    return scheduler


@torch.no_grad()
def diffusers_reference(model, card, conditioning, start_noise, renoise_generator):
    """FluxPipeline's denoising loop (transformer(timestep=t/1000, guidance), scheduler.step) on
    ComfyUI's Flux network itself, in the model's latent space."""
    scheduler = card_scheduler(card)
    net = model.model.diffusion_model
    context, pooled = conditioning[0][0], conditioning[0][1]["pooled_output"]
    guidance = None if card.guidance is None else torch.full([1], card.guidance)
    latents = start_noise
    for t in scheduler.timesteps:
        v = net(latents, (t / 1000).expand(1), context=context, y=pooled, guidance=guidance)
        latents = scheduler.step(v, t, latents, generator=renoise_generator, return_dict=False)[0]
    return latents


def card_error(model, name, card=None, seed=2024, conditioning=None):
    """Max abs difference of DMD2Generate with preset ``name`` to the card's loop (same weights,
    start noise and re-noise draws), in the model's latent space."""
    card = card or FLOW_CARDS[name]
    conditioning = conditioning or flux_conditioning()
    latent = flux_latent()
    out = dmd2.DMD2Generate.execute(model, conditioning, latent, seed, name, "").result[0]["samples"]
    start_noise = comfy.sample.prepare_noise(latent["samples"], seed)
    renoise = torch.Generator().manual_seed(dmd2.renoise_seed(seed))
    expected = diffusers_reference(model, card, conditioning, start_noise, renoise)
    return float((model.model.process_latent_in(out) - expected).abs().max()), float(expected.abs().max())


# -- the family -------------------------------------------------------------------------------------
def test_flux_models_read_as_their_family_on_their_own_sampling(flux_models):
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    dev, schnell = bases.family_of(flux_models["flux_dev"]), bases.family_of(flux_models["flux_schnell"])
    assert (dev.name, dev.prediction, dev.guidance, dev.context_dim) == ("flux_dev", "flow", 3.5, 4096)
    assert (schnell.name, schnell.guidance, schnell.process.shift) == ("flux_schnell", None, 1.0)
    assert dev.process.shift == pytest.approx(math.exp(1.15))  # ComfyUI's default: [dev] at 1024 px
    (patched,) = ModelSamplingFlux().patch(flux_models["flux_dev"], 1.15, 0.5, 512, 512)
    assert bases.family_of(patched).process.shift == pytest.approx(math.exp(0.5 + (1024 - 256) * 0.65 / 3840))
    # the trainer's integer timesteps index the flow training grid: DMD2's 4-step list is sigmas(4)
    grid = bases.get_family("flux_dev").trailing_timesteps(4)
    assert grid == (999, 749, 499, 249)
    torch.testing.assert_close(dev.process.time(torch.tensor(grid)), dev.process.sigmas(4))
    assert bases.get_family("flux_dev").prediction == "flow" and bases.get_family("sd15").prediction == "eps"


def test_flow_training_grid_is_diffusers_training_sigmas():
    """Integer timestep k is FlowMatchEulerDiscreteScheduler's training sigma for timestep k+1:
    shift * u / (1 + (shift - 1) * u) at u = (k + 1) / 1000 (literal values at shift 3, the
    FLUX.1-dev scheduler_config's static shift)."""
    flow = bases.RectifiedFlow(3.0)
    t = torch.tensor([999, 749, 499, 249, 0])
    expected = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.003 / 1.002], dtype=torch.float64)
    torch.testing.assert_close(flow.time(t), expected)
    a, s = flow.coefficients(t)
    torch.testing.assert_close((a, s), (1 - expected, expected))
    torch.testing.assert_close(flow.model_time(t), expected.float())  # what Flux's forward takes (sigma)
    torch.testing.assert_close(flow.time(torch.tensor([0.25])), torch.tensor([0.25], dtype=torch.float64))  # a float is a time


def test_flow_prediction_converts_to_x0_and_back():
    family = bases.get_family("flux_dev")
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, 4, 4, generator=gen, dtype=torch.float64), torch.randn(3, 16, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)
    x_t = family.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    v = eps - x0
    torch.testing.assert_close(family.to_x0(x_t, v, t), x0)
    torch.testing.assert_close(family.from_x0(x_t, x0, t), v)
    x0_pred = x0 + torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    out_err = family.from_x0(x_t, x0_pred, t) - v
    torch.testing.assert_close(out_err.abs(), family.output_weight(t, x_t) * (x0_pred - x0).abs())


def test_the_train_nodes_family_check_takes_dev_and_refuses_schnell_in_one_line(flux_models):
    from comfyui_dmd2.nodes.training import TrainingInputError, model_family

    assert model_family(flux_models["flux_dev"]).name == "flux_dev"
    with pytest.raises(TrainingInputError) as info:
        model_family(flux_models["flux_schnell"])
    assert "already distilled" in str(info.value) and "\n" not in str(info.value)


def test_the_commands_family_check_takes_dev_and_refuses_schnell_in_one_line(flux_models):
    """[dev] is a teacher (#25); [schnell] is already distilled: its output between the ends is
    not the data's score, so the refusal says so, in one line."""
    from comfyui_dmd2.training.checkpoint import UnsupportedModel, detect_family

    assert detect_family(flux_models["flux_dev"]).name == "flux_dev"
    with pytest.raises(UnsupportedModel) as info:
        detect_family(flux_models["flux_schnell"])
    message = str(info.value)
    assert "[schnell]" in message and "already distilled" in message and "FLUX.1 [dev]" in message and "\n" not in message


# -- the presets against the cards ------------------------------------------------------------------
def test_every_flow_preset_has_a_card_and_its_grid():
    assert set(FLOW_CARDS) == set(FLOW_RECIPES_BY_NAME)
    for name, card in FLOW_CARDS.items():
        recipe = FLOW_RECIPES_BY_NAME[name]
        assert recipe.steps == card.steps and recipe.guidance == card.guidance
        assert recipe.base == ("flux_schnell" if card.config is SCHNELL_SCHEDULER else "flux_dev")
        assert recipe.rule == ("dmd2" if card.stochastic else "euler")


@pytest.mark.parametrize("name", list(FLOW_CARDS))
def test_flow_preset_matches_the_card_scheduler(flux_models, name, capsys):
    """The model's own sigmas at the card's times, one network evaluation per step with the card's
    guidance, the card's update: DMD2Generate equals the card's diffusers loop."""
    model = flux_models[FLOW_RECIPES_BY_NAME[name].base]
    error, scale = card_error(model, name)
    with capsys.disabled():
        print(f"\n{name}: max abs difference {error:.2e} (output max {scale:.2f})")
    assert error < 1e-4, error


def test_model_sampling_flux_node_at_the_latent_size_is_the_cards_dynamic_shift(flux_models):
    """The sigmas come from the model's own sampling: with ModelSamplingFlux at the latent's
    image size, DMD2Generate equals the card's pipeline at that size (mu from its 16 tokens);
    without it, it runs at 1024 px's shift and says so."""
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    name, side = "FLUX.1-Turbo-Alpha 8-step (euler, dev shift, guidance 3.5)", LATENT_SIDE * 8
    (patched,) = ModelSamplingFlux().patch(flux_models["flux_dev"], 1.15, 0.5, side, side)
    card = dataclasses.replace(FLOW_CARDS[name], seq_len=(side // 16) ** 2)
    assert card_error(patched, name, card)[0] < 1e-4
    assert card_error(flux_models["flux_dev"], name, card)[0] > 1e-2  # the 1024 px shift is another schedule
    notes = dmd2.DMD2Generate.execute(flux_models["flux_dev"], flux_conditioning(), flux_latent(), 0, name, "").ui["text"]
    assert any("ModelSamplingFlux node (width 64, height 64)" in n for n in notes)
    assert dmd2.DMD2Generate.execute(patched, flux_conditioning(), flux_latent(), 0, name, "").ui["text"] == []


def test_a_wrong_guidance_or_rule_fails_the_card_comparison(flux_models, monkeypatch):
    """The references are the cards' literals: a changed guidance or update rule in the pack's
    table is caught."""
    name = "DMD2 flow 4-step (Flux dev shift)"
    for change in ({"guidance": 4.0}, {"rule": "euler"}):
        monkeypatch.setitem(FLOW_RECIPES_BY_NAME, name, dataclasses.replace(FLOW_RECIPES_BY_NAME[name], **change))
        assert card_error(flux_models["flux_dev"], name)[0] > 1e-3, change
        monkeypatch.undo()


def test_one_network_evaluation_per_step_with_the_guidance_input(flux_models):
    from test_sampler import counting_unet

    recipe = FLOW_RECIPES_BY_NAME["DMD2 flow 4-step (Flux dev shift)"]
    with counting_unet(flux_models["flux_dev"]) as (model, record):
        dmd2.DMD2Generate.execute(model, flux_conditioning(), flux_latent(), 0, recipe.name, "")
    assert record["forwards"] == recipe.steps and record["batches"] == [1] * recipe.steps
    shifted = [math.exp(1.15) * u / (1 + (math.exp(1.15) - 1) * u) for u in (1.0, 0.75, 0.5, 0.25)]
    assert [float(t) for t in record["timesteps"]] == pytest.approx(shifted, abs=1e-6)


def test_flux_guidance_in_the_conditioning_is_kept_with_a_note(flux_models):
    from comfy_extras.nodes_flux import FluxGuidance

    name = "FLUX.1-Turbo-Alpha 8-step (euler, dev shift, guidance 3.5)"
    (guided,) = FluxGuidance.execute(flux_conditioning(), 5.0)
    output = dmd2.DMD2Generate.execute(flux_models["flux_dev"], guided, flux_latent(), 0, name, "")
    assert any("guidance 5.0" in n and "3.5" in n for n in output.ui["text"])
    card = dataclasses.replace(FLOW_CARDS[name], guidance=5.0)
    start_noise = comfy.sample.prepare_noise(flux_latent()["samples"], 0)
    expected = diffusers_reference(flux_models["flux_dev"], card, flux_conditioning(), start_noise, None)
    ours = flux_models["flux_dev"].model.process_latent_in(output.result[0]["samples"])
    assert float((ours - expected).abs().max()) < 1e-4


# -- bad input ----------------------------------------------------------------------------------------
def test_presets_of_the_other_kind_are_refused_in_one_line(flux_models):
    sd = tiny_models.build_model("sd15")
    flow_name = FLOW_RECIPES[0].name
    with pytest.raises(schedules.ScheduleError, match="Flux.1 models in flow time") as info:
        dmd2.DMD2Generate.execute(sd, text_conditioning("sd15"), empty_latent(), 0, flow_name, "")
    assert "\n" not in str(info.value)
    for preset, custom in (("4-step (999,749,499,249)", ""), ("custom", "999,499")):
        with pytest.raises(schedules.UnsupportedModelError, match="choose a flow preset") as info:
            dmd2.DMD2Generate.execute(flux_models["flux_dev"], flux_conditioning(), flux_latent(), 0, preset, custom)
        assert "\n" not in str(info.value)
    with pytest.raises(schedules.ScheduleError, match="choose a flow preset"):
        schedules.DMD2Schedule.execute(flux_models["flux_dev"], "1-step (399)", "")


def test_a_dev_preset_on_schnell_runs_with_a_note(flux_models):
    notes = dmd2.DMD2Generate.execute(flux_models["flux_schnell"], flux_conditioning(), flux_latent(), 0,
                                      "DMD2 flow 4-step (Flux dev shift)", "").ui["text"]
    assert any("made on Flux.1 [dev]" in n and "Flux.1 [schnell] model" in n for n in notes)


def test_schedule_and_release_sampler_in_sampler_custom_equal_generate(flux_models):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    name, model = "Hyper-FLUX 8-step LoRA 0.125 (euler, dev shift, guidance 3.5)", flux_models["flux_dev"]
    sigmas = schedules.DMD2Schedule.execute(model, name, "").result[0]
    sampler = dmd2.DMD2ReleaseSampler.execute(name, "dmd2", 0.0).result[0]
    custom = SamplerCustom.execute(model, True, 3, 1.0, flux_conditioning(), flux_conditioning(), sampler, sigmas,
                                   flux_latent()).result[0]["samples"]
    generated = dmd2.DMD2Generate.execute(model, flux_conditioning(), flux_latent(), 3, name, "").result[0]["samples"]
    torch.testing.assert_close(custom, generated)  # ComfyUI's default guidance is the card's 3.5
