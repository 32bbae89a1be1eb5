"""Flux.1 [dev] and [schnell]: rectified flow (x_t = (1-t)*x0 + t*eps, the network predicts
v = eps - x0), sampled on uniform times shifted toward noise. [dev] shifts by the image's
size (diffusers' dynamic shifting, ComfyUI's ``ModelSamplingFlux``) and takes its guidance as
an input (no CFG pass); [schnell] is unshifted and unguided."""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .core import (
    MODEL_READERS,
    Family,
    FamilyError,
    RectifiedFlow,
    TransformerNetwork,
    register,
)

# The schedulers as diffusers ships them: black-forest-labs/FLUX.1-dev and FLUX.1-schnell,
# scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler). The two differ in
# shift and use_dynamic_shifting only; with dynamic shifting the static shift is unused.
FLUX_DEV_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                      "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
# [dev]'s embedded guidance: diffusers' FluxPipeline guidance_scale default and the model card's
# example (black-forest-labs/FLUX.1-dev: guidance_scale=3.5); ComfyUI's Flux.extra_conds default.
FLUX_GUIDANCE = 3.5
# Latent pixels per token side: the VAE's 8x, then Flux's 2x2 patches.
PIXELS_PER_TOKEN = 16

# LoRA targets, as module names inside ComfyUI's Flux (comfy/ldm/flux/layers.py; the keys
# comfy/lora.py model_lora_keys_unet maps for "diffusion_model.double_blocks.N.<name>.weight"
# and "...single_blocks.N.<name>.weight"). "attention+mlp": every linear of both stream kinds;
# "all" adds the per-block modulation (adaLN) projections.
DOUBLE_BLOCK_TARGETS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                        "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
SINGLE_BLOCK_TARGETS = ("linear1", "linear2")
MODULATION_TARGETS = ("img_mod.lin", "txt_mod.lin", "modulation.lin")
# "dmd2" is the family's default set (every attention and MLP linear, as FastGen's and the DMD2
# LoRA's layouts adapt attention and MLPs); "all" adds the modulation and the input, time,
# vector, guidance and output projections (the digits' 1-step student needed their UNet
# counterparts).
EMBEDDING_TARGETS = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                     "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
                     "final_layer.adaLN_modulation.1")
FLUX_TARGET_SETS = {"dmd2": DOUBLE_BLOCK_TARGETS + SINGLE_BLOCK_TARGETS,
                    "attention+mlp": DOUBLE_BLOCK_TARGETS + SINGLE_BLOCK_TARGETS,
                    "all": DOUBLE_BLOCK_TARGETS + SINGLE_BLOCK_TARGETS + MODULATION_TARGETS + EMBEDDING_TARGETS}


def calculate_shift(image_seq_len: int, config: dict = FLUX_DEV_SCHEDULER) -> float:
    """mu of diffusers' ``calculate_shift``: linear in the token count between (256, 0.5) and
    (4096, 1.15); ComfyUI's ModelSamplingFlux node computes the same from width and height."""
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return image_seq_len * slope + config["base_shift"] - slope * config["base_image_seq_len"]


def image_seq_len(width: int, height: int) -> int:
    """Flux's token count for an image of width x height pixels."""
    return (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)


def dev_shift(width: int = 1024, height: int = 1024) -> float:
    """[dev]'s multiplicative shift exp(mu) at an image size (3.16 at 1024 px)."""
    return math.exp(calculate_shift(image_seq_len(width, height)))


class _ResidualCopy(torch.Tensor):
    """A tensor whose ``+=`` returns a new tensor. ComfyUI's Flux blocks add their residuals in
    place (``img += ...``, inference code), which autograd refuses: the norms that read the old
    value keep it for backward. Operations on it give tensors of this class (torch's default
    ``__torch_function__``), so every residual add inside a block is out of place."""

    def __iadd__(self, other):
        return self + other


class _FakeResidualCopy(_ResidualCopy, FakeTensor):
    """The same for the fake tensors of the memory estimate (``FakeTensorMode``), which cannot be
    re-wrapped (``as_subclass``) and whose operations give plain fake tensors: the class of a
    view is set instead, and each ``+=`` result gets it too."""

    def __iadd__(self, other):
        return _as_class(FakeTensor.__add__(self, other), _FakeResidualCopy)


def _as_class(t, cls):
    t.__class__ = cls
    return t


_STREAMS = ("img", "txt", "x")  # the double blocks' two streams, the single blocks' one


def _residual_copy(v):
    if type(v) is torch.Tensor:
        return v.as_subclass(_ResidualCopy)
    if type(v) is FakeTensor:  # a view: the caller's tensor keeps its class
        return _as_class(v.view_as(v), _FakeResidualCopy)
    return v


def _plain(v):
    if type(v) is _FakeResidualCopy:
        return _as_class(v, FakeTensor)  # a result made inside the block: no one else holds it
    return v.as_subclass(torch.Tensor) if isinstance(v, _ResidualCopy) else v


def _residuals_out_of_place(module, args, kwargs):
    """Forward pre-hook of a Flux block while gradients are on: its streams as _ResidualCopy."""
    if not torch.is_grad_enabled():
        return None
    return (_residual_copy(args[0]), *args[1:]) if args else args, {k: _residual_copy(v) if k in _STREAMS else v for k, v in kwargs.items()}


def _plain_outputs(module, args, kwargs, output):
    """Forward hook: the block's outputs back as plain tensors (the rest of the model's in-place
    code runs on them as ComfyUI wrote it)."""
    return tuple(_plain(v) for v in output) if isinstance(output, tuple) else _plain(output)


class FluxNetwork(TransformerNetwork):
    """ComfyUI's Flux (``comfy.ldm.flux.model.Flux``): called on flow time t in [0, 1] with the
    text tokens as ``context``, the pooled vector as ``y`` and the embedded ``guidance``; LoRA
    targets are its own module paths, which ComfyUI's loader maps from kohya keys
    (``lora_unet_double_blocks_0_img_attn_qkv``); the GAN head reads the image tokens leaving
    the last double-stream block (the middle of the network by compute), on the token grid."""

    target_sets = FLUX_TARGET_SETS

    def forward(self, module, x_t, t, context, y, guidance, options):
        if guidance is not None:
            guidance = torch.full((x_t.shape[0],), float(guidance), device=x_t.device)
        return module(x_t, t, context, y=y, guidance=guidance, transformer_options=options)

    def training_hooks(self, module):
        handles = []
        for block in self._blocks(module):
            handles.append(block.register_forward_pre_hook(_residuals_out_of_place, with_kwargs=True))
            handles.append(block.register_forward_hook(_plain_outputs, with_kwargs=True))
        return handles

    def _blocks(self, module):
        blocks = self.checkpoint_blocks()
        return [m for m in module.modules() if isinstance(m, blocks)]

    def checkpoint_blocks(self):
        from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock

        return (DoubleStreamBlock, SingleStreamBlock)

    def gan_block(self, module):
        return module.double_blocks[-1]


FLUX_NETWORK = FluxNetwork()

# Built at import (as sd.py's): a first use under FakeTensorMode would cache fake tensors.
_DEV_PROCESS = RectifiedFlow(dev_shift())
_SCHNELL_PROCESS = RectifiedFlow(FLUX_SCHNELL_SCHEDULER["shift"])

# T5-XXL's 4096-wide tokens, CLIP-L's 768 pooled vector; no negative prompt (guidance is an input).
_FLUX = {"prediction": "flow", "resolution": 1024, "context_dim": 4096, "text_encoders": ("t5xxl", "clip_l"),
         "pooled": True, "uncond": "none", "network": FLUX_NETWORK}
FLUX_DEV = register(Family("flux_dev", "Flux.1 [dev]", guidance=FLUX_GUIDANCE, make_process=lambda zsnr: _DEV_PROCESS,
                           **_FLUX))
FLUX_SCHNELL = register(Family("flux_schnell", "Flux.1 [schnell]", make_process=lambda zsnr: _SCHNELL_PROCESS, **_FLUX))


def flow_process(model_sampling) -> RectifiedFlow:
    """The RectifiedFlow of a ComfyUI flow ``model_sampling``: ModelSamplingFlux (its shift is
    mu: exp(mu) here) or ModelSamplingDiscreteFlow (a multiplicative shift), each with CONST's
    x = (1-sigma)*x0 + sigma*noise; FamilyError naming the class otherwise."""
    import comfy.model_sampling as ms

    kind = type(model_sampling)
    name = f"{kind.__name__} ({', '.join(c.__name__ for c in kind.__mro__[1:3])})"
    if not isinstance(model_sampling, ms.CONST) or any(
            getattr(kind, f) is not getattr(ms.CONST, f) for f in ("calculate_denoised", "noise_scaling", "calculate_input")):
        raise FamilyError(f"this flow model samples with {name}, not rectified flow x = (1-t)*x0 + t*noise")
    if isinstance(model_sampling, ms.ModelSamplingFlux) and kind.sigma is ms.ModelSamplingFlux.sigma:
        return RectifiedFlow(math.exp(float(model_sampling.shift)))
    if isinstance(model_sampling, ms.ModelSamplingDiscreteFlow) and kind.sigma is ms.ModelSamplingDiscreteFlow.sigma:
        return RectifiedFlow(float(model_sampling.shift))
    raise FamilyError(f"this flow model samples with {name}, not ModelSamplingFlux or ModelSamplingDiscreteFlow")


def flux_family(base_model, model_sampling) -> Family | None:
    """FLUX_DEV or FLUX_SCHNELL (on the model's own, possibly patched, flow sampling) for a
    ComfyUI Flux.1 BaseModel; None for any other model (Flux.2, Chroma, inpainting: not these)."""
    import comfy.model_base as mb
    import comfy.supported_models as sm

    config = getattr(base_model, "model_config", None)
    if (not isinstance(base_model, mb.Flux) or not isinstance(config, sm.Flux)
            or isinstance(config, (sm.FluxInpaint, sm.Flux2)) or type(base_model) is not mb.Flux):
        return None
    family = FLUX_SCHNELL if isinstance(config, sm.FluxSchnell) else FLUX_DEV
    return family.with_process(flow_process(model_sampling))


MODEL_READERS.append(flux_family)
