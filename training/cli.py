"""``dmd2-train``: distil a community SD1.5/SDXL checkpoint (or a Flux.1 [dev] model) into a few-step DMD2 LoRA.

    dmd2-train --checkpoint model.safetensors --prompts prompts.txt --output runs/mine \\
        [--images real/] [--config run.toml] [--set key=value ...]
    dmd2-train --checkpoint flux1-dev.safetensors --text-encoder clip_l.safetensors \\
        --text-encoder t5xxl_fp16.safetensors [--vae ae.safetensors] --prompts ... --output ...

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
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomllib
import torch

from .. import bases
from .run import (  # noqa: F401 (GradientAverager, image_grid, draw_loss_curves: used through this module too)
    Dist,
    GradientAverager,
    OutOfSync,
    RunConfig,
    Stopped,
    TrainingRun,
    check_resume_settings,
    check_same_inputs,
    check_shared_folder,
    draw_loss_curves,
    find_latest_checkpoint,
    image_grid,
    init_distributed,
    save_png_atomic,
)

log = logging.getLogger("dmd2-train")

PRESETS = {(999, 749, 499, 249): "4-step (999,749,499,249)", (399,): "1-step (399)"}
DMD2_FLAGS = {"steps", "seed", "batch_size", "grad_accum", "ema_decay", "regression_steps", "regression_pairs", "uncond"}


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

  # SD1.5 checkpoint -> 1-step LoRA (timestep 999): regression warm start first, every layer
  # adapted and a full fake score, as the digits' 1-step student (about 16 GiB at 512 px)
  dmd2-train --checkpoint ComfyUI/models/checkpoints/mySD15.safetensors \\
             --prompts prompts.txt --output runs/mySD15-1step --timesteps 1-step --regression-steps 1000 \\
             --lora-targets all --fake-score full

  # SDXL finetune, starting from the released DMD2 4-step LoRA instead of zero (what users put
  # on finetunes today at strength 0.75): a LoRA distilled from the finetune itself
  dmd2-train --checkpoint ComfyUI/models/checkpoints/myFinetune.safetensors \\
             --init-lora ComfyUI/models/loras/dmd2_sdxl_4step_lora_fp16.safetensors \\
             --prompts prompts.txt --images real_images/ --output runs/myFinetune-from-dmd2

  # a Flux.1 [dev] finetune (models/diffusion_models) -> 4-step LoRA; its text encoders and VAE
  # as ComfyUI's DualCLIPLoader (type flux) and VAELoader read them (docs/training.md, "Flux.1 [dev]")
  dmd2-train --checkpoint ComfyUI/models/diffusion_models/myFluxFinetune.safetensors \\
             --text-encoder ComfyUI/models/text_encoders/clip_l.safetensors \\
             --text-encoder ComfyUI/models/text_encoders/t5xxl_fp16.safetensors \\
             --vae ComfyUI/models/vae/ae.safetensors --prompts prompts.txt --output runs/myFlux-4step

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
        description="Distil an SD1.5/SDXL single-file checkpoint or a Flux.1 [dev] model into a few-step DMD2 LoRA for ComfyUI. "
        "Writes the LoRA (the generator's moving average), a workflow that uses it, sample grids, "
        "loss curves and resumable checkpoints into --output.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with run and dmd2 keys (default: none)")
    p.add_argument("--checkpoint", metavar="FILE", help="the SD1.5/SDXL single-file checkpoint to distil, .safetensors preferred, or a "
                   "Flux.1 [dev] model (a models/diffusion_models file, or a full checkpoint) (required)")
    p.add_argument("--text-encoder", dest="text_encoders", action="append", metavar="FILE",
                   help="Flux.1: a text encoder file, given twice: clip_l and t5xxl (models/text_encoders, what ComfyUI's "
                   "DualCLIPLoader reads with type flux); needed with a diffusion-model file (default: the checkpoint's own)")
    p.add_argument("--vae", metavar="FILE", help="Flux.1: the VAE file (ae.safetensors, models/vae); needed with --images, and for "
                   "the sample grids (default: the checkpoint's own; none for a diffusion-model file: no sample grids)")
    p.add_argument("--prompts", metavar="FILE", help="text file, one training prompt per line, # comments (required)")
    p.add_argument("--images", metavar="DIR", help="folder of real images, captions in image.txt / image.caption (default: none, and no GAN loss)")
    p.add_argument("--output", metavar="DIR", help="output folder; a folder with checkpoints is resumed (required)")
    p.add_argument("--steps", type=int, help=f"DMD2 training iterations, >= 1 ({_defaults('steps')})")
    p.add_argument("--seed", type=int, help=f"random seed ({_defaults('seed')})")
    p.add_argument("--resolution", type=int, help="image side in pixels, a multiple of 8 (default: 1024 for SDXL and Flux.1, 512 for SD1.5)")
    p.add_argument("--timesteps", help="the student's schedule: 4-step (999,749,499,249), 1-step (399 for SDXL, 999 for SD1.5, "
                   "as in the reference; 999 for Flux.1 [dev]) or a list such as 999,499 (default: 4-step)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help=f"samples per micro-batch and process ({_defaults('batch_size')})")
    p.add_argument("--grad-accum", type=int, dest="grad_accum", help=f"micro-batches accumulated per update ({_defaults('grad_accum')})")
    p.add_argument("--ema-decay", type=float, dest="ema_decay", help=f"generator moving average per generator update, 0 = off ({_defaults('ema_decay')})")
    p.add_argument("--regression-steps", type=int, dest="regression_steps",
                   help=f"regression warm-start iterations before DMD2 (the reference's 1-step recipe; on the digits it helped 4-step students more) ({_defaults('regression_steps')})")
    p.add_argument("--regression-pairs", type=int, dest="regression_pairs", metavar="N",
                   help="with --regression-steps: build a pool of N teacher pairs once (cached in --output as "
                   "regression_pool.safetensors, resumable) and draw each iteration's pairs from it, instead of running the "
                   "teacher for every sample of every iteration; the reference used 10,000 pairs, each reused about 50 times; "
                   f"0 = fresh pairs ({_defaults('regression_pairs')})")
    p.add_argument("--uncond", choices=["zeros", "empty"],
                   help="the real score's unconditional side for its guidance: zeros (zero text, the size conditioning kept) "
                   "or the encoded empty prompt, which a finetune trained with caption dropout may prefer (docs/training.md) "
                   f"({_defaults('uncond')})")
    p.add_argument("--export-raw", dest="export_raw", action="store_true", default=None,
                   help="also export the raw generator as <name>_raw.safetensors (default: off)")
    p.add_argument("--lora-rank", type=int, dest="lora_rank", help=f"rank of the generator and fake-score LoRAs (default: {run.lora_rank})")
    p.add_argument("--lora-targets", dest="lora_targets",
                   help="layers the LoRAs adapt: dmd2 (the reference's list), all (also the input/output convolutions and the "
                   "time and class embeddings) or diffusers module names separated by commas (default: dmd2)")
    p.add_argument("--fake-score", dest="fake_score", choices=["lora", "full"],
                   help="the fake score: a LoRA on the shared base, or a full trained fp32 copy of the UNet (the reference's "
                   "layout: 16 bytes per UNet parameter more with AdamW, about 14 GB for SD1.5, 41 GB for SDXL; on the digits "
                   "it made the 1-step student as good as full copies) (default: lora)")
    p.add_argument("--no-shard-fake-score", dest="shard_fake_score", action="store_false", default=None,
                   help="with --fake-score full under torchrun: hold the whole fake score on every process instead of sharding "
                   "its weights, gradients and AdamW state across them (FSDP2; fewer transfers where it fits) (default: sharded)")
    p.add_argument("--fake-score-rank", type=int, dest="fake_score_rank",
                   help="the fake score's own LoRA rank, e.g. 4x --lora-rank: it must follow the generator's samples, and is "
                   "never exported (default: --lora-rank)")
    p.add_argument("--lora-alpha", type=float, dest="lora_alpha", help=f"LoRA alpha; the update is scaled by alpha/rank (default: {run.lora_alpha})")
    p.add_argument("--init-lora", dest="init_lora", metavar="FILE",
                   help="start the generator from this few-step LoRA instead of zero, e.g. the DMD2 4-step LoRA on your "
                   "finetune (kohya, diffusers or PEFT keys; its rank and alpha are taken); the exported LoRA is the whole "
                   "adapter (default: none)")
    p.add_argument("--init-fake-score", dest="init_fake_score", action="store_true", default=None,
                   help="with --init-lora: the fake score starts from it too, instead of from the base model (default: off)")
    p.add_argument("--lora-name", dest="lora_name", help="file name of the exported LoRA (default: dmd2_<checkpoint name>_lora)")
    p.add_argument("--save-every", type=int, dest="save_every", help=f"iterations between resumable checkpoints (default: {run.save_every})")
    p.add_argument("--sample-every", type=int, dest="sample_every",
                   help=f"iterations between sample grids in <output>/samples, 0 = only at the end (default: {run.sample_every})")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument("--mixed-precision", dest="mixed_precision", choices=["bf16", "fp16", "no"],
                   help="autocast dtype and the frozen base weights' dtype on a GPU; fp16 trains with loss scaling "
                   "(default: bf16 on GPUs that have it, else fp16; no on CPU)")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", choices=["auto", "on", "off"],
                   help="recompute activations in the backward pass to save memory (default: auto = on for GPU)")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="start over even if --output holds checkpoints (default: resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any run or dmd2 key (docs/training.md), repeatable, e.g. --set lr_generator=2e-5 (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    p.add_argument("--estimate", action="store_true",
                   help="print the GPU memory one training iteration needs at its peak (with its parts) and the work per "
                   "iteration, then exit: nothing is written and no weight is read (the run's own code on fake tensors, "
                   "about 1 minute for SD1.5, 3 for SDXL on a CPU); --prompts and --output are then optional (default: off)")
    p.add_argument("--base-dtype", dest="base_dtype", choices=["auto", "fp8", "bf16", "fp16", "fp32"], default="auto",
                   help="the frozen base's weights: fp8 holds them in float8 e4m3fn and computes each layer in the autocast "
                   "dtype, as ComfyUI loads an fp8 model (half the memory of bf16; any CUDA GPU, no fp8 compute needed; "
                   "bf16 instead, said in one line, where fp8 cannot be held); auto: fp8 for an fp8 file, else the autocast "
                   "dtype (default: auto)")
    p.add_argument("--memory-budget", dest="memory_budget", type=float, metavar="GIB",
                   help="with --estimate: say whether the run fits this much GPU memory and which settings make it fit "
                   "(default: the GPU's own memory if there is one)")
    p.add_argument("--world-size", dest="world_size", type=int, default=1, metavar="N",
                   help="with --estimate: the peak on each of N GPUs of a torchrun run; a full fake score is then sharded "
                   "over them (its weights, gradients and AdamW state 1/N each, plus the blocks gathered at a time) (default: 1)")
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


def resolve_settings(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any], set[str]]:
    """RunConfig, the dmd2 keys (applied later on the checkpoint's arch defaults) and the run
    keys set anywhere: TOML file, then ``--set`` overrides, then the dedicated flags."""
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
        for key in ("checkpoint", "prompts", "images", "output", "init_lora", "vae"):
            if run_values.get(key) and not Path(run_values[key]).is_absolute():
                run_values[key] = str(path.parent / run_values[key])
        if isinstance(run_values.get("text_encoders"), list):
            run_values["text_encoders"] = [str(path.parent / p) for p in run_values["text_encoders"]]
    route(parse_overrides(args.overrides), "--set")
    for key in run_keys | DMD2_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            (run_values if key in run_keys else dmd2_values)[key] = value
    if args.timesteps is not None:
        dmd2_values["generator_timesteps"] = parse_timesteps_flag(args.timesteps)
    run = RunConfig(**{k: _coerce_run(k, v) for k, v in run_values.items()})
    run.validate(required=("checkpoint",) if args.estimate else ("checkpoint", "prompts", "output"))
    return run, dmd2_values, set(run_values)


def sampling_node(family, file_family) -> tuple[str, bool] | None:
    """The stock ModelSamplingDiscrete setting (sampling, zsnr) a workflow needs between the
    checkpoint and the LoRA so that ComfyUI samples the base as ``family`` (the sampling it was
    distilled on), when ComfyUI's reading of the checkpoint file alone (``file_family``: its
    ``v_pred``/``ztsnr`` keys, SD2's weight test) differs; None when the file says it."""
    if (family.prediction, family.zsnr) == (file_family.prediction, file_family.zsnr):
        return None
    return {"v": "v_prediction"}.get(family.prediction, family.prediction), family.zsnr


def workflow_api(checkpoint_name: str, lora_name: str, prompt: str, resolution: int, timesteps: Sequence[int], seed: int = 0,
                 sampling: tuple[str, bool] | None = None) -> dict:
    """A ComfyUI API-format graph: checkpoint [-> ModelSamplingDiscrete ``sampling``] -> the
    LoRA -> DMD2Generate -> decode -> save."""
    preset = PRESETS.get(tuple(timesteps), "custom")
    extra = {}
    if sampling is not None:
        extra = {"8": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": sampling[0], "zsnr": bool(sampling[1])}}}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        **extra,
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["8" if extra else "1", 0], "lora_name": lora_name, "strength_model": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": resolution, "height": resolution, "batch_size": 1}},
        "5": {
            "class_type": "DMD2Generate",
            "inputs": {
                "model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0], "seed": seed,
                "preset": preset, "custom_timesteps": ",".join(str(t) for t in timesteps), "cfg": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "dmd2"}},
    }


def workflow_ui(checkpoint_name: str, lora_name: str, prompt: str, resolution: int, timesteps: Sequence[int], seed: int = 0,
                sampling: tuple[str, bool] | None = None) -> dict:
    """The same graph in the UI (litegraph) format, to open in ComfyUI's editor."""
    preset = PRESETS.get(tuple(timesteps), "custom")
    # (id, type, widget values, [(input name, type)], [(output name, type)], x, y, w, h): laid
    # out in columns with room for what the frontend draws (tested: no overlaps there).
    specs = [
        (1, "CheckpointLoaderSimple", [checkpoint_name], [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], 40, 60, 340, 100),
        (2, "LoraLoaderModelOnly", [lora_name, 1.0], [("model", "MODEL")], [("MODEL", "MODEL")], 510, 60, 340, 90),
        (3, "CLIPTextEncode", [prompt], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], 510, 240, 340, 140),
        (4, "EmptyLatentImage", [resolution, resolution, 1], [], [("LATENT", "LATENT")], 510, 470, 340, 110),
        (5, "DMD2Generate", [seed, "fixed", preset, ",".join(str(t) for t in timesteps), 1.0],
         [("model", "MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT")], [("LATENT", "LATENT")], 980, 60, 340, 190),
        (6, "VAEDecode", [], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], 1450, 60, 210, 50),
        (7, "SaveImage", ["dmd2"], [("images", "IMAGE")], [], 1450, 200, 400, 440),
    ]
    # [link id, from node, from slot, to node, to slot, type]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 3, 0, "CLIP"], [3, 2, 0, 5, 0, "MODEL"], [4, 3, 0, 5, 1, "CONDITIONING"],
             [5, 4, 0, 5, 2, "LATENT"], [6, 5, 0, 6, 0, "LATENT"], [7, 1, 2, 6, 1, "VAE"], [8, 6, 0, 7, 0, "IMAGE"]]
    if sampling is not None:  # checkpoint -> ModelSamplingDiscrete (below the loader) -> LoRA
        specs.insert(1, (8, "ModelSamplingDiscrete", [sampling[0], bool(sampling[1])], [("model", "MODEL")], [("MODEL", "MODEL")],
                         40, 240, 340, 90))
        links[0] = [1, 1, 0, 8, 0, "MODEL"]
        links.append([9, 8, 0, 2, 0, "MODEL"])
    return _ui_graph(specs, links)


def _ui_graph(specs, links) -> dict:
    """A litegraph workflow from node specs (id, type, widget values, inputs, outputs, x, y, w,
    h) and links ([link id, from node, from slot, to node, to slot, type])."""
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
    return {"last_node_id": max(s[0] for s in specs), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _dmd2_flow_recipes() -> list:
    """DMD2Generate's DMD2 flow presets (the update DMD2 students are sampled with)."""
    from ..nodes.families import FLOW_RECIPES

    return [r for r in FLOW_RECIPES if r.rule == "dmd2" and r.base == "flux_dev"]


def flux_preset(timesteps: Sequence[int]) -> str | None:
    """The DMD2Generate flow preset that samples a Flux.1 [dev] student trained on ``timesteps``
    (the N-step trailing list on the flow grid is the preset's N times, on the model's shift)."""
    return next((r.name for r in _dmd2_flow_recipes() if bases.FLUX_DEV.trailing_timesteps(r.steps) == tuple(timesteps)), None)


def flux_workflow(model_name: str, lora_name: str, prompt: str, resolution: int, preset: str, clip_names: Sequence[str] | None,
                  vae_name: str | None, checkpoint: bool = False, seed: int = 0) -> tuple[dict, dict]:
    """(API graph, UI graph) sampling a Flux.1 [dev] LoRA: the model (UNETLoader, or
    CheckpointLoaderSimple for a full checkpoint), its text encoders (DualCLIPLoader type flux,
    ``clip_names`` clip_l then t5xxl; None: the checkpoint's), its VAE (VAELoader; None: the
    checkpoint's), the LoRA, DMD2Generate on the flow preset (its embedded guidance 3.5),
    decode, save. The 16-channel latent comes from EmptySD3LatentImage."""
    loader = ("CheckpointLoaderSimple", {"ckpt_name": model_name}) if checkpoint else ("UNETLoader", {"unet_name": model_name, "weight_dtype": "default"})
    api = {"1": {"class_type": loader[0], "inputs": loader[1]}}
    clip, vae = ["1", 1], ["1", 2]
    if clip_names:
        api["8"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": clip_names[0], "clip_name2": clip_names[1], "type": "flux"}}
        clip = ["8", 0]
    if vae_name:
        api["9"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}}
        vae = ["9", 0]
    api.update({
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": prompt}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": resolution, "height": resolution, "batch_size": 1}},
        "5": {"class_type": "DMD2Generate", "inputs": {"model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0], "seed": seed,
                                                     "preset": preset, "custom_timesteps": "", "cfg": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": vae}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "dmd2"}},
    })
    outputs = [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")] if checkpoint else [("MODEL", "MODEL")]
    specs = [(1, loader[0], list(loader[1].values()), [], outputs, 40, 60, 340, 100 if checkpoint else 90)]
    if clip_names:
        specs.append((8, "DualCLIPLoader", [*clip_names, "flux", "default"], [], [("CLIP", "CLIP")], 40, 240, 340, 130))
    if vae_name:
        specs.append((9, "VAELoader", [vae_name], [], [("VAE", "VAE")], 40, 440, 340, 60))
    specs += [
        (2, "LoraLoaderModelOnly", [lora_name, 1.0], [("model", "MODEL")], [("MODEL", "MODEL")], 510, 60, 340, 90),
        (3, "CLIPTextEncode", [prompt], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], 510, 240, 340, 140),
        (4, "EmptySD3LatentImage", [resolution, resolution, 1], [], [("LATENT", "LATENT")], 510, 470, 340, 110),
        (5, "DMD2Generate", [seed, "fixed", preset, "", 1.0], [("model", "MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT")],
         [("LATENT", "LATENT")], 980, 60, 340, 190),
        (6, "VAEDecode", [], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], 1450, 60, 210, 50),
        (7, "SaveImage", ["dmd2"], [("images", "IMAGE")], [], 1450, 200, 400, 440),
    ]
    ends = [(["1", 0], 2, 0, "MODEL"), (clip, 3, 0, "CLIP"), (["2", 0], 5, 0, "MODEL"), (["3", 0], 5, 1, "CONDITIONING"),
            (["4", 0], 5, 2, "LATENT"), (["5", 0], 6, 0, "LATENT"), (vae, 6, 1, "VAE"), (["6", 0], 7, 0, "IMAGE")]
    links = [[i, int(src[0]), src[1], dst, slot, kind] for i, (src, dst, slot, kind) in enumerate(ends, start=1)]
    return api, _ui_graph(specs, links)


def write_flux_workflows(output: Path, run: RunConfig, kind: str, text_encoders: dict, lora_name: str, prompt: str, resolution: int,
                         timesteps: Sequence[int]) -> None:
    """workflow_api.json and workflow.json for a Flux.1 [dev] run, naming the files as ComfyUI
    lists them (or by file name, said in a line, when they are outside its model folders); none
    when no flow preset samples the trained timesteps (said in a line)."""
    from .data import write_text_atomic

    preset = flux_preset(timesteps)
    if preset is None:
        steps = "-, ".join(str(r.steps) for r in _dmd2_flow_recipes())
        log.info("no workflow written: DMD2Generate has no flow preset for timesteps %s (it samples the %s-step "
                 "trailing lists); sample the LoRA with a sampler on those flow times", ",".join(map(str, timesteps)), steps)
        return

    def name(path: Path, folder: str) -> str:
        found = comfy_model_name(path, folder)
        if found is None:
            log.info("the workflow names %s by its file name: it is outside ComfyUI's %s folder, put it there to use the workflow",
                     path.name, folder)
        return found or path.name

    checkpoint = kind == "checkpoint"
    model_name = name(Path(run.checkpoint), "checkpoints" if checkpoint else "diffusion_models")
    clip_names = [name(Path(text_encoders[role]), "text_encoders") for role in ("clip_l", "t5xxl")] if text_encoders else None
    vae_name = name(Path(run.vae), "vae") if run.vae else (None if checkpoint else "ae.safetensors")
    if not run.vae and not checkpoint:
        log.info("the workflow names the VAE ae.safetensors (Flux.1's, models/vae): no --vae was given")
    api, ui = flux_workflow(model_name, lora_name, prompt, resolution, preset, clip_names, vae_name, checkpoint)
    write_text_atomic(output / "workflow_api.json", json.dumps(api, indent=2))
    write_text_atomic(output / "workflow.json", json.dumps(ui, indent=2))
    log.info("wrote %s: copy it into ComfyUI's models/loras and open %s", output / lora_name, output / "workflow.json")


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


@functools.cache
def _load_extra_model_paths(root: Path) -> None:
    """ComfyUI's ``extra_model_paths.yaml`` into ``folder_paths``, as its main.py does at start
    (once per process)."""
    extra = root / "extra_model_paths.yaml"
    if not extra.is_file():
        return
    try:
        from utils.extra_config import load_extra_path_config

        load_extra_path_config(str(extra))
    except Exception as exc:  # noqa: BLE001 (a broken yaml only costs the subfolder name)
        log.warning("could not read %s (%s); using the default model folders", extra, exc)


def comfy_model_name(path: Path, folder: str = "checkpoints") -> str | None:
    """The name ComfyUI lists ``path`` under in its ``folder`` (subfolders included, as the
    loaders' combos show it), or None when the file is outside all of ComfyUI's such folders."""
    from ..comfy_env import ensure_comfy

    _load_extra_model_paths(ensure_comfy())
    import folder_paths

    target = path.resolve()
    for base in folder_paths.get_folder_paths(folder):
        try:
            return str(target.relative_to(Path(base).resolve()))
        except ValueError:
            continue
    return None


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
        return dist.agree_max(self.signum or 0) or None

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# --- the run -------------------------------------------------------------------------------


def train(argv: Sequence[str] | None = None):
    """Run the command; returns (trainer, backend, output folder). Raises on bad input, and
    ``Stopped`` when a signal stopped it (after saving a checkpoint)."""
    from . import checkpoint as C
    from .config import RUN_ARCH_DEFAULTS, ConfigError, DMD2Config, with_fake_score_rate
    from .data import (
        cache_key,
        check_resolution,
        data_fingerprints,
        file_sha256,
        list_images,
        load_cached,
        read_caption,
        read_prompts,
        save_cached,
        write_text_atomic,
    )
    from .lora import check_init_arch, read_init_lora
    from .run import adopt_init_lora, init_settings, one_step_layout, resume_settings

    args = build_parser().parse_args(argv)
    run, dmd2_values, given = resolve_settings(args)
    if args.memory_budget is not None and not args.estimate:
        raise ConfigError("--memory-budget goes with --estimate")
    if args.world_size != 1 and not args.estimate:
        raise ConfigError("--world-size goes with --estimate (torchrun sets the number of processes of a run)")
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")

    # 1. Check every input before loading weights or writing anything.
    if run.resolution:
        check_resolution(run.resolution)
    prompts = read_prompts(run.prompts) if run.prompts else []  # optional with --estimate only
    image_paths = list_images(run.images) if run.images else []
    captions = [read_caption(p) for p in image_paths]
    kind, arch = C.peek_checkpoint(run.checkpoint)  # the header only, for .safetensors
    C.refuse_non_checkpoint(Path(run.checkpoint), kind, arch)
    # Flux: [schnell] and the other Flux variants refused before anything else (SD: peeked below)
    peeked = C.peek_family(run.checkpoint) if arch in C.FLUX_ARCHS else None
    if "arch" in dmd2_values and dmd2_values["arch"] != arch:
        raise ConfigError(f"config says arch={dmd2_values['arch']!r} but {run.checkpoint} is an {arch} checkpoint")
    run = dataclasses.replace(run, **{k: v for k, v in RUN_ARCH_DEFAULTS.get(arch, {}).items() if k not in given})
    init = read_init_lora(run.init_lora) if run.init_lora else None
    if init is not None:
        check_init_arch(init, checkpoint_context_dim(run.checkpoint), f"{Path(run.checkpoint).name} ({bases.get_family(arch).label})",
                        flux_model=arch in C.FLUX_ARCHS)
        run = adopt_init_lora(run, init, log.info)
    config = DMD2Config.for_arch(arch, **{k: v for k, v in dmd2_values.items() if k != "arch"})
    run, layout = one_step_layout(run, arch, config.generator_timesteps, given)
    if layout is not None:
        log.info("%s", layout)
    config = with_fake_score_rate(config, run.fake_score, rate_given="lr_fake_score" in dmd2_values)
    if config.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {config.steps} (with 0 the LoRA would be exported untrained)")
    # The base's family as ComfyUI will load it (its sampling is part of what a resume must
    # match; the default side is the family's: 768 for SD2.x v).
    peeked = peeked or C.peek_family(run.checkpoint)
    resolution = run.resolution or bases.default_resolution(peeked)
    check_resolution(resolution)
    if args.estimate:
        return estimate(run, config, arch, resolution, args.memory_budget, with_images=bool(image_paths), world_size=args.world_size,
                        base_dtype=args.base_dtype)
    # Flux.1: its text encoder and VAE files, checked before any weight is read.
    text_encoders = C.check_text_encoders(run.checkpoint, kind, arch, run.text_encoders, run.vae, images=bool(image_paths))
    device = resolve_device(run.device)
    if run.mixed_precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ConfigError("--mixed-precision bf16: this GPU has no bf16; use --mixed-precision fp16 (trained with loss "
                          "scaling, the default here) or no (fp32, about twice the memory)")
    dist = init_distributed(device)
    if dist.world_size > 1 and device == "cuda":
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(dist.local_rank)
    on_gpu = device.startswith("cuda")
    sample_prompts = list(run.sample_prompts) or prompts[:4]
    output = Path(run.output)
    checkpoints = output / "checkpoints"
    cache = output / "cache"
    latest = find_latest_checkpoint(checkpoints) if run.resume else None
    # What the run trains on is part of what a resume must match: another prompts file or
    # image folder in the same --output is refused by name, not trained as if it were the old.
    fingerprints = data_fingerprints(prompts, (p.read_bytes() for p in image_paths) if image_paths else None, captions)
    if latest is not None:
        check_resume_settings(latest, resume_settings(run, config, resolution, peeked) | init_settings(run, init) | fingerprints)
    created = prepare_output(output) if dist.main else None
    try:
        check_shared_folder(dist, output)
        # Frozen base weights in the autocast dtype on GPU (bf16 by default), fp32 otherwise.
        from .backend import default_precision

        precision = run.mixed_precision or default_precision(device)
        base_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[precision] if on_gpu else torch.float32
        from .memory import base_weight_dtype, header_dtype

        gpu_gib = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30 if on_gpu else None
        base_dtype, fallback = base_weight_dtype(args.base_dtype, base_dtype, device, header_dtype(C.header_tensors(run.checkpoint)),
                                                 arch, gpu_gib)
        if fallback:
            log.warning("%s", fallback)
        loaded = C.load_checkpoint(run.checkpoint, weight_dtype=base_dtype, text_encoders=text_encoders, vae=run.vae or None)
        if loaded.arch != arch:
            raise C.UnsupportedModel(f"{run.checkpoint} looked like an {arch} checkpoint but ComfyUI loads it as {loaded.arch}")
        family = loaded.family  # on the model's own sigma table
        if family.sampling_label != peeked.sampling_label:
            raise C.UnsupportedModel(f"{run.checkpoint} looked like a {peeked.sampling_label} model but ComfyUI loads it as {family.sampling_label}")
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
        # Flux: the conditions come from the text encoder files, the latents from the VAE file.
        te_hashes = [file_sha256(p, cache if dist.main else None) for p in text_encoders.values()]
        vae_hash = file_sha256(run.vae, cache if dist.main else None) if run.vae else None
        texts = C.RunTexts(prompts, sample_prompts, captions)
        check_same_inputs(dist, checkpoint=ckpt_hash, prompts=texts.all(), images=[(p.name, p.stat().st_size) for p in image_paths],
                          settings=resume_settings(run, config, resolution, family) | init_settings(run, init)
                          | {"shard_fake_score": run.shard_fake_score}, text_encoders=te_hashes, vae=vae_hash)
        text_source = [ckpt_hash, *te_hashes] if te_hashes else ckpt_hash
        text_file = cache / f"text-{cache_key(text_source, texts.all(), resolution)}.safetensors"
        cached = load_cached(text_file)
        if cached is None:
            encoded = C.encode_prompts(loaded, texts.all(), resolution)
            cached = {f"{i}.context": c.context for i, c in enumerate(encoded)} | {f"{i}.y": c.y for i, c in enumerate(encoded) if c.y is not None}
            if dist.main:
                save_cached(text_file, cached)
        conds = [C.Conditioning(cached[f"{i}.context"], cached.get(f"{i}.y")) for i in range(len(texts.all()))]
        real_latents = None
        if image_paths:
            stats = [(p.name, p.stat().st_size, p.stat().st_mtime) for p in image_paths]
            latent_file = cache / f"latents-{cache_key([ckpt_hash, vae_hash] if vae_hash else ckpt_hash, stats, resolution)}.safetensors"
            cached_latents = load_cached(latent_file)
            if cached_latents is None:
                cached_latents = {"latents": C.encode_images(loaded, image_paths, resolution)}
                if dist.main:
                    save_cached(latent_file, cached_latents)
            real_latents = cached_latents["latents"]
        loaded.clip = None  # the text encoders are not needed any more
        if on_gpu:  # ComfyUI's manager keeps what it loaded for encoding (Flux: T5-XXL, 9.5 GB in fp16) on the
            import comfy.model_management  # GPU; the backend places the base itself, so nothing would evict them

            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
        data, sample_conds = texts.split(conds, real_latents, config.uncond)

        # 3. The run (backend and trainer on the frozen base), resumed from the newest checkpoint.
        training = TrainingRun(loaded.model.model, data, run, config, resolution, output, device, dist, extra_settings=fingerprints,
                               init_lora=init, family=family, pool_identity=fingerprints | {"base_model_sha256": ckpt_hash})
        start = training.resume(latest)
    except BaseException:
        if created is not None:  # nothing half-written: a failed start leaves no new folder
            shutil.rmtree(created, ignore_errors=True)
        raise
    total = config.total_steps
    updates = config.generator_updates(total)
    if dist.main:
        record = {"run": dataclasses.asdict(run), "dmd2": config.to_dict(), "arch": arch, "sampling": family.sampling_label,
                  "resolution": resolution, "base_model_sha256": ckpt_hash}
        write_text_atomic(output / "run_config.json", json.dumps(record, indent=2))
        effective = config.samples_per_iteration * dist.world_size
        log.info(
            "%s (%s) %s, %d prompts, %d real images (%d captioned), %s, effective batch %d",
            arch, family.sampling_label, run.checkpoint, len(prompts), len(image_paths), sum(c is not None for c in captions), device, effective,
        )
        log.info(
            "%d iterations = %d generator update%s (%s)", total, updates, "" if updates == 1 else "s",
            (f"{config.regression_steps} regression, then " if config.regression_steps else "")
            + f"one every {config.fake_updates_per_generator_update} DMD2 iterations: the fake score is updated every iteration",
        )
        if updates - config.regression_steps < 10:
            log.warning("only %d DMD2 generator update%s: the LoRA will barely differ from the base model; raise --steps",
                        updates - config.regression_steps, "" if updates - config.regression_steps == 1 else "s")
        if config.regression_steps:
            from .memory import warm_start_report

            log.info("%s", warm_start_report(config, dist.world_size))
        if start:
            log.info("resuming at step %d of %d", start, total)
        else:
            log.info("starting a new run")

    # 4. The loop.
    lora_name = (run.lora_name or f"dmd2_{Path(run.checkpoint).stem}_lora").removesuffix(".safetensors") + ".safetensors"
    seeds = [run.sample_seeds[i % len(run.sample_seeds)] for i in range(len(sample_conds))]
    labels = [f"{prompt} (seed {seed})" for prompt, seed in zip(sample_prompts, seeds)]

    if dist.main and loaded.vae is None:
        log.info("no --vae: no sample grids are drawn (the LoRA and the workflow are written as usual)")

    def write_samples(step: int) -> None:
        if not dist.main or loaded.vae is None:
            return
        images = C.decode_latents(loaded, training.sample(sample_conds, seeds))
        title = f"step {step}/{total} ({config.generator_updates(step)} generator updates), {len(config.generator_timesteps)}-step"
        (output / "samples").mkdir(exist_ok=True)
        save_png_atomic(image_grid(images, labels=labels, title=title), output / "samples" / f"step_{step:07d}.png")

    bar = None
    if dist.main and not args.quiet:
        from tqdm.auto import tqdm

        # Counts generator updates: what makes the LoRA (the fake score runs every iteration).
        bar = tqdm(total=updates, initial=config.generator_updates(start), desc="DMD2 generator updates", unit="upd", dynamic_ncols=True)

    def show(metrics: dict) -> None:
        if bar is not None:
            if metrics.get("generator_updated"):
                bar.update(1)
            shown = ("loss_regression", "loss_dm", "loss_fake", "loss_gan_discriminator")
            bar.set_postfix({"it": f"{metrics['step'] + 1}/{total}", **{k: f"{metrics[k]:.3g}" for k in shown if k in metrics}})

    pool_bar = None

    def pool_progress(done: int, pairs: int) -> None:
        nonlocal pool_bar
        if not dist.main or args.quiet:
            return
        if pool_bar is None:
            from tqdm.auto import tqdm

            pool_bar = tqdm(total=pairs, initial=done, desc="regression pool pairs", unit="pair", dynamic_ncols=True)
        pool_bar.update(done - pool_bar.n)

    try:
        with StopSignals() as signals:
            training.train(on_step=show, on_samples=write_samples, stop=lambda: signals.requested(dist), on_pool=pool_progress,
                           say=log.info if dist.main else lambda text: None)
    finally:
        for progress_bar in (pool_bar, bar):
            if progress_bar is not None:
                progress_bar.close()

    # 5. The LoRA (the generator's moving average) and a workflow that uses it.
    if dist.main:
        metadata = training.lora_metadata(Path(run.checkpoint).name, ckpt_hash, arch)
        training.export(output / lora_name, metadata)
        if run.export_raw:
            training.export(output / lora_name.replace(".safetensors", "_raw.safetensors"), metadata, averaged=False)
        if family.prediction == "flow":
            write_flux_workflows(output, run, kind, text_encoders, lora_name, sample_prompts[0], resolution, config.generator_timesteps)
        else:
            ckpt_name = comfy_model_name(Path(run.checkpoint))
            if ckpt_name is None:
                ckpt_name = Path(run.checkpoint).name
                log.info("the workflow names the checkpoint %s: it is outside ComfyUI's checkpoints folder, put it there to use the workflow", ckpt_name)
            # No ModelSamplingDiscrete node (``sampling_node``): the workflow's CheckpointLoaderSimple
            # reads the file as this run did (ComfyUI's same loader: v_pred/ztsnr keys, SD2's test).
            graph = workflow_api(ckpt_name, lora_name, sample_prompts[0], resolution, config.generator_timesteps)
            write_text_atomic(output / "workflow_api.json", json.dumps(graph, indent=2))
            ui = workflow_ui(ckpt_name, lora_name, sample_prompts[0], resolution, config.generator_timesteps)
            write_text_atomic(output / "workflow.json", json.dumps(ui, indent=2))
            log.info("wrote %s: copy it into ComfyUI's models/loras and open %s", output / lora_name, output / "workflow.json")
    dist.barrier()
    return training.trainer, training.backend, output


def checkpoint_context_dim(path: str | Path) -> int | None:
    """The text width the checkpoint's cross-attention takes, from its header (no weight read)."""
    from .checkpoint import header_tensors

    for key, value in header_tensors(path).items():
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight"):
            return int(value.shape[1])
    return None


def estimate(run: RunConfig, config, arch: str, resolution: int, budget_gib: float | None, with_images: bool, world_size: int = 1,
             base_dtype: str = "auto") -> None:
    """``--estimate``: the memory and work of one iteration, printed; nothing written or loaded."""
    from . import memory
    from .checkpoint import header_tensors

    gpu = not (run.device or "cuda").startswith("cpu")
    run = memory.target_settings(run, gpu)
    precision, checkpointing = run.mixed_precision, run.gradient_checkpointing == "on"
    where = "the GPU" if gpu else "the CPU"
    fake = "a full copy" if run.fake_score == "full" else f"LoRA rank {run.fake_score_rank or run.lora_rank}"
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[precision] if gpu else torch.float32
    if budget_gib is None and gpu and torch.cuda.is_available():
        budget_gib = torch.cuda.get_device_properties(torch.device(run.device or "cuda")).total_memory / memory.GiB
    dtype, note = memory.base_weight_dtype(base_dtype, compute, "cpu", memory.header_dtype(header_tensors(run.checkpoint)), arch,
                                           budget_gib if gpu else None)
    if note:
        print(note)
    base_dtype = next((name for name, value in memory.BASE_DTYPES.items() if value == dtype), base_dtype)  # as chosen
    stored = str(dtype).removeprefix("torch.") + (f" computed in {precision}" if dtype != compute else "")
    if world_size > 1:
        where += f" (each of {world_size} processes)"
        if run.fake_score == "full":
            fake += f" {'sharded over them' if run.shard_fake_score else 'whole on each'}"
    print(f"estimating one iteration on {where}: {bases.get_family(arch).label} at {resolution} px, "
          f"batch {config.batch_size} x {config.grad_accum} accumulated, LoRA rank {run.lora_rank}, fake score {fake}, {precision}, "
          f"base weights {stored}, gradient checkpointing {'on' if checkpointing else 'off'}, "
          f"GAN {'on' if with_images else 'off (no --images)'}, "
          f"moving average {'off' if config.ema_decay == 0 else ('in CPU memory' if config.ema_on_cpu else 'on ' + where)}; "
          f"no weight is read (the run's own code on fake tensors)...", flush=True)
    profile = memory.estimate_run(run.checkpoint, run, config, resolution, gpu=gpu, with_images=with_images, world_size=world_size,
                                  base_dtype=base_dtype)
    for line in memory.report(profile):
        print(line)
    for line in memory.work_report(profile, config, world_size):
        print(line)
    if budget_gib is not None:
        if not gpu:
            print("(--memory-budget is about GPU memory; this estimate is for the CPU)")
        for line in memory.budget_advice(profile, budget_gib, run.lora_rank, resolution,
                                         ema_on_device=gpu and not config.ema_on_cpu, checkpointing=checkpointing,
                                         full_fake_score=run.fake_score == "full"):
            print(line)


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
    except (ConfigError, DataError, CheckpointError, UnsupportedModel, LoRAError, ComfyUINotFound, OutOfSync) as exc:
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
        print(f"dmd2-train: stopped at step {stop.step}; run the same command to resume", file=sys.stderr)
        return 128 + stop.reason
    except KeyboardInterrupt:
        print("dmd2-train: stopped; run the same command to resume from the last saved checkpoint", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
