"""Annotation review: which accepted annotations are probably wrong, judged by models that never trained on them.

Every annotated image gets out-of-sample class probabilities: the annotated
images are split into ``folds``; for each fold a ``clip`` student is trained on
the other folds' annotations (and the unannotated images' pseudo-labels) and
labels the fold's images. Students train on the stored CLIP feature grids, so
a fold costs a fraction of a training job. With too few annotations for folds,
MaskCLIP itself (which trains on no annotation) is the judge.

Then confident learning (Northcutt, Jiang and Chuang, JAIR 2021), per pixel:

* each label ``j`` gets a threshold ``t_j``: the mean probability the judges
  give ``j`` on the pixels annotated ``j`` (how sure they are where they agree);
* a pixel annotated ``i`` is *suspect* when, among the labels whose
  probability reaches their threshold there, the likeliest is another label
  ``j`` (the "confident joint" off its diagonal): ``j`` is what the models expect;
* in a project whose annotations label (nearly) every pixel, an unlabelled
  pixel is suspect too (a missing region), and the label it lacks is the
  judges' likeliest there, whether or not it reaches its threshold. An
  unlabelled region wider than a gap between brush strokes makes its
  annotation surely wrong, whatever label the judges expect there.

Each annotation's per-label suspect fraction looks from both sides of a label
(see :func:`judge_annotation`); its quality score is one minus the largest
fraction: 0 means surely wrong, 1 consistent with the models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from maskclip_engine.errors import InvalidOptionError
from maskclip_engine.labels import LabelSet
from maskclip_engine.segmenter import Segmenter
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.serving import StudentSegmenter
from maskclip_engine.students.training import TrainConfig, TrainingImage, train_student

Progress = Callable[[dict], None]


@dataclass(frozen=True)
class ReviewConfig:
    folds: int = 4
    iterations: int = 200  # the most training steps of each fold's student
    crop: int = 320  # its training crop (pixels of the resized image)
    lr: float = 0.01
    min_fraction: float = 0.002  # a label covering less of an image is not scored for it
    full_coverage: float = 0.95  # annotations labelling this share of their pixels on average: unlabelled = missing
    gap: float = 0.02  # there, unlabelled strips narrower than this share of the short side are gaps between strokes
    flag_below: float = 0.5  # annotations scoring below this are flagged as probably wrong
    seed: int = 0
    min_iterations: int = 120  # the fewest steps a fold's student runs (TrainConfig.min_iterations)

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise InvalidOptionError("a review needs at least 2 folds, so that no image is judged by its own model.")
        if not 0 <= self.gap < 1:
            raise InvalidOptionError("gap is a share of the image's short side, between 0 and 1.")


@dataclass
class AnnotationReview:
    """One annotation's verdict. ``suspect`` and ``expected`` (the judges' label per pixel) are ``HxW``
    at the annotation's label map size."""

    index: int  # into the reviewed items
    score: float
    labels: dict[str, float]  # suspect fraction per label
    expects: dict[str, str]  # per label with suspect pixels: the label the models expect there most
    suspect: np.ndarray
    expected: np.ndarray
    judge: str  # "students" (out of fold) or "maskclip"

    @property
    def flagged_labels(self) -> list[str]:
        return [name for name, fraction in self.labels.items() if fraction > 0]


def out_of_sample_probabilities(
    segmenter: Segmenter,
    annotated: Sequence[TrainingImage],
    unannotated: Sequence[TrainingImage],
    labels: LabelSet,
    config: ReviewConfig,
    progress: Progress | None = None,
) -> tuple[list[torch.Tensor], str]:
    """``[C, H, W]`` probabilities for each annotated item (its label map's size) from models that did not
    train on it, and which judge gave them."""
    if len(annotated) < 2 * config.folds:
        if progress:
            progress({"phase": "judging with MaskCLIP", "fold": 0, "folds": 0})
        return [_maskclip_probabilities(segmenter, item, labels) for item in annotated], "maskclip"
    order = np.random.default_rng(config.seed).permutation(len(annotated))
    folds = np.array_split(order, config.folds)
    out: list[torch.Tensor | None] = [None] * len(annotated)
    train_config = TrainConfig(
        iterations=config.iterations,
        crop=config.crop,
        lr=config.lr,
        seed=config.seed,
        min_iterations=config.min_iterations,
    )
    for number, fold in enumerate(folds):
        held = set(fold.tolist())
        train = [item for i, item in enumerate(annotated) if i not in held] + list(unannotated)

        def step(fields: dict, number: int = number) -> None:
            if progress:
                progress({**fields, "phase": "training fold students", "fold": number + 1, "folds": config.folds})

        net = train_student(segmenter, train, labels, train_config, progress=step)
        student = StudentSegmenter(segmenter, StudentCheckpoint(net, labels.names, labels.synonyms_lists, {}))
        for i in fold.tolist():
            item = annotated[i]
            probs = student.probabilities(item.image, item.features)
            out[i] = _resized(probs, item.labels.shape)  # type: ignore[union-attr]
    return out, "students"  # type: ignore[return-value]


def _maskclip_probabilities(segmenter: Segmenter, item: TrainingImage, labels: LabelSet) -> torch.Tensor:
    features = item.features or segmenter.encode(item.image)
    state = segmenter.state_from_features(features, labels)
    return _resized(state.probs, item.labels.shape)  # type: ignore[union-attr]


def _resized(probs: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(probs[None].float().cpu(), size=shape, mode="bilinear", align_corners=False)[0]


def label_thresholds(probabilities: Sequence[torch.Tensor], truths: Sequence[np.ndarray], count: int) -> np.ndarray:
    """Confident learning's per-label thresholds: each label's mean probability where it is annotated."""
    sums, pixels = np.zeros(count), np.zeros(count)
    for probs, truth in zip(probabilities, truths):
        flat = probs.reshape(count, -1).numpy()
        labelled = truth.ravel()
        for j in range(count):
            where = labelled == j
            sums[j] += flat[j, where].sum()
            pixels[j] += where.sum()
    with np.errstate(invalid="ignore"):
        return np.where(pixels > 0, sums / np.maximum(pixels, 1), 1.0)


def suspect_pixels(
    probs: torch.Tensor, truth: np.ndarray, thresholds: np.ndarray, missing: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``HxW`` suspect mask and the judges' confident label per pixel (-1: none reaches its threshold)."""
    values = probs.numpy()
    confident = values >= thresholds[:, None, None]
    ranked = np.where(confident, values, -1.0)
    expected = ranked.argmax(0)
    expected[~confident.any(0)] = -1
    annotated = truth >= 0
    suspect = annotated & (expected >= 0) & (expected != truth)
    if missing:
        # Where annotations label every pixel, an unlabelled pixel is a mistake whatever the judges' confidence;
        # the label it lacks is their likeliest there (no threshold: no annotated label competes with it).
        hole = ~annotated
        expected = np.where(hole, values.argmax(0), expected)
        suspect |= hole
    return suspect, expected


def unpainted_regions(truth: np.ndarray, gap: float) -> np.ndarray:
    """The unlabelled pixels of ``truth`` (-1) left after a morphological opening that removes strips narrower
    than ``gap`` of the short side: regions nobody painted, not the gaps between brush strokes."""
    size = 2 * round(gap * min(truth.shape) / 2) + 1  # odd, so the opening stays centred
    hole = torch.from_numpy(truth < 0)[None, None].float()
    if size <= 1:
        return hole[0, 0].numpy() > 0

    def dilate(mask: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(mask, size, stride=1, padding=size // 2)

    return dilate(1 - dilate(1 - hole))[0, 0].numpy() > 0  # erode, then dilate


def judge_annotation(
    index: int,
    truth: np.ndarray,
    suspect: np.ndarray,
    expected: np.ndarray,
    names: Sequence[str],
    config: ReviewConfig,
    judge: str,
    unpainted: np.ndarray | None = None,
) -> AnnotationReview:
    """Per-label suspect fractions and the quality score of one annotation.

    A label's suspect fraction counts its pixels both ways: the pixels
    annotated with it that the models see as another label, and the pixels the
    models expect it on that the annotation gives another label or none. The
    score is one minus the worst fraction, among labels covering at least
    ``min_fraction`` of the image either way: a region given the wrong label
    is nearly all suspect from the side of the label it should have had.

    ``unpainted`` (in projects that label every pixel, :func:`unpainted_regions`): a region left unlabelled,
    at least ``min_fraction`` of the image, is wholly suspect for the label the judges expect there most, so
    its annotation scores 0 even where the judges mistake the missing object for its surroundings.
    """
    fractions: dict[str, float] = {}
    expects: dict[str, str] = {}
    floor = max(1.0, config.min_fraction * truth.size)
    worst = 0.0
    for j, name in enumerate(names):
        mine, theirs = truth == j, expected == j
        if not mine.any() and not theirs.any():
            continue
        given_wrongly = suspect & mine  # annotated j, expected otherwise
        taken_away = suspect & theirs  # expected j, annotated otherwise (or not at all)
        annotated_side = given_wrongly.sum() / mine.sum() if mine.sum() >= floor else 0.0
        expected_side = taken_away.sum() / theirs.sum() if theirs.sum() >= floor else 0.0
        fractions[name] = round(float(max(annotated_side, expected_side)), 4)
        worst = max(worst, fractions[name])
        if given_wrongly.any():
            expects[name] = names[int(np.bincount(expected[given_wrongly], minlength=len(names)).argmax())]
    if unpainted is not None and unpainted.sum() >= floor:
        lacking = names[int(np.bincount(expected[unpainted], minlength=len(names)).argmax())]
        fractions[lacking] = worst = 1.0
    return AnnotationReview(index, round(1.0 - worst, 4), fractions, expects, suspect, expected, judge)


def review_annotations(
    segmenter: Segmenter,
    annotated: Sequence[TrainingImage],
    unannotated: Sequence[TrainingImage],
    labels: LabelSet,
    config: ReviewConfig | None = None,
    progress: Progress | None = None,
) -> list[AnnotationReview]:
    """Every annotated item judged out of sample; most suspect first."""
    config = config or ReviewConfig()
    items = [item for item in annotated if item.labels is not None]
    if len(items) != len(annotated):
        raise InvalidOptionError("every reviewed item needs its annotation's label map.")
    if not items:
        return []
    probabilities, judge = out_of_sample_probabilities(segmenter, items, unannotated, labels, config, progress)
    truths = [item.labels for item in items]
    thresholds = label_thresholds(probabilities, truths, len(labels))  # type: ignore[arg-type]
    coverage = float(np.mean([(truth >= 0).mean() for truth in truths]))  # type: ignore[union-attr]
    missing = coverage >= config.full_coverage
    reviews = []
    for index, (probs, truth) in enumerate(zip(probabilities, truths)):
        suspect, expected = suspect_pixels(probs, truth, thresholds, missing)  # type: ignore[arg-type]
        unpainted = unpainted_regions(truth, config.gap) if missing else None  # type: ignore[arg-type]
        reviews.append(
            judge_annotation(index, truth, suspect, expected, labels.names, config, judge, unpainted)  # type: ignore[arg-type]
        )
        if progress:
            progress({"phase": "judging", "judged": index + 1, "annotations": len(items)})
    return sorted(reviews, key=lambda r: (r.score, r.index))
