"""Tiny SD1.5-, SD2.x- and SDXL-architecture models built from ComfyUI's own classes.

Same block structure as the real releases (levels, res blocks, attention placement,
linear/conv transformer projections, SDXL's text_time embedding), tiny widths: they run a
16x16 latent on a CPU in milliseconds. ``register()`` puts their model configs at the front
of ``comfy.supported_models.models`` so that single-file checkpoints of them load through
ComfyUI's stock loaders (CheckpointLoaderSimple, UNETLoader) in-process and in a server
(see ``tests/tiny_node``). Call ``comfyui_dmd2.comfy_env.ensure_comfy()`` before importing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import comfy.text_encoders.flux
import comfy.text_encoders.sd2_clip
import comfy.utils

TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 32,
}


class TinySD1ClipModel(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        model_options = {**model_options, "clip_l_model_config": dict(TINY_CLIP)}
        super().__init__(device=device, dtype=dtype, model_options=model_options, **kwargs)


# SD2's OpenCLIP-H at tiny width; its width (= the UNet's context dim) is its own, so that
# ComfyUI's detection tells the three tiny architectures apart by context_dim alone.
TINY_CLIP_H = {**TINY_CLIP, "hidden_size": 48}


class TinySD2ClipModel(comfy.text_encoders.sd2_clip.SD2ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        model_options = {**model_options, "clip_h_model_config": dict(TINY_CLIP_H)}
        super().__init__(device=device, dtype=dtype, model_options=model_options, **kwargs)


class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        model_options = {
            **model_options,
            "clip_l_model_config": dict(TINY_CLIP),
            "clip_g_model_config": dict(TINY_CLIP),
        }
        super().__init__(device=device, dtype=dtype, model_options=model_options)


class TinySD15(comfy.supported_models.SD15):
    """SD1.5 layout: 4 levels, 2 res blocks each, attention on the first 3, 8->2 heads."""

    unet_config = {
        "context_dim": 32,
        "model_channels": 32,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
    }
    unet_extra_config = {"num_heads": 2, "num_head_channels": -1}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinySD1ClipModel)


class TinySD2(comfy.supported_models.SD20):
    """SD2.x layout: SD1.5's levels and attention placement, linear projections, 16-channel
    heads (SD2 uses 64), the OpenCLIP-H text encoder (penultimate layer). Eps or v by
    ComfyUI's own test on the last output block's norm1 bias (see ``save_checkpoint``)."""

    unet_config = {
        "context_dim": TINY_CLIP_H["hidden_size"],
        "model_channels": 32,
        "use_linear_in_transformer": True,
        "adm_in_channels": None,
        "use_temporal_attention": False,
    }
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16, "attn_precision": torch.float32}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd2_clip.SD2Tokenizer, TinySD2ClipModel)


class TinySDXL(comfy.supported_models.SDXL):
    """SDXL layout: 3 levels, 2 res blocks each, no attention on the first, linear projections,
    text_time embedding (pooled text + 6 size embeddings of 256)."""

    unet_config = {
        "model_channels": 32,
        "use_linear_in_transformer": True,
        "transformer_depth": [0, 0, 1, 1, 2, 2],
        "context_dim": 64,
        "adm_in_channels": 32 + 6 * 256,
        "use_temporal_attention": False,
    }
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)


# Full UNet configs (what comfy.model_detection reads back from a state dict of these models).
UNET_CONFIGS = {
    "sd15": {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1,
        "context_dim": 32,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    },
    "sdxl": {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 1, 1, 2, 2],
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
        "transformer_depth_middle": 2,
        "context_dim": 64,
        "use_linear_in_transformer": True,
        "adm_in_channels": 32 + 6 * 256,
        "num_classes": "sequential",
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    },
}
# SD2.x: SD1.5's layout with linear projections and the OpenCLIP-H width.
UNET_CONFIGS["sd2"] = {**UNET_CONFIGS["sd15"], "context_dim": TINY_CLIP_H["hidden_size"], "use_linear_in_transformer": True}
MODEL_CONFIG_CLASSES = {"sd15": TinySD15, "sd2": TinySD2, "sdxl": TinySDXL}
# Latent side must be a multiple of 2**(levels-1).
LATENT_MULTIPLE = {"sd15": 8, "sd2": 8, "sdxl": 4}
# ComfyUI calls an SD2 checkpoint v-prediction when this bias has std > 0.09 (supported_models.SD20).
SD2_V_PROBE = "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def register() -> None:
    """Let ComfyUI's loaders recognise single-file checkpoints of the tiny models."""
    models = comfy.supported_models.models
    for cls in (TinySDXL, TinySD2, TinySD15):
        if cls not in models:
            models.insert(0, cls)


def init_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic init. ComfyUI's layers skip their own init (weights start empty)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()
    return module


def build_model(arch: str, seed: int = 0, v_pred: bool = False) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI MODEL (ModelPatcher) of the tiny architecture with random weights.
    ``v_pred`` (SD2 only): a v-prediction model whose weights ComfyUI also detects as v."""
    register()
    model_config = MODEL_CONFIG_CLASSES[arch](dict(UNET_CONFIGS[arch]))
    model_config.set_inference_dtype(torch.float32, None)
    if v_pred and arch != "sd2":
        raise ValueError("build_model(v_pred=True) is for SD2, whose v-prediction is in its weights")
    base = model_config.get_model({SD2_V_PROBE: torch.tensor([-1.0, 1.0])} if v_pred else {})
    init_weights_(base.diffusion_model, seed)
    if v_pred:
        with torch.no_grad():  # std ~0.2 > 0.09: ComfyUI's v test (supported_models.SD20.model_type)
            base.diffusion_model.get_parameter(SD2_V_PROBE).mul_(10.0)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=comfy.model_management.unet_offload_device())


def build_clip(arch: str, seed: int = 0) -> comfy.sd.CLIP:
    """The arch's tiny text encoders as a ComfyUI CLIP object ("flux_dev": CLIP-L and T5)."""
    if arch == "flux_dev":
        register_flux()
        target = TinyFluxDev(dict(FLUX_FILE_CONFIG)).clip_target()
    else:
        target = MODEL_CONFIG_CLASSES[arch](dict(UNET_CONFIGS[arch])).clip_target()
    clip = comfy.sd.CLIP(target, parameters=0)
    init_weights_(clip.cond_stage_model, seed + 1)
    return clip


def build_vae(seed: int = 0, latent_channels: int = 4) -> comfy.sd.VAE:
    """A TAESD-shaped VAE (Flux.1: 16 latent channels)."""
    taesd = init_weights_(comfy.taesd.taesd.TAESD(latent_channels=latent_channels), seed + 2)
    return comfy.sd.VAE(sd=taesd.state_dict())


def save_checkpoint(arch: str, path: str | Path, seed: int = 0, v_pred: bool = False, ztsnr: bool = False) -> Path:
    """Write a single-file tiny checkpoint (UNet + text encoders + TAESD-shaped VAE), the way
    ComfyUI's CheckpointSave does. ``v_pred``/``ztsnr`` add the empty marker tensors that
    v-prediction (zero-terminal-SNR) community checkpoints carry and ComfyUI reads (SDXL).
    SD2 has no markers: ``v_pred`` is in its weights (``build_model``); ComfyUI has no
    zero-terminal-SNR detection for SD2 (the ModelSamplingDiscrete node sets it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if arch == "sd2":
        if ztsnr:
            raise ValueError("ComfyUI reads no zero-terminal-SNR marker from SD2 checkpoints; use ModelSamplingDiscrete")
        model, v_pred = build_model(arch, seed, v_pred=v_pred), False
    else:
        model = build_model(arch, seed)
    comfy.sd.save_checkpoint(str(path), model, build_clip(arch, seed), build_vae(seed))
    if v_pred or ztsnr:
        import safetensors.torch

        tensors = safetensors.torch.load_file(str(path))
        tensors.update({key: torch.tensor([]) for key, on in (("v_pred", v_pred), ("ztsnr", ztsnr)) if on})
        safetensors.torch.save_file(tensors, str(path))
    return path


def unet_state_dict(model: comfy.model_patcher.ModelPatcher) -> dict[str, torch.Tensor]:
    """The UNet's weights with ComfyUI's (LDM) key names, no prefix."""
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def diffusers_unet_state_dict(arch: str, ldm_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under diffusers' UNet2DConditionModel key names."""
    config = dict(UNET_CONFIGS[arch])
    config.update(MODEL_CONFIG_CLASSES[arch].unet_extra_config)
    mapping = comfy.utils.unet_to_diffusers(config)  # diffusers key -> ldm key
    # ComfyUI maps label_emb to both diffusers names; SDXL files use add_embedding.
    return {d: ldm_sd[l] for d, l in mapping.items() if l in ldm_sd and not d.startswith("class_embedding.")}


def diffusers_unet_config(arch: str) -> dict:
    """Keyword arguments for diffusers.UNet2DConditionModel matching the tiny architecture."""
    if arch == "sd15":
        return dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            attention_head_dim=2,  # diffusers' SD1.5 quirk: this is the number of heads
            norm_num_groups=32,
            use_linear_projection=False,
        )
    if arch == "sd2":  # SD1.5's, linear projections; attention_head_dim holds the heads per level
        return {**diffusers_unet_config("sd15"), "cross_attention_dim": TINY_CLIP_H["hidden_size"],
                "attention_head_dim": (2, 4, 4, 4), "use_linear_projection": True}  # heads: channels / 16
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4, 8),  # heads: channels / 16
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=32 + 6 * 256,
    )


# -- Flux.1 ---------------------------------------------------------------------------------------
# ComfyUI's Flux at tiny width: one double and one single block, 2 heads of 32 (the rotary axes
# split 8+12+12 as the real 16+56+56), the real 16 latent channels, 2x2 patches, T5-XXL's 4096
# context width and CLIP-L's 768 pooled width, so conditionings have the real shapes.
FLUX_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
               "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
               "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
               "guidance_embed": True}


def build_flux(schnell: bool = False, seed: int = 0, file_widths: bool = False) -> comfy.model_patcher.ModelPatcher:
    """A tiny Flux.1 [dev] MODEL (model_base.Flux, ModelSamplingFlux, embedded guidance), or
    [schnell] (ModelSamplingDiscreteFlow at shift 1, no guidance input), random weights;
    ``file_widths``: at the widths of the tiny files (``FLUX_FILE_CONFIG``, registered configs)."""
    if file_widths:
        register_flux()
        config_class, config = (TinyFluxSchnell if schnell else TinyFluxDev), FLUX_FILE_CONFIG
    else:
        config_class = comfy.supported_models.FluxSchnell if schnell else comfy.supported_models.Flux
        config = FLUX_CONFIG
    model_config = config_class({**config, "guidance_embed": not schnell})
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    init_weights_(base.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=comfy.model_management.unet_offload_device())


# -- Flux.1 as files: a diffusion-model file (models/diffusion_models), its two text encoders
# (models/text_encoders: clip_l, t5xxl) and a TAESD-shaped 16-channel VAE, loadable by ComfyUI's
# stock UNETLoader / DualCLIPLoader (type flux) / VAELoader. ComfyUI's Flux detection fixes the
# heads (24 of 128 channels) and reads the widths from the weights, so the tiny file is told apart
# by its width (64) and registered like the tiny SD configs. Its text width is the tiny T5's (32)
# and its pooled width the tiny CLIP-L's (32): the real 4096 would need a 4096-wide T5 vocabulary
# table (131 M parameters) and a 24-block T5 for ComfyUI to call it T5-XXL; the DualCLIPLoader's
# flux type reads any two files, so the tiny T5 (2 blocks) loads there once ``register()`` has
# given ComfyUI's T5-XXL class the tiny config (``TINY_T5``).
TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}
FLUX_FILE_CONFIG = {**FLUX_CONFIG, "context_in_dim": TINY_T5["d_model"], "vec_in_dim": TINY_CLIP["hidden_size"]}


class TinyFluxDev(comfy.supported_models.Flux):
    unet_config = {"image_model": "flux", "guidance_embed": True, "hidden_size": FLUX_CONFIG["hidden_size"]}
    unet_extra_config = {"num_heads": FLUX_CONFIG["num_heads"], "axes_dim": FLUX_CONFIG["axes_dim"]}


class TinyFluxSchnell(comfy.supported_models.FluxSchnell):
    unet_config = {"image_model": "flux", "guidance_embed": False, "hidden_size": FLUX_CONFIG["hidden_size"]}
    unet_extra_config = {"num_heads": FLUX_CONFIG["num_heads"], "axes_dim": FLUX_CONFIG["axes_dim"]}


_REAL_FLUX_CLIP = comfy.text_encoders.flux.flux_clip


def _tiny_flux_clip(**kwargs):
    """ComfyUI's Flux text encoders (clip_l + T5-XXL) at the tiny widths, unless told otherwise."""
    real = _REAL_FLUX_CLIP(**kwargs)

    class TinyFluxClipModel(real):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            model_options = {**model_options,  # ComfyUI's loader sets clip_l's max_position_embeddings from the file
                             "clip_l_model_config": {**TINY_CLIP, **model_options.get("clip_l_model_config", {})},
                             "t5xxl_model_config": {**TINY_T5, **model_options.get("t5xxl_model_config", {})}}
            super().__init__(device=device, dtype=dtype, model_options=model_options)

    return TinyFluxClipModel


def register_flux() -> None:
    """Let ComfyUI's loaders read the tiny Flux files (and build its Flux text encoders tiny)."""
    models = comfy.supported_models.models
    for cls in (TinyFluxSchnell, TinyFluxDev):
        if cls not in models:
            models.insert(0, cls)
    comfy.text_encoders.flux.flux_clip = _tiny_flux_clip


def save_flux_files(folder: str | Path, seed: int = 0, schnell: bool = False) -> dict[str, Path]:
    """Write the tiny Flux as a user has it: ``diffusion_model`` (no prefix, as in
    models/diffusion_models), ``clip_l`` and ``t5xxl`` (models/text_encoders, the keys ComfyUI's
    CLIPSave writes) and ``vae`` (TAESD-shaped, 16 channels). Returns {role: path}."""
    import safetensors.torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = "tiny_flux_schnell" if schnell else "tiny_flux_dev"
    model = build_flux(schnell, seed, file_widths=True)
    clip = build_clip("flux_dev", seed)
    paths = {"diffusion_model": folder / f"{name}.safetensors", "clip_l": folder / "tiny_clip_l.safetensors",
             "t5xxl": folder / "tiny_t5xxl.safetensors", "vae": folder / "tiny_flux_ae.safetensors"}
    safetensors.torch.save_file({k: v.contiguous() for k, v in unet_state_dict(model).items()}, str(paths["diffusion_model"]))
    encoders = clip.cond_stage_model
    for role, module in (("clip_l", encoders.clip_l), ("t5xxl", encoders.t5xxl)):
        tensors = {k.removeprefix("transformer."): v.detach().contiguous() for k, v in module.state_dict().items()}
        safetensors.torch.save_file(tensors, str(paths[role]))
    vae = build_vae(seed, latent_channels=16)
    safetensors.torch.save_file({k: v.contiguous() for k, v in vae.first_stage_model.state_dict().items()}, str(paths["vae"]))
    return paths


# A tiny SD3.5-Medium-shaped MMDiT (ComfyUI's model_detection keys: depth 2 -> hidden 128, 2 heads;
# the second self-attention of SD3.5 Medium on block 0; RMS q/k norms; 8x8 latent positions).
SD3_CONFIG = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
              "adm_in_channels": 2048, "num_patches": 64, "pos_embed_max_size": 8, "pos_embed_scaling_factor": None,
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
              "qk_norm": "rms", "x_block_self_attn_layers": [0]}


def build_sd3(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A tiny SD3.5 MODEL (model_base.SD3, ModelSamplingDiscreteFlow at shift 3), random weights."""
    model_config = comfy.supported_models.SD3(dict(SD3_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    init_weights_(base.diffusion_model, seed)
    with torch.no_grad():  # a buffer ComfyUI leaves empty (the checkpoint fills it): small, seeded
        base.diffusion_model.pos_embed.copy_(0.02 * torch.randn(base.diffusion_model.pos_embed.shape,
                                                                generator=torch.Generator().manual_seed(seed)))
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
