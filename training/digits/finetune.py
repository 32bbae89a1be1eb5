"""The finetune scenario (#23): a community finetune of the digits teacher, in a new style.

What people do with a finetuned SDXL checkpoint today is put the released DMD2 4-step LoRA
on it; the pack's point is that a LoRA distilled from the finetune itself does better. At
digits scale: the base teacher's weights are trained further with plain DDPM on the digits
drawn with a bold pen (``bold``: every stroke thickened into its four neighbours), the
"release LoRA" is the base teacher's 4-step student, and the distance is measured against
the bold digits in a feature space trained on held-out bold digits (docs/digits.md says why
this shift and this strength).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .data import DigitsData
from .teacher import DigitsDenoiser, train_teacher

# How far the bold pen spreads ink into the four neighbours (0: no change, 1: every
# neighbour as dark as the stroke). Chosen from the teacher rows before any student trained
# (docs/digits.md, "The finetune scenario").
SHIFT = 0.5


def bold(x: torch.Tensor, strength: float = SHIFT) -> torch.Tensor:
    """Images in [-1, 1] redrawn with a bolder pen: each pixel's ink becomes at least
    ``strength`` x the darkest of its four neighbours. A style (stroke width), not new classes:
    every digit keeps its label and shape."""
    ink = (x + 1) / 2
    pad = F.pad(ink, (1, 1, 1, 1))
    neighbours = torch.stack([pad[..., 1:-1, :-2], pad[..., 1:-1, 2:], pad[..., :-2, 1:-1], pad[..., 2:, 1:-1]]).amax(0)
    return torch.maximum(ink, strength * neighbours) * 2 - 1


def shifted_data(data: DigitsData, strength: float = SHIFT) -> DigitsData:
    """The same splits, every image in the finetune's style: ``train`` is what the finetune
    trains on (and the students' real images), ``heldout`` trains its feature space."""
    return DigitsData(bold(data.train_x, strength), data.train_y, bold(data.heldout_x, strength), data.heldout_y,
                      bold(data.unseen_x, strength), data.unseen_y)


def finetune_teacher(
    base: DigitsDenoiser,
    data: DigitsData,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> DigitsDenoiser:
    """The base teacher's weights trained further with plain DDPM on ``data`` (already
    shifted), as a community finetune is; the base is left untouched."""
    return train_teacher(data, steps=steps, batch_size=batch_size, lr=lr, seed=seed + 1, progress=progress, init=base)
