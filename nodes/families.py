"""How each few-step release family is sampled: timesteps, update rule, prediction type.

One ``Recipe`` per (family, step count) the authors published, each with the scheduler their
model card runs in diffusers (``source``), so that the pack samples every release exactly as
its authors do. The timesteps are computed the way those schedulers compute them (tests check
them against diffusers' own ``set_timesteps``):

- trailing spacing (SDXL-Lightning, Hyper-SD LoRAs, SDXL-Turbo): ``round(1000 - k*1000/N) - 1``,
  so 4 steps are 999,749,499,249 (ComfyUI's ``sgm_uniform`` gives 999,749,500,250, ``normal``
  999,666,333,0);
- the LCM/TCD grid: every 20th timestep of 1000 (19, 39, ..., 999), N of them evenly spaced by
  index, so 4 steps are 999,759,499,259.

Update rules (what one step does with the model's x0 prediction; ``nodes/sampler.py`` runs
them on ComfyUI's sigma table):

- ``dmd2``: x0, re-noised to the next timestep with fresh noise (DMD2);
- ``lcm``: the same on LCM's boundary-condition x0 (c_skip * x + c_out * x0, timestep scaling 10);
- ``euler``: deterministic Euler on the sigmas (diffusers' EulerDiscreteScheduler);
- ``euler_ancestral``: Euler with ancestral noise (EulerAncestralDiscreteScheduler);
- ``tcd``: TCD's strategic stochastic step with gamma (TCDScheduler's ``eta``); gamma 0 is
  DDIM (eta 0), which ends on the table's first timestep as the SD schedulers'
  ``set_alpha_to_one=False`` makes it.

Flow releases (Flux.1, ``FlowRecipe``): the card's FlowMatchEulerDiscreteScheduler as
FluxPipeline drives it, N times 1, (N-1)/N, ..., 1/N shifted by the model's own sampling
(ModelSamplingFlux: [dev]'s shift, resolution-dependent through the ModelSamplingFlux node;
[schnell]: unshifted), with the ``euler`` rule (the same arithmetic in flow time: x0 + (x -
x0) * t_next / t) or ``dmd2`` (x0 = x - t*v, then (1 - t_next)*x0 + t_next*fresh noise).

Pure data and integer arithmetic: importable without ComfyUI (the trailing rule is
``bases.trailing_timesteps``, the one the trainer's schedules use too).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..bases import trailing_timesteps  # the one copy (releases.py and the presets use it from here)

TRAIN_TIMESTEPS = 1000
UPDATE_RULES = ("dmd2", "lcm", "euler", "euler_ancestral", "tcd")
# diffusers' Euler schedulers with trailing spacing start from sigma_max * noise; the others
# (LCM, TCD, DDIM; DMD2's training) from unit-variance noise, sqrt(1 + sigma^2) * noise.
STARTS_FROM_SIGMA = frozenset({"euler", "euler_ancestral"})
# Zero terminal SNR: the abar each rule's card scheduler uses at the last timestep. diffusers'
# LCM, TCD and DDIM schedulers (and DMD2's, LCMScheduler) take rescale_zero_terminal_snr's exact
# 0 (alpha = 0: x0 = -v); its Euler schedulers clamp it to 2**-24 (sigma 4096) to keep sigma
# finite. ComfyUI's table holds 4.9e-8 (sigma 4519) for all; the sampler redoes that one step
# at the rule's value (docs/families.md, "Zero terminal SNR").
ZSNR_TERMINAL_ALPHA_CUMPROD = {"euler": 2.0**-24, "euler_ancestral": 2.0**-24}

FAMILY_NAMES = {
    "dmd2": "DMD2",
    "lightning": "SDXL-Lightning",
    "hyper": "Hyper-SD",
    "lcm": "LCM-LoRA",
    "tcd": "TCD",
    "turbo": "SDXL-Turbo",
    "schnell": "FLUX.1-schnell",
    "turbo_alpha": "FLUX.1-Turbo-Alpha",
    "hyper_flux": "Hyper-FLUX",
    "dmd2_flow": "DMD2 (flow)",
}


def lcm_timesteps(steps: int, original_steps: int = 50, train_timesteps: int = TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """LCMScheduler / TCDScheduler ``set_timesteps(N)``: N of the ``original_steps`` grid
    timesteps (k*T/original - 1), evenly spaced by index from the noisiest."""
    if not 1 <= steps <= original_steps:
        raise ValueError(f"steps must be in 1..{original_steps}, got {steps}")
    skip = train_timesteps // original_steps
    grid = [k * skip - 1 for k in range(original_steps, 0, -1)]
    # floor(linspace(0, len, N, endpoint=False)) in integers
    return tuple(grid[(i * original_steps) // steps] for i in range(steps))


@dataclass(frozen=True)
class Recipe:
    """One published way to sample a release family at one step count."""

    name: str  # the preset name shown in the sampler nodes
    family: str  # key of FAMILY_NAMES
    timesteps: tuple[int, ...]
    rule: str  # one of UPDATE_RULES
    gamma: float = 0.0  # TCD's gamma (diffusers' eta); 0 = DDIM
    prediction: str = "eps"  # "x0" for a UNet that predicts the clean sample (Lightning 1-step)
    source: str = ""  # the scheduler and settings of the release's model card

    @property
    def steps(self) -> int:
        return len(self.timesteps)


# The two DMD2 presets keep the names existing workflows use.
DMD2_FOUR_STEP = "4-step (999,749,499,249)"
DMD2_ONE_STEP = "1-step (399)"

_LIGHTNING_CARD = 'EulerDiscreteScheduler(timestep_spacing="trailing"), guidance_scale 0 (ByteDance/SDXL-Lightning)'
_HYPER_CARD = 'DDIMScheduler(timestep_spacing="trailing"), guidance_scale 0 (ByteDance/Hyper-SD)'
_LCM_CARD = "LCMScheduler, guidance_scale 1 (latent-consistency/lcm-lora-sdxl, lcm-lora-sdv1-5)"
_TCD_CARD = "TCDScheduler, eta (gamma) 0.3, guidance_scale 0 (h1t/TCD-SDXL-LoRA, h1t/TCD-SD15-LoRA)"
_TURBO_CARD = ("the repo's EulerAncestralDiscreteScheduler (trailing), guidance_scale 0 "
               "(stabilityai/sdxl-turbo)")


def _recipes() -> tuple[Recipe, ...]:
    out = [
        Recipe(DMD2_FOUR_STEP, "dmd2", (999, 749, 499, 249), "dmd2",
               source="LCMScheduler with timesteps [999, 749, 499, 249] (tianweiy/DMD2)"),
        Recipe(DMD2_ONE_STEP, "dmd2", (399,), "dmd2", source="LCMScheduler with timesteps [399] (tianweiy/DMD2)"),
        Recipe("SDXL-Lightning 1-step x0 (euler, 999)", "lightning", trailing_timesteps(1), "euler",
               prediction="x0", source=_LIGHTNING_CARD.replace(")", ', prediction_type="sample")', 1)),
    ]
    for n in (2, 4, 8):
        out.append(Recipe(f"SDXL-Lightning {n}-step (euler, trailing)", "lightning", trailing_timesteps(n), "euler",
                          source=_LIGHTNING_CARD))
    out += [
        Recipe("Hyper-SD 1-step UNet (lcm, 800)", "hyper", (800,), "lcm",
               source="LCMScheduler with timesteps [800], guidance_scale 0 (ByteDance/Hyper-SD, Hyper-SDXL-1step-Unet)"),
        Recipe("Hyper-SD 1-step LoRA (tcd, gamma 1.0)", "hyper", lcm_timesteps(1), "tcd", gamma=1.0,
               source="TCDScheduler, eta 1.0, guidance_scale 0 (ByteDance/Hyper-SD, 1-step unified LoRA)"),
    ]
    for n in (2, 4, 8):
        out.append(Recipe(f"Hyper-SD {n}-step LoRA (ddim, trailing)", "hyper", trailing_timesteps(n), "tcd",
                          source=_HYPER_CARD))
    for n in (2, 4, 8):
        out.append(Recipe(f"LCM {n}-step (lcm, {','.join(map(str, lcm_timesteps(n)))})", "lcm", lcm_timesteps(n), "lcm",
                          source=_LCM_CARD))
    for n in (2, 4, 8):
        out.append(Recipe(f"TCD {n}-step (tcd, gamma 0.3)", "tcd", lcm_timesteps(n), "tcd", gamma=0.3, source=_TCD_CARD))
    out.append(Recipe("SDXL-Turbo 1-step (euler ancestral, 999)", "turbo", trailing_timesteps(1), "euler_ancestral",
                      source=_TURBO_CARD))
    for n in (2, 4):
        out.append(Recipe(f"SDXL-Turbo {n}-step (euler ancestral, trailing)", "turbo", trailing_timesteps(n),
                          "euler_ancestral", source=_TURBO_CARD))
    return tuple(out)


RECIPES: tuple[Recipe, ...] = _recipes()
RECIPES_BY_NAME = {r.name: r for r in RECIPES}


FLOW_RULES = ("dmd2", "euler")


@dataclass(frozen=True)
class FlowRecipe:
    """One published way to sample a Flux.1 release: N steps on the card's time grid, shifted
    by the model's own sampling, with the card's embedded guidance."""

    name: str
    family: str  # key of FAMILY_NAMES
    base: str  # the bases family it was made on: "flux_dev" or "flux_schnell"
    steps: int
    rule: str  # one of FLOW_RULES
    guidance: float | None = None  # embedded guidance the card runs ([dev]); None: the model has no input
    lora_scale: float | None = None  # the strength the card loads the LoRA at (LoraLoaderModelOnly's)
    source: str = ""
    gamma: float = 0.0
    prediction: str = "flow"

    @property
    def times(self) -> tuple[float, ...]:
        """FluxPipeline's unshifted grid: linspace(1, 1/N, N) (float64, exact at k/N)."""
        return tuple(1.0 - k / self.steps for k in range(self.steps))

    timesteps = times  # what the SD recipes call it (the preset table lists it)


# The cards (tests/test_families_flux.py holds their literal constants):
_SCHNELL_CARD = ("FluxPipeline, num_inference_steps=4, guidance_scale=0.0 (black-forest-labs/FLUX.1-schnell; "
                 "scheduler_config.json: shift 1.0, no dynamic shifting)")
_TURBO_ALPHA_CARD = ("FluxPipeline (FLUX.1-dev) + the LoRA fused, num_inference_steps=8, guidance_scale=3.5, 1024x1024 "
                     "(alimama-creative/FLUX.1-Turbo-Alpha)")
_HYPER_FLUX_CARD = ("FluxPipeline (FLUX.1-dev) + fuse_lora(lora_scale=0.125), num_inference_steps={n}, guidance_scale=3.5 "
                    "(ByteDance/Hyper-SD, Hyper-FLUX.1-dev-{n}steps-lora.safetensors)")
# DMD2 in flow time: the flow-model DMD2 reports shift the student's times toward noise (DMD2
# issue #62: "shifting the conditional timesteps achieves better results"; no value given) and
# FastGen's Flux DMD2 config (configs/experiments/Flux/config_dmd2.py) gives none either (4
# student steps, guidance 3.5): the pack takes [dev]'s own dynamic shift (3.16 at 1024 px).
_DMD2_FLOW_CARD = ("DMD2 update in flow time: x0 = x - t*v, re-noised to t_next with fresh noise (diffusers' "
                   "FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)); [dev]'s shifted grid, guidance 3.5")

FLOW_RECIPES: tuple[FlowRecipe, ...] = (
    # the 1-step student's (the digits' Flux teacher, #25): x0 = x - v from pure noise at t = 1
    FlowRecipe("DMD2 flow 1-step (Flux dev shift)", "dmd2_flow", "flux_dev", 1, "dmd2", guidance=3.5, source=_DMD2_FLOW_CARD),
    FlowRecipe("DMD2 flow 4-step (Flux dev shift)", "dmd2_flow", "flux_dev", 4, "dmd2", guidance=3.5, source=_DMD2_FLOW_CARD),
    FlowRecipe("DMD2 flow 8-step (Flux dev shift)", "dmd2_flow", "flux_dev", 8, "dmd2", guidance=3.5, source=_DMD2_FLOW_CARD),
    FlowRecipe("FLUX.1-schnell 4-step (euler, unshifted)", "schnell", "flux_schnell", 4, "euler", source=_SCHNELL_CARD),
    FlowRecipe("FLUX.1-Turbo-Alpha 8-step (euler, dev shift, guidance 3.5)", "turbo_alpha", "flux_dev", 8, "euler",
               guidance=3.5, source=_TURBO_ALPHA_CARD),
    *(FlowRecipe(f"Hyper-FLUX {n}-step LoRA 0.125 (euler, dev shift, guidance 3.5)", "hyper_flux", "flux_dev", n, "euler",
                 guidance=3.5, lora_scale=0.125, source=_HYPER_FLUX_CARD.format(n=n)) for n in (8, 16)),
)
FLOW_RECIPES_BY_NAME = {r.name: r for r in FLOW_RECIPES}


def recipe_for(family: str, timesteps) -> Recipe | None:
    """The family's published recipe with exactly these timesteps, if any."""
    timesteps = tuple(timesteps)
    return next((r for r in RECIPES if r.family == family and r.timesteps == timesteps), None)


def custom_rule(releases) -> tuple[str, float]:
    """The update rule (and gamma) a custom timestep list runs with: the loaded release's
    family's rule, DMD2's when the model carries no known release."""
    for release in releases:
        known = release.recipe or next((r for r in RECIPES if r.family == release.family), None)
        if known is not None:
            return known.rule, known.gamma
    return "dmd2", 0.0


# LoRA metadata key: the sampling of the base a LoRA was distilled on (bases.sampling_label:
# 'eps', 'v', 'v + zsnr'), written by the trainer with the LoRA.
SAMPLING_METADATA_KEY = "dmd2_sampling"


def prediction_notes(recipe: Recipe, sampling: str, zsnr: bool, last_timestep: int, lora_samplings) -> list[str]:
    """Notes on the model's prediction type and terminal SNR: a LoRA distilled on a base of
    another sampling (from its metadata: (file name, label) pairs), and a zero-terminal-SNR
    model sampled from below its last timestep. Both run."""
    notes = []
    for file_name, trained in lora_samplings:
        if trained != sampling:
            notes.append(f"{file_name} was distilled on a '{trained}' base, but this model samples as '{sampling}': "
                         f"its output is read the wrong way. Put it on a '{trained}' model (ModelSamplingDiscrete "
                         f"sets v_prediction and zsnr).")
    if zsnr and recipe.timesteps[0] != last_timestep:
        notes.append(f"this model has zero terminal SNR (it starts from pure noise at timestep {last_timestep}); preset "
                     f"'{recipe.name}' starts at {recipe.timesteps[0]}: it runs, but that first step is not where "
                     f"this base starts.")
    return notes


def sampling_notes(recipe: Recipe, releases, reads_x0: bool) -> list[str]:
    """What the user should know before trusting the image: a preset of another family than
    the loaded release, a step count its authors did not publish, an x0 model sampled as an
    eps one or the reverse. Both still run: these are warnings, not errors."""
    notes = []
    for release in releases:
        family = FAMILY_NAMES.get(release.family, release.family)
        if recipe.family not in ("custom", release.family):
            presets = [r.name for r in RECIPES if r.family == release.family and r.steps in release.steps]
            notes.append(f"{release.file_name} is a {family} release, but preset '{recipe.name}' samples the "
                         f"{FAMILY_NAMES[recipe.family]} way; its own preset: {', '.join(presets) or 'custom'}.")
        elif recipe.steps not in release.steps:
            counts = "/".join(map(str, release.steps))
            notes.append(f"{release.file_name} was distilled for {counts} step(s); {recipe.steps} step(s) with the "
                         f"{recipe.rule} update at {','.join(map(str, recipe.timesteps))} run, but its authors did not "
                         f"publish that.")
    if reads_x0 and recipe.prediction != "x0":
        notes.append(f"the model reads its output as x0 (the SDXL-Lightning 1-step UNet), and preset '{recipe.name}' "
                     f"was made for eps models: use 'SDXL-Lightning 1-step x0 (euler, 999)'.")
    unets = [r for r in releases if r.kind == "unet"]
    if recipe.prediction == "x0" and unets and all(r.prediction != "x0" for r in unets):
        notes.append(f"preset '{recipe.name}' reads the UNet's output as x0, but {unets[0].file_name} predicts eps.")
    return notes
