"""Flux.1 [dev] and [schnell]: rectified flow (x_t = (1-t)*x0 + t*eps, the network predicts
v = eps - x0), sampled on uniform times shifted toward noise. [dev] shifts by the image's
size (diffusers' dynamic shifting, ComfyUI's ``ModelSamplingFlux``) and takes its guidance as
an input (no CFG pass); [schnell] is unshifted and unguided."""

from __future__ import annotations

import math

from .core import MODEL_READERS, Family, FamilyError, RectifiedFlow, register

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
FLUX_TARGET_SETS = {"attention+mlp": DOUBLE_BLOCK_TARGETS + SINGLE_BLOCK_TARGETS,
                    "all": DOUBLE_BLOCK_TARGETS + SINGLE_BLOCK_TARGETS + MODULATION_TARGETS}


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


# Built at import (as sd.py's): a first use under FakeTensorMode would cache fake tensors.
_DEV_PROCESS = RectifiedFlow(dev_shift())
_SCHNELL_PROCESS = RectifiedFlow(FLUX_SCHNELL_SCHEDULER["shift"])

# T5-XXL's 4096-wide tokens, CLIP-L's 768 pooled vector; no negative prompt (guidance is an input);
# gan_block: where the trainer's GAN head will read image tokens (not used yet: no flow trainer).
_FLUX = {"prediction": "flow", "resolution": 1024, "context_dim": 4096, "text_encoders": ("t5xxl", "clip_l"),
         "pooled": True, "uncond": "none", "gan_block": "double_blocks"}
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
        raise FamilyError(f"this Flux model samples with {name}, not rectified flow x = (1-t)*x0 + t*noise")
    if isinstance(model_sampling, ms.ModelSamplingFlux) and kind.sigma is ms.ModelSamplingFlux.sigma:
        return RectifiedFlow(math.exp(float(model_sampling.shift)))
    if isinstance(model_sampling, ms.ModelSamplingDiscreteFlow) and kind.sigma is ms.ModelSamplingDiscreteFlow.sigma:
        return RectifiedFlow(float(model_sampling.shift))
    raise FamilyError(f"this Flux model samples with {name}, not ModelSamplingFlux or ModelSamplingDiscreteFlow")


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
