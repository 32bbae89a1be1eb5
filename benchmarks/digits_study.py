"""The digits study: the demo's students and their ablations, side by side in one run.

    python benchmarks/digits_study.py [--rows "NAME;NAME"] [--jobs 2] [--seeds 3] [--training-seeds 0] [--out DIR] [--cache DIR]

Every row trains students with the product's path (``students.distill``: the pack's
trainer over the shared-base backend, LoRA G/F on the frozen digits teacher, exported by the
same code as ``dmd2-train``) from one teacher, then measures it with the demo's metric
(``metric``: Fréchet distance in a held-out classifier's features, 1500 samples per seed
against all 1397 other real digits, mean ± std over sampling seeds). Students are sampled
in-process from the merged generator, which is what the exported LoRA gives in a ComfyUI
graph (``tests/test_digits_demo.py`` checks that equality). Each training is evaluated both as
its moving average (the default export) and as the raw generator, and reports what the
discriminator did over its last 200 iterations (loss, mean logits on real and generated
latents, accuracy).

The main rows (the demo's students, full copies, the regression warm start) train three
students each (training seeds 0, 1, 2): on the digits the training seed moves a
student's distance far more than the sampling seed does (the 4-step full-copy student: 2.8 to
4.0 over three seeds), so those rows give mean ± std over training seeds, each training
measured over ``--seeds`` sampling seeds. The other ablation rows train seed 0 only and are
compared with the seed-0 student of their main row.

Trainings are independent; ``--jobs`` runs that many at once, one thread each, and each
finished training is kept under ``OUT/runs/`` so that a re-run only trains what is missing.
The whole study takes about 80 minutes on 2 cores. The table it prints is the one in
docs/digits.md.

The "v-pred ZTSNR: " rows (#24) distil a v-prediction, zero-terminal-SNR teacher of the same
size and budget (``teacher.DIGITS_V``, trained or cached in ``--cache``) with the demo's
recipes, and measure the eps formula on it (the ablation); ``--graph`` also samples each of
their exported LoRA files in a real ComfyUI graph (and, for the "finetune: " rows, in the
finetune's metric).

The "flow: " rows (#25) distil the flow-matching teacher (``flow``: ComfyUI's Flux class at a tiny
size, trained by rectified flow, read as Flux.1 [dev]; trained or cached in ``--cache``) with
the demo's two recipes on Flux's LoRA target sets, and measure its Euler 50/4/1; ``--graph``
samples their exported LoRA files with DMD2Generate's flow presets in a real ComfyUI graph.

The "imperfect teacher: " rows (#23, section 3) distil the demo's teacher stopped at 600 of its
1500 steps (cached in ``--cache``), GAN on and off and the discriminator's candidates, on the
base digits' metric. The pool rows (#23, section 5) start the demo's 4-step student from a
regression pool; each row reports its warm start's teacher forwards, and every training keeps
its metric curves (quarter means) in its JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch


def rows() -> dict[str, tuple]:
    """{row name: (StudentSettings, training seeds)}."""
    from comfyui_dmd2.training.digits.demo import FOUR_STEP, FOUR_STEP_STUDENT, ONE_STEP, ONE_STEP_STUDENT
    from comfyui_dmd2.training.digits.students import StudentSettings
    from comfyui_dmd2.training.lora import TARGET_SETS

    # The rates tuned first (docs/digits.md, "What makes the LoRA path learn"); the ablations
    # are changes to these. The demo's students are rows too (checked against the demo).
    one = StudentSettings(timesteps=ONE_STEP, lr_generator=4e-3, lr_fake_score=4e-2, ema_decay=0.99)
    four = StudentSettings(timesteps=FOUR_STEP, lr_generator=5e-4, lr_fake_score=5e-3, ema_decay=0.995)
    both = ("generator", "fake_score")
    # The reference layout's learning rates: tuned for full copies (docs/digits.md).
    full_one = replace(one, full_copies=both, lr_generator=8e-4, lr_fake_score=2e-3)
    full_four = replace(four, full_copies=both, lr_generator=1e-4, lr_fake_score=2e-3)
    main, single = (0, 1, 2), (0,)
    ALL_LAYERS = TARGET_SETS["all"]  # dmd2-train --lora-targets all: the in/out convs and the embeddings too
    # a discriminator given an easier task: low noise only, its own rate, 10x the generator weight
    strong_gan = {"gan_max_timestep": 250}
    # the regression warm start the demo uses: 300 iterations onto the teacher's DDIM-10 samples
    warm_start = {"regression_steps": 300, "regression_teacher_steps": 10}
    # the demo's students: the warm start, the 4-step fake-score rate re-tuned; the 1-step one
    # with all layers adapted and a full fake score (after the warm start LoRA F held it back)
    previous_one = replace(one, **warm_start, lr_fake_score=2e-2)
    demo_one = replace(one, full_copies=("fake_score",), lr_fake_score=2e-3, lora_targets=ALL_LAYERS, **warm_start)
    demo_four = replace(four, lr_fake_score=2.5e-3, **warm_start)
    assert (demo_one, demo_four) == (ONE_STEP_STUDENT, FOUR_STEP_STUDENT), "the (demo) rows must be the demo's students"
    return {
        "1-step LoRA r8, first rates (the demo before last)": (one, main),
        "1-step LoRA G r8 (demo): all layers adapted, full fake score, regression warm start (300 it, teacher DDIM 10)": (demo_one, main),
        "1-step LoRA r8 (previous demo): fake-score rate 2e-2, regression warm start (300 it, teacher DDIM 10)": (previous_one, main),
        "1-step full copies": (full_one, main),
        "4-step LoRA r8, first rates (the previous demo)": (four, main),
        # the warm start's target is the teacher's DDIM 10: as good as DDIM 25 with 2/5 of the teacher's evaluations
        "4-step LoRA r8 (demo): fake-score rate 2.5e-3, regression warm start (300 it, teacher DDIM 10)": (demo_four, main),
        "4-step full copies": (full_four, main),
        "1-step LoRA r8, GAN off": (replace(one, gan=False), single),
        "1-step LoRA r8, GAN on low noise (t <= 250), generator weight 5e-2": (
            replace(one, gan_generator_weight=5e-2, overrides={**one.overrides, **strong_gan}), single),
        "1-step LoRA r4, same rates": (replace(one, lora_rank=4, lora_alpha=one.lora_alpha / 2), single),
        "1-step LoRA r32, same rates": (replace(one, lora_rank=32, lora_alpha=one.lora_alpha * 4), single),
        # the same per-weight step as rank 8: at a fixed alpha/rank a LoRA moves each weight
        # about in proportion to sqrt(rank) x the learning rate (docs/digits.md)
        "1-step LoRA r4, rates x sqrt(2)": (
            replace(one, lora_rank=4, lora_alpha=one.lora_alpha / 2, lr_generator=one.lr_generator * 2**0.5,
                    lr_fake_score=one.lr_fake_score * 2**0.5), single),
        "1-step LoRA r32, rates x 1/2": (
            replace(one, lora_rank=32, lora_alpha=one.lora_alpha * 4, lr_generator=one.lr_generator / 2,
                    lr_fake_score=one.lr_fake_score / 2), single),
        "1-step LoRA r8, regression warm start (300 it)": (replace(one, regression_steps=300), main),
        # the two best 1-step LoRA changes together: step-matched rank 32 and the warm start
        "1-step LoRA r32, rates x 1/2, regression warm start (300 it)": (
            replace(one, lora_rank=32, lora_alpha=one.lora_alpha * 4, lr_generator=one.lr_generator / 2,
                    lr_fake_score=one.lr_fake_score / 2, regression_steps=300), main),
        "4-step LoRA r8, GAN off": (replace(four, gan=False), single),
        # the 4-step fake-score rate trend had not levelled off at 5e-3 (see "What makes the LoRA path learn")
        "4-step LoRA r8, fake-score rate 2.5e-3": (replace(four, lr_fake_score=2.5e-3), main),
        "4-step LoRA r8, generator rate 1e-3, fake-score rate 2.5e-3": (
            replace(four, lr_generator=1e-3, lr_fake_score=2.5e-3), single),
        "4-step LoRA r8, fake-score rate 1.25e-3": (replace(four, lr_fake_score=1.25e-3), single),
        # the warm start and GAN off, each the best single change, on the best settings so far
        "1-step LoRA r8, regression warm start (300 it), GAN off": (replace(one, regression_steps=300, gan=False), single),
        "1-step LoRA r8, regression warm start (600 it)": (replace(one, regression_steps=600), single),
        "4-step LoRA r8, fake-score rate 2.5e-3, GAN off": (replace(four, lr_fake_score=2.5e-3, gan=False), single),
        "4-step LoRA r8, fake-score rate 2.5e-3, regression warm start (300 it)": (
            replace(four, lr_fake_score=2.5e-3, regression_steps=300), main),
        "4-step LoRA r8, fake-score rate 2.5e-3, moving average 0.998": (replace(four, lr_fake_score=2.5e-3, ema_decay=0.998), single),
        "1-step LoRA r8, moving average 0.995": (replace(one, ema_decay=0.995), single),
        "1-step LoRA r8, regression warm start (300 it, teacher DDIM 10)": (
            replace(one, **warm_start), main),
        # the same budget for the full-copy path: the same warm start before DMD2
        "4-step full copies, regression warm start (300 it, teacher DDIM 10)": (
            replace(full_four, **warm_start), main),
        "1-step full copies, regression warm start (300 it, teacher DDIM 10)": (
            replace(full_one, **warm_start), main),
        "4-step LoRA r8 (demo), GAN off": (replace(demo_four, gan=False), main),
        # which half of the 1-step gap after the warm start is the generator's, which the fake score's
        "1-step LoRA G r8 + full fake score, regression warm start (300 it, teacher DDIM 10)": (
            replace(one, full_copies=("fake_score",), lr_fake_score=2e-3, **warm_start), main),
        "1-step full generator + LoRA F r8, regression warm start (300 it, teacher DDIM 10)": (
            replace(one, full_copies=("generator",), lr_generator=8e-4, **warm_start), single),
        # can LoRA F keep up after the warm start at another rate?
        "1-step LoRA r8, regression warm start (300 it, teacher DDIM 10), fake-score rate 8e-2": (
            replace(one, **warm_start, lr_fake_score=8e-2), single),
        # after the warm start the generator starts close: does it still want the fast rates?
        "1-step LoRA r8, regression warm start (300 it), rates G 1e-3, F 1e-2": (
            replace(one, regression_steps=300, lr_generator=1e-3, lr_fake_score=1e-2), single),
        # every Linear/Conv2d of the UNet adapted: input and output convs, time and class embeddings too
        "1-step LoRA r8 (previous demo), all layers adapted": (replace(previous_one, lora_targets=ALL_LAYERS), single),
        # LoRA F with more capacity than the exported generator: its own rank (same scale alpha/rank)
        "1-step LoRA G r8 + LoRA F r32, all layers adapted, regression warm start, fake-score rate 1e-2": (
            replace(previous_one, lora_targets=ALL_LAYERS, fake_score_rank=32, lr_fake_score=1e-2), single),
        "1-step LoRA G r8 + LoRA F r32, all layers adapted, regression warm start, fake-score rate 2e-2": (
            replace(previous_one, lora_targets=ALL_LAYERS, fake_score_rank=32), single),
        "1-step LoRA G r8 + LoRA F r32, all layers adapted, regression warm start, fake-score rate 5e-3": (
            replace(previous_one, lora_targets=ALL_LAYERS, fake_score_rank=32, lr_fake_score=5e-3), main),
        # LoRA F at 2x the generator's rank: the SDXL 1-step default (4x does not fit 24 GB at 1024 px)
        "1-step LoRA G r8 + LoRA F r16, all layers adapted, regression warm start, fake-score rate 5e-3": (
            replace(previous_one, lora_targets=ALL_LAYERS, fake_score_rank=16, lr_fake_score=5e-3), main),
        "1-step LoRA G r8 + LoRA F r32, all layers adapted, regression warm start, fake-score rate 2.5e-3": (
            replace(previous_one, lora_targets=ALL_LAYERS, fake_score_rank=32, lr_fake_score=2.5e-3), single),
        "1-step LoRA r8 (previous demo), all layers adapted, fake-score rate 5e-3": (
            replace(previous_one, lora_targets=ALL_LAYERS, lr_fake_score=5e-3), single),
        "4-step LoRA r8 (demo), all layers adapted": (replace(demo_four, lora_targets=ALL_LAYERS), single),
        "4-step LoRA G r8, all layers adapted + full fake score (demo rates, F 2e-3)": (
            replace(demo_four, lora_targets=ALL_LAYERS, full_copies=("fake_score",), lr_fake_score=2e-3), single),
        # the GAN and the warm start on the demo's 1-step layout
        "1-step LoRA G r8 (demo), GAN off": (replace(demo_one, gan=False), main),
        "1-step LoRA G r8 (demo), no regression warm start": (replace(demo_one, regression_steps=0), single),
        "1-step LoRA r8, regression warm start (300 it), the 4-step rates (G 5e-4, F 2.5e-3)": (
            replace(one, regression_steps=300, lr_generator=5e-4, lr_fake_score=2.5e-3, ema_decay=0.995), single),
        **pool_rows(demo_four, main),
        # the full fake score's rate against the LoRA generator's (#23 section 5): SD1.5's defaults
        # run F at 1e-5 and G at 5e-5 (F/G 0.2); the demo's 1-step student runs F/G 0.5
        "1-step LoRA G r8 (demo), full fake score at 8e-4 (F/G 0.2, SD1.5's default ratio)": (
            replace(demo_one, lr_fake_score=8e-4), main),
        "1-step LoRA G r8 (demo), full fake score at 4e-3 (F/G 1)": (replace(demo_one, lr_fake_score=4e-3), single),
    }


def pool_rows(demo_four, seeds) -> dict[str, tuple]:
    """The warm start's pool (#23, section 5) on the demo's 4-step student, whose 300 warm-start
    iterations x batch 64 draw 19,200 fresh pairs onto the teacher's DDIM 10: pools of 1,000 and
    4,000 pairs (each reused 19x / 4.8x), after DMD2 and right after the warm start (0 DMD2
    iterations: the raw column is the warm-started generator; the moving-average column averages
    the warm start's updates). The table's last column is the teacher UNet forwards each spent
    on the warm start."""
    warm_only = replace(demo_four, iterations=0)
    rows = {"4-step LoRA r8 (demo), warm start only (fresh pairs, 0 DMD2 iterations)": (warm_only, seeds)}
    for pairs, reuse in ((1000, "19x"), (4000, "4.8x")):
        rows[f"4-step LoRA r8 (demo), warm start on a pool of {pairs:,} pairs (each {reuse})"] = (
            replace(demo_four, regression_pairs=pairs), seeds)
        rows[f"4-step LoRA r8 (demo), warm start only, pool of {pairs:,} pairs (0 DMD2 iterations)"] = (
            replace(warm_only, regression_pairs=pairs), seeds)
    return rows


IMPERFECT = "imperfect teacher: "  # the GAN's real-data effect (#23 section 3): a teacher trained for 600 of 1500 steps
IMPERFECT_TEACHER_STEPS = 600


def imperfect_rows() -> dict[str, tuple]:
    """The demo's 1-step student distilled from a deliberately imperfect teacher (the demo's,
    stopped at 600 of its 1500 steps: DDIM 50 about 3x the floor), GAN on and off: the paper's
    claim is that the real images let the student beat such a teacher. The metric is the base
    digits' (the teacher's own domain)."""
    from comfyui_dmd2.training.digits.demo import FOUR_STEP_STUDENT, ONE_STEP_STUDENT

    main, single = (0, 1, 2), (0,)
    strong = {"gan_max_timestep": 250}
    return {
        IMPERFECT + "1-step LoRA G r8 (the demo's 1-step recipe), GAN on": (ONE_STEP_STUDENT, main),
        IMPERFECT + "1-step LoRA G r8 (the demo's 1-step recipe), GAN off": (replace(ONE_STEP_STUDENT, gan=False), main),
        # the candidates, if the GAN does not help at the demo's weights
        IMPERFECT + "1-step, GAN generator weight 5e-2 (10x)": (replace(ONE_STEP_STUDENT, gan_generator_weight=5e-2), single),
        IMPERFECT + "1-step, GAN generator weight 5e-2, discriminator on t <= 250": (
            replace(ONE_STEP_STUDENT, gan_generator_weight=5e-2, overrides={**ONE_STEP_STUDENT.overrides, **strong}), single),
        IMPERFECT + "1-step, GAN head rate 1e-2 (5x)": (replace(ONE_STEP_STUDENT, lr_gan_head=1e-2), single),
        # the discriminator learned only on low noise: that range alone, and with a faster head
        IMPERFECT + "1-step, discriminator on t <= 250": (
            replace(ONE_STEP_STUDENT, overrides={**ONE_STEP_STUDENT.overrides, **strong}), single),
        IMPERFECT + "1-step, GAN generator weight 5e-2, discriminator on t <= 250, GAN head rate 1e-2": (
            replace(ONE_STEP_STUDENT, gan_generator_weight=5e-2, lr_gan_head=1e-2,
                    overrides={**ONE_STEP_STUDENT.overrides, **strong}), single),
        IMPERFECT + "4-step LoRA r8 (the demo's 4-step recipe), GAN on": (FOUR_STEP_STUDENT, single),
        IMPERFECT + "4-step LoRA r8 (the demo's 4-step recipe), GAN off": (replace(FOUR_STEP_STUDENT, gan=False), single),
    }


FINETUNE = "finetune: "  # the finetune scenario's rows (#23): on the finetuned teacher, scored on its digits


def finetune_rows() -> dict[str, tuple]:
    """The finetune scenario's student rows: {row name: (StudentSettings, training seeds)}. A
    row whose settings have ``init_lora="release"`` starts from the release LoRA (the demo's,
    trained or cached by ``demo.release_for``)."""
    from comfyui_dmd2.training.digits.demo import FOUR_STEP_STUDENT, FROM_RELEASE, ONE_STEP_STUDENT
    from comfyui_dmd2.training.lora import DEFAULT_TARGETS, TARGET_SETS

    main = (0, 1, 2)
    # the 1-step student from the release LoRA adapts the release LoRA's layers (the file's targets)
    one_from_release = replace(ONE_STEP_STUDENT, iterations=ONE_STEP_STUDENT.iterations // 4, regression_steps=0,
                               lora_targets=DEFAULT_TARGETS, init_lora="release")
    return {
        FINETUNE + "4-step LoRA r8 from scratch (demo's recipe and budget)": (FOUR_STEP_STUDENT, main),
        FINETUNE + "1-step LoRA G r8 from scratch (demo's 1-step recipe and budget)": (ONE_STEP_STUDENT, main),
        FINETUNE + "4-step LoRA r8 from the release LoRA, 1/4 budget (demo)": (replace(FROM_RELEASE, init_lora="release"), main),
        FINETUNE + "1-step LoRA G r8 from the release LoRA, 1/4 budget, release LoRA's targets": (one_from_release, main),
        # the 1/4 budget (475 of 1900 iterations) with a short warm start onto the finetune's DDIM 10
        # first: from the release LoRA, and from zero as its control
        FINETUNE + "4-step LoRA r8 from the release LoRA, 1/4 budget: 75 warm-start + 400 DMD2 iterations": (
            replace(FROM_RELEASE, init_lora="release", regression_steps=75, iterations=400), main),
        FINETUNE + "4-step LoRA r8 from scratch, 1/4 budget: 75 warm-start + 400 DMD2 iterations (control)": (
            replace(FOUR_STEP_STUDENT, regression_steps=75, iterations=400), main),
        # a short run's moving average: at 0.995 over its ~133 generator updates half of the
        # average is still the warm-started generator; 0.98 forgets it 4x faster
        FINETUNE + "4-step LoRA r8 from the release LoRA, 1/4 budget: 75 warm-start + 400 DMD2 iterations, moving average 0.98": (
            replace(FROM_RELEASE, init_lora="release", regression_steps=75, iterations=400, ema_decay=0.98), main),
        FINETUNE + "4-step LoRA r8 from scratch, 1/4 budget: 75 warm-start + 400 DMD2 iterations, moving average 0.98 (control)": (
            replace(FOUR_STEP_STUDENT, regression_steps=75, iterations=400, ema_decay=0.98), main),
        # the 1-step student's layout on the 4-step student (every layer, a full fake score)
        FINETUNE + "4-step LoRA G r8, all layers adapted + full fake score (F 2e-3)": (
            replace(FOUR_STEP_STUDENT, lora_targets=TARGET_SETS["all"], full_copies=("fake_score",), lr_fake_score=2e-3), main),
    }


VPRED = "v-pred ZTSNR: "  # the v-prediction, zero-terminal-SNR teacher's rows (#24): the same metric as the base teacher's


def vpred_rows() -> dict[str, tuple]:
    """The v-prediction ZTSNR teacher's student rows: the demo's two recipes, unchanged but
    for the 1-step student's timestep: 999, where under zero terminal SNR the UNet sees pure
    noise, exactly what the 1-step sampler feeds it (``teacher.DIGITS_V``)."""
    from comfyui_dmd2.training.digits.demo import FOUR_STEP_STUDENT, ONE_STEP_STUDENT
    from comfyui_dmd2.training.digits.teacher import DIGITS_V

    main, single = (0, 1, 2), (0,)
    one = replace(ONE_STEP_STUDENT, timesteps=(DIGITS_V.one_step_timestep,))
    return {
        VPRED + "1-step LoRA G r8 at 999 (the demo's 1-step recipe)": (one, main),
        VPRED + "4-step LoRA r8 (the demo's 4-step recipe)": (FOUR_STEP_STUDENT, main),
        # the eps teacher's 1-step timestep, for comparison: unit noise fed as if it were x_399
        VPRED + "1-step LoRA G r8 at 399 (the demo's 1-step recipe, the eps teacher's timestep)": (ONE_STEP_STUDENT, single),
        # the ablation: the trainer reads the v teacher's output as eps (the pack before #24),
        # x0 = (x_t - s*out)/a on ComfyUI's ZTSNR table; sampled as the trainer read it
        VPRED + "ablation: 4-step LoRA r8, the teacher read as eps": (replace(FOUR_STEP_STUDENT, read_as="eps"), single),
    }


FLOW = "flow: "  # the Flux-class teacher's rows (#25): rectified flow, the same metric as the base teacher's


def flow_rows() -> dict[str, tuple]:
    """The flow teacher's students (``flow.student_recipes``): the demo's two recipes on ComfyUI's
    Flux class, three trainings each."""
    from comfyui_dmd2.training.digits.flow import student_recipes

    recipes, main = student_recipes(), (0, 1, 2)
    return {
        FLOW + "1-step LoRA G r8 (all layers) at 999, full fake score": (recipes["1-step"], main),
        FLOW + "4-step LoRA r8 (attention + MLP)": (recipes["4-step"], main),
    }


def _yardstick(teacher_file: str, samples: int, seeds: int, style: str = ""):
    """The demo's metric for one study: ``fd(sample)`` is the mean ± std over ``seeds`` of the
    Fréchet distance of ``sample(labels, seed)`` to the reference pool. Returns it, the data
    and the teacher. ``style``: the finetune scenario's (its digits, their own feature
    space)."""
    from safetensors.torch import load_file

    from comfyui_dmd2.training.digits import data as D
    from comfyui_dmd2.training.digits import flow
    from comfyui_dmd2.training.digits import metric as M
    from comfyui_dmd2.training.digits import teacher as T
    from comfyui_dmd2.training.digits.finetune import shifted_data

    data = D.load_digits_data()
    data = shifted_data(data, style) if style else data
    space = M.train_feature_space(data.heldout_x, data.heldout_y)
    reference = space.features(M.reference_pool(data))
    labels = D.balanced_labels(samples)

    def fd(sample) -> dict:
        return M.summarize([M.frechet_distance(space.features(sample(labels, seed)), reference) for seed in range(seeds)])

    state = load_file(teacher_file)
    return fd, data, (flow.load_denoiser if flow.is_flow_file(state) else T.load_denoiser)(state), reference


def _job(job: tuple) -> dict:
    """Train one row's student and measure it (in a spawned worker, one thread)."""
    name, settings, seed, teacher_file, samples, seeds, threads, style = job
    torch.set_num_threads(threads)
    from comfyui_dmd2.comfy_env import ensure_comfy

    ensure_comfy(cpu=True)
    from comfyui_dmd2.training.digits import students
    from comfyui_dmd2.training.digits import teacher as T
    from comfyui_dmd2.training.digits.demo import gan_summary

    fd, data, teacher, _ = _yardstick(teacher_file, samples, seeds, style)
    history: list[dict] = []
    start = time.time()
    student = students.distill(teacher, data, settings, seed=seed, callbacks=[history.append])
    seconds = time.time() - start

    def student_fd() -> dict:
        model = student.denoiser()
        return fd(lambda labels, s: T.sample_student(model, labels, settings.timesteps, s))

    raw = student_fd()
    with student.trainer.averaged_generator():
        averaged = student_fd()
    # the exported file (the moving average, as dmd2-train writes it), for sampling in a ComfyUI graph (--graph)
    exported = student.export(Path(teacher_file).parent / "loras" / f"{_slug(name)}_seed{seed}.safetensors")
    return {"name": name, "seed": seed, "settings": asdict(settings), "ema": averaged, "raw": raw, "gan": gan_summary(history),
            "train_s": round(seconds, 1), "file": str(exported), "curves": curves(history)}


CURVE_KEYS = ("loss_dm", "loss_fake", "grad_norm_generator", "grad_norm_fake", "loss_gan_discriminator", "loss_regression")


def curves(history: list[dict], parts: int = 4) -> dict:
    """Each training metric's mean over ``parts`` equal spans of the iterations that report it
    (the fake-score loss and the generator's gradient norm over training, for the rate rows)."""
    out = {}
    for key in CURVE_KEYS:
        values = [r[key] for r in history if key in r]
        if values:
            size = -(-len(values) // parts)
            out[key] = [sum(chunk) / len(chunk) for chunk in (values[i:i + size] for i in range(0, len(values), size))]
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def graph_rows(results: list[dict], teacher_file: str, samples: int, seeds: int, style: str = "") -> dict:
    """Each kept training's exported file sampled in a real ComfyUI graph (``DigitsComfyRunner``:
    the digits model file, which carries its v_pred/ztsnr keys -> stock LoraLoaderModelOnly ->
    DMD2Generate at the row's timesteps), FD over ``seeds``: {row name: {seed: FD}}."""
    from comfyui_dmd2.training.digits import data as D
    from comfyui_dmd2.training.digits.comfy_runner import DigitsComfyRunner
    from comfyui_dmd2.training.digits.demo import dmd2_schedule
    from comfyui_dmd2.training.digits.flow import flow_preset

    fd, _, _, _ = _yardstick(teacher_file, samples, seeds, style)
    out: dict[str, dict] = {}
    with DigitsComfyRunner() as comfy:
        for r in results:
            if not r.get("file") or r["settings"].get("read_as"):  # the ablation samples as its trainer read it: in-process only
                continue
            timesteps = tuple(r["settings"]["timesteps"])
            preset, custom = (flow_preset(timesteps), "") if r["name"].startswith(FLOW) else dmd2_schedule(timesteps)
            lora = comfy.install_lora(Path(r["file"]))
            expected = D.balanced_labels(samples)

            def sample(labels, s, lora=lora, preset=preset, custom=custom, expected=expected):
                assert torch.equal(labels, expected)  # the runner's conditioning cycles 0-9 like balanced_labels
                return comfy.generate(Path(teacher_file), len(labels), preset, s, lora=lora, custom_timesteps=custom)

            out.setdefault(r["name"], {})[r["seed"]] = fd(sample)
    return out


def teacher_rows(teacher_file: str, samples: int, seeds: int, sampler: str = "DDIM") -> dict:
    """The teacher's deterministic sampler at 50, 4 and 1 steps (``sampler``: its name; DDIM on
    the flow teacher is flow Euler) and the real-vs-real floor."""
    from comfyui_dmd2.training.digits import metric as M
    from comfyui_dmd2.training.digits import teacher as T

    fd, _, teacher, reference = _yardstick(teacher_file, samples, seeds)
    out = {f"teacher {sampler} {steps}": fd(lambda labels, s, steps=steps: T.sample_ddim(teacher, labels, steps, s)) for steps in (50, 4, 1)}
    floors = [M.real_floor(reference, samples, seed) for seed in range(seeds)]
    out["real vs real (matched floor)"] = M.summarize([f["matched"] for f in floors])
    return out


def eps_formula_x0(teacher, labels: torch.Tensor, variant: str):
    """The v teacher's x0 predictor as an eps-only code path computes it (the ablation):
    ``"v as eps"``: the UNet's v read as eps, x0 = (x_t - s*out)/a (what the pack did before
    #24 to any model); ``"reference"``: the reference's x0 = (x_t - s*eps)/a on the teacher's
    true eps (a*v + s*x_t, via the family) at ComfyUI's terminal a = 2.2e-4; ``"reference
    bf16"``: the same with the UNet output and the arithmetic in bf16 (the GPU trainer's
    autocast); ``"reference, exact zero"``: at diffusers' terminal a = 0 (rescale_betas_zero_snr).
    ``"family bf16"`` is the control: the family's x0 = a*x_t - s*v, in bf16 too."""
    from comfyui_dmd2 import bases

    family = teacher.family  # a v + zsnr family takes abar(999) = 0 exactly (bases.Family.process)
    if variant not in ("reference, exact zero", "family bf16"):
        # ComfyUI's own ZTSNR table (abar(999) = 4.9e-8), as the pack read it before #24 (the
        # zsnr flag off keeps Family.process from setting the last entry to 0)
        comfy_table = bases.DiscreteVP(bases.zero_terminal_snr(bases.scaled_linear_alphas_cumprod()))
        family = family.with_sampling(family.prediction, zsnr=False).with_process(comfy_table)
    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32

    def x0(x_t, t):
        out = teacher.output(x_t, t, labels).to(dtype)
        x_t = x_t.to(dtype)
        if variant == "family bf16":
            return family.to_x0(x_t, out, t).float()
        a, s = family.process.alpha_sigma(t, x_t)
        eps = out if variant == "v as eps" else family.eps_from_x0(x_t, family.to_x0(x_t, out, t), t)
        return ((x_t - s * eps) / a).float()

    return x0


def vpred_teacher_rows(teacher_file: str, samples: int, seeds: int) -> dict:
    """The v teacher's DDIM rows (x0 through its family), and the ablation: its DDIM 4 with
    x0 by the eps-only formula (``eps_formula_x0``), with the share of non-finite samples."""
    from comfyui_dmd2.training import sampling
    from comfyui_dmd2.training.digits import data as D
    from comfyui_dmd2.training.digits import metric as M
    from comfyui_dmd2.training.digits import teacher as T

    fd, _, teacher, reference = _yardstick(teacher_file, samples, seeds)
    out = {f"{VPRED}teacher DDIM {steps}": fd(lambda labels, s, steps=steps: T.sample_ddim(teacher, labels, steps, s)) for steps in (50, 4, 1)}
    for variant in ("v as eps", "reference", "reference bf16", "reference, exact zero", "family bf16"):
        finite = []

        def sample(labels, seed, variant=variant, finite=finite):
            noise = torch.randn((len(labels), 1, D.SIDE, D.SIDE), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                x = sampling.ddim_sample(eps_formula_x0(teacher, labels, variant), noise, teacher.family.trailing_timesteps(4), teacher.family)
            finite.append(float(torch.isfinite(x).flatten(1).all(1).float().mean()))
            # the distance of the finite samples (none finite: inf); the share of them is reported
            return x if finite[-1] == 1.0 else torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)

        row = fd(sample)
        row["finite_share"] = finite
        # where it breaks: the first step (999), against the family's x0 on the same input
        labels = D.balanced_labels(samples)
        x = torch.randn((samples, 1, D.SIDE, D.SIDE), generator=torch.Generator().manual_seed(0))
        t = torch.full((samples,), 999)
        with torch.no_grad():
            err = (eps_formula_x0(teacher, labels, variant)(x, t) - teacher.x0(x, t, labels)).abs()
        row["x0_error_at_999"] = float(err.mean())  # nan: not finite
        what = "x0 = a*x_t - s*v (the family's), bf16: the control" if variant == "family bf16" else f"x0 by the eps formula ({variant})"
        out[f"{VPRED}ablation: teacher DDIM 4, {what}"] = row
    floors = [M.real_floor(reference, samples, seed) for seed in range(seeds)]
    out[f"{VPRED}real vs real (matched floor)"] = M.summarize([f["matched"] for f in floors])
    return out


def finetune_teacher_rows(finetune_file: str, base_file: str, release_file: str, style: str, strengths, samples: int, seeds: int) -> dict:
    """The finetune scenario's sampling rows: the finetune's DDIM steps, the base teacher on
    its digits, the release LoRA on the finetune at each strength (put on by ComfyUI's
    stock loader, sampled by DMD2Generate, in-process), and the matched floor."""
    import comfy.sd
    import comfy.utils
    from safetensors.torch import load_file

    from comfyui_dmd2.nodes.sampler import DMD2Generate
    from comfyui_dmd2.nodes.schedules import PRESETS
    from comfyui_dmd2.training.digits import metric as M
    from comfyui_dmd2.training.digits.demo import FOUR_STEP
    from comfyui_dmd2.training.digits import teacher as T

    fd, _, finetune, reference = _yardstick(finetune_file, samples, seeds, style)
    base = T.load_denoiser(load_file(base_file))
    out = {f"{FINETUNE}finetune DDIM {steps}": fd(lambda labels, s, steps=steps: T.sample_ddim(finetune, labels, steps, s)) for steps in (50, 4, 1)}
    out[f"{FINETUNE}base teacher DDIM 50 (no finetune)"] = fd(lambda labels, s: T.sample_ddim(base, labels, 50, s))
    lora = comfy.utils.load_torch_file(release_file, safe_load=True)
    preset = next(name for name, ts in PRESETS.items() if ts == FOUR_STEP)
    for strength in strengths:
        model, _ = comfy.sd.load_lora_for_models(T.comfy_model(finetune), None, lora, strength, 0.0)

        def sample(labels, s, model=model):
            latent = {"samples": torch.zeros(len(labels), 1, 8, 8)}
            return DMD2Generate.execute(model=model, positive=T.comfy_conditioning(labels), latent_image=latent, seed=s,
                                        preset=preset, custom_timesteps="").result[0]["samples"].float()

        out[f"{FINETUNE}release LoRA at {strength:.1f} (4 steps)"] = fd(sample)
    floors = [M.real_floor(reference, samples, seed) for seed in range(seeds)]
    out[f"{FINETUNE}real vs real (matched floor)"] = M.summarize([f["matched"] for f in floors])
    return out


def combine(results: list[dict]) -> list[dict]:
    """One entry per row: each training's FD is its mean over sampling seeds; a row with
    several trainings gives mean ± std over them (and keeps the seed-0 figure)."""
    import numpy as np

    out = []
    for name in dict.fromkeys(r["name"] for r in results):
        runs = sorted((r for r in results if r["name"] == name), key=lambda r: r["seed"])
        entry = {"name": name, "trainings": len(runs), "runs": runs, "train_s": float(np.mean([r["train_s"] for r in runs]))}
        for kind in ("ema", "raw"):
            values = [r[kind]["mean"] for r in runs]
            entry[kind] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                           "seed0": runs[0][kind]["mean"], "sampling_std_seed0": runs[0][kind]["std"]}
        gans = [r["gan"] for r in runs if r["gan"]]
        entry["gan"] = {k: float(np.mean([g[k] for g in gans])) for k in gans[0]} if gans else {}
        entry["warm_start_forwards"] = warm_start_forwards(runs[0]["settings"])
        out.append(entry)
    return out


def warm_start_forwards(settings: dict) -> int:
    """Teacher UNet forwards a student's warm start spent (``pool.warm_start_forwards``),
    from its recorded settings."""
    from comfyui_dmd2.training.digits.students import StudentSettings
    from comfyui_dmd2.training.pool import warm_start_forwards as forwards

    known = {f.name for f in fields(StudentSettings)}
    config = StudentSettings(**{k: v for k, v in settings.items() if k in known}).config()
    return forwards(config)["pool" if config.regression_pairs else "fresh"]


def _fd(value: dict, trainings: int) -> str:
    spread = f" ± {value['std']:.2f} ({trainings} trainings)" if value["std"] is not None else f" ± {value['sampling_std_seed0']:.2f} (sampling)"
    return f"{value['mean']:.2f}{spread}"


def table(rows: list[dict], teachers: dict) -> str:
    lines = [
        "| row | FD, moving average | seed-0 training | FD, raw generator | D loss | logits real / fake | D accuracy | train s | warm-start teacher forwards |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, fd in teachers.items():
        finite = (f"; finite samples {100 * min(fd['finite_share']):.1f} %; mean |x0 error| at 999 {fd['x0_error_at_999']:.3g}"
                  if "finite_share" in fd else "")
        lines.append(f"| {name} | {fd['mean']:.2f} ± {fd['std']:.2f} (sampling){finite} | | | | | | | |")
    for r in rows:
        g = r["gan"]
        gan = f"{g['loss_gan_discriminator']:.3f} | {g['logits_real']:+.3f} / {g['logits_fake']:+.3f} | {g['discriminator_accuracy']:.3f}" if g else "GAN off | | "
        lines.append(f"| {r['name']} | {_fd(r['ema'], r['trainings'])} | {r['ema']['seed0']:.2f} | {_fd(r['raw'], r['trainings'])} | {gan} | {r['train_s']:.0f} | {r.get('warm_start_forwards', 0):,} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="", help="row names separated by ';' (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path("dmd2-digits-study"))
    parser.add_argument("--training-seeds", default="", help="train only these training seeds of each row (e.g. 0; default: the row's)")
    parser.add_argument("--base-teacher-rows", action="store_true", help="with finetune or v-pred rows: the base teacher's rows too")
    parser.add_argument("--teachers-only", action="store_true", help="the chosen rows' teacher rows only (train no student)")
    parser.add_argument("--graph", action="store_true", help="v-pred, finetune and flow rows: also sample each exported LoRA in a real ComfyUI graph")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "comfyui-dmd2", help="where the demo's teacher is cached")
    args = parser.parse_args()
    from comfyui_dmd2.comfy_env import ensure_comfy

    ensure_comfy(cpu=True)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from safetensors.torch import save_file

    from comfyui_dmd2.training.digits import data as D
    from comfyui_dmd2.training.digits import teacher as T
    from comfyui_dmd2.training.digits.demo import FULL, finetune_for, release_for, teacher_for

    all_rows = rows() | finetune_rows() | vpred_rows() | imperfect_rows() | flow_rows()
    chosen = [r.strip() for r in args.rows.split(";") if r.strip()] or list(all_rows)
    unknown = [r for r in chosen if r not in all_rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {list(all_rows)}")
    args.out.mkdir(parents=True, exist_ok=True)
    finetune = any(name.startswith(FINETUNE) for name in chosen)
    vpred = any(name.startswith(VPRED) for name in chosen)
    imperfect = any(name.startswith(IMPERFECT) for name in chosen)
    flow = any(name.startswith(FLOW) for name in chosen)
    base_rows = not (finetune or vpred or imperfect or flow) or args.base_teacher_rows
    if base_rows or not all(name.startswith((VPRED, FLOW)) for name in chosen):  # the eps teacher (v-pred and flow rows alone need none)
        teacher = teacher_for(D.load_digits_data(), FULL, args.cache)
        teacher_file = str(args.out / "teacher.safetensors")
        save_file(T.denoiser_state_dict(teacher), teacher_file)
    start = time.time()
    if vpred:  # the v-prediction ZTSNR teacher: the same budget as the eps one, cached in --cache too
        v_teacher_file = str(args.out / "teacher_v_zsnr.safetensors")
        save_file(T.denoiser_state_dict(teacher_for(D.load_digits_data(), FULL, args.cache, family=T.DIGITS_V)), v_teacher_file)
    if imperfect:  # the demo's teacher stopped early, cached in --cache too
        imperfect_file = str(args.out / f"teacher_s{IMPERFECT_TEACHER_STEPS}.safetensors")
        save_file(T.denoiser_state_dict(teacher_for(D.load_digits_data(), replace(FULL, teacher_steps=IMPERFECT_TEACHER_STEPS), args.cache)),
                  imperfect_file)
    if flow:  # the Flux-class teacher (#25), trained by rectified flow, cached in --cache too
        from comfyui_dmd2.training.digits import flow as FL

        flow_teacher_file = str(args.out / "teacher_flux.safetensors")
        save_file(FL.denoiser_state_dict(teacher_for(D.load_digits_data(), replace(FULL, teacher_steps=FL.TEACHER_STEPS), args.cache,
                                                     family=FL.DIGITS_FLOW)), flow_teacher_file)
    if finetune:
        # the finetune and the release LoRA: the demo's (cached in --cache like its teacher)
        base = T.denoiser_state_dict(teacher)
        finetune_file = str(args.out / "finetune.safetensors")
        save_file(finetune_for(base, FULL, args.cache), finetune_file)
        release_file = release_for(base, FULL, args.cache, args.out)

    def job(name: str, seed: int) -> tuple:
        settings = all_rows[name][0]
        if name.startswith(VPRED):
            return (name, settings, seed, v_teacher_file, args.samples, args.seeds, 1, "")
        if name.startswith(IMPERFECT):
            return (name, settings, seed, imperfect_file, args.samples, args.seeds, 1, "")
        if name.startswith(FLOW):
            return (name, settings, seed, flow_teacher_file, args.samples, args.seeds, 1, "")
        if not name.startswith(FINETUNE):
            return (name, settings, seed, teacher_file, args.samples, args.seeds, 1, "")
        if settings.init_lora == "release":
            settings = replace(settings, init_lora=release_file)
        return (name, settings, seed, finetune_file, args.samples, args.seeds, 1, FULL.style)

    # longest first (4-step, then the rest) so that the two workers finish together
    only = {int(seed) for seed in args.training_seeds.split(",")} if args.training_seeds else None
    jobs = [job(name, seed) for name in chosen for seed in all_rows[name][1] if (only is None or seed in only) and not args.teachers_only]
    jobs.sort(key=lambda job: -len(job[1].timesteps))
    # each training's result is kept as it arrives, so an interrupted study picks up where it stopped
    runs_dir = args.out / "runs"
    runs_dir.mkdir(exist_ok=True)

    def run_file(job: tuple) -> Path:
        return runs_dir / f"{_slug(job[0])}_seed{job[2]}_n{args.samples}x{args.seeds}.json"

    def finished(job: tuple) -> dict | None:
        """A kept result of this very training (same settings), if any."""
        if not run_file(job).is_file():
            return None
        kept = json.loads(run_file(job).read_text())
        # a settings field added since a result was kept reads as its default there
        defaults = json.loads(json.dumps(asdict(type(job[1])())))
        return kept if {**defaults, **kept["settings"]} == json.loads(json.dumps(asdict(job[1]))) else None

    results = [kept for kept in map(finished, jobs) if kept is not None]
    todo = [job for job in jobs if finished(job) is None]
    if results:
        print(f"reusing {len(results)} finished trainings from {runs_dir}", flush=True)
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, result in zip(todo, pool.map(_job, todo)):
            print(f"{result['name']} (seed {result['seed']}): FD {result['ema']['mean']:.2f} ± {result['ema']['std']:.2f} "
                  f"(raw {result['raw']['mean']:.2f}), {result['train_s']:.0f} s", flush=True)
            run_file(job).write_text(json.dumps(result, indent=2))
            results.append(result)
    order = {name: i for i, name in enumerate(chosen)}
    rows_out = sorted(combine(results), key=lambda r: order[r["name"]])
    teachers = teacher_rows(teacher_file, args.samples, args.seeds) if base_rows else {}
    if imperfect:
        teachers |= {IMPERFECT + k: v for k, v in teacher_rows(imperfect_file, args.samples, args.seeds).items()}
    if vpred:
        teachers |= vpred_teacher_rows(v_teacher_file, args.samples, args.seeds)
    if flow:
        teachers |= {FLOW + k: v for k, v in teacher_rows(flow_teacher_file, args.samples, args.seeds, "Euler").items()}
    if finetune:
        teachers |= finetune_teacher_rows(finetune_file, teacher_file, release_file, FULL.style, FULL.strengths, args.samples, args.seeds)
    text = table(rows_out, teachers)
    if args.graph and (vpred or finetune or flow):
        from comfyui_dmd2.training.digits import metric as M

        graph = graph_rows([r for r in results if r["name"].startswith(VPRED)], v_teacher_file, args.samples, args.seeds) if vpred else {}
        if flow:
            graph |= graph_rows([r for r in results if r["name"].startswith(FLOW)], flow_teacher_file, args.samples, args.seeds)
        if finetune:  # in the finetune's own metric (its mirrored digits)
            graph |= graph_rows([r for r in results if r["name"].startswith(FINETUNE)], finetune_file, args.samples, args.seeds,
                                FULL.style)
        lines = ["", "| row, sampled in the ComfyUI graph (exported LoRA, LoraLoaderModelOnly, DMD2Generate) | FD, moving average | per training |", "|---|---|---|"]
        for r in rows_out:
            if r["name"] in graph:
                per = {seed: v["mean"] for seed, v in sorted(graph[r["name"]].items())}
                r["graph"] = M.summarize(list(per.values())) | {"per_training": per}
                spread = f" ± {r['graph']['std']:.2f} ({len(per)} trainings)" if len(per) > 1 else f" ± {graph[r['name']][0]['std']:.2f} (sampling)"
                lines.append(f"| {r['name']} | {r['graph']['mean']:.2f}{spread} | " + ", ".join(f"seed {k}: {v:.2f}" for k, v in per.items()) + " |")
        text += "\n".join(lines)
    print(text)
    print(f"study: {time.time() - start:.0f} s")
    (args.out / "study.json").write_text(json.dumps({"teachers": teachers, "rows": rows_out}, indent=2))
    (args.out / "study.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
