"""The published DMD2 weights (Hugging Face repo ``tianweiy/DMD2``) and the T2I-Adapter of
DMD2's canny recipe (``TencentARC/t2i-adapter-canny-sdxl-1.0``), one registry.

Each entry says where the file lives on the hub, the name it gets in ComfyUI's model
folder, what it is (architecture; UNet, LoRA or T2I-Adapter) and which timesteps it was
trained for, so the loaders can offer, fetch and check it and the workflows can pick the
right preset. Pure data: importable without ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

REPO_ID = "tianweiy/DMD2"
# ComfyUI folder_paths name of each kind of file.
FOLDERS = {"unet": "diffusion_models", "lora": "loras", "t2i_adapter": "controlnet"}


@dataclass(frozen=True)
class Release:
    file_name: str  # name in the ComfyUI model folder (what the loader's combo shows)
    repo_path: str  # path inside the hub repo
    arch: str  # "sdxl" or "sd15"
    kind: str  # "unet" (full generator weights), "lora" (kohya-style UNet LoRA) or "t2i_adapter"
    timesteps: tuple[int, ...]  # the timesteps the generator was trained on (none for an adapter)
    dtype: str  # "fp16" or "fp32" (as stored)
    key_format: str  # "diffusers" (UNet2DConditionModel / T2IAdapter names) or "kohya" (lora_unet_*)
    approx_size: str
    repo_id: str = REPO_ID
    note: str = ""

    @property
    def folder(self) -> str:
        """ComfyUI folder_paths name the file belongs in."""
        return FOLDERS[self.kind]

    @property
    def preset(self) -> str:
        """The DMD2Generate/DMD2Schedule preset (or 'custom') matching its timesteps."""
        return {(999, 749, 499, 249): "4-step (999,749,499,249)", (399,): "1-step (399)"}.get(self.timesteps, "custom")

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
)

RELEASES_BY_NAME = {r.file_name: r for r in RELEASES}


def releases(kind: str) -> list[Release]:
    return [r for r in RELEASES if r.kind == kind]
