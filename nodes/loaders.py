"""DMD2 UNet and LoRA loaders: find or fetch the release file, read it without unpickling,
check it against the connected base model, then build the MODEL.

Why not ComfyUI's stock UNETLoader / LoraLoader:
- the SDXL DMD2 UNets ship as diffusers-key ``.bin`` pickles; they must be read with
  ``torch.load(weights_only=True)`` and checked key by key before anything is built;
- an SD1.5 file on an SDXL graph (or the reverse) must fail with a message that says so,
  not with a shape error deep in ``load_state_dict``;
- the stock LoRA loader only logs "lora key not loaded" and goes on; here every key of the
  file must land on a weight of the model (same shapes), or the node fails;
- a release that is not on disk is fetched from the hub into the right model folder
  (resumable, with progress), or the error names the file and the folder to put it in.

The finding and fetching half (``file_options``, ``check_choice``, ``resolve_file``) also
serves the T2I-Adapter loader (nodes/adapter.py), so every registry file behaves the same.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from comfy_api.latest import io

from .families import SAMPLING_METADATA_KEY
from .releases import RELEASES_BY_NAME, Release, releases, tag_lora_sampling, tag_release
from .schedules import as_x0_model

log = logging.getLogger(__name__)

UNET_FOLDER = "diffusion_models"  # ComfyUI also maps the legacy "unet" folder onto it
LORA_FOLDER = "loras"
CHECKPOINT_FOLDER = "checkpoints"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
KIND_NAMES = {"unet": "few-step UNet", "lora": "few-step LoRA", "t2i_adapter": "known T2I-Adapter",
              "checkpoint": "few-step checkpoint"}  # for messages
FAMILY_NAMES = {"sdxl": "SDXL", "sd15": "SD1.5", "sd2": "SD2.x", "unknown": "an unknown architecture"}


class DMD2LoadError(ValueError):
    """A DMD2 weights file that cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------------------
# Reading files: tensors only, never arbitrary pickles
# --------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch ``.bin``/``.pt`` read with
    ``weights_only=True`` (memory-mapped where the format allows). Any other content is
    refused before it can run."""
    path = Path(path)
    if not path.is_file():
        raise DMD2LoadError(f"{path.name}: no such file ({path}).")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        import safetensors.torch

        try:
            sd = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise DMD2LoadError(
                f"{path.name} is not a readable safetensors file ({e}). It is probably truncated "
                f"(an interrupted download): delete {path} and download it again."
            ) from e
    else:
        sd = _torch_load_tensors_only(path)
    return _check_flat_tensors(sd, path.name)


def _torch_load_tensors_only(path: Path) -> dict:
    if not zipfile.is_zipfile(path):
        # Legacy (pre-1.6) pickles cannot be memory-mapped; weights_only still guards them.
        mmap_options = [False]
    else:
        mmap_options = [True, False]
    last_error: Exception | None = None
    for mmap in mmap_options:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL [\w.]+|WeightsUnpickler error: [^\n]+", str(e))
            what = found.group(0) if found else _first_line(e)
            raise DMD2LoadError(
                f"Refused to load {path.name}: it holds Python objects other than tensors ({what}), which a "
                "weights file never needs; it may be malicious. Nothing from it was executed. "
                "Use the official release file, or a .safetensors copy."
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            last_error = e
            if mmap and "mmap" in str(e).lower():
                continue  # this layout cannot be mapped: read it normally
            break
    raise DMD2LoadError(
        f"Could not read {path.name} ({_first_line(last_error).split('. ')[0]}). The file is truncated or corrupt "
        f"(an interrupted download?): delete {path} and download it again."
    ) from last_error


def _check_flat_tensors(sd, name: str) -> dict[str, torch.Tensor]:
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict) and len(sd) <= 4:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise DMD2LoadError(f"{name} holds no tensors (expected a state dict of UNet weights).")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DMD2LoadError(f"{name} is not a plain state dict: {len(bad)} entries are not tensors, e.g. {bad[:3]}.")
    return sd


def _first_line(e: BaseException | None) -> str:
    text = str(e).strip().splitlines() if e is not None else []
    return text[0][:300] if text else type(e).__name__


# --------------------------------------------------------------------------------------
# Architecture: family traits of a file and of the connected model
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetTraits:
    family: str  # "sdxl", "sd15", "sd2" or "unknown"
    key_format: str  # "diffusers" or "ldm"
    context_dim: int | None  # cross-attention (text embedding) width
    linear_projection: bool | None  # transformer proj_in is a Linear (SDXL/SD2) or a 1x1 conv (SD1.x)
    adm: bool  # vector conditioning (SDXL's add_embedding / label_emb)

    def describe(self) -> str:
        details = [f"cross-attention dim {self.context_dim}"] if self.context_dim is not None else []
        details.append(("with" if self.adm else "without") + " pooled-text/size embedding")
        return f"{FAMILY_NAMES.get(self.family, self.family)} UNet ({', '.join(details)})"


LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_ldm_prefix(sd: dict) -> dict:
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _family(adm: bool, linear: bool | None, context_dim: int | None) -> str:
    if context_dim is None or linear is None:
        return "unknown"
    if adm and linear:
        return "sdxl"
    if not adm and not linear:
        return "sd15"
    if not adm and linear:
        return "sd2"
    return "unknown"


def unet_traits(sd: dict) -> UNetTraits:
    """Family traits of a UNet state dict with diffusers or ComfyUI (LDM) key names.
    Works on shapes only, so tiny test models and the real releases take the same path."""
    if "conv_in.weight" in sd:
        fmt, adm_prefixes, proj_in = "diffusers", ("add_embedding.", "class_embedding."), r"attentions\.\d+\.proj_in\.weight$"
    elif "input_blocks.0.0.weight" in sd:
        fmt, adm_prefixes, proj_in = "ldm", ("label_emb.",), r"\.1\.proj_in\.weight$"
    else:
        raise DMD2LoadError(
            "not a Stable Diffusion UNet state dict (no conv_in.weight / input_blocks.0.0.weight key); "
            f"first keys: {sorted(sd)[:5]}"
        )
    adm = any(k.startswith(adm_prefixes) for k in sd)
    to_k = r"\.attn2\.to_k\.weight$"  # the text projection: its input width is the context dim
    context_dim = next((tuple(v.shape)[1] for k, v in sd.items() if re.search(to_k, k) and len(v.shape) == 2), None)
    linear = next((len(v.shape) == 2 for k, v in sd.items() if re.search(proj_in, k)), None)
    return UNetTraits(_family(adm, linear, context_dim), fmt, context_dim, linear, adm)


@dataclass
class TargetUNet:
    """What a file must match: the connected model's family, UNet config (for the
    diffusers->ComfyUI key map) and its exact weight names and shapes."""

    family: str
    context_dim: int | None
    unet_config: dict
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def from_unet(cls, unet_config: dict, diffusion_model: torch.nn.Module) -> TargetUNet:
        shapes = {k: tuple(v.shape) for k, v in diffusion_model.state_dict().items()}
        adm = unet_config.get("adm_in_channels") is not None or any(k.startswith("label_emb.") for k in shapes)
        linear = bool(unet_config.get("use_linear_in_transformer", False))
        context_dim = unet_config.get("context_dim")
        return cls(_family(adm, linear, context_dim), context_dim, dict(unet_config), shapes)

    @classmethod
    def from_model(cls, model) -> TargetUNet:
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "diffusion_model") or not hasattr(base, "model_config"):
            raise DMD2LoadError("the connected MODEL is not a ComfyUI diffusion model (no UNet found).")
        target = cls.from_unet(base.model_config.unet_config, base.diffusion_model)
        if target.family not in ("sdxl", "sd15"):
            raise DMD2LoadError(
                f"the connected MODEL ({type(base).__name__}) is neither SDXL nor SD1.5; DMD2 releases exist for those two."
            )
        return target

    def describe(self) -> str:
        return f"{FAMILY_NAMES[self.family]} (cross-attention dim {self.context_dim})"


def diffusers_to_ldm_map(unet_config: dict) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> ComfyUI key, from ComfyUI's own table. ComfyUI maps
    label_emb from both class_embedding.* and add_embedding.*; SDXL files carry add_embedding."""
    import comfy.utils

    return comfy.utils.unet_to_diffusers(unet_config)


def to_comfy_unet_state_dict(sd: dict, target: TargetUNet, name: str = "the file") -> dict:
    """Check architecture, exact key set and shapes; return the weights under ComfyUI names.
    Nothing is copied: the returned dict holds the file's tensors."""
    sd = strip_ldm_prefix(sd)
    try:
        traits = unet_traits(sd)
    except DMD2LoadError as e:
        raise DMD2LoadError(f"{name} is {e}") from None
    if traits.family != target.family or traits.context_dim != target.context_dim:
        raise DMD2LoadError(
            f"{name} is an {traits.describe()}, but the connected model is {target.describe()}. "
            f"Either connect a base checkpoint of the file's architecture ({FAMILY_NAMES.get(traits.family, traits.family)}), "
            f"or pick a DMD2 file made for {FAMILY_NAMES[target.family]}."
        )
    if traits.key_format == "diffusers":
        mapping = diffusers_to_ldm_map(target.unet_config)
        unexpected = sorted(k for k in sd if k not in mapping)
        out = {mapping[k]: v for k, v in sd.items() if k in mapping}
        if len(out) != len(sd) - len(unexpected):
            raise DMD2LoadError(f"{name} maps two keys onto one weight (both add_embedding and class_embedding?).")
    else:
        out = dict(sd)
        unexpected = sorted(k for k in out if k not in target.shapes)
    missing = sorted(k for k in target.shapes if k not in out)
    unexpected += sorted(k for k in out if k not in target.shapes and k not in unexpected)
    if missing or unexpected:
        raise DMD2LoadError(
            f"{name} does not hold exactly the weights of the connected {FAMILY_NAMES[target.family]} UNet: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
            "It is not a DMD2 generator for this architecture, or it is incomplete."
        )
    wrong = [(k, tuple(v.shape), target.shapes[k]) for k, v in out.items() if tuple(v.shape) != target.shapes[k]]
    if wrong:
        k, got, want = wrong[0]
        raise DMD2LoadError(
            f"{name}: {len(wrong)} weights have other shapes than the connected UNet's, e.g. {k}: {got} in the file, "
            f"{want} in the model. The file was made for a different model size."
        )
    bad_dtype = [k for k, v in out.items() if not v.is_floating_point()]
    if bad_dtype:
        raise DMD2LoadError(f"{name}: {len(bad_dtype)} weights are not floating point, e.g. {bad_dtype[:3]}.")
    return out


def build_model_like(base, ldm_sd: dict):
    """A new ModelPatcher with the base model's config, dtype and devices and the given UNet
    weights; the base model is left untouched. The UNet is built on the meta device and takes
    the file's tensors as its parameters (cast only where the dtype differs), so an fp16 file on
    an fp16 model costs no second copy; ComfyUI's copy-into-allocated-weights path is the
    fallback. Empties ``ldm_sd``."""
    import comfy.model_patcher

    config = copy.copy(base.model.model_config)
    config.unet_config = dict(config.unet_config)
    new_model = _assign_weights(config, ldm_sd)
    if new_model is None:
        new_model = config.get_model({}, "")  # DMD2 generators are eps-prediction, like their teachers
        new_model.load_model_weights(ldm_sd, "")
    ldm_sd.clear()
    new_model = new_model.to(base.offload_device)
    return comfy.model_patcher.ModelPatcher(new_model, load_device=base.load_device, offload_device=base.offload_device)


def _assign_weights(config, ldm_sd: dict):
    try:
        new_model = config.get_model({}, "", device=torch.device("meta"))
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:  # cannot be built on meta: copy instead
        log.debug("DMD2: meta build failed (%s), copying weights instead", e)
        return None
    unet = new_model.diffusion_model
    slots = unet.state_dict()
    weights = {k: v if v.dtype == slots[k].dtype else v.to(slots[k].dtype) for k, v in ldm_sd.items()}
    unet.load_state_dict(weights, strict=True, assign=True)
    left_on_meta = [n for n, t in list(new_model.named_parameters()) + list(new_model.named_buffers()) if t.is_meta]
    if left_on_meta:
        log.debug("DMD2: %d tensors not in the state dict (%s...), copying weights instead", len(left_on_meta), left_on_meta[:2])
        return None
    return new_model


def load_dmd2_unet(base_model, path: str | os.PathLike, convert_to_safetensors: bool = False):
    """Read, validate and build: the DMD2 generator in place of the base model's UNet."""
    path = Path(path)
    target = TargetUNet.from_model(base_model)
    sd = read_state_dict(path)
    ldm_sd = to_comfy_unet_state_dict(sd, target, name=path.name)
    if convert_to_safetensors and path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        save_safetensors_copy(sd, path)
    del sd
    return build_model_like(base_model, ldm_sd)


# --------------------------------------------------------------------------------------
# .bin -> .safetensors
# --------------------------------------------------------------------------------------
def safetensors_path_for(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix(".safetensors")


def save_safetensors_copy(sd: dict, source: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Write the (already validated) tensors of ``source`` as safetensors next to it (same key
    names), so later loads need no pickle at all. Skips when the target exists."""
    import safetensors.torch

    source = Path(source)
    dest = Path(dest) if dest is not None else safetensors_path_for(source)
    if dest.exists():
        log.info("DMD2: %s already exists, not converting again", dest)
        return dest
    seen: set[int] = set()
    tensors = {}
    for k, v in sd.items():  # safetensors refuses shared storage; copy only the (rare) shared ones
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        tensors[k] = v.contiguous() if ptr not in seen else v.clone().contiguous()
        seen.add(ptr)
    tmp = dest.with_name(dest.name + ".part")
    safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt", "converted_from": source.name})
    os.replace(tmp, dest)
    log.info("DMD2: wrote %s", dest)
    return dest


def convert_bin_to_safetensors(source: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Read a torch .bin with weights_only and write its tensors as safetensors."""
    return save_safetensors_copy(read_state_dict(source), source, dest)


# --------------------------------------------------------------------------------------
# Finding and fetching files
# --------------------------------------------------------------------------------------
def check_choice(folder_name: str, kind: str, name) -> bool | str:
    """Submit-time check of a combo value (ComfyUI does not check V3 combos itself)."""
    if not isinstance(name, str):
        return True  # linked from another node: checked when it runs
    if name in file_options(folder_name, kind):
        return True
    return f"{name!r} is neither a {KIND_NAMES.get(kind, kind)} release nor a file in the {folder_name} folders."


def file_options(folder_name: str, kind: str) -> list[str]:
    """The combo: known releases of the kind first (fetched on first use), then local files."""
    import folder_paths

    known = [r.file_name for r in releases(kind)]
    local = [f for f in folder_paths.get_filename_list(folder_name) if f not in known]
    return known + sorted(local)


class _ComfyTqdm:
    """tqdm for huggingface_hub that also drives ComfyUI's progress bar (bytes)."""

    @staticmethod
    def make():
        import comfy.utils
        from tqdm.auto import tqdm

        class ComfyTqdm(tqdm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._comfy_bar = comfy.utils.ProgressBar(max(int(self.total or 0), 1))

            def update(self, n=1):
                out = super().update(n)
                if self.total:
                    self._comfy_bar.update_absolute(int(self.n), int(self.total))
                return out

        return ComfyTqdm


def download_release(release: Release, folder: str | os.PathLike, endpoint: str | None = None) -> Path:
    """Fetch a release into ``folder`` under its registry name from the hub.

    huggingface_hub (2.x) resumes only within one call and deletes its partial file when the
    call fails; DMD2 UNets are 3-5 GB, so the partial file is kept here instead, in
    ``folder/.dmd2-download/<name>.<etag>.part``, and the next run continues it with an HTTP
    Range request (through huggingface_hub's own metadata and download calls: same endpoint,
    auth, retries and progress bar). The result is checked against the hub's size and sha256."""
    folder = Path(folder)
    dest = folder / release.file_name
    try:
        from huggingface_hub import constants as hf_constants
    except ImportError as e:  # pragma: no cover - a dependency of the pack
        raise _not_found(release, folder, "huggingface_hub is not installed") from e
    if hf_constants.HF_HUB_OFFLINE:
        raise _not_found(release, folder, "offline mode is on (HF_HUB_OFFLINE=1)")
    log.info("DMD2: downloading %s (%s) from %s into %s", release.file_name, release.approx_size, release.url, folder)
    try:
        part = _fetch_part(release, folder / ".dmd2-download", endpoint)
        os.replace(part, dest)
    except Exception as e:  # network down, offline, 404, disk full, read-only folder: "put it there yourself"
        raise _not_found(release, folder, f"download failed: {_first_line(e)}") from e
    return dest


def _fetch_part(release: Release, staging: Path, endpoint: str | None) -> Path:
    import hashlib

    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get

    meta = get_hf_file_metadata(hf_hub_url(release.repo_id, release.repo_path, endpoint=endpoint))
    etag = (meta.etag or "unknown").strip('"')
    staging.mkdir(parents=True, exist_ok=True)
    part = staging / f"{release.file_name}.{re.sub(r'[^0-9A-Za-z_-]', '', etag)[:64]}.part"
    for stale in staging.glob(f"{release.file_name}.*.part"):  # partial files of an older version
        if stale != part:
            stale.unlink()
    resume = part.stat().st_size if part.exists() else 0
    if meta.size is not None and resume > meta.size:
        part.unlink()
        resume = 0
    with open(part, "ab") as f:
        http_get(meta.location, f, resume_size=resume, expected_size=meta.size, displayed_filename=release.file_name,
                 tqdm_class=_ComfyTqdm.make())
    size = part.stat().st_size
    if meta.size is not None and size != meta.size:
        raise OSError(f"got {size} bytes of {meta.size}")
    if re.fullmatch(r"[0-9a-f]{64}", etag):  # LFS files: the etag is the file's sha256
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != etag:
            part.unlink()
            raise OSError(f"sha256 mismatch (expected {etag}); the partial file was removed, run again")
    return part


def _not_found(release: Release, folder: Path, reason: str) -> DMD2LoadError:
    return DMD2LoadError(
        f"{release.file_name} is not in {folder} and could not be downloaded ({reason}). "
        f"Download it from {release.url} ({release.approx_size}) and save it as {folder / release.file_name}."
    )


def resolve_file(folder_name: str, name: str, kind: str, endpoint: str | None = None) -> Path:
    """Local path of a combo choice, fetching a known release when it is missing."""
    import folder_paths

    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise DMD2LoadError(f"{name!r}: only files inside the {folder_name} folders can be loaded.")
    path = folder_paths.get_full_path(folder_name, name)
    if path is not None:
        return Path(path)
    release = RELEASES_BY_NAME.get(name)
    if release is None or release.kind != kind:
        raise DMD2LoadError(f"{name} was not found in the {folder_name} folders: {folder_paths.get_folder_paths(folder_name)}.")
    return download_release(release, download_folder(folder_name), endpoint=endpoint)


def download_folder(folder_name: str) -> str:
    """Where fetched releases go: the folder named like the kind (models/diffusion_models rather
    than the legacy models/unet that ComfyUI lists first), else the first one."""
    import folder_paths

    paths = folder_paths.get_folder_paths(folder_name)
    return next((p for p in paths if Path(p).name == folder_name), paths[0])


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------
class _ReadTracker(dict):
    """A state dict that remembers which keys ComfyUI's LoRA loader actually read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def lora_patches(model, lora_sd: dict, name: str = "the LoRA") -> dict:
    """ComfyUI's own LoRA parsing (comfy.lora.load_lora) on the model's key map, failing on
    any key it would skip and on any up/down pair whose product is not the target's shape."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.weight_adapter

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    tracked = _ReadTracker(comfy.lora_convert.convert_lora(dict(lora_sd)))
    patches = comfy.lora.load_lora(tracked, key_map, log_missing=False)
    unread = sorted(set(tracked) - tracked.read)
    if unread:
        text_keys = [k for k in unread if k.startswith(("lora_te", "text_encoder", "te_"))]
        hint = (" It holds text-encoder weights: DMD2 LoRAs are UNet-only; use ComfyUI's LoraLoader for this file."
                if text_keys else _lora_arch_hint(model, lora_sd))
        raise DMD2LoadError(
            f"{name}: {len(unread)} of its {len(tracked)} keys match no weight of the connected model "
            f"(e.g. {unread[:3]}), so they would be silently skipped.{hint}"
        )
    weights = model.model.state_dict()
    for target_key, patch in patches.items():
        if target_key not in weights:
            raise DMD2LoadError(f"{name}: the model has no weight {target_key}.")
        if isinstance(patch, comfy.weight_adapter.LoRAAdapter):
            up, down = patch.weights[0], patch.weights[1]
            shape = tuple(weights[target_key].shape)
            fits = up.shape[0] == shape[0] and up.shape[1] == down.shape[0] and down[0].numel() * shape[0] == _numel(shape)
            if not fits:
                raise DMD2LoadError(
                    f"{name}: the LoRA for {target_key} has up {tuple(up.shape)} / down {tuple(down.shape)}, which does "
                    f"not fit the weight's shape {shape}.{_lora_arch_hint(model, lora_sd)}"
                )
    return patches


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _lora_arch_hint(model, lora_sd: dict) -> str:
    target = TargetUNet.from_model(model)
    ctx = next((tuple(v.shape)[1] for k, v in lora_sd.items() if re.search(r"attn2_to_k\.lora_down\.weight$", k)), None)
    if ctx is not None and ctx != target.context_dim:
        made_for = {2048: "SDXL", 768: "SD1.5", 1024: "SD2.x"}.get(ctx)
        made_for = f"{made_for} (cross-attention dim {ctx})" if made_for else f"cross-attention dim {ctx}"
        return f" The LoRA was made for {made_for}; the model is {target.describe()}."
    return ""


def load_dmd2_lora(model, path: str | os.PathLike, strength: float):
    """The model with the DMD2 LoRA applied at ``strength`` (a clone; the input is untouched)."""
    path = Path(path)
    TargetUNet.from_model(model)
    lora_sd = read_state_dict(path)
    patches = lora_patches(model, lora_sd, name=path.name)
    new_model = model.clone()
    applied = set(new_model.add_patches(patches, strength))
    skipped = sorted(set(patches) - applied)
    if skipped:
        raise DMD2LoadError(f"{path.name}: ComfyUI did not apply {len(skipped)} patches, e.g. {skipped[:3]}.")
    sampling = lora_base_sampling(path)
    return tag_lora_sampling(new_model, path.name, sampling) if sampling else new_model


def lora_base_sampling(path: Path) -> str | None:
    """The sampling ('eps', 'v', 'v + zsnr') a LoRA of this pack records for its base (the
    safetensors header only; other formats carry none)."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return (fh.metadata() or {}).get(SAMPLING_METADATA_KEY) or None


def with_release(model, name: str, kind: str):
    """Tag a freshly loaded model (a clone this pack owns) with the registry release of that
    name, if it is one, so the sampler can pick or check the family's recipe; an x0 UNet
    (SDXL-Lightning 1-step) is set to read its output as x0 right here."""
    release = RELEASES_BY_NAME.get(name)
    if release is None or release.kind != kind:
        return model
    if release.prediction == "x0":
        model = as_x0_model(model)
    return tag_release(model, release)


# --------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------


def _release_table(kind: str) -> str:
    """Tooltip text: each release with its architecture and the sampling preset it needs."""
    entries = []
    for r in releases(kind):
        preset = r.preset if r.preset != "custom" else "custom " + ",".join(map(str, r.timesteps))
        entries.append(f"{r.file_name} ({FAMILY_NAMES[r.arch]}, preset {preset})")
    return "Releases: " + "; ".join(entries) + "."


class DMD2UNetLoader(io.ComfyNode):
    """Swap the base model's UNet for a DMD2 generator (checked against the base first)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMD2UNetLoader",
            display_name="DMD2 UNet Loader",
            category="DMD2/loaders",
            description="Loads a few-step generator UNet (DMD2, SDXL-Lightning, Hyper-SDXL 1-step; diffusers .bin or "
                        ".safetensors) in place of the base model's UNet. The file is read without unpickling and checked "
                        "against the base model's architecture; the Lightning 1-step UNet is read as x0.",
            inputs=[
                io.Model.Input("model", tooltip="The base checkpoint's MODEL (SDXL or SD1.5): gives the architecture, "
                                                "dtype and sampling settings; its weights are not changed."),
                io.Combo.Input("unet_name", options=file_options(UNET_FOLDER, "unet"),
                               tooltip="A few-step UNet: the known releases (downloaded into models/diffusion_models on first "
                                       "use) or any file in models/diffusion_models or models/unet. " + _release_table("unet")),
                io.Boolean.Input("convert_to_safetensors", default=False,
                                 tooltip="After a successful check, also write the .bin as .safetensors next to it "
                                         "(same keys), so later loads need no pickle. Off: nothing is written."),
            ],
            outputs=[io.Model.Output(tooltip="The few-step model. Sample it with DMD2Generate at the file's preset.")],
        )

    @classmethod
    def validate_inputs(cls, unet_name) -> bool | str:
        return check_choice(UNET_FOLDER, "unet", unet_name)

    @classmethod
    def execute(cls, model, unet_name, convert_to_safetensors=False) -> io.NodeOutput:
        path = resolve_file(UNET_FOLDER, unet_name, "unet")
        model = load_dmd2_unet(model, path, convert_to_safetensors=convert_to_safetensors)
        return io.NodeOutput(with_release(model, unet_name, "unet"))


class DMD2LoraLoader(io.ComfyNode):
    """Apply the DMD2 LoRA to a base model, refusing files whose keys would be skipped."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMD2LoraLoader",
            display_name="DMD2 LoRA Loader",
            category="DMD2/loaders",
            description="Applies a few-step UNet LoRA (DMD2, SDXL-Lightning, Hyper-SD, LCM, TCD, or your own) with "
                        "ComfyUI's LoRA machinery; fails if any key of the file would not be applied (ComfyUI's "
                        "LoraLoader only logs those).",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SDXL 1.0 or an SDXL finetune)."),
                io.Combo.Input("lora_name", options=file_options(LORA_FOLDER, "lora"),
                               tooltip="A few-step LoRA release (downloaded into models/loras on first use) or a local "
                                       "UNet LoRA. " + _release_table("lora")),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="LoRA strength. 1.0 on SDXL base; community finetunes often look better "
                                       "at about 0.5-0.8."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the LoRA; sample it with the file's preset.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name) -> bool | str:
        return check_choice(LORA_FOLDER, "lora", lora_name)

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        path = resolve_file(LORA_FOLDER, lora_name, "lora")
        return io.NodeOutput(with_release(load_dmd2_lora(model, path, strength), lora_name, "lora"))


class DMD2CheckpointLoader(io.ComfyNode):
    """A few-step checkpoint (SDXL-Turbo) fetched on first use, tagged with its release."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMD2CheckpointLoader",
            display_name="Few-Step Checkpoint Loader",
            category="DMD2/loaders",
            description="Loads a few-step checkpoint (MODEL, CLIP, VAE) with ComfyUI's own checkpoint loading; a known "
                        "release (e.g. SDXL-Turbo) is downloaded into models/checkpoints on first use, and the sampler "
                        "nodes then know its family.",
            inputs=[
                io.Combo.Input("ckpt_name", options=file_options(CHECKPOINT_FOLDER, "checkpoint"),
                               tooltip="A few-step checkpoint release or any file in models/checkpoints. "
                                       + _release_table("checkpoint")),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name) -> bool | str:
        return check_choice(CHECKPOINT_FOLDER, "checkpoint", ckpt_name)

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        import comfy.sd
        import folder_paths

        path = resolve_file(CHECKPOINT_FOLDER, ckpt_name, "checkpoint")
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
        return io.NodeOutput(with_release(model, ckpt_name, "checkpoint"), clip, vae)


NODE_CLASSES = [DMD2UNetLoader, DMD2LoraLoader, DMD2CheckpointLoader]
