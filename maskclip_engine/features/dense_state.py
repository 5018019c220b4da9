"""One image's dense state on its feature grid: what smart-tool gestures are answered from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Point = tuple[float, float]  # (x, y) in pixels of the original image


@dataclass(frozen=True)
class DenseState:
    """One image's dense state on its feature grid; shared by segmentation and interactions.

    ``features`` ``[D, h, w]`` (CLIP joint space), ``keys`` ``[K, h, w]``,
    ``probs`` ``[C, h, w]`` (refined label probabilities for ``labels``), all
    float32 on the CPU. Features and keys are stored L2-normalised per location
    (only their directions matter here, and every gesture would otherwise
    normalise them again). ``image_size`` is the original
    ``(height, width)``; the grid covers the whole image, resized to
    ``(h * stride, w * stride)``.
    """

    features: torch.Tensor
    keys: torch.Tensor
    probs: torch.Tensor
    labels: tuple[str, ...]
    image_size: tuple[int, int]
    stride: int

    neighbours: torch.Tensor | None = None  # [9, h, w] key cosine to each 3x3 neighbour; computed if not given

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", F.normalize(self.features.float(), dim=0))
        object.__setattr__(self, "keys", F.normalize(self.keys.float(), dim=0))
        if self.neighbours is None:
            object.__setattr__(self, "neighbours", neighbour_similarity(self.keys))

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.features.shape[1]), int(self.features.shape[2])

    def cell(self, point: Point) -> tuple[int, int]:
        """The grid cell ``(row, col)`` that holds an image pixel ``(x, y)`` (clamped to the image)."""
        height, width = self.image_size
        rows, cols = self.grid
        x, y = point
        col = int(np.clip(np.floor(x / width * cols), 0, cols - 1))
        row = int(np.clip(np.floor(y / height * rows), 0, rows - 1))
        return row, col


def neighbour_similarity(keys: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Cosine ``[S, h, w]`` of each location's key with its neighbour's at each of the ``S = (2r+1)^2``
    offsets (row-major, the location itself in the middle); ``-inf`` where the neighbour is off the grid.

    It depends on the image alone, so a :class:`DenseState` computes it once.
    """
    _, rows, cols = keys.shape
    unit = F.normalize(keys.float(), dim=0)
    padded = F.pad(unit, (radius, radius, radius, radius))
    inside = F.pad(torch.ones(rows, cols, dtype=torch.bool), (radius, radius, radius, radius))
    out = []
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            window = (slice(dy, dy + rows), slice(dx, dx + cols))
            similarity = (unit * padded[(slice(None), *window)]).sum(0)
            out.append(similarity.masked_fill(~inside[window], float("-inf")))
    return torch.stack(out)
