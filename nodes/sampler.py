"""The DMD2 few-step sampler: predict x0, re-noise to the next timestep with fresh noise.

DMD2 generators are trained (backward simulation) on inputs x_t = x0_hat + sigma_t * eps
with eps independent of everything before, and on pure unit-variance noise at the first
timestep whatever that timestep is (399 for the 1-step models). Two consequences for
ComfyUI's machinery:

- the start latent must be sqrt(1 + sigma^2) * eps (unit variance once ComfyUI divides by
  sqrt(1 + sigma^2)); stock samplers scale by sigma unless sigma is the table's maximum, so
  a 1-step schedule at 399 would feed the UNet 0.76 * eps;
- the re-noise draws must be fresh: ComfyUI's default noise sampler is seeded with the same
  seed as the start noise, so on CPU its first re-noise draw repeats the start noise.

No CFG (DMD2 bakes guidance in): at cfg 1.0 ComfyUI runs one UNet evaluation per step.
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io
from tqdm.auto import trange

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..bases import PREDICTIONS, FamilyError, family_of, flux, sampling_label
from .families import (
    FAMILY_NAMES,
    FLOW_RULES,
    STARTS_FROM_SIGMA,
    UPDATE_RULES,
    ZSNR_TERMINAL_ALPHA_CUMPROD,
    custom_rule,
    prediction_notes,
    sampling_notes,
)
from .releases import model_lora_samplings, model_releases
from .schedules import (
    CUSTOM,
    PRESET_NAMES,
    as_x0_model,
    UnsupportedModelError,
    check_model_sampling,
    check_preset_fits,
    custom_timesteps_input,
    flow_sigmas,
    is_flow,
    preset_input,
    preset_recipe,
    sampling_of,
    sigmas_for_timesteps,
    validate_custom_text,
)

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def renoise_seed(seed: int) -> int:
    """The seed of the re-noise stream, derived from the sampling seed so that its draws do
    not replay the start noise (which ComfyUI draws from the sampling seed itself)."""
    # One step of a 64-bit LCG (Knuth's MMIX constants), then a xor-shift to mix high bits down.
    mixed = (int(seed) * 6364136223846793005 + 1442695040888963407) & _MASK64
    return (mixed ^ (mixed >> 29)) & _MASK64


def fresh_noise_sampler(x: torch.Tensor, seed: int | None = None):
    """noise_sampler(sigma, sigma_next) -> unit Gaussian like x, from the re-noise stream of
    ``seed`` (deterministic), or from torch's global generator when seed is None."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(renoise_seed(seed))

    def noise_sampler(sigma, sigma_next):
        return torch.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return noise_sampler


def find_model_sampling(model):
    """The model_sampling object behind a k-diffusion denoiser as ComfyUI hands it to
    samplers (KSamplerX0Inpaint -> guider -> BaseModel), or None for a plain denoiser."""
    current = model
    for _ in range(5):
        found = getattr(current, "model_sampling", None)
        if found is not None:
            return found
        current = getattr(current, "inner_model", None)
        if current is None:
            break
    return None


@torch.no_grad()
def sample_dmd2(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DMD2 multi-step sampling (k-diffusion signature): for each sigma, predict x0, then
    forward-noise it to the next sigma with a fresh draw; the last step returns x0.

    ``x`` is the start latent already scaled for the first sigma (DMD2KSampler does this).
    ``model`` is ComfyUI's wrapped model, or any k-diffusion denoiser ``model(x, sigma) -> x0``
    (then the re-noise is the k-diffusion forward process x0 + sigma * noise).
    """
    return sample_few_step(model, x, sigmas, extra_args, callback, disable, noise_sampler, rule="dmd2")


def lcm_boundary_scalings(timestep: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's consistency boundary condition (c_skip, c_out) at an integer timestep."""
    scaled = timestep.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.float(), c_out.float()


@torch.no_grad()
def sample_few_step(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                    rule: str = "dmd2", gamma: float = 0.0):
    """Few-step sampling with one release family's update rule (nodes/families.py), one model
    evaluation per sigma, in ComfyUI's sigma space (x = x0 + sigma * eps; the model sees
    x / sqrt(1 + sigma^2), i.e. the VP sample diffusers' schedulers hold).

    - dmd2 / lcm: x0 (lcm: c_skip * x_vp + c_out * x0), re-noised to the next sigma with fresh noise;
    - euler: x0 + (x - x0) * sigma_next / sigma (deterministic);
    - euler_ancestral: Euler to sigma_down, then sigma_up * fresh noise (diffusers' split);
    - tcd: x_s = x0 + sigma_s * eps at s = floor((1 - gamma) * t_next), then fresh noise up to
      sigma_next; the last step returns the VP sample at s (timestep 0 when t_next is 0, as
      diffusers' TCD and DDIM with set_alpha_to_one=False do). gamma 0 is DDIM.
    """
    extra_args = {} if extra_args is None else extra_args
    model_sampling = find_model_sampling(model)
    if rule != "dmd2" and model_sampling is None:
        raise ValueError(f"the {rule} update needs a ComfyUI model with a sigma table")
    terminal = zero_snr_terminal(model_sampling, rule)
    if noise_sampler is None:
        noise_sampler = fresh_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        sigma_rule = sigma  # the sigma the rule steps from: the card's own at a ZTSNR terminal step
        if terminal is not None and int(model_sampling.timestep(sigma)) == terminal[0]:
            denoised, eps, sigma_rule = terminal[1](x, sigma, denoised)
        else:
            eps = (x - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        last = not sigma_next > 0
        if rule in ("dmd2", "lcm"):
            if rule == "lcm":
                c_skip, c_out = lcm_boundary_scalings(model_sampling.timestep(sigma))
                denoised = c_out * denoised + c_skip * x / (1.0 + sigma**2) ** 0.5
            if last:
                x = denoised
            elif model_sampling is not None:
                x = model_sampling.noise_scaling(sigma_next, noise_sampler(sigma, sigma_next), denoised)
            else:
                x = denoised + sigma_next * noise_sampler(sigma, sigma_next)
        elif rule == "euler":
            x = denoised + eps * sigma_next
        elif rule == "euler_ancestral":
            # The split in float64: from a large sigma (4096 at a ZTSNR model's first step)
            # sigma_down^2 = sigma_next^2 - sigma_up^2 is ~1e-7 of either, below float32's digits.
            s_from, s_to = sigma_rule.double(), sigma_next.double()
            sigma_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
            sigma_down = (s_to**2 - sigma_up**2) ** 0.5
            x = denoised + eps * sigma_down.to(x.dtype)
            if not last:
                x = x + noise_sampler(sigma, sigma_next) * sigma_up.to(x.dtype)
        elif rule == "tcd":
            t_next = 0 if last else int(model_sampling.timestep(sigma_next).round().item())
            sigma_s = model_sampling.sigmas[int((1.0 - gamma) * t_next)].to(x)
            x = denoised + sigma_s * eps
            if last:
                x = x / (1.0 + sigma_s**2) ** 0.5
            elif gamma > 0:
                x = x + (sigma_next**2 - sigma_s**2).clamp(min=0) ** 0.5 * noise_sampler(sigma, sigma_next)
        else:
            raise ValueError(f"unknown update rule {rule!r}")
    return x


def zero_snr_terminal(model_sampling, rule: str):
    """(last timestep, fix) for a zero-terminal-SNR v or x0 model, else None. ComfyUI keeps the
    last sigma finite (4519: alpha 2.2e-4); ``fix(x, sigma, denoised) -> (x0, eps, sigma')``
    redoes that step at the abar of the rule's card scheduler (0 for DMD2/LCM/TCD/DDIM: x0 = -v,
    eps = the input; sigma' its sigma, used by the ancestral split), from the network's output. An eps model has no finite x0 there
    (x0 = (x - sigma*eps)/alpha): ComfyUI's finite value stays."""
    if model_sampling is None or isinstance(model_sampling, comfy.model_sampling.CONST):
        return None  # flow: no terminal SNR question (the model was checked before sampling)
    prediction, zsnr, _ = sampling_of(model_sampling)
    if not zsnr or prediction == "eps":
        return None
    abar = torch.tensor(ZSNR_TERMINAL_ALPHA_CUMPROD.get(rule, 0.0), dtype=torch.float64)
    alpha, sig = abar.sqrt(), (1 - abar).sqrt()

    output = PREDICTIONS[prediction]

    def fix(x, sigma, denoised):
        comfy_sigma = sigma.double()
        scale = (1.0 + comfy_sigma**2) ** 0.5  # ComfyUI's x = x_vp * scale: its (alpha, sigma) are (1, sigma) / scale
        x_vp = x.double() / scale
        raw = output.from_x0(x_vp, denoised.double(), 1.0 / scale, comfy_sigma / scale)  # the network's own output
        x0 = output.to_x0(x_vp, raw, alpha, sig)
        eps = PREDICTIONS["eps"].from_x0(x_vp, x0, alpha, sig)
        return x0.to(x.dtype), eps.to(x.dtype), (sig / alpha).to(sigma)

    return len(model_sampling.sigmas) - 1, fix


class DMD2KSampler(comfy.samplers.KSAMPLER):
    """KSAMPLER running sample_few_step (the DMD2 update unless another rule is given) that
    starts generation from unit-variance noise at any first timestep, or, for the rules of
    diffusers' trailing Euler schedulers, from sigma * noise as they do. With a non-empty
    latent (img2img, inpainting) the start is the stock forward-noised latent + sigma * noise
    instead, which is also what DMD2 trains on."""

    def __init__(self, rule: str = "dmd2", gamma: float = 0.0):
        super().__init__(sample_few_step, extra_options={"rule": rule, "gamma": gamma})
        self.rule = rule
        self._from_pure_noise = True

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        model_sampling = model_wrap.inner_model.model_sampling
        if is_flow(model_wrap.inner_model, model_sampling):
            check_flow_rule(self.rule)
        else:
            check_model_sampling(model_sampling)
        # ComfyUI runs one prompt at a time; max_denoise below reads this during super().sample.
        self._from_pure_noise = latent_image is None or torch.count_nonzero(latent_image).item() == 0
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    def max_denoise(self, model_wrap, sigmas):
        return self._from_pure_noise and self.rule not in STARTS_FROM_SIGMA


def check_flow_rule(rule: str) -> None:
    """A flow model samples with the flow rules only (lcm/tcd are DDPM-table updates)."""
    if rule not in FLOW_RULES:
        raise UnsupportedModelError(f"the {rule} update is for SD-family models; a flow (Flux.1) model samples with "
                                    f"{' or '.join(FLOW_RULES)}")


def dmd2_ksampler(rule: str = "dmd2", gamma: float = 0.0) -> DMD2KSampler:
    """A SAMPLER object for SamplerCustom / SamplerCustomAdvanced (use cfg 1.0)."""
    if rule not in UPDATE_RULES:
        raise ValueError(f"unknown update rule {rule!r}; choose one of {list(UPDATE_RULES)}")
    return DMD2KSampler(rule, gamma)


class PositiveOnlyGuider(comfy.samplers.CFGGuider):
    """cfg 1.0 with no negative conditioning: one UNet evaluation per step."""

    def set_conds(self, positive):
        self.inner_set_conds({"positive": positive})


def generate(model, positive, latent: dict, seed: int, sigmas: torch.Tensor, cfg: float = 1.0, negative=None,
             rule: str = "dmd2", gamma: float = 0.0) -> dict:
    """Sample a LATENT with the DMD2 sampler. Noise comes from the seed exactly as in
    SamplerCustom (add_noise on), so this equals SamplerCustom + DMD2Sampler at the same cfg.
    cfg 1.0 (DMD2 as distilled): the positive prompt alone, one UNet evaluation per step.
    Above 1 (the 4-step LoRA at 8 steps and cfg 1.4-1.8 on finetunes, as model cards advise):
    classifier-free guidance with ``negative``, two evaluations per step."""
    if cfg != 1.0 and negative is None:
        raise ValueError(f"cfg {cfg} needs a negative conditioning: connect one (an empty prompt will do), or set cfg to 1.0")
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    out = latent.copy()
    out["samples"] = samples
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    steps = sigmas.shape[-1] - 1
    callback = latent_preview.prepare_callback(model, steps)
    if cfg == 1.0:
        guider = PositiveOnlyGuider(model)
        guider.set_conds(positive)
    else:
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    result = guider.sample(noise, samples, dmd2_ksampler(rule, gamma), sigmas, denoise_mask=latent.get("noise_mask"),
                           callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out["samples"] = result.to(comfy.model_management.intermediate_device())
    return out


# -- nodes ----------------------------------------------------------------------------------

class DMD2Sampler(io.ComfyNode):
    """The DMD2 update as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMD2Sampler",
            display_name="DMD2 Sampler",
            category="DMD2/sampling",
            description="Predict x0, re-noise with fresh noise; starts from unit-variance noise at any first timestep. "
                        "Use with DMD2Schedule sigmas and cfg 1.0.",
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(dmd2_ksampler())


class DMD2Generate(io.ComfyNode):
    """All-in-one DMD2 sampling: schedule, noise from the seed, sampler, no CFG."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMD2Generate",
            display_name="DMD2 Generate",
            category="DMD2/sampling",
            description="Few-step DMD2 sampling: at cfg 1.0 (the default, as DMD2 is distilled) one UNet evaluation per "
                        "step and no negative prompt; above 1.0 classifier-free guidance with the negative prompt.",
            inputs=[
                io.Model.Input("model", tooltip="A DMD2-distilled model (DMD2 UNet or base model + DMD2 LoRA)."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Used only when cfg is above 1.0 (DMD2 itself needs no negative prompt)."),
                io.Latent.Input("latent_image", tooltip="The latent to generate into, e.g. from EmptyLatentImage."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the start noise (the same noise SamplerCustom draws) and of the re-noise draws."),
                preset_input(),
                custom_timesteps_input(),
                io.Float.Input("cfg", default=1.0, min=1.0, max=30.0, step=0.05, round=0.01, optional=True,
                               tooltip="1.0: no classifier-free guidance, one UNet evaluation per step (DMD2 as distilled). "
                                       "Above 1.0 (e.g. 1.5 with the DMD2 4-step LoRA at 8 steps on a finetune): two "
                                       "evaluations per step, with the negative prompt."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, preset, custom_timesteps) -> bool | str:
        return validate_custom_text(preset, custom_timesteps)

    @classmethod
    def execute(cls, model, positive, latent_image, seed, preset, custom_timesteps, cfg=1.0, negative=None) -> io.NodeOutput:
        model, recipe, sigmas, notes = prepare(model, preset, custom_timesteps, latent_image["samples"].shape)
        if recipe.prediction == "flow":
            positive, guidance_notes = with_guidance(positive, recipe)
            negative = negative if negative is None else with_guidance(negative, recipe)[0]
            notes += guidance_notes
        for note in notes:
            log.warning("DMD2Generate: %s", note)
        latent = generate(model, positive, latent_image, seed, sigmas, cfg, negative, recipe.rule, recipe.gamma)
        # Always a "text" output, empty when there is nothing to say: the pack's frontend
        # extension (web/dmd2.js) replaces the node's note with it on every run, so a warning
        # of an earlier run never stays beside a setting that no longer warrants it.
        return io.NodeOutput(latent, ui={"text": notes})


def prepare(model, preset: str, custom_timesteps: str = "", latent_shape=None):
    """(model, recipe, sigmas, notes) for a preset: the recipe's timesteps on the model's own
    table, the model read as x0 where the recipe says so, and the warnings of sampling_notes.
    A custom list runs with the loaded release's update rule (DMD2's if none is known). A flow
    preset on a flow model: its times on the model's own shift (``flow_notes``); a preset of
    the other kind is refused in one line."""
    releases = model_releases(model)
    model_sampling = model.get_model_object("model_sampling")
    check_preset_fits(model, preset)
    if is_flow(model):
        recipe = preset_recipe(preset)
        sigmas = flow_sigmas(model_sampling, recipe)
        return model, recipe, sigmas, flow_notes(model, recipe, latent_shape)
    prediction, zsnr, process = sampling_of(model_sampling)
    rule, gamma = custom_rule(releases)
    recipe = preset_recipe(preset, custom_timesteps, rule, gamma, process.num_train_timesteps)
    notes = sampling_notes(recipe, releases, reads_x0=prediction == "x0")
    notes += prediction_notes(recipe, sampling_label(prediction, zsnr), zsnr, process.num_train_timesteps - 1,
                              model_lora_samplings(model))
    if recipe.prediction == "x0":
        model = as_x0_model(model)
    return model, recipe, sigmas_for_timesteps(model.get_model_object("model_sampling"), recipe.timesteps), notes


def flow_notes(model, recipe, latent_shape=None) -> list[str]:
    """A preset made on the other Flux.1 model ([dev] on schnell or the reverse), and a [dev]
    preset whose card shifts by the image size (diffusers' dynamic shifting) on a model whose
    sampling holds another size's shift: both run, on the model's own sampling."""
    notes = []
    try:
        family = family_of(model)
    except FamilyError:
        return notes  # another flow model (SD3, Flux.2 ...): the model's own sampling is all there is
    if family.name != recipe.base:
        made_on = flux.FLUX_DEV.label if recipe.base == "flux_dev" else flux.FLUX_SCHNELL.label
        notes.append(f"preset '{recipe.name}' is {FAMILY_NAMES[recipe.family]}'s, made on {made_on}, but this is a "
                     f"{family.label} model: it runs on this model's own schedule.")
    sampling = model.get_model_object("model_sampling")
    if recipe.base == "flux_dev" and family.name == "flux_dev" and latent_shape is not None and len(latent_shape) == 4:
        height, width = latent_shape[-2] * 8, latent_shape[-1] * 8
        card = flux.dev_shift(width, height)
        if abs(family.process.shift - card) > 1e-3 * card:
            notes.append(f"at {width}x{height} px the card's pipeline shifts Flux [dev]'s times by {card:.3f} (mu "
                         f"{flux.calculate_shift(flux.image_seq_len(width, height)):.3f}); this model's sampling shifts by "
                         f"{family.process.shift:.3f} (ModelSamplingFlux shift {float(sampling.shift):.3f}). Put a "
                         f"ModelSamplingFlux node (width {width}, height {height}) in front to sample as the card does.")
    return notes


def with_guidance(conditioning, recipe) -> tuple[list, list[str]]:
    """The conditioning with the preset's embedded guidance (the ``guidance`` key the stock
    FluxGuidance node sets) where it carries none; a value it carries is kept, with a note
    when it is not the card's."""
    if recipe.guidance is None:
        return conditioning, []
    out, notes = [], []
    for tensor, values in conditioning:
        values = dict(values)
        if "guidance" not in values:
            values["guidance"] = recipe.guidance
        elif values["guidance"] != recipe.guidance:
            notes.append(f"the conditioning carries guidance {values['guidance']} (FluxGuidance); preset '{recipe.name}' "
                         f"is sampled at {recipe.guidance} by its card: {values['guidance']} is used.")
        out.append([tensor, values])
    return out, sorted(set(notes))


class DMD2ReleaseSampler(io.ComfyNode):
    """The update rule of any preset's release family as a SAMPLER for SamplerCustom."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMD2ReleaseSampler",
            display_name="Few-Step Release Sampler",
            category="DMD2/sampling",
            description="The update rule of a few-step release (DMD2, SDXL-Lightning, Hyper-SD, LCM, TCD, SDXL-Turbo) "
                        "for SamplerCustom, with the same preset as DMD2Schedule; cfg 1.0. An x0 model "
                        "(SDXL-Lightning 1-step) must come from the DMD2 UNet Loader or DMD2Generate.",
            inputs=[
                io.Combo.Input("preset", options=PRESET_NAMES, default=PRESET_NAMES[0],
                               tooltip="The preset given to DMD2Schedule: picks the family's update rule."),
                io.Combo.Input("custom_rule", options=list(UPDATE_RULES), default="dmd2",
                               tooltip="Used only when preset is 'custom': dmd2/lcm re-noise x0 with fresh noise, "
                                       "euler / euler_ancestral as diffusers' trailing Euler schedulers, tcd with gamma "
                                       "(0 = DDIM)."),
                io.Float.Input("gamma", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="TCD's gamma (diffusers' eta), used only with preset 'custom' and rule tcd."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, preset, custom_rule, gamma) -> io.NodeOutput:
        if preset == CUSTOM:
            return io.NodeOutput(dmd2_ksampler(custom_rule, gamma if custom_rule == "tcd" else 0.0))
        recipe = preset_recipe(preset)
        return io.NodeOutput(dmd2_ksampler(recipe.rule, recipe.gamma))


NODE_CLASSES = [DMD2Sampler, DMD2Generate, DMD2ReleaseSampler]
