"""Segmentation metrics from a confusion matrix: mIoU, per-class IoU, pixel accuracy.

One metric code for everything that scores masks: the promotion gate of
training and the evaluation command.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def confusion_matrix(prediction: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int = -1) -> np.ndarray:
    """``[C, C + 1] int64`` counts: rows are true classes, columns predicted ones.

    The last column counts pixels predicted as unlabeled (any value outside
    ``0..C-1``): misses of their true class, nobody's false positives. Pixels
    whose truth is ``ignore_index`` (or outside ``0..C-1``) are left out.
    Matrices of several images add up.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    truth = truth.astype(np.int64).ravel()
    prediction = prediction.astype(np.int64).ravel()
    valid = (truth != ignore_index) & (truth >= 0) & (truth < num_classes)
    truth, prediction = truth[valid], prediction[valid]
    prediction = np.where((prediction < 0) | (prediction >= num_classes), num_classes, prediction)
    counts = np.bincount(truth * (num_classes + 1) + prediction, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


@dataclass(frozen=True)
class Scores:
    """``iou[c]`` is NaN for a class absent from both truth and prediction; mIoU averages the rest."""

    miou: float
    iou: list[float]
    pixel_accuracy: float
    pixels: int

    def to_dict(self, names: list[str] | None = None) -> dict:
        per_class = [None if np.isnan(v) else round(float(v), 6) for v in self.iou]
        return {
            "miou": round(self.miou, 6),
            "pixel_accuracy": round(self.pixel_accuracy, 6),
            "pixels": self.pixels,
            "iou": dict(zip(names, per_class)) if names else per_class,
        }


def scores(matrix: np.ndarray) -> Scores:
    """Scores of a matrix from :func:`confusion_matrix`."""
    num_classes = matrix.shape[0]
    true_positive = np.diag(matrix[:, :num_classes]).astype(np.float64)
    truth_total = matrix.sum(axis=1).astype(np.float64)
    predicted_total = matrix[:, :num_classes].sum(axis=0).astype(np.float64)
    union = truth_total + predicted_total - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    pixels = int(matrix.sum())
    return Scores(
        miou=float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
        iou=iou.tolist(),
        pixel_accuracy=float(true_positive.sum() / pixels) if pixels else 0.0,
        pixels=pixels,
    )
