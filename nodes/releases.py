"""The published few-step weights, one registry: DMD2 (``tianweiy/DMD2``) and the T2I-Adapter
of its canny recipe, and the other families ComfyUI users run beside it: SDXL-Lightning,
Hyper-SD, LCM-LoRA, TCD and SDXL-Turbo.

Each entry says where the file lives on the hub, the name it gets in ComfyUI's model
folder, what it is (architecture; UNet, LoRA, checkpoint or T2I-Adapter; family, prediction
type) and which timesteps it was trained for, so the loaders can offer, fetch and check it,
tag the model with it, and the sampler can pick the family's recipe (``families.py``).
Pure data: importable without ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

from .families import lcm_timesteps, trailing_timesteps

REPO_ID = "tianweiy/DMD2"
LIGHTNING = "ByteDance/SDXL-Lightning"
HYPER = "ByteDance/Hyper-SD"
# ComfyUI folder_paths name of each kind of file.
FOLDERS = {"unet": "diffusion_models", "lora": "loras", "t2i_adapter": "controlnet", "checkpoint": "checkpoints"}


@dataclass(frozen=True)
class Release:
    file_name: str  # name in the ComfyUI model folder (what the loader's combo shows)
    repo_path: str  # path inside the hub repo
    arch: str  # "sdxl" or "sd15"
    kind: str  # "unet" (generator weights), "lora" (UNet LoRA), "checkpoint" (UNet + CLIP + VAE) or "t2i_adapter"
    timesteps: tuple[int, ...]  # the timesteps the generator was trained on (none for an adapter)
    dtype: str  # "fp16" or "fp32" (as stored)
    key_format: str  # "diffusers" (UNet2DConditionModel / T2IAdapter names), "kohya" (lora_unet_*) or "ldm"
    approx_size: str
    repo_id: str = REPO_ID
    note: str = ""
    family: str = "dmd2"  # key of families.FAMILY_NAMES
    prediction: str = "eps"  # "x0": the UNet outputs the clean sample (SDXL-Lightning 1-step); "v": v-prediction
    zsnr: bool = False  # made for a zero-terminal-SNR sigma table (a LoRA DMD2 Train LoRA distilled on such a base)
    step_counts: tuple[int, ...] = ()  # the step counts its authors publish for it (default: len(timesteps))

    @property
    def folder(self) -> str:
        """ComfyUI folder_paths name the file belongs in."""
        return FOLDERS[self.kind]

    @property
    def steps(self) -> tuple[int, ...]:
        return self.step_counts or (len(self.timesteps),)

    @property
    def recipe(self):
        """The family's published recipe for these timesteps (families.Recipe), or None."""
        from .families import recipe_for

        return recipe_for(self.family, self.timesteps)

    @property
    def preset(self) -> str:
        """The sampler nodes' preset matching its timesteps (or 'custom')."""
        recipe = self.recipe
        return recipe.name if recipe is not None else "custom"

    @property
    def url(self) -> str:
        """The direct download URL (``/resolve/``; ``/blob/`` is the web page about the file)."""
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.repo_path}"


RELEASES: tuple[Release, ...] = (
    Release("dmd2_sdxl_4step_unet_fp16.bin", "dmd2_sdxl_4step_unet_fp16.bin", "sdxl", "unet",
            (999, 749, 499, 249), "fp16", "diffusers", "5.1 GB"),
    Release("dmd2_sdxl_1step_unet_fp16.bin", "dmd2_sdxl_1step_unet_fp16.bin", "sdxl", "unet",
            (399,), "fp16", "diffusers", "5.1 GB"),
    Release("dmd2_sdxl_4step_lora_fp16.safetensors", "dmd2_sdxl_4step_lora_fp16.safetensors", "sdxl", "lora",
            (999, 749, 499, 249), "fp16", "kohya", "394 MB",
            note="rank 64, alpha 8; lower the strength (about 0.5-0.8) on community finetunes"),
    Release("dmd2_sdxl_4step_lora.safetensors", "dmd2_sdxl_4step_lora.safetensors", "sdxl", "lora",
            (999, 749, 499, 249), "fp32", "kohya", "787 MB",
            note="fp32 twin of the fp16 LoRA"),
    Release(
        "dmd2_sd15_1step_unet_fid8.35.bin",
        "model/sdv1.5/laion6.25_sd_baseline_8node_guidance1.75_lr5e-7_seed10_dfake10_diffusion1000_gan1e-3_resume"
        "_fid8.35_checkpoint_model_041000/pytorch_model.bin",
        "sd15", "unet", (999,), "fp32", "diffusers", "3.4 GB",
        note="the repo's pytorch_model.bin (generator only), renamed; one step at timestep 999",
    ),
    Release("t2i-adapter-canny-sdxl-1.0.safetensors", "diffusion_pytorch_model.fp16.safetensors", "sdxl", "t2i_adapter",
            (), "fp16", "diffusers", "158 MB", repo_id="TencentARC/t2i-adapter-canny-sdxl-1.0",
            note="the canny recipe's adapter (Apache-2.0), fp16 as the recipe loads it; the repo's fp32 "
                 "diffusion_pytorch_model.safetensors (316 MB) works the same"),
    *(
        # SDXL-Lightning (ByteDance, openrail++): diffusers-named UNets and kohya LoRAs, fp16
        Release(f"sdxl_lightning_{n}step_unet.safetensors", f"sdxl_lightning_{n}step_unet.safetensors", "sdxl", "unet",
                trailing_timesteps(n), "fp16", "diffusers", "5.1 GB", repo_id=LIGHTNING, family="lightning")
        for n in (2, 4, 8)
    ),
    Release("sdxl_lightning_1step_unet_x0.safetensors", "sdxl_lightning_1step_unet_x0.safetensors", "sdxl", "unet",
            trailing_timesteps(1), "fp16", "diffusers", "5.1 GB", repo_id=LIGHTNING, family="lightning", prediction="x0",
            note="x0 prediction: the loader and the 1-step x0 preset read its output as the clean sample"),
    *(
        Release(f"sdxl_lightning_{n}step_lora.safetensors", f"sdxl_lightning_{n}step_lora.safetensors", "sdxl", "lora",
                trailing_timesteps(n), "fp16", "kohya", "394 MB", repo_id=LIGHTNING, family="lightning")
        for n in (2, 4, 8)
    ),
    *(
        Release(f"sdxl_lightning_{n}step{x0}.safetensors", f"sdxl_lightning_{n}step{x0}.safetensors", "sdxl",
                "checkpoint", trailing_timesteps(n), "fp16", "ldm", "6.9 GB", repo_id=LIGHTNING, family="lightning",
                prediction="x0" if x0 else "eps", note="all-in-one checkpoint (UNet, text encoders, VAE)")
        for n, x0 in ((1, "_x0"), (2, ""), (4, ""), (8, ""))
    ),
    # Hyper-SD (ByteDance): the 1-step SDXL UNet (LCM at 800) and kohya LoRAs (DDIM trailing; 1-step: TCD)
    Release("Hyper-SDXL-1step-Unet.safetensors", "Hyper-SDXL-1step-Unet.safetensors", "sdxl", "unet", (800,),
            "fp32", "diffusers", "10.3 GB", repo_id=HYPER, family="hyper"),
    Release("Hyper-SDXL-1step-lora.safetensors", "Hyper-SDXL-1step-lora.safetensors", "sdxl", "lora",
            lcm_timesteps(1), "fp16", "kohya", "787 MB", repo_id=HYPER, family="hyper", step_counts=(1, 2, 4, 8),
            note="the unified LoRA: TCD at 1-8 steps (gamma 1.0 at 1 step; lower it for more steps)"),
    *(
        Release(f"Hyper-{arch_name}-{n}steps-lora.safetensors", f"Hyper-{arch_name}-{n}steps-lora.safetensors", arch,
                "lora", trailing_timesteps(n), "fp16", "kohya", size, repo_id=HYPER, family="hyper")
        for arch, arch_name, size in (("sdxl", "SDXL", "787 MB"), ("sd15", "SD15", "269 MB")) for n in (2, 4, 8)
    ),
    Release("Hyper-SD15-1step-lora.safetensors", "Hyper-SD15-1step-lora.safetensors", "sd15", "lora",
            lcm_timesteps(1), "fp16", "kohya", "269 MB", repo_id=HYPER, family="hyper", step_counts=(1, 2, 4, 8),
            note="the unified LoRA: TCD at 1-8 steps (gamma 1.0 at 1 step; lower it for more steps)"),
    # LCM-LoRA and TCD: each repo's pytorch_lora_weights.safetensors, under a name saying what it is
    Release("lcm-lora-sdxl.safetensors", "pytorch_lora_weights.safetensors", "sdxl", "lora", lcm_timesteps(4),
            "fp16", "kohya", "394 MB", repo_id="latent-consistency/lcm-lora-sdxl", family="lcm",
            step_counts=(2, 4, 8)),
    Release("lcm-lora-sdv1-5.safetensors", "pytorch_lora_weights.safetensors", "sd15", "lora", lcm_timesteps(4),
            "fp16", "kohya", "135 MB", repo_id="latent-consistency/lcm-lora-sdv1-5", family="lcm",
            step_counts=(2, 4, 8)),
    Release("tcd-sdxl-lora.safetensors", "pytorch_lora_weights.safetensors", "sdxl", "lora", lcm_timesteps(4),
            "fp16", "kohya", "394 MB", repo_id="h1t/TCD-SDXL-LoRA", family="tcd", step_counts=(2, 4, 8)),
    Release("tcd-sd15-lora.safetensors", "pytorch_lora_weights.safetensors", "sd15", "lora", lcm_timesteps(4),
            "fp16", "kohya", "135 MB", repo_id="h1t/TCD-SD15-LoRA", family="tcd", step_counts=(2, 4, 8)),
    # SDXL-Turbo (Stability AI, non-commercial research licence): a full checkpoint
    Release("sd_xl_turbo_1.0_fp16.safetensors", "sd_xl_turbo_1.0_fp16.safetensors", "sdxl", "checkpoint",
            trailing_timesteps(1), "fp16", "ldm", "6.9 GB", repo_id="stabilityai/sdxl-turbo", family="turbo",
            step_counts=(1, 2, 4), note="512x512 images; 1-4 steps"),
)

RELEASES_BY_NAME = {r.file_name: r for r in RELEASES}


def releases(kind: str) -> list[Release]:
    return [r for r in RELEASES if r.kind == kind]

ATTACHMENT = "dmd2_releases"  # ModelPatcher attachment: the registry releases the model carries


def model_releases(model) -> tuple[Release, ...]:
    """The releases a loader of this pack put into ``model`` (kept through clones, such as
    ComfyUI's own LoRA loaders')."""
    get = getattr(model, "get_attachment", None)
    return tuple(get(ATTACHMENT) or ()) if get is not None else ()


LORA_SAMPLINGS = "dmd2_lora_samplings"  # ModelPatcher attachment: (file name, sampling label) of loaded LoRAs


def model_lora_samplings(model) -> tuple[tuple[str, str], ...]:
    """(file name, base sampling) of each LoRA a loader of this pack applied whose metadata
    records the sampling of the base it was distilled on."""
    get = getattr(model, "get_attachment", None)
    return tuple(get(LORA_SAMPLINGS) or ()) if get is not None else ()


def tag_lora_sampling(model, file_name: str, sampling: str):
    model.set_attachments(LORA_SAMPLINGS, model_lora_samplings(model) + ((file_name, sampling),))
    return model


def tag_release(model, release: Release):
    """Record ``release`` on ``model`` (a ModelPatcher the caller owns, e.g. a fresh clone)."""
    model.set_attachments(ATTACHMENT, model_releases(model) + (release,))
    return model
