"""The Stable Diffusion UNet families: SD1.5, SD2.x and SDXL, eps or v prediction, with or
without zero terminal SNR. One DDPM process (1000 integer timesteps, "scaled linear" betas
0.00085..0.012), one UNet layout (LoRA targets, the mid-block for the GAN head)."""

from __future__ import annotations

import torch

from .core import PREDICTIONS, DiscreteVP, Family, FamilyError, Network, register

# The SD schedulers' config (diffusers scheduler_config.json of SD1.5, SD2.x and SDXL):
# num_train_timesteps 1000, beta_schedule "scaled_linear", beta_start 0.00085, beta_end 0.012.
TRAIN_TIMESTEPS, BETA_START, BETA_END = 1000, 0.00085, 0.012
# ComfyUI's terminal abar under zero terminal SNR (comfy/model_sampling.py keeps sigma finite,
# about 4519, where diffusers' rescale_zero_terminal_snr makes abar exactly 0).
COMFY_ZSNR_TERMINAL_ALPHA_CUMPROD = 4.8973451890853435e-08

# LoRA target sets of an SD-style UNet, as diffusers module names. "dmd2": the released DMD2
# SDXL LoRA's layers (design.md); "all" adds the input/output convolutions and the timestep
# and class/ADM embeddings, which the digits' 1-step student needs (docs/digits.md).
DMD2_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
EMBEDDING_TARGETS = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
                     "add_embedding.linear_1", "add_embedding.linear_2")
UNET_TARGET_SETS = {"dmd2": DMD2_TARGETS, "all": DMD2_TARGETS + EMBEDDING_TARGETS}


def scaled_linear_alphas_cumprod(num_train_timesteps: int = TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                                 beta_end: float = BETA_END) -> torch.Tensor:
    """abar of SD's "scaled linear" schedule (betas linear in sqrt space), float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def zero_terminal_snr(alphas_cumprod: torch.Tensor, terminal: float = COMFY_ZSNR_TERMINAL_ALPHA_CUMPROD) -> torch.Tensor:
    """Lin et al. 2024's rescale (sqrt(abar) shifted to 0 at the last step, scaled to keep the
    first), with ComfyUI's finite terminal value (``terminal=0`` gives diffusers' exact zero)."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    out = root**2
    out[-1] = terminal
    return out


def mid_block_size(unet_config, latent_shape) -> tuple[int, int]:
    """(h, w) of the UNet's mid-block map for latents of ``latent_shape`` (C, H, W): one
    stride-2 downsampling per level after the first."""
    h, w = int(latent_shape[-2]), int(latent_shape[-1])
    for _ in range(len(unet_config["channel_mult"]) - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


class UNetNetwork(Network):
    """ComfyUI's SD-style ``UNetModel``: called on integer DDPM timesteps with cross-attention
    ``context`` and the ``y`` vector; LoRA targets and kohya names from diffusers' module
    paths (``comfy.utils.unet_to_diffusers``); the GAN head reads the mid block's last layer."""

    target_sets = UNET_TARGET_SETS

    def weight_paths(self, module, config):
        import comfy.utils

        mapping = comfy.utils.unet_to_diffusers(dict(config))
        if not mapping:
            raise FamilyError("this UNet config has no diffusers mapping (not an SD1.5/SDXL-style UNet)")
        return {d[: -len(".weight")]: ldm[: -len(".weight")] for d, ldm in mapping.items() if d.endswith(".weight")}

    def forward(self, module, x_t, t, context, y, guidance, options):
        return module(x_t, t, context=context, y=y, transformer_options=options)

    def checkpoint_blocks(self):
        from comfy.ldm.modules.attention import SpatialTransformer
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        return (ResBlock, SpatialTransformer)

    def gan_block(self, module):
        return module.middle_block[-1]

    def gan_map(self, output, latent_shape):
        return output

    def gan_shape(self, module, config, latent_shape):
        return self.gan_block(module).out_channels, mid_block_size(config, latent_shape)


UNET = UNetNetwork()

# Built at import, not on first use: a first use under --estimate's FakeTensorMode would
# otherwise cache a process of fake tensors for every later real run.
_SD_ALPHAS_CUMPROD = scaled_linear_alphas_cumprod()
_SD_PROCESSES = {False: DiscreteVP(_SD_ALPHAS_CUMPROD), True: DiscreteVP(zero_terminal_snr(_SD_ALPHAS_CUMPROD))}


def _sd_process(zsnr: bool) -> DiscreteVP:
    return _SD_PROCESSES[bool(zsnr)]


SD15 = register(Family("sd15", "SD1.5", resolution=512, context_dim=768, text_encoders=("clip_l",),
                       uncond="empty", one_step_timestep=999, network=UNET, make_process=_sd_process))
SD2 = register(Family("sd2", "SD2.x", resolution=512, context_dim=1024, text_encoders=("open_clip_h",),
                      uncond="empty", one_step_timestep=999, network=UNET, make_process=_sd_process))
SDXL = register(Family("sdxl", "SDXL", resolution=1024, context_dim=2048, text_encoders=("clip_l", "clip_g"),
                       pooled=True, uncond="zeros", one_step_timestep=399, network=UNET, make_process=_sd_process))
# SD2.x 768-v checkpoints are v-prediction at 768 px; its 512-base is eps at 512 px.
V_RESOLUTION = {"sd2": 768}


def default_resolution(family: Family) -> int:
    return V_RESOLUTION.get(family.name, family.resolution) if family.prediction == "v" else family.resolution


# -- reading a ComfyUI model --------------------------------------------------------------------

def discrete_sampling(model_sampling) -> tuple[str, bool, DiscreteVP]:
    """(prediction, zsnr, process) of a ComfyUI ``model_sampling`` on a discrete DDPM table
    (ModelSamplingDiscrete with EPS, V_PREDICTION or X0; checkpoint keys or the
    ModelSamplingDiscrete node alike). Refuses, naming the class, every other sampling:
    continuous EDM, flow (CONST), Stable Cascade, the 50-step 'lcm' grid."""
    import comfy.model_sampling as ms

    name = type(model_sampling).__name__
    bases = ", ".join(c.__name__ for c in type(model_sampling).__mro__[1:3])
    discrete = isinstance(model_sampling, ms.ModelSamplingDiscrete)
    if not discrete or type(model_sampling).sigma is not ms.ModelSamplingDiscrete.sigma:
        raise FamilyError(f"this model samples with {name} ({bases}), not a discrete SD-style timestep table "
                          "(flow, EDM and Stable Cascade models are not supported)")
    kind = type(model_sampling)
    if (not isinstance(model_sampling, ms.EPS) or kind.noise_scaling is not ms.EPS.noise_scaling
            or kind.calculate_input is not ms.EPS.calculate_input):
        raise FamilyError(f"this model samples with {name} ({bases}), not the DDPM forward process x = x0 + sigma*noise")
    denoised = kind.calculate_denoised
    if denoised is ms.EPS.calculate_denoised:
        prediction = "eps"
    elif denoised is ms.V_PREDICTION.calculate_denoised:
        prediction = "v"
    elif denoised is ms.X0.calculate_denoised:
        prediction = "x0"
    else:
        raise FamilyError(f"this model samples with {name} ({bases}): its prediction type is none of {sorted(PREDICTIONS)}")
    table = getattr(model_sampling, "sigmas", None)
    if table is None or table.ndim != 1 or len(table) < 2:
        raise FamilyError("the model's sigma table is missing or too short")
    return prediction, bool(getattr(model_sampling, "zsnr", False)), DiscreteVP.from_sigmas(table)


def arch_of(base_model) -> str:
    """'sd15', 'sd2' or 'sdxl' for a ComfyUI text-to-image ``BaseModel``; FamilyError naming
    the family otherwise."""
    import comfy.model_base as mb
    import comfy.supported_models as sm

    config = base_model.model_config
    if isinstance(base_model, mb.SDXL) and isinstance(config, sm.SDXL):
        return "sdxl"
    if type(base_model) is mb.BaseModel and isinstance(config, sm.SD15):
        return "sd15"
    if type(base_model) is mb.BaseModel and isinstance(config, sm.SD20):  # not the unCLIP variants
        return "sd2"
    raise FamilyError(f"model family {type(config).__name__} is not supported yet: SD1.5, SD2.x and SDXL are")


def family_of(model) -> Family:
    """The family of a ComfyUI MODEL (ModelPatcher, with its model_sampling patches) or
    BaseModel, on the model's own sigma table (a flow model's: its own shift)."""
    base = getattr(model, "model", model)
    sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else base.model_sampling
    from .core import FAMILIES, MODEL_READERS

    for read in MODEL_READERS:  # the other families' modules (flux.py) first; SD's below
        family = read(base, sampling)
        if family is not None:
            return family
    arch = arch_of(base)
    prediction, zsnr, process = discrete_sampling(sampling)

    return FAMILIES[arch].with_sampling(prediction, zsnr).with_process(process)
