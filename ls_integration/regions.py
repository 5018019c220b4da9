"""Label Studio result regions from masks: brush RLE and traced polygons."""

from __future__ import annotations

import uuid

import cv2
import numpy as np

from .label_config import LabelControl
from .rle import encode_mask

# Masks up to this many pixels are traced at twice their resolution (see trace_polygons); larger ones
# have larger regions (specks under min_area are dropped), where the stair-step cuts matter less.
_UPSCALE_PIXELS = 1_000_000


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
        "value": {"format": "rle", "rle": encode_mask(mask), "brushlabels": [label]},
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


def trace_polygons(mask: np.ndarray, min_area: float = 0.0005, tolerance: float = 0.5) -> list[np.ndarray]:
    """Outer outlines of a mask's regions as ``[N, 2]`` (x, y) arrays in fractions of width and height.

    Outlines run along pixel edges (not through boundary pixel centres, which
    would shave half a pixel off every side), holes are filled (Label Studio
    polygons have none) and regions inside a hole are covered by the outline
    around them. Regions smaller than ``min_area`` of the image are skipped;
    outlines are simplified to within ``tolerance`` pixels, scaled up with the
    image past 1024 pixels on the long side so large images do not yield
    thousands of vertices.
    """
    height, width = mask.shape
    grid = mask.astype(np.uint8)
    # Traced on a 2x copy where that is cheap: a contour cuts each one-pixel stair
    # step diagonally, and at twice the resolution those cuts cost a quarter as much.
    scale = 2 if height * width <= _UPSCALE_PIXELS else 1
    if scale > 1:
        grid = cv2.resize(grid, (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)
    # A pixel corner is inside when any of the four pixels around it is: the outer
    # contour of this (H+1)x(W+1) grid passes through the mask's outer pixel corners.
    padded = np.pad(grid.astype(bool), 1)
    corners = padded[:-1, :-1] | padded[:-1, 1:] | padded[1:, :-1] | padded[1:, 1:]
    contours, _ = cv2.findContours(corners.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    epsilon = scale * tolerance * max(1.0, max(height, width) / 1024)
    size = np.array([width * scale, height * scale], dtype=np.float64)
    polygons = []
    for contour in contours:
        if cv2.contourArea(contour) < min_area * height * width * scale**2:
            continue  # specks are noise
        simplified = cv2.approxPolyDP(contour, epsilon, True)[:, 0, :].astype(np.float64)
        if len(simplified) >= 3:
            polygons.append(simplified / size)
    return polygons
