"""LoRA adapters on a ComfyUI denoiser (SD UNet, Flux), switchable per forward, and their
export as a kohya file.

One frozen copy of the base weights serves three networks (design.md): every targeted
Linear/Conv2d of the UNet is wrapped by a ``LoRALayer`` that holds the original layer plus
one low-rank adapter per name ("generator", "fake_score"). A shared ``AdapterSwitch`` says
which adapter (or none: the base model) the next forward uses.

Which layers exist and what they are called in the file is the family's ``bases.Network``:
for the SD UNet, targets are diffusers module names (``to_q``, ``conv1``, ...) mapped onto
ComfyUI's LDM modules with ``comfy.utils.unet_to_diffusers``, and the export writes kohya keys
built from the diffusers module path (``lora_unet_down_blocks_1_attentions_0_..._to_q``),
the format that ComfyUI's stock loaders, diffusers and A1111/Forge all read (PEFT-style keys
would silently lose the attention layers in ComfyUI); for Flux, targets and kohya keys come
from ComfyUI's own module paths (``lora_unet_double_blocks_0_img_attn_qkv``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..bases.core import Network
from ..bases.sd import UNET, UNET_TARGET_SETS
from .state import copy_checked

# The SD-style UNet's target sets (diffusers module names), from its family (bases.sd):
# "dmd2" the DMD2 SDXL LoRA's layers (design.md); "all" adds the input and output
# convolutions and the timestep and class/ADM embeddings (EMBEDDING_TARGETS), which ComfyUI's
# stock loader reads as it does the rest; the digits' 1-step student needs them (docs/digits.md).
TARGET_SETS = {**UNET_TARGET_SETS}
DEFAULT_TARGETS = TARGET_SETS["dmd2"]
ADAPTERS = ("generator", "fake_score")


def resolve_targets(names: Iterable[str], network: Network = UNET) -> tuple[str, ...]:
    """Target names with the network's sets ("dmd2", "all"; the SD UNet's by default)
    expanded, in order, without repeats; empty: its "dmd2" list."""
    return network.resolve_targets(names)


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
            weight, bias = base.weight, base.bias
            if getattr(base, "comfy_cast_weights", False):
                # ComfyUI's manual-cast layer (an fp8 or bf16 base computed in another dtype):
                # the weight cast to the input's dtype as its own forward does; an fp8 weight
                # cannot take the delta in place of it (fp8 has no arithmetic).
                from comfy.ops import cast_bias_weight

                weight, bias = cast_bias_weight(base, x)
            weight = weight + self.adapters[name].delta_weight().to(weight.dtype)
            if isinstance(base, nn.Conv2d):
                return base._conv_forward(x, weight, bias)
            return F.linear(x, weight, bias)
        out = self.base(x, *args, **kwargs)
        if name is not None:
            out = out + self.adapters[name](x).to(out.dtype)
        return out


def _matches(d_path: str, target: str) -> bool:
    """A diffusers module path is ``target`` or ends with it (``to_q`` matches ``...attn1.to_q``)."""
    return d_path == target or d_path.endswith("." + target)


def lora_targets(unet: nn.Module, unet_config: Mapping, targets=DEFAULT_TARGETS, network: Network = UNET) -> dict[str, str]:
    """{export path: ComfyUI module path} of the layers to adapt, in a fixed order (the export
    path: the diffusers module path for the SD UNet, the module path itself for Flux).

    A path is adapted when it ends with one of ``targets`` and the module it maps to exists
    and is a Linear or Conv2d (ComfyUI lists e.g. ``conv_shortcut`` also for res blocks whose
    skip is the identity)."""
    try:
        mapping = network.weight_paths(unet, unet_config)
    except ValueError as exc:
        raise LoRAError(str(exc)) from None
    modules = dict(unet.named_modules())
    out: dict[str, str] = {}
    for d_path, l_path in mapping.items():
        if not any(_matches(d_path, t) for t in targets):
            continue
        layer = modules.get(l_path)
        if isinstance(layer, LoRALayer):
            layer = layer.base
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            out[d_path] = l_path
    if not out:
        raise LoRAError(f"no layer of this model matches the LoRA targets {list(targets)}")
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
        network: Network = UNET,
    ):
        self.network = network
        self.unet, self.rank, self.alpha, self.targets = unet, int(rank), float(alpha), resolve_targets(targets, network)
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
        self.paths = lora_targets(unet, unet_config, self.targets, network)
        # a name outside the known lists must match a layer (a typo fails; a known name may not
        # exist in every model, e.g. attention layers in the digits UNet)
        known = {name for names in network.target_sets.values() for name in names}  # the sets are expanded by now
        example = ", ".join(network.target_sets["dmd2"][:2])
        for name in (t for t in self.targets if t not in known):
            if not any(_matches(p, name) for p in self.paths):
                raise LoRAError(f"LoRA target {name!r} matches no Linear/Conv2d layer of this model (module names, e.g. {example})")
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


# --- starting from an existing few-step LoRA (``--init-lora``) ----------------------------

# Keys of a LoRA that is not a plain low-rank update: LoHa, LoKr, LoCon's mid factor, DoRA,
# full weight differences. The generator adapter is a plain LoRA: such a file cannot seed it.
_NOT_PLAIN = ("hada_w1", "hada_w2", "lokr_w1", "lokr_w2", "lora_mid", "dora_scale", ".diff", ".diff_b", ".w_norm", ".b_norm")
# The down (A) factor's key endings in the layouts ComfyUI reads: kohya, diffusers (two), PEFT.
_DOWN_ENDINGS = (".lora_down.weight", "_lora.down.weight", ".lora.down.weight", ".lora_A.weight")
# What a file is, for the refusal (``checkpoint.classify_keys`` kinds).
_KIND_TEXT = {"checkpoint": "a full checkpoint", "unet": "a UNet-only model file", "vae": "a VAE",
              "text_encoder": "a text encoder", "unknown": "not a LoRA file ComfyUI recognises"}
_CONTEXT_FAMILIES = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}


@dataclass
class InitLoRA:
    """A few-step LoRA that the generator starts from instead of zero (SwiftBrush v2: a student
    initialised from a few-step model, then trained with LoRA, beats one trained from the base).
    ``tensors`` as in the file; ``rank`` and ``alpha`` are the file's (one of each: the generator
    adapter has one); ``sha256`` identifies it to a resume."""

    path: Path
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    def context_dim(self) -> int | None:
        """The text width its cross-attention key projection takes (768 SD1.5, 2048 SDXL)."""
        for key, value in self.tensors.items():
            flat = key.replace(".", "_")
            if ("attn2_to_k" in flat or "attn2_processor_to_k" in flat) and key.endswith(_DOWN_ENDINGS):
                return int(value.shape[1])
        return None

    def is_flux(self) -> bool:
        """Whether it adapts a Flux.1 transformer (kohya's lora_unet_double_blocks_0_..., ComfyUI's or
        diffusers' paths: double/single blocks, transformer_blocks beside single_transformer_blocks)."""
        flat = [k.replace(".", "_") for k in self.tensors]
        return any("double_blocks_" in k or "single_blocks_" in k or "single_transformer_blocks_" in k for k in flat)

    def settings(self, fake_score_too: bool) -> dict:
        """What a resume must match (``checkpoints/step_N/settings.json``)."""
        return {"init_lora": {"file": self.name, "sha256": self.sha256, "fake_score_too": bool(fake_score_too)}}


def targets_label(targets: Iterable[str], network: Network = UNET) -> str:
    """A target list as the user names it: dmd2, all, or the names themselves."""
    resolved = resolve_targets(targets, network)
    return next((name for name, names in network.target_sets.items() if names == resolved), ",".join(resolved))


def no_init_settings() -> dict:
    return {"init_lora": None}


def read_init_lora(path: str | Path) -> InitLoRA:
    """Read and check ``--init-lora`` before any model weight is loaded: a readable file (never
    an unpickled object: the same refusals as ``--checkpoint``), a LoRA and not a checkpoint /
    VAE / text encoder, a plain one (no LoHa, LoKr, DoRA) with one rank and one alpha."""
    from .checkpoint import _read_state_dict, classify_keys
    from .data import file_sha256

    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"init LoRA not found: {path}")
    tensors, _ = _read_state_dict(path, what="init LoRA")
    kind, _ = classify_keys(tensors)
    if kind != "lora":
        raise LoRAError(f"{path} is {_KIND_TEXT.get(kind, kind)}, not a LoRA: --init-lora takes a few-step LoRA "
                        "file (kohya, diffusers or PEFT keys), e.g. the DMD2 4-step LoRA")
    odd = next((k for k in tensors if any(m in k for m in _NOT_PLAIN)), None)
    if odd is not None:
        raise LoRAError(f"{path.name} is not a plain LoRA ({odd}: LoHa, LoKr, LoCon or DoRA): the generator "
                        "starts from a plain low-rank update only")
    ranks = sorted({int(v.shape[0]) for k, v in tensors.items() if k.endswith(_DOWN_ENDINGS)})
    if not ranks:
        raise LoRAError(f"{path.name} holds no LoRA down/up pairs")
    if len(ranks) > 1:
        raise LoRAError(f"{path.name} has layers of ranks {ranks}: the generator adapter has one rank")
    alpha_keys = [k for k in tensors if k.endswith(".alpha")]
    alphas = sorted({round(float(tensors[k]), 6) for k in alpha_keys})
    downs = sum(k.endswith(_DOWN_ENDINGS) for k in tensors)
    if len(alphas) > 1 or 0 < len(alpha_keys) < downs:
        raise LoRAError(f"{path.name} has layers with alphas {alphas or 'none'} and without: the generator adapter has one alpha")
    alpha = alphas[0] if alphas else float(ranks[0])  # no alpha: ComfyUI applies the update at scale 1
    return InitLoRA(path, tensors, ranks[0], alpha, file_sha256(path))


def check_init_arch(init: InitLoRA, model_context_dim: int | None, model_name: str, flux_model: bool = False) -> None:
    """Refuse a LoRA made for another architecture, naming both (before the model loads:
    ``model_context_dim`` is read from the checkpoint's header; ``flux_model``: the model is a
    Flux.1 transformer, whose LoRAs adapt its double and single blocks)."""
    dim = init.context_dim()
    flux_lora = init.is_flux()
    if flux_lora != flux_model:
        made_for = "Flux.1 (double/single blocks)" if flux_lora else (
            f"{_CONTEXT_FAMILIES.get(dim, 'an SD UNet')} (cross-attention dim {dim})" if dim else "an SD UNet")
        raise LoRAError(f"init LoRA {init.name} was made for {made_for}, but {model_name} is "
                        f"{'a Flux.1 model' if flux_model else 'an SD UNet'}")
    if dim is None or model_context_dim is None or dim == model_context_dim:
        return

    def family(d: int) -> str:
        return f"{_CONTEXT_FAMILIES[d]} (cross-attention dim {d})" if d in _CONTEXT_FAMILIES else f"cross-attention dim {d}"

    raise LoRAError(f"init LoRA {init.name} was made for {family(dim)}, but {model_name} is {family(model_context_dim)}")


def init_deltas(base_model, init: InitLoRA, paths: Mapping[str, str], targets_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{diffusers path: (down, up)} of ``init`` for the adapted layers ``paths`` (diffusers path
    -> ComfyUI path), read by ComfyUI's own LoRA parser on the base model's key map (so every
    layout ComfyUI loads works, and a key it would skip is refused). A layer the file adapts
    outside ``paths`` is refused by name; layers it leaves out start at zero, as usual."""
    import types

    import comfy.weight_adapter

    from ..nodes.loaders import DMD2LoadError, lora_patches

    try:
        patches = lora_patches(types.SimpleNamespace(model=base_model), init.tensors, name=f"init LoRA {init.name}")
    except DMD2LoadError as exc:
        raise LoRAError(str(exc)) from None
    by_ldm = {f"diffusion_model.{ldm}.weight": d_path for d_path, ldm in paths.items()}
    outside = sorted(k for k in patches if k not in by_ldm)
    if outside:
        names = _diffusers_names(base_model, outside)
        hint = " (run with lora_targets all)" if targets_name != "all" and all(any(_matches(n, t) for t in TARGET_SETS["all"]) for n in names) else ""
        raise LoRAError(f"init LoRA {init.name} adapts {len(outside)} layers that lora_targets {targets_name} leaves out, "
                        f"e.g. {', '.join(names[:3])}{hint}")
    out = {}
    for key, patch in patches.items():
        if not isinstance(patch, comfy.weight_adapter.LoRAAdapter) or any(v is not None for v in patch.weights[3:5]):
            raise LoRAError(f"init LoRA {init.name}: {key} is not a plain low-rank update")
        up, down = patch.weights[0], patch.weights[1]
        out[by_ldm[key]] = (down.float(), up.float())
    return out


def _diffusers_names(base_model, ldm_keys: Iterable[str]) -> list[str]:
    """Diffusers module names of ComfyUI weight keys, for messages (the ComfyUI path where none)."""
    import comfy.utils

    try:
        to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(dict(base_model.model_config.unet_config)).items()}
    except (KeyError, TypeError):  # not an SD UNet (Flux): its own module paths are the names
        to_diffusers = {}
    names = []
    for key in ldm_keys:
        ldm = key.removeprefix("diffusion_model.")
        names.append(to_diffusers.get(ldm, ldm).removesuffix(".weight"))
    return names


def load_init_adapter(adapters: UNetLoRA, name: str, deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the init LoRA's factors into adapter ``name`` (same rank and alpha as the file)."""
    with torch.no_grad():
        for d_path, (down, up) in deltas.items():
            adapter = adapters.layers[d_path].adapters[name]
            for param, value in ((adapter.down.weight, down), (adapter.up.weight, up)):
                if value.numel() != param.numel():
                    raise LoRAError(f"init LoRA: {d_path} has a factor of shape {tuple(value.shape)}, the adapter {tuple(param.shape)}")
                param.copy_(value.reshape(param.shape))


def merge_init_into(unet: nn.Module, paths: Mapping[str, str], deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
    """Add the init LoRA's update ``scale * up @ down`` to a fully trained copy's weights."""
    with torch.no_grad():
        for d_path, (down, up) in deltas.items():
            weight = unet.get_submodule(paths[d_path]).weight
            delta = (up.flatten(1) @ down.flatten(1)) * scale
            weight.add_(delta.reshape(weight.shape).to(weight.dtype))
