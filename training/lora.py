"""LoRA adapters on a ComfyUI UNet, switchable per forward, and their export as a kohya file.

One frozen copy of the base weights serves three networks (design.md): every targeted
Linear/Conv2d of the UNet is wrapped by a ``LoRALayer`` that holds the original layer plus
one low-rank adapter per name ("generator", "fake_score"). A shared ``AdapterSwitch`` says
which adapter (or none: the base model) the next forward uses.

Targets are given as diffusers module names (``to_q``, ``conv1``, ...) and mapped onto
ComfyUI's LDM modules with ``comfy.utils.unet_to_diffusers``; the export writes kohya keys
built from the diffusers module path (``lora_unet_down_blocks_1_attentions_0_..._to_q``),
the format that ComfyUI's stock loaders, diffusers and A1111/Forge all read. PEFT-style keys
would silently lose the attention layers in ComfyUI.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .state import copy_checked

# The DMD2 SDXL LoRA targets (diffusers module names), design.md.
DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
# The rest of an SD-style UNet's Linear/Conv2d layers: the input and output convolutions and
# the timestep and class/ADM (SDXL's pooled text and sizes) embeddings. ComfyUI's stock loader
# reads them as it does the rest; the digits' 1-step student needs them (docs/digits.md).
EMBEDDING_TARGETS = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2")
TARGET_SETS = {"dmd2": DEFAULT_TARGETS, "all": DEFAULT_TARGETS + EMBEDDING_TARGETS}
ADAPTERS = ("generator", "fake_score")


def resolve_targets(names: Iterable[str]) -> tuple[str, ...]:
    """Target names with the sets of ``TARGET_SETS`` ("dmd2", "all") expanded, in order,
    without repeats; empty: the DMD2 list."""
    out: dict[str, None] = {}
    for name in names or ("dmd2",):
        out.update(dict.fromkeys(TARGET_SETS.get(name, (name,))))
    return tuple(out)


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)`` unless it is there already (a no-op then; it also lets the memory
    estimate build the backend on fake tensors, which ``Module.to`` cannot swap in place)."""
    if any(t.device != device for t in (*module.parameters(), *module.buffers())):
        module.to(device)
    return module


class LoRAError(ValueError):
    """A LoRA file or target list does not fit the model."""


class AdapterSwitch:
    """Which adapter the wrapped layers add: a name, or None for the plain base model; and
    how: ``merged`` runs each layer once with ``W + scale * up @ down`` instead of adding the
    low-rank branch (the same function and gradients; fewer, larger kernels: 1.4x faster per
    DMD2 iteration on the digits model, where calls dominate; on SDXL-size layers the
    low-rank branch does less backward work and keeps no merged weight for backward)."""

    def __init__(self, merged: bool = False) -> None:
        self.active: str | None = None
        self.merged = merged

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous


class LoRAAdapter(nn.Module):
    """``scale * up(down(x))``: down has the base layer's shape at rank r (same kernel, stride
    and padding for convolutions), up is a 1x1 map back; up starts at zero so that a fresh
    adapter leaves the base model unchanged."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        return self.up(self.down(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The dense weight change ``scale * up @ down`` in the base layer's weight shape."""
        down = self.down.weight.flatten(1)
        up = self.up.weight.flatten(1)
        shape = (self.up.weight.shape[0],) + tuple(self.down.weight.shape[1:])
        return (up @ down).reshape(shape) * self.scale


class LoRALayer(nn.Module):
    """A frozen Linear/Conv2d plus named adapters; the switch picks which one is added."""

    def __init__(self, base: nn.Module, switch: AdapterSwitch):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.switch = switch

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.switch.active
        if name is not None and self.switch.merged:
            base = self.base
            weight = base.weight + self.adapters[name].delta_weight().to(base.weight.dtype)
            if isinstance(base, nn.Conv2d):
                return base._conv_forward(x, weight, base.bias)
            return F.linear(x, weight, base.bias)
        out = self.base(x, *args, **kwargs)
        if name is not None:
            out = out + self.adapters[name](x).to(out.dtype)
        return out


def _matches(d_path: str, target: str) -> bool:
    """A diffusers module path is ``target`` or ends with it (``to_q`` matches ``...attn1.to_q``)."""
    return d_path == target or d_path.endswith("." + target)


def lora_targets(unet: nn.Module, unet_config: Mapping, targets=DEFAULT_TARGETS) -> dict[str, str]:
    """{diffusers module path: ComfyUI (LDM) module path} of the layers to adapt, in a fixed order.

    A diffusers path is adapted when it ends with one of ``targets`` and the LDM module it
    maps to exists and is a Linear or Conv2d (ComfyUI lists e.g. ``conv_shortcut`` also for
    res blocks whose skip is the identity)."""
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(dict(unet_config))
    if not mapping:
        raise LoRAError("this UNet config has no diffusers mapping (not an SD1.5/SDXL-style UNet)")
    modules = dict(unet.named_modules())
    out: dict[str, str] = {}
    for diffusers_key, ldm_key in mapping.items():
        if not diffusers_key.endswith(".weight"):
            continue
        d_path, l_path = diffusers_key[: -len(".weight")], ldm_key[: -len(".weight")]
        if not any(_matches(d_path, t) for t in targets):
            continue
        layer = modules.get(l_path)
        if isinstance(layer, LoRALayer):
            layer = layer.base
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            out[d_path] = l_path
    if not out:
        raise LoRAError(f"no UNet layer matches the LoRA targets {list(targets)}")
    return dict(sorted(out.items()))


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class UNetLoRA:
    """The adapters injected into one UNet: ``switch``, ``layers`` {diffusers path: LoRALayer}."""

    def __init__(
        self,
        unet: nn.Module,
        unet_config: Mapping,
        rank: int = 64,
        alpha: float = 8.0,
        targets=DEFAULT_TARGETS,
        adapters=ADAPTERS,
        seed: int = 0,
        merged: bool = False,
        ranks: Mapping[str, int] | None = None,
    ):
        self.unet, self.rank, self.alpha, self.targets = unet, int(rank), float(alpha), resolve_targets(targets)
        self.adapter_names = tuple(adapters)
        # ``ranks``: an adapter's own rank where it differs from ``rank`` (e.g. a fake score
        # with more capacity than the exported generator); its alpha keeps the scale alpha/rank.
        if self.rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
        self.ranks = {name: int((ranks or {}).get(name, rank)) for name in self.adapter_names}
        for name, r in self.ranks.items():
            if r < 1:
                raise LoRAError(f"LoRA rank must be >= 1, got {r} for {name!r}")
        self.alphas = {name: self.alpha * r / self.rank for name, r in self.ranks.items()}
        self.switch = AdapterSwitch(merged)
        self.paths = lora_targets(unet, unet_config, self.targets)
        # a name outside the known lists must match a layer (a typo fails; a known name may not
        # exist in every model, e.g. attention layers in the digits UNet)
        known = set(TARGET_SETS["all"])  # the sets themselves are expanded by now
        for name in (t for t in self.targets if t not in known):
            if not any(_matches(p, name) for p in self.paths):
                raise LoRAError(f"LoRA target {name!r} matches no Linear/Conv2d layer of this UNet (diffusers module names, e.g. to_q, conv1)")
        self.layers: dict[str, LoRALayer] = {}
        with torch.random.fork_rng(devices=[]):  # same init for the same seed, caller's RNG untouched
            torch.manual_seed(seed)
            for d_path, l_path in self.paths.items():
                base = unet.get_submodule(l_path)
                if isinstance(base, LoRALayer):
                    raise LoRAError(f"{l_path} already carries adapters")
                layer = LoRALayer(base, self.switch)
                weight = base.weight
                for name in self.adapter_names:
                    layer.adapters[name] = to_device(LoRAAdapter(base, self.ranks[name], self.alphas[name]), weight.device)
                _set_module(unet, l_path, layer)
                self.layers[d_path] = layer

    def named_parameters(self, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
        """``(f"{diffusers path}.lora_down.weight", p)`` pairs of one adapter."""
        for d_path, layer in self.layers.items():
            a = layer.adapters[adapter]
            yield f"{d_path}.lora_down.weight", a.down.weight
            yield f"{d_path}.lora_up.weight", a.up.weight

    def parameters(self, adapter: str) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters(adapter)]

    def state_dict(self, adapter: str) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_parameters(adapter)}

    def load_state_dict(self, adapter: str, state: Mapping[str, torch.Tensor]) -> None:
        copy_checked(dict(self.named_parameters(adapter)), state, f"adapter {adapter!r} does not match", LoRAError)

    def merged_state_dict(self, adapter: str) -> dict[str, torch.Tensor]:
        """The UNet's weights with ``adapter`` merged into the wrapped layers, under the plain
        UNet's keys (what a LoRA loader at strength 1 computes)."""
        wrapped = {l_path: self.layers[d_path] for d_path, l_path in self.paths.items()}
        out = {}
        for key, value in self.unet.state_dict().items():
            owner = next((p for p in wrapped if key.startswith(p + ".")), None)
            if owner is None:
                out[key] = value.detach().clone()
            elif key.startswith(owner + ".base."):
                out[owner + "." + key[len(owner) + len(".base.") :]] = value.detach().clone()
        with torch.no_grad():
            for l_path, layer in wrapped.items():
                weight = layer.base.weight
                out[l_path + ".weight"] = weight + layer.adapters[adapter].delta_weight().to(weight.dtype)
        return out

    def remove(self) -> None:
        """Put the original layers back (the adapters are dropped)."""
        for d_path, layer in self.layers.items():
            _set_module(self.unet, self.paths[d_path], layer.base)
        self.layers = {}

    def kohya_state_dict(self, adapter: str, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The adapter under kohya keys from diffusers module paths."""
        out: dict[str, torch.Tensor] = {}
        for d_path, layer in self.layers.items():
            a = layer.adapters[adapter]
            prefix = "lora_unet_" + d_path.replace(".", "_")
            out[f"{prefix}.lora_down.weight"] = a.down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{prefix}.lora_up.weight"] = a.up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{prefix}.alpha"] = torch.tensor(a.alpha, dtype=dtype)
        return out

    def export(self, path: str | Path, adapter: str = "generator", metadata: Mapping[str, object] | None = None) -> Path:
        """Write the adapter as a kohya LoRA safetensors file (fp16), atomically."""
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.ranks[adapter]),
            "ss_network_alpha": str(self.alphas[adapter]),
            "dmd2_lora_targets": ",".join(self.targets),
        }
        for key, value in (metadata or {}).items():
            meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
        return save_safetensors_atomic(self.kohya_state_dict(adapter), path, meta)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors to a temp file in the same folder, then ``os.replace``: readers never see half a file."""
    from safetensors.torch import save_file

    from .data import created_file_mode

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata else None)
        os.chmod(tmp, created_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
