"""Students carry what they were trained under (dense mode, synonyms, refinements) and are served with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskclip_engine import LabelSet, Segmenter
from maskclip_engine.errors import InvalidOptionError, WeightsUnavailableError
from maskclip_engine.evaluation.evaluate import EvalConfig, config_predictor
from maskclip_engine.segmenter import label_logits
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.network import StudentConfig, StudentNet
from maskclip_engine.students.serving import StudentSegmenter, student_probabilities
from maskclip_engine.students.training import TrainConfig, TrainingImage, train_student
from tests.scenes import CLASSES, make_scene

SYNONYMS = LabelSet.parse(["ground", ["red disc", "crimson disc"], "blue box"])
TINY = TrainConfig(iterations=4, batch_size=2, crop=64, lr=0.05)


@pytest.fixture(scope="module")
def segmenter(vit_segmenter: Segmenter) -> Segmenter:
    return Segmenter(vit_segmenter.clip, vit_segmenter.options.replace(short_side=128), vit_segmenter.text)


@pytest.fixture(scope="module")
def naclip_student(segmenter: Segmenter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A student trained by a worker whose MaskCLIP runs NACLIP, saved as the job saves it."""
    naclip = Segmenter(segmenter.clip, segmenter.options.replace(dense_mode="naclip", bg_threshold=0.2), segmenter.text)
    images = [TrainingImage(*make_scene(i, 64, 80)) for i in range(4)]
    net = train_student(naclip, images, SYNONYMS, TINY)
    path = tmp_path_factory.mktemp("students") / "naclip.pt"
    StudentCheckpoint(net, SYNONYMS.names, [list(s) for s in SYNONYMS.synonyms], {}, options=naclip.options).save(path)
    return path


def test_a_student_is_served_with_the_dense_mode_it_was_trained_under(segmenter: Segmenter, naclip_student) -> None:
    assert segmenter.options.dense_mode == "maskclip"  # the serving process runs plain MaskCLIP
    loaded = StudentCheckpoint.load(naclip_student)
    assert loaded.dense_mode == "naclip" and loaded.options.bg_threshold == 0.2
    assert loaded.prompts == [["ground"], ["red disc", "crimson disc"], ["blue box"]]
    served = StudentSegmenter(segmenter, loaded)
    image = make_scene(99)[0]
    result = served.segment(image)
    on_naclip = student_probabilities(segmenter, loaded.net, image, "naclip")
    on_maskclip = student_probabilities(segmenter, loaded.net, image, "maskclip")
    assert (on_naclip - on_maskclip).abs().max() > 1e-3  # the two feature paths really differ for this student
    expected = F.interpolate(on_naclip[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    np.testing.assert_array_equal(result.label_map, expected.argmax(0).numpy())
    # What serving did before the mode was recorded: the same student on MaskCLIP's features, other outputs.
    as_maskclip = dataclasses.replace(loaded, options=loaded.options.replace(dense_mode="maskclip"))
    wrong = StudentSegmenter(segmenter, as_maskclip).segment(image)
    assert np.abs(wrong.confidence - result.confidence).max() > 1e-3
    torch.testing.assert_close(torch.from_numpy(result.confidence), expected.max(0).values, rtol=1e-4, atol=1e-4)


def test_one_synonym_rule_for_teacher_and_student(segmenter: Segmenter) -> None:
    """A feature close to "red disc" but far from "crimson disc": the best synonym makes it a red disc,
    while the mean of the two synonyms would lose to "blue box". Teacher and trained student agree."""
    text = F.normalize(segmenter.text.embed(SYNONYMS.prompts).float(), dim=-1)  # ground, red, crimson, box
    targets = torch.tensor([0.90, 0.95, 0.55, 0.92])
    feature = F.normalize(text.T @ torch.linalg.solve(text @ text.T, targets), dim=0)
    cosines = text @ feature
    mean_rule = F.normalize(text[1] + text[2], dim=0) @ feature
    assert float(mean_rule) < float(cosines[3]) < float(cosines[1])  # the rules disagree here

    features = feature.view(1, -1, 1, 1)
    owner = torch.tensor(SYNONYMS.owner)
    teacher = label_logits(features, text, owner, len(SYNONYMS))
    net = train_student(segmenter, [TrainingImage(*make_scene(5, 64, 80))], SYNONYMS, TrainConfig(1, 1, 64, lr=0.0))
    with torch.no_grad():
        student = net.classifier(features)
    assert int(teacher.argmax(1)) == int(student.argmax(1)) == 1
    torch.testing.assert_close(student / net.classifier.log_scale.exp(), teacher)


def write_format_1(path: Path, segmenter: Segmenter, info: dict) -> StudentNet:
    """A checkpoint as the first format stored it: mean synonym embeddings, no owner, no recorded options."""
    text = segmenter.text_embeddings(SYNONYMS)  # one renormalised mean per label, as students used to
    net = StudentNet(StudentConfig(), text)
    with torch.no_grad():
        net.head.project.weight.normal_(0, 0.02)
    payload = {
        "format": "maskclip-student/1",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(net.config).items()},
        "labels": SYNONYMS.names,
        "prompts": [list(s) for s in SYNONYMS.synonyms],
        "text_embeddings": net.classifier.text,
        "teacher": {"model": "tiny-vit"},
        "metrics": {"held_out_miou": 0.4},
        "info": info,
        "state_dict": net.state_dict(),
    }
    torch.save(payload, path)
    return net


def test_checkpoints_of_the_first_format_load_with_clear_defaults(segmenter: Segmenter, tmp_path: Path) -> None:
    net = write_format_1(tmp_path / "old.pt", segmenter, {"from_name": "tag"})
    old = StudentCheckpoint.load(tmp_path / "old.pt")
    assert old.dense_mode == "maskclip" and old.options.key_smoothing and old.options.bg_threshold == 0.0
    assert old.net.classifier.owner.tolist() == [0, 1, 2]  # served with the mean embeddings it was trained on
    image = make_scene(4)[0]
    np.testing.assert_array_equal(
        StudentSegmenter(segmenter, old).segment(image).label_map,
        StudentSegmenter(segmenter, StudentCheckpoint(net.eval(), old.labels, old.prompts, {}))
        .segment(image)
        .label_map,
    )
    write_format_1(tmp_path / "naclip.pt", segmenter, {"dense_mode": "naclip"})
    assert StudentCheckpoint.load(tmp_path / "naclip.pt").dense_mode == "naclip"


def test_recorded_options_are_checked(segmenter: Segmenter, tmp_path: Path) -> None:
    net = StudentNet(StudentConfig(), segmenter.text.embed(SYNONYMS.prompts), owner=torch.tensor(SYNONYMS.owner))
    path = tmp_path / "s.pt"
    StudentCheckpoint(net, SYNONYMS.names, [list(s) for s in SYNONYMS.synonyms], {}).save(path)
    payload = torch.load(path, weights_only=True)
    payload["options"]["a_later_option"] = 3  # from a newer version: ignored
    torch.save(payload, path)
    assert StudentCheckpoint.load(path).options.dense_mode == "maskclip"
    payload["options"]["dense_mode"] = "nonsense"
    torch.save(payload, path)
    with pytest.raises(WeightsUnavailableError, match="records invalid options"):
        StudentCheckpoint.load(path)


def test_eval_scores_a_student_under_its_own_dense_mode(segmenter: Segmenter, naclip_student: Path) -> None:
    config = EvalConfig.parse(f"student={naclip_student}")
    predict = config_predictor(segmenter, config, CLASSES, "none", 0.0)
    image = make_scene(12)[0]
    loaded = StudentCheckpoint.load(naclip_student)
    np.testing.assert_array_equal(predict(image), StudentSegmenter(segmenter, loaded).segment(image).label_map)
    with pytest.raises(InvalidOptionError, match="trained on 'naclip' features"):
        config_predictor(segmenter, EvalConfig.parse(f"student={naclip_student},dense_mode=sclip"), CLASSES, "none", 0)


@pytest.mark.parametrize("mode", ["scclip", "sfp"])
def test_students_trained_under_the_calibrated_modes_serve_with_them(vit12_segmenter: Segmenter, mode: str) -> None:
    """A worker whose MaskCLIP runs SC-CLIP or SFP trains a student on those features; a backend running plain
    MaskCLIP serves it on the same features (the 12-block tiny model: these modes read middle blocks)."""
    serving = Segmenter(vit12_segmenter.clip, vit12_segmenter.options.replace(short_side=128), vit12_segmenter.text)
    teacher = Segmenter(serving.clip, serving.options.replace(dense_mode=mode), serving.text)
    images = [TrainingImage(*make_scene(i, 64, 80)) for i in range(4)]
    net = train_student(teacher, images, SYNONYMS, TINY)
    prompts = [list(s) for s in SYNONYMS.synonyms]
    checkpoint = StudentCheckpoint(net, SYNONYMS.names, prompts, {}, options=teacher.options)
    assert checkpoint.dense_mode == mode
    served = StudentSegmenter(serving, checkpoint)
    image = make_scene(98)[0]
    result = served.segment(image)
    on_mode = student_probabilities(serving, checkpoint.net, image, mode)
    on_maskclip = student_probabilities(serving, checkpoint.net, image, "maskclip")
    assert (on_mode - on_maskclip).abs().max() > 1e-3
    expected = F.interpolate(on_mode[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    np.testing.assert_array_equal(result.label_map, expected.argmax(0).numpy())
