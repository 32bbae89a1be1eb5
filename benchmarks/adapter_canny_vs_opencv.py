"""Compare ComfyUI's kornia Canny with the recipe's OpenCV Canny(100, 200) on real photos.

The recipe (controlnet_aux CannyDetector): resize the shorter side to 384 (sides rounded to
multiples of 64, INTER_AREA), cv2.Canny on the RGB image with thresholds 100/200. Here the
same resized image goes through kornia's canny at a grid of thresholds; agreement is the F1
score of edge pixels with a 1-pixel tolerance. Needs opencv-python-headless, which is not a pack dependency; install it aside, e.g.
    pip install --target /tmp/cv2lib --no-deps opencv-python-headless
    PYTHONPATH=/tmp/cv2lib .venv/bin/python benchmarks/adapter_canny_vs_opencv.py
The pack's DMD2CannyEdgeMap defaults (0.1/0.2) come from this table (docs/adapter.md).
"""
import sys
import time

import numpy as np
import torch
from kornia.filters import canny
from sklearn.datasets import load_sample_image

try:
    import cv2
except ImportError:
    sys.exit("needs OpenCV (opencv-python-headless); see the module docstring")


def recipe_resize(img, resolution=384):
    h, w = img.shape[:2]
    k = resolution / min(h, w)
    H, W = int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64
    return cv2.resize(img, (W, H), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def f1(a, b):
    """Edge agreement with 1 px tolerance: precision of a against dilated b and vice versa."""
    kernel = np.ones((3, 3), np.uint8)
    da, db = cv2.dilate(a, kernel), cv2.dilate(b, kernel)
    precision = (a & db).sum() / max(a.sum(), 1)
    recall = (b & da).sum() / max(b.sum(), 1)
    return 2 * precision * recall / max(precision + recall, 1e-9), a.mean(), b.mean()


def median_seconds(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def kornia_edges(img, low, high):
    x = torch.from_numpy(img).float().div(255).permute(2, 0, 1)[None]
    return (canny(x, low, high)[1][0, 0].numpy() > 0.5).astype(np.uint8)


images = {name: recipe_resize(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")}
references = {name: (cv2.Canny(img, 100, 200) > 0).astype(np.uint8) for name, img in images.items()}
grid = [(0.4, 0.8), (0.05, 0.1), (0.08, 0.16), (0.09, 0.18), (0.1, 0.2), (0.11, 0.22), (0.12, 0.24), (0.15, 0.3), (0.1, 0.25)]
print(f"{'low':>5} {'high':>5} " + " ".join(f"{n:>26}" for n in images))
for low, high in grid:
    cells = []
    for name, img in images.items():
        score, ours, ref = f1(kornia_edges(img, low, high), references[name])
        cells.append(f"F1 {score:.3f} px {ours:.3f}/{ref:.3f}")
    print(f"{low:5.2f} {high:5.2f} " + " ".join(f"{c:>26}" for c in cells))
# OpenCV against itself with a 2 px blur first (how much of the gap is kornia's Gaussian blur)
for name, img in images.items():
    blurred = cv2.GaussianBlur(img, (5, 5), 1.0)
    score, *_ = f1((cv2.Canny(blurred, 100, 200) > 0).astype(np.uint8), references[name])
    tk = median_seconds(lambda img=img: kornia_edges(img, 0.1, 0.2))
    tc = median_seconds(lambda img=img: cv2.Canny(img, 100, 200))
    print(f"{name} {img.shape[1]}x{img.shape[0]}: cv2 with 5x5 sigma-1 blur vs recipe F1 {score:.3f}; "
          f"median time kornia {tk*1e3:.1f} ms, cv2 {tc*1e3:.1f} ms ({torch.get_num_threads()} torch threads)")
