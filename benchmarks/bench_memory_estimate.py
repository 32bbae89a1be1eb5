"""Measured against estimated: peak memory and work of one training iteration.

Builds a ComfyUI UNet of the named size with random weights (the real SD1.5/SDXL
architectures at full size, or the mid-size SD1.5-shaped one), runs the production backend
and trainer on it with the GPU's settings (bf16 base weights, bf16 autocast, gradient
checkpointing, LoRA rank, GAN on, batch 1) on the CPU, and tracks the live tensor bytes
(``training.memory.TensorMemory``: what ``torch.cuda.max_memory_allocated`` counts); then
the estimate ``dmd2-train --estimate`` makes for the same settings from fake tensors. Prints
both, their ratio, the parts, the forward-equivalents and the process's peak RSS.

    python benchmarks/bench_memory_estimate.py --model mid-sd15 --resolution 256
    python benchmarks/bench_memory_estimate.py --model sdxl --resolution 1024 --threads 2   # about an hour on 2 cores
    python benchmarks/bench_memory_estimate.py --model sd15 --resolution 512 --fake-score full --skip-measure
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_memory import MODELS  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def model_config(name: str, dtype: torch.dtype):
    import comfy.supported_models

    arch, unet_config = MODELS[name]
    cls = comfy.supported_models.SDXL if arch == "sdxl" else comfy.supported_models.SD15
    config = cls(dict(unet_config))
    config.set_inference_dtype(dtype, None)
    return arch, config


def random_model(name: str, dtype: torch.dtype):
    arch, config = model_config(name, dtype)
    base = config.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
    # CUDA autocast runs group and layer norms in fp32, bf16 weights cast; the CPU kernels
    # refuse an fp32 input with bf16 norm weights, but take fp32 weights with any input. The
    # norms' weights (0.1 % of the parameters) are kept in fp32 so the CPU runs what a GPU runs.
    for module in base.diffusion_model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            module.float()
    return arch, base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mid-sd15", choices=sorted(MODELS))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--fake-score", default="lora", choices=["lora", "full"])
    p.add_argument("--fake-score-rank", type=int, default=0, help="LoRA F's own rank (0: --rank)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    p.add_argument("--gradient-checkpointing", default="on", choices=["on", "off"])
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--skip-measure", action="store_true", help="only the estimate")
    p.add_argument("--json", metavar="FILE", help="append the figures as one JSON line")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from comfyui_dmd2.comfy_env import ensure_comfy

    ensure_comfy(cpu=True)
    from comfyui_dmd2.training import memory as M
    from comfyui_dmd2.training.backend import Conditioning, TrainingData
    from comfyui_dmd2.training.config import DMD2Config
    from comfyui_dmd2.training.run import RunConfig, TrainingRun

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[args.precision]
    run = RunConfig(checkpoint="-", prompts="-", output="-", images="-", lora_rank=args.rank, mixed_precision=args.precision,
                    gradient_checkpointing=args.gradient_checkpointing, device="cpu", fake_score=args.fake_score,
                    fake_score_rank=args.fake_score_rank)
    arch = MODELS[args.model][0]
    config = DMD2Config.for_arch(arch, batch_size=args.batch_size, grad_accum=args.grad_accum)
    fake = "full" if args.fake_score == "full" else f"LoRA rank {args.fake_score_rank or args.rank}"
    figures = {"model": args.model, "resolution": args.resolution, "rank": args.rank, "fake_score": fake, "batch": args.batch_size,
               "grad_accum": args.grad_accum, "precision": args.precision, "checkpointing": args.gradient_checkpointing}

    start = time.perf_counter()
    _, fake_config = model_config(args.model, dtype)
    estimate = M.estimate_model(fake_config, run, config, args.resolution, gpu=True, with_images=True)
    figures["estimate_s"] = time.perf_counter() - start
    figures["estimate_gib"] = estimate.peak / M.GiB
    figures["estimate_parts_gib"] = {name: size / M.GiB for name, size in estimate.parts()}
    figures["forward_equivalents"] = estimate.forward_equivalents()
    print(f"{args.model} at {args.resolution} px, rank {args.rank}, fake score {fake}, batch {args.batch_size} x {args.grad_accum}, "
          f"{args.precision}, checkpointing {args.gradient_checkpointing}")
    print(f"estimate : {estimate.peak / M.GiB:7.2f} GiB  ({figures['estimate_s']:.0f} s on fake tensors)")

    if not args.skip_measure:
        _, base = random_model(args.model, dtype)
        unet = base.model_config.unet_config
        latent = args.resolution // 8
        gen = torch.Generator().manual_seed(1)
        cond = lambda: Conditioning(torch.randn(1, 77, unet["context_dim"], generator=gen),  # noqa: E731
                                    torch.randn(1, unet["adm_in_channels"], generator=gen) if unet.get("adm_in_channels") else None)
        data = TrainingData([cond(), cond()], cond(), real_latents=torch.randn(2, 4, latent, latent, generator=gen))
        rss_before = rss_gib()
        training = TrainingRun(base, data, run, M.profiling_config(config), args.resolution, Path("."), device="cpu")
        start = time.perf_counter()
        measured = M.profile_iterations(training, config)
        figures["measure_s"] = time.perf_counter() - start
        figures["measured_gib"] = measured.peak / M.GiB
        figures["measured_parts_gib"] = {name: size / M.GiB for name, size in measured.parts()}
        figures["measured_forward_equivalents"] = measured.forward_equivalents()
        figures["rss_peak_gib"], figures["rss_before_training_gib"] = rss_gib(), rss_before
        figures["ratio_estimate_measured"] = estimate.peak / measured.peak
        print(f"measured : {measured.peak / M.GiB:7.2f} GiB  ({figures['measure_s']:.0f} s for two iterations on the CPU; "
              f"process peak RSS {figures['rss_peak_gib']:.2f} GiB, {rss_before:.2f} before training)")
        print(f"ratio estimate/measured: {figures['ratio_estimate_measured']:.3f}")
    for name, size in estimate.parts():
        print(f"  {name:50s} {size / M.GiB:7.2f} GiB")
    fe = estimate.forward_equivalents()
    print(f"UNet forward-equivalents per sample: generator-update iteration {fe['generator_iteration']:.2f}, "
          f"fake-score-only iteration {fe['fake_iteration']:.2f}, mean over the cycle {fe['mean_iteration']:.2f}")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
