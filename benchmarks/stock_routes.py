"""Benchmark: each few-step family sampled by the pack vs the stock ComfyUI route its model
card (or ComfyUI's own examples) recommends, both against the card's diffusers scheduler.

For every row: the same tiny UNet weights (tests/tiny_models.py, SDXL or SD1.5 architecture),
the same conditioning and the same start noise (ComfyUI's, from the seed). The reference is
the release card's diffusers loop (tests/test_families.py ``diffusers_reference``) with the
pack's re-noise stream as its generator. Printed per row: the timesteps each route visits,
the relative L2 distance of the final latent to the reference for the pack, for the stock
route as ComfyUI runs it, and for the stock route given the reference's re-noise draws (so
that only the schedule, start scaling and update rule differ; "=" where the route draws no
noise). Tiny random weights: the distances say how far a route is from the release's own
sampler on the same weights, not how an image looks.

Flux.1 rows (``--flow-only`` for those alone): the tiny Flux of tests/tiny_models.py against
the card's FlowMatchEulerDiscreteScheduler loop (tests/test_families_flux.py), the stock routes
being KSampler's samplers on the model's own sampling (ModelSamplingFlux at 1024 px for [dev]).

    .venv/bin/python benchmarks/stock_routes.py [--seeds 3] [--markdown] [--flow-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def routes():
    """(family preset, arch, stock route label, function(model) -> (model, sampler name, sigmas))."""
    import comfy.samplers
    import torch
    from comfy_extras.nodes_custom_sampler import SDTurboScheduler
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    def ksampler(sampler, scheduler, steps, sampling=None):
        def build(model):
            if sampling is not None:
                model = ModelSamplingDiscrete().patch(model, sampling, False)[0]
            ms = model.get_model_object("model_sampling")
            return model, sampler, comfy.samplers.calculate_sigmas(ms, scheduler, steps).cpu()
        return build

    def hyper_800(model):  # Hyper-SD's HyperSDXL1StepUnetScheduler custom node: sigma(800), 0
        ms = model.get_model_object("model_sampling")
        return model, "lcm", torch.cat([ms.sigma(torch.tensor([800])), torch.zeros(1)])

    def turbo(steps):
        def build(model):
            return model, "euler_ancestral", SDTurboScheduler.execute(model, steps, 1.0).result[0]
        return build

    return [
        ("4-step (999,749,499,249)", "sdxl", "lcm + simple (KSampler)", ksampler("lcm", "simple", 4)),
        ("1-step (399)", "sdxl", "lcm, sigmas at 399 (SamplerCustom)", None),
        ("SDXL-Lightning 1-step x0 (euler, 999)", "sdxl", "ModelSamplingDiscrete x0 + euler + sgm_uniform",
         ksampler("euler", "sgm_uniform", 1, "x0")),
        ("SDXL-Lightning 2-step (euler, trailing)", "sdxl", "euler + sgm_uniform", ksampler("euler", "sgm_uniform", 2)),
        ("SDXL-Lightning 4-step (euler, trailing)", "sdxl", "euler + sgm_uniform", ksampler("euler", "sgm_uniform", 4)),
        ("SDXL-Lightning 8-step (euler, trailing)", "sdxl", "euler + sgm_uniform", ksampler("euler", "sgm_uniform", 8)),
        ("Hyper-SD 1-step UNet (lcm, 800)", "sdxl", "HyperSDXL1StepUnetScheduler (800) + lcm", hyper_800),
        ("Hyper-SD 1-step LoRA (tcd, gamma 1.0)", "sdxl", "no stock TCD: lcm + sgm_uniform", ksampler("lcm", "sgm_uniform", 1)),
        ("Hyper-SD 4-step LoRA (ddim, trailing)", "sdxl", "ddim + ddim_uniform", ksampler("ddim", "ddim_uniform", 4)),
        ("Hyper-SD 4-step LoRA (ddim, trailing)", "sdxl", "euler + sgm_uniform", ksampler("euler", "sgm_uniform", 4)),
        ("LCM 4-step (lcm, 999,759,499,259)", "sd15", "ModelSamplingDiscrete lcm + lcm + sgm_uniform",
         ksampler("lcm", "sgm_uniform", 4, "lcm")),
        ("LCM 4-step (lcm, 999,759,499,259)", "sdxl", "ModelSamplingDiscrete lcm + lcm + sgm_uniform",
         ksampler("lcm", "sgm_uniform", 4, "lcm")),
        ("TCD 4-step (tcd, gamma 0.3)", "sdxl", "no stock TCD: ModelSamplingDiscrete lcm + lcm + sgm_uniform",
         ksampler("lcm", "sgm_uniform", 4, "lcm")),
        ("SDXL-Turbo 1-step (euler ancestral, 999)", "sdxl", "SDTurboScheduler + euler_ancestral", turbo(1)),
        ("SDXL-Turbo 4-step (euler ancestral, trailing)", "sdxl", "SDTurboScheduler + euler_ancestral", turbo(4)),
    ]


def measure(seeds: int):
    import comfy.sample
    import comfy.samplers
    import tiny_models
    import torch
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    from comfyui_dmd2.nodes import sampler as dmd2
    from comfyui_dmd2.nodes.families import RECIPES_BY_NAME
    from comfyui_dmd2.nodes.schedules import as_x0_model, schedule_sigmas
    from test_families import diffusers_reference
    from test_sampler import (
        diffusers_unet,
        empty_latent,
        model_space,
        relative_error,
        text_conditioning,
    )

    models = {arch: tiny_models.build_model(arch) for arch in ("sd15", "sdxl")}
    unets = {arch: diffusers_unet(arch, m) for arch, m in models.items()}
    rows = []
    for preset, arch, label, build in routes():
        recipe = RECIPES_BY_NAME[preset]
        base = models[arch]
        if recipe.prediction == "x0":
            base = as_x0_model(base)
        ours, stock, stock_same = [], [], []
        visited = None
        for seed in range(seeds):
            cond = text_conditioning(arch)
            start = comfy.sample.prepare_noise(empty_latent()["samples"], seed)
            reference = diffusers_reference(arch, unets[arch], cond, start, preset,
                                            torch.Generator().manual_seed(dmd2.renoise_seed(seed)))
            out = dmd2.DMD2Generate.execute(base, cond, empty_latent(), seed, preset, "").result[0]["samples"]
            ours.append(relative_error(model_space(base, out), reference))
            if build is None:  # DMD2 1-step: stock lcm on the pack's exact sigmas
                model, name, sigmas = base, "lcm", schedule_sigmas(base, preset)
            else:
                model, name, sigmas = build(base)
            ms = model.get_model_object("model_sampling")
            visited = [int(ms.timestep(s)) for s in sigmas[:-1]]
            runs = {"as run": comfy.samplers.sampler_object(name)}
            if name in ("lcm", "euler_ancestral"):
                noise = dmd2.fresh_noise_sampler(empty_latent()["samples"], seed)
                runs["same noise"] = comfy.samplers.ksampler(name, extra_options={"noise_sampler": noise})
            for key, sampler in runs.items():
                got = SamplerCustom.execute(model, True, seed, 1.0, cond, cond, sampler, sigmas, empty_latent()).result[0]
                error = relative_error(model_space(model, got["samples"]), reference)
                (stock if key == "as run" else stock_same).append(error)
        rows.append({"preset": preset, "arch": arch, "route": label, "timesteps": recipe.timesteps, "stock_timesteps": visited,
                     "ours": statistics.mean(ours), "stock": statistics.mean(stock),
                     "stock_same_noise": statistics.mean(stock_same) if stock_same else None})
    return rows


def flow_routes():
    """(flow preset, stock route label, sampler, scheduler): KSampler's samplers and schedulers."""
    return [
        ("DMD2 flow 4-step (Flux dev shift)", "lcm + simple (KSampler)", "lcm", "simple"),
        ("DMD2 flow 8-step (Flux dev shift)", "lcm + simple (KSampler)", "lcm", "simple"),
        ("FLUX.1-schnell 4-step (euler, unshifted)", "euler + simple (KSampler)", "euler", "simple"),
        ("FLUX.1-Turbo-Alpha 8-step (euler, dev shift, guidance 3.5)", "euler + simple (KSampler)", "euler", "simple"),
        ("FLUX.1-Turbo-Alpha 8-step (euler, dev shift, guidance 3.5)", "euler + beta (KSampler)", "euler", "beta"),
        ("Hyper-FLUX 8-step LoRA 0.125 (euler, dev shift, guidance 3.5)", "euler + simple (KSampler)", "euler", "simple"),
        ("Hyper-FLUX 16-step LoRA 0.125 (euler, dev shift, guidance 3.5)", "euler + simple (KSampler)", "euler", "simple"),
    ]


def flow_measure(seeds: int):
    import comfy.sample
    import comfy.samplers
    import tiny_models
    import torch
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    from comfyui_dmd2.nodes import sampler as dmd2
    from comfyui_dmd2.nodes.families import FLOW_RECIPES_BY_NAME
    from test_families_flux import (
        FLOW_CARDS,
        diffusers_reference,
        flux_conditioning,
        flux_latent,
    )
    from test_sampler import relative_error

    models = {"flux_dev": tiny_models.build_flux(), "flux_schnell": tiny_models.build_flux(schnell=True)}
    rows = []
    for preset, label, name, scheduler in flow_routes():
        recipe, card = FLOW_RECIPES_BY_NAME[preset], FLOW_CARDS[preset]
        model = models[recipe.base]
        space = model.model.process_latent_in
        ms = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, recipe.steps).cpu()
        ours, stock, stock_same = [], [], []
        for seed in range(seeds):
            cond = flux_conditioning()
            start = comfy.sample.prepare_noise(flux_latent()["samples"], seed)
            reference = diffusers_reference(model, card, cond, start, torch.Generator().manual_seed(dmd2.renoise_seed(seed)))
            out = dmd2.DMD2Generate.execute(model, cond, flux_latent(), seed, preset, "").result[0]["samples"]
            ours.append(relative_error(space(out), reference))
            runs = {"as run": comfy.samplers.sampler_object(name)}
            if name == "lcm":
                noise = dmd2.fresh_noise_sampler(flux_latent()["samples"], seed)
                runs["same noise"] = comfy.samplers.ksampler(name, extra_options={"noise_sampler": noise})
            for key, sampler in runs.items():  # ComfyUI's default guidance (3.5) is the cards'
                got = SamplerCustom.execute(model, True, seed, 1.0, cond, cond, sampler, sigmas, flux_latent()).result[0]
                (stock if key == "as run" else stock_same).append(relative_error(space(got["samples"]), reference))
        pack_sigmas = dmd2.prepare(model, preset)[2]
        rows.append({"preset": preset, "arch": recipe.base, "route": label,
                     "timesteps": [f"{float(s):.3f}" for s in pack_sigmas[:-1]],
                     "stock_timesteps": [f"{float(s):.3f}" for s in sigmas[:-1]],
                     "ours": statistics.mean(ours), "stock": statistics.mean(stock),
                     "stock_same_noise": statistics.mean(stock_same) if stock_same else None})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--flow-only", action="store_true", help="only the Flux.1 rows (sigmas instead of timesteps)")
    args = parser.parse_args(argv)
    import conftest  # noqa: F401  (ComfyUI on the path, the tiny architectures registered)
    import torch

    torch.set_num_threads(1)
    rows = ([] if args.flow_only else measure(args.seeds)) + flow_measure(args.seeds)
    if args.markdown:
        print("| release preset (arch) | pack: timesteps | distance to the card's diffusers sampler | stock route | "
              "its timesteps | its distance | with the same noise draws |")
        print("|---|---|---|---|---|---|---|")
    for r in rows:
        same = "=" if r["stock_same_noise"] is None else f"{r['stock_same_noise']:.1e}"
        ts = ",".join(map(str, r["timesteps"]))
        sts = ",".join(map(str, r["stock_timesteps"]))
        if args.markdown:
            print(f"| {r['preset']} ({r['arch']}) | {ts} | {r['ours']:.1e} | {r['route']} | {sts} | {r['stock']:.1e} | {same} |")
        else:
            print(f"{r['preset']:48s} {r['arch']:5s} ours {r['ours']:.1e} | {r['route']:58s} {sts:32s} "
                  f"stock {r['stock']:.1e} same-noise {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
