"""Training data for the command: prompts, real images, and caches of what they encode to.

Everything here is validated before the first output file is written, so that bad input
fails fast with a message naming the file, and leaves nothing half-written behind.
Text embeddings and image latents are computed once and cached as safetensors files keyed
by the checkpoint's hash and the inputs (a re-run or a resume does not encode again).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Files allowed next to images without being images (kohya-style captions, notes).
SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".md"}


class DataError(ValueError):
    """Bad training input: missing or empty prompts, unreadable images, bad resolution."""


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"prompts file {path} is not UTF-8 text: {exc}") from exc
    prompts = prompt_lines(text)
    if not prompts:
        raise DataError(f"prompts file {path} holds no prompts (one prompt per line expected)")
    return prompts


def prompt_lines(text: str) -> list[str]:
    """The prompts of a text (a file's, or a node's multiline input): one per line, blank
    lines and lines starting with ``#`` skipped."""
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def check_resolution(resolution: int, multiple: int = 8) -> int:
    """Image side in pixels: positive and a multiple of ``multiple`` (8: one latent pixel)."""
    if not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
        raise DataError(f"resolution must be a positive multiple of {multiple} pixels, got {resolution!r}")
    return resolution


def list_images(folder: str | Path) -> list[Path]:
    """The image files of a folder (sorted), checked to open as images.

    Caption sidecars (.txt, .caption, .json, .md) and hidden files are skipped; any other
    file is an error, and so is an image file that does not decode."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"images folder not found: {folder}")
    images, bad = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir() or path.suffix.lower() in SIDECAR_SUFFIXES:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            bad.append(f"{path.name} (not an image file type)")
            continue
        try:
            with Image.open(path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            bad.append(f"{path.name} ({type(exc).__name__}: {exc})")
            continue
        images.append(path)
    if bad:
        raise DataError(f"images folder {folder} holds files that are not readable images: " + "; ".join(bad[:10]))
    if not images:
        raise DataError(f"images folder {folder} holds no images")
    return images


CAPTION_SUFFIXES = (".txt", ".caption")


def read_caption(image: Path) -> str | None:
    """The caption of a real image from its sidecar (``image.txt``, else ``image.caption``),
    or None when it has none. A caption that is not UTF-8 text is an error naming the file."""
    for suffix in CAPTION_SUFFIXES:
        sidecar = image.with_suffix(suffix)
        if sidecar.is_file():
            try:
                return sidecar.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as exc:
                raise DataError(f"caption file {sidecar} is not UTF-8 text: {exc}") from exc
    return None


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB image resized (shorter side) and centre-cropped to a square: (H, W, 3) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        return square_crop(im.convert("RGB"), resolution)


def square_crop(image, resolution: int) -> torch.Tensor:
    """A PIL RGB image resized (shorter side, Lanczos) and centre-cropped to ``resolution``
    square: (H, W, 3) in [0, 1]. Files and ComfyUI IMAGE batches go through this one path."""
    import numpy as np
    from PIL import Image

    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def file_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of a (possibly multi-GB) file, remembered in ``cache_dir`` by size and mtime."""
    path = Path(path)
    stat = path.stat()
    memo = None
    if cache_dir is not None:
        memo = Path(cache_dir) / "file_hashes.json"
        known = json.loads(memo.read_text()) if memo.is_file() else {}
        entry = known.get(str(path.resolve()))
        if entry and entry["size"] == stat.st_size and entry["mtime"] == stat.st_mtime:
            return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo is not None:
        known = json.loads(memo.read_text()) if memo.is_file() else {}
        known[str(path.resolve())] = {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": value}
        write_text_atomic(memo, json.dumps(known, indent=1))
    return value


def cache_key(*parts: object) -> str:
    """A short stable hash of whatever decides a cache's content."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(items: Iterable[bytes | str]) -> str:
    """sha256 (16 hex digits) of a sequence, each item length-prefixed: ["ab", "c"] and
    ["a", "bc"] differ, and so does the same set in another order (other batches)."""
    digest = hashlib.sha256()
    for item in items:
        data = item.encode() if isinstance(item, str) else bytes(item)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def data_fingerprints(prompts: Sequence[str], images: Iterable[bytes] | None = None,
                      captions: Sequence[str | None] = ()) -> dict[str, str | None]:
    """What a run trains on, for its checkpoints' settings (``run.resume_settings``): the
    prompt lines, the real images (their bytes, in order) and their captions, each as
    "<count> <what>, sha256 <hash>" (None: no images, no captions). A resume with other data
    would go on from weights and optimiser state made on the old data, and a finished run
    would re-export the old LoRA: both report success with nothing trained on the new data."""
    shown = {"prompts": f"{len(prompts)} prompt{'' if len(prompts) == 1 else 's'}, sha256 {fingerprint(prompts)}",
             "images": None, "captions": None}
    if images is not None:
        count = 0

        def counted():
            nonlocal count
            for data in images:
                count += 1
                yield data

        digest = fingerprint(counted())
        shown["images"] = f"{count} image{'' if count == 1 else 's'}, sha256 {digest}"
    if any(captions):
        shown["captions"] = f"{sum(map(bool, captions))} captioned, sha256 {fingerprint(c or '' for c in captions)}"
    return shown


def load_cached(path: Path) -> dict[str, torch.Tensor] | None:
    """A cache file's tensors, or None when absent or unreadable (then it is rebuilt)."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 (a damaged cache is only a cache: rebuild it)
        return None


def save_cached(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from .lora import save_safetensors_atomic

    save_safetensors_atomic({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)


def created_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask. ``mkstemp``'s temp files
    are 0o600, which would keep a ComfyUI running as another user from reading the LoRA."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, created_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
