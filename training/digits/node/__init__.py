"""ComfyUI custom node for the digits demo (not part of the node pack): loads a digits
teacher/student file as a MODEL and turns class labels into CONDITIONING, so that the
demo can sample its models through the pack's nodes in a real ComfyUI graph.

The demo's runner (``training/digits/comfy_runner.py``) links this folder into a throwaway
ComfyUI base directory next to the pack itself.
"""

from comfyui_dmd2.training.digits import data, teacher


class DMD2DigitsModelLoader:
    """A digits UNet file (safetensors, as the demo writes it) -> MODEL."""

    CATEGORY = "DMD2/digits demo"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "Path of a digits model .safetensors file."})}}

    def load(self, path):
        from safetensors.torch import load_file

        return (teacher.comfy_model(teacher.load_denoiser(load_file(path))),)


class DMD2DigitsClassConditioning:
    """``batch`` class labels 0, 1, ..., 9, 0, 1, ... -> CONDITIONING (one-hot adm vector)."""

    CATEGORY = "DMD2/digits demo"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"batch": ("INT", {"default": 10, "min": 1, "max": 100000, "tooltip": "Number of labels (cycling through 0-9)."})}}

    def encode(self, batch):
        return (teacher.comfy_conditioning(data.balanced_labels(batch)),)


NODE_CLASS_MAPPINGS = {
    "DMD2DigitsModelLoader": DMD2DigitsModelLoader,
    "DMD2DigitsClassConditioning": DMD2DigitsClassConditioning,
}
