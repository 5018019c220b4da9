"""Label Studio result regions from masks: brush RLE and traced polygons."""

from __future__ import annotations

import uuid
from collections import defaultdict

import numpy as np
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from .label_config import LabelControl

# Polygons are traced on a copy at most this many pixels on a side: plenty for
# an outline an annotator will adjust, and it bounds the work per image.
POLYGON_GRID = 256


def brush_region(control: LabelControl, label: str, mask: np.ndarray, score: float) -> dict:
    """One ``brushlabels`` result: the mask as Label Studio's RLE at the image's own size."""
    height, width = mask.shape
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]},
        "score": round(float(score), 4),
    }


def polygon_regions(control: LabelControl, label: str, mask: np.ndarray, score: float) -> list[dict]:
    """``polygonlabels`` results, one per region of the mask, in percent of the image size."""
    height, width = mask.shape
    regions = []
    for polygon in trace_polygons(mask):
        points = [[round(float(x) * 100, 3), round(float(y) * 100, 3)] for x, y in polygon]
        regions.append(
            {
                "id": uuid.uuid4().hex[:10],
                "from_name": control.from_name,
                "to_name": control.to_name,
                "type": "polygonlabels",
                "original_width": int(width),
                "original_height": int(height),
                "image_rotation": 0,
                "value": {"points": points, "closed": True, "polygonlabels": [label]},
                "score": round(float(score), 4),
            }
        )
    return regions


def trace_polygons(mask: np.ndarray, min_area: float = 0.0005, tolerance: float = 0.75) -> list[np.ndarray]:
    """Outer outlines of a mask's regions as ``[N, 2]`` (x, y) arrays in fractions of width and height.

    Regions smaller than ``min_area`` of the image are skipped; outlines are
    simplified to within ``tolerance`` grid cells. Holes are not represented
    (Label Studio polygons have none).
    """
    height, width = mask.shape
    scale = max(height, width) / POLYGON_GRID
    if scale > 1:
        size = (max(1, round(width / scale)), max(1, round(height / scale)))
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR)) >= 128
    else:
        small = mask.astype(bool)
    grid_h, grid_w = small.shape
    polygons = []
    for loop in _boundary_loops(small):
        area = _signed_area(loop)
        if area <= 0 or area < min_area * grid_h * grid_w:
            continue  # holes run the other way round; specks are noise
        simplified = _simplify(loop, tolerance)
        if len(simplified) >= 3:
            polygons.append(simplified / np.array([grid_w, grid_h], dtype=np.float64))
    return polygons


def _boundary_loops(grid: np.ndarray) -> list[np.ndarray]:
    """Closed loops along pixel edges between inside and outside, inside on the right of travel.

    Outer outlines come out with positive shoelace area (y pointing down), holes negative.
    """
    padded = np.pad(grid, 1)
    inside = padded[1:-1, 1:-1]
    rows, cols = np.nonzero(inside & ~padded[:-2, 1:-1])  # top edges: left to right
    starts = [np.stack([cols, rows], 1)]
    ends = [np.stack([cols + 1, rows], 1)]
    rows, cols = np.nonzero(inside & ~padded[1:-1, 2:])  # right edges: downwards
    starts.append(np.stack([cols + 1, rows], 1))
    ends.append(np.stack([cols + 1, rows + 1], 1))
    rows, cols = np.nonzero(inside & ~padded[2:, 1:-1])  # bottom edges: right to left
    starts.append(np.stack([cols + 1, rows + 1], 1))
    ends.append(np.stack([cols, rows + 1], 1))
    rows, cols = np.nonzero(inside & ~padded[1:-1, :-2])  # left edges: upwards
    starts.append(np.stack([cols, rows + 1], 1))
    ends.append(np.stack([cols, rows], 1))

    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for start, end in zip(np.concatenate(starts).tolist(), np.concatenate(ends).tolist()):
        outgoing[tuple(start)].append(tuple(end))

    loops = []
    while outgoing:
        first = next(iter(outgoing))
        loop = [first]
        previous, current = None, first
        while True:
            choices = outgoing[current]
            following = choices.pop(_turn_right(previous, current, choices)) if len(choices) > 1 else choices.pop()
            if not choices:
                del outgoing[current]
            if following == first:
                break
            loop.append(following)
            previous, current = current, following
        loops.append(np.array(loop, dtype=np.float64))
    return loops


def _turn_right(previous, current, choices) -> int:
    """Where two regions touch at a corner, keep to the region being traced (turn right)."""
    if previous is None:
        return 0
    dx, dy = current[0] - previous[0], current[1] - previous[1]
    right = (current[0] - dy, current[1] + dx)  # rotate the heading clockwise (y down)
    return choices.index(right) if right in choices else 0


def _signed_area(loop: np.ndarray) -> float:
    x, y = loop[:, 0], loop[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _simplify(loop: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed loop, split at its two mutually far points."""
    far = int(np.argmax(((loop - loop[0]) ** 2).sum(1)))
    first = _douglas_peucker(loop[: far + 1], tolerance)
    second = _douglas_peucker(np.vstack([loop[far:], loop[:1]]), tolerance)
    return np.vstack([first[:-1], second[:-1]])


def _douglas_peucker(points: np.ndarray, tolerance: float) -> np.ndarray:
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        lo, hi = stack.pop()
        if hi - lo < 2:
            continue
        start, end = points[lo], points[hi]
        segment = end - start
        length = np.hypot(*segment)
        middle = points[lo + 1 : hi] - start
        if length == 0:
            distance = np.hypot(middle[:, 0], middle[:, 1])
        else:
            distance = np.abs(segment[0] * middle[:, 1] - segment[1] * middle[:, 0]) / length
        worst = int(np.argmax(distance))
        if distance[worst] > tolerance:
            split = lo + 1 + worst
            keep[split] = True
            stack += [(lo, split), (split, hi)]
    return points[keep]
