"""Task scores: each candidate on hand-built probability maps, and the score a prediction carries."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.bench_active_learning import (
    STRATEGIES,
    Served,
    StudyConfig,
    annotations_needed,
    encoded_scenes,
    maskclip_served,
    next_tasks,
    run_seed,
)
from ls_integration.label_config import parse_label_config
from ls_integration.predictor import Predictor
from maskclip_engine import LabelSet, SegmentOptions
from maskclip_engine.students.network import StudentConfig
from maskclip_engine.students.training import TrainConfig
from maskclip_engine.task_scores import KINDS, acquisition_scores
from maskclip_service.errors import ConfigurationError
from maskclip_service.settings import Settings
from tests.conftest import scene
from tests.scenes import CLASSES


def grid(*cells: tuple[float, ...], repeat: int = 1) -> torch.Tensor:
    """``[C, 1, N]`` probabilities, one cell per tuple (each repeated ``repeat`` times)."""
    return torch.tensor([cell for cell in cells for _ in range(repeat)]).T[:, None, :]


CONFIDENT = grid((0.9, 0.1), repeat=100)
COIN = grid((0.5, 0.5), repeat=100)
# 95 cells sure of label 0, 5 cells where label 1 wins without conviction.
SMALL_UNSURE = torch.cat([grid((0.95, 0.05), repeat=95), grid((0.4, 0.6), repeat=5)], dim=2)


def test_a_confident_map() -> None:
    entropy = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert acquisition_scores(CONFIDENT) == pytest.approx(
        {"top1": 0.9, "margin": 0.8, "entropy": 1 - entropy, "class_min": 0.9}, abs=1e-6
    )


def test_a_coin_toss_map_scores_lowest_on_every_kind() -> None:
    coin = acquisition_scores(COIN)
    assert coin == pytest.approx({"top1": 0.5, "margin": 0.0, "entropy": 0.0, "class_min": 0.5}, abs=1e-6)
    confident = acquisition_scores(CONFIDENT)
    assert all(coin[kind] < confident[kind] for kind in KINDS)


def test_only_class_min_puts_a_small_unsure_label_first() -> None:
    unsure = acquisition_scores(SMALL_UNSURE)
    assert unsure["top1"] == pytest.approx((95 * 0.95 + 5 * 0.6) / 100)
    assert unsure["margin"] == pytest.approx((95 * 0.9 + 5 * 0.2) / 100)
    assert unsure["class_min"] == pytest.approx(0.6)  # label 1's mean top-1 where it wins
    confident = acquisition_scores(CONFIDENT)
    # The image-wide means find this image surer than the uniformly confident one; class_min does not.
    for kind in ("top1", "margin", "entropy"):
        assert unsure[kind] > confident[kind]
    assert unsure["class_min"] < confident["class_min"]


def test_uniform_over_three_labels_has_no_information() -> None:
    scores = acquisition_scores(torch.full((3, 4, 5), 1 / 3))
    assert scores["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert scores["margin"] == pytest.approx(0.0, abs=1e-6)
    assert scores["top1"] == pytest.approx(1 / 3)


def test_one_label_is_certain() -> None:
    assert acquisition_scores(torch.ones(1, 3, 4)) == pytest.approx(
        {"top1": 1.0, "margin": 1.0, "entropy": 1.0, "class_min": 1.0}
    )


def test_class_min_leaves_out_labels_winning_under_one_percent() -> None:
    sure = (0.95, 0.05)
    tiny = torch.cat([grid(sure, repeat=199), grid((0.3, 0.7))], dim=2)  # label 1 wins 0.5% of the grid
    assert acquisition_scores(tiny)["class_min"] == pytest.approx(0.95)
    one_percent = torch.cat([grid(sure, repeat=198), grid((0.3, 0.7), repeat=2)], dim=2)
    assert acquisition_scores(one_percent)["class_min"] == pytest.approx(0.7)


def test_scores_do_not_depend_on_the_grid_layout() -> None:
    flat = acquisition_scores(SMALL_UNSURE)
    square = acquisition_scores(SMALL_UNSURE.reshape(2, 10, 10))
    assert square == pytest.approx(flat)


def test_settings_accept_every_kind_and_nothing_else() -> None:
    for kind in KINDS:
        Settings(task_score=kind).validate()
    with pytest.raises(ConfigurationError, match="MASKCLIP_TASK_SCORE"):
        Settings(task_score="variance").validate()


CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Wall"/><Label value="Grass"/><Label value="Sky"/></BrushLabels>
</View>"""


def test_a_prediction_carries_the_chosen_task_score(tiny_vit, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    image = scene(96, 160, seed=3)
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    settings = Settings(
        model=str(tiny_vit.config),
        pretrained=str(tiny_vit.state_dict),
        device="cpu",
        local_files_root=tmp_path,
        cache_dir=tmp_path / "cache",
        model_dir=tmp_path / "models",
        segment=SegmentOptions(short_side=64),
    )
    base = Predictor.from_settings(settings)
    schema = parse_label_config(CONFIG)
    expected = base.segmenter.segment(image, [list(p) for p in schema.controls[0].prompts]).task_scores
    task = {"id": 1, "data": {"image": "/data/local-files/?d=images/a.png"}}
    served = {}
    for kind in KINDS:
        predictor = Predictor(base.segmenter, settings.replace(task_score=kind))
        served[kind] = predictor.predict([task], schema)[0]["score"]
        assert served[kind] == pytest.approx(round(expected[kind], 4), abs=1e-9)
    assert len(set(served.values())) > 1, "the kinds must differ on this image for the test to tell them apart"


def test_annotations_needed_interpolates() -> None:
    assert annotations_needed([0.5, 0.6, 0.8], [4, 8, 12], 0.7) == pytest.approx(10.0)
    assert annotations_needed([0.5, 0.6, 0.8], [4, 8, 12], 0.4) == 4.0
    assert annotations_needed([0.5, 0.6, 0.8], [4, 8, 12], 0.9) is None


def test_the_next_tasks_are_the_lowest_scores() -> None:
    pool = [{"top1": s} for s in (0.9, 0.2, 0.5, 0.1, 0.7)]
    active = Served("fake", lambda item: item, None, np.zeros(0))
    assert next_tasks("top1", active, pool, [0, 1, 2, 4], 2, None) == [1, 2]
    picks = next_tasks("random", active, pool, [0, 1, 2, 4], 2, np.random.default_rng(0))
    assert len(set(picks)) == 2 and set(picks) <= {0, 1, 2, 4}


def test_the_study_loop_on_tiny_sizes(vit_segmenter) -> None:
    segmenter = vit_segmenter.with_options(vit_segmenter.options.replace(short_side=64))
    config = StudyConfig(
        pool=6,
        held_out=2,
        start=2,
        step=2,
        budget=4,
        reference=4,
        height=64,
        width=80,
        train=TrainConfig(iterations=2, crop=64, lr=0.1, self_training_after=0.0),
        student=StudentConfig(backbone="clip", hidden=8),
    )
    labels = LabelSet.parse(CLASSES)
    held_out = encoded_scenes(segmenter, config.held_out, 500, config)
    pool = encoded_scenes(segmenter, config.pool, 600, config)
    curves, by_maskclip = run_seed(
        segmenter, labels, pool, held_out, maskclip_served(segmenter, labels, held_out, config), config, 0
    )
    assert set(curves) == set(STRATEGIES)
    assert all(len(curve) == len(config.schedule) and all(0 <= v <= 1 for v in curve) for curve in curves.values())
    assert len({curve[0] for curve in curves.values()}) == 1  # every strategy starts from the same tasks
    assert 0 <= by_maskclip <= len(KINDS)
