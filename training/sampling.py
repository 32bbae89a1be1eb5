"""The two samplers the trainer needs, on any x0 predictor of a family's forward process.

``dmd2_sample`` is the student's sampler (the pack's node does the same in ComfyUI's
sigma terms): unit noise fed at the first timestep, predict x0, re-noise with fresh noise to
the next timestep. ``ddim_sample`` is the teacher's deterministic sampler, used for the
regression warm start and by the digits demo's teacher rows. Both step through x0 and the
family's ``add_noise``/``eps_from_x0`` (never dividing by alpha, so zero terminal SNR's
first step at alpha = 0 is finite whatever the network predicts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..bases import Family

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> x0


def _full(value: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), int(value), dtype=torch.long, device=like.device)


def ddim_sample(x0_fn: X0Fn, noise: torch.Tensor, timesteps: Sequence[int], family: Family) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from ``noise`` taken as x at ``timesteps[0]``; returns x0
    (``family.trailing_timesteps(n)``: the usual n-step list)."""
    x = noise
    for i, step in enumerate(timesteps):
        t = _full(step, x)
        x0 = x0_fn(x, t)
        if i + 1 == len(timesteps):
            return x0
        x = family.add_noise(x0, family.eps_from_x0(x, x0, t), _full(timesteps[i + 1], x))
    raise ValueError("timesteps must not be empty")


def dmd2_sample(x0_fn: X0Fn, noises: Sequence[torch.Tensor], timesteps: Sequence[int], family: Family) -> torch.Tensor:
    """DMD2's sampler: ``noises[0]`` (unit variance) is fed at ``timesteps[0]``; after each
    x0 prediction the next ``noises[i]`` re-noises it to ``timesteps[i]``. Returns x0."""
    if len(noises) < len(timesteps) or not timesteps:
        raise ValueError("one noise tensor per timestep is needed")
    x = noises[0]
    for i, step in enumerate(timesteps):
        x0 = x0_fn(x, _full(step, x))
        if i + 1 < len(timesteps):
            x = family.add_noise(x0, noises[i + 1], _full(timesteps[i + 1], x))
    return x0
