"""The two samplers the trainer needs, on any x0 predictor (DDPM timesteps, VP noise).

``dmd2_sample`` is the student's sampler (the pack's node does the same in ComfyUI's
sigma terms): unit noise fed at the first timestep, predict x0, re-noise with fresh noise to
the next timestep. ``ddim_sample`` is the teacher's deterministic sampler, used for the
regression warm start and by the digits demo's teacher rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .losses import add_noise, eps_from_x0

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> x0


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced from the last timestep ("trailing"): 4 -> 999, 749, 499, 249; 1 -> 999."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    last = num_train_timesteps - 1
    return [round(last - i * num_train_timesteps / steps) for i in range(steps)]


def _full(value: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), int(value), dtype=torch.long, device=like.device)


def ddim_sample(x0_fn: X0Fn, noise: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from ``noise`` taken as x at ``timesteps[0]``; returns x0."""
    x = noise
    for i, step in enumerate(timesteps):
        t = _full(step, x)
        x0 = x0_fn(x, t)
        if i + 1 == len(timesteps):
            return x0
        x = add_noise(x0, eps_from_x0(x, x0, t, alphas_cumprod), _full(timesteps[i + 1], x), alphas_cumprod)
    raise ValueError("timesteps must not be empty")


def dmd2_sample(x0_fn: X0Fn, noises: Sequence[torch.Tensor], timesteps: Sequence[int], alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DMD2's sampler: ``noises[0]`` (unit variance) is fed at ``timesteps[0]``; after each
    x0 prediction the next ``noises[i]`` re-noises it to ``timesteps[i]``. Returns x0."""
    if len(noises) < len(timesteps) or not timesteps:
        raise ValueError("one noise tensor per timestep is needed")
    x = noises[0]
    for i, step in enumerate(timesteps):
        x0 = x0_fn(x, _full(step, x))
        if i + 1 < len(timesteps):
            x = add_noise(x0, noises[i + 1], _full(timesteps[i + 1], x), alphas_cumprod)
    return x0
