"""One configuration object for DMD2 distillation.

``DMD2Config`` holds every knob of the algorithm and of the optimisers. Per-architecture
defaults follow the DMD2 experiment scripts (SDXL 4-step LoRA and SD1.5); a TOML file and
``key=value`` overrides are applied on top, in that order::

    config = load_config("run.toml", overrides=["lr_generator=1e-5", "steps=2000"])

Fields that describe the model, the data or where files go (checkpoint paths, LoRA rank,
prompts, ...) belong to the command that builds the backend; this object only carries what
the training loop itself reads, plus a free ``extra`` table that is passed through untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from .. import bases

# Per-architecture defaults; where each value comes from: docs/training.md (the DMD2
# experiment scripts for SDXL 4-step LoRA and SD1.5; the fake score's rate is ours). SD2.x
# (no reference run) takes SD1.5's: the same UNet size and text-conditioning path.
_SD15_DEFAULTS = {
    "real_guidance_scale": 1.75,
    "fake_updates_per_generator_update": 10,
    "lr_generator": 5e-5,
    "lr_fake_score": 5e-4,
    "lr_gan_head": 5e-5,
    "gan_generator_weight": 1e-3,
    "gan_discriminator_weight": 1e-2,
}
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "sdxl": {
        "real_guidance_scale": 8.0,
        "fake_updates_per_generator_update": 5,
        "lr_generator": 5e-5,
        "lr_fake_score": 5e-4,
        "lr_gan_head": 5e-5,
        "gan_generator_weight": 5e-3,
        "gan_discriminator_weight": 1e-2,
    },
    "sd15": {**_SD15_DEFAULTS},
    "sd2": {**_SD15_DEFAULTS},
}
# The student's schedule and the guidance's unconditional side come from the family.
for _name, _values in ARCH_DEFAULTS.items():
    _values.update(generator_timesteps=bases.get_family(_name).trailing_timesteps(4), uncond=bases.get_family(_name).uncond)

# Flux.1 [dev] (#25). Its real score is the base called with its embedded guidance 3.5
# (``bases.flux.FLUX_GUIDANCE``, passed by the backend to every forward): NVIDIA FastGen's Flux DMD2
# config sets ``net.guidance_scale = 3.5`` and no CFG, and the FLUX.1-dev model card's example uses
# guidance_scale=3.5; so real_guidance_scale is 1 (no second, unconditional pass). The student's
# timesteps are the 4-step trailing list on the flow training grid, 999, 749, 499, 249 = the flow
# times 1, 0.75, 0.5, 0.25 shifted toward noise by the model's own shift (3.16 at 1024 px; the
# shift DMD2 issue #62 and FastGen's Flux students found necessary). FastGen's Flux DMD2 runs
# full fine-tuning at 1e-5 (generator, fake score and discriminator alike) with a generator GAN
# weight of 0.03; a LoRA update scaled by alpha/rank = 1/8 needs a larger rate, so the rates,
# the 5:1 update ratio and the GAN weights are SDXL's LoRA values (the DMD2 SDXL LoRA script;
# ours for LoRA F). ``uncond`` is the empty prompt: read only for real images without a caption
# (scored unconditionally), never for guidance.
ARCH_DEFAULTS["flux_dev"] = {**ARCH_DEFAULTS["sdxl"], "real_guidance_scale": 1.0, "uncond": "empty",
                             "generator_timesteps": bases.FLUX_DEV.trailing_timesteps(4)}

# Run defaults that differ per arch (``RunConfig`` keys a run leaves unset). Flux.1 [dev]: LoRA
# rank 32, alpha 4 (the DMD2 SDXL LoRA's alpha/rank of 1/8, so a learning rate means the same
# step): at rank 64 the "dmd2" set of its 19 double and 38 single blocks is 224 M parameters per
# LoRA, LoRA G and F with AdamW 7.2 GB beside a 12 GB fp8 base on a 24 GB card; rank 32 halves it.
RUN_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {"flux_dev": {"lora_rank": 32, "lora_alpha": 4.0}}


# The fake score's rate when it is a full network (``dmd2-train --fake-score full``): SDXL the
# reference's ``--guidance_lr`` 5e-5 (X4L, where it equals the LoRA generator's rate). SD1.5's
# reference ran 1e-5 with a full generator at 1e-5; beside our LoRA generator at 5e-5 that
# leaves the fake score 5x slower than what it must follow, and on the digits the 1-step
# student at that ratio (F/G 0.2) measured 2.17 ± 0.04 against 1.99 ± 0.15 at F/G 0.5, its DM loss lower
# throughout (the fake score lags, the DM gradient shrinks; docs/digits.md, "The full fake
# score's rate"), so SD1.5 (and SD2.x, which takes its defaults) runs at half the generator's
# rate, 2.5e-5. ``lr_fake_score`` above is for a LoRA F (docs/training.md).
FULL_FAKE_SCORE_LR = {"sdxl": 5e-5, "sd15": 2.5e-5, "sd2": 2.5e-5, "flux_dev": 1e-5}  # Flux: FastGen's Flux DMD2 fake-score rate


# Student schedules by name, from each family: its 4-step trailing list (999, 749, 499, 249:
# the reference's) and its 1-step conditioning timestep (the reference's 1-step students
# condition at 399 for SDXL, experiments/sdxl/sdxl_cond399_*.sh, and at its default 999 for
# SD1.5, the released dmd2_sd15_1step_unet_fid8.35.bin; SD2.x at 999; Flux.1 [dev] at 999, pure
# noise on the flow grid, as FastGen's 1-step flow students start).
TIMESTEP_PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    name: {"4-step": bases.get_family(name).trailing_timesteps(4), "1-step": (bases.get_family(name).one_step_timestep,)}
    for name in ARCH_DEFAULTS
}
# How the fake score's denoising loss is weighted (``losses.fake_score_loss``): "native" is
# the base's own parameterization (eps for eps models, v for v models), "eps"/"v"/"x0" name one.
FAKE_LOSS_WEIGHTINGS = ("native", "eps", "v", "x0")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class DMD2Config:
    """What the DMD2 loop reads. Timesteps are integer DDPM indices in [0, num_train_timesteps)."""

    arch: str = "sdxl"
    steps: int = 10_000  # generator-or-fake iterations the trainer runs (``trainer.step`` calls)
    seed: int = 0
    num_train_timesteps: int = 1000

    # Generator: multi-step students use backward simulation over these timesteps; a
    # 1-element tuple is a 1-step student fed unit-variance noise at that timestep.
    generator_timesteps: tuple[int, ...] = (999, 749, 499, 249)
    backward_simulation: bool = True

    # Distribution matching.
    real_guidance_scale: float = 8.0  # real score = uncond + s * (cond - uncond)
    # The unconditional side of that guidance: "zeros" (zero text context and pooled text,
    # SDXL's size conditioning kept: the reference for SDXL) or "empty" (the encoded empty
    # prompt: the reference for SD1.5). Read by the backend's caller, not the loop.
    uncond: str = "zeros"
    dm_min_timestep: int = 20
    dm_max_timestep: int = 980

    # Fake score: trained every iteration with a denoising loss on generated samples, weighted
    # as the MSE of the base's own output ("native": "eps" or "v", what the run records), of
    # the eps- or v-prediction ("eps", "v") or plain x0 MSE ("x0"): docs/training.md.
    fake_loss_weighting: str = "native"
    fake_min_timestep: int = 0
    fake_max_timestep: int = 999

    # Two time-scale update rule: this many fake-score updates per generator update.
    fake_updates_per_generator_update: int = 5

    # GAN (used only when the backend gives real latents and a classifier head).
    gan_generator_weight: float = 5e-3
    gan_discriminator_weight: float = 1e-2
    gan_min_timestep: int = 0
    gan_max_timestep: int = 999

    # Batches: each iteration draws batch_size * grad_accum samples (per process) and
    # accumulates the gradients of grad_accum micro-batches of batch_size before each update,
    # which gives the same update as one batch of that size (tested).
    batch_size: int = 1
    grad_accum: int = 4

    # Optimisers: AdamW for both, linear warmup then constant.
    lr_generator: float = 5e-5
    lr_fake_score: float = 5e-5
    lr_gan_head: float = 0.0  # the GAN head's own learning rate; 0: lr_fake_score
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    warmup_steps: int = 500  # counted in iterations for both optimisers, as in the reference
    max_grad_norm: float = 10.0  # 0 or less: no clipping

    # Exponential moving average of the generator, updated after every generator update
    # (decay per generator update; 0 turns it off). The averaged generator is what gets
    # exported and previewed: the raw one oscillates around it (docs/digits.md).
    ema_decay: float = 0.99
    ema_on_cpu: bool = False  # hold the average in CPU memory (saves GPU memory)

    # Optional regression warm start (the reference's SDXL 1-step recipe): before DMD2, this
    # many iterations regress the generator's first step onto the teacher's deterministic
    # (DDIM) samples from the same noise, made on the fly with real_guidance_scale.
    regression_steps: int = 0
    regression_teacher_steps: int = 50
    # 0: a fresh pair per sample and iteration (the teacher runs every iteration). N > 0: a
    # pool of N pairs built once before the warm start (``training.pool``) and drawn from at
    # random by each iteration, as the reference does (10,000 pairs, each seen about 50 times).
    regression_pairs: int = 0

    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_arch(cls, arch: str, **overrides: Any) -> DMD2Config:
        """The reference defaults for ``arch`` ('sdxl', 'sd15', 'sd2' or 'flux_dev'), then ``overrides``.
        ``generator_timesteps`` may name a preset of the arch (``TIMESTEP_PRESETS``)."""
        if arch not in ARCH_DEFAULTS:
            raise ConfigError(f"unknown arch {arch!r}; expected one of {sorted(ARCH_DEFAULTS)}")
        values = {**ARCH_DEFAULTS[arch], "arch": arch, **overrides}
        preset = values.get("generator_timesteps")
        if isinstance(preset, str) and preset.strip() in TIMESTEP_PRESETS[arch]:
            values["generator_timesteps"] = TIMESTEP_PRESETS[arch][preset.strip()]
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DMD2Config:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        coerced = {name: _coerce(known[name], value) for name, value in values.items()}
        config = cls(**coerced)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @property
    def one_step(self) -> bool:
        return len(self.generator_timesteps) == 1

    @property
    def samples_per_iteration(self) -> int:
        """Samples per iteration and process: ``batch_size * grad_accum``."""
        return self.batch_size * self.grad_accum

    @property
    def total_steps(self) -> int:
        """Iterations in all: the regression warm start, then ``steps`` DMD2 iterations."""
        return self.regression_steps + self.steps

    def generator_updates(self, iterations: int) -> int:
        """Generator updates made by the first ``iterations`` iterations: each regression
        iteration, then every ``fake_updates_per_generator_update``-th DMD2 iteration (the
        first one included), as ``DMD2Trainer.step`` does."""
        regression = min(max(iterations, 0), self.regression_steps)
        dmd2 = max(0, iterations - self.regression_steps)
        return regression + -(-dmd2 // self.fake_updates_per_generator_update)

    def validate(self) -> None:
        n = self.num_train_timesteps
        if not self.generator_timesteps:
            raise ConfigError("generator_timesteps must hold at least one timestep")
        for t in self.generator_timesteps:
            if not 0 <= t < n:
                raise ConfigError(f"generator timestep {t} is outside [0, {n - 1}]")
        if list(self.generator_timesteps) != sorted(self.generator_timesteps, reverse=True) or len(
            set(self.generator_timesteps)
        ) != len(self.generator_timesteps):
            raise ConfigError(f"generator_timesteps must strictly decrease, got {list(self.generator_timesteps)}")
        for lo, hi, what in (
            (self.dm_min_timestep, self.dm_max_timestep, "dm"),
            (self.fake_min_timestep, self.fake_max_timestep, "fake"),
            (self.gan_min_timestep, self.gan_max_timestep, "gan"),
        ):
            if not 0 <= lo <= hi < n:
                raise ConfigError(f"{what}_min_timestep/{what}_max_timestep must satisfy 0 <= min <= max < {n}")
        if self.uncond not in ("zeros", "empty"):
            raise ConfigError(f"uncond must be 'zeros' or 'empty', got {self.uncond!r}")
        if self.fake_loss_weighting not in FAKE_LOSS_WEIGHTINGS:
            raise ConfigError(f"fake_loss_weighting must be one of {', '.join(FAKE_LOSS_WEIGHTINGS)}, got {self.fake_loss_weighting!r}")
        if self.fake_updates_per_generator_update < 1:
            raise ConfigError("fake_updates_per_generator_update must be >= 1")
        if self.lr_generator < 0 or self.lr_fake_score < 0 or self.lr_gan_head < 0:
            raise ConfigError("learning rates must be >= 0 (0 holds that network where it starts; lr_gan_head: 0 for lr_fake_score)")
        if self.steps < 0 or self.warmup_steps < 0:
            raise ConfigError("steps and warmup_steps must be >= 0")
        if self.gan_generator_weight < 0 or self.gan_discriminator_weight < 0:
            raise ConfigError("GAN weights must be >= 0")
        for key in ("batch_size", "grad_accum", "regression_teacher_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.regression_steps < 0:
            raise ConfigError(f"regression_steps must be >= 0, got {self.regression_steps}")
        if self.regression_pairs < 0:
            raise ConfigError(f"regression_pairs must be >= 0 (0: fresh pairs), got {self.regression_pairs}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 turns the average off), got {self.ema_decay}")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Turn TOML/CLI values into the field's type (lists -> tuples, strings -> numbers)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("tuple"):
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            item = float if "float" in kind else int
            return tuple(item(v) for v in value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if kind == "float":
            return float(value)
        if kind == "str":
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {f.name!r}: cannot read {value!r} as {kind}") from exc
    return value


def parse_overrides(overrides: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["lr_generator=1e-5", "generator_timesteps=999,749"]`` -> dict (values stay strings)."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    arch: str | None = None,
) -> DMD2Config:
    """Defaults for the arch (from ``arch``, the overrides, the file, else 'sdxl'), then the
    TOML file's top-level keys (a ``[dmd2]`` table is read instead if present), then overrides."""
    file_values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        file_values = dict(data.get("dmd2", data))
    override_values = parse_overrides(overrides)
    values = {**file_values, **override_values}
    arch = override_values.get("arch") or arch or file_values.get("arch") or "sdxl"
    values.pop("arch", None)
    return DMD2Config.for_arch(str(arch), **values)


def with_fake_score_rate(config: DMD2Config, fake_score: str, rate_given: bool) -> DMD2Config:
    """``config`` with a full fake score's own rate (``FULL_FAKE_SCORE_LR``) unless the user gave
    one: a LoRA F's default rate is 10-50x too high for a full network. The command and the
    node both decide the rate here."""
    if fake_score == "full" and not rate_given:
        return dataclasses.replace(config, lr_fake_score=FULL_FAKE_SCORE_LR[config.arch])
    return config
