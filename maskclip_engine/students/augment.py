"""Training augmentation: on pixels as in MaskCLIP+ (random scale, crop, flip, photometric distortion),
and on stored feature grids (rescale, crop, flip) for students that read CLIP features.

Label maps travel with the image through every geometric step (nearest
neighbour); padding is marked ``-1`` (ignored) in every map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


@dataclass(frozen=True)
class AugmentConfig:
    crop: int = 320
    base_short_side: int = 320  # an image's short side before the random scale
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    photometric: bool = True


def augment(
    image: np.ndarray, maps: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``HxWx3 uint8`` image and ``[K, H, W]`` int maps to a ``[3, crop, crop]`` image in 0..1 and
    ``[K, crop, crop]`` maps."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    m = torch.from_numpy(np.ascontiguousarray(maps)).long()
    height, width = x.shape[1:]
    scale = config.base_short_side / min(height, width) * rng.uniform(*config.scale_range)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp_(0, 1)
    m = F.interpolate(m[None].float(), size=size, mode="nearest")[0].long()

    crop = config.crop
    pad_h, pad_w = max(0, crop - size[0]), max(0, crop - size[1])
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
        m = F.pad(m, (0, pad_w, 0, pad_h), value=-1)
    top = int(rng.integers(0, x.shape[1] - crop + 1))
    left = int(rng.integers(0, x.shape[2] - crop + 1))
    x = x[:, top : top + crop, left : left + crop]
    m = m[:, top : top + crop, left : left + crop]

    if config.flip and rng.random() < 0.5:
        x, m = x.flip(-1), m.flip(-1)
    if config.photometric:
        x = photometric_distortion(x, rng)
    return x.contiguous(), m.contiguous()


def photometric_distortion(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each applied half the time (mmseg's recipe)."""
    if rng.random() < 0.5:
        x = (x + rng.uniform(-32, 32) / 255).clamp(0, 1)
    if rng.random() < 0.5:
        x = TF.adjust_contrast(x, float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        x = TF.adjust_saturation(x, float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        x = TF.adjust_hue(x, float(rng.uniform(-0.05, 0.05)))
    return x


def augment_grid(
    features: torch.Tensor,
    keys: torch.Tensor,
    maps: torch.Tensor,
    stride: int,
    cells: int,
    scale_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random crop of one image's feature grid: rescaled, cropped to ``cells`` x ``cells``, maybe flipped.

    ``features`` ``[D, h, w]`` and ``keys`` ``[K, h, w]`` are the whole-image
    grids (any float type; the crops are float32); ``maps`` ``[M, h * stride, w * stride]``
    integer label maps (any signed type, kept) at the resized image's pixels travel with them
    (nearest neighbour). Grids are rescaled bilinearly; padding repeats the grids' edge and is
    ``-1`` in the maps.
    Returns the ``[D, cells, cells]`` and ``[K, cells, cells]`` crops and the
    ``[M, cells * stride, cells * stride]`` maps.

    Only the crop's window is computed: what ``F.interpolate`` (bilinear for the
    grids, nearest for the maps) followed by padding and cropping would give,
    without rescaling the whole grid and its pixel-sized maps for every crop.
    """
    rows, cols = features.shape[-2:]
    scale = float(rng.uniform(*scale_range))
    size = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    # The grids repeat their edge where the rescaled grid is smaller than the crop: zero features have no
    # direction, and the cosine classifier's gradient at them (reaching labelled pixels through the bilinear
    # upsampling) wrecks training.
    top = int(rng.integers(0, max(size[0], cells) - cells + 1))
    left = int(rng.integers(0, max(size[1], cells) - cells + 1))
    row_weights = _bilinear_window(rows, size[0], top, cells)
    col_weights = _bilinear_window(cols, size[1], left, cells)
    both = row_weights @ (torch.cat([features, keys]).float() @ col_weights.T)
    features, keys = both[: features.shape[0]], both[features.shape[0] :]
    row_index = _nearest_window(maps.shape[-2], size[0] * stride, top * stride, cells * stride)
    col_index = _nearest_window(maps.shape[-1], size[1] * stride, left * stride, cells * stride)
    maps = maps[:, row_index.clamp(min=0)][:, :, col_index.clamp(min=0)]
    if (row_index < 0).any() or (col_index < 0).any():  # the crop reaches past a grid that shrank below it
        maps = maps.masked_fill((row_index < 0)[:, None] | (col_index < 0)[None, :], -1)
    if rng.random() < 0.5:
        features, keys, maps = features.flip(-1), keys.flip(-1), maps.flip(-1)
    return features.contiguous(), keys.contiguous(), maps.contiguous()


def _bilinear_window(source: int, size: int, start: int, count: int) -> torch.Tensor:
    """``[count, source]`` weights: rows ``start .. start + count`` of a length-``source`` axis rescaled
    bilinearly to ``size`` (half-pixel centres, as ``align_corners=False``); rows past ``size`` repeat
    the last one."""
    out = torch.arange(start, start + count).clamp(max=size - 1)
    weights = torch.zeros(count, source)
    if size == source:
        weights[torch.arange(count), out] = 1.0
        return weights
    position = ((out.float() + 0.5) * (source / size) - 0.5).clamp(min=0)
    low = position.floor().long().clamp(max=source - 1)
    high = (low + 1).clamp(max=source - 1)
    fraction = position - low.float()
    weights[torch.arange(count), low] += 1 - fraction
    weights[torch.arange(count), high] += fraction
    return weights


def _nearest_window(source: int, size: int, start: int, count: int) -> torch.Tensor:
    """Source indices of positions ``start .. start + count`` of a length-``source`` axis rescaled to
    ``size`` by nearest neighbour (``F.interpolate``'s rule, in float32 as it computes it); ``-1`` past ``size``."""
    out = torch.arange(start, start + count)
    if size == source:
        index = out.clone()
    else:
        ratio = torch.tensor(source, dtype=torch.float32) / size
        index = (out.float() * ratio).floor().long().clamp(max=source - 1)
    return index.masked_fill(out >= size, -1)
