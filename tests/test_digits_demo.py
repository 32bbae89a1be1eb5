"""DMD2 on real data (scikit-learn digits): the product's trainer and backend, the pack's nodes.

Fast tests check the pieces (the node samples the digits model exactly like the trainer's
1-step convention; the students are LoRAs on the frozen teacher with each real digit paired
with its own label; the exported LoRA, loaded by ComfyUI's stock loader, is the student; the
distance; the finetune's styles); the slow test runs the demo's ``--quick`` variant, the
finetune scenario, end to end through exported LoRA files in a ComfyUI graph.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("sklearn")

from comfyui_dmd2.training import losses
from comfyui_dmd2.training.digits import data as D
from comfyui_dmd2.training.digits import demo, metric, students
from comfyui_dmd2.training.digits import teacher as T
from comfyui_dmd2.training.trainer import DMD2Backend


@pytest.fixture(scope="module")
def data():
    return D.load_digits_data()


def test_splits_are_disjoint_and_scaled(data):
    assert len(data.train_y) + len(data.heldout_y) + len(data.unseen_y) == 1797
    assert data.train_x.shape[1:] == (1, 8, 8)
    assert data.train_x.min() >= -1 and data.train_x.max() <= 1
    rows = lambda x: {tuple(r.flatten().tolist()) for r in x}
    # the digits set has a few duplicate images; the splits must still be mostly disjoint
    assert len(rows(data.heldout_x) & rows(data.unseen_x)) < 5


def test_node_one_step_equals_trainer_convention():
    """DMD2Generate at 1 step (399) feeds the UNet unit noise, as the trainer trains it: the
    node's output equals the plain-torch DMD2 sampler on the same start noise."""
    torch.manual_seed(0)
    model = T.new_teacher(seed=3)
    labels = D.balanced_labels(20)
    via_node = demo.sample_with_nodes(model, labels, (399,), seed=11)
    plain = T.sample_student(model, labels, (399,), seed=11)
    assert via_node.shape == (20, 1, 8, 8)
    assert torch.allclose(via_node, plain, atol=1e-4), (via_node - plain).abs().max()
    # 4 steps runs through the node too (fresh re-noise: not comparable sample by sample)
    four = demo.sample_with_nodes(model, labels, (999, 749, 499, 249), seed=11)
    assert four.shape == (20, 1, 8, 8) and torch.isfinite(four).all()


def test_students_are_loras_on_the_frozen_teacher_with_paired_real_digits(data):
    teacher = T.new_teacher(seed=1)
    backend = students.student_backend(teacher, data, students.StudentSettings(lora_rank=8), seed=0)
    assert isinstance(backend, DMD2Backend)
    # LoRA G and F at rank 8, below the 32-channel widths: a low-rank update
    assert backend.adapters.rank == 8 and not backend.copies
    assert all(layer.adapters["generator"].down.weight.shape[0] == 8 for layer in backend.adapters.layers.values())
    base = [p for n, p in backend.unet.named_parameters() if ".adapters." not in n]
    assert base and not any(p.requires_grad for p in base)
    # every real digit comes with its own label, for the generator and the discriminator
    batch = backend.sample_batch(64)
    assert batch.shape == (64, 1, 8, 8) and batch.real_x0.shape == batch.shape
    assert batch.real_cond is None and batch.gan_cond is None  # both: the batch's own labels
    labels = batch.cond.y.argmax(1)
    for row in range(64):
        matches = (data.train_x == batch.real_x0[row]).flatten(1).all(1).nonzero().flatten()
        assert len(matches) and labels[row] in data.train_y[matches]
    assert torch.equal(batch.uncond.y.argmax(1), torch.full((64,), D.NULL_CLASS))
    # the head sits on the fake score's mid-block: gradients reach x_t and the head
    x_t = torch.randn(batch.shape, requires_grad=True)
    t = torch.full((64,), 500)
    logits = backend.fake_logits(x_t, t, batch.cond)
    assert logits.shape == (64,)
    logits.sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
    assert backend.fake_x0(x_t.detach(), t, batch.cond).shape == batch.shape
    # the real score is the teacher, with guidance uncond + s (cond - uncond)
    with torch.no_grad():
        cond = backend.real_x0(x_t, t, batch.cond, batch.uncond, 1.0)
        torch.testing.assert_close(cond, teacher.x0(x_t, t, labels), rtol=1e-4, atol=1e-5)
        uncond = teacher.x0(x_t, t, torch.full_like(labels, D.NULL_CLASS))
        guided = backend.real_x0(x_t, t, batch.cond, batch.uncond, 3.0)
    torch.testing.assert_close(guided, losses.classifier_free_guidance(cond, uncond, 3.0), rtol=1e-4, atol=1e-4)


def test_exported_lora_on_the_teacher_in_comfyui_is_the_student(data, tmp_path):
    """The file the demo samples: the kohya LoRA from the export dmd2-train uses, put on the
    teacher by ComfyUI's stock LoRA loader, samples exactly like the averaged student."""
    import comfy.sd
    import comfy.utils

    from comfyui_dmd2.nodes.sampler import DMD2Generate

    from comfyui_dmd2.training.digits.demo import ONE_STEP_STUDENT

    teacher = T.new_teacher(seed=2)
    # the demo's 1-step layout: every layer adapted (embeddings, in/out convs), a full fake score
    settings = students.StudentSettings(iterations=6, batch_size=8, fake_updates_per_generator_update=2, ema_decay=0.5, warmup_steps=0,
                                        lora_targets=ONE_STEP_STUDENT.lora_targets, full_copies=ONE_STEP_STUDENT.full_copies)
    student = students.distill(teacher, data, settings)
    assert list(student.backend.copies) == ["fake_score"] and "label_emb.0.0" in student.backend.adapters.paths.values()
    path = student.export(tmp_path / "student.safetensors")
    labels = D.balanced_labels(30)
    with student.trainer.averaged_generator():
        expected = T.sample_student(student.denoiser(), labels, (399,), seed=5)
    raw = T.sample_student(student.denoiser(), labels, (399,), seed=5)
    assert (raw - expected).abs().max() > 1e-5  # the export is the average, not the raw adapter
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    model, _ = comfy.sd.load_lora_for_models(T.comfy_model(teacher), None, lora, 1.0, 0.0)
    assert len(model.patches) == len(student.backend.adapters.layers)  # every key loaded
    latent = {"samples": torch.zeros(30, 1, 8, 8)}
    out = DMD2Generate.execute(model=model, positive=T.comfy_conditioning(labels), latent_image=latent, seed=5, preset="1-step (399)", custom_timesteps="")
    got = out.result[0]["samples"].float()
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=2e-3)  # fp16 LoRA file


def test_load_denoiser_validates(data):
    state = T.denoiser_state_dict(T.new_teacher())
    assert T.load_denoiser(state) is not None
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        T.load_denoiser(bad)
    bad = dict(state)
    bad["out.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        T.load_denoiser(bad)


def test_frechet_distance_by_hand():
    # 1-D: FD = (mu_a - mu_b)^2 + (s_a - s_b)^2. a = {-1, 1} (mean 0, unbiased var 2),
    # b = {1, 5} (mean 3, var 8): 9 + (sqrt 2 - sqrt 8)^2 = 9 + 2 = 11
    a = torch.tensor([[-1.0], [1.0]])
    b = torch.tensor([[1.0], [5.0]])
    assert metric.frechet_distance(a, b) == pytest.approx(11.0, abs=1e-9)
    # 2-D with independent coordinates: sums of the 1-D terms
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 2, generator=g)
    y = torch.randn(5000, 2, generator=g) * torch.tensor([1.0, 3.0]) + torch.tensor([2.0, 0.0])
    assert metric.frechet_distance(x, y) == pytest.approx(4.0 + 4.0, rel=0.05)
    assert metric.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_real_floor_predicts_the_distance_at_other_sample_sizes():
    """The floor at the model rows' sizes is extrapolated from disjoint real subsets; on a
    Gaussian we can draw at any size, so check the extrapolation against direct draws."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 2.0, 0.5, 1.5])
    draw = lambda n: torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    floor = metric.real_floor(draw(1400), model_samples=3000, seed=0)
    direct = sum(metric.frechet_distance(draw(3000), draw(1400)) for _ in range(40)) / 40
    assert floor["matched"] == pytest.approx(direct, rel=0.2)
    assert floor["half_size"] == 700
    halves = sum(metric.frechet_distance(draw(700), draw(700)) for _ in range(40)) / 40
    assert floor["halves"] == pytest.approx(halves, rel=0.35)  # one seed: 8 splits only
    assert floor["matched"] < floor["halves"] / 2  # larger samples, less bias


def test_students_train_side_by_side_exactly_as_one_after_the_other(data, monkeypatch, tmp_path):
    """With two cores the demo trains its two students in two spawned processes; that must
    give the very files of the one-process path (same seeds, one thread each)."""
    from safetensors.torch import load_file

    teacher = T.new_teacher(seed=2)
    settings = {
        "1-step": students.StudentSettings(iterations=4, batch_size=8, ema_decay=0.9),
        "4-step": students.StudentSettings(timesteps=demo.FOUR_STEP, iterations=4, batch_size=8, ema_decay=0.9),
    }
    torch.set_num_threads(1)
    (tmp_path / "seq").mkdir()
    (tmp_path / "par").mkdir()
    one_after_the_other = demo.train_students(teacher, settings, tmp_path / "seq")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # what the demo sees on 2 cores
    side_by_side = demo.train_students(teacher, settings, tmp_path / "par")
    assert set(side_by_side) == {"1-step", "4-step"}
    for name, result in side_by_side.items():
        reference = one_after_the_other[name]
        assert len(result["history"]) == 4 and result["history"] == reference["history"]
        got, expected = load_file(result["file"]), load_file(reference["file"])
        assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in got.items())  # it trained
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), key


def test_the_finetune_styles_keep_the_digits_and_their_labels(data):
    """The finetune's style is a way of writing the same digits: the mirror flips each image
    left-right (twice: the original), the bold pen only adds ink, into the four neighbours,
    at ``strength`` x the neighbour's ink."""
    from comfyui_dmd2.training.digits import finetune

    x = data.train_x[:50]
    assert torch.equal(finetune.mirror(x)[..., 0], x[..., 7]) and torch.equal(finetune.mirror(finetune.mirror(x)), x)
    assert torch.equal(finetune.bold(x, 0.0), x)
    y = finetune.bold(x, 0.5)
    assert y.shape == x.shape and (y >= x).all() and y.min() >= -1 and y.max() <= 1
    dot = -torch.ones(1, 1, 8, 8)
    dot[0, 0, 3, 3] = 1.0
    expected = torch.zeros(8, 8)
    expected[3, 3] = 1.0
    expected[2, 3] = expected[4, 3] = expected[3, 2] = expected[3, 4] = 0.5
    torch.testing.assert_close((finetune.bold(dot, 0.5) + 1)[0, 0] / 2, expected)
    shifted = finetune.shifted_data(data)  # the demo's style
    assert finetune.STYLE == "mirror"
    assert torch.equal(shifted.train_y, data.train_y) and torch.equal(shifted.heldout_y, data.heldout_y)
    assert torch.equal(shifted.heldout_x, finetune.mirror(data.heldout_x)) and torch.equal(shifted.unseen_x, finetune.mirror(data.unseen_x))


def test_finetune_starts_from_the_base_and_leaves_it_alone(data):
    from comfyui_dmd2.training.digits import finetune

    base = T.new_teacher(seed=4)
    before = T.denoiser_state_dict(base)
    tuned = finetune.finetune_teacher(base, finetune.shifted_data(data), steps=1, batch_size=4, lr=1e-12)
    after = T.denoiser_state_dict(tuned)
    for key, value in before.items():
        assert torch.equal(T.denoiser_state_dict(base)[key], value)  # the base is untouched
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6)  # a step at ~0 rate: the base's weights
    tuned = finetune.finetune_teacher(base, finetune.shifted_data(data), steps=3, batch_size=4)
    assert any(not torch.equal(T.denoiser_state_dict(tuned)[k], v) for k, v in before.items())


@pytest.mark.slow
def test_quick_demo_distils_the_finetune_and_samples_the_release_lora_on_it(tmp_path):
    """The demo's finetune scenario end to end, shortened: base teacher, release LoRA, the
    finetune, our students, everything sampled through exported files in a ComfyUI graph."""
    metrics = demo.run_demo(tmp_path, demo.QUICK, cache_dir=None)
    rows = metrics["rows"]
    print(demo._markdown(metrics))
    fd = {name: row["fd"]["mean"] for name, row in rows.items()}
    # the finetune learned its style: many steps are far better than one
    assert fd["finetune DDIM 50"] < fd["finetune DDIM 1"] / 2
    # the release LoRA was swept through the stock loader's strength, in the graph
    for strength in demo.QUICK.strengths:
        assert rows[f"release LoRA at {strength:.1f}"]["sampler"].startswith(
            f"ComfyUI graph: finetune + release LoRA (LoraLoaderModelOnly, strength {strength:.1f})")
    assert fd[f"release LoRA at {demo.QUICK.strengths[0]:.1f}"] != fd["release LoRA at 1.0"]
    assert rows["release LoRA, best strength"]["fd"]["mean"] == min(fd[f"release LoRA at {s:.1f}"] for s in demo.QUICK.strengths)
    # our student, distilled from the finetune on its own digits, lands far closer than one teacher step
    ours = fd["DMD2 4-step on the finetune"]
    assert ours < fd["finetune DDIM 1"] / 2 and rows["DMD2 4-step on the finetune"]["accuracy"] > 0.6
    assert rows["DMD2 4-step on the finetune"]["sampler"].startswith("ComfyUI graph: finetune + LoRA rank 8 (LoraLoaderModelOnly)")
    assert rows["DMD2 4-step from the release LoRA"]["iterations"] * 4 <= rows["DMD2 4-step on the finetune"]["iterations"]
    assert fd["real data (floor, matched)"] < min(fd["finetune DDIM 50"], ours)
    assert len(rows["DMD2 4-step on the finetune"]["fd"]["values"]) == demo.QUICK.seeds
    assert metrics["targets"][0]["target"].startswith("release LoRA at 1.0 >= 2x further")
    for name in ("grid.png", "training.png", "digits_release_lora.safetensors", "digits_finetune.safetensors",
                 "digits_dmd2_finetune_4-step.safetensors", "digits_dmd2_finetune_4-step_from_release.safetensors"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["rows"]["DMD2 4-step on the finetune"]["fd"]["mean"] == pytest.approx(ours)
    assert "| DMD2 4-step on the finetune |" in (tmp_path / "metrics.md").read_text()


# -- the v-prediction, zero-terminal-SNR teacher (#24) -------------------------------------------

def test_v_zsnr_teacher_is_a_v_prediction_zsnr_comfyui_model_and_its_file_says_so():
    """ComfyUI sees the v teacher as V_PREDICTION with zero terminal SNR (its own sigma table,
    the one the sampler nodes and the backend read), and its file carries ComfyUI's marker
    keys, so a loader rebuilds the same family; the eps teacher's file carries none."""
    import comfy.model_sampling as ms
    from comfyui_dmd2 import bases

    teacher = T.new_teacher(seed=4, family=T.DIGITS_V)
    model = T.comfy_model(teacher)
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, ms.V_PREDICTION) and sampling.zsnr
    prediction, zsnr, process = bases.discrete_sampling(sampling)
    assert (prediction, zsnr) == ("v", True)
    assert process.alphas_cumprod[-1].item() == pytest.approx(4.8973451890853435e-08, rel=1e-4)
    torch.testing.assert_close(process.alphas_cumprod, T.DIGITS_V.process.alphas_cumprod, rtol=1e-5, atol=1e-7)
    # the eps teacher keeps SD's table: the two differ (ZTSNR rescales every step, not only the last)
    assert T.DIGITS.process.alphas_cumprod[-1].item() == pytest.approx(0.00466, abs=1e-4)
    state = T.denoiser_state_dict(teacher)
    assert {"v_pred", "ztsnr"} <= set(state)
    again = T.load_denoiser(state)
    assert again.family == T.DIGITS_V and again.family.one_step_timestep == 999
    assert not {"v_pred", "ztsnr"} & set(T.denoiser_state_dict(T.new_teacher()))
    assert T.load_denoiser(T.denoiser_state_dict(T.new_teacher())).family == T.DIGITS


def test_v_zsnr_teacher_loss_and_x0_are_finite_at_999(data):
    """The v teacher's DDPM target is v = a*eps - s*x0 (checked against the float64 formula),
    finite at every timestep, and its x0 = a*x_t - s*v recovers the clean digit at 999 where
    the eps form (x_t - s*eps)/a divides by a = 2.2e-4 (0 in diffusers' exact ZTSNR)."""
    family = T.DIGITS_V
    x0 = data.train_x[:32]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    abar = family.process.alphas_cumprod
    for step in (0, 500, 980, 999):
        t = torch.full((32,), step)
        x_t = family.add_noise(x0, noise, t)
        target = T.training_target(family, x_t, x0, noise, t)
        a, s = abar[step].sqrt().item(), (1 - abar[step]).sqrt().item()
        torch.testing.assert_close(target, (a * noise.double() - s * x0.double()).float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(family.to_x0(x_t, target, t), x0, rtol=0, atol=1e-5)
    # at 999 the input is pure noise and v is the negated digit (up to a = 2.2e-4)
    assert (target + x0).abs().max() < 1e-3
    teacher = T.train_teacher(data, steps=3, batch_size=16, family=family)
    out = teacher.x0(torch.randn(10, 1, 8, 8), torch.full((10,), 999), D.balanced_labels(10))
    assert torch.isfinite(out).all()
    samples = T.sample_ddim(teacher, D.balanced_labels(10), 4, seed=0)
    assert torch.isfinite(samples).all()


def test_node_one_step_at_999_on_the_v_zsnr_teacher_equals_the_trainer_convention():
    """DMD2Generate at 999 on the v/ZTSNR teacher (sigma 4519 in ComfyUI's table) feeds the
    UNet unit noise and reads its v through ComfyUI's V_PREDICTION: the same samples as the
    plain-torch DMD2 sampler's x0 through the family."""
    model = T.new_teacher(seed=3, family=T.DIGITS_V)
    labels = D.balanced_labels(20)
    assert demo.dmd2_schedule((999,)) == ("custom", "999")
    via_node = demo.sample_with_nodes(model, labels, (999,), seed=11)
    plain = T.sample_student(model, labels, (999,), seed=11)
    assert torch.isfinite(plain).all()
    torch.testing.assert_close(via_node, plain, rtol=1e-3, atol=1e-4)


def test_product_path_on_the_v_zsnr_teacher_trains_finite_and_its_lora_samples_in_comfyui(data, tmp_path):
    """A few iterations of the product's path (SharedBaseBackend, DMD2Trainer, the warm
    start's teacher DDIM) on the v/ZTSNR teacher, the 1-step student at 999: the backend reads
    the teacher's family, every loss is finite, and the exported LoRA on the teacher, sampled
    by DMD2Generate at 999 in ComfyUI, is the averaged student."""
    import comfy.sd
    import comfy.utils

    from comfyui_dmd2.nodes.sampler import DMD2Generate

    teacher = T.new_teacher(seed=2, family=T.DIGITS_V)
    settings = students.StudentSettings(timesteps=(999,), iterations=6, batch_size=8, fake_updates_per_generator_update=2,
                                        ema_decay=0.5, warmup_steps=0, regression_steps=2, regression_teacher_steps=2)
    history: list[dict] = []
    student = students.distill(teacher, data, settings, callbacks=[history.append])
    assert student.backend.family == T.DIGITS_V and student.family == T.DIGITS_V
    losses_seen = {k for h in history for k in h if k.startswith("loss_")}
    assert {"loss_regression", "loss_dm", "loss_fake"} <= losses_seen
    assert all(math.isfinite(v) for h in history for k, v in h.items() if k.startswith("loss_"))
    path = student.export(tmp_path / "student.safetensors")
    labels = D.balanced_labels(20)
    with student.trainer.averaged_generator():
        expected = T.sample_student(student.denoiser(), labels, (999,), seed=5)
    assert torch.isfinite(expected).all()
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    model, _ = comfy.sd.load_lora_for_models(T.comfy_model(teacher), None, lora, 1.0, 0.0)
    assert len(model.patches) == len(student.backend.adapters.layers)
    out = DMD2Generate.execute(model=model, positive=T.comfy_conditioning(labels), latent_image={"samples": torch.zeros(20, 1, 8, 8)},
                               seed=5, preset="custom", custom_timesteps="999")
    torch.testing.assert_close(out.result[0]["samples"].float(), expected, rtol=1e-2, atol=2e-3)  # fp16 LoRA file


def test_release_cache_key_names_only_the_settings_that_differ_from_the_defaults():
    """A student setting added later with a default leaves the cached release LoRA's key as it
    was (the key hashed every field, so each new field retrained the release once); a setting
    that differs does change it."""
    from dataclasses import dataclass, field, replace

    from comfyui_dmd2.training.digits import demo
    from comfyui_dmd2.training.digits.students import StudentSettings

    @dataclass
    class Grown(StudentSettings):
        a_new_knob: float = 0.5
        a_new_list: list = field(default_factory=list)

    release = demo.FULL.release
    same = Grown(**{k: getattr(release, k) for k in StudentSettings.__dataclass_fields__})
    assert demo._changed_fields(same) == demo._changed_fields(release) != {}
    assert demo._digest(demo._changed_fields(replace(release, iterations=release.iterations + 1))) != demo._digest(
        demo._changed_fields(release))
