"""The DMD2 trainer's model backend for community SD1.5/SDXL checkpoints, through ComfyUI.

A single-file checkpoint is loaded with ComfyUI's own ``comfy`` package (so whatever ComfyUI
loads, the trainer loads). Its text encoders turn the prompts into embeddings once (SDXL:
plus the pooled vector and size conditioning, built by ComfyUI's ``encode_adm``); its VAE
turns real images into latents once and decodes sample previews. Both are then released.

One frozen copy of the UNet serves all three networks (design.md):
real score = base, generator = base + LoRA G, fake score = base + LoRA F, with a small GAN
head on the fake score's mid-block features. The UNet is called directly as the
eps-prediction network it is (``diffusion_model(x_t, t, context, y)`` on variance-preserving
``x_t`` and integer DDPM timesteps, which is what ComfyUI's ``apply_model`` computes after
its ``c_in`` scaling).
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..comfy_env import ensure_comfy
from . import losses
from .data import DataError, load_image
from .lora import DEFAULT_TARGETS, UNetLoRA
from .trainer import Batch


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


@dataclass
class Conditioning:
    """Text conditioning of a batch: cross-attention ``context`` (B, L, D) and, for SDXL, the
    ``y`` vector (pooled text + size embeddings)."""

    context: torch.Tensor
    y: torch.Tensor | None = None

    def to(self, device) -> Conditioning:
        return Conditioning(self.context.to(device), None if self.y is None else self.y.to(device))


def _repeat_to(context: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a context of 77·k tokens to ``length`` tokens (ComfyUI batches prompts of
    different lengths the same way, up to their least common multiple)."""
    return context.repeat(1, length // context.shape[1], 1)


def stack_conditionings(items: Sequence[Conditioning]) -> Conditioning:
    import math

    length = math.lcm(*(c.context.shape[1] for c in items))
    context = torch.cat([_repeat_to(c.context, length) for c in items])
    y = None if items[0].y is None else torch.cat([c.y for c in items])
    return Conditioning(context, y)


@torch.no_grad()
def encode_prompts(loaded: LoadedCheckpoint, prompts: Sequence[str], resolution: int) -> list[Conditioning]:
    """Each prompt through the checkpoint's text encoders (one (1, L, D) context each)."""
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


class GANHead(nn.Module):
    """A small real/fake classifier on the fake score's mid-block features: conv, norm,
    SiLU, global average, linear -> one logit per sample."""

    def __init__(self, channels: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 1
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
        )
        self.out = nn.Linear(channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.body(features.to(self.out.weight.dtype) if not torch.is_autocast_enabled(features.device.type) else features)
        return self.out(h.mean(dim=(2, 3))).squeeze(1).float()


class _StopAfterMidBlock(Exception):
    """Raised by the mid-block hook when only the features are wanted (saves the decoder half)."""


def _checkpointed_forward(self, *args, **kwargs):
    """A res block / transformer forward that is recomputed in backward (see below)."""
    from torch.utils.checkpoint import checkpoint

    plain = type(self).forward
    if not torch.is_grad_enabled():
        return plain(self, *args, **kwargs)
    switch = self._dmd2_adapter_switch
    active = switch.active
    # The trainer freezes one parameter group around some forwards (the generator's GAN loss
    # runs through the frozen fake score); the recomputation must see the same flags.
    flags = [(p, p.requires_grad) for p in self.parameters()]

    def run(*a, **kw):
        now = [p.requires_grad for p, _ in flags]
        for p, flag in flags:
            p.requires_grad_(flag)
        try:
            with switch.use(active):
                return plain(self, *a, **kw)
        finally:
            for (p, _), flag in zip(flags, now):
                p.requires_grad_(flag)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(unet: nn.Module, switch) -> int:
    """Recompute each res block / transformer in backward instead of storing activations.

    The adapter that was active in the forward is re-selected during the recomputation
    (backward runs after the ``switch.use`` block has exited). Returns the number of blocks.
    (The patched forward is bound per module and refers to nothing outside it, so a deep
    copy of the UNet stays correct.)"""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    count = 0
    for module in unet.modules():
        if isinstance(module, (ResBlock, SpatialTransformer)):
            module._dmd2_adapter_switch = switch
            module.forward = types.MethodType(_checkpointed_forward, module)
            count += 1
    return count


class ComfyDMD2Backend:
    """``trainer.DMD2Backend`` for a ComfyUI SD1.5/SDXL model: one frozen UNet + LoRA G/F + head.

    ``prompts``: list of Conditioning (one per prompt), ``uncond``: the empty prompt's;
    ``real_latents``: (N, 4, h, w) model latents or None (no GAN then)."""

    def __init__(
        self,
        loaded: LoadedCheckpoint,
        prompts: Sequence[Conditioning],
        uncond: Conditioning,
        resolution: int,
        batch_size: int = 1,
        real_latents: torch.Tensor | None = None,
        lora_rank: int = 64,
        lora_alpha: float = 8.0,
        lora_targets: Iterable[str] = DEFAULT_TARGETS,
        device: str | torch.device | None = None,
        mixed_precision: str | None = None,
        gradient_checkpointing: bool | None = None,
        seed: int = 0,
        rank: int = 0,
    ):
        if not prompts:
            raise DataError("no prompt embeddings")
        self.loaded = loaded
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_gpu = self.device.type == "cuda"
        if mixed_precision is None:
            mixed_precision = "bf16" if on_gpu else "no"
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
        self.autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
        self.resolution, self.batch_size = resolution, int(batch_size)
        self.latent_shape = (4, resolution // 8, resolution // 8)

        base = loaded.model.model
        sigmas = base.model_sampling.sigmas.double()
        self.alphas_cumprod = (1.0 / (1.0 + sigmas**2)).to(self.device)
        self.unet = base.diffusion_model.to(self.device).requires_grad_(False).eval()
        self.adapters = UNetLoRA(self.unet, base.model_config.unet_config, rank=lora_rank, alpha=lora_alpha, targets=tuple(lora_targets), seed=seed)
        self.adapters.unet.to(self.device)
        self.switch = self.adapters.switch
        if gradient_checkpointing is None:
            gradient_checkpointing = on_gpu
        self.gradient_checkpointing = bool(gradient_checkpointing) and enable_gradient_checkpointing(self.unet, self.switch) > 0

        self.prompts = list(prompts)
        self.uncond = uncond
        self.real_latents = None if real_latents is None else real_latents.float().cpu()
        self.head = None
        self._features: torch.Tensor | None = None
        self._stop_after_mid = False
        if self.real_latents is not None:
            mid = self.unet.middle_block[-1]
            with torch.random.fork_rng(devices=[]):  # same head for the same seed
                torch.manual_seed(seed + 1)
                self.head = GANHead(mid.out_channels).to(self.device)
            mid.register_forward_hook(self._capture_mid)
        self.has_gan_head = self.head is not None
        self.rng = torch.Generator().manual_seed(seed * 1000 + 17 + rank)

    # --- data ---
    def sample_batch(self) -> Batch:
        idx = torch.randint(0, len(self.prompts), (self.batch_size,), generator=self.rng).tolist()
        cond = stack_conditionings([self.prompts[i] for i in idx]).to(self.device)
        uncond = stack_conditionings([self.uncond] * self.batch_size).to(self.device)
        real = None
        if self.real_latents is not None:
            ridx = torch.randint(0, len(self.real_latents), (self.batch_size,), generator=self.rng)
            real = self.real_latents[ridx].to(self.device)
        return Batch(cond=cond, uncond=uncond, shape=(self.batch_size, *self.latent_shape), real_x0=real)

    def state_dict(self) -> dict[str, Any]:
        """What the backend adds to a resumable checkpoint: its data RNG."""
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])

    # --- forwards ---
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, adapter: str | None) -> torch.Tensor:
        """The UNet's eps prediction with ``adapter`` ('generator', 'fake_score' or None = base)."""
        with self.switch.use(adapter), self._autocast():
            out = self.unet(x_t, t.float(), context=cond.context, y=cond.y)
        return out.float()

    def _x0(self, x_t, t, cond, adapter):
        return losses.x0_from_eps(x_t, self.eps(x_t, t, cond, adapter), t, self.alphas_cumprod)

    def generator_x0(self, x_t, t, cond):
        return self._x0(x_t, t, cond, "generator")

    def fake_x0(self, x_t, t, cond):
        return self._x0(x_t, t, cond, "fake_score")

    def real_x0(self, x_t, t, cond, uncond, guidance_scale):
        if guidance_scale == 1.0:
            return self._x0(x_t, t, cond, None)
        both = stack_conditionings([cond, uncond])
        eps = self.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), both, None)
        eps_cond, eps_uncond = eps.chunk(2)
        return losses.x0_from_eps(x_t, losses.classifier_free_guidance(eps_cond, eps_uncond, guidance_scale), t, self.alphas_cumprod)

    def _capture_mid(self, module, inputs, output):
        if self._stop_after_mid:  # only for fake_logits: other forwards keep no reference
            self._features = output
            raise _StopAfterMidBlock

    def fake_logits(self, x_t, t, cond):
        if self.head is None:
            raise RuntimeError("no GAN head: the backend was built without real images")
        self._stop_after_mid, self._features = True, None
        try:
            self.eps(x_t, t, cond, "fake_score")
        except _StopAfterMidBlock:
            pass
        finally:
            self._stop_after_mid = False
        features, self._features = self._features, None
        with self._autocast():
            return self.head(features)

    # --- parameters ---
    def generator_parameters(self):
        return [(f"generator.{k}", p) for k, p in self.adapters.named_parameters("generator")]

    def fake_score_parameters(self):
        named = [(f"fake_score.{k}", p) for k, p in self.adapters.named_parameters("fake_score")]
        if self.head is not None:
            named += [(f"gan_head.{k}", p) for k, p in self.head.named_parameters()]
        return named

    # --- previews ---
    @torch.no_grad()
    def sample(self, conds: Sequence[Conditioning], seeds: Sequence[int], timesteps: Sequence[int]) -> torch.Tensor:
        """The generator's few-step samples (DMD2's sampler: predict x0, re-noise with fresh
        noise to the next timestep) from unit noise, one seed per condition: latents."""
        out = []
        for cond, seed in zip(conds, seeds):
            gen = torch.Generator().manual_seed(int(seed))
            x = torch.randn((1, *self.latent_shape), generator=gen).to(self.device)
            cond = cond.to(self.device)
            for i, step in enumerate(timesteps):
                t = torch.full((1,), int(step), dtype=torch.long, device=self.device)
                x0 = self.generator_x0(x, t, cond)
                if i + 1 < len(timesteps):
                    noise = torch.randn((1, *self.latent_shape), generator=gen).to(self.device)
                    x = losses.add_noise(x0, noise, torch.full_like(t, int(timesteps[i + 1])), self.alphas_cumprod)
            out.append(x0.cpu())
        return torch.cat(out)
