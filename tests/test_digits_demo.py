"""DMD2 on real data (scikit-learn digits): the same trainer, the pack's sampler node.

Fast tests check the pieces (the node samples the digits model exactly like the trainer's
1-step convention, the backend's GAN head, the distance); the slow test runs the demo's
``--quick`` variant end to end and checks that distillation beats the teacher's 1 step.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn")

from comfyui_dmd2.training import demo, digits, losses
from comfyui_dmd2.training.trainer import DMD2Backend


@pytest.fixture(scope="module")
def data():
    return digits.load_digits_data()


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
    model = digits.new_teacher(seed=3)
    labels = digits.balanced_labels(20)
    via_node = demo.sample_with_nodes(model, labels, (399,), seed=11)
    plain = digits.sample_student(model, labels, (399,), seed=11)
    assert via_node.shape == (20, 1, 8, 8)
    assert torch.allclose(via_node, plain, atol=1e-4), (via_node - plain).abs().max()
    # 4 steps runs through the node too (fresh re-noise: not comparable sample by sample)
    four = demo.sample_with_nodes(model, labels, (999, 749, 499, 249), seed=11)
    assert four.shape == (20, 1, 8, 8) and torch.isfinite(four).all()


def test_backend_protocol_and_gan_head(data):
    teacher = digits.new_teacher(seed=1)
    backend = digits.DigitsBackend(teacher, data, batch_size=8, gan=True)
    assert isinstance(backend, DMD2Backend)
    batch = backend.sample_batch()
    assert batch.shape == (8, 1, 8, 8) and batch.real_x0.shape == batch.shape
    x_t = torch.randn(batch.shape, requires_grad=True)
    t = torch.full((8,), 500)
    logits = backend.fake_logits(x_t, t, batch.cond)
    assert logits.shape == (8,)
    logits.sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
    # the head stops after the middle block, and the fake score still runs whole afterwards
    assert backend.fake_x0(x_t.detach(), t, batch.cond).shape == batch.shape
    # real score with guidance: uncond + s (cond - uncond)
    with torch.no_grad():
        cond = backend.real_x0(x_t, t, batch.cond, batch.uncond, 1.0)
        uncond = backend.real.x0(x_t, t, batch.uncond)
        guided = backend.real_x0(x_t, t, batch.cond, batch.uncond, 3.0)
    assert torch.allclose(guided, losses.classifier_free_guidance(cond, uncond, 3.0), atol=1e-5)
    # trainable groups: generator and fake UNets (+ head), never the frozen real score
    real_ids = {id(p) for p in backend.real.parameters()}
    assert not real_ids & {id(p) for _, p in backend.generator_parameters()}
    assert not real_ids & {id(p) for _, p in backend.fake_score_parameters()}
    assert any(n.startswith("head.") for n, _ in backend.fake_score_parameters())


def test_load_denoiser_validates(data):
    state = digits.denoiser_state_dict(digits.new_teacher())
    assert digits.load_denoiser(state) is not None
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        digits.load_denoiser(bad)
    bad = dict(state)
    bad["out.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        digits.load_denoiser(bad)


def test_frechet_distance_by_hand():
    # 1-D: FD = (mu_a - mu_b)^2 + (s_a - s_b)^2. a = {-1, 1} (mean 0, unbiased var 2),
    # b = {1, 5} (mean 3, var 8): 9 + (sqrt 2 - sqrt 8)^2 = 9 + 2 = 11
    a = torch.tensor([[-1.0], [1.0]])
    b = torch.tensor([[1.0], [5.0]])
    assert digits.frechet_distance(a, b) == pytest.approx(11.0, abs=1e-9)
    # 2-D with independent coordinates: sums of the 1-D terms
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 2, generator=g)
    y = torch.randn(5000, 2, generator=g) * torch.tensor([1.0, 3.0]) + torch.tensor([2.0, 0.0])
    assert digits.frechet_distance(x, y) == pytest.approx(4.0 + 4.0, rel=0.05)
    assert digits.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_real_floor_predicts_the_distance_at_other_sample_sizes():
    """The floor at the model rows' sizes is extrapolated from disjoint real subsets; on a
    Gaussian we can draw at any size, so check the extrapolation against direct draws."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 2.0, 0.5, 1.5])
    draw = lambda n: torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    floor = digits.real_floor(draw(1400), model_samples=3000, seed=0)
    direct = sum(digits.frechet_distance(draw(3000), draw(1400)) for _ in range(40)) / 40
    assert floor["matched"] == pytest.approx(direct, rel=0.2)
    assert floor["half_size"] == 700
    halves = sum(digits.frechet_distance(draw(700), draw(700)) for _ in range(40)) / 40
    assert floor["halves"] == pytest.approx(halves, rel=0.35)  # one seed: 8 splits only
    assert floor["matched"] < floor["halves"] / 2  # larger samples, less bias


def test_students_train_side_by_side_exactly_as_one_after_the_other(data, monkeypatch):
    """With two cores the demo trains its two students in two spawned processes; that must
    give the very weights of the one-process path (same seeds, one thread each)."""
    teacher = digits.new_teacher(seed=2)
    settings = demo.DemoSettings(
        one_step=demo.StudentSettings(iterations=4, lr_generator=8e-4, ema_decay=0.9),
        four_step=demo.StudentSettings(iterations=4, lr_generator=1e-4, ema_decay=0.9),
        student_batch=8,
    )
    torch.set_num_threads(1)
    one_after_the_other = demo._distill_students(teacher, data, settings)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # what the demo sees on 2 cores
    side_by_side = demo._distill_students(teacher, data, settings)
    assert set(side_by_side) == {"1-step", "4-step"}
    start = digits.denoiser_state_dict(teacher)
    for name, (model, timesteps) in side_by_side.items():
        reference, reference_timesteps = one_after_the_other[name]
        assert timesteps == reference_timesteps
        state, expected = digits.denoiser_state_dict(model), digits.denoiser_state_dict(reference)
        assert any(not torch.equal(v, start[k]) for k, v in state.items())  # it trained
        for key, value in expected.items():
            assert torch.equal(state[key], value), key


@pytest.mark.slow
def test_quick_demo_student_beats_teacher_one_step(tmp_path):
    metrics = demo.run_demo(tmp_path, demo.QUICK, cache_dir=None)
    rows = metrics["rows"]
    print(demo._markdown(metrics))
    teacher_1 = rows["teacher 1-step"]["fd"]["mean"]
    student_1 = rows["DMD2 1-step"]["fd"]["mean"]
    teacher_50 = rows["teacher 50-step"]["fd"]["mean"]
    # the teacher itself learned the data: many steps are far better than one
    assert teacher_50 < teacher_1 / 2
    # distillation: one student step lands far closer to the data than one teacher step
    # (short run; the full demo goes several times further)
    assert student_1 < teacher_1 / 2
    assert rows["DMD2 1-step"]["accuracy"] > 0.6  # samples look like their class
    assert rows["DMD2 1-step"]["sampler"].startswith("ComfyUI graph")  # sampled by ComfyUI's executor
    # the floor is a floor: real-vs-real at the model rows' sample sizes beats the model rows
    assert rows["real data (floor, matched)"]["fd"]["mean"] < min(teacher_50, student_1)
    assert rows["DMD2 1-step"]["fd"]["values"] and len(rows["DMD2 1-step"]["fd"]["values"]) == demo.QUICK.seeds
    assert [t["target"] for t in metrics["targets"]][:2] == ["1-step student <= teacher 4-step", "1-step student >= 8x closer than teacher 1-step"]
    assert metrics["targets"][1]["ratio"] == pytest.approx(teacher_1 / student_1)
    assert (tmp_path / "grid.png").stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["rows"]["DMD2 1-step"]["fd"]["mean"] == pytest.approx(student_1)
    assert "| DMD2 1-step |" in (tmp_path / "metrics.md").read_text()
