"""The finetune scenario (#23): a community finetune of the digits teacher, in a new style.

What people do with a finetuned SDXL checkpoint today is put the released DMD2 4-step LoRA
on it; the pack's point is that a LoRA distilled from the finetune itself does better. At
digits scale: the base teacher's weights are trained further with plain DDPM, as long as the
base was trained, on the digits written mirrored (``STYLES``), the "release LoRA" is the
base teacher's 4-step student, and the distance is measured against the mirrored digits in a
feature space trained on held-out mirrored digits. docs/digits.md says why this style: of
the styles tried, it is the one on which the release LoRA stops working as well as the
finetune's own 4 DDIM steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .data import DigitsData
from .teacher import DigitsDenoiser, train_teacher


def mirror(x: torch.Tensor) -> torch.Tensor:
    """Every digit written mirrored (left-right): a style of the same ten classes."""
    return x.flip(-1)


def bold(x: torch.Tensor, strength: float = 0.5) -> torch.Tensor:
    """Images in [-1, 1] redrawn with a bolder pen: each pixel's ink becomes at least
    ``strength`` x the darkest of its four neighbours (the shift tried first: the release
    LoRA transfers to it, docs/digits.md)."""
    ink = (x + 1) / 2
    pad = F.pad(ink, (1, 1, 1, 1))
    neighbours = torch.stack([pad[..., 1:-1, :-2], pad[..., 1:-1, 2:], pad[..., :-2, 1:-1], pad[..., 2:, 1:-1]]).amax(0)
    return torch.maximum(ink, strength * neighbours) * 2 - 1


STYLES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"mirror": mirror, "bold": bold}
STYLE = "mirror"  # the demo's finetune


def shifted_data(data: DigitsData, style: str = STYLE) -> DigitsData:
    """The same splits, every image in the finetune's style: ``train`` is what the finetune
    trains on (and the students' real images), ``heldout`` trains its feature space."""
    shift = STYLES[style]
    return DigitsData(shift(data.train_x), data.train_y, shift(data.heldout_x), data.heldout_y, shift(data.unseen_x), data.unseen_y)


def finetune_teacher(
    base: DigitsDenoiser,
    data: DigitsData,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> DigitsDenoiser:
    """The base teacher's weights trained further with plain DDPM on ``data`` (already
    shifted), as a community finetune is (by default as long as the base's own training);
    the base is left untouched."""
    return train_teacher(data, steps=steps, batch_size=batch_size, lr=lr, seed=seed + 1, progress=progress, init=base)
