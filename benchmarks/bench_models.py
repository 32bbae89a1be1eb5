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


def model_config(name: str, dtype: torch.dtype):
    """(arch, ComfyUI model config) of the named size with ``dtype`` weights."""
    import comfy.supported_models

    arch, unet_config = MODELS[name]
    cls = comfy.supported_models.SDXL if arch == "sdxl" else comfy.supported_models.SD15
    config = cls(dict(unet_config))
    config.set_inference_dtype(dtype, None)
    return arch, config


def random_model(name: str, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """(arch, ComfyUI ``BaseModel``) of the named size, weights N(0, 0.02) filled on ``device``."""
    device = torch.device(device)
    arch, config = model_config(name, dtype)
    base = config.get_model({})
    base.diffusion_model.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
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

    gen = torch.Generator().manual_seed(seed)
    adm = unet_config.get("adm_in_channels")

    def condition():
        return Conditioning(torch.randn(1, 77, unet_config["context_dim"], generator=gen),
                            torch.randn(1, adm, generator=gen) if adm else None)

    latent = resolution // 8
    conditions = [condition() for _ in range(prompts)]
    return TrainingData(conditions, condition(), real_latents=torch.randn(real, 4, latent, latent, generator=gen))
