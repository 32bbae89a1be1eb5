"""T2I-Adapter on a fixed few-step schedule, in the terms of DMD2's published recipe.

The recipe (diffusers' StableDiffusionXLAdapterPipeline) adds the adapter's features, times
``adapter_conditioning_scale``, to the UNet's down blocks for the first
``int(steps * adapter_conditioning_factor)`` steps. ComfyUI's ControlNet machinery takes a
start/end *percent* mapped to sigmas instead (percent p -> the sigma of timestep
(1 - p) * 999); on the 4-step schedule 0.5 lands half a timestep from the third step (499), so
a rounding decides whether that step gets the adapter, and for other schedules a percent does
not name steps at all. Here the active range is computed on the schedule the sampler will run:
it ends strictly between the last active and the first inactive sigma (their geometric mean),
so no step sits on the cut.

Edge maps follow the recipe's route (detect at 384 px, resize to the generation size) with
ComfyUI's own kornia Canny; docs/adapter.md says how it differs from OpenCV's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import comfy.controlnet
import comfy.t2i_adapter.adapter
import comfy.utils
import torch
from comfy_api.latest import io

from .loaders import check_choice, file_options, resolve_file
from .schedules import (
    custom_timesteps_input,
    preset_input,
    schedule_sigmas,
    validate_custom_text,
)

log = logging.getLogger(__name__)


class AdapterError(ValueError):
    """An adapter, model or image the adapter hookup cannot work with (message says why)."""


# -- loading ------------------------------------------------------------------------------

_DIFFUSERS_PROBE = "adapter.body.0.resnets.0.block1.weight"
_LEVELS = 4  # every SD1.5/SDXL full adapter has 4 feature levels
_RES_BLOCKS = 2
# kornia Canny thresholds closest to the recipe's cv2.Canny(100, 200) (see docs/adapter.md).
LOW_THRESHOLD = 0.1
HIGH_THRESHOLD = 0.2


def diffusers_to_tencent_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers adapter keys (adapter.body.L.resnets.R.x, adapter.body.L.in_conv) to the
    TencentARC layout ComfyUI's Adapter class uses (body.{2L+R}.x, body.{2L}.in_conv)."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] != "adapter":
            raise AdapterError(f"unexpected key {key!r} in a diffusers-format T2I-Adapter")
        parts = parts[1:]
        try:
            if parts[0] == "body" and len(parts) > 3 and parts[2] == "resnets":
                parts = ["body", str(int(parts[1]) * _RES_BLOCKS + int(parts[3]))] + parts[4:]
            elif parts[0] == "body" and len(parts) > 2:
                parts = ["body", str(int(parts[1]) * _RES_BLOCKS)] + parts[2:]
        except ValueError:
            raise AdapterError(f"unexpected key {key!r} in a diffusers-format T2I-Adapter") from None
        out[".".join(parts)] = value
    return out


def _full_adapter_from_state_dict(sd: dict[str, torch.Tensor]) -> comfy.t2i_adapter.adapter.Adapter:
    """Build ComfyUI's Adapter with the widths read from the weights (ComfyUI's own loader
    assumes the real adapters' c, 2c, 4c, 4c) and load it strictly."""
    conv_in = sd["conv_in.weight"]
    if conv_in.ndim != 4:
        raise AdapterError(f"conv_in.weight has shape {tuple(conv_in.shape)}, expected a 4-D conv weight")
    cin = conv_in.shape[1]
    # Pixel unshuffle 16 (SDXL adapters) or 8 (SD1.5) of a 3-channel (or grey) image.
    if cin in (256, 768):
        xl = True
    elif cin in (64, 192):
        xl = False
    else:
        raise AdapterError(f"T2I-Adapter input has {cin} channels after pixel unshuffle; expected 64/192 (SD1.5) "
                           f"or 256/768 (SDXL)")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("body.")})
    if blocks != list(range(_LEVELS * _RES_BLOCKS)):
        raise AdapterError(f"T2I-Adapter has resnet blocks {blocks}; expected {_LEVELS} levels of {_RES_BLOCKS}")
    channels = []
    for level in range(_LEVELS):
        key = f"body.{level * _RES_BLOCKS}.block1.weight"
        if key not in sd:
            raise AdapterError(f"T2I-Adapter weights lack {key!r}")
        channels.append(int(sd[key].shape[0]))
    ksize = int(sd["body.0.block2.weight"].shape[2])
    use_conv = any(k.endswith("down_opt.op.weight") for k in sd)
    model = comfy.t2i_adapter.adapter.Adapter(cin=cin, channels=channels, nums_rb=_RES_BLOCKS, ksize=ksize, sk=True,
                                              use_conv=use_conv, xl=xl)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"T2I-Adapter weights do not fit a full adapter with channels {channels}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in expected.items():
        if tuple(sd[key].shape) != tuple(value.shape):
            raise AdapterError(f"T2I-Adapter weight {key!r} has shape {tuple(sd[key].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


def load_t2i_adapter_state_dict(state_dict: dict[str, torch.Tensor]) -> comfy.controlnet.T2IAdapter:
    """A CONTROL_NET (ComfyUI's T2IAdapter) from adapter weights: diffusers or TencentARC keys,
    full adapters of any width; other adapter kinds go through ComfyUI's own loader."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise AdapterError("the adapter file holds no weights")
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise AdapterError("the adapter file holds non-tensor entries")
    sd = dict(state_dict)
    if _DIFFUSERS_PROBE in sd:
        sd = diffusers_to_tencent_keys(sd)
    if "conv_in.weight" in sd:
        model = _full_adapter_from_state_dict(sd)
        return comfy.controlnet.T2IAdapter(model, model.input_channels, 8, "nearest-exact")
    control = comfy.controlnet.load_t2i_adapter(sd) if "body.0.in_conv.weight" in sd else None
    if not isinstance(control, comfy.controlnet.T2IAdapter):
        raise AdapterError("not a T2I-Adapter (expected diffusers T2IAdapter weights such as "
                           "'adapter.body.0.resnets.0.block1.weight'); load ControlNets with ControlNetLoader")
    return control


def load_t2i_adapter_file(path: str) -> comfy.controlnet.T2IAdapter:
    # safe_load: safetensors, or torch.load(weights_only=True) for .bin/.pth.
    return load_t2i_adapter_state_dict(comfy.utils.load_torch_file(path, safe_load=True))


# -- fitting adapter, model and image ----------------------------------------------------------

@dataclass(frozen=True)
class AdapterLayout:
    family: str  # "SDXL" or "SD1.5"
    channels: tuple[int, ...]
    total_downscale: int  # image sides must be a multiple of this


def adapter_layout(control) -> AdapterLayout:
    if not isinstance(control, comfy.controlnet.T2IAdapter):
        raise AdapterError(f"control_net must be a T2I-Adapter (from ControlNetLoader or DMD2T2IAdapterLoader); "
                           f"got {type(control).__name__}, which this node cannot schedule")
    net = control.t2i_model
    if not isinstance(net, (comfy.t2i_adapter.adapter.Adapter, comfy.t2i_adapter.adapter.Adapter_light)):
        raise AdapterError(f"unsupported T2I-Adapter network {type(net).__name__} (only SD1.5/SDXL adapters)")
    channels = tuple(int(c) for c in net.channels)
    if getattr(net, "xl", False):
        return AdapterLayout("SDXL", channels, net.unshuffle_amount * 2)
    return AdapterLayout("SD1.5", channels, net.unshuffle_amount * 2 ** (len(channels) - 1))


def unet_levels(model) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channels per level, res blocks per level) of a ComfyUI MODEL's UNet."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    if "model_channels" not in config or "channel_mult" not in config:
        raise AdapterError(f"the model ({type(model.model).__name__}) is not an SD1.5/SDXL-style UNet; "
                           "T2I-Adapters attach to those only")
    levels = tuple(config["model_channels"] * m for m in config["channel_mult"])
    res_blocks = config.get("num_res_blocks", 2)
    res_blocks = tuple(res_blocks) if isinstance(res_blocks, (list, tuple)) else (res_blocks,) * len(levels)
    return levels, res_blocks


def check_adapter_fits_model(layout: AdapterLayout, model) -> None:
    """The adapter's features must land on the UNet's down blocks: SDXL adapters give
    (c, 2c, 4c) + a mid-block feature for a 3-level UNet, SD1.5 adapters one per level of 4."""
    levels, res_blocks = unet_levels(model)
    model_family = type(model.model).__name__
    if layout.family == "SDXL":
        fits = len(levels) == 3 and layout.channels[:3] == levels and layout.channels[3] == levels[2]
    else:
        fits = len(levels) == 4 and layout.channels == levels
    if not fits or any(n != _RES_BLOCKS for n in res_blocks):
        raise AdapterError(
            f"this is an {layout.family} T2I-Adapter (feature channels {list(layout.channels)}) but the model "
            f"({model_family}, UNet level channels {list(levels)}) does not match it: use an adapter made for "
            f"this model family (e.g. t2i-adapter-canny-sdxl-1.0 for SDXL)")


def hint_from_image(image, total_downscale: int) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] -> the adapter's hint [B,3,H,W], checked."""
    if not isinstance(image, torch.Tensor):
        raise AdapterError(f"image must be an IMAGE tensor [batch, height, width, channels]; got {type(image).__name__}")
    if image.ndim != 4:
        raise AdapterError(f"image must be an IMAGE tensor [batch, height, width, channels]; got shape {tuple(image.shape)}")
    if image.numel() == 0:
        raise AdapterError(f"image is empty (shape {tuple(image.shape)})")
    if not image.is_floating_point():
        raise AdapterError(f"image must hold floats in 0..1; got {image.dtype}")
    channels = image.shape[-1]
    if channels not in (1, 3, 4):
        raise AdapterError(f"image has {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if not torch.isfinite(image).all():
        raise AdapterError("image holds NaN or infinite values")
    height, width = image.shape[1], image.shape[2]
    if height % total_downscale or width % total_downscale:
        raise AdapterError(
            f"image is {width}x{height}; this adapter needs sides that are a multiple of {total_downscale}: "
            f"make the edge map at the generation size (e.g. DMD2CannyEdgeMap width/height), "
            f"e.g. {max(total_downscale, round(width / total_downscale) * total_downscale)}x"
            f"{max(total_downscale, round(height / total_downscale) * total_downscale)}")
    rgb = image[..., :3] if channels >= 3 else image.expand(-1, -1, -1, 3)
    return rgb.movedim(-1, 1).float().clamp(0.0, 1.0)


# -- the schedule ----------------------------------------------------------------------------

def active_steps(steps: int, factor: float) -> int:
    """Steps with the adapter on: int(steps * factor), as diffusers' adapter pipelines count."""
    if not 0.0 <= factor <= 1.0:
        raise AdapterError(f"factor must be within 0..1; got {factor}")
    return min(steps, math.floor(steps * factor + 1e-9))


def active_sigma_range(sigmas: torch.Tensor, factor: float) -> tuple[float, float] | None:
    """(high, low) sigma bounds inside which the adapter runs, or None when no step is active.

    ``sigmas`` is the sampler's schedule (descending, final 0). The low bound sits strictly
    between the last active and the first inactive step's sigma, never on a sampled sigma.
    """
    steps = [float(s) for s in sigmas[:-1]] if float(sigmas[-1]) == 0.0 else [float(s) for s in sigmas]
    n = active_steps(len(steps), factor)
    if n == 0:
        return None
    if n == len(steps):
        return math.inf, 0.0
    last_on, first_off = steps[n - 1], steps[n]
    if not last_on > first_off > 0.0:
        raise AdapterError(f"the schedule's sigmas must be strictly descending and positive; got {steps}")
    return math.inf, math.sqrt(last_on * first_off)


class ScheduledT2IAdapter(comfy.controlnet.T2IAdapter):
    """ComfyUI's T2IAdapter with its active range given in sigmas (not percents), and a clear
    error instead of a silently dropped adapter when the latent does not fit it."""

    def __init__(self, t2i_model, channels_in, compression_ratio, upscale_algorithm, device=None):
        super().__init__(t2i_model, channels_in, compression_ratio, upscale_algorithm, device=device)
        self.sigma_range = (math.inf, 0.0)
        self.total_downscale = 8

    @classmethod
    def from_adapter(cls, control: comfy.controlnet.T2IAdapter, sigma_range, total_downscale: int):
        new = cls(control.t2i_model, control.channels_in, control.compression_ratio, control.upscale_algorithm)
        control.copy_to(new)
        new.sigma_range = tuple(sigma_range)
        new.total_downscale = total_downscale
        return new

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.timestep_range = self.sigma_range

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        height, width = x_noisy.shape[2] * self.compression_ratio, x_noisy.shape[3] * self.compression_ratio
        if height % self.total_downscale or width % self.total_downscale:
            raise AdapterError(f"the generation size {width}x{height} is not a multiple of {self.total_downscale}, "
                               f"which this T2I-Adapter needs (its features would not match the UNet's)")
        return super().get_control(x_noisy, t, cond, batched_number, transformer_options)

    def copy(self):
        new = ScheduledT2IAdapter(self.t2i_model, self.channels_in, self.compression_ratio, self.upscale_algorithm)
        self.copy_to(new)
        new.sigma_range = self.sigma_range
        new.total_downscale = self.total_downscale
        return new


def apply_t2i_adapter(positive, control, image, model, sigmas: torch.Tensor, scale: float, factor: float):
    """New conditioning with the adapter attached to every entry of ``positive`` (chained after
    any control already there), active for the first int(steps * factor) steps of ``sigmas``."""
    if not isinstance(positive, list) or not all(isinstance(c, (list, tuple)) and len(c) == 2 for c in positive):
        raise AdapterError("positive must be CONDITIONING (e.g. from CLIPTextEncode)")
    layout = adapter_layout(control)
    check_adapter_fits_model(layout, model)
    hint = hint_from_image(image, layout.total_downscale)
    if not math.isfinite(scale):
        raise AdapterError(f"scale must be a finite number; got {scale}")
    sigma_range = active_sigma_range(sigmas, factor)
    if sigma_range is None:
        log.warning("DMD2ApplyT2IAdapter: factor %s of a %d-step schedule activates no step; the adapter is not used",
                    factor, len(sigmas) - 1)
        return positive
    template = ScheduledT2IAdapter.from_adapter(control, sigma_range, layout.total_downscale)
    out, attached = [], {}
    for embedding, options in positive:
        options = options.copy()
        previous = options.get("control")
        if previous not in attached:
            net = template.copy().set_cond_hint(hint, scale, (0.0, 1.0))
            net.set_previous_controlnet(previous)
            attached[previous] = net
        options["control"] = attached[previous]
        options["control_apply_to_uncond"] = False
        out.append([embedding, options])
    return out


# -- edge maps ------------------------------------------------------------------------------

def detection_size(width: int, height: int, detect_resolution: int) -> tuple[int, int]:
    """(w, h) with the shorter side at detect_resolution and the output's aspect ratio."""
    scale = detect_resolution / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def canny_edge_map(image, detect_resolution: int, width: int, height: int, low_threshold: float,
                   high_threshold: float) -> torch.Tensor:
    """The recipe's edge route: crop to the output's aspect, resize to the detection resolution,
    Canny (ComfyUI's kornia node), then resize the edge map to width x height (bilinear)."""
    from comfy_extras.nodes_canny import Canny

    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.numel() == 0 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise AdapterError(f"image must be a non-empty IMAGE tensor [batch, height, width, channels]; got {shape}")
    if image.shape[-1] not in (1, 3, 4):
        raise AdapterError(f"image has {image.shape[-1]} channels; expected 1, 3 or 4")
    if not 0.0 < low_threshold < high_threshold < 1.0:
        raise AdapterError(f"need 0 < low_threshold < high_threshold < 1; got {low_threshold}, {high_threshold}")
    pixels = image[..., :3] if image.shape[-1] >= 3 else image.expand(-1, -1, -1, 3)
    pixels = pixels.float().clamp(0.0, 1.0).movedim(-1, 1)
    det_w, det_h = detection_size(width, height, detect_resolution)
    # Crop to the output aspect first, so that edges are never stretched.
    pixels = comfy.utils.common_upscale(pixels, det_w, det_h, "area" if det_w * det_h < pixels.shape[2] * pixels.shape[3]
                                        else "bicubic", "center").clamp(0.0, 1.0)
    edges = Canny.execute(pixels.movedim(1, -1), low_threshold, high_threshold).result[0]
    edges = comfy.utils.common_upscale(edges.movedim(-1, 1).float(), width, height, "bilinear", "disabled")
    return edges.clamp(0.0, 1.0).movedim(1, -1).contiguous()


# -- nodes ----------------------------------------------------------------------------------

ADAPTER_FOLDER = "controlnet"  # ComfyUI maps models/controlnet and models/t2i_adapter onto it


class DMD2T2IAdapterLoader(io.ComfyNode):
    """Loads diffusers/TencentARC T2I-Adapters of any width (ComfyUI's loader assumes the
    real adapters' channel ratios) with a clear error for files that are not adapters; the
    recipe's canny adapter is fetched on first use like the DMD2 releases."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMD2T2IAdapterLoader",
            display_name="DMD2 T2I-Adapter Loader",
            category="DMD2/adapter",
            description="Load a T2I-Adapter (diffusers diffusion_pytorch_model.safetensors renamed, or TencentARC "
                        "format) from models/controlnet or models/t2i_adapter; the SDXL canny adapter of DMD2's "
                        "recipe is downloaded into models/controlnet on first use.",
            inputs=[io.Combo.Input("adapter_name", options=file_options(ADAPTER_FOLDER, "t2i_adapter"),
                                   tooltip="The adapter file: t2i-adapter-canny-sdxl-1.0.safetensors (TencentARC's SDXL "
                                           "canny adapter, downloaded into models/controlnet on first use) or any "
                                           "adapter in models/controlnet or models/t2i_adapter.")],
            outputs=[io.ControlNet.Output()],
        )

    @classmethod
    def validate_inputs(cls, adapter_name) -> bool | str:
        return check_choice(ADAPTER_FOLDER, "t2i_adapter", adapter_name)

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        path = str(resolve_file(ADAPTER_FOLDER, adapter_name, "t2i_adapter"))
        try:
            return io.NodeOutput(load_t2i_adapter_file(path))
        except AdapterError as e:
            raise AdapterError(f"{adapter_name}: {e}") from None


class DMD2ApplyT2IAdapter(io.ComfyNode):
    """Attaches a T2I-Adapter to the positive conditioning for the first steps of the DMD2
    schedule, the way the recipe's adapter_conditioning_scale/factor do."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMD2ApplyT2IAdapter",
            display_name="DMD2 Apply T2I-Adapter",
            category="DMD2/adapter",
            description="T2I-Adapter on the positive conditioning with the recipe's scale and factor (fraction of the "
                        "schedule's steps with the adapter on), cut between steps of the actual schedule. Works at cfg 1.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning; no negative is needed."),
                io.ControlNet.Input("control_net", tooltip="A T2I-Adapter from ControlNetLoader or DMD2T2IAdapterLoader."),
                io.Image.Input("image", tooltip="The hint, e.g. a canny edge map at the generation size "
                                                "(sides a multiple of 32 for SDXL adapters, 64 for SD1.5)."),
                io.Model.Input("model", tooltip="The model you sample with: its sigma table places the cut and "
                                                "its architecture is checked against the adapter."),
                preset_input(),
                custom_timesteps_input(),
                io.Float.Input("scale", default=0.8, min=0.0, max=10.0, step=0.01,
                               tooltip="adapter_conditioning_scale: multiplies the adapter's features (recipe: 0.8)."),
                io.Float.Input("factor", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="adapter_conditioning_factor: the adapter is on for the first int(steps x factor) "
                                       "steps of the schedule (recipe: 0.5 = first 2 of 4)."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def validate_inputs(cls, preset, custom_timesteps) -> bool | str:
        return validate_custom_text(preset, custom_timesteps)

    @classmethod
    def execute(cls, positive, control_net, image, model, preset, custom_timesteps, scale, factor) -> io.NodeOutput:
        sigmas = schedule_sigmas(model, preset, custom_timesteps)
        return io.NodeOutput(apply_t2i_adapter(positive, control_net, image, model, sigmas, scale, factor))


class DMD2CannyEdgeMap(io.ComfyNode):
    """The recipe's edge route: Canny at the detection resolution, resized to the generation size."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMD2CannyEdgeMap",
            display_name="DMD2 Canny Edge Map",
            category="DMD2/adapter",
            description="Canny edges (ComfyUI's kornia Canny) detected with the shorter side at detect_resolution, "
                        "then resized to width x height, as DMD2's canny adapter recipe does (384 -> 1024).",
            inputs=[
                io.Image.Input("image", tooltip="The image to take edges from (cropped to the output's aspect ratio)."),
                io.Int.Input("detect_resolution", default=384, min=64, max=4096, step=8,
                             tooltip="Shorter side during edge detection (recipe: 384)."),
                io.Int.Input("width", default=1024, min=64, max=8192, step=8,
                             tooltip="Edge map width: the generation width (a multiple of 32 for SDXL adapters)."),
                io.Int.Input("height", default=1024, min=64, max=8192, step=8,
                             tooltip="Edge map height: the generation height (a multiple of 32 for SDXL adapters)."),
                io.Float.Input("low_threshold", default=LOW_THRESHOLD, min=0.01, max=0.99, step=0.01,
                               tooltip="Canny low threshold on kornia's gradient scale (default approximates the "
                                       "recipe's OpenCV 100)."),
                io.Float.Input("high_threshold", default=HIGH_THRESHOLD, min=0.01, max=0.99, step=0.01,
                               tooltip="Canny high threshold on kornia's gradient scale (default approximates the "
                                       "recipe's OpenCV 200)."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, image, detect_resolution, width, height, low_threshold, high_threshold) -> io.NodeOutput:
        return io.NodeOutput(canny_edge_map(image, detect_resolution, width, height, low_threshold, high_threshold))



NODE_CLASSES = [DMD2T2IAdapterLoader, DMD2ApplyT2IAdapter, DMD2CannyEdgeMap]
