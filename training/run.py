"""One DMD2 run in a folder, shared by ``dmd2-train`` and the ``DMD2TrainLoRA`` node.

``TrainingRun`` puts the shared-base backend (LoRA G and LoRA F on the frozen base, GAN head)
and the trainer on a model that is already loaded and conditions that are already encoded,
resumes from the folder's newest checkpoint, runs the loop (metrics, resumable checkpoints,
samples, a stop request honoured after the current iteration) and exports the generator's
moving average as a kohya LoRA. Where the model and the conditions come from (a checkpoint
file for the command, the graph's MODEL/CLIP/VAE for the node) is the caller's business; the
training path is this one.

Folder layout: ``checkpoints/step_N/`` (tensors.safetensors, settings.json, state_rank{r}.pt),
``metrics.jsonl``, ``metrics.csv``, ``loss_curve.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = re.compile(r"^step_(\d{7,})$")
PLOTTED = (
    "loss_regression", "loss_dm", "loss_fake", "loss_gan_generator", "loss_gan_discriminator",
    ("logits_real", "logits_fake"), "discriminator_accuracy",
)


@dataclass
class RunConfig:
    """What the command needs besides the algorithm: inputs, outputs, sizes, cadence."""

    checkpoint: str = ""
    text_encoders: tuple[str, ...] = ()  # Flux.1: its clip_l and t5xxl files (DualCLIPLoader's), unless the checkpoint holds them
    vae: str = ""  # Flux.1: its VAE file (ae.safetensors), for --images and the sample grids
    prompts: str = ""
    output: str = ""
    images: str = ""  # optional folder of real images (captions: image.txt / image.caption): the GAN loss
    resolution: int = 0  # 0: 1024 for SDXL, 512 for SD1.5
    lora_rank: int = 64
    lora_alpha: float = 8.0
    fake_score_rank: int = 0  # LoRA F's own rank; 0: lora_rank (docs/training.md: why more can help)
    fake_score: str = "lora"  # "lora": LoRA F on the shared base; "full": a trained fp32 copy of the UNet (16 B/parameter more)
    shard_fake_score: bool = True  # a full fake score on several processes is sharded across them (FSDP2); false: whole on each
    lora_targets: tuple[str, ...] = ()  # empty or "dmd2": the reference's list; "all": also the in/out convs and embeddings (training.lora)
    lora_name: str = ""  # file name of the exported LoRA; empty: dmd2_<checkpoint stem>_lora
    init_lora: str = ""  # a few-step LoRA file the generator starts from (its rank and alpha are taken); empty: zero
    init_fake_score: bool = False  # the fake score starts from the init LoRA too (default: from the base, docs/training.md)
    save_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500  # 0: only at the end
    sample_prompts: tuple[str, ...] = ()  # empty: the first four training prompts
    sample_seeds: tuple[int, ...] = (0, 1, 2, 3)
    device: str = ""  # empty: cuda if available, else cpu
    mixed_precision: str = ""  # "bf16" | "fp16" | "no"; empty: bf16 on GPUs that have it, else fp16; no on CPU
    gradient_checkpointing: str = "auto"  # "auto" (on for GPU) | "on" | "off"
    resume: bool = True
    export_raw: bool = False  # also write the raw (not averaged) generator as <lora_name>_raw

    def validate(self, required: Sequence[str] = ("checkpoint", "prompts", "output")) -> None:
        from .config import ConfigError

        for key in required:
            if not getattr(self, key):
                raise ConfigError(f"{key} is required (--{key} or `{key} = ...` in the config file)")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ConfigError("lora_rank must be >= 1 and lora_alpha > 0")
        if self.fake_score not in ("lora", "full"):
            raise ConfigError(f"fake_score must be lora or full, got {self.fake_score!r}")
        if self.fake_score_rank < 0:
            raise ConfigError(f"fake_score_rank must be >= 1 (0: lora_rank), got {self.fake_score_rank}")
        if self.save_every < 1 or self.sample_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("save_every and keep_checkpoints must be >= 1, sample_every >= 0")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise ConfigError("gradient_checkpointing must be auto, on or off")
        if self.mixed_precision not in ("", "bf16", "fp16", "no"):
            raise ConfigError("mixed_precision must be bf16, fp16 or no")
        if not self.sample_seeds:
            raise ConfigError("sample_seeds must hold at least one seed")
        if self.init_fake_score and not self.init_lora:
            raise ConfigError("init_fake_score starts the fake score from the init LoRA: give --init-lora too")


# --- distributed -------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the run and the collectives the run makes.

    Tensors go through the group that has a backend for their device: the trained tensors
    (gradients, the first broadcast) on the GPU through NCCL, the host-side decisions (stop
    flag, barrier, checksums, the shared draws) on the CPU through gloo. ``host_group`` is a
    gloo group beside the default one when that has no CPU backend (an NCCL-only group
    created before ``init_distributed``), else None (the default group serves both)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host_group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def group_for(self, tensor: torch.Tensor):
        """The default group if it has a backend for ``tensor``'s device, else the host group."""
        if self.host_group is None or tensor.device.type in _device_types(None):
            return None
        return self.host_group

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier(group=self.host_group)

    def agree_max(self, value: int) -> int:
        """The largest ``value`` over all processes (a stop request on any one stops all)."""
        if self.world_size == 1:
            return value
        flag = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return int(flag.item())

    def from_main(self, value: int) -> int:
        """Rank 0's ``value`` on every process (draws that every rank must share)."""
        if self.world_size == 1:
            return value
        shared = torch.tensor([value], dtype=torch.int64)
        torch.distributed.broadcast(shared, src=0, group=self.host_group)
        return int(shared.item())

    def all_gather_object(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, value, group=self.host_group)
        return out


def _device_types(group) -> set[str]:
    """The device types ``group`` (None: the default group) has a backend for."""
    group = group or torch.distributed.distributed_c10d._get_default_group()
    return {d.type for d in group._device_types}


def process_group_backend(device: str) -> str:
    """The backends ``init_distributed`` creates the group with: NCCL for the GPU tensors and
    gloo beside it for the CPU ones (an NCCL-only group has no backend for CPU tensors)."""
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK. The group gets NCCL for the GPU and gloo for
    the CPU (``process_group_backend``); a group created before, without a CPU backend (NCCL
    alone), gets a gloo group beside it for the host-side collectives."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(process_group_backend(device))
    host = None if "cpu" in _device_types(None) else torch.distributed.new_group(backend="gloo")
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), host)


class GradientAverager:
    """Averages the gradients of ``params`` over all processes at the end of each backward
    (what DDP does, without wrapping modules: the three networks share one UNet and are
    selected per forward, which DDP's one-forward-one-backward bookkeeping does not fit).

    Small gradients are all-reduced in flat buckets of at most ``bucket_mib`` (few large
    collectives instead of thousands of small ones), a gradient of that size or more in place:
    the transient is one bucket, not a flat copy of every gradient (as large as the trained
    parameters: about 10 GB for an SDXL full fake score)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], world_size: int, dist: Dist | None = None, bucket_mib: float = 25):
        self.params, self.world_size = list(params), world_size
        self.dist = dist or Dist(world_size=world_size)
        self.bucket_bytes = int(bucket_mib * 2**20)
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

    def buckets(self, grads: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """``grads`` in order, cut into runs of one device and dtype of under ``bucket_bytes``;
        a gradient of ``bucket_bytes`` or more (or not contiguous) is a bucket of its own."""
        out: list[list[torch.Tensor]] = []
        size = 0
        for g in grads:
            nbytes = g.numel() * g.element_size()
            if nbytes >= self.bucket_bytes or not g.is_contiguous():
                out.append([g])
                size = self.bucket_bytes  # closed: nothing joins it
            elif out and size + nbytes <= self.bucket_bytes and (out[-1][0].device, out[-1][0].dtype) == (g.device, g.dtype):
                out[-1].append(g)
                size += nbytes
            else:
                out.append([g])
                size = nbytes
        return out

    def _all_reduce(self) -> None:
        grads = [self.params[i].grad for i in sorted(self.ready)]
        self.ready, self.queued = set(), False
        for bucket in self.buckets(grads):
            group = self.dist.group_for(bucket[0])
            if len(bucket) == 1 and bucket[0].is_contiguous():  # in place, no copy
                torch.distributed.all_reduce(bucket[0], group=group)
                bucket[0].div_(self.world_size)
                continue
            flat = torch._utils._flatten_dense_tensors(bucket)
            torch.distributed.all_reduce(flat, group=group)
            flat /= self.world_size
            for g, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)


def broadcast_parameters(params: Sequence[torch.nn.Parameter], dist: Dist | None = None) -> None:
    """Rank 0's values of ``params`` on every process (each through the group of its device)."""
    dist = dist or Dist()
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=0, group=dist.group_for(p.data))


def parameter_checksum(params: Sequence[torch.nn.Parameter]) -> float:
    return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in params))


class OutOfSync(RuntimeError):
    """The processes of one run hold different adapters (``check_in_sync``)."""


def check_in_sync(params: Sequence[torch.nn.Parameter], dist: Dist) -> float:
    """All processes must hold the same adapters; raise ``OutOfSync`` (on every process) if
    they drifted apart."""
    checksum = parameter_checksum(params)
    if dist.world_size > 1:
        sums = dist.all_gather_object(checksum)
        if any(abs(s - sums[0]) > 1e-6 * max(1.0, abs(sums[0])) for s in sums):
            raise OutOfSync(f"the processes hold different adapters (checksums {', '.join(f'{s:.9g}' for s in sums)}); "
                            "every machine must run the same pack, torch and inputs; resume from the last checkpoint")
    return checksum


def check_same_inputs(dist: Dist, **fingerprints: Any) -> None:
    """Every process must read the same inputs (on several machines each reads its own
    copies): refuse, on every process, naming the first that differs from rank 0's."""
    if dist.world_size == 1:
        return
    import hashlib
    import socket

    from .config import ConfigError

    digests = {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest() for k, v in fingerprints.items()}
    gathered = dist.all_gather_object((socket.gethostname(), digests))
    host0, first = gathered[0]
    for rank, (host, values) in enumerate(gathered[1:], start=1):
        for key, value in first.items():
            if values.get(key) != value:
                raise ConfigError(f"rank {rank} (on {host}) disagrees with rank 0 (on {host0}) about the {key}: every process "
                                  "must read the same files and settings (copy them to every machine, or use shared storage)")


def check_shared_folder(dist: Dist, folder: Path) -> None:
    """Every process must see the output folder rank 0 writes (a checkpoint holds each rank's
    state, and all resume from it): refuse, on every process, when one does not (several
    machines with --output on local disks)."""
    if dist.world_size == 1:
        return
    import secrets
    import socket

    from .config import ConfigError

    probe = Path(folder) / f".dmd2-shared-{dist.from_main(secrets.randbits(62))}"
    if dist.main:
        probe.write_bytes(b"")
    dist.barrier()
    seen = dist.all_gather_object((socket.gethostname(), probe.is_file()))
    dist.barrier()
    if dist.main:
        probe.unlink()
    for rank, (host, visible) in enumerate(seen):
        if not visible:
            raise ConfigError(f"rank {rank} (on {host}) does not see the output folder {folder} that rank 0 (on {seen[0][0]}) "
                              "writes: put --output on storage that every machine mounts at the same path")


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


def save_training_checkpoint(folder: Path, step: int, trainer, backend, dist: Dist, keep: int, settings: dict, shards: int = 1) -> Path:
    """checkpoints/step_N/: tensors.safetensors (adapters, head, moving average),
    settings.json (what a resume must match) and state_rank{r}.pt per process, written into a
    temp folder that is renamed into place once every process is done. A fake score sharded
    over ``shards`` processes is gathered whole into tensors.safetensors; its optimiser state
    stays sharded, each process's rows in its own state file."""
    from .data import write_text_atomic
    from .lora import save_safetensors_atomic
    from .shard import gathered, local

    final = folder / f"step_{step:07d}"
    tmp = folder / f".step_{step:07d}.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors = gathered(trainer.tensors(), keep=dist.main)  # on every process: sharded tensors are gathered
    if dist.main:
        save_safetensors_atomic(tensors, tmp / "tensors.safetensors")
        write_text_atomic(tmp / "settings.json", json.dumps(settings, indent=2))
    del tensors
    state = {"trainer": local(trainer.state_dict(include_parameters=False)), "backend": backend.state_dict(), "world_size": dist.world_size,
             "fake_score_shards": shards}
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


def resume_settings(run: RunConfig, config, resolution: int, family=None) -> dict[str, Any]:
    """The settings a checkpoint can only be resumed with: everything that shapes the trained
    tensors (the base's sampling, LoRA size and targets, resolution, every algorithm key but
    ``steps``). ``family``: the base's ``bases.Family`` (its ``sampling_label``: 'eps', 'v',
    'v + zsnr'; a "native" fake-loss weighting is recorded as its prediction, so an eps run's
    settings are those of the versions before it); None: an eps base, the sampling unrecorded."""
    from .lora import resolve_targets

    targets = resolve_targets(run.lora_targets, *([family.network] if family is not None and family.network is not None else []))
    dmd2 = {k: v for k, v in config.to_dict().items() if k not in ("steps", "ema_on_cpu")}
    if dmd2.get("fake_loss_weighting") == "native":
        dmd2["fake_loss_weighting"] = "eps" if family is None else family.prediction
    fake_score = "full" if run.fake_score == "full" else {"rank": run.fake_score_rank or run.lora_rank}
    # The sampling first (another base's sampling is named as what changed), then the
    # student's timesteps: a 1-step run's layout follows from them (``one_step_layout``), so a
    # changed schedule is named as what changed, not the fake score it brought along.
    sampling = {} if family is None else {"sampling": family.sampling_label}
    return {**sampling, "generator_timesteps": dmd2.pop("generator_timesteps"), "lora_rank": run.lora_rank, "fake_score": fake_score,
            "lora_alpha": run.lora_alpha, "lora_targets": list(targets), "resolution": resolution, **dmd2}


# The layout a 1-step student gets unless the run sets it (``one_step_layout``): on the digits
# a 1-step student needs a fake score that can follow it and every layer of the generator
# (docs/digits.md: full fake score + every layer 1.99 ± 0.15, LoRA F at 4x the generator's rank
# + every layer 2.17 ± 0.17, the 4-step layout 2.67 ± 0.16). Each arch gets the best of those
# that fits a 24 GB card by ``--estimate`` at its default resolution, rank 64, batch 1 x 4, bf16,
# checkpointing, GAN on (``benchmarks/bench_memory_estimate.py``, docs/training.md): SD1.5 a full
# fake score (19.8 GiB); SDXL LoRA F at 2x (18.1 GiB; 3x is 21.8 GiB, too close to 24 with the
# CUDA context, 4x 25.6 GiB). ``fake_score_rank_x`` multiplies ``lora_rank`` where F is a LoRA.
ONE_STEP_LAYOUT = {
    "sd15": {"fake_score": "full", "fake_score_rank_x": 4, "lora_targets": ("all",), "estimate": "19.8 GiB at 512 px"},
    "sdxl": {"fake_score": "lora", "fake_score_rank_x": 2, "lora_targets": ("all",), "estimate": "18.1 GiB at 1024 px"},
}
LAYOUT_KEYS = ("fake_score", "fake_score_rank", "lora_targets")
LAYOUT_HINT = "--estimate gives yours; --fake-score, --fake-score-rank and --lora-targets choose another layout"


def one_step_layout(run: RunConfig, arch: str, timesteps, given: set[str], hint: str = LAYOUT_HINT) -> tuple[RunConfig, str | None]:
    """The run with ``ONE_STEP_LAYOUT[arch]`` for the layout keys it does not set itself
    (``given``: the keys set in the config file, ``--set`` or a flag), when the student has
    one timestep; and the start-up line that says what was chosen, ending in ``hint`` (how
    to choose another: the command's flags, or the node's inputs). Multi-step runs keep the
    reference's layout (LoRA F at the generator's rank, the DMD2 list)."""
    if len(tuple(timesteps)) != 1 or arch not in ONE_STEP_LAYOUT or set(LAYOUT_KEYS) <= given:
        return run, None
    layout = ONE_STEP_LAYOUT[arch]
    changes: dict[str, Any] = {}
    if "fake_score" not in given:
        changes["fake_score"] = layout["fake_score"]
    fake_score = changes.get("fake_score", run.fake_score)
    if "fake_score_rank" not in given and fake_score == "lora" and layout.get("fake_score_rank_x"):
        changes["fake_score_rank"] = layout["fake_score_rank_x"] * run.lora_rank
    if "lora_targets" not in given:
        changes["lora_targets"] = layout["lora_targets"]
    run = dataclasses.replace(run, **changes)
    fake = "a full fp32 copy of the UNet" if run.fake_score == "full" else f"a LoRA of rank {run.fake_score_rank or run.lora_rank}"
    targets = "every layer (lora_targets all)" if run.lora_targets == ("all",) else f"lora_targets {','.join(run.lora_targets) or 'dmd2'}"
    return run, (f"1-step layout for {'SDXL' if arch == 'sdxl' else 'SD1.5'}: the fake score is {fake}, the LoRAs adapt {targets}; "
                 f"estimated peak {layout['estimate']}, rank 64, batch 1 x 4 ({hint})")


def adopt_init_lora(run: RunConfig, init, say: Callable[[str], None]) -> RunConfig:
    """The run with the init LoRA's rank and alpha: the generator adapter continues that file
    (said through ``say`` when they differ from the run's). A fake score started from the
    file must be a LoRA of that rank or a full copy."""
    from .config import ConfigError

    if init is None:
        return run
    if run.init_fake_score and run.fake_score == "lora" and run.fake_score_rank not in (0, init.rank):
        raise ConfigError(f"init_fake_score: the fake score LoRA has rank {run.fake_score_rank}, init LoRA {init.name} rank "
                          f"{init.rank}; leave fake_score_rank at 0 (the file's rank) or drop init_fake_score")
    if (run.lora_rank, run.lora_alpha) == (init.rank, init.alpha):
        return run
    say(f"init LoRA {init.name} has rank {init.rank}, alpha {init.alpha:g}: the run takes them "
        f"(lora_rank {run.lora_rank}, lora_alpha {run.lora_alpha:g} were set)")
    return dataclasses.replace(run, lora_rank=init.rank, lora_alpha=init.alpha)


def init_settings(run: RunConfig, init) -> dict[str, Any]:
    """The init LoRA's part of what a resume must match: the file's content, and whether the
    fake score started from it (a run started from zero holds None)."""
    from .lora import no_init_settings

    return init.settings(run.init_fake_score) if init is not None else no_init_settings()


DATA_KEYS = ("prompts", "images", "captions")  # settings that are fingerprints (data.data_fingerprints)


def saved_settings(path: Path) -> dict[str, Any]:
    """The settings.json of the checkpoint at ``path``."""
    from .config import ConfigError

    saved_file = path / "settings.json"
    if not saved_file.is_file():
        raise ConfigError(f"cannot resume from {path}: it has no settings.json (written by an older version); use --no-resume to start over")
    return json.loads(saved_file.read_text(encoding="utf-8"))


# Keys that checkpoints of earlier versions did not save, with the value those runs used: an
# SDXL run started before ``uncond`` existed trained against the empty prompt, and resuming it
# with today's default (zeros) would switch silently; runs before ``sampling`` were all eps,
# runs before ``regression_pairs`` drew fresh pairs.
LEGACY_SETTINGS = {"uncond": "empty", "sampling": "eps", "regression_pairs": 0}


def resume_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting that differs: (key, current value, saved value), or None. Only keys
    both have are compared (with ``LEGACY_SETTINGS`` for the older ones): a checkpoint of an
    older version, which did not save a key, resumes."""
    saved = LEGACY_SETTINGS | saved
    for key, value in current.items():
        value = json.loads(json.dumps(value))
        if key in saved and saved[key] != value:
            return key, value, saved[key]
    return None


def check_resume_settings(path: Path, current: dict[str, Any]) -> None:
    """Refuse to resume ``path`` with settings that differ from the saved ones, naming the key."""
    from .config import ConfigError

    mismatch = resume_mismatch(saved_settings(path), current)
    if mismatch is None:
        return
    key, value, saved = mismatch
    if key in DATA_KEYS:
        raise ConfigError(
            f"cannot resume from {path}: the {key} differ from the saved run's ({value or 'none'} now, {saved or 'none'} "
            f"then); set them back, or start over with --no-resume or another --output"
        )
    raise ConfigError(
        f"cannot resume from {path}: {key} is {value!r} now but the saved run used {saved!r} "
        f"(set it back, or start over with --no-resume or another --output)"
    )


def load_training_checkpoint(path: Path, trainer, backend, dist: Dist, shards: int = 1) -> int:
    """Restore the run from checkpoint ``path``; ``shards``: the processes this run shards its
    full fake score over (1: not sharded), which must be the saved run's: each state file
    holds its process's rows of the fake score's optimiser state."""
    from safetensors.torch import load_file

    from .config import ConfigError
    from .shard import restore_optimizer_state

    state_file = path / f"state_rank{dist.rank}.pt"
    if not state_file.is_file():
        raise ConfigError(f"{path} was written by a run with another number of processes; resume with the same number")
    state = torch.load(str(state_file), map_location="cpu", weights_only=True)
    saved_shards = int(state.get("fake_score_shards", 1))
    if saved_shards != shards:
        then = f"sharded over {saved_shards} processes" if saved_shards > 1 else "held whole by each process"
        now = f"sharded over {shards}" if shards > 1 else "held whole"
        fix = f"resume on {saved_shards} processes" if saved_shards > 1 else "resume with --no-shard-fake-score"
        raise ConfigError(f"cannot resume from {path}: its full fake score was {then} and would now be {now} (the optimiser "
                          f"state is saved per process); {fix}, or start over with --no-resume")
    try:
        trainer.load_tensors(load_file(str(path / "tensors.safetensors")))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"checkpoint {path} does not match this run: {exc}") from exc
    saved = state["trainer"]
    saved["fake_optimizer"] = restore_optimizer_state(trainer.fake_optimizer, saved["fake_optimizer"])
    trainer.load_state_dict(saved)
    backend.load_state_dict(state["backend"])
    return trainer.step_count


class Stopped(Exception):
    """The run stopped before its last iteration (a signal, ComfyUI's Interrupt) after saving
    a checkpoint at ``step``; ``reason`` is what asked it to stop (e.g. the signal number)."""

    def __init__(self, step: int, reason: Any):
        super().__init__(f"stopped at step {step}")
        self.step, self.reason = step, reason


# --- the run -------------------------------------------------------------------------------


# kohya's ``ss_base_model_version`` of each base (sd-scripts' names; v-prediction SD1.5 has none of its own).
SS_BASE_MODEL_VERSION = {("sdxl", "eps"): "sdxl_base_v1-0", ("sdxl", "v"): "sdxl_base_v1-0", ("sd15", "eps"): "sd_v1",
                         ("sd15", "v"): "sd_v1", ("sd2", "eps"): "sd_v2", ("sd2", "v"): "sd_v2_768_v", ("flux_dev", "flow"): "flux1"}


class TrainingRun:
    """Backend + trainer on ``base_model`` (a ComfyUI ``BaseModel``: its UNet becomes the
    frozen base, adapters injected in place until ``close``), checkpointed into ``folder``.
    ``family``: the base's ``bases.Family`` (None: ``bases.family_of(base_model)``; a graph's
    MODEL passes ``checkpoint.detect_family(model)``, which sees its sampling patches)."""

    def __init__(self, base_model, data, run: RunConfig, config, resolution: int, folder: Path, device: str, dist: Dist | None = None,
                 extra_settings: dict | None = None, init_lora=None, family=None, pool_identity: dict | None = None):
        from .. import bases
        from .backend import SharedBaseBackend
        from .shard import is_sharded
        from .trainer import DMD2Trainer

        self.family = family = family if family is not None else bases.family_of(base_model)
        self.run, self.config, self.resolution, self.folder = run, config, resolution, Path(folder)
        self.dist = dist or Dist()
        # what a resume must match; ``extra_settings``: the caller's own (the node: its base model)
        # ``init_lora``: the ``lora.InitLoRA`` of ``run.init_lora`` (read and checked by the caller, ``adopt_init_lora``)
        self.init = init_lora
        self.settings = resume_settings(run, config, resolution, family) | init_settings(run, init_lora) | dict(extra_settings or {})
        self.checkpoints = self.folder / "checkpoints"
        # Processes the full fake score is sharded over (1: not sharded, a whole copy on each).
        self.fake_score_shards = self.dist.world_size if run.fake_score == "full" and run.shard_fake_score else 1
        shard = None
        if self.fake_score_shards > 1:
            from .shard import device_mesh, shard_module

            shard = functools.partial(shard_module, mesh=device_mesh(self.dist, device))
        channels = getattr(getattr(base_model, "latent_format", None), "latent_channels", 4)  # Flux: 16
        self.backend = SharedBaseBackend(
            base_model, data, (channels, resolution // 8, resolution // 8),
            lora_rank=run.lora_rank, lora_alpha=run.lora_alpha, lora_targets=run.lora_targets, fake_score_rank=run.fake_score_rank or None,
            full_copies=("fake_score",) if run.fake_score == "full" else (),
            device=device, mixed_precision=run.mixed_precision or None,
            gradient_checkpointing={"auto": None, "on": True, "off": False}[run.gradient_checkpointing],
            seed=config.seed, rank=self.dist.rank, init_lora=init_lora, init_fake_score=run.init_fake_score, family=family,
            shard_fake_score=shard,
        )
        self.trainer = DMD2Trainer(config, self.backend, rank=self.dist.rank,
                                   shared_draw=self.dist.from_main if self.dist.world_size > 1 else None)
        self.trainable = self.trainer.generator_params + self.trainer.fake_params
        # What each process holds whole: a sharded fake score is built the same on every process
        # and its gradients are reduce-scattered by FSDP2, so it is neither broadcast nor averaged.
        self.replicated = [p for p in self.trainable if not is_sharded(p)]
        if self.dist.world_size > 1:
            broadcast_parameters(self.replicated, self.dist)
            GradientAverager(self.replicated, self.dist.world_size, self.dist)
        self.start, self.saved_step = 0, -1
        self.metrics_log: MetricsLog | None = None
        # What the regression pool's pairs depend on besides the config (``pool.pool_settings``):
        # the data fingerprints and the base model's identity (default: ``extra_settings``).
        self.pool_identity = dict(extra_settings or {}) if pool_identity is None else dict(pool_identity)

    @property
    def total(self) -> int:
        return self.config.total_steps

    def resume(self, checkpoint: Path | None) -> int:
        """Continue from ``checkpoint`` (already checked with ``check_resume_settings``)."""
        if checkpoint is not None:
            self.start = self.saved_step = load_training_checkpoint(checkpoint, self.trainer, self.backend, self.dist, self.fake_score_shards)
        return self.start

    def save_checkpoint(self, step: int) -> None:
        check_in_sync(self.replicated, self.dist)
        save_training_checkpoint(self.checkpoints, step, self.trainer, self.backend, self.dist, self.run.keep_checkpoints, self.settings,
                                 self.fake_score_shards)
        self.saved_step = step
        if self.dist.main:
            self.metrics_log.write_csv()
            save_png_atomic(draw_loss_curves(self.metrics_log.rows), self.folder / "loss_curve.png")

    def prepare_pool(self, stop: Callable[[], Any] = lambda: None, progress: Callable[[int, int], None] | None = None,
                     say: Callable[[str], None] = lambda text: None) -> None:
        """The regression pool for the warm start ahead (``regression_pairs`` > 0): read from
        the folder's ``regression_pool.safetensors`` when built with this run's settings
        (partly built: continued), else built (the reason said through ``say``). The pairs
        done are saved every ``save_every`` batches and when ``stop()`` asks, which raises
        ``Stopped`` at the current step: the next start continues the build. The processes of a
        torchrun run share the build (each makes every world_size-th batch; all hold the whole
        pool); the main one writes the file."""
        from .pool import POOL_FILE, build_pool, load_pool, pool_inputs, pool_settings, save_pool
        from .pool import teacher_forwards_per_pair as per_pair

        config, trainer = self.config, self.trainer
        if not config.regression_pairs or trainer.step_count >= config.regression_steps or trainer.pool is not None:
            return
        path = self.folder / POOL_FILE
        settings = pool_settings(config, self.family, self.backend.latent_shape, self.pool_identity)
        start = None
        inputs = pool_inputs(settings, self.backend.prompt_count)  # once: the check and the build share them
        if path.is_file():
            start, why = load_pool(path, settings, self.backend.prompt_count, inputs)
            if start is None:
                say(f"rebuilding {POOL_FILE}: {why}")
        if start is not None and start.complete:
            say(f"using the {len(start)} regression pairs in {path}")
            trainer.pool = start
            return
        done = 0 if start is None else len(start)
        say(f"building the regression pool: {config.regression_pairs} pairs x {per_pair(config)} teacher UNet "
            f"forwards" + (f", continuing after {done}" if done else ""))
        save = (lambda pool: save_pool(pool, path)) if self.dist.main else None
        reasons = []

        def asked() -> Any:
            reasons.append(stop())
            return reasons[-1]

        pool = build_pool(config, self.backend, settings, start=start, progress=progress, save=save, save_every=self.run.save_every,
                          stop=asked, inputs=inputs, rank=self.dist.rank, world_size=self.dist.world_size,
                          gather=self.dist.all_gather_object)
        if not pool.complete:
            raise Stopped(trainer.step_count, reasons[-1])
        if save is not None:
            save(pool)
        trainer.pool = pool

    @torch.no_grad()
    def sample(self, conds, seeds: Sequence[int]) -> torch.Tensor:
        """The averaged generator's few-step latents for ``conds`` (one seed each)."""
        with self.trainer.averaged_generator():
            return self.backend.sample(conds, seeds, self.config.generator_timesteps)

    def train(self, on_step: Callable[[dict], None] | None = None, on_samples: Callable[[int], None] | None = None,
              stop: Callable[[], Any] = lambda: None, on_pool: Callable[[int, int], None] | None = None,
              say: Callable[[str], None] = lambda text: None) -> None:
        """The iterations left up to ``config.total_steps``: ``on_step(metrics)`` after each, a
        checkpoint every ``save_every`` and at the end, ``on_samples(step)`` every
        ``sample_every`` and at the end. When ``stop()`` returns a reason, a checkpoint is saved
        at the current step and ``Stopped`` raised. First the regression pool, if the run has
        one (``prepare_pool``: ``on_pool(done, total)`` as its pairs are made)."""
        run, total = self.run, self.total
        self.prepare_pool(stop, on_pool, say)
        if self.dist.main:
            self.metrics_log = MetricsLog(self.folder, self.start)
        started = time.perf_counter()
        try:
            while self.trainer.step_count < total:
                metrics = self.trainer.step()
                step = self.trainer.step_count
                if self.dist.main:
                    self.metrics_log.append({**metrics, "time": round(time.perf_counter() - started, 4)})
                if on_step is not None:
                    on_step(metrics)
                if step % run.save_every == 0 and step < total:
                    self.save_checkpoint(step)
                if on_samples is not None and run.sample_every and step % run.sample_every == 0:
                    on_samples(step)
                reason = stop()
                if reason is not None and step < total:
                    if self.saved_step != step:
                        self.save_checkpoint(step)
                    raise Stopped(step, reason)
            latest = find_latest_checkpoint(self.checkpoints)
            if latest is None or latest.name != f"step_{total:07d}":
                self.save_checkpoint(total)
            if on_samples is not None and not (run.sample_every and total % run.sample_every == 0):
                on_samples(total)
        finally:
            if self.metrics_log is not None:
                self.metrics_log.close()

    def export(self, path: Path, metadata: dict, averaged: bool = True) -> Path:
        """The generator as a kohya LoRA (its moving average unless ``averaged`` is False)."""
        from .backend import export_generator_lora

        return export_generator_lora(self.trainer, self.backend, path, metadata, averaged=averaged)

    def lora_metadata(self, base_name: str, base_sha256: str, arch: str) -> dict:
        """The exported LoRA's metadata; ``dmd2_sampling``: the base's sampling ('eps', 'v',
        'v + zsnr': ``Family.sampling_label``; a file without it is from an eps base)."""
        config = self.config
        return {
            "dmd2_base_model": base_name,
            "dmd2_base_model_sha256": base_sha256,
            "dmd2_arch": arch,
            "dmd2_sampling": self.family.sampling_label,
            "dmd2_steps": self.trainer.step_count,
            "dmd2_timesteps": ",".join(str(t) for t in config.generator_timesteps),
            "dmd2_guidance": config.real_guidance_scale,
            "dmd2_resolution": self.resolution,
            "dmd2_config": json.dumps({"run": dataclasses.asdict(self.run), "dmd2": config.to_dict()}),
            "ss_base_model_version": SS_BASE_MODEL_VERSION.get((arch, self.family.prediction), "sd_v1"),
            "dmd2_init_lora": "" if self.init is None else f"{self.init.name} (sha256 {self.init.sha256})",
            # the teacher's guidance input (Flux.1 [dev]: 3.5), what the student was distilled at
            **({} if self.family.guidance is None else {"dmd2_embedded_guidance": self.family.guidance}),
        }

    def close(self) -> None:
        """Give the base model back unchanged and drop adapters, optimisers and averages."""
        self.backend.close()
        self.trainer = self.backend = self.trainable = self.replicated = None
