"""The promotion gate: a trained candidate replaces the current model only when the evidence says it is better.

Both models label the held-out annotated images. The evidence is a paired
bootstrap of the held-out mIoU gain: each image is cut into blocks (the
bootstrap's units: neighbouring pixels are far from independent, so pixels
would overstate the evidence, while a block keeps most of that correlation
inside one unit), the units are resampled with replacement, and both models'
mIoU are computed from the same resampled confusion counts. The candidate is
promoted when the lower end of the gain's one-sided confidence interval is
above the margin, however few pixels that takes: a candidate that wins on
every block of two small images is promoted, a tie never is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from maskclip_engine.labels import LabelSet
from maskclip_engine.miou import Scores, confusion_matrix, scores
from maskclip_engine.result import result_from_probabilities
from maskclip_engine.segmenter import Segmenter
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.registry import ModelRegistry
from maskclip_engine.students.serving import StudentSegmenter
from maskclip_engine.students.training import TrainingImage

Predict = Callable[[np.ndarray], np.ndarray]  # image -> HxW label map
PredictItem = Callable[[TrainingImage], np.ndarray]  # image (and its features) -> label map at its labels' size


@dataclass(frozen=True)
class GateConfig:
    """``margin``: the mIoU gain the interval's lower end must exceed; ``confidence`` of that one-sided bound."""

    margin: float = 0.0
    confidence: float = 0.95
    resamples: int = 2000
    blocks: int = 4  # each held-out image is cut into blocks x blocks units
    seed: int = 0


@dataclass(frozen=True)
class Verdict:
    """The gate's decision and its numbers (mIoU of both sides, the gain's bounds, what they rest on)."""

    promoted: bool
    reason: str
    candidate: float | None = None
    current: float | None = None
    baseline: str = "maskclip"
    pixels: int = 0
    gain_low: float | None = None
    gain_high: float | None = None
    units: int = 0


def evaluate(predict: Predict, images: Sequence[TrainingImage], num_classes: int) -> Scores:
    """mIoU of ``predict(image) -> HxW label map`` against the images' human labels (unannotated pixels ignored)."""
    total = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for item in images:
        if item.labels is not None:
            total += confusion_matrix(predict(item.image), item.labels, num_classes)
    return scores(total)


def block_matrices(prediction: np.ndarray, truth: np.ndarray, num_classes: int, blocks: int) -> np.ndarray:
    """``[U, C, C + 1]`` confusion counts of the image's ``blocks x blocks`` blocks that hold labelled pixels."""
    height, width = truth.shape
    rows = np.linspace(0, height, blocks + 1).astype(int)
    cols = np.linspace(0, width, blocks + 1).astype(int)
    out = []
    for r0, r1 in zip(rows[:-1], rows[1:]):
        for c0, c1 in zip(cols[:-1], cols[1:]):
            matrix = confusion_matrix(prediction[r0:r1, c0:c1], truth[r0:r1, c0:c1], num_classes)
            if matrix.sum():
                out.append(matrix)
    return np.stack(out) if out else np.zeros((0, num_classes, num_classes + 1), dtype=np.int64)


def bootstrap_gain(candidate: np.ndarray, current: np.ndarray, config: GateConfig) -> tuple[float, float, float]:
    """Point estimate and ``(low, high)`` bounds of mIoU(candidate) - mIoU(current) over paired units.

    ``candidate`` and ``current`` are ``[U, C, C + 1]`` counts of the same units.
    """
    units = candidate.shape[0]
    gain = scores(candidate.sum(0)).miou - scores(current.sum(0)).miou
    rng = np.random.default_rng(config.seed)
    weights = rng.multinomial(units, np.full(units, 1.0 / units), size=config.resamples).astype(np.float64)
    differences = _miou_rows(weights @ candidate.reshape(units, -1), candidate.shape[1:])
    differences -= _miou_rows(weights @ current.reshape(units, -1), current.shape[1:])
    tail = (1 - config.confidence) * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return float(gain), float(low), float(high)


def _miou_rows(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """mIoU of each row of ``[B, C * (C + 1)]`` summed confusion counts (as :func:`maskclip_engine.miou.scores`)."""
    matrices = flat.reshape(flat.shape[0], *shape)
    num_classes = shape[0]
    true_positive = np.diagonal(matrices[:, :, :num_classes], axis1=1, axis2=2)
    union = matrices.sum(axis=2) + matrices[:, :, :num_classes].sum(axis=1) - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    present = (union > 0).any(axis=1)
    out = np.zeros(flat.shape[0])
    out[present] = np.nanmean(iou[present], axis=1)
    return out


def compare(
    candidate: PredictItem,
    current: PredictItem,
    held_out: Sequence[TrainingImage],
    num_classes: int,
    config: GateConfig,
) -> tuple[Scores, Scores, np.ndarray, np.ndarray]:
    """Both models on every labelled held-out image: their scores and per-block counts."""
    totals = [np.zeros((num_classes, num_classes + 1), dtype=np.int64) for _ in range(2)]
    blocks: list[list[np.ndarray]] = [[], []]
    for item in held_out:
        if item.labels is None:
            continue
        for side, predict in enumerate((candidate, current)):
            prediction = predict(item)
            totals[side] += confusion_matrix(prediction, item.labels, num_classes)
            blocks[side].append(block_matrices(prediction, item.labels, num_classes, config.blocks))
    empty = np.zeros((0, num_classes, num_classes + 1), dtype=np.int64)
    stacked = [np.concatenate(b) if b else empty for b in blocks]
    return scores(totals[0]), scores(totals[1]), stacked[0], stacked[1]


def decide(
    new: Scores, old: Scores, candidate: np.ndarray, current: np.ndarray, config: GateConfig, baseline: str
) -> Verdict:
    """The verdict on measured scores and per-block counts."""
    units, pixels = int(candidate.shape[0]), new.pixels
    if units < 2:
        return Verdict(
            False, "kept, not promoted: the held-out annotations cover too little to judge", baseline=baseline
        )
    gain, low, high = bootstrap_gain(candidate, current, config)
    numbers = (
        f"held-out mIoU {new.miou:.3f} against {old.miou:.3f} ({baseline}); gain {gain:+.3f}, "
        f"{config.confidence:.0%} bound {low:+.3f} over {units} blocks of {pixels} pixels"
    )
    if low > config.margin:
        reason = f"promoted: {numbers} is above the margin {config.margin:g}"
        return Verdict(True, reason, new.miou, old.miou, baseline, pixels, low, high, units)
    reason = (
        f"kept, not promoted: {numbers} does not clear the margin {config.margin:g} (MASKCLIP_GATE_MARGIN); "
        "annotate more images or let the candidate improve"
    )
    return Verdict(False, reason, new.miou, old.miou, baseline, pixels, low, high, units)


def student_predictor(student: StudentSegmenter, bg_threshold: float) -> PredictItem:
    """A student as served, on a held-out item: from the item's stored features when it has them."""

    def predict(item: TrainingImage) -> np.ndarray:
        features = item.features if student.net.needs_clip_features else None
        probs = student.probabilities(item.image, features)
        shape = item.labels.shape if item.labels is not None else item.image.shape[:2]
        return result_from_probabilities(probs, shape, student.labels, bg_threshold=bg_threshold).label_map

    return predict


def maskclip_predictor(segmenter: Segmenter, labels: LabelSet) -> PredictItem:
    """MaskCLIP with the serving options on a held-out item (its stored features, when they fit those options)."""
    whole = segmenter.options.mode == "whole"

    def predict(item: TrainingImage) -> np.ndarray:
        shape = item.labels.shape if item.labels is not None else item.image.shape[:2]
        if whole and item.features is not None:
            return segmenter.segment_features(item.features, labels, item.image, size=shape).label_map
        return segmenter.segment(item.image, labels).label_map

    return predict


def judge(
    segmenter: Segmenter,
    registry: ModelRegistry,
    project: int | str,
    checkpoint: StudentCheckpoint,
    labels: LabelSet,
    held_out: Sequence[TrainingImage],
    config: GateConfig | None = None,
) -> Verdict:
    """Score the candidate and the model it would replace (the active student, else MaskCLIP) on held-out images.

    Both sides are scored as the backend serves them: MaskCLIP with
    ``segmenter.options`` (the serving options, background threshold
    included), a student with the dense mode it records and the serving
    background threshold.
    """
    config = config or GateConfig()
    bg_threshold = segmenter.options.bg_threshold
    active = registry.active(project)
    baseline_name, current = "maskclip", maskclip_predictor(segmenter, labels)
    if active is not None:
        previous = StudentCheckpoint.load(active.checkpoint, segmenter.clip.device)
        if previous.labels == checkpoint.labels and previous.prompts == checkpoint.prompts:
            baseline_name = active.name
            current = student_predictor(StudentSegmenter(segmenter, previous), bg_threshold)
    if not any(item.labels is not None for item in held_out):
        return Verdict(
            False,
            "kept, not promoted: at least two accepted annotations are needed to hold one out for judging",
            baseline=baseline_name,
        )
    candidate = student_predictor(StudentSegmenter(segmenter, checkpoint), bg_threshold)
    new, old, ours, theirs = compare(candidate, current, held_out, len(checkpoint.labels), config)
    return decide(new, old, ours, theirs, config, baseline_name)
