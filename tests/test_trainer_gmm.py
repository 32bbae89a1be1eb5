"""The DMD2 loop on a target whose denoiser is known in closed form (a 2-D Gaussian mixture).

The real score is the exact E[x0 | x_t] of the mixture under the SD noise schedule; the fake
score is a learnable mixture denoiser of the same form initialised at the target (as DMD2
initialises the fake score from the teacher); the generator is a small MLP that starts far
from the target. The same ``DMD2Trainer`` that distils the digits model must move the
generator's samples towards the target: the energy distance drops by a large factor.
Also: config loading, the TTUR schedule, the GAN path and exact resume.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from comfyui_dmd2 import bases
from comfyui_dmd2.training.config import ConfigError, DMD2Config, load_config
from comfyui_dmd2.training.trainer import Batch, DMD2Backend, DMD2Trainer

TARGET_MEANS = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [1.5, -1.5], [-1.5, -1.5]])
TARGET_STD = 0.35


def mixture_x0(x_t, t, alphas_cumprod, means, log_std, logits):
    """E[x0 | x_t] for an isotropic Gaussian mixture prior (per-component std exp(log_std)).

    Given component k: x_t ~ N(sqrt(a) mu_k, v_k I) with v_k = a s_k^2 + 1 - a, and
    E[x0 | x_t, k] = mu_k + sqrt(a) s_k^2 / v_k (x_t - sqrt(a) mu_k); mix by the posterior
    responsibilities."""
    a = alphas_cumprod[t].to(x_t.dtype)[:, None, None]  # (B, 1, 1)
    s2 = torch.exp(2 * log_std)[None, :, None]  # (1, K, 1)
    v = a * s2 + 1 - a
    diff = x_t[:, None, :] - a.sqrt() * means[None]  # (B, K, D)
    d = x_t.shape[-1]
    log_lik = -0.5 * (diff**2).sum(-1) / v[..., 0] - 0.5 * d * torch.log(v[..., 0])
    resp = torch.softmax(torch.log_softmax(logits, 0)[None] + log_lik, dim=1)  # (B, K)
    per_component = means[None] + a.sqrt() * s2 / v * diff
    return (resp[..., None] * per_component).sum(1)


def energy_distance(x, y):
    """2 E|x-y| - E|x-x'| - E|y-y'| (zero iff the distributions agree)."""
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


class GMMBackend(torch.nn.Module):
    """A ``DMD2Backend`` over the analytic target. Owns all modules; forwards only."""

    def __init__(self, with_gan=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.family = bases.SD15  # eps, SD's schedule
        self.alphas_cumprod = self.family.process.alphas_cumprod.float()
        self.device = torch.device("cpu")
        self.with_gan = with_gan
        self.has_gan_head = with_gan
        # generator: (x_t, t/1000) -> x0, starting as a blob around (4, -4)
        self.generator = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
        with torch.no_grad():
            self.generator[-1].weight.mul_(0.3)
            self.generator[-1].bias.copy_(torch.tensor([4.0, -4.0]))
        k = len(TARGET_MEANS)
        self.fake_means = torch.nn.Parameter(TARGET_MEANS.clone())
        self.fake_log_std = torch.nn.Parameter(torch.full((k,), math.log(TARGET_STD)))
        self.fake_logits_mix = torch.nn.Parameter(torch.zeros(k))
        self.head = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1))

    def sample_target(self, n, generator=None):
        idx = torch.randint(0, len(TARGET_MEANS), (n,), generator=generator)
        return TARGET_MEANS[idx] + TARGET_STD * torch.randn(n, 2, generator=generator)

    def sample_batch(self, n):
        real = self.sample_target(n) if self.with_gan else None
        return Batch(cond=None, shape=(n, 2), real_x0=real)

    prompt_count = 1

    def prompt_batch(self, indices):
        return Batch(cond=None, shape=(len(indices), 2))

    def generator_x0(self, x_t, t, cond):
        return self.generator(torch.cat([x_t, t[:, None].float() / 1000], 1))

    def real_x0(self, x_t, t, cond, uncond, guidance_scale):
        k = len(TARGET_MEANS)
        return mixture_x0(x_t, t, self.alphas_cumprod, TARGET_MEANS, torch.full((k,), math.log(TARGET_STD)), torch.zeros(k))

    def fake_x0(self, x_t, t, cond):
        return mixture_x0(x_t, t, self.alphas_cumprod, self.fake_means, self.fake_log_std, self.fake_logits_mix)

    def fake_logits(self, x_t, t, cond):
        return self.head(torch.cat([x_t, t[:, None].float() / 1000], 1))[:, 0]

    def generator_parameters(self):
        return self.generator.named_parameters()

    def fake_score_parameters(self):
        named = [("means", self.fake_means), ("log_std", self.fake_log_std), ("mix", self.fake_logits_mix)]
        if self.with_gan:
            named += [("head." + n, p) for n, p in self.head.named_parameters()]
        return named

    @torch.no_grad()
    def samples(self, n=2000, seed=123, timesteps=(399,)):
        """Draw with the same procedure as the pack's sampler: predict x0, re-noise."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 2, generator=g)
        for i, t in enumerate(timesteps):
            x0 = self.generator_x0(x, torch.full((n,), t), None)
            if i + 1 < len(timesteps):
                x = self.family.add_noise(x0, torch.randn(n, 2, generator=g), torch.full((n,), timesteps[i + 1]))
        return x0


def gmm_config(**overrides):
    values = {
        "arch": "sd15",
        "generator_timesteps": (399,),
        "real_guidance_scale": 1.0,
        "fake_updates_per_generator_update": 5,
        "lr_generator": 3e-3,
        "lr_fake_score": 5e-2,
        "warmup_steps": 10,
        "max_grad_norm": 10.0,
        "fake_loss_weighting": "eps",
        "gan_generator_weight": 5e-2,
        "gan_discriminator_weight": 1e-1,
        "batch_size": 256,
        "grad_accum": 1,
        "lr_gan_head": 0.0,
        "ema_decay": 0.0,
        "seed": 0,
    }
    values.update(overrides)
    return DMD2Config.for_arch(values.pop("arch"), **values)


def test_backend_satisfies_protocol_and_mixture_denoiser_is_exact_at_small_noise():
    backend = GMMBackend()
    assert isinstance(backend, DMD2Backend)
    # at t=0 (a = 0.99915) E[x0|x_t] of a target sample is nearly itself
    x0 = backend.sample_target(100, torch.Generator().manual_seed(0))
    pred = backend.real_x0(x0, torch.zeros(100, dtype=torch.long), None, None, 1.0)
    assert (pred - x0).abs().max() < 0.05
    # and Monte-Carlo check of the closed form at t=500: E[x0 | x_t] minimises the MSE, so
    # it must beat a perturbed predictor on fresh pairs
    g = torch.Generator().manual_seed(1)
    x0 = backend.sample_target(20000, g)
    t = torch.full((20000,), 500)
    x_t = backend.family.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    pred = backend.real_x0(x_t, t, None, None, 1.0)
    assert ((pred - x0) ** 2).mean() < ((1.1 * pred - x0) ** 2).mean()
    assert ((pred - x0) ** 2).mean() < ((pred + 0.1 - x0) ** 2).mean()


def _distance(backend, timesteps=(399,)):
    target = backend.sample_target(2000, torch.Generator().manual_seed(7))
    return energy_distance(backend.samples(timesteps=timesteps), target)


def test_one_step_dm_update_moves_generator_to_target():
    torch.manual_seed(0)
    backend = GMMBackend()
    trainer = DMD2Trainer(gmm_config(), backend)
    before = _distance(backend)
    history = trainer.run(steps=600, progress=False)
    after = _distance(backend)
    print(f"1-step energy distance: {before:.3f} -> {after:.3f}")
    assert before > 2.0
    assert after < before / 10
    # two time-scale rule: the generator is updated on every 5th iteration only
    assert [m["generator_updated"] for m in history[:6]] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert all(("loss_dm" in m) == (i % 5 == 0) for i, m in enumerate(history))
    assert all(math.isfinite(m["loss_fake"]) for m in history)


def test_multi_step_backward_simulation_moves_generator_to_target():
    torch.manual_seed(0)
    backend = GMMBackend()
    calls = []
    original = backend.generator_x0

    def spy(x_t, t, cond):
        calls.append((int(t[0]), torch.is_grad_enabled()))
        return original(x_t, t, cond)

    backend.generator_x0 = spy
    trainer = DMD2Trainer(gmm_config(generator_timesteps=(999, 499)), backend)
    before = _distance(backend, (999, 499))
    trainer.run(steps=600, progress=False)
    after = _distance(backend, (999, 499))
    print(f"2-step energy distance: {before:.3f} -> {after:.3f}")
    assert after < before / 10
    # backward simulation: t=999 is sometimes run without grad before a step at 499;
    # 499 never appears except after a 999 call in the same iteration
    assert (999, False) in calls and (499, True) in calls
    for i, (t, _) in enumerate(calls):
        if t == 499:
            assert calls[i - 1] == (999, False)


def test_gan_path_trains_head_and_still_matches():
    torch.manual_seed(0)
    backend = GMMBackend(with_gan=True)
    head_before = [p.detach().clone() for p in backend.head.parameters()]
    trainer = DMD2Trainer(gmm_config(), backend)
    before = _distance(backend)
    history = trainer.run(steps=600, progress=False)
    after = _distance(backend)
    print(f"1-step + GAN energy distance: {before:.3f} -> {after:.3f}")
    assert after < before / 10
    assert all("loss_gan_discriminator" in m for m in history)
    assert all("loss_gan_generator" in m for m in history[::5])
    assert any(not torch.equal(a, b) for a, b in zip(head_before, backend.head.parameters()))
    # the generator update does not leave gradients on the (frozen) head
    assert all(p.grad is None for p in backend.head.parameters())
    assert all(p.requires_grad for p in backend.head.parameters())


def test_no_gan_without_head_even_with_real_latents():
    backend = GMMBackend(with_gan=True)
    backend.has_gan_head = False
    trainer = DMD2Trainer(gmm_config(), backend)
    metrics = trainer.step()
    assert "loss_gan_discriminator" not in metrics and "loss_gan_generator" not in metrics


def test_resume_is_exact(tmp_path):
    def make():
        torch.manual_seed(3)
        backend = GMMBackend(with_gan=True)
        return backend, DMD2Trainer(gmm_config(generator_timesteps=(999, 749, 499), batch_size=32, grad_accum=2, ema_decay=0.9), backend)

    backend, trainer = make()
    trainer.run(steps=7, progress=False)
    path = tmp_path / "state.pt"
    torch.save(trainer.state_dict(), path)
    expected = trainer.run(steps=6, progress=False)
    expected_params = [p.detach().clone() for p in backend.parameters()]

    torch.manual_seed(999)  # a different global RNG and fresh weights: all must be restored
    backend2 = GMMBackend(with_gan=True, seed=5)
    trainer2 = DMD2Trainer(gmm_config(generator_timesteps=(999, 749, 499), batch_size=32, grad_accum=2, ema_decay=0.9), backend2)
    trainer2.load_state_dict(torch.load(path, weights_only=True))
    assert trainer2.step_count == 7
    got = trainer2.run(steps=6, progress=False)
    assert got == expected
    for a, b in zip(expected_params, backend2.parameters()):
        assert torch.equal(a, b)
    # the moving average came back too and went on the same way
    expected_tensors, got_tensors = trainer.tensors(), trainer2.tensors()
    assert any(k.startswith("generator_ema/") for k in got_tensors)
    for key, value in expected_tensors.items():
        assert torch.equal(value, got_tensors[key]), key


def test_load_state_dict_rejects_mismatched_parameters():
    backend = GMMBackend()
    trainer = DMD2Trainer(gmm_config(), backend)
    state = trainer.state_dict()
    state["tensors"]["generator/0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="0.weight"):
        trainer.load_state_dict(state)
    state = trainer.state_dict()
    state["tensors"]["generator/extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        trainer.load_state_dict(state)


def test_warmup_and_optimizer_state_only_for_trainables():
    backend = GMMBackend()
    trainer = DMD2Trainer(gmm_config(warmup_steps=4, fake_updates_per_generator_update=1), backend)
    lrs = [trainer.step()["lr_generator"] for _ in range(5)]
    # the rate iteration n ran at: min(1, (n+1)/4) -> 1/4, 2/4, 3/4, 1, 1
    assert lrs == pytest.approx([3e-3 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0)])
    state = trainer.generator_optimizer.state_dict()["state"]
    assert len(state) == len(list(backend.generator.parameters()))


def test_config_defaults_toml_and_overrides(tmp_path):
    sdxl, sd15 = DMD2Config.for_arch("sdxl"), DMD2Config.for_arch("sd15")
    assert (sdxl.real_guidance_scale, sdxl.fake_updates_per_generator_update, sdxl.lr_generator) == (8.0, 5, 5e-5)
    assert (sd15.real_guidance_scale, sd15.fake_updates_per_generator_update, sd15.lr_generator) == (1.75, 10, 5e-5)
    assert (sdxl.gan_generator_weight, sd15.gan_generator_weight, sd15.gan_discriminator_weight) == (5e-3, 1e-3, 1e-2)
    assert (sdxl.lr_fake_score, sdxl.lr_gan_head) == (5e-4, 5e-5)  # a LoRA fake score at 10x (docs/training.md)
    assert (sdxl.gan_min_timestep, sdxl.gan_max_timestep) == (0, 999)  # --diffusion_gan_max_timestep 1000
    assert (sdxl.batch_size, sdxl.grad_accum, sdxl.samples_per_iteration) == (1, 4, 4)
    assert sdxl.ema_decay == 0.99 and sdxl.regression_steps == 0
    assert sdxl.generator_timesteps == (999, 749, 499, 249)
    assert (sdxl.dm_min_timestep, sdxl.dm_max_timestep) == (20, 980)
    assert sdxl.adam_betas == (0.9, 0.999) and sdxl.weight_decay == 0.01
    path = tmp_path / "run.toml"
    path.write_text('arch = "sd15"\nlr_generator = 2e-6\ngenerator_timesteps = [399]\n[extra]\nprompt_file = "p.txt"\n')
    config = load_config(path, overrides=["steps=12", "real_guidance_scale=3"])
    assert config.arch == "sd15" and config.lr_generator == 2e-6 and config.one_step
    assert config.steps == 12 and config.real_guidance_scale == 3.0
    assert config.fake_updates_per_generator_update == 10  # the sd15 default survived
    assert config.extra == {"prompt_file": "p.txt"}
    assert load_config(overrides=["generator_timesteps=999,499"]).generator_timesteps == (999, 499)
    assert DMD2Config.from_dict(config.to_dict()) == config
    for bad in (["nonsense=1"], ["steps=abc"], ["generator_timesteps=249,999"], ["generator_timesteps=1000"], ["arch=sd3"], ["noequals"]):
        with pytest.raises(ConfigError):
            load_config(overrides=bad)
    # new options: one line naming the key and the allowed range
    for bad, message in (
        ("grad_accum=0", "grad_accum must be >= 1, got 0"),
        ("batch_size=0", "batch_size must be >= 1, got 0"),
        ("ema_decay=1", "ema_decay must be in [0, 1)"),
        ("ema_decay=-0.1", "ema_decay must be in [0, 1)"),
        ("regression_steps=-1", "regression_steps must be >= 0, got -1"),
        ("regression_teacher_steps=0", "regression_teacher_steps must be >= 1, got 0"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(overrides=[bad])
    assert load_config(overrides=["ema_decay=0"]).ema_decay == 0.0  # 0: no average
    # schedule presets as the reference has them: 1-step at 399 (SDXL) and at 999 (SD1.5)
    assert DMD2Config.for_arch("sdxl", generator_timesteps="1-step").generator_timesteps == (399,)
    assert DMD2Config.for_arch("sd15", generator_timesteps="1-step").generator_timesteps == (999,)
    assert load_config(overrides=["generator_timesteps=4-step"]).generator_timesteps == (999, 749, 499, 249)


def _gradients_of_first_iteration(timesteps, batch_size, grad_accum, seed):
    """The gradients each optimiser step of the first iteration sees (recorded at clipping)."""
    torch.manual_seed(seed)
    backend = GMMBackend(with_gan=True, seed=seed)
    config = gmm_config(generator_timesteps=timesteps, batch_size=batch_size, grad_accum=grad_accum, seed=seed)
    trainer = DMD2Trainer(config, backend)
    seen = []
    clip = trainer._clip

    def spy(params):
        seen.append([p.grad.clone() for p in params])
        return clip(params)

    trainer._clip = spy
    torch.manual_seed(100 + seed)  # the backend's real samples: the same draw for both runs
    metrics = trainer.step()
    return seen, metrics


@pytest.mark.parametrize("timesteps", [(399,), (999, 749, 499)])
def test_gradient_accumulation_equals_one_batch(timesteps):
    """batch 2 x 4 accumulated micro-batches gives the gradients of one batch of 8 (generator
    update with DM + GAN, then fake score + discriminator), backward simulation included."""
    steps_seen = set()
    for seed in range(4):
        one, m1 = _gradients_of_first_iteration(timesteps, 8, 1, seed)
        accumulated, m4 = _gradients_of_first_iteration(timesteps, 2, 4, seed)
        assert len(one) == len(accumulated) == 2  # generator, then fake score
        for group_one, group_acc in zip(one, accumulated):
            assert any(g.abs().sum() > 0 for g in group_one)
            for a, b in zip(group_one, group_acc):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        for key in ("loss_dm", "loss_fake", "loss_gan_discriminator", "loss_gan_generator"):
            assert m4[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
        trainer = DMD2Trainer(gmm_config(generator_timesteps=timesteps, seed=seed), GMMBackend())
        steps_seen.add(trainer._draw((8, 2), True, False)["step"])
    if len(timesteps) > 1:
        assert steps_seen - {0}  # some seeds backward-simulated


def test_micro_batches_differ_from_each_other():
    """Accumulation must not repeat one micro-batch: with 4 micro-batches of 1, the four
    samples of an iteration all differ."""
    backend = GMMBackend()
    trainer = DMD2Trainer(gmm_config(batch_size=1, grad_accum=4), backend)
    seen = []
    generate = trainer.generate

    def spy(batch, draws, with_grad):
        x = generate(batch, draws, with_grad)
        seen.append(x.detach())
        return x

    trainer.generate = spy
    trainer.step()
    assert len(seen) == 4 and all(s.shape == (1, 2) for s in seen)
    assert len({tuple(s.flatten().tolist()) for s in seen}) == 4


def test_moving_average_is_bias_corrected_and_swapped_in_for_export():
    decay = 0.8
    backend = GMMBackend()
    trainer = DMD2Trainer(gmm_config(fake_updates_per_generator_update=2, ema_decay=decay), backend)
    iterates = []
    for _ in range(7):
        metrics = trainer.step()
        if metrics["generator_updated"]:
            iterates.append([p.detach().clone() for p in trainer.generator_params])
    assert trainer.generator_updates == len(iterates) == 4
    # after n updates: sum_i (1 - d) d^(n-i) theta_i / (1 - d^n)
    n = len(iterates)
    weights = [(1 - decay) * decay ** (n - 1 - i) / (1 - decay**n) for i in range(n)]
    assert sum(weights) == pytest.approx(1.0)
    for j, (name, _) in enumerate(trainer.generator_named):
        expected = sum(w * it[j] for w, it in zip(weights, iterates))
        torch.testing.assert_close(trainer.generator_ema[name], expected)
    raw = [p.detach().clone() for p in trainer.generator_params]
    with trainer.averaged_generator():
        for name, p in trainer.generator_named:
            torch.testing.assert_close(p.detach(), trainer.generator_ema[name])
    for p, value in zip(trainer.generator_params, raw):
        assert torch.equal(p, value)  # the raw weights are back
    # the first update alone: the average is exactly that update's weights
    fresh = DMD2Trainer(gmm_config(ema_decay=0.999), GMMBackend())
    fresh.step()
    for name, p in fresh.generator_named:
        torch.testing.assert_close(fresh.generator_ema[name], p.detach())
    # ema_decay 0: no average, nothing swapped
    plain = DMD2Trainer(gmm_config(ema_decay=0.0), GMMBackend())
    assert plain.generator_ema is None and not any(k.startswith("generator_ema/") for k in plain.tensors())


def test_moving_average_can_live_on_the_cpu():
    trainer = DMD2Trainer(gmm_config(ema_on_cpu=True, ema_decay=0.9), GMMBackend())
    trainer.step()
    assert all(v.device.type == "cpu" for v in trainer.generator_ema.values())


def test_warmup_counts_iterations_not_generator_updates():
    backend = GMMBackend()
    trainer = DMD2Trainer(gmm_config(warmup_steps=10, fake_updates_per_generator_update=5), backend)
    history = [trainer.step() for _ in range(12)]
    # iteration i runs both at min(1, (i + 1) / 10), though the generator was updated three times
    for i, metrics in enumerate(history):
        factor = min(1.0, (i + 1) / 10)
        assert metrics["lr_generator"] == pytest.approx(3e-3 * factor)
        assert metrics["lr_fake_score"] == pytest.approx(5e-2 * factor)
    assert trainer.generator_updates == 3


def test_discriminator_scores_each_image_under_its_own_conditioning():
    """Real latents go to the head with ``real_cond``, generated ones with ``gan_cond``."""

    class Tagged(GMMBackend):
        def sample_batch(self, n):
            batch = super().sample_batch(n)
            batch.cond, batch.real_cond, batch.gan_cond = torch.zeros(n), torch.ones(n), torch.full((n,), 2.0)
            return batch

        def fake_logits(self, x_t, t, cond):
            calls.append(int(cond[0]))
            return super().fake_logits(x_t, t, cond)

    calls = []
    trainer = DMD2Trainer(gmm_config(), Tagged(with_gan=True))
    trainer.step()
    # generator update: the generated sample under gan_cond; discriminator: real, then generated
    assert calls == [2, 1, 2]


def test_regression_warm_start_moves_the_generator_onto_the_teacher():
    """The warm start regresses the generator's step at its timestep onto the teacher's DDIM
    sample from the same noise; then DMD2 takes over."""
    from comfyui_dmd2.training import sampling

    torch.manual_seed(0)
    backend = GMMBackend()
    config = gmm_config(regression_steps=300, regression_teacher_steps=10, steps=2, lr_generator=1e-2, ema_decay=0.9)
    trainer = DMD2Trainer(config, backend)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    teacher_ts = bases.SD15.trailing_timesteps(10)

    def gap():
        with torch.no_grad():
            target = sampling.ddim_sample(lambda x, t: backend.real_x0(x, t, None, None, 1.0), noise, teacher_ts, backend.family)
            return (backend.generator_x0(noise, torch.full((2000,), 399), None) - target).square().mean().item()

    before = gap()
    history = trainer.run(progress=False)
    assert config.total_steps == 302 and trainer.step_count == 302
    assert all("loss_regression" in m and "loss_dm" not in m for m in history[:300])
    assert "loss_dm" in history[300] and "loss_regression" not in history[300]
    assert trainer.generator_updates == 301  # every regression step, then one DMD2 update
    # DMD2 starts as a run of its own (as the reference's separate runs): its warmup starts
    # again, Adam's moments are fresh, and the average holds only DMD2's update
    assert history[299]["lr_generator"] == pytest.approx(1e-2)
    assert history[300]["lr_generator"] == pytest.approx(1e-3)  # 1 / warmup_steps of the rate
    assert history[300]["lr_fake_score"] == pytest.approx(5e-3)  # the fake score's first update
    assert all(int(state["step"]) == 1 for state in trainer.generator_optimizer.state.values())
    for name, p in trainer.generator_named:
        assert torch.equal(trainer.generator_ema[name], p.detach())
    after = gap()
    print(f"regression gap {before:.3f} -> {after:.4f}")
    assert after < before / 20
    # the teacher's deterministic samples land on the target mixture: the warm start did too
    assert energy_distance(backend.samples(), backend.sample_target(2000, torch.Generator().manual_seed(7))) < 0.3


def test_regression_pool_is_built_once_and_reused():
    """``regression_pairs`` N: the teacher runs N x its DDIM steps once, before the first
    regression iteration, and never again during the warm start; every iteration regresses
    onto pairs of that pool (the same noise gives the same target), and the warm start still
    brings the generator onto the teacher."""
    from comfyui_dmd2.training import pool, sampling

    torch.manual_seed(0)
    backend = GMMBackend()
    config = gmm_config(regression_steps=300, regression_teacher_steps=10, regression_pairs=512, steps=1, lr_generator=1e-2)
    teacher_rows = []
    plain = backend.real_x0
    backend.real_x0 = lambda x_t, *rest: teacher_rows.append(len(x_t)) or plain(x_t, *rest)
    trainer = DMD2Trainer(config, backend)
    assert pool.warm_start_forwards(config) == {"fresh": 300 * 256 * 10, "pool": 512 * 10}
    assert pool.warm_start_forwards(config, world_size=2)["pool"] == 256 * 10  # two batches of 256: one per process
    trainer.step()
    assert sum(teacher_rows) == 512 * 10 and trainer.pool.complete and len(trainer.pool) == 512
    built = trainer.pool
    expected = sampling.ddim_sample(lambda x, t: plain(x, t, None, None, 1.0), built.noise[:7], bases.SD15.trailing_timesteps(10), backend.family)
    assert torch.allclose(built.target[:7], expected, atol=1e-6)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    teacher = sampling.ddim_sample(lambda x, t: plain(x, t, None, None, 1.0), noise, bases.SD15.trailing_timesteps(10), backend.family)
    gap = lambda: (backend.generator_x0(noise, torch.full((2000,), 399), None) - teacher).square().mean().item()
    with torch.no_grad():
        before = gap()
    trainer.run(299, progress=False)
    assert trainer.pool is built and sum(teacher_rows) == 512 * 10  # the pool, not the teacher, fed 299 more iterations
    with torch.no_grad():
        after = gap()
    print(f"regression gap with a pool of 512 {before:.3f} -> {after:.4f}")
    assert after < before / 20
    # the same seed builds the same pool; another seed other pairs
    again = pool.build_pool(config, backend)
    assert torch.equal(again.target, built.target) and torch.equal(again.noise, built.noise)
    other = pool.build_pool(dataclasses.replace(config, seed=1), backend)
    assert not torch.equal(other.noise, built.noise)


def test_processes_share_the_pool_build_and_each_holds_the_same_pool():
    """Three processes (threads here, gathering through a barrier as torch.distributed's
    all_gather does) each make every third batch of a 10-pair pool at batch 3 (the last
    round leaves two of them empty-handed): each teacher call runs once in all, and every
    process ends with the pool one process builds, bit for bit."""
    import threading

    from comfyui_dmd2.training import pool

    config = gmm_config(regression_steps=5, regression_teacher_steps=4, regression_pairs=10, steps=1, batch_size=3)
    single = pool.build_pool(config, GMMBackend())
    world, barrier, shared, results, rows = 3, threading.Barrier(3), {}, {}, []

    def run(rank: int) -> None:
        backend = GMMBackend()
        plain = backend.real_x0
        backend.real_x0 = lambda x_t, *rest: rows.append((rank, len(x_t))) or plain(x_t, *rest)

        def gather(target):
            shared[rank] = target
            barrier.wait()
            parts = [shared[r] for r in range(world)]
            barrier.wait()
            return parts

        results[rank] = pool.build_pool(config, backend, rank=rank, world_size=world, gather=gather)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(n for _, n in rows) == 10 * 4  # each pair's 4 teacher steps once, over all processes
    assert {rank for rank, _ in rows} == {0, 1, 2}
    for rank in range(world):
        assert results[rank].complete and torch.equal(results[rank].target, single.target), rank
        assert torch.equal(results[rank].noise, single.noise)
