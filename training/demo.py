"""DMD2 end to end on real data, in minutes on a CPU: ``python -m comfyui_dmd2.training.demo``.

1. trains (or reuses a cached) class-conditioned teacher on scikit-learn's 8x8 digits;
2. distils a 1-step and a 4-step student with the pack's DMD2 trainer (``DMD2Trainer``);
3. samples the students in real ComfyUI graphs run by ComfyUI's own server and executor
   (``comfy_runner``: digits model loader -> class conditioning -> EmptyLatentImage ->
   the pack's ``DMD2Generate`` -> SaveLatent), and the teacher with DDIM at 50, 4 and 1 steps;
4. writes ``grid.png`` (one row per sampler, digits 0-9 across) and ``metrics.md`` /
   ``metrics.json``: Fréchet distance in a held-out classifier's feature space, per seed,
   with the real-vs-real floor (``digits.real_floor``) and the issue's targets judged.

The two students train side by side in two processes when there are two cores.

``--quick`` is the shortened run the test suite uses.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class StudentSettings:
    """What differs between the 1-step and the 4-step student."""

    iterations: int
    lr_generator: float
    ema_decay: float  # per generator update; the demo samples the averaged generator
    fake_updates_per_generator_update: int = 3


@dataclass
class DemoSettings:
    """Tuned on the 2-core CPU within the 10-minute budget (figures: docs/digits.md)."""

    teacher_steps: int = 1500
    teacher_batch: int = 128  # batch 256 gives a better teacher but costs ~100 s more
    # EMA matters most: the raw generators oscillate (FD 4-8) around a much better average.
    one_step: StudentSettings = field(default_factory=lambda: StudentSettings(iterations=1600, lr_generator=8e-4, ema_decay=0.99))
    four_step: StudentSettings = field(default_factory=lambda: StudentSettings(iterations=1600, lr_generator=1e-4, ema_decay=0.995))
    student_batch: int = 64
    samples: int = 1500  # per row and seed (balanced classes); the issue asks for at least 1000
    seeds: int = 3  # each seed: its own start noise and sample draw
    lr_fake_score: float = 2e-3
    gan: bool = True
    gan_generator_weight: float = 5e-3
    gan_discriminator_weight: float = 1e-2


FULL = DemoSettings()
QUICK = DemoSettings(
    teacher_steps=800,
    teacher_batch=64,
    one_step=StudentSettings(iterations=400, lr_generator=8e-4, ema_decay=0.97),
    four_step=StudentSettings(iterations=0, lr_generator=1e-4, ema_decay=0.99),
    samples=1000,
    seeds=1,
)

ONE_STEP, FOUR_STEP = (399,), (999, 749, 499, 249)


def _bar(total: int, desc: str, position: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", leave=False, position=position)


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


def distill(teacher, data, timesteps: tuple[int, ...], student: StudentSettings, settings: DemoSettings, seed: int = 0, position: int = 0):
    """Distil ``teacher`` into a generator for ``timesteps`` with the pack's trainer; returns
    the generator's exponential moving average (the raw generator oscillates around it)."""
    from . import digits
    from .config import DMD2Config
    from .trainer import DMD2Trainer

    config = DMD2Config.for_arch(
        "sd15",
        generator_timesteps=timesteps,
        real_guidance_scale=1.0,  # match the data distribution, no guidance sharpening
        fake_updates_per_generator_update=student.fake_updates_per_generator_update,
        lr_generator=student.lr_generator,
        lr_fake_score=settings.lr_fake_score,
        gan_generator_weight=settings.gan_generator_weight,
        gan_discriminator_weight=settings.gan_discriminator_weight,
        warmup_steps=50,
        max_grad_norm=10.0,
        steps=student.iterations,
        seed=seed,
    )
    torch.manual_seed(seed)
    backend = digits.DigitsBackend(teacher, data, batch_size=settings.student_batch, gan=settings.gan, seed=seed)
    bar = _bar(student.iterations, f"DMD2 {len(timesteps)}-step", position)
    ema = copy.deepcopy(backend.generator).requires_grad_(False)

    def progress(metrics):
        bar.update(1)
        if metrics["generator_updated"]:
            bar.set_postfix(dm=f"{metrics['loss_dm']:.3g}", fake=f"{metrics['loss_fake']:.3g}")
            with torch.no_grad():
                for e, p in zip(ema.parameters(), backend.generator.parameters()):
                    e.lerp_(p, 1 - student.ema_decay)

    trainer = DMD2Trainer(config, backend, callbacks=[progress])
    trainer.run(progress=False)
    bar.close()
    return ema.eval()


def _distill_job(job: tuple) -> dict[str, torch.Tensor]:
    """One student in a worker process (spawned: it imports ComfyUI itself)."""
    teacher_state, timesteps, student, settings, threads, position = job
    torch.set_num_threads(threads)
    from ..comfy_env import ensure_comfy

    ensure_comfy()
    from . import digits

    model = distill(digits.load_denoiser(teacher_state), digits.load_digits_data(), timesteps, student, settings, position=position)
    return digits.denoiser_state_dict(model)


def _distill_students(teacher, data, settings: DemoSettings) -> dict[str, tuple]:
    """The 1-step and 4-step students. They are independent, so with two or more cores each
    trains in its own process on its share of them (one process at two threads is only
    about 1.2x faster than at one thread on these small tensors; two processes are 2x)."""
    from . import digits

    jobs = [(name, ts, st) for name, ts, st in (("1-step", ONE_STEP, settings.one_step), ("4-step", FOUR_STEP, settings.four_step)) if st.iterations > 0]
    cores = torch.get_num_threads()
    if len(jobs) < 2 or cores < 2:
        return {name: (distill(teacher, data, ts, st, settings), ts) for name, ts, st in jobs}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    state = digits.denoiser_state_dict(teacher)
    share = max(1, cores // len(jobs))
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_distill_job, (state, ts, st, settings, share, i)) for i, (name, ts, st) in enumerate(jobs)}
        return {name: (digits.load_denoiser(futures[name].result()), ts) for name, ts, _ in jobs}


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

    timings = {"teacher_s": round(teacher_seconds, 1)}
    t0 = time.time()
    students = _distill_students(teacher, data, settings)
    timings["students_s"] = round(time.time() - t0, 1)

    # Every row: `samples` images per seed (balanced classes) against the whole reference pool;
    # seeds change the start noise. The floor comes from disjoint real subsets (real_floor).
    pool = digits.reference_pool(data)
    reference = space.features(pool)
    n = settings.samples
    labels = digits.balanced_labels(n)
    floors = [digits.real_floor(reference, n, seed) for seed in range(settings.seeds)]
    half = floors[0]["half_size"]
    rows = {
        "real data (floor, measured)": {
            "sampler": f"{half} vs {half} disjoint real images",
            "fd": digits.summarize([f["halves"] for f in floors]),
            "accuracy": digits.classifier_accuracy(space, pool, torch.cat([data.train_y, data.unseen_y])),
        },
        "real data (floor, matched)": {
            "sampler": f"the same at {n} vs {len(pool)} images, via FD = c (1/n1 + 1/n2) fitted on real pairs",
            "fd": digits.summarize([f["matched"] for f in floors]),
        },
    }
    grid_rows = [("real", torch.stack([data.train_x[data.train_y == c][0] for c in range(10)]))]
    t0 = time.time()
    bar = _bar(3 * settings.seeds + len(students) * settings.seeds, "sampling")
    for steps in (50, 4, 1):
        fds, first = [], None
        for seed in range(settings.seeds):
            x = digits.sample_ddim(teacher, labels, steps, seed=seed)
            fds.append(digits.frechet_distance(space.features(x), reference))
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
                fds.append(digits.frechet_distance(space.features(x), reference))
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
        f"{len(data.heldout_y)} held-out digits (used for nothing else). Every model row compares {n} samples per seed "
        f"(balanced classes) to all {len(pool)} other real digits; mean and std over {settings.seeds} seeds. Two disjoint real "
        f"sets cannot both be that large, so the real-vs-real floor is measured on {half} vs {half} images and also given at "
        f"the model rows' sample sizes (FD between samples of one distribution is estimator bias, c (1/n1 + 1/n2))",
        "targets": targets(rows),
        "rows": rows,
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
    }
    _grid(grid_rows, out / "grid.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "metrics.md").write_text(_markdown(metrics))
    return metrics


def targets(rows: dict) -> list[dict]:
    """The issue's targets (and the stretch goal), judged on the seed means of one run. Each
    carries its ratio: a student's FD over the teacher row's (at most 1 to pass), or for the
    8x target the teacher's 1-step FD over the student's (at least 8)."""
    fd = {name: row["fd"]["mean"] for name, row in rows.items()}
    t1, t4, t50 = fd["teacher 1-step"], fd["teacher 4-step"], fd["teacher 50-step"]
    out = []

    def judge(target: str, result: str, ratio: float, at_least: float | None = None) -> None:
        met = ratio >= at_least if at_least is not None else ratio <= 1.0
        out.append({"target": target, "result": result, "ratio": ratio, "met": met})

    for kind in ("1-step", "4-step"):
        if f"DMD2 {kind}" not in fd:
            continue
        s = fd[f"DMD2 {kind}"]
        judge(f"{kind} student <= teacher 4-step", f"{s:.2f} vs {t4:.2f}", s / t4)
        if kind == "1-step":
            judge("1-step student >= 8x closer than teacher 1-step", f"{t1 / s:.1f}x", t1 / s, at_least=8.0)
        judge(f"(stretch) {kind} student <= teacher 50-step", f"{s:.2f} vs {t50:.2f}", s / t50)
    return out


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
    if metrics.get("targets"):
        lines += ["", "| target | result | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['result']} | {'yes' if t['met'] else 'no'} |" for t in metrics["targets"]]
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
