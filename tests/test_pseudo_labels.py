"""MaskCLIP's pseudo-labels (MaskClipTeacher) on features built so that the right answer is known.

Each feature-grid cell holds the text embedding of the label it should get, so
the cosine argmax is that label; keys group cells into regions (one-hot), so
key smoothing averages within a region and cannot move an argmax. Anything
that breaks the teacher's path (synonym scoring, refinement, upsampling, the
background threshold) changes the maps asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskclip_engine import LabelSet, Segmenter, SegmentOptions
from maskclip_engine.students.training import IGNORE, Batch, MaskClipTeacher

STRIDE = 16
LABELS = LabelSet.parse(["ground", ["red disc", "crimson disc"], "blue box"])
# Cell contents: a prompt index into LABELS.prompts (ground, red disc, crimson disc, blue box). Labels come
# in vertical stripes: bilinear upsampling moves a label edge only where three cells or an L-shaped corner
# meet, so with straight edges the exact answer is the nearest-cell map.
PROMPT_GRID = np.array(
    [
        [0, 0, 1, 1, 3, 3],
        [0, 0, 2, 1, 3, 3],
        [0, 0, 1, 2, 3, 3],
        [0, 0, 1, 1, 3, 3],
    ]
)
# Key regions: cells in one region share a one-hot key.
REGION_GRID = np.array([[0, 0, 1, 1, 2, 2]] * 4)


def teacher_for(segmenter: Segmenter, **options) -> MaskClipTeacher:
    view = Segmenter(segmenter.clip, SegmentOptions(**options), segmenter.text)
    return MaskClipTeacher(view, LABELS)


def make_batch(features: torch.Tensor, regions: np.ndarray) -> Batch:
    """One sample: features ``[D, h, w]``, one-hot keys from ``regions``, pixels ``STRIDE`` times the grid."""
    height, width = regions.shape
    keys = F.one_hot(torch.from_numpy(regions), int(regions.max()) + 1).permute(2, 0, 1).float()
    pixels = torch.zeros(1, 3, height * STRIDE, width * STRIDE)
    blank = torch.full((1, height * STRIDE, width * STRIDE), IGNORE)
    return Batch(blank, blank, blank >= IGNORE, pixels=pixels, clip_features=features[None], clip_keys=keys[None])


def cell_features(prompts: torch.Tensor, grid: np.ndarray) -> torch.Tensor:
    return prompts[torch.from_numpy(grid)].permute(2, 0, 1).contiguous()  # [D, h, w]


def upsampled(grid: np.ndarray) -> np.ndarray:
    return np.kron(grid, np.ones((STRIDE, STRIDE), dtype=np.int64))


@pytest.fixture(scope="module")
def prompts(vit_segmenter: Segmenter) -> torch.Tensor:
    return vit_segmenter.text.embed(LABELS.prompts).float()


@pytest.mark.parametrize("refinements", [True, False])
def test_pseudo_labels_are_the_known_map(vit_segmenter: Segmenter, prompts: torch.Tensor, refinements: bool) -> None:
    """Every pixel gets its cell's label, a synonym ("crimson disc") counting for its label."""
    teacher = teacher_for(vit_segmenter, key_smoothing=refinements, prompt_denoising=refinements)
    batch = make_batch(cell_features(prompts, PROMPT_GRID), REGION_GRID)
    labels = teacher.pseudo_labels(batch)
    owner = np.array(LABELS.owner)
    assert labels.shape == (1, 4 * STRIDE, 6 * STRIDE) and labels.dtype == torch.long
    np.testing.assert_array_equal(labels[0].numpy(), upsampled(owner[PROMPT_GRID]))


def test_uncertain_cells_fall_below_the_background_threshold(vit_segmenter: Segmenter, prompts: torch.Tensor) -> None:
    """A 2x2 block whose features sit halfway between ground and blue box is left unlabelled."""
    grid = PROMPT_GRID.copy()
    features = cell_features(prompts, grid)
    features[:, 1:3, 0:2] = F.normalize(prompts[0] + prompts[3], dim=0)[:, None, None]
    regions = REGION_GRID.copy()
    regions[1:3, 0:2] = 3  # their own key region, so smoothing keeps them uncertain
    expected = upsampled(np.array(LABELS.owner)[grid])

    confident = teacher_for(vit_segmenter, bg_threshold=0.6).pseudo_labels(make_batch(features, regions))[0].numpy()
    centre = (slice(STRIDE + STRIDE // 2, 2 * STRIDE + STRIDE // 2), slice(STRIDE // 2, STRIDE + STRIDE // 2))
    assert (confident[centre] == IGNORE).all()
    # Where two confident stripes meet, upsampling blends them to about 0.5 each: a thin unlabelled seam.
    seam = slice(4 * STRIDE - 3, 4 * STRIDE + 3)
    assert set(np.unique(confident[:, seam])) == {IGNORE, 1, 2}
    away = np.zeros_like(confident, dtype=bool)
    away[:, 3 * STRIDE :] = True  # columns the block does not blend into when upsampled
    away[:, seam] = False
    np.testing.assert_array_equal(confident[away], expected[away])

    # Without a threshold the same cells get a real label (one of the two it sits between).
    everything = teacher_for(vit_segmenter, bg_threshold=0.0).pseudo_labels(make_batch(features, regions))[0].numpy()
    assert set(np.unique(everything[centre])) <= {0, 2} and (everything >= 0).all()


def with_cosines(prompts: torch.Tensor, targets: list[float]) -> torch.Tensor:
    """A unit feature whose cosines to the prompts are proportional to ``targets``."""
    text = F.normalize(prompts, dim=-1)
    return F.normalize(text.T @ torch.linalg.solve(text @ text.T, torch.tensor(targets)), dim=0)


def test_prompt_denoising_removes_a_label_that_is_never_confident(
    vit_segmenter: Segmenter, prompts: torch.Tensor
) -> None:
    """One cell is nearly a three-way tie that blue box wins (ground a close second) without ever reaching
    probability 0.5, and blue box appears nowhere else: denoising removes it and the cell goes to ground."""
    grid = np.zeros((4, 6), dtype=np.int64)
    grid[:, 3:] = 1
    features = cell_features(prompts, grid)
    mixed = with_cosines(prompts, [1.0, 0.998, 0.95, 1.003])  # ground, red disc, crimson disc, blue box
    cosines = F.normalize(prompts, dim=-1) @ mixed
    reference = torch.softmax(100 * torch.stack([cosines[0], cosines[1:3].max(), cosines[3]]), dim=0)
    assert int(reference.argmax()) == 2 and reference.max() < 0.5  # the set-up: box wins, unsure
    features[:, 0, 0] = mixed
    regions = np.zeros((4, 6), dtype=np.int64)
    regions[0, 0] = 1
    without = teacher_for(vit_segmenter, prompt_denoising=False, key_smoothing=False)
    with_pd = teacher_for(vit_segmenter, prompt_denoising=True, key_smoothing=False)
    plain = without.pseudo_labels(make_batch(features, regions))[0].numpy()
    denoised = with_pd.pseudo_labels(make_batch(features, regions))[0].numpy()
    corner = (slice(0, STRIDE // 2), slice(0, STRIDE // 2))
    assert (plain[corner] == 2).all()
    assert (denoised[corner] == 0).all() and not (denoised == 2).any()
    np.testing.assert_array_equal(denoised, upsampled(grid))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"key_smoothing": False, "bg_threshold": 0.6},
        {"key_smoothing_variant": "released"},
        {"pamr": True, "pamr_iterations": 3, "key_smoothing": False},  # denoising drops blue box first
    ],
)
def test_pseudo_labels_of_a_whole_image_are_what_segment_returns(vit_segmenter: Segmenter, options: dict) -> None:
    """On a crop that is the whole image, the teacher's labels are ``segment``'s, under every option."""
    from tests.scenes import make_scene

    image = make_scene(31, 64, 96)[0]
    view = vit_segmenter.with_options(SegmentOptions(short_side=64, **options))
    expected = view.segment(image, LABELS).label_map
    pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
    features, keys = view.dense_features_and_keys(view.from_unit(pixels))
    blank = torch.full((1, 64, 96), IGNORE)
    batch = Batch(blank, blank, blank >= IGNORE, pixels=pixels, clip_features=features, clip_keys=keys)
    labels = MaskClipTeacher(view, LABELS).pseudo_labels(batch)[0].numpy()
    assert len(np.unique(expected[expected >= 0])) >= 2  # a map worth comparing, not one label everywhere
    np.testing.assert_array_equal(labels, expected)
    assert (labels == IGNORE).any() == bool(options.get("bg_threshold"))
