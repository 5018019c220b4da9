"""Pixel-adaptive refinement (PAMR): class maps that follow the image's colour edges.

MaskCLIP predicts on a 1/16 grid, so upsampled masks have blobby edges that do
not sit on the object's outline. PAMR (Araslanov and Roth, CVPR 2020) moves
them there: each pixel's class scores become a weighted average of its
neighbours' scores, the weights coming from colour similarity, and repeating
the step lets scores flow along regions of like colour but not across edges.

* Neighbours: the 8 pixels at distance ``d`` (horizontally, vertically,
  diagonally) for each dilation ``d``, so both fine detail and wider context count.
* Affinity of pixel ``i`` to neighbour ``j``: ``-|x_i - x_j| / (t * s_i)``
  averaged over colour channels, ``s_i`` the colour spread (standard deviation)
  of ``i``'s neighbourhood, so the weights adapt to local contrast; a softmax
  over the neighbours makes them sum to one.
* The update is linear and per class, so it works on probabilities and on any
  other per-class scores alike, and classes can be refined in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskclip_engine.head.refinement import Refined

DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
ITERATIONS = 10
TEMPERATURE = 0.1
# Class maps are refined this many class-pixels at a time, bounding memory for many labels.
_CHUNK_BUDGET = 1 << 24


@dataclass(frozen=True)
class Affinity:
    """Normalised weights ``[K, H, W]`` of each pixel's ``K`` neighbours at ``offsets`` (dy, dx)."""

    weights: torch.Tensor
    offsets: tuple[tuple[int, int], ...]

    @property
    def reach(self) -> int:
        return max(max(abs(dy), abs(dx)) for dy, dx in self.offsets)


def _neighbour_offsets(dilations: Sequence[int]) -> tuple[tuple[int, int], ...]:
    if not dilations or any(int(d) <= 0 for d in dilations):
        raise ValueError(f"dilations must be positive integers, got {tuple(dilations)!r}")
    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return tuple((dy * int(d), dx * int(d)) for d in dilations for dy, dx in ring)


def _shifted(padded: torch.Tensor, reach: int, offset: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """The view of an edge-padded ``[..., H + 2r, W + 2r]`` tensor that puts each pixel's neighbour at ``offset``."""
    dy, dx = offset
    return padded[..., reach + dy : reach + dy + height, reach + dx : reach + dx + width]


def colour_affinities(
    image: torch.Tensor, dilations: Sequence[int] = DILATIONS, temperature: float = TEMPERATURE
) -> Affinity:
    """Neighbour weights from an image ``[3, H, W]`` (any per-channel scale: RGB or model-normalised).

    Pixels past the border repeat the edge pixel, so border pixels weigh
    their own colour for the missing neighbours.
    """
    offsets = _neighbour_offsets(dilations)
    image = image.float()
    height, width = image.shape[-2:]
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(image[None], (reach, reach, reach, reach), mode="replicate")[0]
    # The neighbourhood's colour spread, in one pass of sums so no [K, 3, H, W] tensor is held.
    total = torch.zeros_like(image)
    squares = torch.zeros_like(image)
    for offset in offsets:
        neighbour = _shifted(padded, reach, offset, height, width)
        total += neighbour
        squares += neighbour * neighbour
    mean = total / len(offsets)
    spread = (squares / len(offsets) - mean * mean).clamp_min(0).sqrt()
    scale = temperature * spread + 1e-8
    logits = torch.stack(
        [-((_shifted(padded, reach, o, height, width) - image).abs() / scale).mean(dim=0) for o in offsets]
    )
    return Affinity(torch.softmax(logits, dim=0), offsets)


def propagate(maps: torch.Tensor, affinity: Affinity, iterations: int = ITERATIONS) -> torch.Tensor:
    """``iterations`` steps of ``m_i <- sum_j a_ij m_j`` on class maps ``[C, H, W]``."""
    if maps.shape[0] == 0 or iterations <= 0:
        return maps
    height, width = maps.shape[-2:]
    if tuple(affinity.weights.shape[-2:]) != (height, width):
        raise ValueError(f"maps are {height}x{width} but the affinities {tuple(affinity.weights.shape[-2:])}")
    reach = affinity.reach
    step = max(1, _CHUNK_BUDGET // (height * width))
    chunks = []
    for start in range(0, maps.shape[0], step):
        current = maps[start : start + step].float()
        for _ in range(iterations):
            padded = F.pad(current[None], (reach, reach, reach, reach), mode="replicate")[0]
            following = torch.zeros_like(current)
            for weight, offset in zip(affinity.weights, affinity.offsets):
                following.addcmul_(weight, _shifted(padded, reach, offset, height, width))
            current = following
        chunks.append(current)
    return torch.cat(chunks)


def pamr(
    maps: torch.Tensor,
    image: torch.Tensor,
    iterations: int = ITERATIONS,
    dilations: Sequence[int] = DILATIONS,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """Class maps ``[C, H, W]`` refined against the image ``[3, H, W]`` of the same size."""
    return propagate(maps, colour_affinities(image, dilations, temperature), iterations)


def refine_against_image(refined: Refined, image: torch.Tensor, iterations: int, stride: int) -> Refined:
    """PAMR on a refinement's kept classes, against ``image`` ``[3, H, W]`` (the resized model input).

    The class maps (probabilities, and the label scores when they differ) are
    resized to a grid of ``stride`` image pixels per cell, refined there, and
    returned at that size with one row per kept class; the image is
    area-averaged onto the same grid. Both maps move with the same weights, so
    labels and confidences stay consistent.
    """
    height, width = image.shape[-2:]
    size = (max(1, height // stride), max(1, width // stride))
    small = F.interpolate(image[None].float(), size=size, mode="area")[0]
    affinity = colour_affinities(small)
    index = torch.nonzero(refined.kept).flatten()

    def moved(maps: torch.Tensor) -> torch.Tensor:
        rows = maps if maps.shape[0] == len(index) else maps[index]
        resized = F.interpolate(rows[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return propagate(resized[0], affinity, iterations)

    scores = None if refined.scores is None else moved(refined.scores)
    return Refined(probs=moved(refined.probs), kept=refined.kept, scores=scores)
