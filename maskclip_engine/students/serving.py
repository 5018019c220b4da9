"""Segmenting with a trained student: the same result type as MaskCLIP's own ``segment``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maskclip_engine.features.dense_state import DenseState
from maskclip_engine.features.image_features import ImageFeatures
from maskclip_engine.images import resized_shape, to_rgb_array
from maskclip_engine.result import SegmentationResult, result_from_probabilities
from maskclip_engine.segmenter import Segmenter
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.network import StudentNet


class StudentSegmenter:
    """A student over the shared CLIP model: ``segment(image) -> SegmentationResult`` for its own labels.

    A ``clip`` student reads the whole-image CLIP features of the dense mode
    it was trained under (its checkpoint's options), whatever the segmenter's
    own mode, through the segmenter's feature source: an image whose features
    are stored costs the student's head only. Image sizes follow the
    segmenter, as for MaskCLIP. Thread-safe: the student is frozen and in eval mode.
    """

    def __init__(self, segmenter: Segmenter, checkpoint: StudentCheckpoint) -> None:
        self.segmenter = segmenter
        self.checkpoint = checkpoint
        self.net = checkpoint.net.to(segmenter.clip.device).eval()

    @property
    def dense_mode(self) -> str:
        return self.checkpoint.dense_mode

    @property
    def labels(self) -> list[str]:
        return list(self.checkpoint.labels)

    def clip_features(self, image: Any) -> ImageFeatures:
        """The CLIP features this student reads for ``image``: whole image, its dense mode."""
        return self.segmenter.encode(image, mode="whole", dense_mode=self.dense_mode)

    def segment(self, image: Any, bg_threshold: float = 0.0) -> SegmentationResult:
        return self.segment_batch([image], bg_threshold)[0]

    @torch.inference_mode()
    def segment_batch(self, images: Sequence[Any], bg_threshold: float = 0.0) -> list[SegmentationResult]:
        results = []
        for image in images:
            rgb = to_rgb_array(image)
            probs = self.probabilities(rgb)
            results.append(result_from_probabilities(probs, rgb.shape[:2], self.labels, bg_threshold=bg_threshold))
        return results

    @torch.inference_mode()
    def probabilities(self, rgb: np.ndarray, features: ImageFeatures | None = None) -> torch.Tensor:
        """Class probabilities ``[C, h, w]`` of one image on the student's output grid.

        The student's decoder runs in the CLIP backbone's precision (bf16 where
        the chip computes it natively, see :mod:`maskclip_engine.backbone.precision`);
        its text classifier in float32. Serving, the promotion gate and reviews
        all come through here, so a student is judged as it is served.
        """
        if self.net.needs_clip_features:
            features = features or self.clip_features(rgb)
            grid, _ = features.whole_grid()
            with self.segmenter.clip.autocast():
                logits = self.net(clip_features=grid[None])[0]
            return torch.softmax(logits.float(), dim=0)
        options = self.segmenter.options
        size = resized_shape(*rgb.shape[:2], options.short_side, options.max_long_side, 32)
        unit = self.segmenter.to_unit(self.segmenter.normalize(rgb, size))[None]  # the ResNet normalises its own way
        with self.segmenter.clip.autocast():
            logits = self.net(pixels=unit)[0]
        return torch.softmax(logits.float(), dim=0)

    @torch.inference_mode()
    def segment_with_state(self, image: Any, bg_threshold: float = 0.0) -> tuple[SegmentationResult, DenseState]:
        """``segment`` plus a dense state for interactions: CLIP's features and keys, the student's probabilities.

        A ResNet student's probabilities are resized to CLIP's feature grid.
        """
        rgb = to_rgb_array(image)
        features = self.clip_features(rgb)
        probs = self.probabilities(rgb, features)
        result = result_from_probabilities(probs, rgb.shape[:2], self.labels, bg_threshold=bg_threshold)
        grid_features, grid_keys = features.whole_grid()
        if tuple(probs.shape[1:]) != tuple(grid_features.shape[1:]):  # the result keeps the student's finer grid
            probs = F.interpolate(probs[None], size=grid_features.shape[1:], mode="bilinear", align_corners=False)[0]
        state = DenseState(
            features=grid_features.cpu(),
            keys=grid_keys.cpu(),
            probs=probs.cpu(),
            labels=tuple(self.labels),
            image_size=(int(rgb.shape[0]), int(rgb.shape[1])),
            stride=features.stride,
        )
        return result, state


def student_probabilities(
    segmenter: Segmenter, net: StudentNet, rgb: np.ndarray, dense_mode: str = "maskclip"
) -> torch.Tensor:
    """Class probabilities ``[C, h, w]`` of one image on the student's output grid.

    ``dense_mode`` must be the one the student was trained on (its checkpoint says).
    """
    checkpoint = StudentCheckpoint(net, [], [], {}, options=segmenter.options.replace(dense_mode=dense_mode))
    return StudentSegmenter(segmenter, checkpoint).probabilities(rgb)
