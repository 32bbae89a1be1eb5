"""The family interface: forward process, prediction types, the Family record, the registry."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch._subclasses.fake_tensor import FakeTensor


class FamilyError(ValueError):
    """A base model no family describes, or a sampling the pack cannot distil or sample."""


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped (B, 1, 1, ...) in ``like``'s dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """``steps`` timesteps evenly spaced from the last, diffusers' ``timestep_spacing="trailing"``
    (round(arange(T, 0, -T/N)) - 1): 4 -> 999,749,499,249. The one copy (nodes' presets too)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return tuple(round(num_train_timesteps - k * num_train_timesteps / steps) - 1 for k in range(steps))


class Process:
    """A forward process x_t = alpha(t) * x0 + sigma(t) * noise on the family's timesteps."""

    num_train_timesteps: int

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) at timesteps ``t`` (one per sample) on ``t``'s device, float64
        (float32 on MPS, which has no float64): no timestep goes back to the host."""
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.coefficients(t.detach())
        return _per_sample(a, like), _per_sample(s, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0) at timesteps ``t``."""
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    def trailing_timesteps(self, steps: int) -> tuple[int, ...]:
        return trailing_timesteps(steps, self.num_train_timesteps)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network takes as its timestep input for timesteps ``t`` (float32)."""
        return t.float()


def shifted_time(shift: float, u):
    """sigma = shift*u / (1 + (shift - 1)*u): flow time ``u`` moved toward noise (diffusers'
    static ``shift``; its exponential ``time_shift(mu, 1, u)`` and ComfyUI's ``flux_time_shift``
    are this with shift = exp(mu))."""
    return u if shift == 1.0 else shift * u / (1 + (shift - 1) * u)


class RectifiedFlow(Process):
    """Rectified flow, x_t = (1 - t)*x0 + t*noise on continuous t in [0, 1] (t = ComfyUI's sigma,
    diffusers' timestep / 1000), sampled on uniform times shifted toward noise by ``shift``.

    The trainer's integer timesteps k = 0..999 index diffusers' training grid
    (FlowMatchEulerDiscreteScheduler: timesteps 1..1000, sigma = shift(timestep / 1000)):
    t = shift((k + 1) / 1000), so the DMD2 list 999, 749, 499, 249 is ``sigmas(4)`` (1, 0.75,
    0.5, 0.25 shifted) and every DMD2 range keeps its meaning. A floating-point ``t`` is the
    flow time itself."""

    num_train_timesteps = 1000  # diffusers' timesteps are 1000 * t

    def __init__(self, shift: float = 1.0):
        self.shift = float(shift)

    def time(self, t: torch.Tensor) -> torch.Tensor:
        """The flow time of timesteps ``t`` (integer: grid indices; floating: times already)."""
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        if t.is_floating_point():
            return t.to(dtype)
        return shifted_time(self.shift, (t.to(dtype) + 1) / self.num_train_timesteps)

    def coefficients(self, t):
        t = self.time(t)
        return 1 - t, t

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time(t).float()

    def sigmas(self, steps: int) -> torch.Tensor:
        """The ``steps`` times of an N-step sampler, float64: 1, (N-1)/N, ..., 1/N shifted (the
        grid FluxPipeline hands its scheduler)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return shifted_time(self.shift, torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64))



class DiscreteVP(Process):
    """DDPM's variance-preserving process on integer timesteps 0..T-1, from its cumulative
    products: alpha = sqrt(abar), sigma = sqrt(1 - abar). ComfyUI's sigma table is
    sqrt((1 - abar) / abar); ``from_sigmas`` reads a model's own table (with ZTSNR in it)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.num_train_timesteps = len(self.alphas_cumprod)
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        """abar on ``device``, cached: the trainer's timesteps live on the GPU, and indexing a
        host table with them would sync the GPU on every noising and x0 conversion."""
        table = self._tables.get(device)
        if table is None:
            table = self.alphas_cumprod.to(device, torch.float32 if device.type == "mps" else torch.float64)
            if not isinstance(table, FakeTensor):  # --estimate's fake tensors are not kept
                self._tables[device] = table
        return table

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor) -> DiscreteVP:
        sigmas = sigmas.detach().double().cpu()
        return cls(1.0 / (1.0 + sigmas**2))

    def with_terminal(self, alpha_cumprod: float) -> DiscreteVP:
        """The same table with the last abar replaced (zero terminal SNR at exactly 0)."""
        table = self.alphas_cumprod.clone()
        table[-1] = alpha_cumprod
        return DiscreteVP(table)

    @property
    def sigmas(self) -> torch.Tensor:
        """ComfyUI's sigma table (float64): sqrt((1 - abar) / abar)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def coefficients(self, t):
        abar = self._table(t.device)[t.long()]
        return abar.sqrt(), (1 - abar).sqrt()

    def alpha_sigma(self, t, like):
        # abar rounded to the sample's dtype first, then the roots: the arithmetic eps runs
        # have always used, so their samples and losses stay bit-identical across versions.
        abar = _per_sample(self._table(t.device)[t.detach().long()], like)
        return abar.sqrt(), (1 - abar).sqrt()


@dataclass(frozen=True)
class Prediction:
    """What a network's output is, and its conversions at (alpha, sigma) for x_t.

    ``to_x0(x_t, out, a, s)``, ``from_x0(x_t, x0, a, s)``, and ``weight(a, s)``: the factor
    with |out_pred - out|^2 = weight^2 * |x0_pred - x0|^2 at a fixed x_t (the loss in the
    network's own parameterization, written in x0)."""

    name: str
    to_x0: Callable
    from_x0: Callable
    weight: Callable


PREDICTIONS: dict[str, Prediction] = {
    # x_t = a*x0 + s*eps
    "eps": Prediction("eps", lambda x, out, a, s: (x - s * out) / a, lambda x, x0, a, s: (x - a * x0) / s, lambda a, s: a / s),
    # v = a*eps - s*x0 (a^2 + s^2 = 1): x0 = a*x_t - s*v, finite where a = 0
    "v": Prediction("v", lambda x, out, a, s: a * x - s * out, lambda x, x0, a, s: (a * x - x0) / s, lambda a, s: 1 / s),
    "x0": Prediction("x0", lambda x, out, a, s: out, lambda x, x0, a, s: x0, lambda a, s: torch.ones_like(a)),
    # rectified flow, x_t = (1-t)*x0 + t*eps (a = 1 - s, s = t): the network gives v = eps - x0,
    # so x0 = x_t - t*v and |v_pred - v| = |x0_pred - x0| / t
    "flow": Prediction("flow", lambda x, out, a, s: x - s * out, lambda x, x0, a, s: (x - x0) / s, lambda a, s: 1 / s),
}


def sampling_label(prediction: str, zsnr: bool) -> str:
    """'eps', 'v', 'v + zsnr': what LoRA metadata records and notes name."""
    return prediction + (" + zsnr" if zsnr else "")


class Network:
    """The architecture half of a family: how the trainer calls the denoiser, which of its
    layers LoRA adapts (and under which export names), and where the GAN head reads it. One
    subclass per architecture, in the family's module (``sd.UNetNetwork``, ``flux.FluxNetwork``);
    methods that need ComfyUI import it themselves."""

    #: LoRA target sets: {set name: module-name suffixes}; "dmd2" is the family's default.
    target_sets: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: channels the GAN head projects wider features to first (None: it reads them as they are)
    gan_width: int | None = None

    def resolve_targets(self, names) -> tuple[str, ...]:
        """Target names with this architecture's sets expanded, in order, without repeats
        (empty or None: "dmd2")."""
        out: dict[str, None] = {}
        for name in names or ("dmd2",):
            out.update(dict.fromkeys(self.target_sets.get(name, (name,))))
        return tuple(out)

    def weight_paths(self, module, config) -> dict[str, str]:
        """{export path: module path} of every weight-carrying layer LoRA may adapt."""
        raise NotImplementedError

    def forward(self, module, x_t: torch.Tensor, t: torch.Tensor, context, y, guidance, options: dict) -> torch.Tensor:
        """The raw output at network timestep ``t`` (``Process.model_time``)."""
        raise NotImplementedError

    def training_hooks(self, module) -> list:
        """Hooks that make ``module`` trainable where its inference code is not (removable
        handles; none by default)."""
        return []

    def checkpoint_blocks(self) -> tuple[type, ...]:
        """The block classes recomputed in backward under gradient checkpointing."""
        raise NotImplementedError

    def gan_block(self, module):
        """The block whose output the GAN head reads."""
        raise NotImplementedError

    def gan_map(self, output, latent_shape) -> torch.Tensor:
        """That block's output as a (B, C, h, w) map."""
        raise NotImplementedError

    def gan_shape(self, module, config, latent_shape) -> tuple[int, tuple[int, int]]:
        """(channels, (h, w)) of ``gan_map`` for latents of ``latent_shape`` (C, H, W)."""
        raise NotImplementedError


class TransformerNetwork(Network):
    """A diffusion transformer on 2x2 latent patches (Flux, SD3's MMDiT): LoRA targets and kohya
    keys are its own module paths (ComfyUI's loader maps ``lora_unet_<path with _>`` onto every
    ``diffusion_model.<path>.weight``); the GAN head reads one block's image tokens laid back on
    the token grid, 1x1-projected to ``gan_width`` channels first where the model is wider."""

    gan_width = 1024  # 4x4 convolutions at Flux.1's 3072 channels would be 150 M parameters each
    gan_output_index = 0  # which of the block's outputs holds the image tokens

    def weight_paths(self, module, config):
        from torch import nn

        paths = {}
        for name, layer in module.named_modules():
            if ".adapters." in name:
                continue
            wrapped = hasattr(layer, "adapters") and isinstance(getattr(layer, "base", None), nn.Linear)
            if wrapped or (isinstance(layer, nn.Linear) and not name.endswith(".base")):
                paths[name] = name
        return paths

    def token_grid(self, latent_shape) -> tuple[int, int]:
        """(h, w) of the image tokens (2x2 patches, odd sides padded as ComfyUI pads them)."""
        return tuple((int(side) + 1) // 2 for side in latent_shape[-2:])

    def gan_map(self, output, latent_shape):
        tokens = output[self.gan_output_index]  # (B, h*w, hidden), row-major
        h, w = self.token_grid(latent_shape)
        return tokens[:, : h * w].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def gan_shape(self, module, config, latent_shape):
        return module.hidden_size, self.token_grid(latent_shape)


@dataclass(frozen=True)
class Family:
    """One base-model family with one sampling (prediction type, terminal SNR).

    ``process`` is built by ``make_process`` from ``zsnr`` unless a model's own table is
    given (``with_process``): ComfyUI's sigmas are the truth for a loaded model, except at a
    zero-terminal-SNR model's last timestep, where a v (or x0) model's process has abar
    exactly 0 (x0 = -v), as diffusers' ``rescale_betas_zero_snr`` and the sampler's DMD2 step
    have it; ComfyUI's 4.9e-8 there only keeps its sigma finite. An eps model keeps the finite
    value (its x0 has no limit at alpha = 0; the trainer refuses eps + zsnr)."""

    name: str  # "sd15", "sd2", "sdxl": the arch key used in files, metadata and tables
    label: str  # "SD1.5", shown to users
    prediction: str = "eps"  # key of PREDICTIONS
    zsnr: bool = False  # zero terminal SNR (the last timestep has alpha ~ 0)
    resolution: int = 512  # default training/sampling side in pixels
    context_dim: int = 768  # cross-attention width (the text encoder's)
    text_encoders: tuple[str, ...] = ("clip_l",)
    pooled: bool = False  # SDXL's adm input: pooled text embedding + size/crop embedding
    uncond: str = "empty"  # the default unconditional embedding: "empty" prompt or "zeros"
    one_step_timestep: int = 999  # the reference's 1-step conditioning timestep
    guidance: float | None = None  # embedded guidance the real score takes as an input (Flux.1 [dev]); None: CFG
    network: Network | None = field(default=None, repr=False, compare=False)  # the architecture (set by the member module)
    make_process: Callable[[bool], Process] = field(default=None, repr=False, compare=False)
    process_override: Process | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def process(self) -> Process:
        process = self.process_override if self.process_override is not None else self.make_process(self.zsnr)
        if self.zsnr and self.prediction != "eps" and isinstance(process, DiscreteVP):
            process = process.with_terminal(0.0)
        return process

    @property
    def parameterization(self) -> Prediction:
        return PREDICTIONS[self.prediction]

    @property
    def sampling_label(self) -> str:
        """'eps', 'v', 'v + zsnr': what metadata records and notes name."""
        return sampling_label(self.prediction, self.zsnr)

    def with_sampling(self, prediction: str, zsnr: bool = False) -> Family:
        if prediction not in PREDICTIONS:
            raise FamilyError(f"unknown prediction type {prediction!r}; known: {sorted(PREDICTIONS)}")
        return dataclasses.replace(self, prediction=prediction, zsnr=bool(zsnr))

    def with_process(self, process: Process) -> Family:
        return dataclasses.replace(self, process_override=process)

    # -- the conversions every DMD2 computation goes through ---------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.process.add_noise(x0, noise, t)

    def to_x0(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's raw output at (x_t, t) as the clean sample it implies."""
        a, s = self.process.alpha_sigma(t, x_t)
        return self.parameterization.to_x0(x_t, output, a, s)

    def from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The output the network would give for clean sample ``x0`` at (x_t, t)."""
        a, s = self.process.alpha_sigma(t, x_t)
        return self.parameterization.from_x0(x_t, x0, a, s)

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.process.alpha_sigma(t, x_t)
        return PREDICTIONS["eps"].from_x0(x_t, x0, a, s)

    def output_weight(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample factor turning an x0 error into the network's own output error (in
        float64 first: 1 - abar near t = 0 loses digits in float32)."""
        a, s = self.process.coefficients(t.detach())
        return _per_sample(self.parameterization.weight(a, s), like)

    def trailing_timesteps(self, steps: int) -> tuple[int, ...]:
        return self.process.trailing_timesteps(steps)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def get_family(name: str, prediction: str | None = None, zsnr: bool = False) -> Family:
    """The registered family ``name``, with ``prediction`` (None: its own; SD's is eps)."""
    if name not in FAMILIES:
        raise FamilyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    family = FAMILIES[name]
    return family.with_sampling(family.prediction if prediction is None else prediction, zsnr)


# Readers of ComfyUI models outside the SD UNet families: ``reader(base_model, model_sampling)
# -> Family | None`` (None: not this module's model). ``family_of`` asks them before SD's.
MODEL_READERS: list[Callable] = []
