"""The DMD2 losses, one function each.

Every score network is used through its x0 prediction; the noise arithmetic and the
conversions of a network's output (eps, v, x0) to x0 and back belong to the base model's
family (``bases.Family``: ``add_noise``, ``to_x0``, ``from_x0``, ``output_weight``), so
nothing here divides by alpha (docs/training.md, "Prediction types").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bases import PREDICTIONS, Family


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
    family: Family,
    weighting: str = "native",
) -> torch.Tensor:
    """Denoising loss of the fake score on (detached) generated samples ``x0``, written in x0.

    ``weighting`` names the parameterization whose output MSE it equals at a fixed x_t:
    ``"native"`` the family's own (the teacher's), ``"eps"``: ``a/(1-a) * |x0_pred - x0|^2``,
    ``"v"``: ``1/(1-a) * |x0_pred - x0|^2``, ``"x0"``: the plain x0 MSE (``a`` = abar_t).
    The weight is ``family.output_weight``'s squared: finite at zero terminal SNR."""
    if weighting == "native":
        weighting = family.prediction
    if weighting not in PREDICTIONS:
        raise ValueError(f"unknown weighting {weighting!r}")
    err = (x0_pred.float() - x0.detach().float()) ** 2
    if weighting == "x0":
        return err.mean()
    a, s = family.process.coefficients(t.detach())  # float64: 1 - abar near t = 0 loses digits in float32
    weight = (PREDICTIONS[weighting].weight(a, s) ** 2).to(err).reshape(-1, *([1] * (err.dim() - 1)))
    return (weight * err).mean()


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
