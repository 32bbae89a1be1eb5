"""The T2I-Adapter hookup in-process: parity with diffusers' adapter pipeline computation,
the factor cut on the actual schedule, stock-sampler compatibility, loading, edge maps and
clear errors on bad input."""

from __future__ import annotations

import comfy.controlnet
import comfy.sample
import comfy.samplers
import comfy.t2i_adapter.adapter
import diffusers
import pytest
import tiny_adapters
import tiny_models
import torch
from comfy_extras.nodes_canny import Canny
from comfy_extras.nodes_custom_sampler import SamplerCustom
from comfyui_dmd2.nodes import adapter as A
from comfyui_dmd2.nodes import sampler as dmd2
from comfyui_dmd2.nodes.schedules import FOUR_STEP, schedule_sigmas
from safetensors.torch import save_file
from test_sampler import diffusers_conditioning

LATENT_SIDE = 16
IMAGE_SIDE = LATENT_SIDE * 8
POOLED_DIM = 32


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_models.build_model(arch) for arch in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {arch: tiny_adapters.save_adapter(arch, folder / f"tiny_{arch}_adapter.safetensors") for arch in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def adapters(adapter_files):
    return {arch: A.load_t2i_adapter_file(str(path)) for arch, path in adapter_files.items()}


def text_conditioning(arch, seed=7):
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(1, 77, tiny_models.UNET_CONFIGS[arch]["context_dim"], generator=gen)
    extra = {"pooled_output": torch.randn(1, POOLED_DIM, generator=gen)} if arch == "sdxl" else {}
    return [[context, extra]]


def edge_image(side=IMAGE_SIDE, seed=3):
    """A sparse binary 'edge map' IMAGE [1, side, side, 3]."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(1, side, side, 1, generator=gen) > 0.85).float().expand(-1, -1, -1, 3).contiguous()


def empty_latent(side=LATENT_SIDE):
    return {"samples": torch.zeros(1, 4, side, side)}


def recording(model):
    """A clone of ``model`` recording, per UNet call, the denoised output and whether a
    control (adapter residuals) reached the UNet."""
    record = {"denoised": [], "control": [], "sigmas": []}
    clone = model.clone()

    def wrapper(apply_model, args):
        control = args["c"].get("control")  # the UNet pops these lists: look before calling it
        record["control"].append(control is not None and any(x is not None for v in control.values() for x in v))
        out = apply_model(args["input"], args["timestep"], **args["c"])
        record["denoised"].append(out.detach().clone())
        record["sigmas"].append(float(args["timestep"][0]))
        return out

    clone.set_model_unet_function_wrapper(wrapper)
    return clone, record


def diffusers_unet(arch, model):
    unet = diffusers.UNet2DConditionModel(**tiny_models.diffusers_unet_config(arch))
    unet.load_state_dict(tiny_models.diffusers_unet_state_dict(arch, tiny_models.unet_state_dict(model)), strict=True)
    return unet.eval()


@torch.no_grad()
def diffusers_adapter_reference(arch, unet, adapter, image, conditioning, start_noise, renoise, timesteps,
                                scale, factor):
    """StableDiffusionXLAdapterPipeline's computation written out: adapter features times the
    scale added to the down blocks for the first int(steps * factor) steps, LCMScheduler steps
    at explicit timesteps. Returns the denoised prediction of every step."""
    scheduler = diffusers.LCMScheduler(original_inference_steps=1000)
    scheduler.set_timesteps(timesteps=list(timesteps))
    context, added = diffusers_conditioning(arch, conditioning, start_noise.shape[-1])
    features = [f * scale for f in adapter(image.movedim(-1, 1))]
    active = int(len(timesteps) * factor)
    latents = start_noise * scheduler.init_noise_sigma
    steps = []
    for i, t in enumerate(scheduler.timesteps):
        residuals = {"down_intrablock_additional_residuals": [f.clone() for f in features]} if i < active else {}
        out = unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added, **residuals).sample
        latents, denoised = scheduler.step(out, t, latents, generator=renoise, return_dict=False)
        steps.append(denoised)
    return steps


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


# -- parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_four_step_adapter_matches_diffusers(models, adapters, arch):
    """Same UNet and adapter weights: the pack's 4 steps (scale 0.8, factor 0.5) equal the
    diffusers adapter pipeline's computation step by step, and the comparison could fail:
    the adapter moves the first steps far more than the tolerance, and a reference with the
    adapter on for 1 or 3 steps does not match."""
    model, seed, scale, factor = models[arch], 1234, 0.8, 0.5
    conditioning, image = text_conditioning(arch), edge_image()
    timesteps = [999, 749, 499, 249]

    applied = A.DMD2ApplyT2IAdapter.execute(conditioning, adapters[arch], image, model, FOUR_STEP, "", scale, factor).result[0]
    clone, record = recording(model)
    out = dmd2.DMD2Generate.execute(clone, applied, empty_latent(), seed, FOUR_STEP, "").result[0]["samples"]
    assert record["control"] == [True, True, False, False]

    unet = diffusers_unet(arch, model)
    adapter = tiny_adapters.build_adapter(arch)
    start_noise = comfy.sample.prepare_noise(empty_latent()["samples"], seed)

    def reference(f, s=scale):
        renoise = torch.Generator().manual_seed(dmd2.renoise_seed(seed))
        return diffusers_adapter_reference(arch, unet, adapter, image, conditioning, start_noise, renoise, timesteps, s, f)

    expected = reference(factor)
    for got, want in zip(record["denoised"], expected):
        assert relative_error(got, want) < 1e-4  # measured ~4e-7
    assert relative_error(model.model.process_latent_in(out), expected[-1]) < 1e-4

    # The comparison can fail: without the adapter the first prediction moves by ~1e-2, and with
    # the adapter on for 1 or 3 steps the later ones by >= 8e-4 (measured), all far above 1e-4.
    assert relative_error(reference(0.0, s=0.0)[0], expected[0]) > 4e-3
    for other in (0.25, 0.75):
        assert max(relative_error(a, b) for a, b in zip(record["denoised"], reference(other))) > 4e-4


def test_stock_controlnet_loader_gives_the_same_adapter(models, adapters, adapter_files):
    """ControlNetLoader's T2IAdapter (SDXL widths follow its assumed ratios) computes the same
    features as the pack's loader, and the apply node accepts it."""
    stock = comfy.controlnet.load_controlnet(str(adapter_files["sdxl"]))
    assert isinstance(stock, comfy.controlnet.T2IAdapter)
    hint = edge_image().movedim(-1, 1)
    with torch.no_grad():
        ours, theirs = adapters["sdxl"].t2i_model(hint), stock.t2i_model(hint)
    for a, b in zip(ours["input"] + ours["middle"], theirs["input"] + theirs["middle"]):
        assert (a is None and b is None) or torch.equal(a, b)
    out = A.DMD2ApplyT2IAdapter.execute(text_conditioning("sdxl"), stock, edge_image(), models["sdxl"], FOUR_STEP, "", 0.8, 0.5)
    assert isinstance(out.result[0][0][1]["control"], A.ScheduledT2IAdapter)


def test_stock_loader_cannot_load_narrow_sd15_adapter_but_ours_can(adapter_files, adapters):
    """Why the pack has its own loader: ComfyUI builds SD1.5 adapters with widths c,2c,4c,4c."""
    with pytest.raises(RuntimeError):
        comfy.controlnet.load_controlnet(str(adapter_files["sd15"]))
    assert adapters["sd15"].t2i_model.channels == [32, 64, 64, 64]
    assert not adapters["sd15"].t2i_model.xl and adapters["sdxl"].t2i_model.xl


# -- the cut on the actual schedule --------------------------------------------------------

@pytest.mark.parametrize("timesteps,factor,active", [
    ("999,749,499,249", 0.5, 2), ("999,749,499,249", 0.25, 1), ("999,749,499,249", 0.75, 3),
    ("999,749,499,249", 1.0, 4), ("999,749,499,249", 0.49, 1), ("999,749,499,249", 0.0, 0),
    ("999,666,333", 0.5, 1), ("999,666,333", 2 / 3, 2), ("399", 0.5, 0), ("399", 1.0, 1),
    ("999,899,799,699,599,499,399,299", 0.5, 4),
])
def test_factor_counts_steps_of_the_schedule(models, timesteps, factor, active):
    model = models["sdxl"]
    sigmas = schedule_sigmas(model, "custom", timesteps)
    steps = [float(s) for s in sigmas[:-1]]
    assert A.active_steps(len(steps), factor) == active
    bounds = A.active_sigma_range(sigmas, factor)
    if active == 0:
        assert bounds is None
        return
    high, low = bounds
    on = [low <= s <= high for s in steps]
    assert on == [True] * active + [False] * (len(steps) - active)
    assert low not in steps  # never on a boundary
    if active < len(steps):
        assert steps[active] < low < steps[active - 1]


def test_factor_zero_leaves_conditioning_untouched(models, adapters):
    conditioning = text_conditioning("sdxl")
    out = A.apply_t2i_adapter(conditioning, adapters["sdxl"], edge_image(), models["sdxl"],
                              schedule_sigmas(models["sdxl"], FOUR_STEP), 0.8, 0.0)
    assert out is conditioning


@pytest.mark.parametrize("sampler", ["dmd2", "lcm"])
def test_works_through_stock_sampler_custom_at_cfg_1(models, adapters, sampler):
    """SamplerCustom at cfg 1 (negative ignored) with the DMD2 sampler or stock lcm and the
    schedule's sigmas: the adapter reaches the UNet on exactly the first two steps."""
    model = models["sdxl"]
    positive = A.DMD2ApplyT2IAdapter.execute(text_conditioning("sdxl"), adapters["sdxl"], edge_image(), model,
                                             FOUR_STEP, "", 0.8, 0.5).result[0]
    negative = text_conditioning("sdxl", seed=9)
    sampler_object = dmd2.dmd2_ksampler() if sampler == "dmd2" else comfy.samplers.sampler_object("lcm")
    clone, record = recording(model)
    sigmas = schedule_sigmas(model, FOUR_STEP)
    SamplerCustom.execute(clone, True, 5, 1.0, positive, negative, sampler_object, sigmas, empty_latent())
    assert record["control"] == [True, True, False, False]
    assert record["sigmas"] == pytest.approx([float(s) for s in sigmas[:-1]])


def test_chains_after_an_existing_control(models, adapters):
    model = models["sdxl"]
    sigmas = schedule_sigmas(model, FOUR_STEP)
    first = A.apply_t2i_adapter(text_conditioning("sdxl"), adapters["sdxl"], edge_image(seed=1), model, sigmas, 0.5, 1.0)
    second = A.apply_t2i_adapter(first, adapters["sdxl"], edge_image(seed=2), model, sigmas, 0.8, 0.5)
    assert second[0][1]["control"].previous_controlnet is first[0][1]["control"]
    assert "control" not in text_conditioning("sdxl")[0][1]
    clone, record = recording(model)
    dmd2.DMD2Generate.execute(clone, second, empty_latent(), 0, FOUR_STEP, "")
    assert record["control"] == [True] * 4  # the first adapter runs on every step


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter_arch,model_arch", [("sd15", "sdxl"), ("sdxl", "sd15")])
def test_adapter_for_another_model_family_is_refused(models, adapters, adapter_arch, model_arch):
    image = edge_image(side=128)
    with pytest.raises(A.AdapterError, match="T2I-Adapter .* does not match") as err:
        A.DMD2ApplyT2IAdapter.execute(text_conditioning(model_arch), adapters[adapter_arch], image, models[model_arch],
                                      FOUR_STEP, "", 0.8, 0.5)
    assert ("SD1.5" if adapter_arch == "sd15" else "SDXL") in str(err.value)


@pytest.mark.parametrize("arch,side,multiple", [("sdxl", 100, 32), ("sdxl", 144, 32), ("sd15", 96, 64)])
def test_image_size_not_a_multiple_of_the_downscale(models, adapters, arch, side, multiple):
    with pytest.raises(A.AdapterError, match=f"multiple of {multiple}"):
        A.DMD2ApplyT2IAdapter.execute(text_conditioning(arch), adapters[arch], edge_image(side=side), models[arch],
                                      FOUR_STEP, "", 0.8, 0.5)


@pytest.mark.parametrize("image,message", [
    (torch.zeros(0, 128, 128, 3), "empty"),
    (torch.zeros(1, 128, 128), "shape"),
    (None, "NoneType"),
    ("edges.png", "str"),
    (torch.zeros(1, 128, 128, 3, dtype=torch.uint8), "floats"),
    (torch.zeros(1, 128, 128, 2), "channels"),
    (torch.full((1, 128, 128, 3), float("nan")), "NaN"),
])
def test_non_image_input_is_refused(models, adapters, image, message):
    with pytest.raises(A.AdapterError, match=message):
        A.DMD2ApplyT2IAdapter.execute(text_conditioning("sdxl"), adapters["sdxl"], image, models["sdxl"],
                                      FOUR_STEP, "", 0.8, 0.5)


def test_not_an_adapter_is_refused(models, adapters):
    with pytest.raises(A.AdapterError, match="T2I-Adapter"):
        A.apply_t2i_adapter(text_conditioning("sdxl"), object(), edge_image(), models["sdxl"],
                            schedule_sigmas(models["sdxl"], FOUR_STEP), 0.8, 0.5)
    with pytest.raises(A.AdapterError, match="factor"):
        A.apply_t2i_adapter(text_conditioning("sdxl"), adapters["sdxl"], edge_image(), models["sdxl"],
                            schedule_sigmas(models["sdxl"], FOUR_STEP), 0.8, 1.5)


def test_generation_size_that_does_not_fit_the_adapter_fails_clearly(models, adapters):
    """ComfyUI would log 'control could not be applied' and silently drop the adapter."""
    model = models["sdxl"]
    positive = A.DMD2ApplyT2IAdapter.execute(text_conditioning("sdxl"), adapters["sdxl"], edge_image(), model,
                                             FOUR_STEP, "", 0.8, 0.5).result[0]
    with pytest.raises(A.AdapterError, match="generation size 144x144 is not a multiple of 32"):
        dmd2.DMD2Generate.execute(model, positive, empty_latent(side=18), 0, FOUR_STEP, "")


def test_loader_refuses_files_that_are_not_adapters(tmp_path, adapter_files):
    not_adapter = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(not_adapter))
    with pytest.raises(A.AdapterError, match="not a T2I-Adapter"):
        A.load_t2i_adapter_file(str(not_adapter))

    state = tiny_adapters.adapter_state_dict(tiny_adapters.build_adapter("sdxl"))
    truncated = {k: v for k, v in state.items() if not k.startswith("adapter.body.3.")}
    with pytest.raises(A.AdapterError, match="resnet blocks"):
        A.load_t2i_adapter_state_dict(truncated)
    reshaped = dict(state)
    reshaped["adapter.body.1.resnets.0.block2.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(A.AdapterError, match="shape"):
        A.load_t2i_adapter_state_dict(reshaped)


def test_loader_reads_fp16_files(tmp_path):
    path = tiny_adapters.save_adapter("sdxl", tmp_path / "half.safetensors", dtype=torch.float16)
    control = A.load_t2i_adapter_file(str(path))
    reference = tiny_adapters.build_adapter("sdxl").half().float()
    hint = edge_image().movedim(-1, 1)
    with torch.no_grad():
        ours = [f for f in control.t2i_model(hint)["input"] if f is not None]
        theirs = reference(hint)
    torch.testing.assert_close(ours[-1], theirs[0], rtol=1e-4, atol=1e-4)


# -- edge maps ------------------------------------------------------------------------------

def square_image(width, height, box):
    """Black IMAGE with a white rectangle box=(x0, y0, x1, y1)."""
    image = torch.zeros(1, height, width, 3)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1] = 1.0
    return image


def test_edge_map_is_comfys_canny_at_the_detection_size():
    image = square_image(96, 96, (24, 24, 72, 72))
    ours = A.DMD2CannyEdgeMap.execute(image, 96, 96, 96, A.LOW_THRESHOLD, A.HIGH_THRESHOLD).result[0]
    stock = Canny.execute(image, A.LOW_THRESHOLD, A.HIGH_THRESHOLD).result[0]
    assert torch.equal(ours, stock)
    assert ours[0, 48, 21:27].max() == 1.0 and ours[0, 48, 30:66].max() == 0.0 and ours[0, :15, :15].max() == 0.0


def test_edge_map_detects_at_resolution_and_resizes_to_generation_size():
    image = square_image(300, 300, (75, 75, 225, 225))
    edges = A.DMD2CannyEdgeMap.execute(image, 64, 128, 128, A.LOW_THRESHOLD, A.HIGH_THRESHOLD).result[0]
    assert edges.shape == (1, 128, 128, 3) and edges.dtype == torch.float32
    assert 0.0 <= float(edges.min()) and float(edges.max()) <= 1.0
    row = edges[0, 64, :, 0]
    assert row[28:36].max() > 0.5 and row[92:100].max() > 0.5  # the square's sides at 1/4 and 3/4
    assert row[45:83].max() == 0.0 and row[:20].max() == 0.0
    # detected at 64 px then upscaled 2x: lines are ~2 px wide and smooth (bilinear), not 1 px
    assert (row > 0).sum() >= 4


def test_edge_map_crops_to_the_output_aspect_instead_of_stretching():
    image = square_image(256, 128, (4, 0, 12, 128))  # a bar near the left edge of a wide image
    edges = A.DMD2CannyEdgeMap.execute(image, 64, 64, 64, A.LOW_THRESHOLD, A.HIGH_THRESHOLD).result[0]
    assert edges.shape == (1, 64, 64, 3)
    assert edges.max() == 0.0  # the centre crop holds no edge
    assert A.detection_size(1024, 1024, 384) == (384, 384)
    assert A.detection_size(1536, 1024, 384) == (576, 384)


@pytest.mark.parametrize("image,low,high,message", [
    (torch.zeros(0, 64, 64, 3), 0.05, 0.1, "non-empty"),
    ("photo.png", 0.05, 0.1, "str"),
    (torch.zeros(1, 64, 64, 3), 0.2, 0.1, "low_threshold < high_threshold"),
])
def test_edge_map_bad_input(image, low, high, message):
    with pytest.raises(A.AdapterError, match=message):
        A.DMD2CannyEdgeMap.execute(image, 64, 64, 64, low, high)


def test_node_schemas_have_tooltips():
    for node in A.NODE_CLASSES:
        schema = node.define_schema()
        assert schema.node_id.startswith("DMD2") and schema.category == "DMD2/adapter"
        for item in schema.inputs:
            assert item.tooltip, f"{schema.node_id}.{item.id} has no tooltip"
    inputs = [i.id for i in A.DMD2ApplyT2IAdapter.define_schema().inputs]
    assert inputs == ["positive", "control_net", "image", "model", "preset", "custom_timesteps", "scale", "factor"]


# -- the real adapters' layouts (meta device: names and shapes only) -------------------------

REAL_ADAPTERS = {
    "sdxl": {"in_channels": 3, "channels": [320, 640, 1280, 1280], "num_res_blocks": 2, "downscale_factor": 16,
             "adapter_type": "full_adapter_xl"},
    "sd15": {"in_channels": 3, "channels": [320, 640, 1280, 1280], "num_res_blocks": 2, "downscale_factor": 8,
             "adapter_type": "full_adapter"},
}
REAL_UNETS = {"sdxl": {"model_channels": 320, "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2]},
              "sd15": {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2]}}


class _FakeModel:
    """Just enough of a ModelPatcher for the architecture check."""

    def __init__(self, unet_config):
        self.model = type("SDXL", (), {"model_config": type("Config", (), {"unet_config": unet_config})()})()


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_real_adapter_keys_map_onto_comfys_network(arch):
    """The real adapters' diffusers keys land exactly on ComfyUI's Adapter of the same widths,
    and the layout read from it fits the real UNet of its family and not the other."""
    with torch.device("meta"):
        real = diffusers.T2IAdapter(**REAL_ADAPTERS[arch])
        cin = REAL_ADAPTERS[arch]["in_channels"] * REAL_ADAPTERS[arch]["downscale_factor"] ** 2
        comfy_net = comfy.t2i_adapter.adapter.Adapter(cin=cin, channels=[320, 640, 1280, 1280], nums_rb=2, ksize=1,
                                                      sk=True, use_conv=False, xl=arch == "sdxl")
    mapped = A.diffusers_to_tencent_keys(real.state_dict())
    expected = comfy_net.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)

    control = comfy.controlnet.T2IAdapter(comfy_net, comfy_net.input_channels, 8, "nearest-exact")
    layout = A.adapter_layout(control)
    assert layout.family == ("SDXL" if arch == "sdxl" else "SD1.5")
    assert layout.total_downscale == real.total_downscale_factor
    A.check_adapter_fits_model(layout, _FakeModel(REAL_UNETS[arch]))
    other = "sd15" if arch == "sdxl" else "sdxl"
    with pytest.raises(A.AdapterError, match="does not match"):
        A.check_adapter_fits_model(layout, _FakeModel(REAL_UNETS[other]))
