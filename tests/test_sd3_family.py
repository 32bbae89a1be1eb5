"""SD3 / SD3.5 as the second flow family (#25 item 5): one small module (bases/sd3.py) on the shared
family interface. ComfyUI's own SD3 model class (tiny MMDiT) is read on its own flow sampling, called
at 1000 * t with CFG for its real score, trained by the shared-base backend, and exported as a LoRA
that ComfyUI's stock loader applies key for key."""

import copy

import comfy.lora
import comfy.sd
import pytest
import tiny_models
import torch
from comfyui_dmd2 import bases
from comfyui_dmd2.training.backend import (
    Conditioning,
    SharedBaseBackend,
    TrainingData,
    export_generator_lora,
)
from comfyui_dmd2.training.trainer import DMD2Trainer
from test_flux_training import config, gradients_with_and_without_checkpointing

LATENT = (16, 8, 8)


def conditioning(seed):
    gen = torch.Generator().manual_seed(seed)
    return Conditioning(context=torch.randn(1, 5, 4096, generator=gen), y=torch.randn(1, 2048, generator=gen))


@pytest.fixture(scope="module")
def sd3():
    return tiny_models.build_sd3()


def backend_for(model, real=4, **kwargs):
    gen = torch.Generator().manual_seed(5)
    data = TrainingData([conditioning(s) for s in range(3)], conditioning(99),
                        real_latents=torch.randn(real, *LATENT, generator=gen) if real else None)
    kwargs = {"lora_rank": 4, "lora_alpha": 4.0, "device": "cpu", "seed": 0, **kwargs}
    return SharedBaseBackend(copy.deepcopy(model.model), data, LATENT, **kwargs)


def test_sd3_is_read_on_its_own_flow_sampling(sd3):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    family = bases.family_of(sd3)
    assert (family.name, family.prediction, family.guidance, family.network) == ("sd3", "flow", None, bases.MMDIT_NETWORK)
    assert family.process.shift == 3.0  # stabilityai/stable-diffusion-3.5-large scheduler_config.json: shift 3.0
    (patched,) = ModelSamplingSD3().patch(sd3, 6.0)
    assert bases.family_of(patched).process.shift == 6.0
    assert bases.family_of(tiny_models.build_flux()).name == "flux_dev"  # each reader keeps to its own class


def test_sd3_x0_is_comfys_denoised_at_the_grid_time_and_cfg_is_one_extra_pass(sd3):
    backend = backend_for(sd3, real=0)
    cond, uncond = conditioning(3), conditioning(99)
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([749])
    sigma = torch.tensor([3.0 * 0.75 / (1 + 2.0 * 0.75)])  # shift 3 at u = 0.75: 0.9
    denoised = sd3.model.apply_model(x, sigma, c_crossattn=cond.context, y=cond.y)
    torch.testing.assert_close(backend._x0(x, t, cond, None), denoised.float(), rtol=1e-5, atol=1e-5)
    plain = sd3.model.apply_model(x, sigma, c_crossattn=uncond.context, y=uncond.y)
    guided = backend.real_x0(x, t, cond, uncond, 4.5)  # SD3.5 Medium's card guidance
    torch.testing.assert_close(guided, (plain + 4.5 * (denoised - plain)).float(), rtol=1e-4, atol=1e-4)
    backend.close()


def test_sd3_lora_covers_both_streams_and_the_second_self_attention(sd3):
    backend = backend_for(sd3, real=0)
    paths = set(backend.adapters.layers)
    assert {"joint_blocks.0.x_block.attn2.qkv", "joint_blocks.0.context_block.attn.qkv", "joint_blocks.0.context_block.mlp.fc2",
            "joint_blocks.1.x_block.mlp.fc1"} <= paths
    assert not any(p.startswith("joint_blocks.1.context_block.mlp") for p in paths)  # the last context block is pre-only
    backend.close()


def test_sd3_trains_with_cfg_and_gan_and_the_stock_loader_applies_every_key(sd3, tmp_path):
    torch.manual_seed(0)
    backend = backend_for(sd3)
    trainer = DMD2Trainer(config(steps=3, real_guidance_scale=3.5), backend)
    history = trainer.run(progress=False)
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in history)
    assert backend.head.size == (4, 4)
    path = export_generator_lora(trainer, backend, tmp_path / "sd3_dmd2.safetensors", {"dmd2_arch": "sd3"}, averaged=False)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(sd3.model, {}))
    assert len(patches) == len(backend.adapters.layers)
    patched, _ = comfy.sd.load_lora_for_models(sd3, None, lora, 1.0, 0.0)
    patched.patch_model()
    try:
        cond, x, t = conditioning(4), torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(2)), torch.tensor([499])
        stock = patched.model.apply_model(x, backend.family.process.time(t).float(), c_crossattn=cond.context, y=cond.y)
        torch.testing.assert_close(stock.float(), backend.generator_x0(x, t, cond), rtol=2e-3, atol=2e-3)
    finally:
        patched.unpatch_model()
    backend.close()


def test_sd3_joint_blocks_checkpoint_with_the_same_gradients(sd3):
    cond = Conditioning(context=torch.cat([conditioning(0).context] * 2), y=torch.cat([conditioning(0).y] * 2))
    plain, checkpointed = gradients_with_and_without_checkpointing(lambda **kw: backend_for(sd3, **kw), cond)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def sd3_reference(model, steps, conditioning, start_noise, renoise_generator):
    """StableDiffusion3Pipeline's loop (transformer(timestep=1000*t), scheduler.step, no CFG) with
    the SD3.5 scheduler config (FlowMatchEulerDiscreteScheduler, shift 3.0, static) on the DMD2
    grid linspace(1, 1/N, N) and the DMD2 update (stochastic_sampling: x0, then fresh noise)."""
    import diffusers
    import numpy as np

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, stochastic_sampling=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    net = model.model.diffusion_model
    context, pooled = conditioning[0][0], conditioning[0][1]["pooled_output"]
    latents = start_noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = net(latents, t.expand(1), context=context, y=pooled)
            latents = scheduler.step(v, t, latents, generator=renoise_generator, return_dict=False)[0]
    return latents


def test_dmd2_flow_preset_samples_sd3_as_the_scheduler_does(sd3):
    """DMD2Generate's 4-step flow preset on an SD3 model runs on SD3's own shift (3) and equals
    diffusers' FlowMatchEulerDiscreteScheduler driven as the SD3 pipeline drives it."""
    import comfy.sample
    from comfyui_dmd2.nodes import sampler as dmd2

    cond = conditioning(8)
    conditioning_ = [[cond.context, {"pooled_output": cond.y}]]
    latent = {"samples": torch.zeros(1, *LATENT)}
    out = dmd2.DMD2Generate.execute(sd3, conditioning_, latent, 11, "DMD2 flow 4-step (Flux dev shift)", "").result[0]["samples"]
    start = comfy.sample.prepare_noise(latent["samples"], 11)
    expected = sd3_reference(sd3, 4, conditioning_, start, torch.Generator().manual_seed(dmd2.renoise_seed(11)))
    assert float((sd3.model.process_latent_in(out) - expected).abs().max()) < 1e-4


def test_the_command_and_the_node_refuse_an_sd3_model_in_one_line(sd3):
    """The backend trains SD3, but the command and the node do not load it yet (its three text
    encoders, a recipe): refused in one line naming the family, not a crash later."""
    from comfyui_dmd2.training.checkpoint import UnsupportedModel, detect_family

    with pytest.raises(UnsupportedModel) as info:
        detect_family(sd3)
    assert "flow-matching model (SD3.5)" in str(info.value) and "\n" not in str(info.value)
