"""The GPU check: full-size SDXL training on one GPU, measured, in a few minutes.

For each precision (bf16; fp16 too when asked) and batch size: a random-weight SDXL UNet
(the real architecture) on the GPU, the production backend and trainer with the command's
GPU defaults (gradient checkpointing, LoRA rank 64, GAN on, the SDXL settings) for
``--iterations`` iterations: peak ``torch.cuda.max_memory_allocated``, seconds per
iteration of each kind, every loss finite; then the generator exported as ``dmd2-train``
exports it and loaded by ComfyUI's stock LoRA loader (every key used). Beside it, the
estimate ``dmd2-train --estimate`` makes for the same settings (computed on the CPU in a
parallel process while the GPU trains). Prints one table; ``--json`` keeps the figures.

    bash benchmarks/gpu_check.sh                       # SDXL 1024, batch 1 and 2, bf16 (+ fp16); Flux.1 [dev] 1024 fp8 and bf16 base
    python benchmarks/gpu_check.py --device cpu --model mid-sd15 --resolution 64 --iterations 2 --precisions no   # smoke test
    python benchmarks/gpu_check.py --model sd15 --resolution 512 --batches 1 --precisions bf16 --fake-score full --iterations 10
    python benchmarks/gpu_check.py --model flux-dev --resolution 1024 --rank 32 --batches 1 --precisions bf16 --base-dtype fp8 --iterations 10

``--base-dtype fp8`` stores the random base in float8 e4m3fn, each layer computed in bf16
through ComfyUI's manual-cast layers (``dmd2-train --base-dtype fp8``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def start_estimate(args, precision: str, batch: int, out: Path) -> subprocess.Popen | None:
    if args.no_estimate:
        return None
    cmd = [sys.executable, str(HERE / "bench_memory_estimate.py"), "--skip-measure", "--model", args.model,
           "--resolution", str(args.resolution), "--rank", str(args.rank), "--batch-size", str(batch), "--grad-accum", "1",
           "--precision", precision, "--fake-score", args.fake_score, "--base-dtype", args.base_dtype,
           "--threads", "1", "--json", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def check_one(args, precision: str, batch: int, folder: Path) -> dict:
    from bench_models import dmd2_config, random_data, random_model
    from comfyui_dmd2.training import memory
    from comfyui_dmd2.training.backend import export_generator_lora
    from comfyui_dmd2.training.run import RunConfig

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[precision]
    base_dtype, fallback = memory.base_weight_dtype(args.base_dtype, dtype, device)
    if fallback:
        print(fallback)
    arch, base = random_model(args.model, base_dtype, device, compute=dtype)
    data = random_data(base.model_config.unet_config, args.resolution)
    run = RunConfig(checkpoint="-", prompts="-", output=str(folder), images="-", lora_rank=args.rank, mixed_precision=precision,
                    gradient_checkpointing="auto", device=str(device), fake_score=args.fake_score)
    config = dmd2_config(arch, batch_size=batch, grad_accum=1, steps=args.iterations)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    training = memory.training_run(base, data, run, config, args.resolution, folder, device=str(device))
    trainer = training.trainer
    times: dict[str, list[float]] = {"generator": [], "fake": []}
    finite = True
    for i in range(args.iterations):
        start = time.perf_counter()
        metrics = trainer.step()
        if on_gpu:
            torch.cuda.synchronize()
        if i >= 2 or args.iterations <= 2:  # the first iterations allocate and tune kernels
            times["generator" if metrics["generator_updated"] else "fake"].append(time.perf_counter() - start)
        finite &= all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss"))
    result = {"precision": precision, "base_dtype": str(base_dtype).removeprefix("torch."), "batch": batch,
              "iterations": args.iterations, "losses_finite": finite,
              "generator_s": min(times["generator"], default=float("nan")), "fake_s": min(times["fake"], default=float("nan"))}
    if on_gpu:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30

    # Export as the command does, then ComfyUI's stock loader on the untouched base.
    lora_path = folder / f"gpu_check_{precision}_b{batch}.safetensors"
    export_generator_lora(trainer, training.backend, lora_path, {"dmd2_check": "gpu"})
    layers = len(training.backend.adapters.layers)
    training.backend.close()
    del training, trainer
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))
    lost = []
    handler = logging.Handler()
    handler.emit = lambda record: lost.append(record.getMessage()) if "lora key not loaded" in record.getMessage() else None
    logging.getLogger().addHandler(handler)
    try:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(lora_path), safe_load=True), 1.0, 0.0)
    finally:
        logging.getLogger().removeHandler(handler)
    result["lora_layers_loaded"] = f"{len(patched.patches)}/{layers}" + (f", {len(lost)} keys not loaded" if lost else "")
    result["lora_ok"] = len(patched.patches) == layers and not lost
    del patched, patcher, base
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sdxl")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--fake-score", default="lora", choices=["lora", "full"], help="as dmd2-train --fake-score")
    p.add_argument("--batches", default="1,2")
    p.add_argument("--precisions", default="bf16,fp16", help="fp16 is run where asked (GPUs without bf16 use it)")
    p.add_argument("--iterations", type=int, default=50, help="for batch 1 in the first precision; 10 for the others")
    p.add_argument("--base-dtype", default="auto", choices=["auto", "fp8", "bf16", "fp16"],
                   help="the frozen base's weights, as dmd2-train --base-dtype (auto: the precision's dtype)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-estimate", action="store_true")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()

    from comfyui_dmd2.comfy_env import ensure_comfy

    ensure_comfy(cpu=not args.device.startswith("cuda"))
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
              f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}; torch {torch.__version__}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="dmd2_gpu_check_"))
    estimates_file = folder / "estimates.jsonl"
    configs = [(precision, int(batch)) for precision in args.precisions.split(",") for batch in args.batches.split(",")]
    estimating = [start_estimate(args, precision, batch, estimates_file) for precision, batch in configs]
    results = []
    iterations = args.iterations
    for precision, batch in configs:
        args.iterations = iterations if not results else min(iterations, 10)
        started = time.perf_counter()
        try:
            results.append(check_one(args, precision, batch, folder))
        except torch.cuda.OutOfMemoryError as exc:
            results.append({"precision": precision, "batch": batch, "error": f"out of memory: {str(exc)[:120]}"})
        print(f"  {precision} batch {batch}: {time.perf_counter() - started:.0f} s", flush=True)
    for proc in estimating:
        if proc is not None:
            proc.wait(timeout=900)
    estimates = {}
    if estimates_file.is_file():
        for line in estimates_file.read_text().splitlines():
            e = json.loads(line)
            estimates[(e["precision"], e["batch"])] = e["estimate_gib"]
    print(f"{args.model} at {args.resolution} px, LoRA rank {args.rank}, fake score {args.fake_score}, base weights "
          f"{args.base_dtype}, GAN on, gradient checkpointing on, grad_accum 1")
    print(f"{'precision':9s} {'batch':>5s} {'peak GiB':>9s} {'estimate':>9s} {'ratio':>6s} {'gen s/it':>9s} {'fake s/it':>9s} {'finite':>7s}  LoRA in ComfyUI")
    for r in results:
        if "error" in r:
            print(f"{r['precision']:9s} {r['batch']:5d}  {r['error']}")
            continue
        est = estimates.get((r["precision"], r["batch"]))
        r["estimate_gib"] = est
        peak = r.get("peak_gib")
        ratio = f"{est / peak:6.2f}" if est and peak else "     -"
        print(f"{r['precision']:9s} {r['batch']:5d} {peak if peak is not None else float('nan'):9.2f} "
              f"{est if est is not None else float('nan'):9.2f} {ratio} {r['generator_s']:9.2f} {r['fake_s']:9.2f} "
              f"{str(r['losses_finite']):>7s}  {r['lora_layers_loaded']}")
    if args.json:
        with open(args.json, "a") as fh:
            for r in results:
                fh.write(json.dumps({"model": args.model, "resolution": args.resolution, "fake_score": args.fake_score, **r}) + "\n")
    ok = all(r.get("losses_finite") and r.get("lora_ok") for r in results)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
