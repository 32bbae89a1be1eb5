"""Work per training iteration, today's trainer against the one before (side by side).

"before": ComfyUI's own attention choice (on the CPU its chunked sub-quadratic attention)
and the discriminator's real and generated latents scored in two passes; "after": every
attention through torch's SDPA and both scored in one pass of 2B (``backend.sdpa_attention``,
``SharedBaseBackend.cat_conditions``). The same random-weight UNet, data and seeds; the two
alternate (a busy machine slows both alike) and each keeps its fastest iteration of each
kind. Prints the UNet forward-equivalents per sample (FLOPs counted by torch's formulas /
one UNet forward) of a generator-update and a fake-score-only iteration, the step times and
their ratio, and the mean over a generator-update cycle.

``--compile`` adds a third variant, "compiled": "after" with every res block's forward through
``torch.compile`` (regional compilation, inductor). Each block recompiles per active adapter,
grad mode and input shape (dozens of graphs); the transformer blocks are left out because
ComfyUI passes each its block index in ``transformer_options``, which makes one graph per block.
The first iterations compile (minutes on a CPU); the fastest of ``--repeats`` is what counts.

    python benchmarks/bench_iteration_work.py                      # mid-size SD1.5-shaped UNet, 256 px, CPU
    python benchmarks/bench_iteration_work.py --compile --repeats 4 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mid-sd15")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="iterations of each kind per variant, alternated")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--compile", action="store_true", help="also 'after' with the res blocks through torch.compile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from comfyui_dmd2.comfy_env import ensure_comfy

    ensure_comfy(cpu=True)
    from bench_models import random_data, random_model

    from comfyui_dmd2.training import backend as B
    from comfyui_dmd2.training.config import DMD2Config
    from comfyui_dmd2.training.memory import TensorMemory
    from comfyui_dmd2.training.trainer import DMD2Trainer

    arch, base = random_model(args.model, torch.float32)
    latent = args.resolution // 8
    data = random_data(base.model_config.unet_config, args.resolution)
    variants = {}
    layouts = [("before", "comfy", False), ("after", "sdpa", True)] + ([("compiled", "sdpa", True)] if args.compile else [])
    for name, attention, batched in layouts:
        backend = B.SharedBaseBackend(copy.deepcopy(base), data, (4, latent, latent), lora_rank=args.rank, lora_alpha=8.0,
                                      device="cpu", attention=attention)
        if not batched:
            backend.cat_conditions = None
        if name == "compiled":
            from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

            torch._dynamo.config.cache_size_limit = 256  # graphs per block: adapters x grad modes x shapes
            for module in backend.unet.modules():
                if isinstance(module, ResBlock):
                    module.forward = torch.compile(module.forward)
        config = DMD2Config.for_arch(arch, fake_updates_per_generator_update=2, warmup_steps=0, grad_accum=1, batch_size=1)
        variants[name] = {"trainer": DMD2Trainer(config, backend), "backend": backend, "times": {"generator": [], "fake": []}}
    x_t = torch.zeros((1, 4, latent, latent))
    t = torch.full((1,), 500)
    with TensorMemory() as counter, torch.no_grad():
        variants["after"]["backend"].raw(x_t, t, data.prompts[0], None)
    unit = counter.flops
    for _ in range(args.repeats):
        for kind in ("generator", "fake"):
            for name, v in variants.items():
                # FLOPs are counted in a dispatch mode, which costs time per operation: with
                # --compile every variant runs without it (the counts come from "after")
                counter = TensorMemory() if not args.compile else contextlib.nullcontext()
                start = time.perf_counter()
                with counter:
                    v["trainer"].step()
                flops = counter.flops / unit if not args.compile else float("nan")
                v["times"][kind].append((time.perf_counter() - start, flops))
    n = DMD2Config.for_arch(arch).fake_updates_per_generator_update
    print(f"{args.model} at {args.resolution} px, LoRA rank {args.rank}, batch 1, GAN on, fp32 on the CPU, {args.threads} threads; "
          f"counted per generator-update cycle of {n} iterations ({arch} default)")
    mean = {}
    for name, v in variants.items():
        g_s, g_fe = min(v["times"]["generator"])
        f_s, f_fe = min(v["times"]["fake"])
        mean[name] = (g_s + (n - 1) * f_s) / n
        print(f"{name:6s}: generator-update iteration {g_s:6.2f} s ({g_fe:.2f} forward-equivalents), "
              f"fake-score-only {f_s:6.2f} s ({f_fe:.2f}); mean {mean[name]:.2f} s, "
              f"{(g_fe + (n - 1) * f_fe) / n:.2f} forward-equivalents")
    for name, reference in (("after", "before"), ("compiled", "after")):
        if name not in variants:
            continue
        a, b = variants[name]["times"], variants[reference]["times"]
        print(f"step time ratio {name}/{reference}: generator-update {min(a['generator'])[0] / min(b['generator'])[0]:.2f}, "
              f"fake-score-only {min(a['fake'])[0] / min(b['fake'])[0]:.2f}, mean over the cycle {mean[name] / mean[reference]:.2f}")


if __name__ == "__main__":
    main()
