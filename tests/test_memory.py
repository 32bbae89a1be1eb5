"""The memory estimate (``dmd2-train --estimate``): the run's own code on fake tensors, held
to the peak of live tensors measured on real ones, and the advice it gives."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from comfyui_dmd2.training import checkpoint as C
from comfyui_dmd2.training import cli, memory
from comfyui_dmd2.training.backend import Conditioning, TrainingData
from comfyui_dmd2.training.config import DMD2Config
from comfyui_dmd2.training.run import RunConfig, TrainingRun
from PIL import Image

RES = 128


def _measured_peak(path: Path, run: RunConfig, config: DMD2Config, tmp_path: Path) -> int:
    """Peak of live tensors over one generator-update iteration of a real run (bf16 base
    weights and autocast, as on a GPU), optimizer state already there."""
    loaded = C.load_checkpoint(path, weight_dtype=torch.bfloat16)
    unet = loaded.model.model.model_config.unet_config
    gen = torch.Generator().manual_seed(0)
    cond = lambda: Conditioning(torch.randn(1, 77, unet["context_dim"], generator=gen),  # noqa: E731
                                torch.randn(1, unet["adm_in_channels"], generator=gen) if unet.get("adm_in_channels") else None)
    latent = RES // 8
    data = TrainingData([cond(), cond()], cond(), real_latents=torch.randn(3, 4, latent, latent, generator=gen))
    training = TrainingRun(loaded.model.model, data, run, config, RES, tmp_path, device="cpu")
    return memory.measure_peak(training, steps=1)


def test_tensor_memory_counts_live_storages_and_the_peak():
    tracker = memory.TensorMemory()
    kept = torch.zeros(1000)
    tracker.track(kept)
    with tracker:
        a = torch.ones(2000)
        view = a.view(20, 100)  # a view: no new storage
        b = a * 2
        assert tracker.current == 4000 + 8000 + 8000
        del a, b
        assert tracker.current == 4000 + 8000  # the view keeps a's storage alive
        del view
        assert tracker.current == 4000 and tracker.peak == 20000
        layer = torch.nn.Linear(64, 64)
        layer(torch.randn(8, 64, requires_grad=True)).sum().backward()
    assert tracker.flops == 2 * 8 * 64 * 64 * 3  # forward, and the backward's two products


def test_estimate_matches_the_measured_peak_sdxl(tiny_checkpoints, tmp_path):
    """Fake tensors against real ones: 4-step SDXL student, GAN on, two accumulated
    micro-batches, moving average on the device, gradient checkpointing, bf16."""
    run = RunConfig(checkpoint="-", prompts="-", output="-", images="-", lora_rank=8, mixed_precision="bf16",
                    gradient_checkpointing="on", device="cpu")
    config = DMD2Config.for_arch("sdxl", batch_size=1, grad_accum=2)
    estimate = memory.estimate_run(tiny_checkpoints["sdxl"], run, config, RES, gpu=True)
    measured = _measured_peak(tiny_checkpoints["sdxl"], run, config, tmp_path)
    assert abs(estimate.peak / measured - 1) < 0.15, (estimate.peak, measured)
    assert sum(size for _, size in estimate.parts()) == estimate.peak
    assert estimate.accumulated_gradients > 0 and estimate.ema > 0 and estimate.gan_head > 0
    fe = estimate.forward_equivalents()
    # A generator update runs the generator with its backward, the real score's two
    # passes, the fake score and the GAN head's half; the fake-only iteration less.
    assert 8 < fe["generator_iteration"] < 30 and 3 < fe["fake_iteration"] < fe["generator_iteration"]


def test_estimate_matches_a_full_fake_score(tiny_checkpoints, tmp_path):
    """``--fake-score full``: a trained fp32 copy of the (bf16) UNet instead of LoRA F. The
    estimate builds it on fake tensors too and holds to the measured peak; it costs the copy
    and twice that in AdamW state on top of the LoRA run."""
    common = dict(checkpoint="-", prompts="-", output="-", images="-", lora_rank=8, mixed_precision="bf16", gradient_checkpointing="on", device="cpu")
    config = DMD2Config.for_arch("sd15", batch_size=1, grad_accum=1)
    estimate = memory.estimate_run(tiny_checkpoints["sd15"], RunConfig(**common, fake_score="full"), config, RES, gpu=True)
    plain = memory.estimate_run(tiny_checkpoints["sd15"], RunConfig(**common), config, RES, gpu=True)
    measured = _measured_peak(tiny_checkpoints["sd15"], RunConfig(**common, fake_score="full"), config, tmp_path)
    assert abs(estimate.peak / measured - 1) < 0.15, (estimate.peak, measured)
    extra = estimate.trainable - plain.trainable
    lora_f = (plain.trainable - plain.gan_head) / 2  # G and F have the same size in the plain run
    assert extra + lora_f == pytest.approx(2 * estimate.base_weights, rel=0.02)  # fp32 copy of the bf16 base
    assert estimate.optimizer_state - plain.optimizer_state == pytest.approx(2 * extra, rel=1e-3)  # + step counters
    assert estimate.peak > plain.peak + 3 * extra


def test_estimate_shards_a_full_fake_score_over_the_world_size(tiny_checkpoints):
    """``--estimate --world-size 2`` with a full fake score (#26): each GPU holds half of its
    fp32 weights (the size of the bf16 base) and of its AdamW state; its gradients and
    optimiser step shrink too, so the peak falls by at least that much less the gathered
    blocks, which are now part of it."""
    run = RunConfig(checkpoint="-", prompts="-", output="-", images="-", lora_rank=8, mixed_precision="bf16", gradient_checkpointing="on",
                    device="cpu", fake_score="full")
    config = DMD2Config.for_arch("sd15", batch_size=1, grad_accum=1)
    one, two = (memory.estimate_run(tiny_checkpoints["sd15"], run, config, RES, gpu=True, world_size=n) for n in (1, 2))
    assert (one.shards, one.unshard_transient) == (1, 0) and two.shards == 2
    half = one.trainable - two.trainable
    assert half == pytest.approx(one.base_weights, rel=0.02)  # half the fp32 copy of the bf16 base
    assert one.optimizer_state - two.optimizer_state == pytest.approx(2 * half, rel=1e-3)
    assert two.base_weights == one.base_weights and two.ema == one.ema
    static_drop = one.static - two.static
    assert 0 < two.unshard_transient < half
    assert two.peak <= one.peak - static_drop + two.unshard_transient
    assert two.peak < one.peak and sum(size for _, size in two.parts()) == two.peak
    assert any("gathered (sharded over 2)" in name for name, _ in two.parts())


def test_estimate_command_reads_no_weight_and_matches_a_real_run(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    """``dmd2-train --estimate`` on an SD1.5 checkpoint: prompts and output not needed,
    nothing written, no weight read (loading raises), the printed peak within 15 % of a
    real run's with the same settings, and advice for a budget it does not fit."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (RES, RES), "red").save(images / "a.png")
    argv = ["--checkpoint", str(tiny_checkpoints["sd15"]), "--images", str(images), "--resolution", str(RES),
            "--lora-rank", "16", "--estimate", "--memory-budget", "2"]

    def no_loading(*args, **kwargs):
        raise AssertionError("--estimate read the weights")

    monkeypatch.setattr(C, "load_checkpoint", no_loading)
    monkeypatch.setattr("safetensors.safe_open.get_tensor", no_loading, raising=False)
    before = set(tmp_path.rglob("*"))
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert set(tmp_path.rglob("*")) == before
    assert "SD1.5 at 128 px" in out and "GAN on" in out and "gradient checkpointing on" in out
    printed = float(re.search(r"peak memory: ([0-9.]+) GiB", out).group(1)) * memory.GiB
    assert "fits 2 GiB" in out
    assert "forward-equivalents" in out

    monkeypatch.undo()
    run = RunConfig(checkpoint="-", prompts="-", output="-", images="-", lora_rank=16, mixed_precision="bf16",
                    gradient_checkpointing="on", device="cpu")
    measured = _measured_peak(tiny_checkpoints["sd15"], run, DMD2Config.for_arch("sd15"), tmp_path / "run")
    assert abs(printed / measured - 1) < 0.15, (printed, measured)


def test_estimate_flags_are_checked(tiny_checkpoints, capsys):
    assert cli.main(["--checkpoint", str(tiny_checkpoints["sd15"]), "--memory-budget", "12", "--prompts", "p", "--output", "o"]) == 2
    assert "--memory-budget goes with --estimate" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tiny_checkpoints["sd15"]), "--world-size", "2", "--prompts", "p", "--output", "o"]) == 2
    assert "--world-size goes with --estimate" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tiny_checkpoints["sd15"]), "--estimate", "--world-size", "0"]) == 2
    assert "--world-size must be >= 1, got 0" in capsys.readouterr().err


def test_estimate_command_prints_the_peak_per_gpu_of_a_sharded_fake_score(tiny_checkpoints, capsys):
    """``--estimate --world-size 2 --fake-score full``: said to be per process, the fake score
    sharded, the gathered blocks a part of the peak, and the advice naming more GPUs."""
    argv = ["--checkpoint", str(tiny_checkpoints["sd15"]), "--resolution", str(RES), "--lora-rank", "8", "--estimate",
            "--fake-score", "full", "--world-size", "2", "--memory-budget", "0.01"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "on the GPU (each of 2 processes)" in out and "fake score a full copy sharded over them" in out
    assert re.search(r"fake-score blocks gathered \(sharded over 2\) +0\.\d\d GiB", out)
    assert "does not fit 0.01 GiB" in out and "--estimate --world-size N" in out


def _profile(**changes) -> memory.IterationProfile:
    values = dict(peak=14 * memory.GiB, base_weights=5 * memory.GiB, trainable=int(1.6 * memory.GiB), gan_head=int(0.1 * memory.GiB),
                  ema=int(0.75 * memory.GiB), optimizer_state=int(3.2 * memory.GiB), accumulated_gradients=int(0.75 * memory.GiB),
                  flops_generator_iteration=150.0, flops_fake_iteration=60.0, unet_forward_flops=10.0, samples=1,
                  fake_updates_per_generator_update=5)
    return memory.IterationProfile(**(values | changes))


def test_profile_parts_scaling_and_budget_advice():
    profile = _profile()
    assert sum(size for _, size in profile.parts()) == profile.peak
    assert profile.forward_equivalents() == {"generator_iteration": 15.0, "fake_iteration": 6.0, "mean_iteration": (15 + 4 * 6) / 5}
    assert profile.scaled() == profile.peak
    assert profile.scaled(ema=False) == profile.peak - profile.ema
    half = profile.scaled(rank_ratio=0.5)
    lora = profile.trainable - profile.gan_head
    lora_optimizer = profile.optimizer_state * lora / profile.trainable
    assert half == pytest.approx(profile.peak - (lora + profile.ema + lora_optimizer + profile.accumulated_gradients) / 2, abs=2)
    activations = profile.activations - profile.accumulated_gradients
    assert profile.scaled(pixel_ratio=0.25) == pytest.approx(profile.peak - 0.75 * activations, abs=2)

    assert memory.budget_advice(profile, 24, rank=64, resolution=1024, ema_on_device=True, checkpointing=True)[0].startswith("fits 24")
    advice = memory.budget_advice(profile, 14.5, rank=64, resolution=1024, ema_on_device=True, checkpointing=True)
    assert advice[0].startswith("does not fit 14.5")
    assert "ema_on_cpu=true" in advice[1] and "fits" not in advice[1]
    assert "--lora-rank 32" in advice[2] and advice[2].endswith("-> fits")
    assert advice[-1].startswith("to fit 14.5 GiB: --set ema_on_cpu=true --lora-rank 32")
    hopeless = memory.budget_advice(profile, 4, rank=64, resolution=1024, ema_on_device=False, checkpointing=False)
    assert "--gradient-checkpointing on" in hopeless[1] and hopeless[-1].startswith("even with all")
    full = memory.budget_advice(profile, 14.5, rank=64, resolution=1024, ema_on_device=True, checkpointing=True, full_fake_score=True)
    assert full[0].startswith("does not fit 14.5") and full[1].startswith("  --fake-score lora") and len(full) == 3
    assert "--estimate --world-size N" in full[2]  # or shard it over several GPUs


def test_work_report_counts_the_warm_start_teacher_forwards_of_fresh_pairs_and_a_pool():
    """``--estimate`` gives no time; it prints the run's work in UNet forward-equivalents and
    the warm start's teacher forwards, fresh pairs against the pool: SD1.5 guidance 1.75 makes
    each pair 2 x 50 forwards; the reference's 2,000 iterations x 256 against 10,000 pairs."""
    profile = _profile()  # 15 and 6 forward-equivalents per sample: 7.8 on average at 1:5
    config = DMD2Config.for_arch("sd15", steps=100, regression_steps=2000, batch_size=4, grad_accum=64)
    lines = memory.work_report(profile, config)
    assert lines[0].endswith("DMD2 100 iterations x 256 samples = 199,680")
    assert "fresh pairs 2,000 iterations x 256 samples x 100 = 51,200,000" in lines[1] and "--regression-pairs N" in lines[1]
    pooled = memory.work_report(profile, dataclasses.replace(config, regression_pairs=10_000))[1]
    assert "a pool of 10,000 pairs x 100 = 1,000,000, built once, each pair drawn 51.2x on average; 51.2x fewer than fresh" in pooled
    unguided = dataclasses.replace(config, regression_pairs=10_000, real_guidance_scale=1.0, regression_steps=10)
    assert "a pool of 10,000 pairs x 50 = 500,000" in memory.work_report(profile, unguided)[1] and "3.9x more than" in memory.work_report(profile, unguided)[1]
    assert len(memory.work_report(profile, dataclasses.replace(config, regression_steps=0))) == 1
    # under torchrun the processes share the pool's build: 625 rounds of 4 batches of 4 pairs, 2,500 pairs each
    shared = memory.work_report(profile, dataclasses.replace(config, regression_pairs=10_000), world_size=4)[1]
    assert "a pool of 10,000 pairs x 100, built once by 4 processes: 250,000 each" in shared


# --- Flux (#25): the estimate on a flow transformer, an fp8 base -----------------------------

FLUX_RES = 128  # 8x8 tokens beside the prompt's 256 T5 tokens


def _flux_config(**overrides) -> DMD2Config:
    """The memory-relevant Flux settings (no CFG pass: the guidance is embedded; 4 steps) on
    the defaults the tests use elsewhere for the tiny Flux (tests/test_flux_training.py)."""
    return DMD2Config.for_arch("sd15", **{"real_guidance_scale": 1.0, "generator_timesteps": (999, 749, 499, 249), **overrides})


def _flux_model_config(base_dtype: torch.dtype, compute: torch.dtype = torch.bfloat16):
    import comfy.supported_models
    import tiny_models

    model_config = comfy.supported_models.Flux(dict(tiny_models.FLUX_CONFIG))
    memory.set_base_dtype(model_config, base_dtype, compute)
    return model_config


def _flux_measured_peak(base_dtype: torch.dtype, run: RunConfig, config: DMD2Config, tmp_path: Path) -> int:
    """One generator-update iteration of a real run on the tiny Flux (base in ``base_dtype``,
    bf16 autocast, as on a GPU), a 256-token prompt as ComfyUI's Flux tokenizer pads it."""
    import tiny_models

    base = _flux_model_config(base_dtype).get_model({})
    tiny_models.init_weights_(base.diffusion_model, 0)
    gen = torch.Generator().manual_seed(0)
    shapes = memory.fake_conditioning(base.model_config.unet_config)
    cond = lambda: Conditioning(torch.randn(shapes.context.shape, generator=gen), torch.randn(shapes.y.shape, generator=gen))  # noqa: E731
    latent = FLUX_RES // 8
    data = TrainingData([cond(), cond()], cond(), real_latents=torch.randn(3, 16, latent, latent, generator=gen))
    training = memory.training_run(base, data, run, config, FLUX_RES, tmp_path, device="cpu")
    assert training.backend.latent_shape == (16, latent, latent)
    return memory.measure_peak(training, steps=1)


@pytest.mark.parametrize("base_dtype", ["bf16", "fp8"])
def test_flux_estimate_matches_the_measured_peak(base_dtype, tmp_path):
    """Fake tensors against real ones on the tiny Flux: LoRA G/F on the double and single
    blocks, GAN head on the token grid, two accumulated micro-batches, gradient checkpointing
    per block, bf16 autocast; the base in bf16, or in fp8 computed in bf16 through ComfyUI's
    manual-cast layers (the estimate's base is then half as large)."""
    run = RunConfig(checkpoint="-", prompts="-", output="-", images="-", lora_rank=8, mixed_precision="bf16",
                    gradient_checkpointing="on", device="cpu")
    config = _flux_config(batch_size=1, grad_accum=2)
    estimate = memory.estimate_model(_flux_model_config(torch.bfloat16), run, config, FLUX_RES, gpu=True, with_images=True,
                                     base_dtype=base_dtype)
    measured = _flux_measured_peak(memory.BASE_DTYPES[base_dtype], run, config, tmp_path)
    assert abs(estimate.peak / measured - 1) < 0.15, (estimate.peak, measured)
    assert sum(size for _, size in estimate.parts()) == estimate.peak
    assert estimate.accumulated_gradients > 0 and estimate.ema > 0 and estimate.gan_head > 0
    weights = sum(p.numel() for p in _flux_model_config(torch.bfloat16).get_model({}).diffusion_model.parameters())
    assert estimate.base_weights == weights * (1 if base_dtype == "fp8" else 2)


def _flux_header(dtype: torch.dtype, prefix: str = "") -> dict[str, torch.Tensor]:
    """What ``checkpoint.header_tensors`` gives for a Flux.1 file (meta tensors), at Flux.1's
    own width (ComfyUI's detection takes 24 heads of 128 and Flux.1's rope axes: a narrower
    Flux cannot be read from a file) with one double and one single block."""
    import comfy.supported_models
    import tiny_models

    config = {**tiny_models.FLUX_CONFIG, "hidden_size": 3072, "num_heads": 24, "axes_dim": [16, 56, 56]}
    model = comfy.supported_models.Flux(config).get_model({}, device="meta").diffusion_model
    return {prefix + k: v.to(dtype) for k, v in model.state_dict().items()}


def test_flux_estimate_reads_a_diffusion_model_file_header(monkeypatch):
    """``estimate_run`` on a Flux file of models/diffusion_models (keys without the checkpoint's
    "model.diffusion_model." prefix) or a full checkpoint: ComfyUI's detection builds the model
    from the header alone; an fp8 file is estimated with an fp8 base ("auto", as ComfyUI keeps
    it), a bf16 file in bf16 unless fp8 is asked for."""
    headers = {"flux_bf16.safetensors": _flux_header(torch.bfloat16), "flux_fp8.safetensors": _flux_header(torch.float8_e4m3fn),
               "flux_ckpt.safetensors": _flux_header(torch.bfloat16, "model.diffusion_model."),
               "other.safetensors": {"not.a.model": torch.zeros(2, device="meta")}}
    monkeypatch.setattr(C, "header_tensors", lambda path: headers[Path(path).name])
    run = RunConfig(checkpoint="-", prompts="-", output="-", images="-", lora_rank=4, mixed_precision="bf16",
                    gradient_checkpointing="on", device="cpu")
    config = _flux_config(batch_size=1, grad_accum=1)
    bf16, fp8_file, fp8_asked, checkpoint = (
        memory.estimate_run(name, run, config, FLUX_RES, with_images=False, base_dtype=dtype)
        for name, dtype in (("flux_bf16.safetensors", "auto"), ("flux_fp8.safetensors", "auto"), ("flux_bf16.safetensors", "fp8"),
                            ("flux_ckpt.safetensors", "auto")))
    weights = sum(v.numel() for v in headers["flux_bf16.safetensors"].values())
    assert bf16.base_weights == checkpoint.base_weights == 2 * weights and fp8_file.base_weights == fp8_asked.base_weights == weights
    assert bf16.gan_head == 0 and fp8_file.peak == fp8_asked.peak < bf16.peak == checkpoint.peak
    with pytest.raises(C.UnsupportedModel, match="does not recognise a diffusion model"):
        memory.estimate_run("other.safetensors", run, config, FLUX_RES)


def test_auto_holds_a_flux_base_in_fp8_on_a_gpu_its_bf16_base_does_not_fit(monkeypatch):
    """"auto" on a bf16 Flux.1 [dev] file: fp8 on a 24 GiB card (bf16 trains in 29.8 GiB, fp8 in
    18.9, the full-size estimates), with a line saying so; bf16 on an 80 GiB card, for SD on any
    card, and where the GPU memory is unknown."""
    monkeypatch.setattr(memory, "fp8_storage_supported", lambda device: True)  # every CUDA GPU holds fp8; none is here
    dtype, line = memory.base_weight_dtype("auto", torch.bfloat16, "cuda", torch.bfloat16, "flux_dev", 24.0)
    assert dtype == torch.float8_e4m3fn and "\n" not in line
    assert line.startswith("Flux.1 [dev] with a bfloat16 base needs about 30 GiB") and "--base-dtype bf16 keeps it" in line
    assert memory.base_weight_dtype("auto", torch.bfloat16, "cuda", torch.bfloat16, "flux_dev", 80.0) == (torch.bfloat16, None)
    assert memory.base_weight_dtype("auto", torch.bfloat16, "cuda", torch.bfloat16, "sdxl", 24.0) == (torch.bfloat16, None)
    assert memory.base_weight_dtype("auto", torch.bfloat16, "cuda", torch.bfloat16, "flux_dev", None) == (torch.bfloat16, None)
    assert memory.base_weight_dtype("bf16", torch.bfloat16, "cuda", torch.bfloat16, "flux_dev", 24.0) == (torch.bfloat16, None)


def test_fp8_base_on_a_device_without_fp8_falls_back_to_bf16_in_one_line(monkeypatch):
    """--base-dtype fp8 where float8 tensors cannot be held (MPS): bf16 storage (the same
    computation, twice the base's memory) and one line saying so; where they can (CPU, every
    CUDA GPU: each layer is computed in bf16, fp8 matrix units are not needed), fp8."""
    assert memory.base_weight_dtype("fp8", torch.bfloat16, "cpu") == (torch.float8_e4m3fn, None)
    assert memory.base_weight_dtype("auto", torch.bfloat16, "cpu") == (torch.bfloat16, None)
    assert memory.base_weight_dtype("auto", torch.bfloat16, "cpu", torch.float8_e4m3fn) == (torch.float8_e4m3fn, None)
    monkeypatch.setattr(memory, "fp8_storage_supported", lambda device: False)
    dtype, line = memory.base_weight_dtype("fp8", torch.bfloat16, "mps")
    assert dtype == torch.bfloat16 and "\n" not in line
    assert line == "fp8 base weights: mps cannot hold float8 tensors; the base is kept in bfloat16 instead (twice its memory)"
    with pytest.raises(ValueError, match="base dtype must be auto"):
        memory.base_weight_dtype("fp4", torch.bfloat16, "cpu")


def test_base_dtype_fp8_loads_the_base_in_fp8_and_trains(tiny_checkpoints, tmp_path, capsys):
    """``dmd2-train --base-dtype fp8`` (here on the tiny SD1.5, on the CPU): the frozen base is
    loaded in float8 e4m3fn through ComfyUI's manual-cast layers and stays so, the LoRA trains
    and is exported; ``--estimate`` names the base's storage in its first line."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\nblue sky\n")
    common = ["--checkpoint", str(tiny_checkpoints["sd15"]), "--resolution", str(RES), "--lora-rank", "4", "--base-dtype", "fp8"]
    trainer, backend, output = cli.train([*common, "--prompts", str(prompts), "--output", str(tmp_path / "out"), "--steps", "2",
                                          "--grad-accum", "1", "--set", "warmup_steps=0", "--sample-every", "0", "--quiet"])
    frozen = {k: v for k, v in backend.unet.state_dict().items() if ".adapters." not in k and v.is_floating_point()}
    assert frozen and {v.dtype for v in frozen.values()} == {torch.float8_e4m3fn}
    assert trainer.step_count == 2 and all(torch.isfinite(p).all() for _, p in backend.generator_parameters())
    assert list(output.glob("*.safetensors"))
    assert cli.main([*common, "--estimate"]) == 0
    assert "base weights float8_e4m3fn computed in bf16" in capsys.readouterr().out.splitlines()[0]
