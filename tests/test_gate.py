"""The promotion gate: scores both sides as the backend serves them, needs enough held-out pixels, keeps ties."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskclip_engine import LabelSet, Segmenter
from maskclip_engine.registry import ModelRegistry
from maskclip_engine.student import StudentCheckpoint, StudentConfig, StudentNet
from maskclip_engine.student_segmenter import StudentSegmenter
from maskclip_engine.training import TrainConfig, TrainingImage, evaluate, train_student
from tests.scenes import CLASSES, make_scene
from workers.jobs import judge

LABELS = LabelSet.parse(CLASSES)
PROJECT = 5


@pytest.fixture(scope="module")
def segmenter(vit_segmenter: Segmenter) -> Segmenter:
    return Segmenter(vit_segmenter.clip, vit_segmenter.options.replace(short_side=128), vit_segmenter.text)


@pytest.fixture(scope="module")
def held_out() -> list[TrainingImage]:
    return [TrainingImage(*make_scene(700 + i)) for i in range(2)]


def checkpoint(net: StudentNet, segmenter: Segmenter) -> StudentCheckpoint:
    return StudentCheckpoint(net, LABELS.names, [list(s) for s in LABELS.synonyms], {}, options=segmenter.options)


@pytest.fixture(scope="module")
def trained(segmenter: Segmenter) -> StudentCheckpoint:
    images = [TrainingImage(*make_scene(i)) for i in range(6)]
    config = TrainConfig(iterations=40, batch_size=2, crop=64, lr=0.05, self_training_after=1.0)
    return checkpoint(train_student(segmenter, images, LABELS, config), segmenter)


@pytest.fixture(scope="module")
def untrained(segmenter: Segmenter) -> StudentCheckpoint:
    return checkpoint(StudentNet(StudentConfig(), segmenter.text_embeddings(LABELS)).eval(), segmenter)


def active_registry(tmp_path: Path, student: StudentCheckpoint) -> ModelRegistry:
    registry = ModelRegistry(tmp_path)
    registry.activate(registry.add(PROJECT, student))
    return registry


def test_a_better_student_is_promoted_over_the_active_one(segmenter, trained, untrained, held_out, tmp_path) -> None:
    registry = active_registry(tmp_path, untrained)
    verdict = judge(segmenter, registry, PROJECT, trained, LABELS, held_out, min_pixels=1000, margin=0.005)
    assert verdict.baseline == f"student-p{PROJECT}-v1"
    assert verdict.pixels == sum(item.labels.size for item in held_out) == 2 * 128 * 160
    assert verdict.candidate > verdict.current + 0.005 and verdict.promoted, verdict.reason
    assert verdict.reason.startswith("promoted:")


def test_too_few_held_out_pixels_keep_the_current_model(segmenter, trained, untrained, held_out, tmp_path) -> None:
    registry = active_registry(tmp_path, untrained)
    verdict = judge(segmenter, registry, PROJECT, trained, LABELS, held_out, min_pixels=50_000, margin=0.005)
    assert not verdict.promoted and verdict.candidate > verdict.current  # better, but judged on too little
    assert "only 40960 labelled pixels" in verdict.reason
    assert "MASKCLIP_GATE_MIN_PIXELS asks for 50000" in verdict.reason


def test_a_tie_keeps_the_current_model(segmenter, trained, held_out, tmp_path) -> None:
    registry = active_registry(tmp_path, trained)
    same = checkpoint(trained.net, segmenter)
    verdict = judge(segmenter, registry, PROJECT, same, LABELS, held_out, min_pixels=0, margin=0.0)
    assert verdict.candidate == verdict.current and not verdict.promoted
    assert "does not beat" in verdict.reason
    # A real gain within the margin keeps it too.
    ahead = judge(segmenter, ModelRegistry(tmp_path / "none"), PROJECT, trained, LABELS, held_out, 0, margin=0.99)
    assert ahead.candidate > ahead.current and not ahead.promoted and "MASKCLIP_GATE_MARGIN=0.99" in ahead.reason


def test_both_sides_are_scored_with_the_serving_background_threshold(
    segmenter, trained, untrained, held_out, tmp_path
) -> None:
    serving = Segmenter(segmenter.clip, segmenter.options.replace(bg_threshold=0.9), segmenter.text)
    registry = active_registry(tmp_path, untrained)
    verdict = judge(serving, registry, PROJECT, trained, LABELS, held_out, min_pixels=0, margin=0.0)
    num = len(CLASSES)

    def served(student: StudentCheckpoint, threshold: float) -> float:
        model = StudentSegmenter(serving, student)
        return evaluate(lambda image: model.segment(image, threshold).label_map, held_out, num).miou

    assert verdict.candidate == served(trained, 0.9) != served(trained, 0.0)
    assert verdict.current == served(untrained, 0.9) != served(untrained, 0.0)
    # With no student active the baseline is MaskCLIP as the backend runs it: the same threshold.
    fresh = judge(serving, ModelRegistry(tmp_path / "fresh"), PROJECT, trained, LABELS, held_out, 0, 0.0)
    maskclip = evaluate(lambda image: serving.segment(image, LABELS).label_map, held_out, num).miou
    plain = evaluate(lambda image: serving.segment(image, LABELS, bg_threshold=0.0).label_map, held_out, num).miou
    assert fresh.baseline == "maskclip" and fresh.current == maskclip != plain


def test_a_student_for_other_synonyms_is_not_the_baseline(segmenter, trained, untrained, held_out, tmp_path) -> None:
    registry = active_registry(tmp_path, untrained)
    renamed = StudentCheckpoint(trained.net, LABELS.names, [["ground", "soil"], ["red disc"], ["blue box"]], {})
    verdict = judge(segmenter, registry, PROJECT, renamed, LABELS, held_out, min_pixels=0, margin=0.0)
    assert verdict.baseline == "maskclip"


def test_without_held_out_images_nothing_is_promoted(segmenter, trained, tmp_path) -> None:
    verdict = judge(segmenter, ModelRegistry(tmp_path), PROJECT, trained, LABELS, [], min_pixels=0, margin=0.0)
    assert not verdict.promoted and verdict.candidate is None and "two accepted annotations" in verdict.reason


def test_untrained_student_matches_maskclip_argmax_without_refinement(segmenter, untrained, held_out) -> None:
    """Sanity for the baseline above: the untrained student is MaskCLIP without key smoothing or denoising."""
    image = held_out[0].image
    student = StudentSegmenter(segmenter, untrained).segment(image).label_map
    plain = segmenter.segment(image, LABELS, key_smoothing=False, prompt_denoising=False).label_map
    assert (student == plain).mean() > 0.95
