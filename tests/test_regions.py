"""Polygons from masks: rasterised back, they cover the mask (holes filled) on generated blobs."""

from __future__ import annotations

import numpy as np
import pytest

from ls_integration.label_config import LabelControl
from ls_integration.regions import polygon_regions, trace_polygons


def _inside(polygon: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points (x, y) lie inside the closed ``polygon`` [N, 2]."""
    result = np.zeros(x.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(polygon, np.roll(polygon, -1, axis=0)):
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        result ^= crosses & (x < at)
    return result


def rasterise(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside any polygon (given in fractions of width and height)."""
    yy, xx = np.mgrid[:height, :width] + 0.5
    out = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        out |= _inside(polygon * [width, height], xx, yy)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every background pixel not 4-connected to the image border."""
    outside = np.zeros_like(mask)
    outside[[0, -1], :] = ~mask[[0, -1], :]
    outside[:, [0, -1]] |= ~mask[:, [0, -1]]
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~mask
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def _disc(yy, xx, cy, cx, r):
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def blobs(seed: int) -> np.ndarray:
    """A 150x200 mask of a few random shapes: discs, ellipses, a ring, a box with a hole, a wobbly blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:150, :200].astype(np.float64)
    mask = np.zeros((150, 200), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(20, 130), rng.uniform(20, 180)
        kind = rng.integers(0, 4)
        if kind == 0:
            mask |= _disc(yy, xx, cy, cx, rng.uniform(8, 25))
        elif kind == 1:  # a ring: a disc with a hole
            outer = rng.uniform(14, 30)
            mask |= _disc(yy, xx, cy, cx, outer) & ~_disc(yy, xx, cy, cx, outer * rng.uniform(0.3, 0.6))
        elif kind == 2:  # a rotated ellipse
            a, b, t = rng.uniform(10, 35), rng.uniform(6, 15), rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
            v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
            mask |= (u / a) ** 2 + (v / b) ** 2 < 1
        else:  # a wobbly star-like blob
            angle = np.arctan2(yy - cy, xx - cx)
            radius = rng.uniform(12, 25) * (1 + 0.25 * np.sin(rng.integers(3, 6) * angle + rng.uniform(0, 6)))
            mask |= np.hypot(yy - cy, xx - cx) < radius
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("seed", range(12))
def test_rasterised_polygons_match_the_filled_mask(seed: int) -> None:
    mask = blobs(seed)
    polygons = trace_polygons(mask)
    assert polygons and all(p.shape[1] == 2 and len(p) >= 3 for p in polygons)
    assert all(float(p.min()) >= 0 and float(p.max()) <= 1 for p in polygons)
    assert iou(rasterise(polygons, *mask.shape), fill_holes(mask)) >= 0.97


def test_holes_are_filled_and_components_each_get_an_outline() -> None:
    yy, xx = np.mgrid[:120, :160].astype(np.float64)
    ring = _disc(yy, xx, 60, 50, 30) & ~_disc(yy, xx, 60, 50, 15)
    island = _disc(yy, xx, 60, 50, 6)  # inside the ring's hole: covered by the ring's outline
    box = (yy > 20) & (yy < 100) & (xx > 100) & (xx < 150)
    box_hole = (yy > 50) & (yy < 70) & (xx > 115) & (xx < 135)
    mask = ring | island | (box & ~box_hole)
    polygons = trace_polygons(mask)
    assert len(polygons) == 2  # outer outlines only: no polygon for a hole or for the island inside it
    drawn = rasterise(polygons, *mask.shape)
    assert drawn[60, 50] and drawn[60, 125]  # the holes' centres are covered
    assert iou(drawn, fill_holes(mask)) >= 0.97
    # The box is traced along pixel edges: its outline is exact.
    box_polygon = max(polygons, key=lambda p: p[:, 0].mean())
    assert sorted({tuple(v) for v in np.round(box_polygon * [160, 120], 6).tolist()}) == [
        (101.0, 21.0),
        (101.0, 100.0),
        (150.0, 21.0),
        (150.0, 100.0),
    ]


def test_specks_are_skipped_and_an_empty_mask_has_no_polygons() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    assert trace_polygons(mask) == []
    mask[10, 10] = True  # one pixel: 0.01% of the image, under the 0.05% minimum
    mask[40:80, 40:80] = True
    assert len(trace_polygons(mask)) == 1


def test_polygon_results_are_in_percent() -> None:
    control = LabelControl("label", "image", "image", "polygonlabels", ("Box",), (("Box",),))
    mask = np.zeros((50, 200), dtype=bool)
    mask[10:40, 50:150] = True
    (region,) = polygon_regions(control, "Box", mask, 0.8)
    assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["Box"]
    assert region["original_width"] == 200 and region["original_height"] == 50
    assert sorted(map(tuple, region["value"]["points"])) == [(25.0, 20.0), (25.0, 80.0), (75.0, 20.0), (75.0, 80.0)]


def test_large_masks_are_traced_at_their_own_resolution_just_as_well() -> None:
    mask = np.kron(blobs(3), np.ones((6, 6), dtype=bool))  # 900x1200: past the size traced at 2x
    assert mask.size > 1_000_000
    assert iou(rasterise(trace_polygons(mask), *mask.shape), fill_holes(mask)) >= 0.97
