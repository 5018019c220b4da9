"""Segmenting with a trained student: the same result type as MaskCLIP's own ``segment``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .images import resized_shape, to_rgb_array
from .interactive import DenseState
from .result import SegmentationResult, result_from_probabilities
from .segmenter import Segmenter
from .student import StudentCheckpoint, StudentNet


class StudentSegmenter:
    """A student over the shared CLIP model: ``segment(image) -> SegmentationResult`` for its own labels.

    A ``clip`` student reads the CLIP features of the dense mode it was trained
    under (its checkpoint's options), whatever the segmenter's own mode; image
    sizes follow the segmenter, as for MaskCLIP. Thread-safe: the student is
    frozen and in eval mode.
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

    def segment(self, image: Any, bg_threshold: float = 0.0) -> SegmentationResult:
        return self.segment_batch([image], bg_threshold)[0]

    @torch.inference_mode()
    def segment_batch(self, images: Sequence[Any], bg_threshold: float = 0.0) -> list[SegmentationResult]:
        results = []
        for image in images:
            rgb = to_rgb_array(image)
            probs = student_probabilities(self.segmenter, self.net, rgb, self.dense_mode)
            results.append(result_from_probabilities(probs, rgb.shape[:2], self.labels, bg_threshold=bg_threshold))
        return results

    @torch.inference_mode()
    def segment_with_state(self, image: Any, bg_threshold: float = 0.0) -> tuple[SegmentationResult, DenseState]:
        """``segment`` plus a dense state for interactions: CLIP's features and keys, the student's probabilities.

        A student on CLIP features reads them from the same forward pass; a
        ResNet student's probabilities are resized to CLIP's feature grid.
        """
        rgb = to_rgb_array(image)
        seg = self.segmenter
        size = resized_shape(*rgb.shape[:2], seg.options.short_side, seg.options.max_long_side, seg.stride)
        features, keys = seg.dense_features_and_keys(seg.normalize(rgb, size)[None], self.dense_mode)
        if self.net.needs_clip_features:
            probs = torch.softmax(self.net(clip_features=features)[0].float(), dim=0)
        else:
            probs = student_probabilities(seg, self.net, rgb, self.dense_mode)
        result = result_from_probabilities(probs, rgb.shape[:2], self.labels, bg_threshold=bg_threshold)
        if tuple(probs.shape[1:]) != tuple(features.shape[2:]):  # the result keeps the student's finer grid
            probs = F.interpolate(probs[None], size=features.shape[2:], mode="bilinear", align_corners=False)[0]
        state = DenseState(
            features=features[0].cpu(),
            keys=keys[0].cpu(),
            probs=probs.cpu(),
            labels=tuple(self.labels),
            image_size=(int(rgb.shape[0]), int(rgb.shape[1])),
            stride=seg.stride,
        )
        return result, state


def student_probabilities(
    segmenter: Segmenter, net: StudentNet, rgb: np.ndarray, dense_mode: str = "maskclip"
) -> torch.Tensor:
    """Class probabilities ``[C, h, w]`` of one image on the student's output grid.

    ``dense_mode`` must be the one the student was trained on (its checkpoint says).
    """
    options = segmenter.options
    stride = segmenter.stride if net.needs_clip_features else 32
    size = resized_shape(*rgb.shape[:2], options.short_side, options.max_long_side, stride)
    pixels = segmenter.normalize(rgb, size)[None]
    if net.needs_clip_features:
        features, _ = segmenter.dense_features_and_keys(pixels, dense_mode)
        logits = net(clip_features=features)
    else:
        unit = pixels * segmenter._std + segmenter._mean  # back to 0..1: the ResNet normalises its own way
        logits = net(pixels=unit)
    return torch.softmax(logits[0].float(), dim=0)
