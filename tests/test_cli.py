from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from maskclip_engine import LabelSet, Segmenter
from maskclip_engine.cli.main import main
from maskclip_engine.visualize import palette
from tests.conftest import scene
from tests.tiny_models import TinyModel


def _args(tiny: TinyModel, source: Path, out: Path, *extra: str) -> list[str]:
    return [
        "segment",
        str(source),
        "--labels",
        "wall,grass|lawn,sky",
        "--model",
        str(tiny.config),
        "--pretrained",
        str(tiny.state_dict),
        "--out",
        str(out),
        *extra,
    ]


def test_segment_folder_end_to_end(tiny_vit: TinyModel, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MASKCLIP_CACHE_DIR", str(tmp_path / "cache"))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(scene(90, 140, seed=1)).save(photos / "street.png")
    Image.fromarray(scene(120, 100, seed=2)).save(photos / "garden.jpg")
    out = tmp_path / "out"
    run = CliRunner().invoke(main, _args(tiny_vit, photos, out, "--bg-threshold", "0.3"))
    assert run.exit_code == 0, run.output
    assert "2 of 2 image(s) segmented" in run.output

    summary = json.loads((out / "street.json").read_text())
    assert summary["width"] == 140 and summary["height"] == 90
    assert [entry["name"] for entry in summary["labels"]] == ["wall", "grass", "sky"]
    assert summary["options"]["bg_threshold"] == 0.3

    label_png = Image.open(out / "street_labels.png")
    assert label_png.mode == "P" and label_png.size == (140, 90)
    indices = np.asarray(label_png)
    for entry in summary["labels"]:
        assert int((indices == entry["index"]).sum()) == entry["pixels"]
    assert int((indices == 255).sum()) == round(summary["unlabeled_fraction"] * indices.size)

    overlay = np.asarray(Image.open(out / "street_overlay.png").convert("RGB"))
    assert overlay.shape[0] >= 90 and overlay.shape[1] > 140  # the legend sits right of the image
    colours = palette(3)
    for entry in summary["labels"]:
        if entry["pixels"]:
            # each present label's swatch colour appears in the legend
            legend = overlay[:, 140:].reshape(-1, 3)
            assert (legend == colours[entry["index"]]).all(axis=1).any()
    assert (out / "garden_overlay.png").exists()


def test_one_bad_image_does_not_stop_the_others(tiny_vit: TinyModel, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MASKCLIP_CACHE_DIR", str(tmp_path / "cache"))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(scene(64, 64)).save(photos / "good.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    run = CliRunner().invoke(main, _args(tiny_vit, photos, out))
    assert run.exit_code == 1
    assert "broken.jpg" in run.output and "1 of 2 image(s) segmented" in run.output
    assert (out / "good.json").exists() and not (out / "broken.json").exists()


def test_a_folder_in_batches_equals_each_image_on_its_own(tiny_vit: TinyModel, tmp_path: Path, monkeypatch) -> None:
    """Eleven images: a batch of eight and one of three (a broken file among them), decoded ahead and written
    behind; each label map equals the engine's on that image alone."""
    monkeypatch.setenv("MASKCLIP_CACHE_DIR", str(tmp_path / "cache"))
    photos = tmp_path / "photos"
    photos.mkdir()
    images = {f"{i:02d}": scene(60 + 4 * i, 80, seed=10 + i) for i in range(10)}
    for stem, image in images.items():
        Image.fromarray(image).save(photos / f"{stem}.png")
    (photos / "05b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    run = CliRunner().invoke(main, _args(tiny_vit, photos, out))
    assert run.exit_code == 1 and "05b.jpg" in run.output and "10 of 11 image(s) segmented" in run.output

    segmenter = Segmenter.from_pretrained(str(tiny_vit.config), str(tiny_vit.state_dict), "cpu")
    labels = LabelSet.from_string("wall,grass|lawn,sky")
    for stem, image in images.items():
        alone = segmenter.segment(image, labels).label_map
        written = np.asarray(Image.open(out / f"{stem}_labels.png")).astype(np.int32)
        written[written == 255] = -1
        assert np.array_equal(written, alone), stem


def test_unknown_model_and_bad_labels(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(scene(32, 32)).save(image)
    run = CliRunner().invoke(main, ["segment", str(image), "--labels", "cat", "--model", "ViT-X-99", "--out", "o"])
    assert run.exit_code == 1 and "unknown model 'ViT-X-99'" in run.output
    run = CliRunner().invoke(main, ["segment", str(image), "--labels", "cat,,dog", "--out", "o"])
    assert run.exit_code == 2 and "empty" in run.output


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "maskclip"
    out = subprocess.run([str(script), "segment", "--help"], capture_output=True, text=True, check=True)
    assert "--no-key-smoothing" in out.stdout and "--mode" in out.stdout
