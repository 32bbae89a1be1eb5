"""The DMD2 sampler in-process: parity with diffusers' LCMScheduler on the same weights, the
start-noise scaling, fresh re-noise draws, one UNet evaluation per step, node equivalences."""

import contextlib

import diffusers
import pytest
import torch

import comfy.k_diffusion.sampling
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import tiny_models
from comfy_extras.nodes_custom_sampler import SamplerCustom
from comfyui_dmd2.nodes import sampler as dmd2
from comfyui_dmd2.nodes.schedules import FOUR_STEP, ONE_STEP, ScheduleError, UnsupportedModelError, schedule_sigmas

LATENT_SIDE = 16
CONTEXT_TOKENS = 77
POOLED_DIM = 32  # tiny SDXL's pooled text embedding


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_models.build_model(arch) for arch in ("sd15", "sdxl")}


def text_conditioning(arch, seed=7):
    """A fixed text conditioning (random context of the model's width, plus pooled for SDXL)."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(1, CONTEXT_TOKENS, tiny_models.UNET_CONFIGS[arch]["context_dim"], generator=gen)
    extra = {"pooled_output": torch.randn(1, POOLED_DIM, generator=gen)} if arch == "sdxl" else {}
    return [[context, extra]]


def empty_latent(batch=1):
    return {"samples": torch.zeros(batch, 4, LATENT_SIDE, LATENT_SIDE)}


@contextlib.contextmanager
def counting_unet(model):
    """A clone of ``model`` whose UNet-call wrapper records each call's batch size and timestep,
    plus a forward hook counting the diffusion model's actual forward passes."""
    record = {"batches": [], "timesteps": [], "inputs": [], "forwards": 0}
    clone = model.clone()

    def wrapper(apply_model, args):
        record["batches"].append(args["input"].shape[0])
        record["timesteps"].append(args["timestep"].clone())
        record["inputs"].append(args["input"].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    def hook(module, inputs, output):
        record["forwards"] += 1

    clone.set_model_unet_function_wrapper(wrapper)
    handle = clone.model.diffusion_model.register_forward_hook(hook)
    try:
        yield clone, record
    finally:
        handle.remove()


def diffusers_unet(arch, model, prediction="epsilon"):
    unet = diffusers.UNet2DConditionModel(**tiny_models.diffusers_unet_config(arch))
    state = tiny_models.diffusers_unet_state_dict(arch, tiny_models.unet_state_dict(model))
    unet.load_state_dict(state, strict=True)
    return unet.eval()


def diffusers_conditioning(arch, conditioning, latent_side):
    """(encoder_hidden_states, added_cond_kwargs) of a ComfyUI conditioning for a diffusers UNet;
    SDXL's time ids at ComfyUI's default size (latent side * 8), no crop."""
    context, extra = conditioning[0]
    if arch != "sdxl":
        return context, None
    side = latent_side * 8
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)
    return context, {"text_embeds": extra["pooled_output"], "time_ids": time_ids}


@torch.no_grad()
def diffusers_lcm(arch, unet, conditioning, start_noise, timesteps, renoise_generator, prediction="epsilon"):
    """The reference: diffusers' LCMScheduler with explicit timesteps, returning the final x0."""
    scheduler = diffusers.LCMScheduler(original_inference_steps=1000, prediction_type=prediction)
    scheduler.set_timesteps(timesteps=list(timesteps))
    assert scheduler.timesteps.tolist() == list(timesteps)
    context, added = diffusers_conditioning(arch, conditioning, start_noise.shape[-1])
    latents = start_noise * scheduler.init_noise_sigma
    denoised = None
    for t in scheduler.timesteps:
        out = unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        latents, denoised = scheduler.step(out, t, latents, generator=renoise_generator, return_dict=False)
    return denoised


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def model_space(model, latent_out):
    """ComfyUI returns latents divided by the VAE scale factor; diffusers works before that."""
    return model.model.process_latent_in(latent_out)


PRESET_TIMESTEPS = [(FOUR_STEP, [999, 749, 499, 249]), (ONE_STEP, [399])]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("preset,timesteps", PRESET_TIMESTEPS)
def test_generate_matches_diffusers_lcm_scheduler(models, arch, preset, timesteps):
    model, seed = models[arch], 1234
    conditioning = text_conditioning(arch)
    latent = empty_latent()
    out = dmd2.DMD2Generate.execute(model, conditioning, latent, seed, preset, "").result[0]["samples"]

    start_noise = comfy.sample.prepare_noise(latent["samples"], seed)
    renoise = torch.Generator().manual_seed(dmd2.renoise_seed(seed))
    expected = diffusers_lcm(arch, diffusers_unet(arch, model), conditioning, start_noise, timesteps, renoise)
    assert relative_error(model_space(model, out), expected) < 1e-3


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sampler_custom_with_dmd2_nodes_matches_diffusers(models, arch):
    from comfyui_dmd2.nodes.schedules import DMD2Schedule

    model, seed = models[arch], 99
    conditioning = text_conditioning(arch)
    sigmas = DMD2Schedule.execute(model, "custom", "999,749,499,249").result[0]
    sampler = dmd2.DMD2Sampler.execute().result[0]
    out = SamplerCustom.execute(model, True, seed, 1.0, conditioning, conditioning, sampler, sigmas, empty_latent()).result[0]

    start_noise = comfy.sample.prepare_noise(empty_latent()["samples"], seed)
    renoise = torch.Generator().manual_seed(dmd2.renoise_seed(seed))
    expected = diffusers_lcm(arch, diffusers_unet(arch, model), conditioning, start_noise, [999, 749, 499, 249], renoise)
    assert relative_error(model_space(model, out["samples"]), expected) < 1e-3


@pytest.mark.parametrize("preset", [FOUR_STEP, ONE_STEP])
def test_generate_equals_sampler_custom_with_the_same_seed(models, preset):
    model, seed = models["sdxl"], 5
    conditioning = text_conditioning("sdxl")
    negative = text_conditioning("sdxl", seed=8)  # unused at cfg 1.0
    latent = empty_latent(batch=2)
    generated = dmd2.DMD2Generate.execute(model, conditioning, latent, seed, preset, "").result[0]["samples"]
    sigmas = schedule_sigmas(model, preset, "")
    custom = SamplerCustom.execute(model, True, seed, 1.0, conditioning, negative, dmd2.dmd2_ksampler(), sigmas, latent).result[0]
    assert torch.equal(generated, custom["samples"])
    assert not torch.equal(generated[0], generated[1])


def test_sampler_custom_advanced_with_basic_guider_equals_generate(models):
    from comfy_extras.nodes_custom_sampler import BasicGuider, RandomNoise, SamplerCustomAdvanced

    model, seed = models["sd15"], 17
    conditioning = text_conditioning("sd15")
    noise = RandomNoise.execute(seed).result[0]
    guider = BasicGuider.execute(model, conditioning).result[0]
    sigmas = schedule_sigmas(model, ONE_STEP, "")
    advanced = SamplerCustomAdvanced.execute(noise, guider, dmd2.DMD2Sampler.execute().result[0], sigmas,
                                             empty_latent()).result[0]["samples"]
    generated = dmd2.DMD2Generate.execute(model, conditioning, empty_latent(), seed, ONE_STEP, "").result[0]["samples"]
    assert torch.equal(advanced, generated)


def test_one_step_differs_from_stock_lcm_start_scaling(models):
    """The proof above can fail: the stock lcm sampler (start noise scaled by sigma at 399)
    lands far from diffusers, the DMD2 sampler does not."""
    arch, seed = "sd15", 3
    model = models[arch]
    conditioning = text_conditioning(arch)
    sigmas = schedule_sigmas(model, ONE_STEP, "")
    stock = SamplerCustom.execute(model, True, seed, 1.0, conditioning, conditioning,
                                  comfy.samplers.sampler_object("lcm"), sigmas, empty_latent()).result[0]["samples"]
    start_noise = comfy.sample.prepare_noise(empty_latent()["samples"], seed)
    expected = diffusers_lcm(arch, diffusers_unet(arch, model), conditioning, start_noise, [399], None)
    assert relative_error(model_space(model, stock), expected) > 1e-2


def test_v_prediction_matches_diffusers(models):
    """v-prediction is handled (not refused): ComfyUI derives x0 for it, the re-noise is the same."""
    arch, seed = "sd15", 11
    base = models[arch]

    class VPred(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    model = base.clone()
    model.add_object_patch("model_sampling", VPred())
    conditioning = text_conditioning(arch)
    out = dmd2.DMD2Generate.execute(model, conditioning, empty_latent(), seed, FOUR_STEP, "").result[0]["samples"]
    start_noise = comfy.sample.prepare_noise(empty_latent()["samples"], seed)
    renoise = torch.Generator().manual_seed(dmd2.renoise_seed(seed))
    expected = diffusers_lcm(arch, diffusers_unet(arch, base), conditioning, start_noise, [999, 749, 499, 249], renoise,
                             prediction="v_prediction")
    assert relative_error(model_space(model, out), expected) < 1e-3


@pytest.mark.parametrize("preset,timesteps", PRESET_TIMESTEPS + [("custom", [999, 899, 799, 699, 599, 499, 399, 299])])
def test_one_unet_evaluation_per_step(models, preset, timesteps):
    custom = ",".join(map(str, timesteps)) if preset == "custom" else ""
    with counting_unet(models["sdxl"]) as (model, record):
        dmd2.DMD2Generate.execute(model, text_conditioning("sdxl"), empty_latent(), 0, preset, custom)
    assert record["forwards"] == len(timesteps)
    assert record["batches"] == [1] * len(timesteps)
    table = model.get_model_object("model_sampling").sigmas
    seen = [int(model.get_model_object("model_sampling").timestep(t)) for t in record["timesteps"]]
    assert seen == timesteps
    assert torch.equal(torch.cat(record["timesteps"]), table[timesteps])


@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_cfg_and_negative_equal_sampler_custom_and_cost_two_evaluations_above_one(models, cfg):
    """The finetune recipe (DMD2 4-step LoRA at 8 steps, cfg 1.5, a negative prompt): the same
    as SamplerCustom + DMD2Sampler at that cfg; cfg 1.0 ignores the negative (one evaluation
    per step), cfg 1.5 uses it (cond and uncond: two per step)."""
    timesteps = [999, 874, 749, 624, 499, 374, 249, 124]
    custom = ",".join(map(str, timesteps))
    model, seed = models["sdxl"], 9
    positive, negative = text_conditioning("sdxl"), text_conditioning("sdxl", seed=8)
    with counting_unet(model) as (counted, record):
        out = dmd2.DMD2Generate.execute(counted, positive, empty_latent(), seed, "custom", custom, cfg, negative).result[0]["samples"]
    assert sum(record["batches"]) == len(timesteps) * (1 if cfg == 1.0 else 2)
    sigmas = schedule_sigmas(model, "custom", custom)
    stock = SamplerCustom.execute(model, True, seed, cfg, positive, negative, dmd2.dmd2_ksampler(), sigmas, empty_latent()).result[0]
    assert torch.equal(out, stock["samples"])
    unguided = dmd2.DMD2Generate.execute(model, positive, empty_latent(), seed, "custom", custom).result[0]["samples"]
    assert torch.equal(out, unguided) == (cfg == 1.0)


def test_cfg_above_one_without_negative_is_refused(models):
    with pytest.raises(ValueError, match="cfg 1.5 needs a negative conditioning"):
        dmd2.DMD2Generate.execute(models["sd15"], text_conditioning("sd15"), empty_latent(), 0, FOUR_STEP, "", 1.5)


@pytest.mark.parametrize("first_timestep", [399, 999])
def test_unet_sees_unit_variance_start_noise_at_any_first_timestep(models, first_timestep):
    seed = 21
    with counting_unet(models["sd15"]) as (model, record):
        dmd2.DMD2Generate.execute(model, text_conditioning("sd15"), empty_latent(), seed, "custom", str(first_timestep))
    sigma = model.get_model_object("model_sampling").sigmas[first_timestep]
    unet_input = record["inputs"][0] / (1 + sigma ** 2).sqrt()  # what ComfyUI's calculate_input feeds the UNet
    torch.testing.assert_close(unet_input, comfy.sample.prepare_noise(empty_latent()["samples"], seed))


def test_img2img_start_is_the_forward_noised_latent(models):
    """With a non-empty latent the start is latent + sigma * noise (DDPM forward process)."""
    seed = 4
    model = models["sd15"]
    image_latent = torch.randn(1, 4, LATENT_SIDE, LATENT_SIDE, generator=torch.Generator().manual_seed(0))
    with counting_unet(model) as (clone, record):
        dmd2.DMD2Generate.execute(clone, text_conditioning("sd15"), {"samples": image_latent}, seed, "custom", "499,249")
    sigma = clone.get_model_object("model_sampling").sigmas[499]
    noise = comfy.sample.prepare_noise(image_latent, seed)
    expected = model.model.process_latent_in(image_latent) + sigma * noise
    torch.testing.assert_close(record["inputs"][0], expected)


def test_renoise_draws_are_fresh_and_reproducible():
    x = torch.zeros(1, 4, 8, 8)
    start = comfy.sample.prepare_noise(x, 42)
    draws = dmd2.fresh_noise_sampler(x, 42)
    first, second = draws(1.0, 0.5), draws(0.5, 0.2)
    assert not torch.allclose(first, start) and not torch.allclose(first, second)
    assert torch.equal(first, dmd2.fresh_noise_sampler(x, 42)(1.0, 0.5))
    assert not torch.equal(first, dmd2.fresh_noise_sampler(x, 43)(1.0, 0.5))
    # the whole seed range of the nodes (0..2**64-1) maps to valid generator seeds
    for seed in (0, 2**63, 2**64 - 1):
        assert 0 <= dmd2.renoise_seed(seed) < 2**64
        assert dmd2.fresh_noise_sampler(x, seed)(1.0, 0.5).shape == x.shape
    # ComfyUI's default noise sampler would replay the start noise on CPU: the reason for our own
    stock_first = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=42)(1.0, 0.5)
    assert torch.equal(stock_first, start)


def test_sample_dmd2_with_stock_noise_equals_stock_lcm(models):
    """With the same re-noise draws and a start at the table's maximum (where stock samplers
    already use unit-variance noise), the DMD2 update is exactly ComfyUI's lcm update."""
    model, seed = models["sd15"], 8
    conditioning = text_conditioning("sd15")
    sigmas = schedule_sigmas(model, FOUR_STEP, "")
    stock_noise = lambda x, extra_args=None, **kw: comfy.k_diffusion.sampling.default_noise_sampler(x, seed=seed)  # noqa: E731

    def dmd2_with_stock_noise(m, x, s, extra_args=None, callback=None, disable=None):
        return dmd2.sample_dmd2(m, x, s, extra_args, callback, disable, noise_sampler=stock_noise(x))

    ours = comfy.samplers.KSAMPLER(dmd2_with_stock_noise)
    stock = comfy.samplers.sampler_object("lcm")
    run = lambda sampler: SamplerCustom.execute(model, True, seed, 1.0, conditioning, conditioning, sampler, sigmas,  # noqa: E731
                                                empty_latent()).result[0]["samples"]
    assert torch.equal(run(ours), run(stock))


def test_sample_dmd2_on_a_plain_denoiser():
    """Outside ComfyUI's wrappers (e.g. a toy k-diffusion denoiser): x0, then x0 + sigma * fresh noise."""
    calls = []

    def denoiser(x, sigma, **extra):
        calls.append((x.clone(), sigma.clone()))
        return 0.5 * x

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([10.0, 2.0, 0.0])
    out = dmd2.sample_dmd2(denoiser, x, sigmas, extra_args={"seed": 5}, disable=True)
    renoise = dmd2.fresh_noise_sampler(x, 5)(10.0, 2.0)
    assert [float(c[1][0]) for c in calls] == [10.0, 2.0] and calls[0][1].shape == (2,)
    torch.testing.assert_close(calls[1][0], 0.5 * x + 2.0 * renoise)
    torch.testing.assert_close(out, 0.5 * (0.5 * x + 2.0 * renoise))


def test_sampler_refuses_flow_models(models):
    class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    model = models["sd15"].clone()
    model.add_object_patch("model_sampling", Flow())
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    with pytest.raises(UnsupportedModelError, match="discrete SD-style timestep table"):
        SamplerCustom.execute(model, True, 0, 1.0, text_conditioning("sd15"), text_conditioning("sd15"),
                              dmd2.dmd2_ksampler(), sigmas, empty_latent())
    with pytest.raises(UnsupportedModelError):
        dmd2.DMD2Generate.execute(model, text_conditioning("sd15"), empty_latent(), 0, FOUR_STEP, "")


def test_generate_rejects_bad_timesteps_before_sampling(models):
    with counting_unet(models["sd15"]) as (model, record):
        for bad, message in [("1000", "outside 0..999"), ("", "empty"), ("1,2", "descending"), ("9,9", "twice"),
                             ("99.5", "not an integer")]:
            with pytest.raises(ScheduleError, match=message):
                dmd2.DMD2Generate.execute(model, text_conditioning("sd15"), empty_latent(), 0, "custom", bad)
    assert record["forwards"] == 0


def test_generate_keeps_latent_fields_and_previews(models, monkeypatch):
    """Progress reaches ComfyUI's progress bar hook once per step."""
    import comfy.utils

    updates = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: updates.append((value, total)))
    latent = {"samples": torch.zeros(1, 4, LATENT_SIDE, LATENT_SIDE), "batch_index": [3]}
    out = dmd2.DMD2Generate.execute(models["sdxl"], text_conditioning("sdxl"), latent, 0, FOUR_STEP, "").result[0]
    assert out["batch_index"] == [3] and out["samples"].shape == (1, 4, LATENT_SIDE, LATENT_SIDE)
    assert (4, 4) in updates and (1, 4) in updates
    # batch_index selects the 4th noise of the seed, as in SamplerCustom
    ref = SamplerCustom.execute(models["sdxl"], True, 0, 1.0, text_conditioning("sdxl"), text_conditioning("sdxl"),
                                dmd2.dmd2_ksampler(), schedule_sigmas(models["sdxl"], FOUR_STEP, ""), latent).result[0]
    assert torch.equal(out["samples"], ref["samples"])


def test_node_schemas():
    gen = dmd2.DMD2Generate.define_schema()
    assert gen.node_id == "DMD2Generate" and gen.category == "DMD2/sampling"
    assert [i.id for i in gen.inputs] == ["model", "positive", "negative", "latent_image", "seed", "preset", "custom_timesteps", "cfg"]
    assert [i.id for i in gen.inputs if i.optional] == ["negative", "cfg"]  # API prompts without them still run
    assert all(i.tooltip for i in gen.inputs)
    assert [o.io_type for o in gen.outputs] == ["LATENT"]
    smp = dmd2.DMD2Sampler.define_schema()
    assert smp.node_id == "DMD2Sampler" and smp.inputs == [] and [o.io_type for o in smp.outputs] == ["SAMPLER"]
    assert dmd2.NODE_CLASSES == [dmd2.DMD2Sampler, dmd2.DMD2Generate, dmd2.DMD2ReleaseSampler]
    assert "descending" in dmd2.DMD2Generate.validate_inputs("custom", "1,2")
