"""The digits students, made by the product: ``DMD2Trainer`` over ``SharedBaseBackend``.

The teacher is a ComfyUI ``BaseModel``; the backend puts LoRA G and LoRA F on its frozen
UNet (rank 8 by default: below the 32-channel layer widths, so the update really is low
rank) and the GAN head on the fake score's mid-block; every real digit is paired with its
own label. The student leaves as the same kohya LoRA file ``dmd2-train`` writes
(``export_generator_lora``), which ComfyUI's stock ``LoraLoaderModelOnly`` puts on the teacher.
``full_copies`` makes a network a fully trained copy instead: the fake score alone is
``dmd2-train --fake-score full`` (the demo's 1-step student), both is the reference's layout
(the study's ablation rows). The Flux teacher (``flow``, #25) takes the same path: its class
token and vector as each prompt, LoRA on its Flux target sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...bases import Family
from ..backend import Conditioning, SharedBaseBackend, TrainingData, export_generator_lora
from ..config import DMD2Config
from ..lora import DEFAULT_TARGETS
from ..trainer import DMD2Trainer
from .data import NULL_CLASS, DigitsData, one_hot
from .teacher import DigitsDenoiser, build_base_model, denoiser_state_dict


@dataclass
class StudentSettings:
    """One student's recipe. ``ema_decay`` is per generator update (the trainer's)."""

    timesteps: tuple[int, ...] = (399,)
    iterations: int = 1600
    lr_generator: float = 8e-4
    lr_fake_score: float = 2e-3
    lr_gan_head: float = 2e-3
    ema_decay: float = 0.99
    fake_updates_per_generator_update: int = 3
    batch_size: int = 64
    lora_rank: int = 8
    lora_alpha: float = 8.0
    fake_score_rank: int = 0  # 0: lora_rank
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    gan: bool = True
    gan_generator_weight: float = 5e-3
    gan_discriminator_weight: float = 1e-2
    regression_steps: int = 0
    regression_teacher_steps: int = 25
    regression_pairs: int = 0  # 0: fresh pairs; N: a pool of N pairs built once (``training.pool``)
    warmup_steps: int = 50
    full_copies: tuple[str, ...] = ()  # ("generator", "fake_score"): the reference's layout
    init_lora: str = ""  # start LoRA G (and with init_fake_score LoRA F) from this LoRA file (rank and alpha: the file's)
    init_fake_score: bool = False
    read_as: str = ""  # the ablation (#24): the trainer reads the teacher's output as this prediction ("eps" on the v teacher)
    overrides: dict = field(default_factory=dict)  # any other DMD2Config key

    def config(self, seed: int = 0) -> DMD2Config:
        return DMD2Config.for_arch(
            "sd15",
            generator_timesteps=self.timesteps,
            real_guidance_scale=1.0,  # match the data distribution, no guidance sharpening
            fake_updates_per_generator_update=self.fake_updates_per_generator_update,
            lr_generator=self.lr_generator,
            lr_fake_score=self.lr_fake_score,
            lr_gan_head=self.lr_gan_head,
            gan_generator_weight=self.gan_generator_weight,
            gan_discriminator_weight=self.gan_discriminator_weight,
            batch_size=self.batch_size,
            grad_accum=1,
            ema_decay=self.ema_decay,
            regression_steps=self.regression_steps,
            regression_teacher_steps=self.regression_teacher_steps,
            regression_pairs=self.regression_pairs,
            warmup_steps=self.warmup_steps,
            max_grad_norm=10.0,
            steps=self.iterations,
            seed=seed,
            **self.overrides,
        )


def _is_flow(family: Family) -> bool:
    return family.prediction == "flow"


def training_data(data: DigitsData, gan: bool = True, flow: bool = False) -> TrainingData:
    """Each training digit's label as its prompt; with the GAN, the digit itself as its real
    latent (paired: a real digit is always scored under its own label). ``flow``: the Flux
    teacher's prompts (the class as its token and its vector, ``flow.training_conditioning``)."""
    from .flow import training_conditioning

    condition = training_conditioning if flow else (lambda labels: Conditioning(y=one_hot(labels)))
    prompts = [condition(label.view(1)) for label in data.train_y]
    uncond = condition(torch.tensor([NULL_CLASS]))
    return TrainingData(prompts, uncond, real_latents=data.train_x if gan else None, paired=gan)


def teacher_base_model(teacher: DigitsDenoiser):
    """A ComfyUI ``BaseModel`` holding a copy of the teacher's weights."""
    if _is_flow(teacher.family):
        from .flow import base_model_of

        return base_model_of(teacher)
    base = build_base_model(family=teacher.family)
    base.diffusion_model.load_state_dict(teacher.unet.state_dict())
    return base


def student_family(teacher: DigitsDenoiser, settings: StudentSettings) -> Family:
    """The family the trainer reads the teacher in: its own, or the ablation's ``read_as``
    on the same table (an eps-only trainer on a v/ZTSNR model)."""
    return teacher.family.with_sampling(settings.read_as, teacher.family.zsnr) if settings.read_as else teacher.family


def student_backend(teacher: DigitsDenoiser, data: DigitsData, settings: StudentSettings, seed: int = 0) -> SharedBaseBackend:
    return SharedBaseBackend(
        teacher_base_model(teacher), training_data(data, settings.gan, _is_flow(teacher.family)), (1, 8, 8),
        lora_rank=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_targets=settings.lora_targets, device="cpu",
        gradient_checkpointing=False, seed=seed, full_copies=settings.full_copies,
        fake_score_rank=settings.fake_score_rank or None,
        lora_merged=True,  # small layers: one merged kernel per layer is 1.4x faster per iteration
        init_lora=settings.init_lora or None, init_fake_score=settings.init_fake_score,
        family=student_family(teacher, settings),
    )


@dataclass
class Student:
    settings: StudentSettings
    trainer: DMD2Trainer
    backend: SharedBaseBackend
    family: Family  # the teacher's as the trainer read it (``student_family``)

    def export(self, path: Path, averaged: bool = True) -> Path:
        """The generator as the file a ComfyUI graph loads: the kohya LoRA (product path), or
        for the full-copy ablation the whole UNet as a digits model file."""
        from safetensors.torch import save_file

        if "generator" not in self.settings.full_copies:
            meta = {"dmd2_arch": "digits_flux" if _is_flow(self.family) else "digits", "dmd2_timesteps": ",".join(map(str, self.settings.timesteps)), "dmd2_steps": self.trainer.step_count}
            return export_generator_lora(self.trainer, self.backend, path, meta, averaged=averaged)
        with self.trainer.averaged_generator() if averaged else contextlib.nullcontext():
            save_file(denoiser_state_dict(self.denoiser()), str(path))
        return path

    def denoiser(self) -> DigitsDenoiser:
        """The generator as a plain digits denoiser (for sampling in-process): the base UNet
        with the current adapter merged in, or the full copy."""
        from . import flow, teacher

        load_denoiser = flow.load_denoiser if _is_flow(self.family) else teacher.load_denoiser
        unet = self.backend.copies.get("generator")
        if unet is not None:
            return load_denoiser({k: v.detach().clone() for k, v in unet.state_dict().items()}, self.family)
        return load_denoiser(self.backend.adapters.merged_state_dict("generator"), self.family)


def distill(
    teacher: DigitsDenoiser,
    data: DigitsData,
    settings: StudentSettings,
    seed: int = 0,
    callbacks: Sequence[Callable[[dict[str, float]], None]] = (),
) -> Student:
    """Train one student with the pack's trainer; ``callbacks`` see every iteration's metrics."""
    torch.manual_seed(seed)
    backend = student_backend(teacher, data, settings, seed)
    trainer = DMD2Trainer(settings.config(seed), backend, callbacks=callbacks)
    trainer.run(progress=False)
    return Student(settings, trainer, backend, backend.family)
