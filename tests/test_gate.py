"""The promotion gate: scores both sides as the backend serves them, promotes on clear evidence, keeps ties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maskclip_engine import LabelSet, Segmenter
from maskclip_engine.miou import scores
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.gate import GateConfig, bootstrap_gain, decide, evaluate, judge
from maskclip_engine.students.network import StudentConfig, StudentNet
from maskclip_engine.students.registry import ModelRegistry
from maskclip_engine.students.serving import StudentSegmenter
from maskclip_engine.students.training import TrainConfig, TrainingImage, train_student
from tests.scenes import CLASSES, make_scene

LABELS = LabelSet.parse(CLASSES)
PROJECT = 5


@pytest.fixture(scope="module")
def segmenter(vit_segmenter: Segmenter) -> Segmenter:
    return vit_segmenter.with_options(vit_segmenter.options.replace(short_side=128))


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


def test_a_clearly_better_student_is_promoted_on_two_small_held_out_images(
    segmenter, trained, untrained, held_out, tmp_path
) -> None:
    registry = active_registry(tmp_path, untrained)
    verdict = judge(segmenter, registry, PROJECT, trained, LABELS, held_out)
    assert verdict.baseline == f"student-p{PROJECT}-v1"
    assert verdict.pixels == sum(item.labels.size for item in held_out) == 2 * 128 * 160
    assert verdict.units == 2 * 16  # each image cut into 4 x 4 blocks
    assert verdict.candidate > verdict.current and verdict.promoted, verdict.reason
    assert 0 < verdict.gain_low <= verdict.candidate - verdict.current <= verdict.gain_high
    assert verdict.reason.startswith("promoted:") and "95% bound" in verdict.reason


def test_a_tie_keeps_the_current_model(segmenter, trained, held_out, tmp_path) -> None:
    registry = active_registry(tmp_path, trained)
    same = checkpoint(trained.net, segmenter)
    verdict = judge(segmenter, registry, PROJECT, same, LABELS, held_out)
    assert verdict.candidate == verdict.current and not verdict.promoted
    assert verdict.gain_low == verdict.gain_high == 0.0
    assert "does not clear the margin" in verdict.reason
    # A real gain whose lower bound stays within the margin keeps it too.
    strict = GateConfig(margin=0.99)
    ahead = judge(segmenter, ModelRegistry(tmp_path / "none"), PROJECT, trained, LABELS, held_out, strict)
    assert ahead.candidate > ahead.current and not ahead.promoted and "MASKCLIP_GATE_MARGIN" in ahead.reason


def test_the_bootstrap_separates_a_consistent_gain_from_a_mixed_one() -> None:
    """Hand-built block counts: winning on every block is evidence, winning on half and losing on half is not."""

    def block(right: int, wrong: int) -> np.ndarray:  # two classes, 100 pixels of class 0 and 100 of class 1
        matrix = np.zeros((2, 3), dtype=np.int64)
        matrix[0, 0], matrix[0, 1] = right, wrong
        matrix[1, 1], matrix[1, 0] = right, wrong
        return matrix

    better = np.stack([block(95, 5)] * 8)
    worse = np.stack([block(80, 20)] * 8)
    gain, low, high = bootstrap_gain(better, worse, GateConfig())
    assert gain > 0.2 and low > 0.2 and high >= gain
    mixed = np.stack([block(95, 5), block(60, 40)] * 4)
    steady = np.stack([block(80, 20)] * 8)
    gain, low, high = bootstrap_gain(mixed, steady, GateConfig())
    assert low < 0 < high
    verdict = decide(scores(mixed.sum(0)), scores(steady.sum(0)), mixed, steady, GateConfig(), "maskclip")
    assert not verdict.promoted and verdict.gain_low < 0


def test_both_sides_are_scored_with_the_serving_background_threshold(
    segmenter, trained, untrained, held_out, tmp_path
) -> None:
    serving = segmenter.with_options(segmenter.options.replace(bg_threshold=0.9))
    registry = active_registry(tmp_path, untrained)
    verdict = judge(serving, registry, PROJECT, trained, LABELS, held_out)
    num = len(CLASSES)

    def served(student: StudentCheckpoint, threshold: float) -> float:
        model = StudentSegmenter(serving, student)
        return evaluate(lambda image: model.segment(image, threshold).label_map, held_out, num).miou

    assert verdict.candidate == served(trained, 0.9) != served(trained, 0.0)
    assert verdict.current == served(untrained, 0.9) != served(untrained, 0.0)
    # With no student active the baseline is MaskCLIP as the backend runs it: the same threshold.
    fresh = judge(serving, ModelRegistry(tmp_path / "fresh"), PROJECT, trained, LABELS, held_out)
    maskclip = evaluate(lambda image: serving.segment(image, LABELS).label_map, held_out, num).miou
    plain = evaluate(lambda image: serving.segment(image, LABELS, bg_threshold=0.0).label_map, held_out, num).miou
    assert fresh.baseline == "maskclip" and fresh.current == maskclip != plain


def test_a_student_for_other_synonyms_is_not_the_baseline(segmenter, trained, untrained, held_out, tmp_path) -> None:
    registry = active_registry(tmp_path, untrained)
    renamed = StudentCheckpoint(trained.net, LABELS.names, [["ground", "soil"], ["red disc"], ["blue box"]], {})
    verdict = judge(segmenter, registry, PROJECT, renamed, LABELS, held_out)
    assert verdict.baseline == "maskclip"


def test_without_held_out_images_nothing_is_promoted(segmenter, trained, tmp_path) -> None:
    verdict = judge(segmenter, ModelRegistry(tmp_path), PROJECT, trained, LABELS, [])
    assert not verdict.promoted and verdict.candidate is None and "two accepted annotations" in verdict.reason


def test_untrained_student_matches_maskclip_argmax_without_refinement(segmenter, untrained, held_out) -> None:
    """Sanity for the baseline above: the untrained student is MaskCLIP without key smoothing or denoising."""
    image = held_out[0].image
    student = StudentSegmenter(segmenter, untrained).segment(image).label_map
    plain = segmenter.segment(image, LABELS, key_smoothing=False, prompt_denoising=False).label_map
    assert (student == plain).mean() > 0.95
