"""The flow-matching digits teacher (#25): ComfyUI's own Flux class at a tiny size, trained by
rectified flow on the 8x8 digits, read by the pack as a Flux.1 [dev] model.

The model is a real ``comfy.model_base.Flux`` from a ``comfy.supported_models.Flux`` subclass
(``build_base_model``), so ``bases.family_of`` reads it as ``FLUX_DEV`` on its own
``ModelSamplingFlux``, the shared-base backend distils it through ``bases.FluxNetwork`` exactly
as it distils a Flux checkpoint, ComfyUI's stock LoRA loader patches it and ``DMD2Generate``
samples it with the flow presets. The class (one-hot, the null class for CFG included) is the
model's one text token (``context``) and its pooled vector (``y``): the token is what the
double blocks' text stream and the joint attention read, the vector what every block's
modulation reads, the two routes a Flux model has for its prompt. No guidance input
(``guidance_embed`` off): the digits rows sample without guidance (the SD rows' choice), and
the [dev] family's embedded 3.5 is ignored by a model without ``guidance_in``.

Sampling: ModelSamplingFlux at shift 0 (mu 0, a multiplicative shift of 1: t = u, no shift).
[dev] shifts by the token count (mu 0.46 at these 16 tokens by diffusers' line, which is fitted
for 256-4096 tokens of 1024-px images); 8x8 digits are no high-resolution signal to shift
toward noise for, and unshifted the trainer's grid k -> t = (k + 1) / 1000 is uniform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...bases import FLUX_DEV, Family, RectifiedFlow
from ..state import copy_checked
from .data import NUM_CLASSES, one_hot
from .teacher import _init_weights

# 8x8 one-channel digits in 2x2 patches: 16 image tokens and the class token; two double-stream
# and two single-stream blocks at width 64 (2 heads of 32: rope axes 8 + 12 + 12), ~0.45 M
# parameters (the SD digits UNet: 0.29 M).
FLUX_CONFIG = {"image_model": "flux", "in_channels": 1, "out_channels": 1, "patch_size": 2,
               "vec_in_dim": NUM_CLASSES + 1, "context_in_dim": NUM_CLASSES + 1, "hidden_size": 64, "mlp_ratio": 4.0,
               "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
               "qkv_bias": True, "guidance_embed": False}
MU = 0.0  # ModelSamplingFlux's shift (mu): exp(0) = 1, unshifted (module docstring)
# The family the pack reads off this model (``bases.family_of``, checked by the tests): [dev] on
# its own unshifted process
DIGITS_FLOW = FLUX_DEV.with_process(RectifiedFlow(1.0))
# a key only the Flux digits model's files have (the UNet's start with input_blocks/time_embed)
MARKER_KEY = "double_blocks.0.img_attn.qkv.weight"


def _model_config():
    import comfy.latent_formats
    import comfy.supported_models

    class DigitsFlowLatentFormat(comfy.latent_formats.LatentFormat):
        latent_channels = 1
        scale_factor = 1.0

    class DigitsFlux(comfy.supported_models.Flux):
        unet_config = dict(FLUX_CONFIG)
        sampling_settings = {"shift": MU}
        latent_format = DigitsFlowLatentFormat
        supported_inference_dtypes = [torch.float32]

    config = DigitsFlux(dict(FLUX_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    return config


def build_base_model(seed: int = 0):
    """A ComfyUI ``model_base.Flux`` (ModelSamplingFlux at mu 0) wrapping a fresh tiny Flux."""
    base = _model_config().get_model({})
    _init_weights(base.diffusion_model, seed)
    with torch.no_grad():  # what _init_weights does not reach: the q/k RMSNorm scales (torch.empty in ComfyUI)
        for name, p in base.diffusion_model.named_parameters():
            if name.endswith("norm.scale"):
                p.fill_(1.0)
        base.diffusion_model.final_layer.linear.weight.zero_()  # DiT's zero-initialised output: v = 0 at the start
        base.diffusion_model.final_layer.linear.bias.zero_()
    return base


def is_flow_file(state: dict) -> bool:
    return MARKER_KEY in state


class FlowDenoiser(torch.nn.Module):
    """The Flux network as an x0 predictor of (x_t, t, labels) through its family (x0 = x - t*v),
    with the SD teacher's interface (``teacher.sample_ddim``/``sample_student`` take it)."""

    def __init__(self, unet: torch.nn.Module, family: Family):
        super().__init__()
        self.unet = unet
        self.family = family
        # ComfyUI's blocks add residuals in place (inference code): out of place under autograd
        # (the hooks live on ``unet``: a deep copy, the teacher's EMA, has them too)
        family.network.training_hooks(unet)

    def output(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The network's velocity v at trainer timesteps ``t`` (called on flow time)."""
        y = one_hot(labels)
        return self.unet(x_t, self.family.process.model_time(t), y[:, None], y=y)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.family.to_x0(x_t, self.output(x_t, t, labels), t)


def new_teacher(seed: int = 0) -> FlowDenoiser:
    from ... import bases

    base = build_base_model(seed)
    return FlowDenoiser(base.diffusion_model, bases.family_of(base))  # FLUX_DEV on its own shift


def load_denoiser(state: dict[str, torch.Tensor], family: Family | None = None) -> FlowDenoiser:
    """A denoiser from Flux digits weights (keys and shapes checked first)."""
    model = new_teacher()
    copy_checked(model.unet.state_dict(), state, "not a Flux digits model")
    if family is not None:
        model.family = family
    return model


def denoiser_state_dict(model: FlowDenoiser) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}


def base_model_of(model: FlowDenoiser):
    """A ComfyUI BaseModel holding a copy of the denoiser's weights."""
    base = build_base_model()
    base.diffusion_model.load_state_dict(model.unet.state_dict())
    return base


def comfy_model(model: FlowDenoiser):
    """The denoiser as a ComfyUI MODEL (ModelPatcher), for the pack's sampler nodes."""
    import comfy.model_management
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(base_model_of(model), load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def training_conditioning(labels: torch.Tensor):
    """The backend's Conditioning for labels: the token and the vector, as the graph's
    (``teacher.comfy_conditioning``)."""
    from ..backend import Conditioning

    y = one_hot(labels)
    return Conditioning(context=y[:, None], y=y)


TEACHER_STEPS = 2000  # at batch 128 (the UNet teachers: 1500): Euler 50 1.29, Euler 4 2.74 (docs/digits.md)

# The students (``students.StudentSettings``, the product path): the SD digits' demo recipes
# carried over (``demo.ONE_STEP_STUDENT``/``FOUR_STEP_STUDENT``: rank 8, the regression warm
# start onto the teacher's 10 Euler steps, 1600 DMD2 iterations, the GAN on paired real digits)
# with Flux's target sets: the 1-step student adapts every layer ("all": the modulation, the
# embeddings, the in/out projections) with a full fake score, at t = 1 (pure noise, x0 = x - v);
# the 4-step student is LoRA on the attention and MLP layers ("dmd2") at t = 1, .75, .5, .25.
def student_recipes() -> dict[str, object]:
    """{"1-step": StudentSettings, "4-step": StudentSettings} for the Flux teacher."""
    from dataclasses import replace

    from .demo import FOUR_STEP_STUDENT, ONE_STEP_STUDENT

    return {"1-step": replace(ONE_STEP_STUDENT, timesteps=(999,), lora_targets=("all",)),
            "4-step": replace(FOUR_STEP_STUDENT, lora_targets=("dmd2",))}


FOUR_STEP_PRESET = "DMD2 flow 4-step (Flux dev shift)"
ONE_STEP_PRESET = "DMD2 flow 1-step (Flux dev shift)"


def flow_preset(timesteps: Sequence[int]) -> str:
    """The DMD2Generate flow preset of a student's trainer timesteps (999 = t 1; 999, 749, 499,
    249 = t 1, .75, .5, .25 unshifted: the preset's grid on this model's own shift)."""
    presets = {(999,): ONE_STEP_PRESET, (999, 749, 499, 249): FOUR_STEP_PRESET}
    if tuple(timesteps) not in presets:
        raise ValueError(f"no flow preset samples the timesteps {tuple(timesteps)}; known: {list(presets)}")
    return presets[tuple(timesteps)]
