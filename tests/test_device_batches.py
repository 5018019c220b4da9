"""Windows through the image tower together: equal to one at a time, and halved when the device runs out of memory.

No CUDA device here, so the device's memory is the one thing injected: a forward that raises torch's
out-of-memory error above a batch size, as a full GPU would.
"""

from __future__ import annotations

import pytest
import torch

import maskclip_engine.segmenter as segmenter_module
from maskclip_engine import Segmenter
from maskclip_engine.backbone.device_batches import DeviceBatches
from maskclip_engine.errors import DeviceMemoryError
from tests.scenes import CLASSES, make_scene


@pytest.fixture()
def batched(vit_segmenter: Segmenter) -> Segmenter:
    """A segmenter whose windows go through together, as on CUDA (a DeviceBatches of its own)."""
    segmenter = Segmenter(vit_segmenter.clip, vit_segmenter.options.replace(short_side=96), vit_segmenter.text)
    segmenter.batches = DeviceBatches(torch.device("cpu"))
    segmenter.batches.limit = None
    return segmenter


@pytest.fixture()
def device_memory(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes the tower was given; more than two windows at once do not fit."""
    sizes: list[int] = []
    real = segmenter_module.dense_features

    def forward(visual, pixels, mode):
        sizes.append(pixels.shape[0])
        if pixels.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(visual, pixels, mode)

    monkeypatch.setattr(segmenter_module, "dense_features", forward)
    return sizes


def pixels(segmenter: Segmenter, count: int) -> torch.Tensor:
    return torch.stack([segmenter.normalize(make_scene(i, 96, 128)[0], (96, 128)) for i in range(count)])


def test_a_cpu_segmenter_runs_one_window_at_a_time(vit_segmenter: Segmenter) -> None:
    assert vit_segmenter.batches.limit == 1
    assert vit_segmenter.with_options(vit_segmenter.options).batches is vit_segmenter.batches  # one per model


def test_windows_together_equal_one_at_a_time(batched: Segmenter) -> None:
    batch = pixels(batched, 4)
    features, keys = batched.dense_features_and_keys(batch)
    for index in range(4):
        one_features, one_keys = batched.dense_features_and_keys(batch[index : index + 1])
        torch.testing.assert_close(features[index : index + 1], one_features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(keys[index : index + 1], one_keys, atol=1e-5, rtol=1e-5)
    images = [make_scene(i, 96, 128)[0] for i in range(3)]
    together = batched.segment_batch(images, CLASSES, batch_size=3)
    alone = [batched.segment(image, CLASSES) for image in images]
    for got, want in zip(together, alone):
        assert (got.label_map == want.label_map).all()


def test_a_batch_that_does_not_fit_is_halved_once_for_every_later_batch(batched, device_memory, caplog) -> None:
    batch = pixels(batched, 5)
    reference = Segmenter(batched.clip, batched.options, batched.text)  # one at a time
    want_features, want_keys = reference.dense_features_and_keys(batch)
    device_memory.clear()
    features, keys = batched.dense_features_and_keys(batch)
    assert device_memory == [5, 2, 2, 1] and batched.batches.limit == 2
    assert "ran out of memory on 5 windows" in caplog.text
    torch.testing.assert_close(features, want_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, want_keys, atol=1e-5, rtol=1e-5)
    device_memory.clear()
    batched.dense_features_and_keys(batch)
    assert device_memory == [2, 2, 1]  # no second failed try


def test_one_window_that_does_not_fit_says_what_to_change(batched, monkeypatch) -> None:
    batched.batches.limit = 1

    def nothing_fits(visual, pixels, mode):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(segmenter_module, "dense_features", nothing_fits)
    with pytest.raises(DeviceMemoryError, match="96x128 window does not fit .* lower short_side"):
        batched.dense_features_and_keys(pixels(batched, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_windows_go_through_together_and_equal_one_at_a_time(tiny_vit, tmp_path) -> None:
    segmenter = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.state_dict), "cuda", "fp32", cache_dir=tmp_path
    )
    assert segmenter.batches.limit is None
    images = [make_scene(i, 96, 128)[0] for i in range(4)]
    together = segmenter.segment_batch(images, CLASSES, batch_size=4)
    for got, image in zip(together, images):
        assert (got.label_map == segmenter.segment(image, CLASSES).label_map).mean() > 0.999
