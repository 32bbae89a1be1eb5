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

import torch
from comfy_api.latest import io
from tqdm.auto import trange

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from .schedules import (
    check_model_sampling,
    custom_timesteps_input,
    preset_input,
    schedule_sigmas,
    validate_custom_text,
)

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
    extra_args = {} if extra_args is None else extra_args
    model_sampling = find_model_sampling(model)
    if noise_sampler is None:
        noise_sampler = fresh_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] > 0:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            if model_sampling is not None:
                x = model_sampling.noise_scaling(sigmas[i + 1], noise, denoised)
            else:
                x = denoised + sigmas[i + 1] * noise
        else:
            x = denoised
    return x


class DMD2KSampler(comfy.samplers.KSAMPLER):
    """KSAMPLER running sample_dmd2 that starts generation from unit-variance noise at any
    first timestep. With a non-empty latent (img2img, inpainting) the start is the stock
    forward-noised latent + sigma * noise instead, which is also what DMD2 trains on."""

    def __init__(self):
        super().__init__(sample_dmd2)
        self._from_pure_noise = True

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        check_model_sampling(model_wrap.inner_model.model_sampling)
        # ComfyUI runs one prompt at a time; max_denoise below reads this during super().sample.
        self._from_pure_noise = latent_image is None or torch.count_nonzero(latent_image).item() == 0
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    def max_denoise(self, model_wrap, sigmas):
        return self._from_pure_noise


def dmd2_ksampler() -> DMD2KSampler:
    """A SAMPLER object for SamplerCustom / SamplerCustomAdvanced (use cfg 1.0)."""
    return DMD2KSampler()


class PositiveOnlyGuider(comfy.samplers.CFGGuider):
    """cfg 1.0 with no negative conditioning: one UNet evaluation per step."""

    def set_conds(self, positive):
        self.inner_set_conds({"positive": positive})


def generate(model, positive, latent: dict, seed: int, sigmas: torch.Tensor, cfg: float = 1.0, negative=None) -> dict:
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
    result = guider.sample(noise, samples, dmd2_ksampler(), sigmas, denoise_mask=latent.get("noise_mask"),
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
        sigmas = schedule_sigmas(model, preset, custom_timesteps)
        return io.NodeOutput(generate(model, positive, latent_image, seed, sigmas, cfg, negative))


NODE_CLASSES = [DMD2Sampler, DMD2Generate]
