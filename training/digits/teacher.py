"""The digits teacher: a small class-conditioned diffusion model, and ComfyUI's view of it.

ComfyUI's own ``UNetModel`` (the SD 1000-step scaled-linear schedule, the class as a one-hot
adm vector), trained on the digits with plain DDPM. Its family (``DIGITS``: eps, the demo's
teacher; ``DIGITS_V``: v prediction with zero terminal SNR, #24) says what the UNet's output
is; every x0 goes through it. The teacher is a real ComfyUI ``BaseModel``
(``build_base_model``, EPS or V_PREDICTION with zsnr), so the shared-base backend distils it
like any checkpoint, ComfyUI's stock LoRA loader patches it with the exported LoRAs, and the
pack's sampler nodes sample it (``comfy_model``, ``comfy_conditioning``). Its files carry the
v-prediction/ZTSNR marker keys ComfyUI reads from checkpoints (``v_pred``, ``ztsnr``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ... import bases
from .. import losses, sampling
from ..state import copy_checked
from .data import NULL_CLASS, NUM_CLASSES, SIDE, DigitsData, one_hot

# A two-level UNet (8x8 and 4x4, 32 channels, no attention, ~0.29M parameters). The class
# enters as a one-hot vector through the UNet's ``label_emb`` (ADM-style: added to the time
# embedding, applied by the scale-shift norms), in ComfyUI terms the model's ``y``/adm input.
UNET_CONFIG = {
    "image_size": SIDE,
    "in_channels": 1,
    "out_channels": 1,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [0, 0],
    "transformer_depth_output": [0, 0, 0, 0],
    "transformer_depth_middle": -1,
    "context_dim": None,
    "use_spatial_transformer": False,
    "use_scale_shift_norm": True,
    "num_classes": "sequential",
    "adm_in_channels": NUM_CLASSES + 1,
    "legacy": False,
    "use_checkpoint": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "num_heads": -1,
    "num_head_channels": 16,
}

# The digits family: SD1.5's forward process (the scaled-linear 1000-step table, made zero
# terminal SNR by ``with_sampling``) on the 8x8 one-channel class-conditioned UNet (no text
# encoder: the unconditional input is the null class). ``one_step_timestep``: the 1-step
# student's. The eps teacher's is 399 (docs/digits.md: at 999 its x0 = (x - s*eps)/a divides
# by a = 0.068). Under zero terminal SNR the UNet sees pure noise at 999, which is exactly what
# the 1-step sampler feeds it, and its x0 = a*x - s*v has no division: 999, the paper's SD1.5
# choice (docs/digits.md, "The v-prediction, zero-terminal-SNR teacher").
DIGITS = dataclasses.replace(bases.SD15, name="digits", label="digits (8x8)", resolution=SIDE, context_dim=0,
                             text_encoders=(), one_step_timestep=399)
DIGITS_V = dataclasses.replace(DIGITS.with_sampling("v", zsnr=True), one_step_timestep=999)
# ComfyUI's checkpoint marker keys (empty tensors): v prediction, zero terminal SNR
MARKERS = ("v_pred", "ztsnr")


def digits_family(prediction: str = "eps", zsnr: bool = False) -> bases.Family:
    """The digits family with this sampling (``DIGITS`` or ``DIGITS_V`` for the two teachers)."""
    for family in (DIGITS, DIGITS_V):
        if (family.prediction, family.zsnr) == (prediction, bool(zsnr)):
            return family
    return DIGITS.with_sampling(prediction, zsnr)


def _digits_model_config(zsnr: bool = False):
    import comfy.latent_formats
    import comfy.supported_models_base

    class DigitsLatentFormat(comfy.latent_formats.LatentFormat):
        latent_channels = 1
        scale_factor = 1.0

    class DigitsModelConfig(comfy.supported_models_base.BASE):
        unet_config = dict(UNET_CONFIG)
        unet_extra_config = {}
        latent_format = DigitsLatentFormat
        sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "zsnr": zsnr}
        supported_inference_dtypes = [torch.float32]

    return DigitsModelConfig(dict(UNET_CONFIG))


def build_base_model(seed: int = 0, family: bases.Family = DIGITS):
    """A ComfyUI ``BaseModel`` (SD schedule; EPS, or V_PREDICTION and zsnr as ``family``
    says) wrapping a fresh digits UNet; its adm input is the one-hot class from the
    conditioning's ``pooled_output``."""
    import comfy.model_base

    class DigitsModel(comfy.model_base.BaseModel):
        def encode_adm(self, **kwargs):
            return kwargs.get("pooled_output")

    types = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}
    if family.prediction not in types:
        raise bases.FamilyError(f"the digits model has no {family.prediction!r} sampling; it has {sorted(types)}")
    base = DigitsModel(_digits_model_config(family.zsnr), model_type=types[family.prediction])
    _init_weights(base.diffusion_model, seed)
    return base


def _init_weights(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip initialisation; use torch's defaults explicitly (seeded)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for m in module.modules():
        for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, cls):
                cls.reset_parameters(m)
                break
    torch.random.set_rng_state(state)


class DigitsDenoiser(torch.nn.Module):
    """The UNet as an x0 predictor of (x_t, t, labels), through its family."""

    def __init__(self, unet: torch.nn.Module, family: bases.Family = DIGITS):
        super().__init__()
        self.unet = unet
        self.family = family

    def output(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output: eps or v, as the family says."""
        return self.unet(x_t, timesteps=t.float(), y=one_hot(labels))

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.family.to_x0(x_t, self.output(x_t, t, labels), t)


def new_teacher(seed: int = 0, family: bases.Family = DIGITS) -> DigitsDenoiser:
    return DigitsDenoiser(build_base_model(seed, family).diffusion_model, family)


def denoiser_state_dict(model: DigitsDenoiser) -> dict[str, torch.Tensor]:
    """The UNet's weights, plus ComfyUI's marker keys for a v-prediction / ZTSNR family."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}
    flags = {"v_pred": model.family.prediction == "v", "ztsnr": model.family.zsnr}
    return state | {key: torch.tensor([]) for key in MARKERS if flags[key]}


def load_denoiser(state: dict[str, torch.Tensor], family: bases.Family | None = None) -> DigitsDenoiser:
    """Rebuild a denoiser from UNet weights, checking the key set and shapes first. The
    family: ``family`` if given, else the file's marker keys (none: the eps teacher's)."""
    marked = digits_family("v" if "v_pred" in state else "eps", "ztsnr" in state)
    model = new_teacher(family=family or marked)
    weights = {k: v for k, v in state.items() if k not in MARKERS}
    copy_checked(model.unet.state_dict(), weights, "not a digits model")  # the state dict's tensors are the model's
    return model


def train_teacher(
    data: DigitsData,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 2e-3,
    ema_decay: float = 0.995,
    label_dropout: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    init: DigitsDenoiser | None = None,
    family: bases.Family = DIGITS,
    model: torch.nn.Module | None = None,
) -> DigitsDenoiser:
    """Plain DDPM training (MSE in the family's own output, eps or v; t uniform in [0, 999]);
    returns the EMA weights. ``init``: start from these weights instead of fresh ones (a
    finetune of that model, in its family). ``model``: a fresh denoiser of another kind to
    train instead, in its own family (the Flux teacher, ``flow.new_teacher``: rectified flow,
    its v on t = (k + 1) / 1000)."""
    torch.manual_seed(seed)
    if model is None:
        model = new_teacher(seed, family) if init is None else load_denoiser(denoiser_state_dict(init))
    family = model.family
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: min(1.0, (n + 1) / 200) * (0.5 * (1 + math.cos(math.pi * n / steps))) + 0.02)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(data.train_y), (batch_size,), generator=g)
        x0, labels = data.train_x[idx], data.train_y[idx].clone()
        labels[torch.rand(batch_size, generator=g) < label_dropout] = NULL_CLASS
        t = torch.randint(0, 1000, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = family.add_noise(x0, noise, t)
        loss = F.mse_loss(model.output(x_t, t, labels), training_target(family, x_t, x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if progress is not None:
            progress(step, loss.item())
    return ema


def training_target(family: bases.Family, x_t: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The output the UNet should give at x_t = add_noise(x0, noise, t): the noise itself for
    eps (bit for bit the demo's teacher), the velocity eps - x0 for flow, else the family's
    output for the clean x0 (for v: a*eps - s*x0; it divides by s >= 0.029, never by a)."""
    if family.prediction == "flow":
        return noise - x0
    return noise if family.prediction == "eps" else family.from_x0(x_t, x0, t)


@torch.no_grad()
def sample_ddim(model: DigitsDenoiser, labels: torch.Tensor, steps: int, seed: int, guidance: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from pure noise: the teacher's reference sampler."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), 1, SIDE, SIDE), generator=g)
    null = torch.full_like(labels, NULL_CLASS)

    def x0(x_t, t):
        pred = model.x0(x_t, t, labels)
        return pred if guidance == 1.0 else losses.classifier_free_guidance(pred, model.x0(x_t, t, null), guidance)

    return sampling.ddim_sample(x0, x, model.family.trailing_timesteps(steps), model.family)


@torch.no_grad()
def sample_student(model: DigitsDenoiser, labels: torch.Tensor, timesteps: Sequence[int], seed: int) -> torch.Tensor:
    """The DMD2 sampler in plain torch: unit noise fed at the first timestep, predict x0,
    re-noise with fresh noise to the next timestep (start and re-noise drawn from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    noises = [torch.randn((len(labels), 1, SIDE, SIDE), generator=g) for _ in timesteps]
    return sampling.dmd2_sample(lambda x, t: model.x0(x, t, labels), noises, timesteps, model.family)


def comfy_model(model: DigitsDenoiser):
    """The denoiser's UNet as a ComfyUI MODEL (ModelPatcher), for the pack's sampler nodes."""
    import comfy.model_management
    import comfy.model_patcher

    base = build_base_model(family=model.family)
    base.diffusion_model.load_state_dict(model.unet.state_dict())
    return comfy.model_patcher.ModelPatcher(
        base, load_device=comfy.model_management.get_torch_device(), offload_device=comfy.model_management.unet_offload_device()
    )


def comfy_conditioning(labels: torch.Tensor) -> list:
    """CONDITIONING for a batch of class labels: the one-hot class as ``pooled_output`` (the
    UNet's adm input, the Flux teacher's ``y``) and as the one cross-attention token (the Flux
    teacher's text token, ``flow``; the UNet has no cross-attention and never reads it)."""
    y = one_hot(labels)
    return [[y[:, None], {"pooled_output": y}]]
