"""`maskclip eval --config` compares refinement variants: cosine vs released KS, whole vs per-window, PAMR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskclip_engine import Segmenter
from maskclip_engine.evaluation.evaluate import EvalConfig
from maskclip_engine.miou import confusion_matrix, scores
from tests.scenes import CLASSES, make_scene
from tests.test_evaluation import run_eval, write_voc
from tests.tiny_models import TinyModel

# fp32 on both sides: the comparison below is exact, which bf16 autocast would not be.
PROTOCOL = (
    "--precision",
    "fp32",
    "--background",
    "none",
    "--short-side",
    "64",
    "--mode",
    "slide",
    "--crop",
    "48",
    "--stride",
    "32",
)
VARIANTS = {
    "cosine-whole": "name=cosine-whole,cosine",
    "released-whole": "name=released-whole,released",
    "cosine-window": "name=cosine-window,cosine,window",
    "released-window": "name=released-window,ks_variant=released,slide_refine=window",
    "released-window-pamr": "name=released-window-pamr,released,window,pamr,pamr_stride=2",
}


def test_shorthands_in_config_text() -> None:
    assert EvalConfig.parse("released,window,pamr").options == {
        "key_smoothing_variant": "released",
        "slide_refine": "window",
        "pamr": True,
    }
    parsed = EvalConfig.parse("naclip,no-pamr,ks_variant=cosine,ks_threshold=0.9")
    assert parsed.options == {
        "dense_mode": "naclip",
        "pamr": False,
        "key_smoothing_variant": "cosine",
        "ks_threshold": 0.9,
    }
    assert parsed.name == "dense_mode=naclip,pamr=False,key_smoothing_variant=cosine,ks_threshold=0.9"


def test_eval_compares_refinement_variants(tiny_vit: TinyModel, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MASKCLIP_CACHE_DIR", str(tmp_path / "cache"))
    samples = [(f"scene{i}", *make_scene(70 + i, 80, 112)) for i in range(3)]
    root = write_voc(tmp_path / "voc", [(n, img, lab.astype(np.uint8)) for n, img, lab in samples], CLASSES)
    out = tmp_path / "report.json"
    configs = [arg for text in VARIANTS.values() for arg in ("--config", text)]
    run = run_eval(tiny_vit, root, out, *PROTOCOL, *configs)
    assert run.exit_code == 0, run.output
    report = json.loads(out.read_text())
    assert list(report["results"]) == list(VARIANTS)
    assert report["protocol"]["slide_refine"] == "whole" and report["protocol"]["key_smoothing_variant"] == "cosine"

    # Each row is what segment() gives under that configuration, scored by the same metric code.
    segmenter = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.state_dict), precision="fp32", cache_dir=tmp_path / "cache"
    )
    base = dict(short_side=64, mode="slide", crop=48, stride=32)
    maps = {}
    for name, text in VARIANTS.items():
        total = np.zeros((3, 4), dtype=np.int64)
        maps[name] = []
        for sample, _, truth in samples:
            image = np.asarray(Image.open(root / "JPEGImages" / f"{sample}.jpg").convert("RGB"))
            prediction = segmenter.segment(image, CLASSES, **base, **EvalConfig.parse(text).options).label_map
            maps[name].append(prediction)
            total += confusion_matrix(prediction, truth, 3)
        assert report["results"][name]["miou"] == pytest.approx(scores(total).miou, abs=1e-6), name
    # The variants are different computations: none of them reproduces another's labels.
    names = list(VARIANTS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert any(not np.array_equal(x, y) for x, y in zip(maps[a], maps[b])), (a, b)


def test_protocol_flags_select_the_released_path(tiny_vit: TinyModel, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MASKCLIP_CACHE_DIR", str(tmp_path / "cache"))
    image, labels = make_scene(90, 80, 112)
    root = write_voc(tmp_path / "voc", [("a", image, labels.astype(np.uint8))], CLASSES)
    out = tmp_path / "report.json"
    flags = ("--ks-variant", "released", "--slide-refine", "window")
    run = run_eval(tiny_vit, root, out, *PROTOCOL, *flags, "--config", "maskclip", "--config", "name=paper,cosine")
    assert run.exit_code == 0, run.output
    report = json.loads(out.read_text())
    assert report["protocol"]["key_smoothing_variant"] == "released" and report["protocol"]["slide_refine"] == "window"
    assert set(report["results"]) == {"dense_mode=maskclip", "paper"}
    bad = run_eval(tiny_vit, root, out, *PROTOCOL, "--config", "slide_refine=windows")
    assert bad.exit_code == 1 and "slide_refine" in bad.output
