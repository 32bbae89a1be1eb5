"""The shared-base backend on ComfyUI checkpoints: loading and refusals, encodings, forwards,
data pairing for the discriminator, full iterations (accumulation, checkpointing)."""

from __future__ import annotations

import copy

import pytest
import torch
from comfyui_dmd2.training import backend as B
from comfyui_dmd2.training import checkpoint as C
from comfyui_dmd2.training.config import DMD2Config
from comfyui_dmd2.training.trainer import DMD2Trainer
from PIL import Image
from safetensors.torch import load_file, save_file

RES = 128


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    return {arch: C.load_checkpoint(path) for arch, path in tiny_checkpoints.items()}


def _backend(loaded, arch, images=None, captions=None, **kwargs):
    # Each backend gets its own UNet: adapters are injected into the module tree.
    model = copy.deepcopy(loaded[arch].model.model)
    prompts = C.encode_prompts(loaded[arch], ["a red cube", "a tree by the sea, long prompt " * 12], RES)
    uncond = C.encode_prompts(loaded[arch], [""], RES)[0]
    kwargs.setdefault("lora_rank", 4)
    data = B.TrainingData(prompts, uncond, images, captions)
    return B.SharedBaseBackend(model, data, (4, RES // 8, RES // 8), **kwargs)


def test_loads_tiny_checkpoints_and_detects_arch(loaded):
    assert loaded["sd15"].arch == "sd15"
    assert loaded["sdxl"].arch == "sdxl"


def test_missing_corrupt_and_unsupported_checkpoints(tmp_path, tiny_checkpoints):
    with pytest.raises(C.CheckpointError, match="not found"):
        C.load_checkpoint(tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(C.CheckpointError, match="corrupt"):
        C.load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_checkpoints["sd15"].read_bytes()[:5000])
    with pytest.raises(C.CheckpointError):
        C.load_checkpoint(truncated)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(C.UnsupportedModel, match="does not recognise"):
        C.load_checkpoint(other)
    vpred = tmp_path / "vpred.safetensors"  # v-prediction loads (#24); an EDM one (Playground's keys) is refused naming it
    save_file({**load_file(str(tiny_checkpoints["sdxl"])), "v_pred": torch.tensor([])}, str(vpred))
    assert C.load_checkpoint(vpred).family.sampling_label == "v"
    edm = tmp_path / "edm.safetensors"
    save_file({**load_file(str(tiny_checkpoints["sdxl"])), "edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)}, str(edm))
    with pytest.raises(C.UnsupportedModel, match="ModelSamplingContinuousEDM") as info:
        C.load_checkpoint(edm)
    assert "\n" not in str(info.value)


def test_prompt_encodings_have_sdxl_size_conditioning(loaded):
    sd15 = C.encode_prompts(loaded["sd15"], ["a cat"], RES)[0]
    assert sd15.context.shape == (1, 77, 32) and sd15.y is None
    sdxl = C.encode_prompts(loaded["sdxl"], ["a cat"], RES)[0]
    assert sdxl.context.shape == (1, 77, 64)
    assert sdxl.y.shape == (1, 32 + 6 * 256)
    other_size = C.encode_prompts(loaded["sdxl"], ["a cat"], 2 * RES)[0]
    torch.testing.assert_close(other_size.y[:, :32], sdxl.y[:, :32])  # same pooled text
    assert not torch.equal(other_size.y[:, 32:], sdxl.y[:, 32:])  # different size embedding


def test_images_encode_and_decode(loaded, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (160 + 20 * i, 140), (40 * i, 100, 200)).save(p)
        paths.append(p)
    latents = C.encode_images(loaded["sd15"], paths, RES, batch_size=2)
    assert latents.shape == (3, 4, RES // 8, RES // 8)
    images = C.decode_latents(loaded["sd15"], latents[:1])
    assert images.shape == (1, RES, RES, 3)
    assert 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_three_networks_share_one_frozen_unet(loaded, arch):
    backend = _backend(loaded, arch)
    batch = backend.sample_batch(2)
    assert batch.shape == (2, 4, RES // 8, RES // 8)
    assert batch.cond.context.shape[1] == 154  # prompts of 77 and 154 tokens batched at their lcm
    x_t = torch.randn(batch.shape)
    t = torch.tensor([999, 500])
    with torch.no_grad():
        real1 = backend.real_x0(x_t, t, batch.cond, batch.uncond, 1.0)
        gen = backend.generator_x0(x_t, t, batch.cond)
        real = backend.real_x0(x_t, t, batch.cond, batch.uncond, 3.0)
        eps_c = backend.raw(x_t, t, batch.cond, None)
        eps_u = backend.raw(x_t, t, batch.uncond, None)
    torch.testing.assert_close(gen, real1)  # fresh adapters: generator == base
    expected = backend.family.to_x0(x_t, eps_u + 3.0 * (eps_c - eps_u), t)
    torch.testing.assert_close(real, expected, rtol=1e-4, atol=1e-4)
    # Only adapters are trainable; the base is shared and frozen.
    base_params = [p for n, p in backend.unet.named_parameters() if ".adapters." not in n]
    assert base_params and not any(p.requires_grad for p in base_params)


def test_gan_head_logits_and_gradients(loaded):
    real = torch.randn(4, 4, RES // 8, RES // 8)
    backend = _backend(loaded, "sd15", images=real)
    assert backend.has_gan_head
    batch = backend.sample_batch(2)
    assert batch.real_x0.shape == batch.shape
    x_t = torch.randn(batch.shape, requires_grad=True)
    logits = backend.fake_logits(x_t, torch.tensor([500, 100]), batch.cond)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in backend.fake_score_parameters() if n.startswith("gan_head."))
    assert all(p.grad is None for _, p in backend.generator_parameters())


def test_gan_head_runs_in_fp32_outside_autocast(loaded):
    """As the reference's classifier head: the fake score's features come out of the bf16
    pass, the head computes on them in fp32 (#26)."""
    backend = _backend(loaded, "sd15", images=torch.randn(4, 4, RES // 8, RES // 8), mixed_precision="bf16")
    seen = []
    backend.head.net[0].register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, torch.is_autocast_enabled("cpu"))))
    features = []
    backend.unet.middle_block[0].register_forward_hook(lambda module, args, out: features.append(out.dtype))
    batch = backend.sample_batch(2)
    logits = backend.fake_logits(torch.randn(batch.shape), torch.tensor([500, 100]), batch.cond)
    assert features == [torch.bfloat16]  # the UNet pass is under autocast
    assert seen == [(torch.float32, False)] and logits.dtype == torch.float32


def test_full_fake_score_predicts_for_the_dm_gradient_in_fp32(loaded):
    """As the reference: the full fp32 fake score's prediction inside the DM loss (no grad)
    runs without autocast; its training pass and LoRA F's passes stay under autocast (#26)."""
    for full in (True, False):
        backend = _backend(loaded, "sd15", mixed_precision="bf16", full_copies=("fake_score",) if full else ())
        seen = []
        backend._module("fake_score").input_blocks[0][0].register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
        batch = backend.sample_batch(2)
        x_t, t = torch.randn(batch.shape), torch.tensor([500, 100])
        with torch.no_grad():
            backend.fake_x0(x_t, t, batch.cond)
        backend.fake_x0(x_t, t, batch.cond)
        assert seen == ([False, True] if full else [True, True])


def test_sdxl_unconditional_side_is_zero_text_with_the_size_conditioning(loaded):
    """--uncond: zeros (SDXL's default, the reference's) zeroes the context and the pooled
    text and keeps the size embeddings; empty (SD1.5's default) is the encoded empty prompt."""
    from comfyui_dmd2.training.config import DMD2Config

    assert DMD2Config.for_arch("sdxl").uncond == "zeros" and DMD2Config.for_arch("sd15").uncond == "empty"
    texts = C.RunTexts(["a red cube"], ["a tree"], [])
    conds = C.encode_prompts(loaded["sdxl"], texts.all(), RES)
    empty, _ = texts.split(conds, None, "empty")
    zeros, previews = texts.split(conds, None, "zeros")
    assert empty.uncond is conds[0] and zeros.prompts[0] is conds[1] and previews[0] is conds[2]
    assert not torch.equal(conds[0].context, torch.zeros_like(conds[0].context))
    assert torch.equal(zeros.uncond.context, torch.zeros_like(conds[0].context))
    pooled = conds[0].y.shape[1] - 6 * 256
    assert conds[0].y[:, :pooled].abs().sum() > 0 and torch.equal(zeros.uncond.y[:, :pooled], torch.zeros(1, pooled))
    torch.testing.assert_close(zeros.uncond.y[:, pooled:], conds[0].y[:, pooled:], rtol=0, atol=0)
    sd15 = C.zero_conditioning(C.encode_prompts(loaded["sd15"], [""], RES)[0])
    assert sd15.y is None and not sd15.context.any()
    from comfyui_dmd2.training.cli import build_parser, resolve_settings

    args = build_parser().parse_args(["--checkpoint", "m.safetensors", "--prompts", "p.txt", "--output", "o", "--uncond", "empty"])
    assert resolve_settings(args)[1]["uncond"] == "empty"  # a dmd2 key: checked on resume like the others


def test_gradient_checkpointing_gives_the_same_gradients(loaded):
    grads = []
    for checkpointing in (False, True):
        backend = _backend(loaded, "sdxl", gradient_checkpointing=checkpointing)
        assert backend.gradient_checkpointing == checkpointing
        with torch.no_grad():
            for _, p in backend.generator_parameters():
                p.add_(0.01)  # make up weights non-zero: down and up both get gradients
        batch = backend.sample_batch(2)
        x_t = torch.randn(batch.shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([999, 249])
        gen = backend.generator_x0(x_t, t, batch.cond)
        with torch.no_grad():
            fake = backend.fake_x0(x_t, t, batch.cond)  # another adapter in between
        (gen - fake).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in backend.generator_parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_checkpointed_unet_deep_copies_with_its_own_weights(loaded):
    backend = _backend(loaded, "sd15", gradient_checkpointing=True)
    twin = copy.deepcopy(backend.unet)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    x_t, t = torch.randn(1, 4, RES // 8, RES // 8), torch.tensor([500.0])
    context = backend.data.prompts[0].context
    plain_twin = copy.deepcopy(twin)
    for m in plain_twin.modules():
        m.__dict__.pop("forward", None)  # back to the class's own forward: no checkpointing
    with torch.enable_grad():  # the checkpointed path
        out = backend.unet(x_t, t, context=context)
        out_twin = twin(x_t, t, context=context)
        expected = plain_twin(x_t, t, context=context)
    assert (out - out_twin).abs().max() > 1e-3
    torch.testing.assert_close(out_twin, expected)


def test_gradient_checkpointing_trains_like_without(loaded):
    """Whole DMD2 iterations with the GAN (frozen groups around some forwards): same updates."""
    results = []
    for checkpointing in (False, True):
        real = torch.randn(3, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(4))
        backend = _backend(loaded, "sd15", images=real, gradient_checkpointing=checkpointing)
        config = DMD2Config.for_arch("sd15", fake_updates_per_generator_update=1, warmup_steps=0, lr_generator=1e-3, lr_fake_score=1e-3, batch_size=2, grad_accum=1)
        trainer = DMD2Trainer(config, backend)
        for _ in range(2):
            trainer.step()
        results.append({n: p.detach().clone() for n, p in [*backend.generator_parameters(), *backend.fake_score_parameters()]})
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_steps_update_only_the_adapters_and_head(loaded):
    backend = _backend(loaded, "sd15", images=torch.randn(3, 4, RES // 8, RES // 8))
    base_before = {n: p.detach().clone() for n, p in backend.unet.named_parameters() if ".adapters." not in n}
    gen_before = {n: p.detach().clone() for n, p in backend.generator_parameters()}
    fake_before = {n: p.detach().clone() for n, p in backend.fake_score_parameters()}
    config = DMD2Config.for_arch("sd15", fake_updates_per_generator_update=2, warmup_steps=0, lr_generator=1e-3, lr_fake_score=1e-3, batch_size=2, grad_accum=1)
    trainer = DMD2Trainer(config, backend)
    metrics = [trainer.step() for _ in range(3)]
    assert "loss_gan_discriminator" in metrics[0] and "loss_gan_generator" in metrics[0]
    assert all(torch.isfinite(torch.tensor(v)) for m in metrics for v in m.values())
    for n, p in backend.unet.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert any(not torch.equal(p, gen_before[n]) for n, p in backend.generator_parameters())
    assert any(not torch.equal(p, fake_before[n]) for n, p in backend.fake_score_parameters() if n.startswith("gan_head."))
    assert any(not torch.equal(p, fake_before[n]) for n, p in backend.fake_score_parameters() if n.startswith("fake_score."))


def test_sample_is_deterministic_per_seed(loaded):
    backend = _backend(loaded, "sd15")
    cond = backend.data.prompts[0]
    a = backend.sample([cond, cond], [1, 2], [999, 499])
    b = backend.sample([cond], [1], [999, 499])
    assert a.shape == (2, 4, RES // 8, RES // 8)
    torch.testing.assert_close(a[:1], b)
    assert not torch.equal(a[0], a[1])


def test_real_images_are_scored_under_their_own_captions(loaded):
    """A real latent's discriminator conditioning is its own caption's encoding, or the
    unconditional one when it has none; its generated partner is scored under its own prompt,
    or unconditionally when the real image has no caption."""
    ck = loaded["sd15"]
    captions = C.encode_prompts(ck, ["a photo of a cat", "a drawing of a boat"], RES)
    real = torch.stack([torch.full((4, RES // 8, RES // 8), float(i)) for i in range(3)])  # image i is all i
    backend = _backend(loaded, "sd15", images=real, captions=[captions[0], None, captions[1]])
    uncond, prompts = backend.data.uncond, backend.data.prompts
    batch = backend.sample_batch(40)
    seen = set()
    for row in range(40):
        image = int(batch.real_x0[row, 0, 0, 0])
        seen.add(image)
        caption = {0: captions[0], 1: None, 2: captions[1]}[image]
        expected_real = uncond if caption is None else caption
        torch.testing.assert_close(batch.real_cond.context[row], expected_real.context[0].repeat(batch.real_cond.context.shape[1] // 77, 1))
        generated = batch.gan_cond.context[row]
        if caption is None:
            torch.testing.assert_close(generated, uncond.context[0].repeat(generated.shape[0] // 77, 1))
        else:  # the generated sample keeps its own prompt
            torch.testing.assert_close(generated, batch.cond.context[row])
            assert any(torch.equal(generated, p.context[0].repeat(generated.shape[0] // p.context.shape[1], 1)) for p in prompts)
    assert seen == {0, 1, 2}


def test_gradient_accumulation_equals_one_batch_on_a_tiny_unet(loaded):
    """One iteration of batch 4 vs 4 accumulated micro-batches of 1 (4-step student with
    backward simulation, DM + GAN, captions): the same gradients to float tolerance."""
    captions = C.encode_prompts(loaded["sdxl"], ["a red house"], RES)
    real = torch.randn(3, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(4))
    grads = []
    for batch_size, accum in ((4, 1), (1, 4)):
        backend = _backend(loaded, "sdxl", images=real, captions=[captions[0], None, captions[0]])
        with torch.no_grad():
            for _, p in backend.generator_parameters():
                p.add_(0.01)  # non-zero up weights: both LoRA factors get gradients
        config = DMD2Config.for_arch("sdxl", batch_size=batch_size, grad_accum=accum, warmup_steps=0, seed=3, real_guidance_scale=2.0)
        trainer = DMD2Trainer(config, backend)
        seen = []
        clip = trainer._clip
        trainer._clip = lambda params: (seen.append(torch.cat([p.grad.flatten() for p in params])), clip(params))[1]
        while not seen or len(seen) < 2:
            trainer.step()
        grads.append(seen)
    for one, accumulated in zip(*grads):
        assert one.abs().sum() > 0
        torch.testing.assert_close(accumulated, one, rtol=2e-3, atol=1e-6)


def test_gan_head_sits_on_the_mid_block_map(loaded):
    for arch in ("sd15", "sdxl"):
        backend = _backend(loaded, arch, images=torch.randn(2, 4, RES // 8, RES // 8))
        h, w = B.mid_block_size(backend_config(loaded, arch), (4, RES // 8, RES // 8))
        assert backend.head.size == (h, w)
        with pytest.raises(ValueError, match="another resolution"):
            backend.head(torch.randn(1, backend.head.net[0].in_channels, h + 2, w + 2))


def backend_config(loaded, arch):
    return loaded[arch].model.model.model_config.unet_config


def test_full_copy_fake_score(loaded):
    """The reference's layout for one network: a fully trained copy, the base still shared."""
    backend = _backend(loaded, "sd15", full_copies=("fake_score",))
    base = dict(backend.unet.named_parameters())
    fake = backend.fake_score_parameters()
    assert len(fake) == len(list(backend.copies["fake_score"].parameters()))
    assert not {id(p) for _, p in fake} & {id(p) for p in base.values()}
    assert all(".adapters.fake_score." not in n for n in base)  # no LoRA F in the base
    batch = backend.sample_batch(2)
    x_t, t = torch.randn(batch.shape), torch.tensor([999, 500])
    with torch.no_grad():
        torch.testing.assert_close(backend.fake_x0(x_t, t, batch.cond), backend.real_x0(x_t, t, batch.cond, batch.uncond, 1.0))
    trainer = DMD2Trainer(DMD2Config.for_arch("sd15", warmup_steps=0, lr_fake_score=1e-3, batch_size=2, grad_accum=1), backend)
    before = {n: p.detach().clone() for n, p in fake}
    trainer.step()
    assert any(not torch.equal(p, before[n]) for n, p in fake)
    with pytest.raises(ValueError, match="full_copies"):
        _backend(loaded, "sd15", full_copies=("teacher",))


def test_fp16_trains_with_loss_scaling_and_skips_overflowing_steps(loaded):
    """GPUs without bf16 train in fp16: the trainer scales the losses (GradScaler), unscales
    before clipping, keeps fp32 adapters, and skips a step whose gradients overflow (the
    adapters unchanged, the scale halved). Run here with CPU fp16 autocast."""
    backend = _backend(loaded, "sd15", images=torch.randn(2, 4, RES // 8, RES // 8), mixed_precision="fp16")
    config = DMD2Config.for_arch("sd15", fake_updates_per_generator_update=2, warmup_steps=0, lr_generator=1e-3,
                                 lr_fake_score=1e-3, batch_size=2, grad_accum=1)
    trainer = DMD2Trainer(config, backend)
    assert trainer.scaler.is_enabled() and backend.autocast_dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in trainer.generator_params + trainer.fake_params)
    before = {n: p.detach().clone() for n, p in backend.generator_parameters()}
    metrics = [trainer.step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(m["loss_fake"])) for m in metrics)
    assert any(not torch.equal(p, before[n]) for n, p in backend.generator_parameters())
    assert trainer.state_dict(include_parameters=False)["scaler"]["scale"] == trainer.scaler.get_scale()

    # An overflow in the fake score's gradients: the step is skipped and the scale halves.
    fake = {n: p.detach().clone() for n, p in backend.fake_score_parameters()}
    scale = trainer.scaler.get_scale()
    first = trainer.fake_params[0]
    handle = first.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    try:
        trainer.step()  # iteration 2: a generator update, then the fake score's (whose step overflows)
    finally:
        handle.remove()
    assert all(torch.equal(p, fake[n]) for n, p in backend.fake_score_parameters())
    assert trainer.scaler.get_scale() == scale / 2


def test_bf16_and_fp32_train_without_a_scaler(loaded):
    for precision in ("no", "bf16"):
        backend = _backend(loaded, "sd15", mixed_precision=precision)
        trainer = DMD2Trainer(DMD2Config.for_arch("sd15", batch_size=1, grad_accum=1), backend)
        assert not trainer.scaler.is_enabled()
    assert B.default_precision("cpu") == "no"


def _iteration_gradients(backend, seed=3):
    """Generator and fake-score gradients of one DMD2 iteration (DM + GAN), as clipped."""
    with torch.no_grad():
        for _, p in backend.generator_parameters():
            p.add_(0.01)  # non-zero up weights: both LoRA factors get gradients
    config = DMD2Config.for_arch("sdxl", batch_size=2, grad_accum=1, warmup_steps=0, seed=seed, real_guidance_scale=2.0)
    trainer = DMD2Trainer(config, backend)
    seen = []
    clip = trainer._clip
    trainer._clip = lambda params: (seen.append(torch.cat([p.grad.flatten() for p in params])), clip(params))[1]
    trainer.step()
    assert len(seen) == 2 and all(g.abs().sum() > 0 for g in seen)
    return seen


def test_training_attention_is_sdpa_and_matches_comfys_choice(loaded, monkeypatch):
    """Training runs every attention through torch's SDPA (ComfyUI on the CPU would pick its
    chunked sub-quadratic attention): the same forwards and gradients as ComfyUI's own."""
    import comfy.ldm.modules.attention as attention

    calls = []
    sdpa = attention.attention_pytorch
    monkeypatch.setattr(attention, "attention_pytorch", lambda *a, **kw: (calls.append(1), sdpa(*a, **kw))[1])
    real = torch.randn(3, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(4))
    grads = {}
    for mode in ("comfy", "sdpa"):
        calls.clear()
        grads[mode] = _iteration_gradients(_backend(loaded, "sdxl", images=real, attention=mode))
        assert bool(calls) == (mode == "sdpa") or attention.optimized_attention is sdpa
    for ours, comfys in zip(grads["sdpa"], grads["comfy"]):
        torch.testing.assert_close(ours, comfys, rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="attention"):
        _backend(loaded, "sdxl", attention="flash")


def test_discriminator_scores_real_and_generated_in_one_pass(loaded, monkeypatch):
    """The fake-score update scores real and generated latents in one batch of 2B through
    the fake score (one forward call fewer) with the same gradients as two passes of B."""
    real = torch.randn(3, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(4))
    captions = C.encode_prompts(loaded["sdxl"], ["a red house"], RES)
    grads, passes = {}, {}
    for batched in (False, True):
        backend = _backend(loaded, "sdxl", images=real, captions=[captions[0], None, captions[0]])
        if not batched:
            backend.cat_conditions = None  # the trainer then makes two passes
        rows = []
        logits = backend.fake_logits
        backend.fake_logits = lambda x, t, cond: (rows.append(len(x)), logits(x, t, cond))[1]
        grads[batched] = _iteration_gradients(backend)
        passes[batched] = rows
    assert passes[False] == [2, 2, 2]  # generator's GAN loss, then real and generated apart
    assert passes[True] == [2, 4]
    for one, two in zip(grads[True], grads[False]):
        torch.testing.assert_close(one, two, rtol=2e-3, atol=1e-6)
