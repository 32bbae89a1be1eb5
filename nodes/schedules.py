"""DMD2 timestep schedules mapped onto the connected model's own sigma table.

DMD2 generators are distilled at a handful of fixed integer timesteps of the training
schedule (999,749,499,249 for 4 steps; 399 for 1 step). The sampler must hit exactly those
entries of the model's discrete sigma table: a scheduler that interpolates or snaps to a
coarser grid (ComfyUI's `ModelSamplingDiscrete` "lcm" option turns 749 into 739) feeds the
generator timesteps it never saw.
"""

from __future__ import annotations

import re

import torch
from comfy_api.latest import io

import comfy.model_sampling

from ..bases import DiscreteVP, FamilyError, discrete_sampling, flow_process, flux_family, sd3_family
from .families import DMD2_FOUR_STEP as FOUR_STEP
from .families import DMD2_ONE_STEP as ONE_STEP  # noqa: F401  (re-exported: the preset name)
from .families import FLOW_RECIPES, FLOW_RECIPES_BY_NAME, RECIPES, RECIPES_BY_NAME, UPDATE_RULES, FlowRecipe, Recipe

CUSTOM = "custom"

# Preset name -> timesteps (None: read the custom string). DMD2's two first, then the other
# release families (nodes/families.py), then the flow (Flux.1) ones (their unshifted times
# in [0, 1]), then custom.
PRESETS: dict[str, tuple[int, ...] | tuple[float, ...] | None] = {
    **{r.name: r.timesteps for r in RECIPES}, **{r.name: r.times for r in FLOW_RECIPES}, CUSTOM: None}
PRESET_NAMES = list(PRESETS)


class ScheduleError(ValueError):
    """A timestep list or model that a DMD2 schedule cannot be built from."""


class UnsupportedModelError(ScheduleError):
    """The model does not sample on a discrete timestep table with a DDPM forward process."""


_SEPARATORS = re.compile(r"[\s,;]+")


def parse_timesteps(text: str, table_size: int | None = None) -> list[int]:
    """Parse "999,749,499,249" (commas, spaces or semicolons) into integer timesteps.

    Raises ScheduleError for an empty list, non-integers, negatives, duplicates, an order
    that is not strictly descending and, when ``table_size`` is given, timesteps past the
    end of the model's table.
    """
    if not isinstance(text, str):
        raise ScheduleError(f"custom timesteps must be text like '999,749,499,249', got {type(text).__name__}")
    items = [item for item in _SEPARATORS.split(text.strip()) if item]
    if not items:
        raise ScheduleError("custom timesteps are empty: give integers like '999,749,499,249'")
    timesteps = []
    for item in items:
        if not re.fullmatch(r"[+-]?\d+", item):
            raise ScheduleError(f"custom timestep {item!r} is not an integer: give integers like '999,749,499,249'")
        timesteps.append(int(item))
    validate_timesteps(timesteps, table_size)
    return timesteps


def validate_timesteps(timesteps, table_size: int | None = None) -> list[int]:
    """Check a timestep list (see parse_timesteps) and return it as a list of ints."""
    timesteps = list(timesteps)
    if not timesteps:
        raise ScheduleError("the timestep list is empty")
    for t in timesteps:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ScheduleError(f"timestep {t!r} is not an integer")
    last = None if table_size is None else table_size - 1
    for t in timesteps:
        if t < 0 or (last is not None and t > last):
            bound = "the table's range" if last is None else f"0..{last} (the model's sigma table has {table_size} entries)"
            raise ScheduleError(f"timestep {t} is outside {bound}")
    seen = set()
    for t in timesteps:
        if t in seen:
            raise ScheduleError(f"timestep {t} appears twice in {timesteps}: each step needs its own timestep")
        seen.add(t)
    for a, b in zip(timesteps, timesteps[1:]):
        if b > a:
            raise ScheduleError(f"timesteps must be strictly descending (noisiest first), but {a} is followed by {b} in {timesteps}")
    return timesteps


def check_model_sampling(model_sampling) -> None:
    """Refuse models whose sampling a DMD2 schedule would get wrong: what ``bases`` cannot read
    as a discrete DDPM table with eps, v or x0 prediction (flow, EDM, Stable Cascade, the
    'lcm' 50-step grid). eps, v and zero terminal SNR all sample on the model's x0 prediction."""
    sampling_of(model_sampling)


def sampling_of(model_sampling) -> tuple[str, bool, DiscreteVP]:
    """(prediction, zsnr, process) of a ``model_sampling`` (``bases.discrete_sampling``), or
    the one-line UnsupportedModelError naming its class."""
    try:
        return discrete_sampling(model_sampling)
    except FamilyError as e:
        raise UnsupportedModelError(f"DMD2 sampling: {e}") from None


def sigmas_for_timesteps(model_sampling, timesteps) -> torch.Tensor:
    """The model's own sigmas at the given integer timesteps, then a final 0 (float32, CPU)."""
    check_model_sampling(model_sampling)
    table = model_sampling.sigmas.detach().float().cpu()
    timesteps = validate_timesteps(timesteps, len(table))
    sigmas = table[torch.tensor(timesteps, dtype=torch.long)]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def is_flow(model, model_sampling=None) -> bool:
    """A Flux.1 or SD3/SD3.5 model on its own flow sampling (``bases.flux_family``,
    ``bases.sd3_family``). Other flow samplings (an SD UNet under ModelSamplingDiscreteFlow) are
    not: they are refused as before."""
    base = getattr(model, "model", model)
    if model_sampling is None:
        model_sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else base.model_sampling
    try:
        return any(read(base, model_sampling) is not None for read in (flux_family, sd3_family))
    except FamilyError as e:
        raise UnsupportedModelError(f"DMD2 sampling: {e}") from None


def flow_sigmas(model_sampling, recipe: FlowRecipe) -> torch.Tensor:
    """SIGMAS of a flow preset on a flow model's own sampling (its shift: a ModelSamplingFlux
    node in front counts): the card's times 1, ..., 1/N through percent_to_sigma, then 0."""
    try:
        flow_process(model_sampling)
    except FamilyError as e:
        raise UnsupportedModelError(f"DMD2 sampling: {e}") from None
    sigmas = [float(model_sampling.percent_to_sigma(1.0 - u)) for u in recipe.times]
    return torch.tensor([*sigmas, 0.0], dtype=torch.float32)


def check_preset_fits(model, preset: str) -> None:
    """A flow preset on an SD-family model, or an SD preset (or custom integer timesteps) on a
    Flux model: refused in one line naming what fits."""
    flow_preset, flow_model = preset in FLOW_RECIPES_BY_NAME, is_flow(model)
    model_sampling = model.get_model_object("model_sampling")
    if flow_preset and not flow_model:
        raise ScheduleError(f"preset '{preset}' samples Flux.1 models in flow time, but this model samples with "
                            f"{type(model_sampling).__name__} (an SD-family timestep table): choose an SD preset, e.g. "
                            f"'{FOUR_STEP}'")
    if not flow_preset and flow_model:
        raise UnsupportedModelError(f"DMD2 sampling: this model samples with {type(model_sampling).__name__} in flow time, "
                                    f"not a discrete SD-style timestep table: preset '{preset}' is for SD-family models; "
                                    f"choose a flow preset, e.g. '{FLOW_RECIPES[0].name}'")


def timesteps_for_preset(preset: str, custom: str = "", table_size: int | None = None) -> list[int]:
    if preset not in PRESETS:
        raise ScheduleError(f"unknown preset {preset!r}; choose one of {PRESET_NAMES}")
    if preset in FLOW_RECIPES_BY_NAME:
        raise ScheduleError(f"preset '{preset}' is a flow (Flux.1) preset: it has no integer timesteps")
    fixed = PRESETS[preset]
    if fixed is None:
        return parse_timesteps(custom, table_size)
    return validate_timesteps(fixed, table_size)


def preset_recipe(preset: str, custom: str = "", rule: str = "dmd2", gamma: float = 0.0,
                  table_size: int | None = None) -> Recipe:
    """The recipe a preset names; for 'custom', the custom timesteps with ``rule``/``gamma``."""
    if preset in FLOW_RECIPES_BY_NAME:
        return FLOW_RECIPES_BY_NAME[preset]
    timesteps = timesteps_for_preset(preset, custom, table_size)
    if preset != CUSTOM:
        return RECIPES_BY_NAME[preset]
    if rule not in UPDATE_RULES:
        raise ScheduleError(f"unknown update rule {rule!r}; choose one of {list(UPDATE_RULES)}")
    if not 0.0 <= gamma <= 1.0:
        raise ScheduleError(f"gamma must be in [0, 1], got {gamma}")
    return Recipe(CUSTOM, "custom", tuple(timesteps), rule, gamma=gamma if rule == "tcd" else 0.0)


def schedule_sigmas(model, preset: str, custom: str = "") -> torch.Tensor:
    """SIGMAS for a preset (or the custom list) on a ComfyUI MODEL's sigma table."""
    model_sampling = model.get_model_object("model_sampling")
    check_preset_fits(model, preset)
    if preset in FLOW_RECIPES_BY_NAME:
        return flow_sigmas(model_sampling, FLOW_RECIPES_BY_NAME[preset])
    check_model_sampling(model_sampling)
    timesteps = timesteps_for_preset(preset, custom, len(model_sampling.sigmas))
    return sigmas_for_timesteps(model_sampling, timesteps)


class ModelSamplingDiscreteX0(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.X0):
    """The discrete SD/SDXL table with the UNet's output read as the clean sample."""


def as_x0_model(model):
    """A clone of ``model`` whose UNet output is read as x0 (the SDXL-Lightning 1-step UNet),
    on the model's own sigma table: what ComfyUI's ModelSamplingDiscrete 'x0' node does, so the
    user does not have to add it."""
    current = model.get_model_object("model_sampling")
    if isinstance(current, comfy.model_sampling.X0):
        return model
    check_model_sampling(current)
    x0_sampling = ModelSamplingDiscreteX0(model.model.model_config)
    x0_sampling.set_sigmas(current.sigmas.detach().clone())
    clone = model.clone()
    clone.add_object_patch("model_sampling", x0_sampling)
    return clone


# -- nodes ----------------------------------------------------------------------------------

PRESET_TOOLTIP = ("Timesteps and update rule of a few-step release, as its authors sample it: DMD2 4-step "
                  "(999,749,499,249) and 1-step (399) first, then SDXL-Lightning, Hyper-SD, LCM-LoRA, TCD and "
                  "SDXL-Turbo at their published step counts (rule and timesteps in the name), then the Flux.1 "
                  "ones (DMD2 flow, FLUX.1-schnell, FLUX.1-Turbo-Alpha, Hyper-FLUX: shifted by the model's own "
                  "sampling, guidance as their cards), or 'custom'.")
CUSTOM_TOOLTIP = ("Used only when preset is 'custom': integer timesteps of the model's training schedule, "
                  "strictly descending, e.g. '999,749,499,249'.")


def preset_input() -> io.Combo.Input:
    return io.Combo.Input("preset", options=PRESET_NAMES, default=FOUR_STEP, tooltip=PRESET_TOOLTIP)


def custom_timesteps_input() -> io.String.Input:
    return io.String.Input("custom_timesteps", default="999,749,499,249", tooltip=CUSTOM_TOOLTIP)


def validate_custom_text(preset, custom_timesteps) -> bool | str:
    """Submit-time check of the custom string (the range check needs the model: run time)."""
    if preset != CUSTOM or not isinstance(custom_timesteps, str):
        return True
    try:
        parse_timesteps(custom_timesteps)
    except ScheduleError as e:
        return str(e)
    return True


class DMD2Schedule(io.ComfyNode):
    """SIGMAS at DMD2's distillation timesteps, read from the model's own sigma table."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMD2Schedule",
            display_name="DMD2 Schedule",
            category="DMD2/sampling",
            description="Sigmas at DMD2's exact distillation timesteps (from the model's own table), ending in 0. "
                        "Use with DMD2Sampler in SamplerCustom at cfg 1.0.",
            inputs=[
                io.Model.Input("model", tooltip="The DMD2 model: its sigma table gives the sigmas."),
                preset_input(),
                custom_timesteps_input(),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def validate_inputs(cls, preset, custom_timesteps) -> bool | str:
        return validate_custom_text(preset, custom_timesteps)

    @classmethod
    def execute(cls, model, preset, custom_timesteps) -> io.NodeOutput:
        return io.NodeOutput(schedule_sigmas(model, preset, custom_timesteps))


NODE_CLASSES = [DMD2Schedule]
