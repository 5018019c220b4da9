"""Region logic of the smart tools on hand-built feature maps, and the feature cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from maskclip_engine import Segmenter, SegmentOptions
from maskclip_engine.features.cache import FeatureCache
from maskclip_engine.features.dense_state import DenseState
from maskclip_engine.features.image_features import FeatureKey, image_digest
from maskclip_engine.regions import Gestures, gesture_region

GRID = 8
STRIDE = 8
SIZE = GRID * STRIDE
DIM = 32

A = (slice(1, 4), slice(1, 4))  # the object annotators click on
C = (slice(1, 4), slice(4, 6))  # a part touching A, somewhat like it
B = (slice(5, 7), slice(4, 8))  # a second, unrelated object


def blocks(*regions: tuple[slice, slice]) -> np.ndarray:
    grid = np.zeros((GRID, GRID), dtype=bool)
    for region in regions:
        grid[region] = True
    return grid


def pixels(grid: np.ndarray) -> np.ndarray:
    """A grid mask at image size (each cell is STRIDE x STRIDE pixels)."""
    return np.kron(grid, np.ones((STRIDE, STRIDE), dtype=bool))


def centre(row: int, col: int) -> tuple[float, float]:
    """Image pixel (x, y) at the centre of a grid cell."""
    return ((col + 0.5) * STRIDE, (row + 0.5) * STRIDE)


def cell_centres(mask: np.ndarray) -> np.ndarray:
    """The mask sampled at cell centres: what the region logic decided per grid cell."""
    return mask[STRIDE // 2 :: STRIDE, STRIDE // 2 :: STRIDE]


def make_state(probs: np.ndarray | None = None, seed: int = 0) -> DenseState:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(DIM, GRID, GRID, generator=generator)  # background: unrelated directions
    basis = torch.eye(DIM)
    noise = 0.05 * torch.randn(DIM, GRID, GRID, generator=generator)
    features[(slice(None), *A)] = basis[0].view(-1, 1, 1) + noise[(slice(None), *A)]
    like_a = basis[0] + 0.9 * basis[3]
    features[(slice(None), *C)] = like_a.view(-1, 1, 1) + noise[(slice(None), *C)]
    features[(slice(None), *B)] = basis[1].view(-1, 1, 1) + noise[(slice(None), *B)]
    if probs is None:
        probs = np.full((2, GRID, GRID), 0.5, dtype=np.float32)
    return DenseState(
        features=features,
        keys=features.clone() + 0.01,
        probs=torch.as_tensor(probs, dtype=torch.float32),
        labels=("thing", "other"),
        image_size=(SIZE, SIZE),
        stride=STRIDE,
    )


def test_a_click_inside_a_block_of_similar_features_returns_that_block() -> None:
    state = make_state()
    result = gesture_region(state, Gestures(positive=(centre(2, 2),)))
    assert result.mask.shape == (SIZE, SIZE) and result.mask.dtype == bool
    # C is a different part, like A (cosine ~0.74): a click on A takes it too; B and the background not.
    np.testing.assert_array_equal(cell_centres(result.mask), blocks(A, C))
    assert result.score > 0.5


def test_a_negative_click_removes_the_part_it_points_at() -> None:
    state = make_state()
    result = gesture_region(state, Gestures(positive=(centre(2, 2),), negative=(centre(2, 5),)))
    np.testing.assert_array_equal(cell_centres(result.mask), blocks(A))


def test_two_positive_clicks_take_both_objects_and_a_negative_one_drops_a_whole_part() -> None:
    state = make_state()
    both = gesture_region(state, Gestures(positive=(centre(2, 2), centre(6, 6))))
    np.testing.assert_array_equal(cell_centres(both.mask), blocks(A, C, B))
    without_c = gesture_region(state, Gestures(positive=(centre(2, 2), centre(6, 6)), negative=(centre(3, 4),)))
    np.testing.assert_array_equal(cell_centres(without_c.mask), blocks(A, B))


def test_a_box_clips_to_its_area_and_picks_the_object_inside() -> None:
    state = make_state()
    right, bottom = 22, 40  # the box cuts A inside its third column; C and B lie outside
    result = gesture_region(state, Gestures(box=(0.0, 0.0, float(right), float(bottom))))
    assert not result.mask[:, right + 1 :].any() and not result.mask[bottom + 1 :, :].any(), "the mask leaves the box"
    np.testing.assert_array_equal(cell_centres(result.mask)[:5, :3], blocks(A)[:5, :3])
    expected = pixels(blocks(A))
    expected[:, right + 1 :] = False
    overlap = (result.mask & expected).sum() / (result.mask | expected).sum()
    assert overlap > 0.8


def test_a_click_where_maskclip_says_another_label_still_returns_the_clicked_object() -> None:
    probs = np.zeros((2, GRID, GRID), dtype=np.float32)
    probs[1] = 1.0  # MaskCLIP: "other" everywhere, on A too
    probs[0][B] = 1.0  # and "thing" on B, an unrelated object
    probs[1][B] = 0.0
    state = make_state(probs)
    assert int(state.probs[:, 2, 2].argmax()) == 1
    result = gesture_region(state, Gestures(positive=(centre(2, 2),), label=0))
    np.testing.assert_array_equal(cell_centres(result.mask), blocks(A, C))
    assert result.label == 0


def test_where_maskclip_agrees_the_label_extends_the_region_over_its_object() -> None:
    probs = np.zeros((2, GRID, GRID), dtype=np.float32)
    probs[1] = 1.0
    extended = blocks(A, C)
    extended[1:4, 6] = True  # a column unlike A in features, but MaskCLIP says it is the same label
    probs[0][extended], probs[1][extended] = 1.0, 0.0
    state = make_state(probs)
    plain = gesture_region(state, Gestures(positive=(centre(2, 2),)))
    labelled = gesture_region(state, Gestures(positive=(centre(2, 2),), label=0))
    assert not cell_centres(plain.mask)[1:4, 6].any()
    np.testing.assert_array_equal(cell_centres(labelled.mask), extended)


def test_a_phrase_scores_against_the_other_labels() -> None:
    state = make_state()
    text = torch.eye(DIM)[1]
    competitors = torch.stack([torch.eye(DIM)[0], torch.eye(DIM)[5]])
    result = gesture_region(state, Gestures(text=text, competitors=competitors))
    np.testing.assert_array_equal(cell_centres(result.mask), blocks(B))
    alone = gesture_region(state, Gestures(text=text))
    np.testing.assert_array_equal(cell_centres(alone.mask), blocks(B))


def test_no_prompt_gives_an_empty_mask_and_bad_labels_are_refused() -> None:
    state = make_state()
    assert not gesture_region(state, Gestures()).mask.any()
    with pytest.raises(Exception, match="out of range"):
        gesture_region(state, Gestures(positive=(centre(2, 2),), label=5))


def test_clicks_at_image_edges_and_odd_image_sizes() -> None:
    state = make_state()
    odd = DenseState(state.features, state.keys, state.probs, state.labels, (50, 77), STRIDE)
    result = gesture_region(odd, Gestures(positive=((77.0, 50.0),), negative=((-3.0, -3.0),)))
    assert result.mask.shape == (50, 77)


# --------------------------------------------------------------------- feature cache
def entry(megabytes: float) -> torch.Tensor:
    return torch.zeros(int(megabytes * 1024 * 1024) // 4, dtype=torch.float32)


def test_cache_evicts_least_recently_used_by_size() -> None:
    cache = FeatureCache(max_mb=3)
    keys = [(f"img{i}", "v1", "o") for i in range(4)]
    for key in keys[:3]:
        cache.put(key, entry(1))
    assert len(cache) == 3 and cache.bytes_used == 3 * 1024 * 1024
    assert cache.get(keys[0]) is not None  # now the most recent
    cache.put(keys[3], entry(1))
    assert keys[1] not in cache and keys[0] in cache and keys[3] in cache
    cache.put(("big", "v1", "o"), entry(2.5))
    assert len(cache) == 1 and cache.bytes_used <= 3 * 1024 * 1024
    cache.put(("huge", "v1", "o"), entry(4))  # larger than the whole budget: not stored
    assert ("huge", "v1", "o") not in cache
    disabled = FeatureCache(max_mb=0)
    disabled.put(keys[0], entry(0.1))
    assert len(disabled) == 0 and not disabled.enabled


def test_feature_keys_name_the_image_model_and_every_option_that_changes_features(vit_segmenter) -> None:
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    same = image.copy()
    other = image.copy()
    other[0, 0, 0] = 1
    assert image_digest(image) == image_digest(same) != image_digest(other)
    assert image_digest(np.zeros((5, 4, 3), dtype=np.uint8)) != image_digest(image)
    options = SegmentOptions()
    key = vit_segmenter.feature_key(image, options)
    assert key == vit_segmenter.feature_key(same, options) != vit_segmenter.feature_key(other, options)
    for change in ({"dense_mode": "naclip"}, {"short_side": 224}, {"mode": "slide"}, {"max_long_side": 999}):
        assert vit_segmenter.feature_key(image, options.replace(**change)) != key, change
    # Options of the head (labels, refinements, thresholds) and whole-mode window sizes do not change features.
    for change in ({"key_smoothing": False}, {"bg_threshold": 0.3}, {"crop": 224}, {"pamr": True}):
        assert vit_segmenter.feature_key(image, options.replace(**change)) == key, change
    assert key.digest != FeatureKey(**{**key.to_dict(), "precision": "bf16"}).digest


def test_cache_is_safe_under_threads() -> None:
    cache = FeatureCache(max_mb=0.5)
    computed = []
    errors = []

    def work(worker: int) -> None:
        try:
            for i in range(200):
                key = (f"img{(worker * 7 + i) % 13}", "v", "o")
                value, _ = cache.get_or_compute(key, lambda: computed.append(1) or entry(0.05))
                assert value.numel() == entry(0.05).numel()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert cache.bytes_used <= cache.max_bytes and len(cache) <= 10
    assert cache.hits + cache.misses == 800 and cache.hits > 0


# --------------------------------------------------------------------- the segmenter's dense state
@pytest.mark.parametrize(
    "extra",
    [{"mode": "whole"}, {"mode": "slide"}, {"mode": "slide", "slide_refine": "window"}, {"pamr": True}],
    ids=["whole", "slide", "slide-window", "pamr"],
)
def test_segment_with_state_is_segment_plus_the_dense_state(vit_segmenter, extra: dict) -> None:
    from tests.conftest import scene

    image = scene(70, 110, seed=3)
    labels = ["wall", "grass", "sky"]
    options = {"short_side": 64, "crop": 64, "stride": 32, **extra}
    expected = vit_segmenter.segment(image, labels, **options)
    result, state = vit_segmenter.segment_with_state(image, labels, **options)
    np.testing.assert_array_equal(result.label_map, expected.label_map)
    np.testing.assert_allclose(result.confidence, expected.confidence, atol=1e-5)
    grid = (64 // 16, 96 // 16)
    assert state.features.shape == (vit_segmenter.clip.embed_dim, *grid)
    assert state.keys.shape[1:] == grid and state.probs.shape == (3, *grid)
    assert state.image_size == (70, 110) and state.stride == 16 and state.labels == tuple(labels)
    np.testing.assert_allclose(state.probs.sum(0).numpy(), 1.0, atol=1e-4)
    mask = gesture_region(state, Gestures(positive=((20.0, 30.0),), label=1)).mask
    assert mask.shape == (70, 110) and mask[30, 20]
    again = vit_segmenter.dense_state(image, labels, **options)
    assert torch.allclose(again.features, state.features, atol=1e-5)
    assert torch.allclose(again.probs, state.probs, atol=1e-5)


@pytest.mark.parametrize("mode", ["scclip", "sfp"])
def test_smart_tools_answer_on_the_calibrated_modes(vit12_segmenter, mode: str) -> None:
    from tests.conftest import scene

    image = scene(70, 110, seed=3)
    labels = ["wall", "grass", "sky"]
    options = {"short_side": 64, "dense_mode": mode}
    expected = vit12_segmenter.segment(image, labels, **options)
    result, state = vit12_segmenter.segment_with_state(image, labels, **options)
    np.testing.assert_array_equal(result.label_map, expected.label_map)
    assert state.keys.shape[1:] == state.features.shape[1:] == (4, 6)
    mask = gesture_region(state, Gestures(positive=((20.0, 30.0),), label=1)).mask
    assert mask.shape == (70, 110) and mask[30, 20]
    box = gesture_region(state, Gestures(box=(50.0, 10.0, 100.0, 60.0), label=2)).mask
    assert box.any() and not box[:, :49].any() and not box[62:].any()


@pytest.mark.parametrize("backbone", ["clip", "resnet50"])
def test_a_student_serves_interactions_from_its_own_probabilities(vit_segmenter, backbone: str) -> None:
    from maskclip_engine.students.checkpoint import StudentCheckpoint
    from maskclip_engine.students.network import StudentConfig, StudentNet
    from maskclip_engine.students.serving import StudentSegmenter
    from tests.conftest import scene

    labels = ["wall", "grass", "sky"]
    torch.manual_seed(0)
    small = Segmenter(vit_segmenter.clip, SegmentOptions(short_side=64), vit_segmenter.text)
    config = StudentConfig(backbone=backbone)
    net = StudentNet(config, small.text_embeddings(labels), pretrained_backbone=False)
    student = StudentSegmenter(small, StudentCheckpoint(net.eval(), labels, [[c] for c in labels], {}))
    image = scene(70, 110, seed=4)
    result, state = student.segment_with_state(image)
    np.testing.assert_array_equal(result.label_map, student.segment(image).label_map)
    assert state.labels == tuple(labels) and state.probs.shape[0] == 3
    assert state.features.shape[1:] == state.probs.shape[1:] == state.keys.shape[1:]
    mask = gesture_region(state, Gestures(positive=((50.0, 35.0),), label=2)).mask
    assert mask.shape == (70, 110) and mask[35, 50]


@pytest.mark.parametrize("shape", [(28, 42, 448, 672), (4, 6, 70, 110), (5, 7, 50, 77), (3, 3, 9, 1000)])
def test_the_cropped_upsampling_matches_bilinear_interpolation(shape: tuple[int, int, int, int]) -> None:
    from maskclip_engine.regions import upsample_mask

    rows, cols, height, width = shape
    score = torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows))
    score[score < 0.75] = 0  # a few objects: the crop is smaller than the image
    expected = torch.nn.functional.interpolate(score[None, None], size=(height, width), mode="bilinear")[0, 0] >= 0.5
    assert torch.equal(upsample_mask(score, (height, width), 0.5), expected)
    assert not upsample_mask(torch.zeros(rows, cols), (height, width), 0.5).any()
