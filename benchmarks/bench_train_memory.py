"""Peak memory and step time of the trainer's layout against the reference DMD2 layout.

* shared (this pack): one frozen UNet serves the real score (no adapter), the generator
  (+ LoRA G) and the fake score (+ LoRA F, + GAN head on its mid-block features); optimiser
  state only for the adapters and the head.
* reference (the DMD2 repository's LoRA mode): three resident UNets, a frozen real score,
  a generator copy with LoRA G, and a fake score copy fully fine-tuned (+ the same head).

Both run the same ``DMD2Trainer`` loop on the same random-weight ComfyUI UNet, the same
batch and settings, each in its own subprocess (so peak RSS is per layout); on CUDA the
figure is ``torch.cuda.max_memory_allocated``. Prints one line per layout and the ratios.

    python benchmarks/bench_train_memory.py                 # mid-size SD1.5-shaped UNet, CPU ok
    python benchmarks/bench_train_memory.py --full-size-sdxl --device cuda   # needs a big GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import MODELS, random_data, random_model  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class ReferenceBackend:
    """The reference layout over the same protocol: three UNets, the fake one fully trained."""

    def __init__(self, shared, gradient_checkpointing: bool):
        from comfyui_dmd2.training.lora import UNetLoRA

        self.s = shared  # reuse data, schedule, head construction and autocast of a shared backend
        self.device, self.family, self.has_gan_head = shared.device, shared.family, shared.has_gan_head
        shared.adapters.remove()  # back to the plain frozen UNet: this is the real score
        self.real = shared.unet
        self.generator = copy.deepcopy(self.real)
        self.gen_lora = UNetLoRA(self.generator, shared.unet_config,
                                 rank=shared.adapters.rank, alpha=shared.adapters.alpha, adapters=("generator",))
        self.gen_lora.switch.active = "generator"
        self.fake = copy.deepcopy(self.real).float().requires_grad_(True)  # full fine-tuning: fp32 master weights
        self.head = shared.head
        self._features, self._stop = None, False
        if self.head is not None:
            self.fake.middle_block[-1].register_forward_hook(self._capture)
        if gradient_checkpointing:
            from comfyui_dmd2.training.backend import enable_gradient_checkpointing

            enable_gradient_checkpointing(self.generator, self.gen_lora.switch)
            enable_gradient_checkpointing(self.fake, self.gen_lora.switch)

    def sample_batch(self, n):
        return self.s.sample_batch(n)

    def _eps(self, unet, x_t, t, cond):
        with self.s._autocast():
            return unet(x_t, t.float(), context=cond.context, y=cond.y).float()

    def _x0(self, unet, x_t, t, cond):
        return self.family.to_x0(x_t, self._eps(unet, x_t, t, cond), t)

    def generator_x0(self, x_t, t, cond):
        return self._x0(self.generator, x_t, t, cond)

    def fake_x0(self, x_t, t, cond):
        return self._x0(self.fake, x_t, t, cond)

    def real_x0(self, x_t, t, cond, uncond, scale):
        from comfyui_dmd2.training import losses
        from comfyui_dmd2.training.backend import stack_conditionings

        both = stack_conditionings([cond, uncond])
        eps_c, eps_u = self._eps(self.real, torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return self.family.to_x0(x_t, losses.classifier_free_guidance(eps_c, eps_u, scale), t)

    def _capture(self, module, inputs, output):
        if self._stop:
            self._features = output
            raise StopIteration

    def fake_logits(self, x_t, t, cond):
        self._stop = True
        try:
            self._eps(self.fake, x_t, t, cond)
        except StopIteration:
            pass
        finally:
            self._stop = False
        with self.s._autocast():
            return self.head(self._features)

    def generator_parameters(self):
        return list(self.gen_lora.named_parameters("generator"))

    def fake_score_parameters(self):
        return [(f"fake.{k}", p) for k, p in self.fake.named_parameters()] + [(f"head.{k}", p) for k, p in self.head.named_parameters()]


def run_one(args) -> dict:
    from comfyui_dmd2.comfy_env import ensure_comfy

    device = torch.device(args.device)
    ensure_comfy(cpu=device.type == "cpu")
    from comfyui_dmd2.training import backend as B
    from comfyui_dmd2.training.config import DMD2Config
    from comfyui_dmd2.training.trainer import DMD2Trainer

    torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    rss_imports = peak_rss_mib()
    arch, base = random_model(args.model, torch.bfloat16 if on_gpu else torch.float32, device)
    unet_params = sum(p.numel() for p in base.diffusion_model.parameters())
    checkpointing = {"auto": on_gpu, "on": True, "off": False}[args.gradient_checkpointing]
    data = random_data(MODELS[args.model][1], args.resolution)
    latent = args.resolution // 8
    shared = B.SharedBaseBackend(
        base, data, (4, latent, latent), lora_rank=args.rank, lora_alpha=8.0,
        device=device, gradient_checkpointing=checkpointing and args.layout == "shared",  # reference: on its copies
    )
    backend = shared if args.layout == "shared" else ReferenceBackend(shared, checkpointing)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    rss_model = peak_rss_mib()
    config = DMD2Config.for_arch(arch, fake_updates_per_generator_update=1, warmup_steps=0, steps=args.steps, batch_size=args.batch_size)
    trainer = DMD2Trainer(config, backend)
    trainer.step()  # warm-up (allocations, optimiser state)
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    if on_gpu:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    trainable = sum(p.numel() for p in trainer.generator_params + trainer.fake_params)
    out = {
        "layout": args.layout, "model": args.model, "device": str(device), "step_s": step_s, "trainable_params": trainable,
        "unet_params": unet_params,
        "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": rss_imports, "rss_after_setup_mib": rss_model,
    }
    if on_gpu:
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_resident_before_training_mib"] = resident / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mid-sd15", choices=sorted(MODELS))
    p.add_argument("--full-size-sdxl", action="store_true", help="real SDXL size, random weights (for a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, help="LoRA rank (default 16 for the mid-size model, about SDXL's 64 at its width; 64 for SDXL)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--repeats", type=int, default=2, help="runs of each layout, alternated")
    p.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--layout", choices=["shared", "reference"], help="(internal) run one layout and print JSON")
    args = p.parse_args()
    if args.full_size_sdxl:
        args.model = "sdxl"
        if args.resolution == 256:
            args.resolution = 1024
    if args.rank is None:
        args.rank = 64 if args.model == "sdxl" else 16
    if args.layout:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    # Alternate the layouts (shared, reference, shared, ...): on a busy machine the load changes
    # over time; keep each layout's fastest step and largest peak.
    results: dict[str, dict | None] = {"shared": None, "reference": None}
    for _ in range(args.repeats):
        for layout in ("shared", "reference"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--layout", layout]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{layout}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
                continue
            r, best = json.loads(lines[-1][len("RESULT "):]), results[layout]
            if best is not None:
                r["step_s"] = min(r["step_s"], best["step_s"])
                for key in ("peak_rss_mib", "gpu_peak_mib"):
                    if key in r:
                        r[key] = max(r[key], best[key])
            results[layout] = r
    print(f"model {args.model}, resolution {args.resolution}, batch {args.batch_size}, LoRA rank {args.rank}, "
          f"gradient checkpointing {args.gradient_checkpointing}, device {args.device}, threads {args.threads}")
    mem_key = "gpu_peak_mib" if args.device.startswith("cuda") else "peak_rss_mib"
    for layout, r in results.items():
        if r:
            extra = f", growth over imports {r[mem_key] - r['rss_after_imports_mib']:.0f} MiB" if mem_key == "peak_rss_mib" else ""
            print(f"{layout:9s}: peak {r[mem_key]:8.0f} MiB{extra}, step {r['step_s']:.3f} s, "
                  f"trainable {r['trainable_params'] / 1e6:.1f} M of UNet {r['unet_params'] / 1e6:.1f} M")
    s, r = results.get("shared"), results.get("reference")
    if s and r:
        print(f"memory ratio shared/reference: {s[mem_key] / r[mem_key]:.2f}")
        if mem_key == "peak_rss_mib":
            growth = (s[mem_key] - s["rss_after_imports_mib"]) / (r[mem_key] - r["rss_after_imports_mib"])
            print(f"memory ratio (growth over imports) shared/reference: {growth:.2f}")
        print(f"step time ratio shared/reference: {s['step_s'] / r['step_s']:.2f}")


if __name__ == "__main__":
    main()
