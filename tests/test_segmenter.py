from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from maskclip_engine import (
    InvalidImageError,
    InvalidLabelsError,
    InvalidOptionError,
    SegmentationResult,
    Segmenter,
)
from maskclip_engine.images import decode_image, resized_shape, window_starts
from tests.conftest import scene

LABELS = ["brick wall", ["grass", "lawn"], "blue sky", "car"]


def _same(a: SegmentationResult, b: SegmentationResult) -> None:
    np.testing.assert_array_equal(a.label_map, b.label_map)
    np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-5)
    assert a.dropped == b.dropped


def test_result_is_at_original_resolution(vit_segmenter: Segmenter) -> None:
    image = scene(97, 151)
    result = vit_segmenter.segment(image, LABELS)
    assert result.label_map.shape == (97, 151) and result.label_map.dtype == np.int32
    assert result.confidence.shape == (97, 151)
    assert result.size == (151, 97)
    assert result.labels == ["brick wall", "grass", "blue sky", "car"]
    assert result.label_map.min() >= -1 and result.label_map.max() < len(LABELS)
    assert set(result.present) <= set(result.labels)
    for name, mask in result.masks.items():
        index = result.labels.index(name)
        assert mask.shape == (97, 151) and mask.dtype == bool and mask.any()
        assert result.scores[index] == pytest.approx(float(result.confidence[mask].mean()), rel=1e-4)
    for name in set(result.labels) - set(result.present):
        assert result.scores[result.labels.index(name)] == 0.0


def test_background_threshold_leaves_unsure_pixels_unlabeled(vit_segmenter: Segmenter) -> None:
    image = scene()
    everything = vit_segmenter.segment(image, LABELS, key_smoothing=False)
    assert (everything.label_map >= 0).all()
    threshold = float(np.median(everything.confidence))
    result = vit_segmenter.segment(image, LABELS, key_smoothing=False, bg_threshold=threshold)
    np.testing.assert_array_equal(result.label_map == -1, everything.confidence < threshold)
    labeled = result.label_map >= 0
    np.testing.assert_array_equal(result.label_map[labeled], everything.label_map[labeled])
    assert 0 < labeled.mean() < 1


def test_prompt_denoising_switch_and_threshold(vit_segmenter: Segmenter) -> None:
    image = scene()
    off = vit_segmenter.segment(image, LABELS, prompt_denoising=False)
    assert off.dropped == []
    strict = vit_segmenter.segment(image, LABELS, prompt_denoising=True, pd_threshold=1.0)
    # No class is certain everywhere: all but the most confident one are dropped.
    assert len(strict.dropped) == len(LABELS) - 1
    assert strict.present == [name for name in strict.labels if name not in strict.dropped]


def test_key_smoothing_changes_the_result(vit_segmenter: Segmenter) -> None:
    image = scene()
    smooth = vit_segmenter.segment(image, LABELS, prompt_denoising=False)
    raw = vit_segmenter.segment(image, LABELS, prompt_denoising=False, key_smoothing=False)
    assert not np.allclose(smooth.confidence, raw.confidence)


def test_slide_with_one_window_equals_whole(vit_segmenter: Segmenter) -> None:
    image = scene(64, 96)
    whole = vit_segmenter.segment(image, LABELS, short_side=64)
    slide = vit_segmenter.segment(image, LABELS, short_side=64, mode="slide", crop=96, stride=48)
    _same(whole, slide)


def test_slide_mode_on_a_large_image(vit_segmenter: Segmenter, rn_segmenter: Segmenter) -> None:
    image = scene(120, 300)
    for segmenter in (vit_segmenter, rn_segmenter):
        result = segmenter.segment(image, LABELS, mode="slide", short_side=128, crop=64, stride=32)
        assert result.label_map.shape == (120, 300)
        assert (result.label_map >= 0).all()


def test_batch_equals_one_by_one(vit_segmenter: Segmenter) -> None:
    images = [scene(80, 120, seed=1), scene(80, 120, seed=2), scene(100, 70, seed=3)]
    batch = vit_segmenter.segment_batch(images, LABELS, batch_size=2)
    assert len(batch) == 3
    for image, result in zip(images, batch):
        _same(result, vit_segmenter.segment(image, LABELS))
    assert vit_segmenter.segment_batch([], LABELS) == []


def test_pil_and_array_inputs_agree(rn_segmenter: Segmenter) -> None:
    image = scene(70, 90)
    _same(rn_segmenter.segment(Image.fromarray(image), LABELS), rn_segmenter.segment(image, LABELS))
    grey = rn_segmenter.segment(image[:, :, 0], LABELS)
    assert grey.label_map.shape == (70, 90)


def test_concurrent_calls_match_sequential(vit_segmenter: Segmenter) -> None:
    images = [scene(64 + 8 * i, 96, seed=i) for i in range(6)]
    expected = [vit_segmenter.segment(image, LABELS) for image in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda image: vit_segmenter.segment(image, LABELS), images))
    for got, want in zip(results, expected):
        _same(got, want)


def test_bad_inputs_give_clear_errors(vit_segmenter: Segmenter) -> None:
    image = scene()
    with pytest.raises(InvalidLabelsError, match="empty"):
        vit_segmenter.segment(image, [])
    with pytest.raises(InvalidImageError, match="no pixels"):
        vit_segmenter.segment(np.zeros((0, 10, 3), dtype=np.uint8), LABELS)
    with pytest.raises(InvalidImageError, match="no pixels"):
        vit_segmenter.segment(Image.new("RGB", (0, 0)), LABELS)
    with pytest.raises(InvalidImageError, match="uint8"):
        vit_segmenter.segment(np.zeros((10, 10, 3), dtype=np.float32), LABELS)
    with pytest.raises(InvalidImageError, match="photo.jpg does not exist"):
        vit_segmenter.segment("photo.jpg", LABELS)
    with pytest.raises(InvalidImageError, match="a file path, a PIL image or a numpy uint8 array"):
        vit_segmenter.segment([[0, 0, 0]], LABELS)
    with pytest.raises(InvalidOptionError, match="unknown segmentation option"):
        vit_segmenter.segment(image, LABELS, keysmoothing=False)
    with pytest.raises(InvalidOptionError, match="multiple of the model's patch size 16"):
        vit_segmenter.segment(image, LABELS, mode="slide", crop=100)
    with pytest.raises(InvalidOptionError, match="between 0 and 1"):
        vit_segmenter.segment(image, LABELS, bg_threshold=2)
    with pytest.raises(InvalidOptionError, match="'whole' or 'slide'"):
        vit_segmenter.segment(image, LABELS, mode="tiles")


def test_decoding_bad_files(tmp_path) -> None:
    with pytest.raises(InvalidImageError, match="not a readable image"):
        decode_image(b"this is not an image")
    buffer = io.BytesIO()
    Image.fromarray(scene(200, 200)).save(buffer, format="JPEG")
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        decode_image(buffer.getvalue()[:1500])
    with pytest.raises(InvalidImageError, match="does not exist"):
        decode_image(tmp_path / "missing.png")
    big = io.BytesIO()
    Image.new("L", (4000, 4000)).save(big, format="PNG")
    with pytest.raises(InvalidImageError, match="over the limit"):
        decode_image(big.getvalue(), max_pixels=1_000_000)


def test_exif_orientation_is_applied() -> None:
    image = Image.fromarray(scene(40, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).shape == (80, 40, 3)


def test_resize_and_window_planning() -> None:
    assert resized_shape(480, 640, 448, 2048, 16) == (448, 592)
    assert resized_shape(100, 5000, 448, 2048, 32) == (32, 2048)  # long side capped
    assert window_starts(100, 100, 50) == [0]
    assert window_starts(592, 448, 224) == [0, 144]
    assert window_starts(1000, 448, 224) == [0, 224, 448, 552]
