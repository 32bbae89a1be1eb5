"""Random-weight models and training data for the benchmarks (one place for all of them).

The real SD1.5 and SDXL UNet architectures (or a mid-size SD1.5-shaped one) as ComfyUI
builds them, weights drawn at random (memory and time do not depend on their values), and
random conditions and real latents of the right shapes for ``backend.TrainingData``.
"""

from __future__ import annotations

import torch

# Mid-size: SD1.5's block structure at 128 base channels (~ 1/6 of SD1.5's parameters).
MODELS = {
    "mid-sd15": ("sd15", {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": 128, "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
        "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None,
        "use_temporal_attention": False, "use_temporal_resblock": False, "num_heads": 8, "num_head_channels": -1,
    }),
    "sdxl": ("sdxl", {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
        "context_dim": 2048, "use_linear_in_transformer": True, "adm_in_channels": 2816, "num_classes": "sequential",
        "use_temporal_attention": False, "use_temporal_resblock": False, "num_heads": -1, "num_head_channels": 64,
    }),
}
MODELS["sd15"] = ("sd15", {**MODELS["mid-sd15"][1], "model_channels": 320})  # SD1.5 itself (860 M parameters)
MODELS["tiny-sd15"] = ("sd15", {**MODELS["mid-sd15"][1], "model_channels": 32})  # the test models' width
# Flux.1 [dev] as ComfyUI detects it from the released file (flux1-dev.safetensors: 19 double
# and 38 single blocks, width 3072, 24 heads, T5-XXL 4096 context, CLIP-L 768 vector, embedded
# guidance; 11.9 B parameters); for the CPU, a mid-size one of the same structure (width 768,
# 12 heads of 64, 2 + 4 blocks: 85 M) and one at Flux.1's width with 2 + 4 blocks (1.3 B: the
# full-size layers, whose per-layer fp8 -> bf16 casts are the full model's).
MODELS["flux-dev"] = ("flux_dev", {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
    "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
})
MODELS["mid-flux"] = ("flux_dev", {**MODELS["flux-dev"][1], "hidden_size": 768, "num_heads": 12, "depth": 2,
                                   "depth_single_blocks": 4, "axes_dim": [8, 28, 28]})
MODELS["wide-flux"] = ("flux_dev", {**MODELS["flux-dev"][1], "depth": 2, "depth_single_blocks": 4})


def model_config(name: str, dtype: torch.dtype, compute: torch.dtype | None = None):
    """(arch, ComfyUI model config) of the named size with ``dtype`` weights, computed in
    ``compute`` through ComfyUI's manual-cast layers where it differs (an fp8 base in bf16)."""
    import comfy.supported_models
    from comfyui_dmd2.training.memory import set_base_dtype

    arch, unet_config = MODELS[name]
    cls = {"sdxl": comfy.supported_models.SDXL, "flux_dev": comfy.supported_models.Flux}.get(arch, comfy.supported_models.SD15)
    config = cls(dict(unet_config))
    set_base_dtype(config, dtype, compute or dtype)
    return arch, config


def dmd2_config(arch: str, **overrides):
    """``DMD2Config.for_arch``; for Flux.1 [dev] before ``training/config.py`` has its defaults,
    SDXL's with what changes the memory of a Flux run: no CFG pass (the guidance is embedded,
    real_guidance_scale 1) and the 4-step student."""
    from comfyui_dmd2.training.config import ARCH_DEFAULTS, DMD2Config

    if arch == "flux_dev" and arch not in ARCH_DEFAULTS:
        return DMD2Config.for_arch("sdxl", **{"real_guidance_scale": 1.0, "generator_timesteps": (999, 749, 499, 249), **overrides})
    return DMD2Config.for_arch(arch, **overrides)


def random_model(name: str, dtype: torch.dtype, device: str | torch.device = "cpu", compute: torch.dtype | None = None):
    """(arch, ComfyUI ``BaseModel``) of the named size, weights N(0, 0.02) filled on ``device``
    (``compute``: as ``model_config``)."""
    device = torch.device(device)
    arch, config = model_config(name, dtype, compute)
    base = config.get_model({})
    base.diffusion_model.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            if p.dtype.itemsize == 1:  # fp8: no random kernels; drawn in bf16, rounded
                p.copy_(torch.empty(p.shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen))
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if device.type == "cpu" and dtype != torch.float32:
        # CUDA autocast runs group and layer norms in fp32, bf16 weights cast; the CPU kernels
        # refuse an fp32 input with bf16 norm weights, but take fp32 weights with any input. The
        # norms' weights (0.1 % of the parameters) are kept in fp32 so the CPU runs what a GPU runs.
        for module in base.diffusion_model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.float()
    return arch, base


def random_data(unet_config: dict, resolution: int, prompts: int = 4, real: int = 4, seed: int = 1):
    """``TrainingData`` of ``prompts`` random conditions (plus the unconditional one) and
    ``real`` random real latents at ``resolution`` px, for the UNet of ``unet_config``."""
    from comfyui_dmd2.training.backend import Conditioning, TrainingData
    from comfyui_dmd2.training.memory import fake_conditioning

    gen = torch.Generator().manual_seed(seed)
    shapes = fake_conditioning(unet_config)  # SD's CLIP context and ADM vector, or Flux's T5 tokens and CLIP-L vector

    def condition():
        return Conditioning(*(None if t is None else torch.randn(t.shape, generator=gen) for t in (shapes.context, shapes.y)))

    latent = resolution // 8
    channels = unet_config.get("out_channels", 4)
    conditions = [condition() for _ in range(prompts)]
    return TrainingData(conditions, condition(), real_latents=torch.randn(real, channels, latent, latent, generator=gen))
