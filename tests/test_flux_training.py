"""The trainer on a flow model (#25): the shared-base backend on ComfyUI's own Flux class (tiny),
through its ``bases.FluxNetwork``: flow time on the training grid, the embedded guidance, LoRA on
the double and single blocks, the GAN head on the last double block's image tokens, export as a
kohya LoRA that ComfyUI's stock loader applies key for key."""

import copy

import comfy.lora
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import pytest
import tiny_models
import torch
from comfyui_dmd2 import bases
from comfyui_dmd2.bases.flux import DOUBLE_BLOCK_TARGETS, SINGLE_BLOCK_TARGETS
from comfyui_dmd2.training.backend import (
    Conditioning,
    SharedBaseBackend,
    TrainingData,
    export_generator_lora,
)
from comfyui_dmd2.training.config import DMD2Config
from comfyui_dmd2.training.trainer import DMD2Trainer

LATENT = (16, 8, 8)  # 16 latent channels, 8x8: a 4x4 token grid


def conditioning(seed):
    gen = torch.Generator().manual_seed(seed)
    return Conditioning(context=torch.randn(1, 6, 4096, generator=gen), y=torch.randn(1, 768, generator=gen))


def training_data(real=4):
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(real, *LATENT, generator=gen) if real else None
    return TrainingData([conditioning(s) for s in range(3)], conditioning(99), real_latents=latents)


@pytest.fixture(scope="module")
def flux_dev():
    return tiny_models.build_flux()


def backend_for(model, real=4, **kwargs):
    base = copy.deepcopy(model.model)
    kwargs = {"lora_rank": 4, "lora_alpha": 4.0, "device": "cpu", "seed": 0, **kwargs}
    return SharedBaseBackend(base, training_data(real), LATENT, **kwargs)


def config(**overrides):
    values = {"generator_timesteps": (999, 749, 499, 249), "real_guidance_scale": 1.0, "batch_size": 2, "grad_accum": 1,
              "steps": 3, "warmup_steps": 0, "gan_generator_weight": 1e-2, "gan_discriminator_weight": 1e-2,
              "fake_updates_per_generator_update": 2, "lr_generator": 1e-3, "lr_fake_score": 1e-3, "lr_gan_head": 1e-3,
              "seed": 0, **overrides}
    return DMD2Config.for_arch("sd15", **values)


def test_flux_backend_reads_the_family_and_adapts_the_double_and_single_blocks(flux_dev):
    backend = backend_for(flux_dev)
    assert backend.family.name == "flux_dev" and backend.network is bases.FLUX_NETWORK
    paths = set(backend.adapters.layers)
    expected = {f"double_blocks.0.{t}" for t in DOUBLE_BLOCK_TARGETS} | {f"single_blocks.0.{t}" for t in SINGLE_BLOCK_TARGETS}
    assert paths == expected  # the tiny model has one block of each kind
    # the GAN head reads the 4x4 token grid at the model's width (64: below the projection width)
    x = torch.randn(2, *LATENT)
    logits = backend.fake_logits(x, torch.tensor([10, 900]), training_data().prompts[0].__class__(
        context=torch.cat([conditioning(0).context] * 2), y=torch.cat([conditioning(0).y] * 2)))
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    assert backend.head.size == (4, 4)
    backend.close()


def test_the_network_is_called_on_flow_time_with_the_embedded_guidance(flux_dev):
    """The base network gets sigma = shift((k+1)/1000) and the family's guidance (3.5): its x0 is
    what ComfyUI's own apply_model denoises to at that sigma (x - sigma*v for flow)."""
    backend = backend_for(flux_dev, real=0)
    cond = conditioning(3)
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([749])
    sigma = backend.family.process.time(t).float()
    assert float(sigma) == pytest.approx(3.158 * 0.75 / (1 + 2.158 * 0.75), rel=1e-3)  # [dev] at 1024 px: shift e^1.15
    denoised = flux_dev.model.apply_model(x, sigma, c_crossattn=cond.context, y=cond.y, guidance=torch.tensor([3.5]))
    torch.testing.assert_close(backend._x0(x, t, cond, None), denoised.float(), rtol=1e-5, atol=1e-5)
    unguided = flux_dev.model.apply_model(x, sigma, c_crossattn=cond.context, y=cond.y, guidance=torch.tensor([1.0]))
    assert (unguided - denoised).abs().max() > 1e-4  # the guidance input is read
    backend.close()


def _trained(flux_dev, steps=3, **kwargs):
    torch.manual_seed(0)
    backend = backend_for(flux_dev, **kwargs)
    trainer = DMD2Trainer(config(steps=steps), backend)
    history = trainer.run(progress=False)
    return backend, trainer, history


def test_dmd2_trains_lora_g_f_and_the_head_on_flux_and_leaves_the_base_alone(flux_dev):
    base_before = {k: v.clone() for k, v in flux_dev.model.diffusion_model.state_dict().items()}
    backend, _, history = _trained(flux_dev)
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in history)
    assert any("loss_gan_discriminator" in row for row in history) and any("loss_dm" in row for row in history)
    g = dict(backend.generator_parameters())
    assert any(p.abs().sum() > 0 for k, p in g.items() if k.endswith("lora_up.weight"))  # LoRA G moved off zero
    f = dict(backend.fake_score_parameters())
    assert any(p.abs().sum() > 0 for k, p in f.items() if k.endswith("lora_up.weight"))
    backend.close()
    for key, value in flux_dev.model.diffusion_model.state_dict().items():  # the fixture's model: a deep copy trained
        assert torch.equal(value, base_before[key])


def test_exported_flux_lora_is_applied_key_for_key_by_the_stock_loader(flux_dev, tmp_path):
    backend, trainer, _ = _trained(flux_dev, steps=2)
    path = export_generator_lora(trainer, backend, tmp_path / "flux_dmd2.safetensors", {"dmd2_arch": "flux_dev"}, averaged=False)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert all(k.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_")) for k in lora)
    key_map = comfy.lora.model_lora_keys_unet(flux_dev.model, {})
    patches = comfy.lora.load_lora(lora, key_map)
    assert len(patches) == len(backend.adapters.layers)  # every layer, no key left over
    patched, _ = comfy.sd.load_lora_for_models(flux_dev, None, lora, 1.0, 0.0)
    patched.patch_model()
    try:
        cond, x, t = conditioning(4), torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(2)), torch.tensor([499])
        sigma = backend.family.process.time(t).float()
        stock = patched.model.apply_model(x, sigma, c_crossattn=cond.context, y=cond.y, guidance=torch.tensor([3.5]))
        ours = backend.generator_x0(x, t, cond)
        torch.testing.assert_close(stock.float(), ours, rtol=2e-3, atol=2e-3)  # the file is fp16
    finally:
        patched.unpatch_model()
    backend.close()


def gradients_with_and_without_checkpointing(make_backend, cond):
    """LoRA G's gradients of one loss on a backend built without and with gradient
    checkpointing (``make_backend(gradient_checkpointing=...)``), LoRA G moved off zero first so
    that its down factors get gradients too."""
    grads = []
    for checkpointing in (False, True):
        backend = make_backend(gradient_checkpointing=checkpointing)
        assert backend.gradient_checkpointing is checkpointing
        x = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(3))
        params = [p for _, p in backend.generator_parameters()]
        with torch.no_grad():
            for p in params:
                p.add_(0.01)
        loss = backend.generator_x0(x, torch.tensor([999, 249]), cond).square().mean()
        grads.append(torch.autograd.grad(loss, params))
        backend.close()
    return grads


def test_gradient_checkpointing_of_flux_blocks_gives_the_same_gradients(flux_dev):
    cond = Conditioning(context=torch.cat([conditioning(0).context] * 2), y=torch.cat([conditioning(0).y] * 2))
    plain, checkpointed = gradients_with_and_without_checkpointing(lambda **kw: backend_for(flux_dev, **kw), cond)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_flux_training_resumes_bit_identically(flux_dev):
    backend, trainer, _ = _trained(flux_dev, steps=2)
    state = copy.deepcopy(trainer.state_dict())
    backend_state = copy.deepcopy(backend.state_dict())
    trainer.run(2, progress=False)
    straight = {k: p.detach().clone() for k, p in backend.generator_parameters()}
    backend.close()

    torch.manual_seed(0)
    resumed_backend = backend_for(flux_dev)
    resumed = DMD2Trainer(config(steps=2), resumed_backend)
    resumed.load_state_dict(state)
    resumed_backend.load_state_dict(backend_state)
    resumed.run(2, progress=False)
    for k, p in resumed_backend.generator_parameters():
        assert torch.equal(p, straight[k]), k
    resumed_backend.close()


def test_an_fp8_base_trains_through_comfyuis_manual_cast_and_merged_layers_cast_it():
    """A Flux base stored in float8 e4m3fn, each layer computed in bf16 by ComfyUI's manual-cast
    layers (ComfyUI's fp8 loading; ``--base-dtype fp8``): LoRA G/F and the head train on it and
    the base stays fp8 and unchanged; the merged mode (``lora_merged``) casts the fp8 weight
    before adding the delta (fp8 has no arithmetic) and gives the unmerged output."""
    from comfyui_dmd2.training import memory

    model_config = comfy.supported_models.Flux(dict(tiny_models.FLUX_CONFIG))
    memory.set_base_dtype(model_config, torch.float8_e4m3fn, torch.bfloat16)
    base = model_config.get_model({})
    tiny_models.init_weights_(base.diffusion_model, 0)
    assert {p.dtype for p in base.diffusion_model.parameters()} == {torch.float8_e4m3fn}
    before = {k: v.clone() for k, v in base.diffusion_model.state_dict().items()}
    x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(3))
    cond = Conditioning(context=torch.cat([conditioning(0).context] * 2), y=torch.cat([conditioning(0).y] * 2))
    outputs = []
    for merged in (False, True):
        torch.manual_seed(0)
        backend = backend_for(comfy.model_patcher.ModelPatcher(base, "cpu", "cpu"), mixed_precision="bf16", lora_merged=merged)
        with torch.no_grad():
            for _, p in backend.generator_parameters():
                p.add_(0.01)
            outputs.append(backend.generator_x0(x, torch.tensor([999, 249]), cond))
        history = DMD2Trainer(config(steps=2), backend).run(progress=False)
        assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in history)
        frozen = {k.replace(".base.", "."): v for k, v in backend.unet.state_dict().items() if ".adapters." not in k}
        assert frozen.keys() == before.keys()
        for key, value in frozen.items():  # the trained copy's base: still fp8, bit for bit
            assert value.dtype == torch.float8_e4m3fn and torch.equal(value.view(torch.uint8), before[key].view(torch.uint8)), key
        backend.close()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)  # bf16 compute, two orders of adds
