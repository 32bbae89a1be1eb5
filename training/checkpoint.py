"""Where a community checkpoint's model and conditions come from, through ComfyUI.

A single-file SD1.5/SD2.x/SDXL checkpoint (eps or v prediction, with or without zero
terminal SNR: its ``bases.Family``), or a Flux.1 [dev] model (a diffusion-model file with its
text encoder files, as ComfyUI's UNETLoader and DualCLIPLoader read them, or a full checkpoint)
is loaded with ComfyUI's own ``comfy`` package (so whatever ComfyUI loads, the trainer loads). Its text encoders turn the prompts and the real
images' captions into ``Conditioning`` once (SDXL: plus the pooled vector and size
conditioning, built by ComfyUI's ``encode_adm``); its VAE turns real images into latents once
and decodes sample previews. Both are then released. The model itself goes to the one
shared-base backend (``backend.SharedBaseBackend``), exactly like the digits teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import bases
from ..comfy_env import ensure_comfy
from .backend import Conditioning
from .data import load_image, square_crop


class CheckpointError(ValueError):
    """The checkpoint file is missing, unreadable or not a diffusion checkpoint."""


class UnsupportedModel(ValueError):
    """A checkpoint ComfyUI can load but this trainer does not handle (yet)."""


@dataclass
class LoadedCheckpoint:
    """What ComfyUI made of a checkpoint file: ``model`` (ModelPatcher), ``clip``, ``vae``."""

    path: Path
    family: bases.Family  # architecture and sampling, on the model's own sigma table
    model: Any
    clip: Any
    vae: Any

    @property
    def arch(self) -> str:
        """'sd15', 'sd2', 'sdxl' or 'flux_dev'."""
        return self.family.name


def _read_state_dict(path: Path, mmap: bool = False, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors of a .safetensors file, or of a .ckpt/.pt file unpickled safely (weights only);
    ``mmap``: map a .ckpt's storage instead of reading it (enough to look at its keys);
    ``what``: the file's role in the messages (a checkpoint, an init LoRA)."""
    import pickle

    try:
        if path.suffix.lower() in (".safetensors", ".sft"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118 (safe_open is no dict)
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # torch's refusal of objects, vs bytes that are no pickle
            raise CheckpointError(f"cannot read {what} {path}: it is corrupt or not a model file (not a readable pickle)") from exc
        raise CheckpointError(
            f"{path} is a pickle that holds more than tensors (Python objects or code): it is refused because "
            "loading it could run that code. Use the model's .safetensors file, or convert it with a tool you trust"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read {what} {path}: it is corrupt or not a model file ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{what} {path} does not hold a state dict of tensors")
    return data, None


# What a file holds, told from its tensor names alone (kohya / diffusers / LDM conventions).
_LORA_MARKS = ("lora_down", "lora_up", "lora.down.", "lora.up.", ".lora_A.", ".lora_B.", "lora_unet_", "lora_te", "hada_w1", "lokr_w1")
_TEXT_MARKS = ("text_model.", "transformer.resblocks.", "text_projection", "token_embedding", "cond_stage_model.", "conditioner.")
_VAE_MARKS = ("encoder.down", "decoder.up", "quant_conv", "first_stage_model.", "encoder.conv_in", "decoder.conv_in", "taesd_decoder.")
_UNET_MARKS = ("model.diffusion_model.", "input_blocks.", "middle_block.", "time_embed.", "time_embedding.", "down_blocks.")
WHAT_IS_NEEDED = ("--checkpoint takes a full single-file SD1.5/SD2.x/SDXL checkpoint (UNet, text encoder and VAE in one file, as in "
                  "models/checkpoints) or a Flux.1 [dev] model (models/diffusion_models, with --text-encoder for its clip_l and "
                  "t5xxl files)")
# A Flux.1 transformer's own key names (ComfyUI's, as the models/diffusion_models files have them).
_FLUX_MARKS = ("double_blocks.0.img_attn.", "single_blocks.0.linear1.")
FLUX_ARCHS = ("flux_dev", "flux_schnell")


def classify_keys(keys) -> tuple[str, str | None]:
    """(kind, arch) of a state dict from its key names: kind is 'checkpoint', 'lora', 'vae',
    'text_encoder', 'unet' or 'unknown'; arch ('sdxl' / 'sd2' / 'sd15') is a guess for
    checkpoints (SDXL's UNet takes a size/pooled-text vector: ``label_emb``; SD2.x's text
    encoder is OpenCLIP's, ``cond_stage_model.model.``), confirmed by ComfyUI's loader. A Flux.1
    transformer is 'unet' (a diffusion-model file) or 'checkpoint' (with text encoders or VAE)
    of arch 'flux_dev' or 'flux_schnell' ([dev] embeds its guidance: ``guidance_in``)."""
    keys = list(keys)
    has = lambda marks: any(m in k for k in keys for m in marks)  # noqa: E731
    if has(_LORA_MARKS):
        return "lora", None
    unet = has(_UNET_MARKS)
    text = has(_TEXT_MARKS)
    vae = has(_VAE_MARKS)
    if has(_FLUX_MARKS):
        arch = "flux_dev" if has(("guidance_in.",)) else "flux_schnell"
        prefixed = any(k.startswith("model.diffusion_model.") for k in keys)
        return ("checkpoint" if prefixed and (text or vae) else "unet"), arch
    if unet and any(k.startswith("model.diffusion_model.") for k in keys) and (text or vae):
        if any(k.startswith(("model.diffusion_model.label_emb.", "conditioner.embedders.1.")) for k in keys):
            return "checkpoint", "sdxl"
        open_clip = any(k.startswith(("cond_stage_model.model.", "conditioner.embedders.0.model.")) for k in keys)
        return "checkpoint", "sd2" if open_clip else "sd15"
    if unet:
        return "unet", None
    if vae and not text:
        return "vae", None
    if text and not vae:
        return "text_encoder", None
    return "unknown", None


def refuse_non_checkpoint(path: Path, kind: str, arch: str | None = None) -> None:
    """Name what a file that is no full checkpoint is, and what --checkpoint needs instead (a
    Flux diffusion-model file is a model: its text encoders come as their own files)."""
    if kind == "unet" and arch in FLUX_ARCHS:
        return
    what = {
        "lora": "a LoRA (it only holds low-rank updates for a model; train on the model it was made for)",
        "vae": "a VAE (an image autoencoder only)",
        "text_encoder": "a text encoder (CLIP) only",
        "unet": "a UNet-only file (a diffusion model without its text encoder and VAE, as in models/diffusion_models)",
    }.get(kind)
    if what is not None:
        raise CheckpointError(f"{path} is {what}, not a checkpoint: {WHAT_IS_NEEDED}")
    if kind == "unknown":
        raise UnsupportedModel(f"ComfyUI does not recognise a diffusion model in {path} (unsupported architecture): {WHAT_IS_NEEDED}")


def peek_checkpoint(path: str | Path) -> tuple[str, str | None]:
    """``classify_keys`` of a checkpoint before loading it (``header_tensors``: no weight is
    read). Raises CheckpointError for a missing, corrupt or refused file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return classify_keys(header_tensors(path))


# The one weight ComfyUI's SD2.x config reads to tell 768-v from 512-base (its norm's spread).
SD2_V_TEST_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def peek_family(path: str | Path) -> bases.Family:
    """The family ComfyUI will load a checkpoint as, before loading it: ComfyUI's own model
    detection and ``model_type`` on the header (SDXL's ``v_pred``/``ztsnr`` keys), plus for
    SD2.x the one weight its v test reads (nothing else is read). ``load_checkpoint``'s
    family must agree."""
    path = Path(path)
    kind, arch = peek_checkpoint(path)
    refuse_non_checkpoint(path, kind, arch)
    ensure_comfy()
    import comfy.model_base
    import comfy.model_detection

    state = header_tensors(path)
    if arch in FLUX_ARCHS:
        return _peek_flux(path, state, kind)
    if arch == "sd2" and SD2_V_TEST_KEY in state:  # its 320 values: the only weight read before loading
        state[SD2_V_TEST_KEY] = _read_one(path, SD2_V_TEST_KEY)
    config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    if config is None:
        raise UnsupportedModel(f"ComfyUI does not recognise a diffusion model in {path} (unsupported architecture): {WHAT_IS_NEEDED}")
    kind = config.model_type(state, "model.diffusion_model.")
    prediction = {comfy.model_base.ModelType.EPS: "eps", comfy.model_base.ModelType.V_PREDICTION: "v"}.get(kind)
    if prediction is None:
        raise UnsupportedModel(f"{path.name} samples with {kind.name} ({type(config).__name__}): only eps- and v-prediction "
                               "SD1.5/SD2.x/SDXL bases on the DDPM timestep table are supported")
    return bases.get_family(arch, prediction, bool(config.sampling_settings.get("zsnr", False)))


def _peek_flux(path: Path, state: dict, kind: str) -> bases.Family:
    """The Flux family ComfyUI's detection makes of a header: [dev] (guidance embedded), or a
    refusal of [schnell] and of Flux variants the trainer does not distil (inpainting, Flux.2)."""
    import comfy.model_detection
    import comfy.supported_models as sm

    prefix = "model.diffusion_model." if kind == "checkpoint" else ""
    config = comfy.model_detection.model_config_from_unet(state, prefix)
    if config is None or not isinstance(config, sm.Flux) or isinstance(config, (sm.FluxInpaint, sm.Flux2)):
        found = "no diffusion model" if config is None else type(config).__name__
        raise UnsupportedModel(f"ComfyUI reads {found} in {path}: the trainer distils Flux.1 [dev] (and SD1.5/SD2.x/SDXL)")
    if isinstance(config, sm.FluxSchnell):
        raise UnsupportedModel(SCHNELL_REFUSAL.format(name=path.name))
    return bases.FLUX_DEV


def _read_one(path: Path, key: str) -> torch.Tensor:
    """One tensor of a checkpoint (a .safetensors reads just it)."""
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(key)
    return _read_state_dict(path, mmap=True)[0][key].clone()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def header_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as an empty ``meta`` tensor of its shape and dtype: what
    can be known without reading a weight (a .safetensors header; a .ckpt mapped, not read)."""
    path = Path(path)
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                out = {}
                for key in fh.keys():  # noqa: SIM118 (safe_open is no dict)
                    part = fh.get_slice(key)
                    out[key] = torch.empty(part.get_shape(), dtype=_SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32), device="meta")
                return out
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a model file ({type(exc).__name__}: {exc})") from exc
    return {k: torch.empty_like(v, device="meta") for k, v in _read_state_dict(path, mmap=True)[0].items()}


def detect_family(model) -> bases.Family:
    """The family of a ComfyUI MODEL (its patched ``model_sampling``: a ModelSamplingDiscrete
    node in front counts) or BaseModel, when the trainer can distil it: SD1.5, SD2.x or SDXL,
    eps or v prediction, with or without zero terminal SNR. Else UnsupportedModel in one line
    naming the family or the sampling (x0-prediction UNets are students, not teachers)."""
    base = getattr(model, "model", model)
    config = base.model_config
    name = type(config).__name__
    try:
        family = bases.family_of(model)
    except bases.FamilyError as exc:
        raise UnsupportedModel(str(exc)) from None
    if family.name == "flux_schnell":
        raise UnsupportedModel(SCHNELL_REFUSAL.format(name=name))
    if family.name == "flux_dev":  # flux_family already told it apart from inpainting, Flux.2, Chroma
        return family
    if family.prediction == "flow":
        raise UnsupportedModel(f"{name} is a flow-matching model ({family.label}): dmd2-train distils Flux.1 [dev], SD1.5, "
                               "SD2.x and SDXL")
    if family.prediction not in ("eps", "v"):
        raise UnsupportedModel(f"{name} model samples with {family.prediction} prediction: that is a few-step student's UNet, "
                               "not a teacher; distil from the eps- or v-prediction base it was made from")
    if family.zsnr and family.prediction == "eps":
        raise UnsupportedModel(ZSNR_EPS_REFUSAL.format(name=name))
    if config.unet_config.get("in_channels", 4) != 4:
        raise UnsupportedModel(f"{name} checkpoint has {config.unet_config['in_channels']} input channels (inpainting/instruct models are not supported)")
    return family


# [schnell] is refused, not warned about: it is already timestep-distilled (adversarial diffusion
# distillation to 1-4 steps), so its output at an intermediate time is its own jump towards a
# sample, not the data's score there; a DMD2 real score read from it is wrong, whatever the student.
SCHNELL_REFUSAL = ("{name} is FLUX.1 [schnell], which is already distilled to few steps: its output at intermediate "
                   "times is not the data's score, so it cannot be the DMD2 teacher (real score); distil FLUX.1 [dev] "
                   "or a [dev] finetune")

ZSNR_EPS_REFUSAL = ("{name} model samples with eps prediction and zero terminal SNR: an eps network has no clean-sample "
                    "prediction at the last timestep (alpha = 0 there), so it cannot be distilled; zero-terminal-SNR models "
                    "are v-prediction (ModelSamplingDiscrete set to v_prediction with zsnr)")


def detect_arch(model) -> str:
    """``detect_family(model).name``: 'sd15', 'sd2', 'sdxl' or 'flux_dev'."""
    return detect_family(model).name


# Flux.1's text encoders, as ComfyUI's DualCLIPLoader (type flux) takes them from models/text_encoders.
FLUX_TEXT_ENCODERS = {"clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}


def text_encoder_role(path: str | Path) -> str | None:
    """'clip_l' or 't5xxl' for a Flux text encoder file (from its header: CLIP's text_model
    layers below CLIP-H's 23, or a T5 encoder stack); None for anything else."""
    keys = list(header_tensors(path))
    if any(k.startswith("encoder.block.") and ".SelfAttention." in k for k in keys):
        return "t5xxl"
    clip = [k for k in keys if k.startswith("text_model.encoder.layers.")]
    if clip and not any(k.startswith("text_model.encoder.layers.22.") for k in clip):
        return "clip_l"
    return None


def check_text_encoders(model_path: str | Path, kind: str, arch: str | None, text_encoders, vae: str | Path | None = None,
                        images: bool = False) -> dict[str, Path]:
    """Before anything loads: the text encoder files a model needs, by role ({'clip_l': path,
    't5xxl': path}; empty where the checkpoint carries its own), and the VAE file if given. A
    Flux diffusion-model file needs both of Flux's; an SD checkpoint takes none; real images
    need a VAE. Each refusal is one line naming the file or the flag to add."""
    model_path = Path(model_path)
    flux = arch in FLUX_ARCHS
    if text_encoders and not flux:
        raise CheckpointError(f"--text-encoder is for Flux.1 models: {model_path.name} is an SD checkpoint and carries its own")
    if vae:
        vae = Path(vae)
        if not vae.is_file():
            raise CheckpointError(f"VAE not found: {vae}")
        vae_kind, _ = classify_keys(header_tensors(vae))
        if vae_kind != "vae":
            raise CheckpointError(f"{vae} is {_KIND_WORDS.get(vae_kind, 'not a model file ComfyUI reads')}, not a VAE: --vae takes "
                                  "the model's autoencoder (Flux.1: ae.safetensors, models/vae)")
        if not flux:
            raise CheckpointError(f"--vae is for Flux.1 models: {model_path.name} is an SD checkpoint and carries its own")
    roles: dict[str, Path] = {}
    for given in text_encoders or ():
        path = Path(given)
        if not path.is_file():
            raise CheckpointError(f"text encoder not found: {path}")
        role = text_encoder_role(path)
        if role is None:
            what = _KIND_WORDS.get(classify_keys(header_tensors(path))[0], "another text encoder")
            raise CheckpointError(f"{path} is {what}, not one of Flux.1's text encoders (clip_l, t5xxl)")
        if role in roles:
            raise CheckpointError(f"--text-encoder: {roles[role].name} and {path.name} are both {role}; Flux.1 takes one clip_l "
                                  "and one t5xxl file")
        roles[role] = path
    missing = [role for role in FLUX_TEXT_ENCODERS if role not in roles]
    if flux and kind == "unet" and missing:
        flags = " ".join(f"--text-encoder {FLUX_TEXT_ENCODERS[role]}" for role in missing)
        raise CheckpointError(f"{model_path.name} is a Flux diffusion model without its text encoders: add {flags} "
                              f"(models/text_encoders; the files ComfyUI's DualCLIPLoader reads with type flux)")
    if flux and roles and missing:
        raise CheckpointError(f"--text-encoder: Flux.1 takes both clip_l and t5xxl; add --text-encoder {FLUX_TEXT_ENCODERS[missing[0]]}")
    if flux and kind == "unet" and images and not vae:
        raise CheckpointError(f"--images: the real images are encoded with the model's VAE, which {model_path.name} does not "
                              "hold: add --vae ae.safetensors (models/vae)")
    return roles


_KIND_WORDS = {"lora": "a LoRA", "vae": "a VAE", "text_encoder": "a text encoder", "unet": "a diffusion model",
               "checkpoint": "a full checkpoint", "unknown": "not a model file ComfyUI reads"}


def load_checkpoint(path: str | Path, weight_dtype: torch.dtype | None = None, text_encoders: dict[str, Path] | None = None,
                    vae: str | Path | None = None) -> LoadedCheckpoint:
    """Load a single-file checkpoint, or a Flux diffusion-model file, with ComfyUI's loaders
    (CheckpointLoaderSimple's, UNETLoader's); ``text_encoders`` ({role: path}, from
    ``check_text_encoders``) through DualCLIPLoader's (type flux), ``vae`` through VAELoader's.
    Refuse clearly what is unsupported. A Flux model may come without a VAE (``vae`` None:
    no real images, no sample grids)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    ensure_comfy()
    import comfy.sd

    state_dict, metadata = _read_state_dict(path)
    kind, arch = classify_keys(state_dict)
    refuse_non_checkpoint(path, kind, arch)
    options = {"dtype": weight_dtype} if weight_dtype is not None else {}
    try:
        if kind == "unet":  # a Flux diffusion-model file: the UNETLoader's route
            model, clip, vae_model = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options=options, metadata=metadata), None, None
            out = None if model is None else (model,)
        else:
            out = comfy.sd.load_state_dict_guess_config(state_dict, output_vae=True, output_clip=not text_encoders,
                                                        model_options=options, metadata=metadata)
            if out is not None:
                model, clip, vae_model = out[0], out[1], out[2]
        del state_dict
        if out is None or model is None:
            raise UnsupportedModel(f"ComfyUI does not recognise a diffusion model in {path} (unsupported architecture)")
        if text_encoders:
            clip = comfy.sd.load_clip([str(text_encoders[role]) for role in FLUX_TEXT_ENCODERS], clip_type=comfy.sd.CLIPType.FLUX)
        if vae:
            vae_model = comfy.sd.VAE(sd=_read_state_dict(Path(vae), what="VAE")[0])
    except (CheckpointError, UnsupportedModel):
        raise
    except Exception as exc:
        raise CheckpointError(f"ComfyUI could not load {path}: {type(exc).__name__}: {exc}") from exc
    family = detect_family(model)
    flux = family.prediction == "flow"
    if clip is None:
        raise CheckpointError(f"{path} holds no text encoder: " + ("add --text-encoder clip_l.safetensors --text-encoder "
                              "t5xxl_fp16.safetensors" if flux else "a full single-file checkpoint is needed"))
    if vae_model is None and not flux:
        raise CheckpointError(f"{path} holds no VAE: a full single-file checkpoint is needed")
    channels = model.model.latent_format.latent_channels
    if vae_model is not None and vae_model.latent_channels != channels:
        raise CheckpointError(f"the VAE {Path(vae).name if vae else path.name} makes {vae_model.latent_channels}-channel latents, "
                              f"the model takes {channels}: give the model's own VAE (Flux.1: ae.safetensors)")
    return LoadedCheckpoint(path=path, family=family, model=model, clip=clip, vae=vae_model)


@dataclass
class RunTexts:
    """Every text a run encodes once, and where each lands in ``TrainingData``: the empty
    prompt (the unconditional side), the training prompts, the preview prompts and each
    distinct caption of the real images (``captions``: one per image, None for none)."""

    prompts: list[str]
    sample_prompts: list[str]
    captions: list[str | None]

    @property
    def distinct_captions(self) -> list[str]:
        return sorted({c for c in self.captions if c is not None})

    def all(self) -> list[str]:
        """The texts to encode, in the order ``split`` reads their conditionings."""
        return ["", *self.prompts, *self.sample_prompts, *self.distinct_captions]

    def split(self, conds: Sequence[Conditioning], real_latents: torch.Tensor | None, uncond: str = "empty"):
        """(TrainingData, preview conditionings) from the conditionings of ``all()``; the
        unconditional side is the empty prompt's, or ``zero_conditioning`` of it with
        ``uncond="zeros"`` (``DMD2Config.uncond``)."""
        from .backend import TrainingData

        n, m = len(self.prompts), len(self.sample_prompts)
        by_caption = dict(zip(self.distinct_captions, conds[1 + n + m :]))
        real_captions = None
        if real_latents is not None and self.captions:
            real_captions = [None if c is None else by_caption[c] for c in self.captions]
        empty = zero_conditioning(conds[0]) if uncond == "zeros" else conds[0]
        return TrainingData(list(conds[1 : 1 + n]), empty, real_latents, real_captions), list(conds[1 + n : 1 + n + m])


SDXL_SIZE_EMBEDDING = 6 * 256  # the end of SDXL's y: six 256-wide embeddings of sizes and crop


def zero_conditioning(cond: Conditioning) -> Conditioning:
    """The reference's unconditional side for SDXL: zero text context and zero pooled text,
    the size conditioning kept (SDXL's y is the pooled text, then the size embeddings)."""
    y = None
    if cond.y is not None:
        y = cond.y.clone()
        y[:, : y.shape[1] - SDXL_SIZE_EMBEDDING] = 0
    return Conditioning(None if cond.context is None else torch.zeros_like(cond.context), y)


@torch.no_grad()
def encode_prompts(loaded: LoadedCheckpoint, prompts: Sequence[str], resolution: int) -> list[Conditioning]:
    """Each prompt through the checkpoint's text encoders (one (1, L, D) context each; the
    unconditional embedding is the empty prompt's, as in the reference for SD1.5)."""
    out = []
    for prompt in prompts:
        tokens = loaded.clip.tokenize(prompt)
        context, pooled = loaded.clip.encode_from_tokens(tokens, return_pooled=True)
        y = None
        if loaded.family.pooled:
            y = loaded.model.model.encode_adm(
                pooled_output=pooled, width=resolution, height=resolution, crop_w=0, crop_h=0,
                target_width=resolution, target_height=resolution,
            )
        out.append(Conditioning(context.detach().float().cpu(), None if y is None else y.detach().float().cpu()))
    return out


@torch.no_grad()
def encode_images(loaded: LoadedCheckpoint, paths: Sequence[Path], resolution: int, batch_size: int = 4) -> torch.Tensor:
    """Real image files -> the model's latent space (VAE encode, then ``process_latent_in``)."""
    return _encode_pixels(loaded, [lambda p=p: load_image(p, resolution) for p in paths], batch_size)


@torch.no_grad()
def encode_image_batch(loaded: LoadedCheckpoint, images: torch.Tensor, resolution: int, batch_size: int = 4) -> torch.Tensor:
    """A ComfyUI IMAGE batch (B, H, W, 3) in [0, 1] -> latents, each image fitted to the square
    exactly as an image file is (``data.square_crop``)."""
    from PIL import Image

    def fitted(image: torch.Tensor):
        pixels = (image.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype("uint8")
        return square_crop(Image.fromarray(pixels[..., :3]).convert("RGB"), resolution)

    return _encode_pixels(loaded, [lambda i=i: fitted(images[i]) for i in range(len(images))], batch_size)


def _encode_pixels(loaded: LoadedCheckpoint, loaders, batch_size: int) -> torch.Tensor:
    latents = []
    for i in range(0, len(loaders), batch_size):
        pixels = torch.stack([load() for load in loaders[i : i + batch_size]])
        raw = loaded.vae.encode(pixels)
        latents.append(loaded.model.model.process_latent_in(raw.float().cpu()))
    return torch.cat(latents)


@torch.no_grad()
def decode_latents(loaded: LoadedCheckpoint, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> images (B, H, W, 3) in [0, 1] with the checkpoint's VAE."""
    raw = loaded.model.model.process_latent_out(latents.detach().float().cpu())
    return loaded.vae.decode(raw).float().clamp(0, 1).cpu()
