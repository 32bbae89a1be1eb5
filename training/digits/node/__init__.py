"""ComfyUI custom node for the digits demo (not part of the node pack): loads a digits
teacher/student file as a MODEL and turns class labels into CONDITIONING, so that the
demo can sample its models through the pack's nodes in a real ComfyUI graph.

The demo's runner (``training/digits/comfy_runner.py``) links this folder into a throwaway
ComfyUI base directory next to the pack itself.
"""

from comfyui_dmd2.training.digits import data, flow, teacher


class DMD2DigitsModelLoader:
    """A digits model file (safetensors, as the demo writes it: the UNet, or the Flux teacher) -> MODEL."""

    CATEGORY = "DMD2/digits demo"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "Path of a digits model .safetensors file (UNet or Flux)."})}}

    def load(self, path):
        from safetensors.torch import load_file

        state = load_file(path)
        if flow.is_flow_file(state):  # the Flux teacher's file (#25)
            return (flow.comfy_model(flow.load_denoiser(state)),)
        return (teacher.comfy_model(teacher.load_denoiser(state)),)


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
