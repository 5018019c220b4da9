"""Synthetic scenes with known masks: coloured shapes on textured backgrounds."""

from __future__ import annotations

import numpy as np

CLASSES = ["ground", "red disc", "blue box"]


def make_scene(seed: int, height: int = 128, width: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """An ``HxWx3 uint8`` image and its ``HxW`` label map (indices into CLASSES)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = rng.uniform(90, 150, 3)
    texture = rng.normal(0, 18, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    image = base + texture + rng.normal(0, 6, (height, width, 3))
    labels = np.zeros((height, width), dtype=np.int64)

    radius = rng.uniform(0.12, 0.22) * min(height, width)
    cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    image[disc] = np.array([210, 40, 40]) + rng.normal(0, 10, (disc.sum(), 3))
    labels[disc] = 1

    bh, bw = (rng.uniform(0.2, 0.35, 2) * [height, width]).astype(int)
    top, left = rng.integers(0, height - bh), rng.integers(0, width - bw)
    box = np.zeros_like(disc)
    box[top : top + bh, left : left + bw] = True
    box &= ~disc
    image[box] = np.array([40, 60, 210]) + rng.normal(0, 10, (box.sum(), 3))
    labels[box] = 2
    return image.clip(0, 255).astype(np.uint8), labels


def noisy(labels: np.ndarray, fraction: float, seed: int, num_classes: int = 3) -> np.ndarray:
    """``labels`` with about ``fraction`` of pixels relabelled at random, in blobs."""
    rng = np.random.default_rng(seed)
    height, width = labels.shape
    out = labels.copy()
    changed = np.zeros_like(labels, dtype=bool)
    yy, xx = np.mgrid[:height, :width]
    while changed.mean() < fraction:
        radius = rng.uniform(4, 14)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2) & ~changed
        out[blob] = rng.integers(0, num_classes)
        changed |= blob
    return out
