"""Benchmark: the DMD2 sampler against stock SamplerCustom + the `lcm` sampler.

Prints, for the same model, conditioning, latent and sigmas (the DMD2 4-step schedule):
- UNet forward passes per image for each path (DMD2 must equal the step count);
- wall time per image of DMD2Generate, SamplerCustom + DMD2Sampler and SamplerCustom + lcm,
  measured side by side (interleaved repeats, rotating order), medians and ratios.

The model is the tiny SDXL-architecture UNet of tests/tiny_models.py, optionally widened
(--channels), at a latent large enough that the UNet dominates the time.

    .venv/bin/python benchmarks/bench_sampler.py                 # CPU, about a minute
    .venv/bin/python benchmarks/bench_sampler.py --device cuda --channels 128 --latent 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--arch", choices=["sdxl", "sd15"], default="sdxl")
    parser.add_argument("--channels", type=int, default=32, help="UNet model_channels (32 = the test models)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = a 512 px image)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each path (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (1: stable timings on a shared machine; 0: torch's default)")
    parser.add_argument("--preset", default="4-step (999,749,499,249)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from comfyui_dmd2.comfy_env import ensure_comfy

    ensure_comfy(cpu=args.device == "cpu")

    import torch

    import comfy.model_patcher
    import comfy.model_management
    import comfy.samplers
    import comfy.utils
    import tiny_models
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    from comfyui_dmd2.nodes.sampler import DMD2Generate, dmd2_ksampler
    from comfyui_dmd2.nodes.schedules import schedule_sigmas

    comfy.utils.PROGRESS_BAR_ENABLED = False
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = comfy.model_management.get_torch_device()

    # the test architecture at the requested width
    tiny_models.register()
    unet_config = dict(tiny_models.UNET_CONFIGS[args.arch], model_channels=args.channels)
    model_config = tiny_models.MODEL_CONFIG_CLASSES[args.arch](unet_config)
    model_config.set_inference_dtype(torch.float32 if args.device == "cpu" else torch.float16, None)
    base = model_config.get_model({})
    tiny_models.init_weights_(base.diffusion_model, 0)
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=comfy.model_management.unet_offload_device())

    context_dim = unet_config["context_dim"]
    gen = torch.Generator().manual_seed(0)
    extra = {"pooled_output": torch.randn(1, 32, generator=gen)} if args.arch == "sdxl" else {}
    positive = [[torch.randn(1, 77, context_dim, generator=gen), extra]]
    latent = {"samples": torch.zeros(1, 4, args.latent, args.latent)}
    sigmas = schedule_sigmas(model, args.preset, "")
    steps = len(sigmas) - 1
    seed = 1

    def sampling_paths(m):
        """The three ways to sample the same model, sigmas and seed, measured side by side."""
        return {
            "DMD2Generate": lambda: DMD2Generate.execute(m, positive, latent, seed, args.preset, ""),
            "SamplerCustom+DMD2Sampler": lambda: SamplerCustom.execute(
                m, True, seed, 1.0, positive, positive, dmd2_ksampler(), sigmas, latent),
            "SamplerCustom+lcm (stock)": lambda: SamplerCustom.execute(
                m, True, seed, 1.0, positive, positive, comfy.samplers.sampler_object("lcm"), sigmas, latent),
        }

    paths = sampling_paths(model)

    forwards = {"n": 0}
    hook = base.diffusion_model.register_forward_hook(lambda *a: forwards.__setitem__("n", forwards["n"] + 1))

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    print(f"device {args.device} ({device}), arch {args.arch}, model_channels {args.channels}, "
          f"latent {args.latent}x{args.latent}, batch 1, torch threads {torch.get_num_threads()}, schedule {args.preset}: {steps} steps, "
          f"UNet parameters {sum(p.numel() for p in base.diffusion_model.parameters()) / 1e6:.1f} M")
    print("\nUNet forward passes per image (warm-up run):")
    for name, run in paths.items():
        forwards["n"] = 0
        run()
        sync()
        print(f"  {name:28s} {forwards['n']}")
        if name != "SamplerCustom+lcm (stock)" and forwards["n"] != steps:
            print(f"  ERROR: {name} ran {forwards['n']} UNet passes for {steps} steps")
            return 1
    hook.remove()

    times = {name: [] for name in paths}
    names = list(paths)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            sync()
            t0 = time.perf_counter()
            paths[name]()
            sync()
            times[name].append(time.perf_counter() - t0)

    stock = statistics.median(times["SamplerCustom+lcm (stock)"])
    print(f"\nwall time per image, median of {args.repeats} interleaved runs (min..max):")
    for name in names:
        med = statistics.median(times[name])
        print(f"  {name:28s} {med * 1000:9.1f} ms  ({min(times[name]) * 1000:.1f}..{max(times[name]) * 1000:.1f})"
              f"  ratio to stock lcm {med / stock:.3f}")
    # paired ratios (each repeat's pack time over the same repeat's stock time) are less
    # sensitive to load drifting during the run
    for name in names[:2]:
        paired = statistics.median(a / b for a, b in zip(times[name], times["SamplerCustom+lcm (stock)"]))
        print(f"  paired median ratio {name} / stock lcm: {paired:.3f} (target <= 1.02)")

    # Everything but the UNet: the same paths with the UNet call replaced by a zero output.
    # This isolates each path's own per-image overhead from UNet time and machine load.
    def no_unet(apply_model, call):
        return torch.zeros_like(call["input"])

    unet_free = model.clone()
    unet_free.set_model_unet_function_wrapper(no_unet)
    overhead_paths = sampling_paths(unet_free)
    overhead = {name: [] for name in overhead_paths}
    for r in range(10 * args.repeats + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            overhead_paths[name]()
            sync()
            if r:
                overhead[name].append(time.perf_counter() - t0)
    unet_time = stock - statistics.median(overhead["SamplerCustom+lcm (stock)"])
    print(f"\nper-image time outside the UNet (UNet replaced by zeros), median of {10 * args.repeats} interleaved runs:")
    for name in names:
        med = statistics.median(overhead[name])
        print(f"  {name:28s} {med * 1000:9.2f} ms")
    extra = statistics.median(overhead["SamplerCustom+DMD2Sampler"]) - statistics.median(overhead["SamplerCustom+lcm (stock)"])
    print(f"  DMD2Sampler's extra overhead over stock lcm: {extra * 1000:+.2f} ms per image = "
          f"{extra / unet_time * 100:+.2f}% of the {unet_time * 1000:.0f} ms of UNet time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
