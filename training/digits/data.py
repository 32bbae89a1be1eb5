"""scikit-learn's 8x8 handwritten digits, split three ways, as the demo's data.

scikit-learn is needed only for its bundled data set (a test/demo dependency).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the unconditional "class" for classifier-free guidance
SIDE = 8


@dataclass
class DigitsData:
    """Images in [-1, 1], shape (N, 1, 8, 8); labels (N,), in three disjoint splits:
    ``train`` (the teacher's data), ``heldout`` (trains the feature classifier, nothing else)
    and ``unseen`` (real images no model trained on). ``train`` + ``unseen`` is the distance's
    real reference (``reference_pool``)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    heldout_x: torch.Tensor
    heldout_y: torch.Tensor
    unseen_x: torch.Tensor
    unseen_y: torch.Tensor


def load_digits_data(heldout: int = 400, unseen: int = 397, seed: int = 0) -> DigitsData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is a test/demo dependency only
        raise ImportError(
            "The digits demo needs scikit-learn for its bundled handwritten-digits data set: pip install scikit-learn"
        ) from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    cut = heldout + unseen
    return DigitsData(images[cut:], labels[cut:], images[:heldout], labels[:heldout], images[heldout:cut], labels[heldout:cut])


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    """Class labels (NULL_CLASS = unconditional) -> the UNet's adm vector."""
    return F.one_hot(labels.long(), NUM_CLASSES + 1).float()


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES
