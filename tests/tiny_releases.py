"""Tiny stand-ins for the DMD2 release files, with the releases' key names, dtypes and
containers (diffusers UNet2DConditionModel keys in a torch zip pickle; kohya-style LoRA in
safetensors), on the tiny architectures of ``tiny_models``. Also the *real* SDXL / SD1.5
configurations, to build exact real key sets on the meta device (no memory, no download).

LoRA key format of ``dmd2_sdxl_4step_lora_fp16.safetensors`` (from DMD2's
main/sdxl/extract_lora_module.py): PEFT LoRA (rank 64, alpha 8) on the UNet modules named
below, saved as ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha`` (a scalar), all fp16.
"""

from __future__ import annotations

from pathlib import Path

import comfy.supported_models
import diffusers
import safetensors.torch
import tiny_models
import torch

# PEFT target_modules of the DMD2 SDXL LoRA (a module matches when its path ends with ".<t>").
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")

# diffusers configs of the real UNets (stabilityai SDXL base 1.0 / runwayml SD1.5).
REAL_DIFFUSERS_CONFIGS = {
    "sdxl": {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    "sd15": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768, "attention_head_dim": 8,
    },
}

# ComfyUI (LDM) UNet configs of the same real models.
_COMMON = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
           "in_channels": 4, "out_channels": 4, "model_channels": 320, "use_temporal_attention": False,
           "use_temporal_resblock": False}
REAL_UNET_CONFIGS = {
    "sdxl": {**_COMMON, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "transformer_depth_middle": 10, "context_dim": 2048, "use_linear_in_transformer": True,
             "adm_in_channels": 2816, "num_classes": "sequential"},
    "sd15": {**_COMMON, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "transformer_depth_middle": 1, "context_dim": 768, "use_linear_in_transformer": False,
             "adm_in_channels": None},
}
REAL_MODEL_CONFIG_CLASSES = {"sdxl": comfy.supported_models.SDXL, "sd15": comfy.supported_models.SD15}


def diffusers_unet(arch: str, seed: int = 0, real: bool = False) -> diffusers.UNet2DConditionModel:
    """A diffusers UNet of the tiny architecture (random weights), or of the real one on the
    meta device (names and shapes only)."""
    if real:
        with torch.device("meta"):
            return diffusers.UNet2DConditionModel(**REAL_DIFFUSERS_CONFIGS[arch])
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**tiny_models.diffusers_unet_config(arch))


def real_comfy_model(arch: str):
    """ComfyUI's model of the real architecture on the meta device (for key sets/shapes)."""
    model_config = REAL_MODEL_CONFIG_CLASSES[arch](dict(REAL_UNET_CONFIGS[arch]))
    return model_config.get_model({}, "", device=torch.device("meta"))


def unet_release_state_dict(arch: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """What a DMD2 UNet release holds: the generator's diffusers state dict in ``dtype``."""
    unet = diffusers_unet(arch, seed)
    return {k: v.detach().to(dtype).contiguous() for k, v in unet.state_dict().items()}


def lora_modules(unet: torch.nn.Module):
    """(path, module) of every module the DMD2 LoRA adapts."""
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(
                name == t or name.endswith("." + t) for t in LORA_TARGETS):
            yield name, module


def lora_state_dict(unet: torch.nn.Module, rank: int = 4, alpha: float = 8.0, dtype=torch.float16, seed: int = 0,
                    meta: bool = False) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA in DMD2's layout for the given diffusers UNet. ``meta``: shapes only
    (alpha stays a real scalar, as ComfyUI reads its value)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in lora_modules(unet):
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Conv2d):
            down_shape = (rank, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, rank, 1, 1)
        else:
            down_shape = (rank, module.in_features)
            up_shape = (module.out_features, rank)
        if meta:
            down = torch.empty(down_shape, dtype=dtype, device="meta")
            up = torch.empty(up_shape, dtype=dtype, device="meta")
        else:
            down = (torch.randn(down_shape, generator=gen) * 0.1).to(dtype)
            up = (torch.randn(up_shape, generator=gen) * 0.1).to(dtype)
        out[key + ".lora_down.weight"] = down
        out[key + ".lora_up.weight"] = up
        out[key + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def write_unet_release(path: str | Path, arch: str, dtype=torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a tiny DMD2 UNet release (torch zip pickle of an OrderedDict of tensors, like the
    real .bin files; .safetensors when the name says so). Returns the tensors written."""
    from collections import OrderedDict

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = OrderedDict(unet_release_state_dict(arch, dtype, seed))
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(dict(sd), str(path))
    else:
        torch.save(sd, path)
    return dict(sd)


def write_lora_release(path: str | Path, arch: str = "sdxl", dtype=torch.float16, seed: int = 0,
                       rank: int = 4) -> dict[str, torch.Tensor]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = lora_state_dict(diffusers_unet(arch, seed), rank=rank, dtype=dtype, seed=seed)
    safetensors.torch.save_file(sd, str(path))
    return sd


def write_release(release, folder: str | Path, seed: int = 0) -> Path:
    """A tiny file with the name, container, key format and dtype of a registry entry."""
    dtype = torch.float16 if release.dtype == "fp16" else torch.float32
    path = Path(folder) / release.file_name
    if release.kind == "t2i_adapter":
        import tiny_adapters

        tiny_adapters.save_adapter(release.arch, path, seed=seed, dtype=dtype)
    elif release.kind == "lora":
        write_lora_release(path, release.arch, dtype, seed)
    elif release.kind == "checkpoint":  # a tiny single-file checkpoint (UNet, text encoder, VAE)
        tiny_models.save_checkpoint(release.arch, path, seed=seed)
    else:
        write_unet_release(path, release.arch, dtype, seed)
    return path


class _Payload:
    """Unpickling this would create the marker file: proof that a loader ran pickle code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling = open(marker, "w") = the marker exists


def write_pickle_bomb(path: str | Path, marker: str | Path) -> Path:
    """A .bin laid out like a torch checkpoint whose unpickling would touch ``marker``."""
    path = Path(path)
    torch.save({"conv_in.weight": torch.zeros(2, 2), "payload": _Payload(str(marker))}, path)
    return path


def write_truncated(source: str | Path, dest: str | Path, fraction: float = 0.5) -> Path:
    data = Path(source).read_bytes()
    Path(dest).write_bytes(data[: int(len(data) * fraction)])
    return Path(dest)

