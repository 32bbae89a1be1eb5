"""Tiny diffusers-format T2I-Adapters matching the tiny UNets of ``tiny_models``.

Built with diffusers' own ``T2IAdapter`` class and saved the way the hub's adapters are
shipped (one safetensors file of diffusers keys, ``adapter.body.0.resnets.0.block1.weight``
...), which is what ComfyUI's ControlNetLoader detects as a diffusers T2I-Adapter.

- ``sdxl``: ``full_adapter_xl``, channels (32, 64, 128, 128) — the tiny SDXL levels
  (32, 64, 128) plus the mid-block feature, as the real (320, 640, 1280, 1280).
- ``sd15``: ``full_adapter``, channels (32, 64, 64, 64) — the tiny SD1.5 levels. ComfyUI's
  stock loader assumes the real adapters' ratio (c, 2c, 4c, 4c) and cannot load this one; the
  pack's DMD2T2IAdapterLoader reads the widths from the weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import diffusers
import torch
from safetensors.torch import save_file

ADAPTER_CONFIGS = {
    "sdxl": {"in_channels": 3, "channels": [32, 64, 128, 128], "num_res_blocks": 2, "downscale_factor": 16,
             "adapter_type": "full_adapter_xl"},
    "sd15": {"in_channels": 3, "channels": [32, 64, 64, 64], "num_res_blocks": 2, "downscale_factor": 8,
             "adapter_type": "full_adapter"},
}
# Image sides must be a multiple of this (pixel unshuffle, then the adapter's own downsamples).
TOTAL_DOWNSCALE = {"sdxl": 32, "sd15": 64}


# The tiny UNets' hidden states have a std of about 13 and pass through many GroupNorms; with
# this input gain the adapter's features (std 40-70) move the 4-step predictions by 1e-3..1e-2,
# well above the parity tolerance, instead of a fraction of it.
INPUT_GAIN = 100.0


def build_adapter(arch: str, seed: int = 0) -> diffusers.T2IAdapter:
    """A diffusers T2IAdapter with deterministic random weights whose features are about as
    large as the tiny UNet's hidden states."""
    adapter = diffusers.T2IAdapter(**ADAPTER_CONFIGS[arch])
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            if name.startswith("adapter.conv_in."):
                p.mul_(INPUT_GAIN)
    return adapter.eval()


def adapter_state_dict(adapter: diffusers.T2IAdapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in adapter.state_dict().items()}


def save_adapter(arch: str, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny adapter as a single diffusers-key safetensors file (what users drop into
    models/controlnet after downloading diffusion_pytorch_model.safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) for k, v in adapter_state_dict(build_adapter(arch, seed)).items()}
    save_file(state, str(path))
    return path
