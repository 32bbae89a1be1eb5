"""Work per training iteration, today's trainer against the one before (side by side).

"before": ComfyUI's own attention choice (on the CPU its chunked sub-quadratic attention)
and the discriminator's real and generated latents scored in two passes; "after": every
attention through torch's SDPA and both scored in one pass of 2B (``backend.sdpa_attention``,
``SharedBaseBackend.cat_conditions``). The same random-weight UNet, data and seeds; the two
alternate (a busy machine slows both alike) and each keeps its fastest iteration of each
kind. Prints the UNet forward-equivalents per sample (FLOPs counted by torch's formulas /
one UNet forward) of a generator-update and a fake-score-only iteration, the step times and
their ratio, and the mean over a generator-update cycle.

    python benchmarks/bench_iteration_work.py                      # mid-size SD1.5-shaped UNet, 256 px, CPU
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from comfyui_dmd2.comfy_env import ensure_comfy

    ensure_comfy(cpu=True)
    from bench_memory_estimate import random_model

    from comfyui_dmd2.training import backend as B
    from comfyui_dmd2.training.config import DMD2Config
    from comfyui_dmd2.training.memory import TensorMemory
    from comfyui_dmd2.training.trainer import DMD2Trainer

    arch, base = random_model(args.model, torch.float32)
    unet = base.model_config.unet_config
    latent = args.resolution // 8
    gen = torch.Generator().manual_seed(1)
    cond = lambda: B.Conditioning(torch.randn(1, 77, unet["context_dim"], generator=gen),  # noqa: E731
                                  torch.randn(1, unet["adm_in_channels"], generator=gen) if unet.get("adm_in_channels") else None)
    data = B.TrainingData([cond() for _ in range(4)], cond(), real_latents=torch.randn(4, 4, latent, latent, generator=gen))
    variants = {}
    for name, attention, batched in (("before", "comfy", False), ("after", "sdpa", True)):
        backend = B.SharedBaseBackend(copy.deepcopy(base), data, (4, latent, latent), lora_rank=args.rank, lora_alpha=8.0,
                                      device="cpu", attention=attention)
        if not batched:
            backend.cat_conditions = None
        config = DMD2Config.for_arch(arch, fake_updates_per_generator_update=2, warmup_steps=0, grad_accum=1, batch_size=1)
        variants[name] = {"trainer": DMD2Trainer(config, backend), "backend": backend, "times": {"generator": [], "fake": []}}
    x_t = torch.zeros((1, 4, latent, latent))
    t = torch.full((1,), 500)
    with TensorMemory() as counter, torch.no_grad():
        variants["after"]["backend"].eps(x_t, t, data.prompts[0], None)
    unit = counter.flops
    for _ in range(args.repeats):
        for kind in ("generator", "fake"):
            for name, v in variants.items():
                counter = TensorMemory()
                start = time.perf_counter()
                with counter:
                    v["trainer"].step()
                v["times"][kind].append((time.perf_counter() - start, counter.flops / unit))
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
    b, a = variants["before"]["times"], variants["after"]["times"]
    print(f"step time ratio after/before: generator-update {min(a['generator'])[0] / min(b['generator'])[0]:.2f}, "
          f"fake-score-only {min(a['fake'])[0] / min(b['fake'])[0]:.2f}, mean over the cycle {mean['after'] / mean['before']:.2f}")


if __name__ == "__main__":
    main()
