"""The feature store: round trips, entries that must never be served, the size bound under concurrent writers,
and segmentation that reads it instead of running the backbone."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from maskclip_engine import Segmenter
from maskclip_engine.features.cache import FeatureCache
from maskclip_engine.features.compact import quantised_bytes
from maskclip_engine.features.image_features import FeatureKey, ImageFeatures, Window
from maskclip_engine.features.source import FeatureSource
from maskclip_engine.features.store import FeatureStore, _checksum
from tests.scenes import CLASSES, make_scene


def features(seed: int = 0, windows: int = 2, dim: int = 32, keys: int = 64) -> ImageFeatures:
    generator = torch.Generator().manual_seed(seed)
    return ImageFeatures(
        features=torch.randn(windows, dim, 3, 4, generator=generator),
        keys=torch.randn(windows, keys, 3, 4, generator=generator) * 20,
        windows=tuple(Window(0, 16 * w, 48, 64) for w in range(windows)),
        resized=(48, 64 + 16 * (windows - 1)),
        image_size=(100, 130),
        stride=16,
    )


def key(image: str = "a" * 32, **changes) -> FeatureKey:
    fields = dict(
        image=image,
        model="tiny-vit@abc",
        weights="sha256:1234",
        precision="fp32",
        dense_mode="maskclip",
        mode="slide",
        short_side=48,
        max_long_side=2048,
        crop=64,
        stride=16,
    )
    return FeatureKey(**{**fields, **changes})


def entry_bytes(store: FeatureStore) -> list[int]:
    return [e.stat().st_size for e in store.entries()]


def test_round_trip_keeps_geometry_and_returns_what_reads_back(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, 1 << 30)
    value = features()
    returned = store.put(key(), value)
    loaded = store.get(key())
    assert loaded is not None and loaded.features.dtype == loaded.keys.dtype == torch.float32
    assert torch.equal(loaded.features, returned.features) and torch.equal(loaded.keys, returned.keys)
    assert (loaded.windows, loaded.resized, loaded.image_size, loaded.stride) == _geometry(value)
    assert relative_error(loaded.features, value.features) < 0.01  # 8 bits
    assert relative_error(loaded.keys, value.keys) < 0.15  # 4 bits
    assert store.get(key(image="b" * 32)) is None and store.hits == 1


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _geometry(value: ImageFeatures) -> tuple:
    return value.windows, value.resized, value.image_size, value.stride


def test_an_entry_takes_a_byte_per_feature_and_half_a_byte_per_key(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, 1 << 30)
    store.put(key(), features(windows=1, dim=512, keys=768))  # ViT-B-16's widths on a 3 x 4 grid
    tensor_bytes = 12 * (512 + 2 * 2) + 12 * (384 + 2 * 3)  # values, and an fp16 scale per 256-channel block
    assert tensor_bytes == quantised_bytes(512, 12, 8) + quantised_bytes(768, 12, 4)
    assert tensor_bytes <= entry_bytes(store)[0] < tensor_bytes + 4096


def test_an_entry_in_the_16_bit_format_of_earlier_versions_is_still_read(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, 1 << 30)
    value = features()
    old = {"features": value.features.to(torch.bfloat16), "keys": value.keys.to(torch.float16)}
    metadata = {
        "key": json.dumps(key().to_dict(), sort_keys=True),
        "checksum": _checksum(old["features"], old["keys"]),
        "windows": json.dumps([[w.top, w.left, w.height, w.width] for w in value.windows]),
        "resized": json.dumps(list(value.resized)),
        "image_size": json.dumps(list(value.image_size)),
        "stride": str(value.stride),
    }
    store.path(key()).parent.mkdir(parents=True)
    store.path(key()).write_bytes(save(old, metadata=metadata))
    loaded = store.get(key())
    assert loaded is not None and store.rejected == 0
    assert torch.equal(loaded.features, old["features"].float()) and torch.equal(loaded.keys, old["keys"].float())
    assert _geometry(loaded) == _geometry(value)


def test_an_entry_of_a_format_this_version_does_not_know_is_recomputed(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, 1 << 30)
    store.put(key(), features())
    path = store.path(key())
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = {**handle.metadata(), "format": "compact-99"}
    path.write_bytes(save(tensors, metadata=metadata))
    assert store.get(key()) is None and store.rejected == 1 and not path.exists()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "other key", "garbage"])
def test_a_damaged_or_mismatched_entry_is_never_served(tmp_path: Path, damage: str) -> None:
    store = FeatureStore(tmp_path, 1 << 30)
    store.put(key(), features())
    path = store.path(key())
    data = bytearray(path.read_bytes())
    if damage == "flipped byte":
        data[-10] ^= 0xFF  # inside the tensor data: only the checksum sees it
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "other key":  # another image's entry under this image's name
        store.put(key(image="b" * 32), features(seed=1))
        path.write_bytes(store.path(key(image="b" * 32)).read_bytes())
    else:
        path.write_bytes(b"not a safetensors file at all")
    assert store.get(key()) is None
    assert not path.exists() and store.rejected == 1  # dropped, so the next writer replaces it
    store.put(key(), features())
    assert store.get(key()) is not None


def test_least_recently_used_entries_go_first(tmp_path: Path) -> None:
    probe = FeatureStore(tmp_path / "probe", 1 << 30)
    probe.put(key(), features())
    size = entry_bytes(probe)[0]
    store = FeatureStore(tmp_path / "store", 3 * size)
    for i in range(3):
        store.put(key(image=f"{i:032d}"), features(seed=i))
        os.utime(store.path(key(image=f"{i:032d}")), (time.time() - 100 + i, time.time() - 100 + i))
    assert store.get(key(image=f"{0:032d}")) is not None  # read: now the most recent
    store.put(key(image=f"{3:032d}"), features(seed=3))
    assert store.get(key(image=f"{1:032d}")) is None  # the least recently used went
    assert all(store.get(key(image=f"{i:032d}")) is not None for i in (0, 2, 3))
    assert store.size() <= 3 * size


def test_a_stale_temporary_file_of_a_killed_writer_is_removed(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, 1 << 30)
    store.put(key(), features())
    shard = store.path(key()).parent
    stale, fresh = shard / ".x.safetensors.1.tmp", shard / ".y.safetensors.2.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    store.evict()
    assert not stale.exists() and fresh.exists()  # a writer may still be at work on the fresh one
    assert [Path(e.path) for e in store.entries()] == [store.path(key())]


def test_a_store_of_size_zero_is_off(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "off", 0)
    store.put(key(), features())
    assert not store.enabled and store.get(key()) is None and not (tmp_path / "off").exists()


def _write_many(root: str, bound: int, worker: int, count: int) -> None:
    store = FeatureStore(Path(root), bound)
    for i in range(count):
        store.put(key(image=f"{worker:04d}{i:028d}"), features(seed=worker * 100 + i))


def test_four_concurrent_writers_keep_the_size_bound(tmp_path: Path) -> None:
    probe = FeatureStore(tmp_path / "probe", 1 << 30)
    probe.put(key(), features())
    size = entry_bytes(probe)[0]
    bound = 10 * size
    root = tmp_path / "shared"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(str(root), bound, w, 25)) for w in range(4)]
    for writer in writers:
        writer.start()
    store = FeatureStore(root, bound)
    largest = 0
    deadline = time.monotonic() + 120
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        largest = max(largest, store.size())
        time.sleep(0.005)
    for writer in writers:
        writer.join(timeout=30)
        assert writer.exitcode == 0
    assert store.size() <= bound  # once they are done, within the bound
    assert largest <= bound + 4 * size  # and never more than one entry per writer over it meanwhile
    assert len(list(store.entries())) >= 5  # what fits stays: eviction does not empty the store
    assert all(store.get(FeatureKey(**_stored_key(e.path))) is not None for e in store.entries())


def _stored_key(path: str) -> dict:
    with safe_open(path, framework="pt") as handle:
        return json.loads(handle.metadata()["key"])


# ------------------------------------------------------------------ segmentation through the store
@pytest.fixture()
def stored(vit_segmenter: Segmenter, tmp_path: Path) -> Segmenter:
    source = FeatureSource(FeatureCache(0), FeatureStore(tmp_path / "features", 1 << 30))
    return Segmenter(vit_segmenter.clip, vit_segmenter.options.replace(short_side=96), vit_segmenter.text, source)


def backbone_calls(segmenter: Segmenter) -> list[int]:
    calls = [0]

    def count(_module, _inputs) -> None:
        calls[0] += 1

    segmenter.clip.visual.conv1.register_forward_pre_hook(count)
    return calls


@pytest.mark.parametrize("options", [{}, {"mode": "slide", "crop": 64, "stride": 32}, {"dense_mode": "naclip"}])
def test_head_only_proposals_from_the_store_equal_full_segment(vit_segmenter, stored, options) -> None:
    image = make_scene(3, 96, 160)[0]
    plain = vit_segmenter.with_options(stored.options)  # no store at all
    expected = plain.segment(image, CLASSES, **options)
    first = stored.segment(image, CLASSES, **options)  # computes and stores
    fresh = Segmenter(stored.clip, stored.options, stored.text, FeatureSource(None, stored.features.store))
    calls = backbone_calls(fresh)
    again = fresh.segment(image, CLASSES, **options)  # another process would see the same: the store only
    assert calls[0] == 0 and fresh.features.from_store == 1
    np.testing.assert_array_equal(again.label_map, first.label_map)
    np.testing.assert_array_equal(again.confidence, first.confidence)
    # Against no store at all (features in 8 bits, keys in 4): the same labels, close confidences.
    decided = np.abs(expected.confidence - 0.5) > 0.02
    assert (again.label_map == expected.label_map).mean() >= 0.995
    np.testing.assert_allclose(again.confidence[decided], expected.confidence[decided], atol=2e-2)


@pytest.mark.parametrize("mode", ["scclip", "sfp"])
def test_the_calibrated_modes_are_stored_under_their_own_keys(vit12_segmenter, tmp_path: Path, mode: str) -> None:
    source = FeatureSource(FeatureCache(0), FeatureStore(tmp_path / "features", 1 << 30))
    options = vit12_segmenter.options.replace(short_side=96)
    stored = Segmenter(vit12_segmenter.clip, options, vit12_segmenter.text, source)
    image = make_scene(5, 96, 160)[0]
    first = stored.segment(image, CLASSES, dense_mode=mode)
    fresh = Segmenter(stored.clip, stored.options, stored.text, FeatureSource(None, source.store))
    calls = backbone_calls(fresh)
    again = fresh.segment(image, CLASSES, dense_mode=mode)
    assert calls[0] == 0 and fresh.features.from_store == 1
    np.testing.assert_array_equal(again.label_map, first.label_map)
    np.testing.assert_array_equal(again.confidence, first.confidence)
    fresh.segment(image, CLASSES, dense_mode="naclip")  # another mode, another entry: the backbone runs
    assert calls[0] == 1 and fresh.features.computed == 1


def test_another_label_set_reuses_the_stored_image(stored) -> None:
    image = make_scene(4, 96, 160)[0]
    stored.segment(image, CLASSES)
    calls = backbone_calls(stored)
    result = stored.segment(image, ["sky", "tree", "road", "car"])
    assert calls[0] == 0 and result.labels == ["sky", "tree", "road", "car"]


def test_a_bf16_backbone_answers_first_as_the_store_reads_back(tiny_vit, tmp_path: Path) -> None:
    source = FeatureSource(FeatureCache(0), FeatureStore(tmp_path / "features", 1 << 30))
    segmenter = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.state_dict), precision="bf16", cache_dir=tmp_path, features=source
    )
    image = make_scene(5, 96, 160)[0]
    computed = segmenter.encode(image)
    loaded = source.store.get(segmenter.feature_key(image, segmenter.options))
    assert torch.equal(loaded.features, computed.features) and torch.equal(loaded.keys, computed.keys)
    plain = Segmenter(segmenter.clip, segmenter.options, segmenter.text).encode(image)  # no store: unrounded
    assert not torch.equal(plain.features, computed.features)
    assert relative_error(computed.features, plain.features) < 0.01
    assert relative_error(computed.keys, plain.keys) < 0.15


def test_training_a_clip_student_runs_the_backbone_once_per_image_not_per_step(stored) -> None:
    from maskclip_engine import LabelSet
    from maskclip_engine.students.training import TrainConfig, TrainingImage, train_student

    images = [TrainingImage(*make_scene(i)) for i in range(5)]
    for item in images:
        stored.encode(item.image, mode="whole")  # as pre-annotation leaves them
    calls = backbone_calls(stored)
    config = TrainConfig(iterations=30, batch_size=4, crop=64, lr=0.05, self_training_after=0.5)
    train_student(stored, images, LabelSet.parse(CLASSES), config)
    assert calls[0] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_store_serves_a_cuda_segmenter(tiny_vit, tmp_path: Path) -> None:
    source = FeatureSource(FeatureCache(64), FeatureStore(tmp_path / "features", 1 << 30))
    segmenter = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.state_dict), "cuda", "fp16", cache_dir=tmp_path, features=source
    )
    image = make_scene(6, 96, 160)[0]
    first = segmenter.segment(image, CLASSES)
    fresh = Segmenter(segmenter.clip, segmenter.options, segmenter.text, FeatureSource(None, source.store))
    again = fresh.segment(image, CLASSES)
    assert fresh.features.from_store == 1 and fresh.encode(image).features.device.type == "cuda"
    np.testing.assert_array_equal(first.label_map, again.label_map)
