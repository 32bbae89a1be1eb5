"""DMD2 end to end on real data, in minutes on a CPU: ``python -m comfyui_dmd2.training.demo``.

1. trains (or reuses a cached) class-conditioned teacher on scikit-learn's 8x8 digits;
2. distils a 1-step and a 4-step student with the pack's DMD2 trainer (``DMD2Trainer``);
3. samples the students in real ComfyUI graphs run by ComfyUI's own server and executor
   (``comfy_runner``: digits model loader -> class conditioning -> EmptyLatentImage ->
   the pack's ``DMD2Generate`` -> SaveLatent), and the teacher with DDIM at 50, 4 and 1 steps;
4. writes ``grid.png`` (one row per sampler, digits 0-9 across) and ``metrics.md`` /
   ``metrics.json``: Fréchet distance in a held-out classifier's feature space, per seed,
   with a real-vs-real floor at the same sample sizes (see ``digits.reference_split``).

``--quick`` is the shortened run the test suite uses.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class DemoSettings:
    teacher_steps: int = 1500
    teacher_batch: int = 64
    one_step_iterations: int = 2000
    four_step_iterations: int = 600  # 1500 iterations made the 4-step student worse (FD 8.0 vs 5.5)
    student_batch: int = 64
    seeds: int = 3  # each seed: its own real split, start noise and sample draw
    lr_generator: float = 8e-4  # 1-step generator: the knob that mattered most (tried 1e-4 .. 8e-4)
    lr_generator_multi_step: float = 2e-4  # the 4-step generator diverges in quality at 8e-4 (FD 10.5 vs 5.5)
    lr_fake_score: float = 2e-3
    fake_updates_per_generator_update: int = 5
    gan: bool = True
    gan_generator_weight: float = 5e-3
    gan_discriminator_weight: float = 1e-2
    ema_decay: float = 0.97  # per generator update; the demo samples the averaged generator
    ema_decay_multi_step: float = 0.9  # 0.97 made the 4-step student worse (FD 5.5 -> 8.0 with 1500 iterations)


FULL = DemoSettings()
QUICK = DemoSettings(teacher_steps=800, one_step_iterations=400, four_step_iterations=0, seeds=1)

ONE_STEP, FOUR_STEP = (399,), (999, 749, 499, 249)


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", leave=False)


def _teacher(data, settings: DemoSettings, cache_dir: Path | None):
    from safetensors.torch import load_file, save_file

    from . import digits

    key = f"digits_teacher_s{settings.teacher_steps}_b{settings.teacher_batch}.safetensors"
    path = cache_dir / key if cache_dir is not None else None
    if path is not None and path.is_file():
        print(f"reusing the cached teacher {path}")
        return digits.load_denoiser(load_file(str(path)))
    bar = _bar(settings.teacher_steps, "teacher")

    def progress(step, loss):
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    teacher = digits.train_teacher(data, steps=settings.teacher_steps, batch_size=settings.teacher_batch, progress=progress)
    bar.close()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(digits.denoiser_state_dict(teacher), str(tmp))
        os.replace(tmp, path)
    return teacher


def distill(teacher, data, timesteps: tuple[int, ...], iterations: int, settings: DemoSettings, seed: int = 0):
    """Distil ``teacher`` into a generator for ``timesteps`` with the pack's trainer."""
    from . import digits
    from .config import DMD2Config
    from .trainer import DMD2Trainer

    config = DMD2Config.for_arch(
        "sd15",
        generator_timesteps=timesteps,
        real_guidance_scale=1.0,  # match the data distribution, no guidance sharpening
        fake_updates_per_generator_update=settings.fake_updates_per_generator_update,
        lr_generator=settings.lr_generator if len(timesteps) == 1 else settings.lr_generator_multi_step,
        lr_fake_score=settings.lr_fake_score,
        gan_generator_weight=settings.gan_generator_weight,
        gan_discriminator_weight=settings.gan_discriminator_weight,
        warmup_steps=50,
        max_grad_norm=10.0,
        steps=iterations,
        seed=seed,
    )
    torch.manual_seed(seed)
    backend = digits.DigitsBackend(teacher, data, batch_size=settings.student_batch, gan=settings.gan, seed=seed)
    bar = _bar(iterations, f"DMD2 {len(timesteps)}-step")
    ema = copy.deepcopy(backend.generator).requires_grad_(False)
    ema_decay = settings.ema_decay if len(timesteps) == 1 else settings.ema_decay_multi_step

    def progress(metrics):
        bar.update(1)
        if metrics["generator_updated"]:
            bar.set_postfix(dm=f"{metrics['loss_dm']:.3g}", fake=f"{metrics['loss_fake']:.3g}")
            with torch.no_grad():
                for e, p in zip(ema.parameters(), backend.generator.parameters()):
                    e.lerp_(p, 1 - ema_decay)

    trainer = DMD2Trainer(config, backend, callbacks=[progress])
    trainer.run(progress=False)
    bar.close()
    return ema.eval()


def sample_with_nodes(student, labels: torch.Tensor, timesteps: tuple[int, ...], seed: int) -> torch.Tensor:
    """Sample a student through the pack's DMD2Generate node (a ComfyUI MODEL, CONDITIONING
    and LATENT, exactly what a graph passes it)."""
    from ..nodes.sampler import DMD2Generate
    from ..nodes.schedules import PRESETS
    from . import digits

    preset = next(name for name, ts in PRESETS.items() if ts == timesteps)
    model = digits.comfy_model(student)
    positive = digits.comfy_conditioning(labels)
    latent = {"samples": torch.zeros(len(labels), 1, digits.SIDE, digits.SIDE)}
    out = DMD2Generate.execute(model=model, positive=positive, latent_image=latent, seed=seed, preset=preset, custom_timesteps="")
    return out.result[0]["samples"].float()


def _grid(rows: list[tuple[str, torch.Tensor]], path: Path, scale: int = 6) -> None:
    """One row per sampler (label on the left), ten digits across; images in [-1, 1]."""
    from PIL import Image, ImageDraw

    label_w, cell = 110, 8 * scale + 4
    image = Image.new("L", (label_w + 10 * cell, len(rows) * cell), 255)
    draw = ImageDraw.Draw(image)
    for r, (name, images) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 5), name, fill=0)
        for c in range(10):
            pixels = ((images[c, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            tile = Image.fromarray(255 - pixels, "L").resize((8 * scale, 8 * scale), Image.NEAREST)
            image.paste(tile, (label_w + c * cell + 2, r * cell + 2))
    image.save(path)


def run_demo(out: Path, settings: DemoSettings, cache_dir: Path | None = None) -> dict:
    """The whole demo; returns the metrics it writes."""
    from ..comfy_env import ensure_comfy

    ensure_comfy()
    from . import digits

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    data = digits.load_digits_data()
    space = digits.train_feature_space(data.heldout_x, data.heldout_y)
    teacher = _teacher(data, settings, cache_dir)
    teacher_seconds = time.time() - start

    students = {}
    timings = {"teacher_s": round(teacher_seconds, 1)}
    for name, timesteps, iterations in (("1-step", ONE_STEP, settings.one_step_iterations), ("4-step", FOUR_STEP, settings.four_step_iterations)):
        if iterations > 0:
            t0 = time.time()
            students[name] = (distill(teacher, data, timesteps, iterations, settings), timesteps)
            timings[f"student_{name}_s"] = round(time.time() - t0, 1)

    # Per seed s: real split s (reference half R_s, probe half P_s), |P_s| samples from every
    # sampler with seed s, each row's FD against R_s; the floor is FD(P_s, R_s) at the same sizes.
    splits = [digits.reference_split(data, seed) for seed in range(settings.seeds)]
    references = [space.features(ref) for ref, _ in splits]
    n = len(splits[0][1])
    labels = digits.balanced_labels(n)
    rows = {
        "real data (floor)": {
            "sampler": f"{n} real images (probe half)",
            "fd": digits.summarize([digits.frechet_distance(space.features(probe), ref) for (_, probe), ref in zip(splits, references)]),
            "accuracy": digits.classifier_accuracy(space, data.unseen_x, data.unseen_y),
        }
    }
    grid_rows = [("real", torch.stack([data.train_x[data.train_y == c][0] for c in range(10)]))]
    t0 = time.time()
    bar = _bar(3 * settings.seeds + len(students) * settings.seeds, "sampling")
    for steps in (50, 4, 1):
        fds, first = [], None
        for seed in range(settings.seeds):
            x = digits.sample_ddim(teacher, labels, steps, seed=seed)
            fds.append(digits.frechet_distance(space.features(x), references[seed]))
            first = x if first is None else first
            bar.update(1)
        rows[f"teacher {steps}-step"] = {"sampler": f"DDIM {steps} step(s)", "fd": digits.summarize(fds), "accuracy": digits.classifier_accuracy(space, first, labels)}
        grid_rows.append((f"teacher {steps}", first[:10]))
    from safetensors.torch import save_file

    from ..nodes.schedules import PRESETS
    from .comfy_runner import DigitsComfyRunner

    files = {}
    for name, (student, _) in students.items():
        files[name] = out / f"digits_dmd2_{name}.safetensors"
        save_file(digits.denoiser_state_dict(student), str(files[name]))
    runner = DigitsComfyRunner().__enter__() if students else None
    if runner is not None:
        print(f"\nComfyUI server on {runner.url} (its own executor runs the graphs)", flush=True)
    try:
        for name, (student, timesteps) in students.items():
            preset = next(p for p, ts in PRESETS.items() if ts == timesteps)
            fds, first = [], None
            for seed in range(settings.seeds):
                # graph: DMD2DigitsModelLoader -> DMD2DigitsClassConditioning -> EmptyLatentImage -> DMD2Generate -> SaveLatent
                x = runner.generate(files[name], n, preset, seed)
                fds.append(digits.frechet_distance(space.features(x), references[seed]))
                first = x if first is None else first
                bar.update(1)
            rows[f"DMD2 {name}"] = {"sampler": f"ComfyUI graph, DMD2Generate {list(timesteps)}", "fd": digits.summarize(fds), "accuracy": digits.classifier_accuracy(space, first, labels)}
            grid_rows.append((f"DMD2 {name}", first[:10]))
    finally:
        if runner is not None:
            runner.close()
    bar.close()
    timings["evaluation_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - start, 1)

    metrics = {
        "settings": asdict(settings),
        "metric": f"Frechet distance in the {space.classify.in_features}-d penultimate features of an MLP trained on "
        f"{len(data.heldout_y)} held-out digits (used for nothing else). The other {2 * n + (len(data.train_y) + len(data.unseen_y)) % 2} "
        f"real digits are cut at random (per seed) into a reference half ({len(references[0])}) and a probe half ({n}); every row "
        f"compares {n} images (balanced classes; per seed) to the reference half, the floor compares the probe half, so all rows "
        f"share sample sizes and estimator bias. Mean and std over {settings.seeds} seeds ({settings.seeds} splits)",
        "classifier_accuracy_on_train_split": digits.classifier_accuracy(space, data.train_x, data.train_y),
        "rows": rows,
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
    }
    _grid(grid_rows, out / "grid.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "metrics.md").write_text(_markdown(metrics))
    return metrics


def _markdown(metrics: dict) -> str:
    lines = [
        "# DMD2 on 8x8 digits",
        "",
        metrics["metric"] + ".",
        "",
        "| model | sampler | FD mean | FD std (seeds) | class accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, row in metrics["rows"].items():
        acc = f"{row['accuracy']:.3f}" if "accuracy" in row else ""
        lines.append(f"| {name} | {row['sampler']} | {row['fd']['mean']:.3f} | {row['fd']['std']:.3f} | {acc} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in metrics["timings"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_dmd2.training.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("dmd2-digits-demo"), help="folder for grid.png and metrics")
    parser.add_argument("--quick", action="store_true", help="a shortened run (about a quarter of the time)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "comfyui-dmd2", help="where the trained teacher is kept")
    parser.add_argument("--no-cache", action="store_true", help="always train a fresh teacher")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        metrics = run_demo(args.out, QUICK if args.quick else FULL, None if args.no_cache else args.cache)
    except ImportError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(_markdown(metrics))
    print(f"images:  {(args.out / 'grid.png').resolve()}")
    print(f"metrics: {(args.out / 'metrics.md').resolve()} and metrics.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
