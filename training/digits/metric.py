"""The demo's distance: Fréchet distance in a held-out classifier's feature space.

Features: the 16-d penultimate layer of a small MLP trained on 400 digits nothing else uses.
Every model row is compared with all other real digits; the real-vs-real floor comes from
disjoint real subsets (``real_floor``). docs/digits.md says why it is built this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import NUM_CLASSES, SIDE, DigitsData


class FeatureSpace(torch.nn.Module):
    """A small MLP classifier; its penultimate layer is the feature space of the distance."""

    def __init__(self, features: int = 16):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(SIDE * SIDE, 128), torch.nn.SiLU(), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, features), torch.nn.SiLU(),
        )
        self.classify = torch.nn.Linear(features, NUM_CLASSES)

    def forward(self, x):
        return self.classify(self.body(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self.body(x.clamp(-1, 1)).double()


def train_feature_space(x: torch.Tensor, y: torch.Tensor, steps: int = 1500, seed: int = 0) -> FeatureSpace:
    torch.manual_seed(seed)
    net = FeatureSpace()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=g)
        # light noise augmentation keeps the features smooth around the data
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)
        loss = F.cross_entropy(net(xb), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between fitted Gaussians."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))

    def sqrtm(m):
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    root_a = sqrtm(s_a)
    cross = sqrtm(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross))


def classifier_accuracy(space: FeatureSpace, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        space.eval()
        return float((space(x.clamp(-1, 1)).argmax(1) == y).float().mean())


def reference_pool(data: DigitsData) -> torch.Tensor:
    """The distance's real images: every digit the feature classifier did not see (``train``
    + ``unseen``, 1397 images). Every model row is compared to all of them."""
    return torch.cat([data.train_x, data.unseen_x])


def real_floor(pool_features: torch.Tensor, model_samples: int, seed: int = 0, splits: int = 8) -> dict[str, float]:
    """The real-vs-real floor, from disjoint subsets of the pool.

    Two disjoint real sets cannot both be as large as a model row (``model_samples`` against
    the whole pool), so the floor is measured on halves (``halves``: n/2 vs n/2) and brought to
    the model rows' sample sizes (``matched``). Between two samples of one distribution the
    Fréchet distance is pure estimator bias, to first order c (1/n1 + 1/n2); c is fitted by
    least squares over ``splits`` random disjoint pairs at each of four sizes."""
    n = len(pool_features)
    g = torch.Generator().manual_seed(2000 + seed)
    h, fd, halves = [], [], []
    for m in (n // 8, n // 4, 3 * n // 8, n // 2):
        for _ in range(splits):
            order = torch.randperm(n, generator=g)
            value = frechet_distance(pool_features[order[:m]], pool_features[order[m : 2 * m]])
            h.append(2 / m)
            fd.append(value)
            if m == n // 2:
                halves.append(value)
    c = float(np.dot(h, fd) / np.dot(h, h))
    return {"halves": float(np.mean(halves)), "half_size": n // 2, "c": c, "matched": c * (1 / model_samples + 1 / n)}


def summarize(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": [float(v) for v in arr]}
