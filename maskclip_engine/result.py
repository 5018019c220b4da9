"""What a segmentation call returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maskclip_engine.task_scores import acquisition_scores

# Upsampling works on this many class-pixels at a time, so large images with
# many labels never need a full [C, H, W] tensor.
_UPSAMPLE_BUDGET = 1 << 26


@dataclass(frozen=True)
class SegmentationResult:
    """Labels of one image at its original resolution.

    ``label_map`` is ``HxW int32``: ``i`` means ``labels[i]``, ``-1`` unlabeled.
    ``confidence`` is ``HxW float32``, each pixel's top class probability.
    ``scores[i]`` is the mean confidence over the pixels of ``labels[i]`` (0 if
    it has none). ``dropped`` lists the labels prompt denoising found absent.
    ``task_scores`` are the image's acquisition scores (lower: more worth
    annotating; see :mod:`maskclip_engine.task_scores`).
    """

    labels: list[str]
    label_map: np.ndarray
    confidence: np.ndarray
    scores: list[float]
    dropped: list[str] = field(default_factory=list)
    task_scores: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the image, as PIL reports it."""
        return int(self.label_map.shape[1]), int(self.label_map.shape[0])

    def _index(self, label: str | int) -> int:
        if isinstance(label, int):
            if not 0 <= label < len(self.labels):
                raise IndexError(f"label index {label} out of range for {len(self.labels)} labels")
            return label
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"{label!r} is not one of the labels {self.labels}") from None

    def mask(self, label: str | int) -> np.ndarray:
        """``HxW bool`` mask of one label."""
        return self.label_map == self._index(label)

    def pixel_counts(self) -> list[int]:
        counts = np.bincount(self.label_map[self.label_map >= 0].ravel(), minlength=len(self.labels))
        return [int(c) for c in counts[: len(self.labels)]]

    @property
    def present(self) -> list[str]:
        """Labels that hold at least one pixel, in label order."""
        return [name for name, count in zip(self.labels, self.pixel_counts()) if count > 0]

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """``{label: HxW bool mask}`` for every present label."""
        return {name: self.mask(name) for name in self.present}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe summary (no pixel arrays)."""
        total = self.label_map.size
        counts = self.pixel_counts()
        return {
            "width": self.size[0],
            "height": self.size[1],
            "labels": [
                {
                    "index": i,
                    "name": name,
                    "score": round(float(self.scores[i]), 6),
                    "pixels": counts[i],
                    "fraction": round(counts[i] / total, 6),
                    "dropped": name in self.dropped,
                }
                for i, name in enumerate(self.labels)
            ],
            "present": self.present,
            "dropped": list(self.dropped),
            "unlabeled_fraction": round(float((self.label_map < 0).sum()) / total, 6),
        }


def upsample_argmax(
    probs: torch.Tensor, shape: tuple[int, int], scores: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear upsampling of ``[C, h, w]`` probabilities to ``shape``, reduced to argmax and max.

    With ``scores`` (same shape as ``probs``), the label is the argmax of the
    upsampled scores and the confidence is the upsampled probability of that label.
    """
    height, width = shape
    best = torch.full(shape, float("-inf"), device=probs.device)
    confidence = best if scores is None else torch.zeros(shape, device=probs.device)
    label = torch.zeros(shape, dtype=torch.long, device=probs.device)
    step = max(1, _UPSAMPLE_BUDGET // (height * width))
    for start in range(0, probs.shape[0], step):
        up = F.interpolate(probs[None, start : start + step], size=shape, mode="bilinear", align_corners=False)[0]
        ranked = up
        if scores is not None:
            ranked = F.interpolate(scores[None, start : start + step], size=shape, mode="bilinear", align_corners=False)
            ranked = ranked[0]
        value, index = ranked.max(dim=0)
        better = value > best
        best = torch.where(better, value, best)
        label = torch.where(better, index + start, label)
        if scores is not None:
            confidence = torch.where(better, up.gather(0, index[None])[0], confidence)
    return label, best if scores is None else confidence


def result_from_probabilities(
    probs: torch.Tensor,
    shape: tuple[int, int],
    names: list[str],
    kept: torch.Tensor | None = None,
    bg_threshold: float = 0.0,
    scores: torch.Tensor | None = None,
) -> SegmentationResult:
    """A result at ``shape`` from grid probabilities ``[C, h, w]``; classes not ``kept`` are reported dropped.

    ``probs`` (and ``scores``, when labels follow scores other than the
    probabilities) hold one row per label, or one row per kept label.
    """
    if kept is None:
        kept = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    kept_index = torch.nonzero(kept).flatten()
    if probs.shape[0] != len(kept_index):
        probs = probs[kept_index]
        scores = None if scores is None else scores[kept_index]
    label_map, confidence = upsample_argmax(probs, shape, scores)
    label_map = kept_index[label_map]
    label_map[confidence < bg_threshold] = -1
    num_labels = len(names)
    valid = label_map >= 0
    sums = torch.zeros(num_labels, device=label_map.device).index_add_(0, label_map[valid], confidence[valid])
    counts = torch.bincount(label_map[valid], minlength=num_labels).clamp_min(1)
    return SegmentationResult(
        labels=list(names),
        label_map=label_map.to(torch.int32).cpu().numpy(),
        confidence=confidence.cpu().numpy(),
        scores=(sums / counts).cpu().tolist(),
        dropped=[names[i] for i in torch.nonzero(~kept).flatten().tolist()],
        task_scores=acquisition_scores(probs),
    )
