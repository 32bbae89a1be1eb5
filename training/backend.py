"""The one DMD2 backend: a frozen ComfyUI denoiser shared by the three networks.

Real score = the base model; generator = base + LoRA G; fake score = base + LoRA F, with a
small GAN head on the fake score's middle features (design.md). It works on any ComfyUI
``BaseModel`` of a ``bases.Family``: an SD-style ``UNetModel`` (eps or v prediction, with or
without zero terminal SNR) or a Flux transformer (rectified flow). A community checkpoint
(``checkpoint.py``: text conditioning, VAE latents) and the digits teachers (``digits``: class
labels, pixels) differ only in where the model and the conditions come from
(``TrainingData``). The denoiser is called directly by the family's ``Network`` (the UNet on
variance-preserving ``x_t`` and integer DDPM timesteps, Flux on flow time: what ComfyUI's
``apply_model`` computes after its ``c_in`` scaling); its raw output (eps, v or flow) becomes
x0 through ``family.to_x0``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import bases
from ..bases.sd import UNET, mid_block_size  # noqa: F401  (mid_block_size: the GAN head's map, re-exported)
from . import losses, sampling
from .lora import (
    AdapterSwitch,
    InitLoRA,
    LoRAError,
    UNetLoRA,
    init_deltas,
    load_init_adapter,
    merge_init_into,
    read_init_lora,
    resolve_targets,
    targets_label,
    to_device,
)
from .lora import (
    lora_targets as layer_paths,
)
from .trainer import Batch


@dataclass
class Conditioning:
    """The UNet's conditioning for a batch: cross-attention ``context`` (B, L, D) and the
    ``y`` vector (SDXL: pooled text + size embeddings; class-conditioned models: the class).
    Either may be None when the model has no such input. Slicing takes rows of both."""

    context: torch.Tensor | None = None
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.context if self.context is not None else self.y)

    def __getitem__(self, part: slice) -> Conditioning:
        return Conditioning(None if self.context is None else self.context[part], None if self.y is None else self.y[part])

    def to(self, device) -> Conditioning:
        return Conditioning(None if self.context is None else self.context.to(device), None if self.y is None else self.y.to(device))


def _repeat_to(context: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a context of 77·k tokens to ``length`` tokens (ComfyUI batches prompts of
    different lengths the same way, up to their least common multiple)."""
    return context.repeat(1, length // context.shape[1], 1)


def stack_conditionings(items: Sequence[Conditioning]) -> Conditioning:
    """One batch from per-prompt conditionings (contexts repeated to a common length)."""
    context = None
    if items[0].context is not None:
        length = math.lcm(*(c.context.shape[1] for c in items))
        context = torch.cat([_repeat_to(c.context, length) for c in items])
    y = None if items[0].y is None else torch.cat([c.y for c in items])
    return Conditioning(context, y)


@dataclass
class TrainingData:
    """Where the conditions (and the GAN's real latents) come from.

    ``prompts``: what the generator is asked for, one (1, ...) ``Conditioning`` each;
    ``uncond``: the unconditional one (classifier-free guidance; real images without a
    caption). ``real_latents`` (N, C, H, W) in the model's latent space turn the GAN on;
    ``real_captions`` gives each its own caption's conditioning (None: no caption, scored
    unconditionally, and so is the generated sample it is compared with). ``paired``: prompt i
    *is* real latent i's caption (class-labelled data): they are drawn together."""

    prompts: Sequence[Conditioning]
    uncond: Conditioning
    real_latents: torch.Tensor | None = None
    real_captions: Sequence[Conditioning | None] | None = None
    paired: bool = False

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompt conditionings")
        n = None if self.real_latents is None else len(self.real_latents)
        if self.real_captions is not None and len(self.real_captions) != n:
            raise ValueError(f"{len(self.real_captions)} captions for {n} real latents")
        if self.paired and n is not None and len(self.prompts) != n:
            raise ValueError(f"paired data needs one prompt per real latent, got {len(self.prompts)} for {n}")


class GANHead(nn.Module):
    """The real/fake classifier on the fake score's mid-block features, shaped like the
    reference's: [4x4 conv stride 2, GroupNorm, SiLU] until the map is at most 4x4, then a
    conv covering the whole map (-> 1x1), GroupNorm, SiLU and a 1x1 conv to one logit.
    The last conv reads the map's layout, which a global average would throw away; the norms
    keep at least 8 channels per group (a per-channel norm on a tiny map erases the signal).
    ``size``: the (h, w) of the mid-block map at the training resolution; ``width``: where the
    features are wider, a 1x1 projection to this many channels first (Flux's 3072 tokens)."""

    def __init__(self, channels: int, size: Sequence[int], width: int | None = None):
        super().__init__()
        h, w = (int(v) for v in size)
        layers: list[nn.Module] = []
        if width is not None and width < channels:
            layers.append(nn.Conv2d(channels, width, 1))
            channels = width
        groups = math.gcd(32, max(1, channels // 8))
        while max(h, w) > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
            h, w = max(1, h // 2), max(1, w // 2)
        layers += [nn.Conv2d(channels, channels, (h, w)), nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)
        self.size = tuple(int(v) for v in size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[-2:]) != self.size:
            raise ValueError(f"GAN head built for {self.size} mid-block maps, got {tuple(features.shape[-2:])} (another resolution?)")
        weight = self.net[0].weight
        h = features if torch.is_autocast_enabled(features.device.type) else features.to(weight.dtype)
        return self.net(h).flatten(1)[:, 0].float()


class _StopAfterMidBlock(Exception):
    """Raised by the mid-block hook when only the features are wanted (saves the decoder half)."""


def _catch_stop(module: nn.Module, features: Callable[[], torch.Tensor]) -> None:
    """``module``'s forward returns ``features()`` when the mid-block hook stops it, instead
    of raising through the call: a sharded module's own forward hooks (FSDP2's gather and
    release, which a raise would skip) then run on every forward."""
    plain = module.forward

    def forward(*args, **kwargs):
        try:
            return plain(*args, **kwargs)
        except _StopAfterMidBlock:
            return features()

    module.forward = forward


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


def enable_gradient_checkpointing(unet: nn.Module, switch, network: bases.Network = UNET) -> int:
    """Recompute each block (the UNet's res blocks / transformers, Flux's double and single
    stream blocks: ``network.checkpoint_blocks``) in backward instead of storing activations.

    The adapter that was active in the forward is re-selected during the recomputation
    (backward runs after the ``switch.use`` block has exited). Returns the number of blocks.
    (The patched forward is bound per module and refers to nothing outside it, so a deep
    copy of the UNet stays correct.)"""
    blocks = network.checkpoint_blocks()
    count = 0
    for module in unet.modules():
        if isinstance(module, blocks):
            module._dmd2_adapter_switch = switch
            module.forward = types.MethodType(_checkpointed_forward, module)
            count += 1
    return count


NETWORKS = ("generator", "fake_score")


def trainable_copy(unet: nn.Module) -> nn.Module:
    """A deep copy of ``unet`` whose parameters train in fp32 (the master weights AdamW needs,
    whatever the base's dtype; autocast computes in bf16/fp16). The parameters are copied
    first and handed to ``deepcopy`` through its memo, which also keeps the fake tensors of
    ``--estimate`` in their own mode (deep-copying those directly fails)."""
    memo = {id(p): nn.Parameter(p.detach().float().clone()) for p in unet.parameters()}
    memo |= {id(b): b.detach().clone() for b in unet.buffers()}
    return copy.deepcopy(unet, memo)


def sdpa_attention(func, *args, **kwargs):
    """Attention for training: torch's ``scaled_dot_product_attention`` (ComfyUI's
    ``attention_pytorch``), passed as ComfyUI's ``optimized_attention_override``. It is what
    ComfyUI itself uses on NVIDIA GPUs; on the CPU ComfyUI picks a chunked sub-quadratic
    attention (four times the operations, several times slower to train, and not what a GPU
    run holds in memory); sage/flash attention from the command line have no backward pass."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def default_precision(device) -> str:
    """Autocast where none is asked for: bf16 on GPUs that have it, fp16 (with loss scaling,
    ``DMD2Trainer.scaler``) on those that do not, none on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class SharedBaseBackend:
    """``trainer.DMD2Backend`` over a ComfyUI ``BaseModel``: one frozen UNet + LoRA G/F + head.

    ``base_model``: the model (``ModelPatcher.model``) whose ``diffusion_model`` becomes the
    frozen base (adapters are injected into it in place); ``data``: ``TrainingData``;
    ``latent_shape``: (C, H, W) of one sample. ``full_copies`` names networks
    ("generator", "fake_score") that are instead a fully trained copy of the base: the
    reference's layout, at the memory cost of one more UNet with gradients and optimiser state
    each (the digits study's ablation; a full-rank fake score where LoRA F cannot keep up).
    ``fake_score_rank``: LoRA F's own rank (default ``lora_rank``; same scale alpha/rank): the
    fake score must track the generator's distribution, the exported generator can be smaller.
    ``lora_merged``: run adapted layers with merged weights (``lora.AdapterSwitch``).
    ``attention``: "sdpa" runs every attention through ``sdpa_attention`` whatever ComfyUI
    picked for inference; "comfy" keeps ComfyUI's choice. ``family``: the base's
    ``bases.Family`` (prediction type, forward process); None reads it from ``base_model``
    (``bases.family_of``: its own sigma table). ``shard_fake_score``: applied to a full fake
    score copy to shard it across processes (``shard.shard_module`` with the run's mesh)."""

    def __init__(
        self,
        base_model: Any,
        data: TrainingData,
        latent_shape: Sequence[int],
        lora_rank: int = 64,
        lora_alpha: float = 8.0,
        lora_targets: Iterable[str] | None = None,
        device: str | torch.device | None = None,
        mixed_precision: str | None = None,
        gradient_checkpointing: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        full_copies: Iterable[str] = (),
        lora_merged: bool = False,
        attention: str = "sdpa",
        fake_score_rank: int | None = None,
        init_lora: InitLoRA | str | Path | None = None,
        init_fake_score: bool = False,
        family: bases.Family | None = None,
        shard_fake_score: Callable[[nn.Module], Any] | None = None,
    ):
        if attention not in ("sdpa", "comfy"):
            raise ValueError(f"attention must be 'sdpa' or 'comfy', got {attention!r}")
        self.attention = attention
        full = tuple(full_copies)
        if not set(full) <= set(NETWORKS):
            raise ValueError(f"full_copies must name networks among {NETWORKS}, got {full}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_gpu = self.device.type == "cuda"
        if mixed_precision is None:
            mixed_precision = default_precision(self.device)
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
        self.autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.data = data

        self.family = family if family is not None else bases.family_of(base_model)
        self.network = self.family.network or UNET
        lora_targets = tuple(lora_targets) if lora_targets is not None else ("dmd2",)  # the family's default set
        self.unet = to_device(base_model.diffusion_model, self.device).requires_grad_(False).eval()
        self.unet_config = base_model.model_config.unet_config
        deltas, init = {}, None
        if init_lora is not None:  # parsed by ComfyUI on the plain UNet, before any adapter is injected
            init = init_lora if isinstance(init_lora, InitLoRA) else read_init_lora(init_lora)
            lora_rank, lora_alpha = init.rank, init.alpha  # the file's (the callers' RunConfig says so)
            paths = layer_paths(self.unet, self.unet_config, resolve_targets(lora_targets, self.network), self.network)
            deltas = init_deltas(base_model, init, paths, targets_label(lora_targets, self.network))
        self.copies = {name: trainable_copy(self.unet) for name in full}
        self._hooks = [h for unet in (self.unet, *self.copies.values()) for h in self.network.training_hooks(unet)]
        with_lora = tuple(name for name in NETWORKS if name not in full)
        self.adapters = None
        self.switch = AdapterSwitch(lora_merged)
        if with_lora:
            self.adapters = UNetLoRA(self.unet, self.unet_config, rank=lora_rank, alpha=lora_alpha, targets=lora_targets, adapters=with_lora, seed=seed, merged=lora_merged,
                                     ranks={"fake_score": fake_score_rank or lora_rank}, network=self.network)
            to_device(self.adapters.unet, self.device)
            self.switch = self.adapters.switch
        if init is not None:
            self._start_from(init, deltas, paths, ("generator", "fake_score") if init_fake_score else ("generator",))
        if gradient_checkpointing is None:
            gradient_checkpointing = on_gpu
        self.gradient_checkpointing = False
        if gradient_checkpointing:
            blocks = sum(enable_gradient_checkpointing(unet, self.switch, self.network) for unet in (self.unet, *self.copies.values()))
            self.gradient_checkpointing = blocks > 0
        # A full fake score sharded across processes (``shard.shard_module``): before the GAN
        # hook, so that FSDP2's hooks on the mid block complete before it stops the forward.
        self.sharded = shard_fake_score is not None and "fake_score" in self.copies
        if self.sharded:
            shard_fake_score(self.copies["fake_score"])
            _catch_stop(self.copies["fake_score"], lambda: self._features)

        self.real_latents = None if data.real_latents is None else data.real_latents.float().cpu()
        self.head = None
        self._features: torch.Tensor | None = None
        self._stop_after_mid = False
        if self.real_latents is not None:
            fake_score = self._module("fake_score")
            mid = self.network.gan_block(fake_score)
            with torch.random.fork_rng(devices=[]):  # same head for the same seed
                torch.manual_seed(seed + 1)
                channels, size = self.network.gan_shape(fake_score, self.unet_config, self.latent_shape)
                self.head = to_device(GANHead(channels, size, self.network.gan_width), self.device)
            self._mid_hook = mid.register_forward_hook(self._capture_mid)
        self.has_gan_head = self.head is not None
        self.rng = torch.Generator().manual_seed(seed * 1000 + 17 + rank)

    def _start_from(self, init: InitLoRA, deltas: dict, paths: dict[str, str], networks: Sequence[str]) -> None:
        """``networks`` start from the init LoRA: its factors in a LoRA adapter, its update
        merged into a fully trained copy."""
        for network in networks:
            if network in self.copies:
                merge_init_into(self.copies[network], paths, deltas, init.alpha / init.rank)
                continue
            if self.adapters.ranks[network] != init.rank:
                raise LoRAError(f"the {network.replace('_', ' ')} LoRA has rank {self.adapters.ranks[network]}, init LoRA "
                                f"{init.name} rank {init.rank}: start it from the file only at the file's rank")
            load_init_adapter(self.adapters, network, deltas)

    def close(self) -> None:
        """Give the base model back as it came (original layers, forwards and hooks), so a
        model shared with the rest of a ComfyUI graph is unchanged after training; drops the
        adapters, the head and the data."""
        if getattr(self, "_mid_hook", None) is not None:
            self._mid_hook.remove()
            self._mid_hook = None
        for hook in getattr(self, "_hooks", ()):
            hook.remove()
        self._hooks = []
        if self.adapters is not None:
            self.adapters.remove()
            self.adapters = None
        for module in self.unet.modules():
            if hasattr(module, "_dmd2_adapter_switch"):
                del module._dmd2_adapter_switch
                module.__dict__.pop("forward", None)  # back to the class's forward
        self.copies, self.head, self.data, self.real_latents = {}, None, None, None

    # --- data ---
    def sample_batch(self, n: int) -> Batch:
        data = self.data
        stack = lambda items: stack_conditionings(items).to(self.device)  # noqa: E731
        uncond = stack([data.uncond] * n)
        shape = (n, *self.latent_shape)
        if self.real_latents is None:
            idx = torch.randint(0, len(data.prompts), (n,), generator=self.rng).tolist()
            return Batch(cond=stack([data.prompts[i] for i in idx]), uncond=uncond, shape=shape)
        if data.paired:  # each real latent with its own condition, for generator and discriminator
            idx = torch.randint(0, len(self.real_latents), (n,), generator=self.rng).tolist()
            cond = stack([data.prompts[i] for i in idx])
            return Batch(cond=cond, uncond=uncond, shape=shape, real_x0=self.real_latents[idx].to(self.device))
        idx = torch.randint(0, len(data.prompts), (n,), generator=self.rng).tolist()
        ridx = torch.randint(0, len(self.real_latents), (n,), generator=self.rng).tolist()
        captions = [None if data.real_captions is None else data.real_captions[i] for i in ridx]
        return Batch(
            cond=stack([data.prompts[i] for i in idx]), uncond=uncond, shape=shape,
            real_x0=self.real_latents[ridx].to(self.device),
            # a real image without a caption is scored unconditionally, and so is its generated partner
            real_cond=stack([data.uncond if c is None else c for c in captions]),
            gan_cond=stack([data.uncond if c is None else data.prompts[i] for i, c in zip(idx, captions)]),
        )

    @property
    def prompt_count(self) -> int:
        return len(self.data.prompts)

    def prompt_batch(self, indices: Sequence[int]) -> Batch:
        """The prompts ``indices`` as a batch (no real latents): the regression pool's pairs."""
        cond = stack_conditionings([self.data.prompts[i] for i in indices]).to(self.device)
        uncond = stack_conditionings([self.data.uncond] * len(indices)).to(self.device)
        return Batch(cond=cond, uncond=uncond, shape=(len(indices), *self.latent_shape))

    def state_dict(self) -> dict[str, Any]:
        """What the backend adds to a resumable checkpoint: its data RNG."""
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])

    @staticmethod
    def cat_conditions(conds: Sequence[Conditioning]) -> Conditioning:
        """Batches of conditions as one batch, in order (the trainer's batched discriminator pass)."""
        return stack_conditionings(conds)

    # --- forwards ---
    def _autocast(self, enabled: bool = True):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled and self.autocast_dtype is not None)

    def _module(self, network: str | None) -> nn.Module:
        return self.copies.get(network, self.unet)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, network: str | None, autocast: bool = True) -> torch.Tensor:
        """The raw output (the family's prediction: eps or v) of ``network`` ('generator',
        'fake_score' or None = the base); ``autocast=False``: in the weights' own dtype."""
        adapter = None if network in self.copies else network
        options = {"optimized_attention_override": sdpa_attention} if self.attention == "sdpa" else {}
        with self.switch.use(adapter), self._autocast(autocast):
            out = self.network.forward(self._module(network), x_t, self.family.process.model_time(t), cond.context, cond.y,
                                       self.family.guidance, options)
        return out.float()

    def _x0(self, x_t, t, cond, adapter):
        return self.family.to_x0(x_t, self.raw(x_t, t, cond, adapter), t)

    def generator_x0(self, x_t, t, cond):
        return self._x0(x_t, t, cond, "generator")

    def fake_x0(self, x_t, t, cond):
        # The prediction the DM gradient uses (no grad) runs in fp32 when the fake score is a
        # full fp32 copy, as the reference runs it; LoRA F sits on the bf16/fp16 base and
        # stays under autocast, as does the fake score's own training pass.
        fp32 = "fake_score" in self.copies and not torch.is_grad_enabled()
        return self.family.to_x0(x_t, self.raw(x_t, t, cond, "fake_score", autocast=not fp32), t)

    def real_x0(self, x_t, t, cond, uncond, guidance_scale):
        """The base with classifier-free guidance on its raw outputs (as the reference, on
        eps). x0, eps and v are affine in each other at a fixed (x_t, t) with the same
        coefficients for both passes, so this equals the guidance done in x0 or eps space."""
        if guidance_scale == 1.0:
            return self._x0(x_t, t, cond, None)
        both = stack_conditionings([cond, uncond])
        out = self.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), both, None)
        out_cond, out_uncond = out.chunk(2)
        return self.family.to_x0(x_t, losses.classifier_free_guidance(out_cond, out_uncond, guidance_scale), t)

    def _capture_mid(self, module, inputs, output):
        if self._stop_after_mid:  # only for fake_logits: other forwards keep no reference
            self._features = output
            raise _StopAfterMidBlock

    def fake_logits(self, x_t, t, cond):
        if self.head is None:
            raise RuntimeError("no GAN head: the backend was built without real latents")
        self._stop_after_mid, self._features = True, None
        try:
            self.raw(x_t, t, cond, "fake_score")
        except _StopAfterMidBlock:
            pass
        finally:
            self._stop_after_mid = False
        features, self._features = self.network.gan_map(self._features, self.latent_shape), None
        # In fp32 outside autocast, as the reference keeps its classifier head (a GPU run's
        # features are bf16/fp16; on the CPU nothing changes).
        with torch.autocast(self.device.type, enabled=False):
            return self.head(features.float())

    # --- parameters ---
    def _named(self, network: str) -> list[tuple[str, nn.Parameter]]:
        if network in self.copies:
            return [(f"{network}.{k}", p) for k, p in self.copies[network].named_parameters()]
        return [(f"{network}.{k}", p) for k, p in self.adapters.named_parameters(network)]

    def generator_parameters(self):
        return self._named("generator")

    def fake_score_parameters(self):
        named = self._named("fake_score")
        if self.head is not None:
            named += [(f"gan_head.{k}", p) for k, p in self.head.named_parameters()]
        return named

    def gan_head_parameters(self):
        return [] if self.head is None else list(self.head.parameters())

    # --- previews ---
    @torch.no_grad()
    def sample(self, conds: Sequence[Conditioning], seeds: Sequence[int], timesteps: Sequence[int]) -> torch.Tensor:
        """The generator's few-step samples (DMD2's sampler) from unit noise, one seed per
        condition (start noise and re-noise drawn from that seed): latents on the CPU."""
        out = []
        for cond, seed in zip(conds, seeds):
            gen = torch.Generator().manual_seed(int(seed))
            noises = [torch.randn((1, *self.latent_shape), generator=gen).to(self.device) for _ in timesteps]
            cond = cond.to(self.device)
            x0 = sampling.dmd2_sample(lambda x, t: self.generator_x0(x, t, cond), noises, timesteps, self.family)
            out.append(x0.cpu())
        return torch.cat(out)


def export_generator_lora(trainer, backend: SharedBaseBackend, path, metadata: dict | None = None, averaged: bool = True):
    """The generator adapter as a kohya LoRA file (``lora.UNetLoRA.export``): by default its
    moving average (``trainer.averaged_generator``), else the raw adapter. The one export that
    ``dmd2-train`` and the digits demo both use."""
    if backend.adapters is None or "generator" not in backend.adapters.adapter_names:
        raise ValueError("the generator is a full copy, not a LoRA: nothing to export as a LoRA")
    averaged = averaged and trainer.generator_ema is not None
    meta = {**(metadata or {}), "dmd2_generator_weights": "moving average" if averaged else "raw"}
    with trainer.averaged_generator() if averaged else contextlib.nullcontext():
        return backend.adapters.export(path, "generator", meta)
