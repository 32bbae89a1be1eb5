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
    python benchmarks/bench_memory_estimate.py --model sdxl --resolution 1024 --skip-measure --compare-reference
    python benchmarks/bench_memory_estimate.py --model sdxl --resolution 1024 --fake-score full --skip-measure --world-size 1,2,4,8

``--compare-reference`` also estimates the reference DMD2 layout at the same settings, side by
side: three resident UNets (the frozen real score; the generator, a frozen copy of the base
with LoRA G; the fake score trained in full, fp32, with the GAN head). That is this pack's
``--fake-score full`` (base + LoRA G + fp32 fake-score copy) plus one more frozen base UNet,
whose bytes are exactly the estimate's "frozen base weights"; at full size it does not fit
this machine to be measured (SDXL: over 50 GiB), so both sides are the estimate's count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import MODELS, dmd2_config, model_config, random_data, random_model  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mid-sd15", choices=sorted(MODELS))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--fake-score", default="lora", choices=["lora", "full"])
    p.add_argument("--fake-score-rank", type=int, default=0, help="LoRA F's own rank (0: --rank)")
    p.add_argument("--lora-targets", default="dmd2", help="dmd2, all, or diffusers module names separated by commas")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    p.add_argument("--gradient-checkpointing", default="on", choices=["on", "off"])
    p.add_argument("--base-dtype", default="auto", choices=["auto", "fp8", "bf16", "fp16", "fp32"],
                   help="the frozen base's weights (fp8: e4m3fn, each layer computed in --precision); auto: --precision's dtype")
    p.add_argument("--ema-on-cpu", action="store_true", help="the generator's moving average in CPU memory (not counted)")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--skip-measure", action="store_true", help="only the estimate")
    p.add_argument("--compare-reference", action="store_true",
                   help="also estimate the reference layout (three resident UNets, full fake score) and print the ratio")
    p.add_argument("--world-size", default="", metavar="N,...",
                   help="also the per-GPU estimate under torchrun with N processes each (a full fake score sharded over them)")
    p.add_argument("--json", metavar="FILE", help="append the figures as one JSON line")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from comfyui_dmd2.comfy_env import ensure_comfy

    ensure_comfy(cpu=True)
    from comfyui_dmd2.training import memory as M
    from comfyui_dmd2.training.run import RunConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[args.precision]
    run = RunConfig(checkpoint="-", prompts="-", output="-", images="-", lora_rank=args.rank, mixed_precision=args.precision,
                    gradient_checkpointing=args.gradient_checkpointing, device="cpu", fake_score=args.fake_score,
                    fake_score_rank=args.fake_score_rank, lora_targets=tuple(args.lora_targets.split(",")))
    arch = MODELS[args.model][0]
    config = dmd2_config(arch, batch_size=args.batch_size, grad_accum=args.grad_accum, ema_on_cpu=args.ema_on_cpu)
    base_dtype, _ = M.base_weight_dtype(args.base_dtype, dtype, "cpu")  # the CPU holds fp8: no fallback
    fake = "full" if args.fake_score == "full" else f"LoRA rank {args.fake_score_rank or args.rank}"
    base_name = str(base_dtype).removeprefix("torch.")
    figures = {"model": args.model, "resolution": args.resolution, "rank": args.rank, "fake_score": fake,
               "lora_targets": args.lora_targets, "batch": args.batch_size, "base_dtype": base_name, "ema_on_cpu": args.ema_on_cpu,
               "grad_accum": args.grad_accum, "precision": args.precision, "checkpointing": args.gradient_checkpointing}

    start = time.perf_counter()
    _, fake_config = model_config(args.model, dtype)
    estimate = M.estimate_model(fake_config, run, config, args.resolution, gpu=True, with_images=True, base_dtype=args.base_dtype)
    figures["estimate_s"] = time.perf_counter() - start
    figures["estimate_gib"] = estimate.peak / M.GiB
    figures["estimate_parts_gib"] = {name: size / M.GiB for name, size in estimate.parts()}
    figures["forward_equivalents"] = estimate.forward_equivalents()
    print(f"{args.model} at {args.resolution} px, rank {args.rank}, fake score {fake}, targets {args.lora_targets}, "
          f"batch {args.batch_size} x {args.grad_accum}, "
          f"{args.precision}, base weights {base_name}, checkpointing {args.gradient_checkpointing}, "
          f"moving average {'in CPU memory' if args.ema_on_cpu else 'on the device'}")
    print(f"estimate : {estimate.peak / M.GiB:7.2f} GiB  ({figures['estimate_s']:.0f} s on fake tensors)")

    if not args.skip_measure:
        _, base = random_model(args.model, base_dtype, compute=dtype)
        data = random_data(base.model_config.unet_config, args.resolution, prompts=2, real=2)
        rss_before = rss_gib()
        training = M.training_run(base, data, run, M.profiling_config(config), args.resolution, Path("."), device="cpu")
        start = time.perf_counter()
        measured = M.profile_iterations(training, config, ema_on_device=not args.ema_on_cpu)
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
    if args.compare_reference:
        start = time.perf_counter()
        _, fake_config = model_config(args.model, dtype)
        full = M.estimate_model(fake_config, dataclasses.replace(run, fake_score="full"), config, args.resolution, gpu=True, with_images=True,
                                base_dtype=args.base_dtype)
        reference = full.peak + full.base_weights  # + the generator's own frozen copy of the base
        figures["full_fake_score_estimate_gib"] = full.peak / M.GiB
        figures["reference_estimate_gib"] = reference / M.GiB
        figures["ratio_to_reference"] = estimate.peak / reference
        print(f"reference layout (three UNets, full fake score), same settings, estimated in {time.perf_counter() - start:.0f} s:")
        print(f"  this pack with --fake-score full (base + LoRA G + fp32 fake-score copy) {full.peak / M.GiB:7.2f} GiB")
        print(f"  + the generator's own frozen base copy                                  {full.base_weights / M.GiB:7.2f} GiB")
        print(f"  = reference layout                                                      {reference / M.GiB:7.2f} GiB")
        print(f"this layout / reference layout: {estimate.peak / reference:.3f}  ({estimate.peak / M.GiB:.2f} vs {reference / M.GiB:.2f} GiB)")
    for n in (int(v) for v in args.world_size.split(",") if v):
        start = time.perf_counter()
        _, fake_config = model_config(args.model, dtype)
        each = M.estimate_model(fake_config, run, config, args.resolution, gpu=True, with_images=True, world_size=n,
                                base_dtype=args.base_dtype)
        figures.setdefault("per_gpu_estimate_gib", {})[n] = each.peak / M.GiB
        print(f"{n} processes: {each.peak / M.GiB:7.2f} GiB per GPU (of which {each.unshard_transient / M.GiB:.2f} GiB gathered "
              f"fake-score blocks; {time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
