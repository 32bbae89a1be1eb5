"""Where a community checkpoint's model and conditions come from, through ComfyUI.

A single-file SD1.5/SDXL checkpoint is loaded with ComfyUI's own ``comfy`` package (so
whatever ComfyUI loads, the trainer loads). Its text encoders turn the prompts and the real
images' captions into ``Conditioning`` once (SDXL: plus the pooled vector and size
conditioning, built by ComfyUI's ``encode_adm``); its VAE turns real images into latents once
and decodes sample previews. Both are then released. The model itself goes to the one
shared-base backend (``backend.SharedBaseBackend``), exactly like the digits teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..comfy_env import ensure_comfy
from .backend import Conditioning
from .data import load_image


class CheckpointError(ValueError):
    """The checkpoint file is missing, unreadable or not a diffusion checkpoint."""


class UnsupportedModel(ValueError):
    """A checkpoint ComfyUI can load but this trainer does not handle (yet)."""


@dataclass
class LoadedCheckpoint:
    """What ComfyUI made of a checkpoint file: ``model`` (ModelPatcher), ``clip``, ``vae``."""

    path: Path
    arch: str  # "sd15" | "sdxl"
    model: Any
    clip: Any
    vae: Any


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors of a .safetensors file, or of a .ckpt/.pt file unpickled safely (weights only)."""
    try:
        if path.suffix.lower() in (".safetensors", ".sft"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118 (safe_open is no dict)
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a model file ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return data, None


def detect_arch(model) -> str:
    """'sd15' or 'sdxl' for an eps-prediction SD1.5/SDXL text-to-image UNet; else UnsupportedModel."""
    import comfy.model_base
    import comfy.supported_models

    base, config = model.model, model.model.model_config
    name = type(config).__name__
    if isinstance(base, comfy.model_base.SDXL) and isinstance(config, comfy.supported_models.SDXL):
        arch = "sdxl"
    elif type(base) is comfy.model_base.BaseModel and isinstance(config, comfy.supported_models.SD15):
        arch = "sd15"
    else:
        raise UnsupportedModel(f"model family {name} is not supported yet: the trainer handles SD1.5 and SDXL checkpoints")
    if base.model_type != comfy.model_base.ModelType.EPS:
        raise UnsupportedModel(f"{name} checkpoint uses {base.model_type.name} prediction; only eps-prediction models are supported yet (v-prediction is not)")
    if config.unet_config.get("in_channels", 4) != 4:
        raise UnsupportedModel(f"{name} checkpoint has {config.unet_config['in_channels']} input channels (inpainting/instruct models are not supported)")
    if getattr(base.model_sampling, "zsnr", False):
        raise UnsupportedModel("zero-terminal-SNR checkpoints are not supported yet")
    return arch


def load_checkpoint(path: str | Path, weight_dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    """Load a single-file checkpoint with ComfyUI's loader; refuse clearly what is unsupported."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    ensure_comfy()
    import comfy.sd

    state_dict, metadata = _read_state_dict(path)
    options = {"dtype": weight_dtype} if weight_dtype is not None else {}
    try:
        out = comfy.sd.load_state_dict_guess_config(state_dict, output_vae=True, output_clip=True, model_options=options, metadata=metadata)
    except Exception as exc:
        raise CheckpointError(f"ComfyUI could not load {path}: {type(exc).__name__}: {exc}") from exc
    if out is None or out[0] is None:
        raise UnsupportedModel(f"ComfyUI does not recognise a diffusion model in {path} (unsupported architecture)")
    model, clip, vae = out[0], out[1], out[2]
    arch = detect_arch(model)
    if clip is None or vae is None:
        raise CheckpointError(f"{path} holds no {'text encoder' if clip is None else 'VAE'}: a full single-file checkpoint is needed")
    return LoadedCheckpoint(path=path, arch=arch, model=model, clip=clip, vae=vae)


@torch.no_grad()
def encode_prompts(loaded: LoadedCheckpoint, prompts: Sequence[str], resolution: int) -> list[Conditioning]:
    """Each prompt through the checkpoint's text encoders (one (1, L, D) context each; the
    unconditional embedding is the empty prompt's, as in the reference for SD1.5)."""
    out = []
    for prompt in prompts:
        tokens = loaded.clip.tokenize(prompt)
        context, pooled = loaded.clip.encode_from_tokens(tokens, return_pooled=True)
        y = None
        if loaded.arch == "sdxl":
            y = loaded.model.model.encode_adm(
                pooled_output=pooled, width=resolution, height=resolution, crop_w=0, crop_h=0,
                target_width=resolution, target_height=resolution,
            )
        out.append(Conditioning(context.detach().float().cpu(), None if y is None else y.detach().float().cpu()))
    return out


@torch.no_grad()
def encode_images(loaded: LoadedCheckpoint, paths: Sequence[Path], resolution: int, batch_size: int = 4) -> torch.Tensor:
    """Real images -> the model's latent space (VAE encode, then ``process_latent_in``)."""
    latents = []
    for i in range(0, len(paths), batch_size):
        pixels = torch.stack([load_image(p, resolution) for p in paths[i : i + batch_size]])
        raw = loaded.vae.encode(pixels)
        latents.append(loaded.model.model.process_latent_in(raw.float().cpu()))
    return torch.cat(latents)


@torch.no_grad()
def decode_latents(loaded: LoadedCheckpoint, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> images (B, H, W, 3) in [0, 1] with the checkpoint's VAE."""
    raw = loaded.model.model.process_latent_out(latents.detach().float().cpu())
    return loaded.vae.decode(raw).float().clamp(0, 1).cpu()
