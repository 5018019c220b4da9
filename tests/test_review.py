"""Annotation review on generated scenes whose errors are known: swapped labels, dilated regions, missing ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskclip_engine import LabelSet, Segmenter
from maskclip_engine.review.confident_learning import (
    ReviewConfig,
    judge_annotation,
    label_thresholds,
    review_annotations,
    suspect_pixels,
    unpainted_regions,
)
from maskclip_engine.review.report import ReviewedItem, latest_review, mark_latest, new_review_folder, write_report
from maskclip_engine.students.training import TrainingImage
from tests.scenes import CLASSES, make_scene

LABELS = LabelSet.parse(CLASSES)
DISC, BOX = 1, 2


def inject(labels: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The annotation with one error of ``kind``, and the pixels the error touched."""
    wrong = labels.copy()
    if kind == "swap":  # the disc annotated as the box
        touched = labels == DISC
        wrong[touched] = BOX
    elif kind == "dilate":  # the disc painted 6 pixels over its neighbours
        disc = torch.from_numpy(labels == DISC).float()[None, None]
        grown = F.max_pool2d(disc, 13, stride=1, padding=6)[0, 0].numpy() > 0
        touched = grown & (labels != DISC)
        wrong[touched] = DISC
    elif kind == "missing":  # the box never painted
        touched = labels == BOX
        wrong[touched] = -1
    else:
        raise ValueError(kind)
    return wrong, touched


@pytest.fixture(scope="module")
def segmenter(vit_segmenter: Segmenter) -> Segmenter:
    return vit_segmenter.with_options(vit_segmenter.options.replace(short_side=128))


@pytest.fixture(scope="module")
def reviewed(segmenter: Segmenter):
    items, injected = [], {}
    kinds = {3: "swap", 7: "swap", 11: "missing", 15: "missing", 19: "dilate", 22: "dilate"}
    for i in range(24):
        image, labels = make_scene(300 + i)
        if i in kinds:
            labels, touched = inject(labels, kinds[i])
            injected[i] = (kinds[i], touched)
        items.append(TrainingImage(image, labels))
    plain = [TrainingImage(make_scene(600 + i)[0]) for i in range(4)]
    # The tiny model needs more steps than ViT-B/16's decoder: 200, not the floor of 120.
    config = ReviewConfig(folds=4, iterations=200, crop=128, lr=0.05, min_iterations=200)
    reviews = review_annotations(segmenter, items, plain, LABELS, config)
    return items, injected, reviews, config


def test_swapped_and_missing_regions_rank_first(reviewed) -> None:
    items, injected, reviews, config = reviewed
    assert len(reviews) == len(items) and reviews[0].judge == "students"
    assert [r.score for r in reviews] == sorted(r.score for r in reviews)  # most suspect first
    certain = {i for i, (kind, _) in injected.items() if kind in ("swap", "missing")}
    assert certain <= {r.index for r in reviews[:5]}, [(r.index, r.score) for r in reviews[:8]]
    flagged = {r.index for r in reviews if r.score < config.flag_below}
    # The judges are small students on a tiny random model: they miss a few small regions of clean images too.
    assert certain <= flagged and len(flagged - set(injected)) <= 3, sorted(flagged)


def test_suspect_pixels_are_the_injected_ones_and_name_the_expected_label(reviewed) -> None:
    items, injected, reviews, _ = reviewed
    by_index = {r.index: r for r in reviews}
    for index, (kind, touched) in injected.items():
        review = by_index[index]
        if kind == "dilate":
            continue  # reported, not asserted: a thin band is where the models' own edges are least sure
        found = (review.suspect & touched).sum()
        recall, precision = found / touched.sum(), found / max(1, review.suspect.sum())
        assert recall > 0.4 and precision > 0.6, (index, kind, recall, precision)
        if kind == "swap":  # seen from the label the disc should have had, and naming it
            assert review.labels["red disc"] > 0.5 and review.expects["blue box"] == "red disc"
        else:  # the box, expected where nothing was painted
            assert review.labels["blue box"] > 0.5
    clean = [r for r in reviews if r.index not in injected]
    assert np.median([r.suspect.mean() for r in clean]) < 0.02


def test_confident_learning_on_hand_built_probabilities() -> None:
    """One label's threshold is what the judges give it where it is annotated; a pixel is suspect only where
    another label clears its own threshold and beats the annotated one."""
    truth = np.array([[0, 0, 1, 1]])
    probs = torch.tensor([[[0.9, 0.2, 0.3, 0.1]], [[0.1, 0.8, 0.7, 0.9]]])
    thresholds = label_thresholds([probs], [truth], 2)
    np.testing.assert_allclose(thresholds, [(0.9 + 0.2) / 2, (0.7 + 0.9) / 2])
    suspect, expected = suspect_pixels(probs, truth, thresholds, missing=False)
    assert suspect.tolist() == [[False, True, False, False]] and expected.tolist() == [[0, 1, -1, 1]]
    review = judge_annotation(0, truth, suspect, expected, ["a", "b"], ReviewConfig(min_fraction=0), "students")
    # Seen from both sides: half of a's pixels are expected to be b, and half of where b is expected is not b.
    assert review.labels == {"a": 0.5, "b": 0.5} and review.expects == {"a": "b"} and review.score == 0.5
    # Unlabelled pixels count only in projects that label every pixel.
    holes = np.array([[0, -1, 1, 1]])
    assert not suspect_pixels(probs, holes, thresholds, missing=False)[0][0, 1]
    assert suspect_pixels(probs, holes, thresholds, missing=True)[0][0, 1]


def test_an_unpainted_region_is_surely_wrong_even_where_the_judges_see_its_surroundings() -> None:
    """In a project that labels every pixel, a region left unlabelled scores 0 though the judges expect the
    background there (they mistook the missing object for it); a gap between brush strokes does not."""
    truth = np.zeros((100, 100), dtype=np.int64)
    truth[:, 60:] = 1
    truth[20:40, 10:30] = -1  # a 20x20 region nobody painted
    truth[70:, 59:61] = -1  # a 2-pixel gap along the border between two strokes
    holes = unpainted_regions(truth, ReviewConfig().gap)
    assert holes.sum() == 400 and holes[20:40, 10:30].all()
    probs = torch.zeros(2, 100, 100)
    probs[0, :, :60], probs[1, :, 60:] = 0.9, 0.9  # the judges see only the two annotated labels
    probs[1, :, :60], probs[0, :, 60:] = 0.1, 0.1
    thresholds = np.array([0.5, 0.5])
    suspect, expected = suspect_pixels(probs, truth, thresholds, missing=True)
    names, config = ["ground", "grass"], ReviewConfig()
    review = judge_annotation(0, truth, suspect, expected, names, config, "students", holes)
    assert review.score == 0 and review.labels["ground"] == 1.0  # the label the judges expect in the region
    assert suspect[20:40, 10:30].all()
    # The same annotation with only the gap: a few suspect pixels, no verdict.
    truth[20:40, 10:30] = 0
    holes = unpainted_regions(truth, config.gap)
    assert not holes.any()
    suspect, expected = suspect_pixels(probs, truth, thresholds, missing=True)
    assert judge_annotation(0, truth, suspect, expected, names, config, "students", holes).score > 0.9


def test_the_report_lists_suspects_first_and_pictures_them(reviewed, tmp_path: Path) -> None:
    items, injected, reviews, config = reviewed
    shown = [ReviewedItem(100 + i, 500 + i, item.image, item.labels) for i, item in enumerate(items)]
    folder = new_review_folder(tmp_path, 9, "20261202T000000Z")
    summary = {"project": 9, "judge": "students", "flag_below": config.flag_below, "created": "now"}
    write_report(folder, reviews, shown, LABELS.names, summary, lambda t: f"http://ls/projects/9/data?task={t}", 5)
    assert latest_review(tmp_path, 9) is None  # not until it is complete and marked
    mark_latest(folder)
    assert latest_review(tmp_path, 9) == folder
    document = json.loads((folder / "review.json").read_text())
    rows = document["annotations"]
    assert [row["task"] for row in rows[:4]] == [100 + r.index for r in reviews[:4]]
    assert {"task", "annotation", "score", "labels"} <= set(rows[0]) and rows[0]["link"].endswith(str(rows[0]["task"]))
    assert sum("picture" in row for row in rows) == 5 and all((folder / r["picture"]).is_file() for r in rows[:5])
    page = (folder / "index.html").read_text()
    assert page.count("<img ") == 5 and "open in Label Studio" in page
