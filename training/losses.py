"""The DMD2 losses, one function each, plus the DDPM noise arithmetic they rely on.

Notation (eps-prediction, DDPM schedule with cumulative products ``alphas_cumprod``):
``x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps`` and ``x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)``.
Every score network is used through its x0 prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" schedule: betas linear in sqrt space, float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped (B, 1, 1, ...) to broadcast against ``like``."""
    out = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x0) at integer timesteps ``t`` (one per sample)."""
    a = _per_sample(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Turn an eps prediction into the x0 prediction it implies."""
    a = _per_sample(alphas_cumprod, t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Turn an x0 prediction into the eps prediction it implies."""
    a = _per_sample(alphas_cumprod, t, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def classifier_free_guidance(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + s * (cond - uncond)``: the real score's guidance (same form in x0 or eps,
    the two are affine in each other at a fixed x_t and t)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def distribution_matching_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's approximate KL gradient w.r.t. the generated sample ``x``.

    ``p = x - x0_pred`` for the real and fake scores; the difference is normalised per sample
    by ``mean |x - x0_real|`` (DMD's sample-adaptive weighting), and NaNs from an all-zero
    normaliser are zeroed."""
    p_real = x - x0_real
    p_fake = x - x0_fake
    dims = list(range(1, x.dim()))
    normaliser = p_real.abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / normaliser)


def distribution_matching_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's DM loss ``0.5 * MSE(x, stopgrad(x - grad))``.

    Its gradient w.r.t. ``x`` is exactly ``grad / x.numel()``, so backpropagating it pushes
    the generator along the distribution-matching direction. ``x0_real``/``x0_fake`` must
    carry no graph (computed under no_grad). Returns (loss, grad)."""
    grad = distribution_matching_gradient(x.detach(), x0_real.detach(), x0_fake.detach())
    target = (x.detach() - grad).detach()
    loss = 0.5 * F.mse_loss(x.float(), target.float(), reduction="mean")
    return loss, grad


def fake_score_loss(
    x0_pred: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    weighting: str = "eps",
) -> torch.Tensor:
    """Denoising loss of the fake score on (detached) generated samples ``x0``.

    ``weighting="eps"`` is the usual eps-prediction MSE written in x0 terms:
    ``|eps_pred - eps|^2 = a/(1-a) * |x0_pred - x0|^2``; ``"x0"`` is the plain x0 MSE."""
    err = (x0_pred.float() - x0.detach().float()) ** 2
    if weighting == "x0":
        return err.mean()
    if weighting != "eps":
        raise ValueError(f"unknown weighting {weighting!r}")
    a = _per_sample(alphas_cumprod, t, err)
    return (a / (1 - a) * err).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(fake))``: low when the head calls fakes real."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``softplus(-D(real)) + softplus(D(fake))``: the logistic loss of a real/fake classifier."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def regression_loss(x0_pred: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """The warm start's regression of the generator onto the teacher's deterministic sample
    from the same noise: plain MSE in latent space (the reference uses LPIPS on decoded
    images; latents keep the loss model-agnostic and free of a VAE in the loop)."""
    return F.mse_loss(x0_pred.float(), x0_teacher.detach().float())
