"""Training augmentation as in MaskCLIP+: random scale, crop, flip and photometric distortion.

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
