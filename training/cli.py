"""``dmd2-train``: distil a community SD1.5/SDXL checkpoint into a few-step DMD2 LoRA.

    dmd2-train --checkpoint model.safetensors --prompts prompts.txt --output runs/mine \\
        [--images real/] [--config run.toml] [--set key=value ...]

Settings come from the per-architecture defaults (the architecture is read from the
checkpoint), then the TOML file, then the command line. The algorithm's keys are those of
``training.config.DMD2Config``; the run's keys (files, resolution, LoRA size, how often to
save...) are those of ``RunConfig`` below. Both may be set in the TOML file (top level, or
``[run]`` / ``[dmd2]`` tables) and with ``--set key=value``.

All input is checked before anything is written. Checkpoints are written atomically and the
run resumes from the newest one when started again with the same output folder. Under
``torchrun`` each process trains on its own batches and the adapters' gradients are averaged.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
import torch

log = logging.getLogger("dmd2-train")

CHECKPOINT_DIR = re.compile(r"^step_(\d{7,})$")
PRESETS = {(999, 749, 499, 249): "4-step (999,749,499,249)", (399,): "1-step (399)"}
DMD2_FLAGS = {"steps", "seed", "batch_size", "grad_accum", "ema_decay", "regression_steps"}
PLOTTED = (
    "loss_regression", "loss_dm", "loss_fake", "loss_gan_generator", "loss_gan_discriminator",
    ("logits_real", "logits_fake"), "discriminator_accuracy",
)


@dataclass
class RunConfig:
    """What the command needs besides the algorithm: inputs, outputs, sizes, cadence."""

    checkpoint: str = ""
    prompts: str = ""
    output: str = ""
    images: str = ""  # optional folder of real images (captions: image.txt / image.caption): the GAN loss
    resolution: int = 0  # 0: 1024 for SDXL, 512 for SD1.5
    lora_rank: int = 64
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ()  # empty: the DMD2 defaults (training.lora.DEFAULT_TARGETS)
    lora_name: str = ""  # file name of the exported LoRA; empty: dmd2_<checkpoint stem>_lora
    save_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500  # 0: only at the end
    sample_prompts: tuple[str, ...] = ()  # empty: the first four training prompts
    sample_seeds: tuple[int, ...] = (0, 1, 2, 3)
    device: str = ""  # empty: cuda if available, else cpu
    mixed_precision: str = ""  # "bf16" | "fp16" | "no"; empty: bf16 on GPU, no on CPU
    gradient_checkpointing: str = "auto"  # "auto" (on for GPU) | "on" | "off"
    resume: bool = True
    export_raw: bool = False  # also write the raw (not averaged) generator as <lora_name>_raw

    def validate(self) -> None:
        from .config import ConfigError

        for key in ("checkpoint", "prompts", "output"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is required (--{key} or `{key} = ...` in the config file)")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ConfigError("lora_rank must be >= 1 and lora_alpha > 0")
        if self.save_every < 1 or self.sample_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("save_every and keep_checkpoints must be >= 1, sample_every >= 0")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise ConfigError("gradient_checkpointing must be auto, on or off")
        if self.mixed_precision not in ("", "bf16", "fp16", "no"):
            raise ConfigError("mixed_precision must be bf16, fp16 or no")
        if not self.sample_seeds:
            raise ConfigError("sample_seeds must hold at least one seed")


def _coerce_run(name: str, value: Any) -> Any:
    """TOML/CLI value -> the RunConfig field's type."""
    from .config import ConfigError

    kind = {f.name: f.type for f in dataclasses.fields(RunConfig)}[name]
    try:
        if kind.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [str(v).strip() for v in items if str(v).strip()]
            return tuple(int(v) for v in items) if "int" in kind else tuple(items)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if name == "gradient_checkpointing" and isinstance(value, bool):
            return "on" if value else "off"
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {name!r}: cannot read {value!r} as {kind}") from exc


EXAMPLES = """\
examples:
  # SDXL finetune -> 4-step LoRA, with real images for the GAN term
  dmd2-train --checkpoint ComfyUI/models/checkpoints/myFinetune.safetensors \\
             --prompts prompts.txt --images real_images/ --output runs/myFinetune-4step

  # SD1.5 checkpoint -> 1-step LoRA (timestep 999), regression warm start first
  dmd2-train --checkpoint ComfyUI/models/checkpoints/mySD15.safetensors \\
             --prompts prompts.txt --output runs/mySD15-1step --timesteps 1-step --regression-steps 1000

  From a ComfyUI install without installing the pack, with ComfyUI's own Python:
    python ComfyUI/custom_nodes/comfyui-dmd2/dmd2_train.py --checkpoint ... (same flags)

where ComfyUI is found: $COMFYUI_PATH if set, else the ComfyUI folder this pack sits in
(ComfyUI/custom_nodes/comfyui-dmd2), else the copy recorded by scripts/setup-test-env.sh.
Stop with Ctrl-C (or SIGTERM): the run saves a checkpoint and resumes when the same command
is run again. Settings: per-architecture defaults < --config TOML < --set KEY=VALUE < flags;
every key: docs/training.md.
"""


def _defaults(key: str) -> str:
    """'default: X' for a dmd2 key, per architecture where the two differ."""
    from .config import ARCH_DEFAULTS, DMD2Config

    base = getattr(DMD2Config(), key)
    values = {arch: ARCH_DEFAULTS[arch].get(key, base) for arch in ("sdxl", "sd15")}
    if values["sdxl"] == values["sd15"]:
        return f"default: {values['sdxl']}"
    return f"default: {values['sdxl']} for SDXL, {values['sd15']} for SD1.5"


def build_parser() -> argparse.ArgumentParser:
    run = RunConfig()
    p = argparse.ArgumentParser(
        prog="dmd2-train",
        description="Distil an SD1.5/SDXL single-file checkpoint into a few-step DMD2 LoRA for ComfyUI. "
        "Writes the LoRA (the generator's moving average), a workflow that uses it, sample grids, "
        "loss curves and resumable checkpoints into --output.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with run and dmd2 keys (default: none)")
    p.add_argument("--checkpoint", metavar="FILE", help="the SD1.5/SDXL single-file checkpoint to distil, .safetensors preferred (required)")
    p.add_argument("--prompts", metavar="FILE", help="text file, one training prompt per line, # comments (required)")
    p.add_argument("--images", metavar="DIR", help="folder of real images, captions in image.txt / image.caption (default: none, and no GAN loss)")
    p.add_argument("--output", metavar="DIR", help="output folder; a folder with checkpoints is resumed (required)")
    p.add_argument("--steps", type=int, help=f"DMD2 training iterations, >= 1 ({_defaults('steps')})")
    p.add_argument("--seed", type=int, help=f"random seed ({_defaults('seed')})")
    p.add_argument("--resolution", type=int, help="image side in pixels, a multiple of 8 (default: 1024 for SDXL, 512 for SD1.5)")
    p.add_argument("--timesteps", help="the student's schedule: 4-step (999,749,499,249), 1-step (399 for SDXL, 999 for SD1.5, "
                   "as in the reference) or a list such as 999,499 (default: 4-step)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help=f"samples per micro-batch and process ({_defaults('batch_size')})")
    p.add_argument("--grad-accum", type=int, dest="grad_accum", help=f"micro-batches accumulated per update ({_defaults('grad_accum')})")
    p.add_argument("--ema-decay", type=float, dest="ema_decay", help=f"generator moving average per generator update, 0 = off ({_defaults('ema_decay')})")
    p.add_argument("--regression-steps", type=int, dest="regression_steps",
                   help=f"regression warm-start iterations before DMD2, for 1-step students ({_defaults('regression_steps')})")
    p.add_argument("--export-raw", dest="export_raw", action="store_true", default=None,
                   help="also export the raw generator as <name>_raw.safetensors (default: off)")
    p.add_argument("--lora-rank", type=int, dest="lora_rank", help=f"rank of the generator and fake-score LoRAs (default: {run.lora_rank})")
    p.add_argument("--lora-alpha", type=float, dest="lora_alpha", help=f"LoRA alpha; the update is scaled by alpha/rank (default: {run.lora_alpha})")
    p.add_argument("--lora-name", dest="lora_name", help="file name of the exported LoRA (default: dmd2_<checkpoint name>_lora)")
    p.add_argument("--save-every", type=int, dest="save_every", help=f"iterations between resumable checkpoints (default: {run.save_every})")
    p.add_argument("--sample-every", type=int, dest="sample_every",
                   help=f"iterations between sample grids in <output>/samples, 0 = only at the end (default: {run.sample_every})")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument("--mixed-precision", dest="mixed_precision", choices=["bf16", "fp16", "no"],
                   help="autocast dtype and the frozen base weights' dtype on a GPU (default: bf16 on GPU, no on CPU)")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", choices=["auto", "on", "off"],
                   help="recompute activations in the backward pass to save memory (default: auto = on for GPU)")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="start over even if --output holds checkpoints (default: resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any run or dmd2 key (docs/training.md), repeatable, e.g. --set lr_generator=2e-5 (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    return p


def parse_timesteps_flag(value: str) -> tuple[int, ...] | str:
    """``--timesteps``: a preset name (4-step, 1-step: resolved for the checkpoint's arch by
    ``DMD2Config.for_arch``) or a comma-separated timestep list."""
    from .config import TIMESTEP_PRESETS, ConfigError

    if any(value.strip() in presets for presets in TIMESTEP_PRESETS.values()):
        return value.strip()
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise ConfigError(f"--timesteps: expected 4-step, 1-step or timesteps such as 999,499, got {value!r}") from None


def resolve_settings(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any]]:
    """RunConfig and the dmd2 keys (applied later on the checkpoint's arch defaults):
    TOML file, then ``--set`` overrides, then the dedicated flags."""
    from .config import ConfigError, DMD2Config, parse_overrides

    run_keys = {f.name for f in dataclasses.fields(RunConfig)}
    dmd2_keys = {f.name for f in dataclasses.fields(DMD2Config)}
    run_values: dict[str, Any] = {}
    dmd2_values: dict[str, Any] = {}

    def route(values: dict[str, Any], where: str) -> None:
        for key, value in values.items():
            if key in run_keys:
                run_values[key] = value
            elif key in dmd2_keys:
                dmd2_values[key] = value
            else:
                raise ConfigError(f"unknown key {key!r} in {where}")

    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        tables = {k: data.pop(k) for k in ("run", "dmd2") if isinstance(data.get(k), dict)}
        route(data, str(path))
        for name, table in tables.items():
            route(table, f"[{name}] of {path}")
        # Paths in the file are relative to the file.
        for key in ("checkpoint", "prompts", "images", "output"):
            if run_values.get(key) and not Path(run_values[key]).is_absolute():
                run_values[key] = str(path.parent / run_values[key])
    route(parse_overrides(args.overrides), "--set")
    for key in run_keys | DMD2_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            (run_values if key in run_keys else dmd2_values)[key] = value
    if args.timesteps is not None:
        dmd2_values["generator_timesteps"] = parse_timesteps_flag(args.timesteps)
    run = RunConfig(**{k: _coerce_run(k, v) for k, v in run_values.items()})
    run.validate()
    return run, dmd2_values


# --- distributed -------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist


class GradientAverager:
    """Averages the gradients of ``params`` over all processes at the end of each backward,
    in one flat all-reduce (what DDP does, without wrapping modules: the three networks
    share one UNet and are selected per forward, which DDP's one-forward-one-backward
    bookkeeping does not fit)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], world_size: int):
        self.params, self.world_size = list(params), world_size
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.ready: set[int] = set()
        self.queued = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, p: torch.Tensor) -> None:
        self.ready.add(self.index[id(p)])
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._all_reduce)

    def _all_reduce(self) -> None:
        grads = [self.params[i].grad for i in sorted(self.ready)]
        self.ready, self.queued = set(), False
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def broadcast_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def parameter_checksum(params: Sequence[torch.nn.Parameter]) -> float:
    return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in params))


def check_in_sync(params: Sequence[torch.nn.Parameter], dist: Dist) -> float:
    """All processes must hold the same adapters; raise if they drifted apart."""
    checksum = parameter_checksum(params)
    if dist.world_size > 1:
        sums = [None] * dist.world_size
        torch.distributed.all_gather_object(sums, checksum)
        if any(abs(s - checksum) > 1e-6 * max(1.0, abs(checksum)) for s in sums):
            raise RuntimeError(f"adapters differ between processes: checksums {sums}")
    return checksum


# --- outputs -------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int = 2) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last line ends in '...' when text is left."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words or (lines and draw.textlength(lines[-1], font=font) > width):
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def image_grid(images: torch.Tensor, columns: int | None = None, labels: Sequence[str] | None = None, title: str = ""):
    """(B, H, W, 3) in [0, 1] -> one PIL image; ``labels`` (one per image: its prompt and
    seed) are written under the tiles and ``title`` (the step) above them."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    columns = columns or min(n, 4)
    rows = math.ceil(n / columns)
    font = _font(max(11, w // 36))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = probe.textbbox((0, 0), "Ag", font=font)[3] + 3
    header = line + 6 if title else 0
    caption = 2 * line + 6 if labels else 0
    grid = Image.new("RGB", (columns * w, header + rows * (h + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for k, text in enumerate(_wrap(draw, title, font, columns * w - 8, max_lines=1) if title else []):
        draw.text((4, 3 + k * line), text, fill=(0, 0, 0), font=font)
    for i, img in enumerate(images):
        tile = Image.fromarray((img.numpy() * 255).round().clip(0, 255).astype("uint8"))
        x, y = (i % columns) * w, header + (i // columns) * (h + caption)
        grid.paste(tile, (x, y))
        if labels:
            for k, text in enumerate(_wrap(draw, labels[i], font, w - 8)):
                draw.text((x + 4, y + h + 3 + k * line), text, fill=(0, 0, 0), font=font)
    return grid


def save_png_atomic(image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _smoothed(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Running mean over ``window`` points (per-iteration losses are noisy)."""
    if window <= 1:
        return points
    out, total = [], 0.0
    for i, (x, y) in enumerate(points):
        total += y - (points[i - window][1] if i >= window else 0.0)
        out.append((x, total / min(i + 1, window)))
    return out


def draw_loss_curves(rows: Sequence[dict[str, float]], keys: Sequence = PLOTTED, size: tuple[int, int] = (640, 170), title: str = ""):
    """One panel per entry of ``keys`` (a metric, or a tuple of metrics drawn together, such
    as the discriminator's real and fake logits); step on x, running mean over about 1/100 of
    the run on y, min/max written at the side; drawn with PIL."""
    from PIL import Image, ImageDraw

    panels = [k if isinstance(k, tuple) else (k,) for k in keys]
    panels = [p for p in panels if any(k in r for r in rows for k in p)]
    width, panel = size
    image = Image.new("RGB", (width, max(1, len(panels)) * panel), "white")
    draw = ImageDraw.Draw(image)
    left, right, pad = 70, 10, 18
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    window = max(1, len(rows) // 100)
    for i, names in enumerate(panels):
        series = {k: _smoothed([(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])], window) for k in names}
        top = i * panel
        box = (left, top + pad, width - right, top + panel - pad)
        draw.rectangle(box, outline=(160, 160, 160))
        label = " vs ".join(names) + (f" (mean of {window})" if window > 1 else "")
        draw.text((left, top + 2), f"{title}: {label}" if title else label, fill=(0, 0, 0))
        points = [p for values in series.values() for p in values]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-12
        draw.text((4, box[1]), f"{max(ys):.3g}", fill=(0, 0, 0))
        draw.text((4, box[3] - 10), f"{min(ys):.3g}", fill=(0, 0, 0))
        draw.text((box[2] - 60, box[3] + 2), f"step {max(xs)}", fill=(0, 0, 0))
        for c, (name, values) in enumerate(series.items()):
            colour = colours[(i + c) % 4]
            scaled = [
                (box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]), box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]))
                for x, y in values
            ]
            if len(names) > 1:
                draw.text((box[0] + 6 + 110 * c, box[1] + 4), name, fill=colour)
            if len(scaled) == 1:
                draw.ellipse([scaled[0][0] - 2, scaled[0][1] - 2, scaled[0][0] + 2, scaled[0][1] + 2], fill=colour)
            elif scaled:
                draw.line(scaled, fill=colour, width=2)
    return image


def workflow_api(checkpoint_name: str, lora_name: str, prompt: str, resolution: int, timesteps: Sequence[int], seed: int = 0) -> dict:
    """A ComfyUI API-format graph: checkpoint -> the LoRA -> DMD2Generate -> decode -> save."""
    preset = PRESETS.get(tuple(timesteps), "custom")
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": resolution, "height": resolution, "batch_size": 1}},
        "5": {
            "class_type": "DMD2Generate",
            "inputs": {
                "model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0], "seed": seed,
                "preset": preset, "custom_timesteps": ",".join(str(t) for t in timesteps),
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "dmd2"}},
    }


def workflow_ui(checkpoint_name: str, lora_name: str, prompt: str, resolution: int, timesteps: Sequence[int], seed: int = 0) -> dict:
    """The same graph in the UI (litegraph) format, to open in ComfyUI's editor."""
    preset = PRESETS.get(tuple(timesteps), "custom")
    # (id, type, widget values, [(input name, type)], [(output name, type)], x, y, w, h): laid
    # out in columns with room for what the frontend draws (tested: no overlaps there).
    specs = [
        (1, "CheckpointLoaderSimple", [checkpoint_name], [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], 40, 60, 340, 100),
        (2, "LoraLoaderModelOnly", [lora_name, 1.0], [("model", "MODEL")], [("MODEL", "MODEL")], 510, 60, 340, 90),
        (3, "CLIPTextEncode", [prompt], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], 510, 240, 340, 140),
        (4, "EmptyLatentImage", [resolution, resolution, 1], [], [("LATENT", "LATENT")], 510, 470, 340, 110),
        (5, "DMD2Generate", [seed, "fixed", preset, ",".join(str(t) for t in timesteps)],
         [("model", "MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT")], [("LATENT", "LATENT")], 980, 60, 340, 190),
        (6, "VAEDecode", [], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], 1450, 60, 210, 50),
        (7, "SaveImage", ["dmd2"], [("images", "IMAGE")], [], 1450, 200, 400, 440),
    ]
    # [link id, from node, from slot, to node, to slot, type]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 3, 0, "CLIP"], [3, 2, 0, 5, 0, "MODEL"], [4, 3, 0, 5, 1, "CONDITIONING"],
             [5, 4, 0, 5, 2, "LATENT"], [6, 5, 0, 6, 0, "LATENT"], [7, 1, 2, 6, 1, "VAE"], [8, 6, 0, 7, 0, "IMAGE"]]
    nodes = []
    for order, (node_id, kind, widgets, inputs, outputs, x, y, width, height) in enumerate(specs):
        nodes.append({
            "id": node_id, "type": kind, "pos": [x, y], "size": [width, height], "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": t, "link": next(l[0] for l in links if l[3] == node_id and l[4] == slot)}
                       for slot, (name, t) in enumerate(inputs)],
            "outputs": [{"name": name, "type": t, "links": [l[0] for l in links if l[1] == node_id and l[2] == slot], "slot_index": slot}
                        for slot, (name, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": kind},
            "widgets_values": widgets,
        })
    return {"last_node_id": 7, "last_link_id": 8, "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


class MetricsLog:
    """metrics.jsonl (one line per iteration, appended) and metrics.csv (rewritten)."""

    def __init__(self, folder: Path, resume_step: int):
        self.jsonl, self.csv = folder / "metrics.jsonl", folder / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        if self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if row.get("step", math.inf) < resume_step:
                    self.rows.append(row)
        # Iterations after the checkpoint we resume from are redone: drop their lines.
        from .data import write_text_atomic

        write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.handle = self.jsonl.open("a", encoding="utf-8")

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()

    def write_csv(self) -> None:
        from .data import write_text_atomic

        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.csv, buf.getvalue())

    def close(self) -> None:
        self.handle.close()


# --- checkpoints ---------------------------------------------------------------------------


def find_latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (temp folders of an interrupted save are ignored)."""
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_DIR.match(p.name))]
    return max(found)[1] if found else None


def save_training_checkpoint(folder: Path, step: int, trainer, backend, dist: Dist, keep: int, settings: dict) -> Path:
    """checkpoints/step_N/: tensors.safetensors (adapters, head, moving average),
    settings.json (what a resume must match) and state_rank{r}.pt per process, written into a
    temp folder that is renamed into place once every process is done."""
    from .data import write_text_atomic
    from .lora import save_safetensors_atomic

    final = folder / f"step_{step:07d}"
    tmp = folder / f".step_{step:07d}.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if dist.main:
        save_safetensors_atomic({k: v.float().cpu().contiguous() for k, v in trainer.tensors().items()}, tmp / "tensors.safetensors")
        write_text_atomic(tmp / "settings.json", json.dumps(settings, indent=2))
    state = {"trainer": trainer.state_dict(include_parameters=False), "backend": backend.state_dict(), "world_size": dist.world_size}
    torch.save(state, tmp / f"state_rank{dist.rank}.pt")
    dist.barrier()
    if dist.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name))
        for path in old[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return final


def resume_settings(run: RunConfig, config, resolution: int, targets: Sequence[str]) -> dict[str, Any]:
    """The settings a checkpoint can only be resumed with: everything that shapes the trained
    tensors (LoRA size and targets, resolution, every algorithm key but ``steps``)."""
    dmd2 = {k: v for k, v in config.to_dict().items() if k not in ("steps", "ema_on_cpu")}
    return {"lora_rank": run.lora_rank, "lora_alpha": run.lora_alpha, "lora_targets": list(targets), "resolution": resolution, **dmd2}


def check_resume_settings(path: Path, current: dict[str, Any]) -> None:
    """Refuse to resume ``path`` with settings that differ from the saved ones, naming the key."""
    from .config import ConfigError

    saved_file = path / "settings.json"
    if not saved_file.is_file():
        raise ConfigError(f"cannot resume from {path}: it has no settings.json (written by an older version); use --no-resume to start over")
    saved = json.loads(saved_file.read_text(encoding="utf-8"))
    for key, value in current.items():
        if key in saved and saved[key] != json.loads(json.dumps(value)):
            raise ConfigError(
                f"cannot resume from {path}: {key} is {value!r} now but the saved run used {saved[key]!r} "
                f"(set it back, or start over with --no-resume or another --output)"
            )


def load_training_checkpoint(path: Path, trainer, backend, dist: Dist) -> int:
    from safetensors.torch import load_file

    from .config import ConfigError

    state_file = path / f"state_rank{dist.rank}.pt"
    if not state_file.is_file():
        raise ConfigError(f"{path} was written by a run with another number of processes; resume with the same number")
    state = torch.load(str(state_file), map_location="cpu", weights_only=True)
    try:
        trainer.load_tensors(load_file(str(path / "tensors.safetensors")))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"checkpoint {path} does not match this run: {exc}") from exc
    trainer.load_state_dict(state["trainer"])
    backend.load_state_dict(state["backend"])
    return trainer.step_count


# --- checks before loading ------------------------------------------------------------------


def resolve_device(name: str) -> str:
    """The device to train on: ``name`` checked against what this machine has (before any
    weights are loaded), or cuda when available, else cpu."""
    from .config import ConfigError

    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU or driver was found"
            raise ConfigError(f"--device {name}: CUDA is not available here ({why}); use --device cpu or leave --device out")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"--device {name}: Apple MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: the trainer runs on cpu, cuda or mps")
    return name


def prepare_output(output: Path) -> Path | None:
    """Create ``output`` if needed and prove it writable with a probe file, before anything
    heavy runs. Returns the topmost folder this created (removed again if the run fails
    before training starts), or None."""
    from .config import ConfigError

    missing = []
    existing = output
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot use {output} as the output folder: {existing} is a file")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".dmd2-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise ConfigError(f"cannot write to the output folder {output}: {exc.strerror or exc}") from None
    return missing[-1] if missing else None


def comfy_model_name(path: Path, folder: str = "checkpoints") -> str | None:
    """The name ComfyUI lists ``path`` under in its ``folder`` (subfolders included, as the
    loaders' combos show it), or None when the file is outside all of ComfyUI's such folders."""
    from ..comfy_env import ensure_comfy

    root = ensure_comfy()
    import folder_paths

    extra = root / "extra_model_paths.yaml"
    if extra.is_file() and not getattr(comfy_model_name, "extra_loaded", False):
        try:
            from utils.extra_config import load_extra_path_config

            load_extra_path_config(str(extra))
        except Exception as exc:  # noqa: BLE001 (a broken yaml only costs the subfolder name)
            log.warning("could not read %s (%s); using the default model folders", extra, exc)
        comfy_model_name.extra_loaded = True
    target = path.resolve()
    for base in folder_paths.get_folder_paths(folder):
        try:
            return str(target.relative_to(Path(base).resolve()))
        except ValueError:
            continue
    return None


class Stopped(Exception):
    """The run stopped on SIGINT/SIGTERM after saving a checkpoint at ``step``."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step}; run the same command to resume")
        self.step, self.signum = step, signum


class StopSignals:
    """While training: SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current
    iteration and save a checkpoint; a second Ctrl-C stops at once (the last saved
    checkpoint is still whole: saves are atomic)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.info("%s received: stopping after this iteration (Ctrl-C again to stop at once)", signal.Signals(signum).name)

    def requested(self, dist: Dist) -> int | None:
        """The signal to stop on, agreed by every process (any one stopping stops all)."""
        if dist.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# --- the run -------------------------------------------------------------------------------


def train(argv: Sequence[str] | None = None):
    """Run the command; returns (trainer, backend, output folder). Raises on bad input, and
    ``Stopped`` when a signal stopped it (after saving a checkpoint)."""
    from . import checkpoint as C
    from .backend import SharedBaseBackend, TrainingData, export_generator_lora
    from .config import ConfigError, DMD2Config
    from .data import (
        cache_key,
        check_resolution,
        file_sha256,
        list_images,
        load_cached,
        read_caption,
        read_prompts,
        save_cached,
        write_text_atomic,
    )
    from .lora import DEFAULT_TARGETS
    from .trainer import DMD2Trainer

    args = build_parser().parse_args(argv)
    run, dmd2_values = resolve_settings(args)

    # 1. Check every input before loading weights or writing anything.
    if run.resolution:
        check_resolution(run.resolution)
    prompts = read_prompts(run.prompts)
    image_paths = list_images(run.images) if run.images else []
    captions = [read_caption(p) for p in image_paths]
    kind, arch = C.peek_checkpoint(run.checkpoint)  # the header only, for .safetensors
    C.refuse_non_checkpoint(Path(run.checkpoint), kind)
    if "arch" in dmd2_values and dmd2_values["arch"] != arch:
        raise ConfigError(f"config says arch={dmd2_values['arch']!r} but {run.checkpoint} is an {arch} checkpoint")
    config = DMD2Config.for_arch(arch, **{k: v for k, v in dmd2_values.items() if k != "arch"})
    if config.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {config.steps} (with 0 the LoRA would be exported untrained)")
    resolution = run.resolution or (1024 if arch == "sdxl" else 512)
    check_resolution(resolution)
    device = resolve_device(run.device)
    dist = init_distributed(device)
    if dist.world_size > 1 and device == "cuda":
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(dist.local_rank)
    on_gpu = device.startswith("cuda")
    sample_prompts = list(run.sample_prompts) or prompts[:4]
    targets = run.lora_targets or DEFAULT_TARGETS
    settings = resume_settings(run, config, resolution, targets)
    output = Path(run.output)
    checkpoints = output / "checkpoints"
    cache = output / "cache"
    latest = find_latest_checkpoint(checkpoints) if run.resume else None
    if latest is not None:
        check_resume_settings(latest, settings)
    created = prepare_output(output) if dist.main else None
    try:
        # Frozen base weights in the autocast dtype on GPU (bf16 by default), fp32 otherwise.
        base_dtype = {"": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[run.mixed_precision] if on_gpu else torch.float32
        loaded = C.load_checkpoint(run.checkpoint, weight_dtype=base_dtype)
        if loaded.arch != arch:
            raise C.UnsupportedModel(f"{run.checkpoint} looked like an {arch} checkpoint but ComfyUI loads it as {loaded.arch}")
        if dist.main:
            cache.mkdir(parents=True, exist_ok=True)
            for stale in checkpoints.glob(".step_*.tmp"):  # a save cut short by a kill
                shutil.rmtree(stale, ignore_errors=True)
            if not run.resume:  # starting over: older checkpoints must not be resumed later
                for old in checkpoints.glob("step_*"):
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

        # 2. Encode once (cached by checkpoint hash and inputs), then drop the encoders.
        ckpt_hash = file_sha256(run.checkpoint, cache if dist.main else None)
        caption_texts = sorted({c for c in captions if c is not None})
        all_prompts = [""] + prompts + sample_prompts + caption_texts
        text_file = cache / f"text-{cache_key(ckpt_hash, all_prompts, resolution)}.safetensors"
        cached = load_cached(text_file)
        if cached is None:
            encoded = C.encode_prompts(loaded, all_prompts, resolution)
            cached = {f"{i}.context": c.context for i, c in enumerate(encoded)} | {f"{i}.y": c.y for i, c in enumerate(encoded) if c.y is not None}
            if dist.main:
                save_cached(text_file, cached)
        conds = [C.Conditioning(cached[f"{i}.context"], cached.get(f"{i}.y")) for i in range(len(all_prompts))]
        uncond, train_conds = conds[0], conds[1 : 1 + len(prompts)]
        sample_conds = conds[1 + len(prompts) : 1 + len(prompts) + len(sample_prompts)]
        by_caption = dict(zip(caption_texts, conds[1 + len(prompts) + len(sample_prompts) :]))
        real_latents = None
        if image_paths:
            stats = [(p.name, p.stat().st_size, p.stat().st_mtime) for p in image_paths]
            latent_file = cache / f"latents-{cache_key(ckpt_hash, stats, resolution)}.safetensors"
            cached_latents = load_cached(latent_file)
            if cached_latents is None:
                cached_latents = {"latents": C.encode_images(loaded, image_paths, resolution)}
                if dist.main:
                    save_cached(latent_file, cached_latents)
            real_latents = cached_latents["latents"]
        loaded.clip = None  # the text encoders are not needed any more
        data = TrainingData(train_conds, uncond, real_latents, [None if c is None else by_caption[c] for c in captions] if image_paths else None)

        # 3. Backend and trainer; resume from the newest checkpoint.
        backend = SharedBaseBackend(
            loaded.model.model, data, (4, resolution // 8, resolution // 8),
            lora_rank=run.lora_rank, lora_alpha=run.lora_alpha, lora_targets=targets,
            device=device, mixed_precision=run.mixed_precision or None,
            gradient_checkpointing={"auto": None, "on": True, "off": False}[run.gradient_checkpointing],
            seed=config.seed, rank=dist.rank,
        )
        trainer = DMD2Trainer(config, backend, rank=dist.rank)
        trainable = trainer.generator_params + trainer.fake_params
        if dist.world_size > 1:
            broadcast_parameters(trainable)
            GradientAverager(trainable, dist.world_size)
        start = load_training_checkpoint(latest, trainer, backend, dist) if latest is not None else 0
    except BaseException:
        if created is not None:  # nothing half-written: a failed start leaves no new folder
            shutil.rmtree(created, ignore_errors=True)
        raise
    total = config.total_steps
    updates = config.generator_updates(total)
    if dist.main:
        record = {"run": dataclasses.asdict(run), "dmd2": config.to_dict(), "arch": arch, "resolution": resolution, "base_model_sha256": ckpt_hash}
        write_text_atomic(output / "run_config.json", json.dumps(record, indent=2))
        effective = config.samples_per_iteration * dist.world_size
        log.info(
            "%s %s, %d prompts, %d real images (%d captioned), %s, effective batch %d",
            arch, run.checkpoint, len(prompts), len(image_paths), sum(c is not None for c in captions), device, effective,
        )
        log.info(
            "%d iterations = %d generator update%s (%s)", total, updates, "" if updates == 1 else "s",
            (f"{config.regression_steps} regression, then " if config.regression_steps else "")
            + f"one every {config.fake_updates_per_generator_update} DMD2 iterations: the fake score is updated every iteration",
        )
        if updates - config.regression_steps < 10:
            log.warning("only %d DMD2 generator update%s: the LoRA will barely differ from the base model; raise --steps",
                        updates - config.regression_steps, "" if updates - config.regression_steps == 1 else "s")
        if start:
            log.info("resuming at step %d of %d", start, total)
        else:
            log.info("starting a new run")

    # 4. The loop.
    metrics_log = MetricsLog(output, start) if dist.main else None
    samples = output / "samples"
    lora_name = (run.lora_name or f"dmd2_{Path(run.checkpoint).stem}_lora").removesuffix(".safetensors") + ".safetensors"
    sample_labels = [f"{prompt} (seed {run.sample_seeds[i % len(run.sample_seeds)]})" for i, prompt in enumerate(sample_prompts)]

    def write_samples(step: int) -> None:
        if not dist.main:
            return
        seeds = [run.sample_seeds[i % len(run.sample_seeds)] for i in range(len(sample_conds))]
        with trainer.averaged_generator():
            latents = backend.sample(sample_conds, seeds, config.generator_timesteps)
        samples.mkdir(exist_ok=True)
        title = f"step {step}/{total} ({config.generator_updates(step)} generator updates), {len(config.generator_timesteps)}-step"
        save_png_atomic(image_grid(C.decode_latents(loaded, latents), labels=sample_labels, title=title), samples / f"step_{step:07d}.png")

    saved = {"step": start if latest is not None else -1}

    def write_checkpoint(step: int) -> None:
        check_in_sync(trainable, dist)
        save_training_checkpoint(checkpoints, step, trainer, backend, dist, run.keep_checkpoints, settings)
        saved["step"] = step
        if dist.main:
            metrics_log.write_csv()
            save_png_atomic(draw_loss_curves(metrics_log.rows), output / "loss_curve.png")

    bar = None
    if dist.main and not args.quiet:
        from tqdm.auto import tqdm

        # Counts generator updates: what makes the LoRA (the fake score runs every iteration).
        bar = tqdm(total=updates, initial=config.generator_updates(start), desc="DMD2 generator updates", unit="upd", dynamic_ncols=True)
    started = time.perf_counter()
    try:
        with StopSignals() as stop:
            while trainer.step_count < total:
                metrics = trainer.step()
                step = trainer.step_count
                if dist.main:
                    metrics_log.append({**metrics, "time": round(time.perf_counter() - started, 4)})
                    if bar is not None:
                        if metrics.get("generator_updated"):
                            bar.update(1)
                        shown = ("loss_regression", "loss_dm", "loss_fake", "loss_gan_discriminator")
                        bar.set_postfix({"it": f"{step}/{total}", **{k: f"{metrics[k]:.3g}" for k in shown if k in metrics}})
                if step % run.save_every == 0 and step < total:
                    write_checkpoint(step)
                if run.sample_every and step % run.sample_every == 0:
                    write_samples(step)
                signum = stop.requested(dist)
                if signum is not None and step < total:
                    if saved["step"] != step:
                        write_checkpoint(step)
                    raise Stopped(step, signum)
            latest = find_latest_checkpoint(checkpoints)
            if latest is None or latest.name != f"step_{total:07d}":
                write_checkpoint(total)
            if not (run.sample_every and total % run.sample_every == 0) and total > 0:
                write_samples(total)
    finally:
        if bar is not None:
            bar.close()
        if metrics_log is not None:
            metrics_log.close()

    # 5. The LoRA (the generator's moving average) and a workflow that uses it.
    if dist.main:
        metadata = {
            "dmd2_base_model": Path(run.checkpoint).name,
            "dmd2_base_model_sha256": ckpt_hash,
            "dmd2_arch": arch,
            "dmd2_steps": trainer.step_count,
            "dmd2_timesteps": ",".join(str(t) for t in config.generator_timesteps),
            "dmd2_guidance": config.real_guidance_scale,
            "dmd2_resolution": resolution,
            "dmd2_config": json.dumps({"run": dataclasses.asdict(run), "dmd2": config.to_dict()}),
            "ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1",
        }
        export_generator_lora(trainer, backend, output / lora_name, metadata)
        if run.export_raw:
            export_generator_lora(trainer, backend, output / lora_name.replace(".safetensors", "_raw.safetensors"), metadata, averaged=False)
        ckpt_name = comfy_model_name(Path(run.checkpoint))
        if ckpt_name is None:
            ckpt_name = Path(run.checkpoint).name
            log.info("the workflow names the checkpoint %s: it is outside ComfyUI's checkpoints folder, put it there to use the workflow", ckpt_name)
        graph = workflow_api(ckpt_name, lora_name, sample_prompts[0], resolution, config.generator_timesteps)
        write_text_atomic(output / "workflow_api.json", json.dumps(graph, indent=2))
        ui = workflow_ui(ckpt_name, lora_name, sample_prompts[0], resolution, config.generator_timesteps)
        write_text_atomic(output / "workflow.json", json.dumps(ui, indent=2))
        log.info("wrote %s: copy it into ComfyUI's models/loras and open %s", output / lora_name, output / "workflow.json")
    dist.barrier()
    return trainer, backend, output


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: BaseException) -> str:
    """An error as one readable line: no colour codes, no line breaks."""
    return " ".join(ANSI.sub("", str(exc)).split())


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Exit status 0 on success, 2 on bad input or settings (one
    ``dmd2-train: error:`` line), 128 + the signal number when stopped by SIGINT/SIGTERM."""
    from ..comfy_env import ComfyUINotFound
    from .checkpoint import CheckpointError, UnsupportedModel
    from .config import ConfigError
    from .data import DataError
    from .lora import LoRAError

    if not log.handlers:  # ComfyUI configures the root logger at WARNING: use our own handler
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("dmd2-train: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        train(argv)
    except (ConfigError, DataError, CheckpointError, UnsupportedModel, LoRAError, ComfyUINotFound) as exc:
        print(f"dmd2-train: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as exc:
        print(f"dmd2-train: error: out of GPU memory ({one_line(exc)[:200]}); lower --resolution or --lora-rank, "
              "or set --gradient-checkpointing on and --set ema_on_cpu=true", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, a folder removed under the run...
        print(f"dmd2-train: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"dmd2-train: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("dmd2-train: stopped; run the same command to resume from the last saved checkpoint", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
