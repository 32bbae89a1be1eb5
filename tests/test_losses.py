"""Each DMD2 loss against a case computed by hand (derivations in the comments)."""

import math

import pytest
import torch
from comfyui_dmd2 import bases
from comfyui_dmd2.training import losses


def test_sd_schedule_matches_the_published_endpoints():
    a = bases.scaled_linear_alphas_cumprod()
    assert a.shape == (1000,)
    # first beta is 0.00085 exactly, so a_0 = 1 - 0.00085
    assert a[0].item() == pytest.approx(0.99915, abs=1e-12)
    # the value quoted everywhere for SD: sqrt(a_999) ~= 0.068 (x0 at t=999 divides by it)
    assert math.sqrt(a[999].item()) == pytest.approx(0.0683, abs=5e-4)
    assert torch.all(a[1:] < a[:-1])


def test_sd_schedule_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    assert torch.allclose(bases.scaled_linear_alphas_cumprod().float(), sched.alphas_cumprod.float(), atol=1e-6)


def _schedule(*values):
    """An eps family on the cumulative products ``values`` (timesteps 0, 1, ...)."""
    return bases.SD15.with_process(bases.DiscreteVP(torch.tensor(values, dtype=torch.float64)))


def test_add_noise_and_inverse():
    # a_1 = 0.64: x_t = 0.8 * x0 + 0.6 * eps; x0 = 2, eps = 1 -> 2.2; x0 = -1, eps = 2 -> 0.4
    alphas = _schedule(0.99, 0.64)
    x0 = torch.tensor([[2.0], [-1.0]])
    eps = torch.tensor([[1.0], [2.0]])
    t = torch.tensor([1, 1])
    x_t = alphas.add_noise(x0, eps, t)
    assert torch.allclose(x_t, torch.tensor([[2.2], [0.4]]))
    # x0 = (x_t - 0.6 eps) / 0.8 recovers x0, and eps = (x_t - 0.8 x0) / 0.6 recovers eps
    assert torch.allclose(alphas.to_x0(x_t, eps, t), x0)
    assert torch.allclose(alphas.eps_from_x0(x_t, x0, t), eps)
    # per-sample timesteps: sample 0 at a_0=0.99 -> sqrt(.99)*2 + sqrt(.01)*1 = 1.98997 + 0.1
    x_t = alphas.add_noise(x0, eps, torch.tensor([0, 1]))
    assert x_t[0, 0].item() == pytest.approx(2 * math.sqrt(0.99) + 0.1, abs=1e-6)


def test_classifier_free_guidance():
    # uncond + s (cond - uncond) = 1 + 2 * (3 - 1) = 5; s = 1 gives cond
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert losses.classifier_free_guidance(cond, uncond, 2.0).item() == 5.0
    assert losses.classifier_free_guidance(cond, uncond, 1.0).item() == 3.0


def test_distribution_matching_gradient_by_hand():
    # sample 0: x = [1, -1, 2, 0], x0_real = 0 -> p_real = x, mean|p_real| = 4/4 = 1
    #           x0_fake = [0, 2, 1, 1] -> p_fake = [1, -3, 1, -1]; p_real - p_fake = [0, 2, 1, 1]
    #           grad = [0, 2, 1, 1] / 1
    # sample 1: x = [2, 2, 2, 2], x0_real = [0, 0, 4, 2] -> p_real = [2, 2, -2, 0], mean|.| = 1.5
    #           x0_fake = [1, 1, 1, 1] -> p_fake = [1, 1, 1, 1]; diff = [1, 1, -3, -1]
    #           grad = [2/3, 2/3, -2, -2/3]
    x = torch.tensor([[1.0, -1.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0]]).reshape(2, 1, 2, 2)
    x0_real = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 2.0]]).reshape(2, 1, 2, 2)
    x0_fake = torch.tensor([[0.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 2, 2)
    grad = losses.distribution_matching_gradient(x, x0_real, x0_fake)
    expected = torch.tensor([[0.0, 2.0, 1.0, 1.0], [2 / 3, 2 / 3, -2.0, -2 / 3]]).reshape(2, 1, 2, 2)
    assert torch.allclose(grad, expected)
    # note: the gradient is x0_fake - x0_real scaled, i.e. it does not depend on x itself
    # except through the normaliser


def test_distribution_matching_loss_value_and_gradient():
    x = torch.tensor([[1.0, -1.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0]]).reshape(2, 1, 2, 2).requires_grad_(True)
    x0_real = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 2.0]]).reshape(2, 1, 2, 2)
    x0_fake = torch.tensor([[0.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 2, 2)
    loss, grad = losses.distribution_matching_loss(x, x0_real, x0_fake)
    # loss = 0.5 * mean(grad^2) = 0.5 * (0 + 4 + 1 + 1 + 4/9 + 4/9 + 4 + 4/9) / 8 = 0.5 * (10 + 4/3) / 8
    assert loss.item() == pytest.approx(0.5 * (10 + 4 / 3) / 8, rel=1e-6)
    loss.backward()
    # d/dx 0.5 * mean((x - sg(x - g))^2) = (x - (x - g)) / numel = g / 8
    assert torch.allclose(x.grad, grad / 8)


def test_distribution_matching_gradient_zero_normaliser_gives_zero_not_nan():
    # x == x0_real everywhere: mean|p_real| = 0, 0/0 -> NaN, zeroed
    x = torch.ones(1, 1, 2, 2)
    grad = losses.distribution_matching_gradient(x, x.clone(), x.clone())
    assert torch.equal(grad, torch.zeros_like(x))


def test_fake_score_loss_weightings():
    # errors (x0_pred - x0): sample 0 all 1, sample 1 all 2 -> squared 1 and 4
    x0 = torch.zeros(2, 1, 1, 2)
    x0_pred = torch.tensor([1.0, 1.0, 2.0, 2.0]).reshape(2, 1, 1, 2)
    alphas = _schedule(0.5, 0.8)
    t = torch.tensor([0, 1])
    # x0 weighting: mean(1, 1, 4, 4) = 2.5
    assert losses.fake_score_loss(x0_pred, x0, t, alphas, "x0").item() == pytest.approx(2.5)
    # eps weighting a/(1-a): 1 at a=0.5, 4 at a=0.8 -> mean(1, 1, 16, 16) = 8.5
    assert losses.fake_score_loss(x0_pred, x0, t, alphas, "eps").item() == pytest.approx(8.5)
    # native = the family's own prediction (eps here)
    assert losses.fake_score_loss(x0_pred, x0, t, alphas, "native").item() == pytest.approx(8.5)
    # v weighting 1/(1-a): 2 at a=0.5, 5 at a=0.8 -> mean(2, 2, 20, 20) = 11
    assert losses.fake_score_loss(x0_pred, x0, t, alphas, "v").item() == pytest.approx(11.0)
    # ... and it is the v model's native one
    assert losses.fake_score_loss(x0_pred, x0, t, alphas.with_sampling("v"), "native").item() == pytest.approx(11.0)
    with pytest.raises(ValueError, match="unknown weighting 'snr'"):
        losses.fake_score_loss(x0_pred, x0, t, alphas, "snr")


def test_fake_score_loss_eps_weighting_equals_eps_mse():
    # the "eps" weighting is literally |eps_pred - eps|^2 on the same x_t
    g = torch.Generator().manual_seed(0)
    alphas = bases.SD15
    x0, eps, eps_pred = (torch.randn(3, 1, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([10, 500, 990])
    x_t = alphas.add_noise(x0, eps, t)
    x0_pred = alphas.to_x0(x_t, eps_pred, t)
    expected = ((eps_pred - eps) ** 2).mean()
    assert losses.fake_score_loss(x0_pred, x0, t, alphas, "eps").item() == pytest.approx(expected.item(), rel=1e-4)


def test_fake_score_loss_does_not_backprop_into_target():
    x0 = torch.ones(1, 1, 1, 2, requires_grad=True)
    x0_pred = torch.zeros(1, 1, 1, 2, requires_grad=True)
    losses.fake_score_loss(x0_pred, x0, torch.tensor([0]), _schedule(0.5), "x0").backward()
    assert x0.grad is None
    # d/dpred mean((pred - 1)^2) = 2 (pred - 1) / 2 = -1 each
    assert torch.allclose(x0_pred.grad, torch.full_like(x0_pred, -1.0))


def test_gan_losses_by_hand():
    ln2 = math.log(2.0)
    zero = torch.zeros(3)
    # softplus(0) = ln 2
    assert losses.gan_generator_loss(zero).item() == pytest.approx(ln2)
    assert losses.gan_discriminator_loss(zero, zero).item() == pytest.approx(2 * ln2)
    # generator: softplus(-ln 3) = ln(1 + 1/3) = ln(4/3)
    assert losses.gan_generator_loss(torch.tensor([math.log(3.0)])).item() == pytest.approx(math.log(4 / 3))
    # discriminator: real logit ln 3 -> ln(4/3); fake logit ln 3 -> softplus(ln 3) = ln 4
    d = losses.gan_discriminator_loss(torch.tensor([math.log(3.0)]), torch.tensor([math.log(3.0)]))
    assert d.item() == pytest.approx(math.log(4 / 3) + math.log(4.0))
    # gradient of softplus(-l) at l = 0 is -sigmoid(0) = -1/2 (per sample, mean over 2)
    logits = torch.zeros(2, requires_grad=True)
    losses.gan_generator_loss(logits).backward()
    assert torch.allclose(logits.grad, torch.full((2,), -0.25))
