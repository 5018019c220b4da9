"""A feature-grid crop computed on its window alone is the whole-grid rescale, pad and crop it stands for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskclip_engine.students.augment import augment_grid


def _reference(features, keys, maps, stride, cells, scale_range, rng):
    """Rescale the whole grid and its pixel maps, pad, crop and flip: the computation the window replaces."""
    features, keys = features.float(), keys.float()
    rows, cols = features.shape[-2:]
    scale = float(rng.uniform(*scale_range))
    size = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    if size != (rows, cols):
        both = F.interpolate(torch.cat([features, keys])[None], size=size, mode="bilinear", align_corners=False)[0]
        features, keys = both[: features.shape[0]], both[features.shape[0] :]
    maps = F.interpolate(maps[None].float(), size=(size[0] * stride, size[1] * stride), mode="nearest")[0].long()
    pad_rows, pad_cols = max(0, cells - size[0]), max(0, cells - size[1])
    features = F.pad(features[None], (0, pad_cols, 0, pad_rows), mode="replicate")[0]
    keys = F.pad(keys[None], (0, pad_cols, 0, pad_rows), mode="replicate")[0]
    maps = F.pad(maps, (0, pad_cols * stride, 0, pad_rows * stride), value=-1)
    top = int(rng.integers(0, features.shape[1] - cells + 1))
    left = int(rng.integers(0, features.shape[2] - cells + 1))
    features = features[:, top : top + cells, left : left + cells]
    keys = keys[:, top : top + cells, left : left + cells]
    maps = maps[:, top * stride : (top + cells) * stride, left * stride : (left + cells) * stride]
    if rng.random() < 0.5:
        features, keys, maps = features.flip(-1), keys.flip(-1), maps.flip(-1)
    return features, keys, maps


@pytest.mark.parametrize(
    ("grid", "cells", "scale_range"),
    [
        ((28, 37), 20, (0.75, 1.5)),  # the default: a 448-pixel short side, 320-pixel crops
        ((12, 9), 10, (0.5, 0.9)),  # shrunk below the crop: replicated edges and -1 maps
        ((14, 14), 8, (1.0, 1.0)),  # no rescale
        ((16, 20), 16, (2.0, 2.0)),  # exactly twice the size
    ],
)
def test_a_window_crop_equals_the_whole_grid_rescaled_and_cropped(grid, cells, scale_range) -> None:
    stride = 4
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, *grid, generator=generator).half()
    keys = torch.randn(5, *grid, generator=generator).half()
    # int16, as training keeps them; the reference works in int64
    maps = torch.randint(-1, 7, (3, grid[0] * stride, grid[1] * stride), generator=generator).to(torch.int16)
    for seed in range(12):
        got = augment_grid(features, keys, maps, stride, cells, scale_range, np.random.default_rng(seed))
        want = _reference(features, keys, maps, stride, cells, scale_range, np.random.default_rng(seed))
        assert got[0].dtype == torch.float32 and got[0].shape == (6, cells, cells)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        assert got[2].dtype == torch.int16
        assert torch.equal(got[2].long(), want[2]), f"label maps differ for seed {seed}"
