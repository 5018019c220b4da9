"""What the frozen backbone produces for one image: label-independent dense features, window by window.

Everything MaskCLIP and its students need from the image tower (the dense
features and the last block's keys, in whichever dense mode) depends on the
image, the model, its weights and precision, and the options that choose the
windows; never on the labels or on a student. So it is computed once per
image and reused by every later step: proposals for other labels, smart-tool
gestures, training, refreshes after a promotion, evaluation (see
:mod:`maskclip_engine.features.source`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from maskclip_engine.backbone.loading import LoadedClip
    from maskclip_engine.config import SegmentOptions


@dataclass(frozen=True)
class Window:
    """A window of the resized image in pixels: ``(top, left)`` corner and size."""

    top: int
    left: int
    height: int
    width: int

    def cells(self, stride: int) -> tuple[slice, slice]:
        """The window's rows and columns on the resized image's feature grid."""
        return (
            slice(self.top // stride, (self.top + self.height) // stride),
            slice(self.left // stride, (self.left + self.width) // stride),
        )


@dataclass(frozen=True)
class ImageFeatures:
    """One image's dense state from the backbone, per window (one window in ``whole`` mode).

    ``features`` ``[W, D, h, w]`` (CLIP joint space, not normalised) and
    ``keys`` ``[W, K, h, w]`` float32, on the model's device; every window of
    an image has the same size. ``resized`` is the ``(height, width)`` the
    image was resized to (a multiple of ``stride``), ``image_size`` its
    original ``(height, width)``.
    """

    features: torch.Tensor
    keys: torch.Tensor
    windows: tuple[Window, ...]
    resized: tuple[int, int]
    image_size: tuple[int, int]
    stride: int

    @property
    def grid(self) -> tuple[int, int]:
        """The resized image's feature grid ``(rows, cols)``."""
        return self.resized[0] // self.stride, self.resized[1] // self.stride

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement() + self.keys.element_size() * self.keys.nelement()

    def whole_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[D, rows, cols]`` and keys ``[K, rows, cols]`` over the whole image: windows averaged."""
        if len(self.windows) == 1 and self.features.shape[-2:] == self.grid:
            return self.features[0], self.keys[0]
        features = self.features.new_zeros((self.features.shape[1], *self.grid))
        keys = self.keys.new_zeros((self.keys.shape[1], *self.grid))
        count = self.features.new_zeros(self.grid)
        for window, f, k in zip(self.windows, self.features, self.keys):
            cells = window.cells(self.stride)
            features[(slice(None), *cells)] += f
            keys[(slice(None), *cells)] += k
            count[cells] += 1
        count = count.clamp_min(1)
        return features / count, keys / count

    def to(self, device: torch.device | str) -> ImageFeatures:
        return ImageFeatures(
            self.features.to(device), self.keys.to(device), self.windows, self.resized, self.image_size, self.stride
        )


def image_digest(rgb: np.ndarray) -> str:
    """Identity of an ``HxWx3 uint8`` image by content: the same pixels from any URL share one entry."""
    array = np.ascontiguousarray(rgb)
    digest = hashlib.blake2b(array.data, digest_size=16)
    digest.update(str(array.shape).encode())
    return digest.hexdigest()


# Bumped whenever the computation behind stored features changes, so older entries are never served.
FEATURES_FORMAT = 1


@dataclass(frozen=True)
class FeatureKey:
    """Everything that decides an image's :class:`ImageFeatures`; two equal keys mean equal features."""

    image: str  # image_digest of the decoded pixels
    model: str  # LoadedClip.model_id (architecture, config hash, QuickGELU)
    weights: str  # LoadedClip.weights_id (tag or file hash)
    precision: str  # the backbone's concrete precision
    dense_mode: str
    mode: str
    short_side: int
    max_long_side: int
    crop: int  # 0 in whole mode, where windows do not depend on it
    stride: int
    format: int = FEATURES_FORMAT

    @classmethod
    def of(cls, image: str, clip: LoadedClip, options: SegmentOptions) -> FeatureKey:
        slide = options.mode == "slide"
        return cls(
            image=image,
            model=clip.model_id,
            weights=clip.weights_id,
            precision=clip.precision,
            dense_mode=options.dense_mode,
            mode=options.mode,
            short_side=options.short_side,
            max_long_side=options.max_long_side,
            crop=options.crop if slide else 0,
            stride=options.stride if slide else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def digest(self) -> str:
        """A file-name-safe hash of the whole key."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:40]
