"""The later methods' evaluation head (maskclip_engine/evaluation/harness.py) on hand-built features."""

from __future__ import annotations

import numpy as np
import torch

from maskclip_engine.evaluation.harness import Harness, _drop_small_classes, harness_labels, name_logits
from maskclip_engine.features.image_features import ImageFeatures, Window


def two_window_features() -> ImageFeatures:
    """A 4x8 image seen by two 4x4 windows side by side (stride 2: 2x2 cells each), 2-d features."""
    left = torch.tensor([1.0, 0.0]).view(2, 1, 1).expand(2, 2, 2)  # every cell points along name 0
    right = torch.tensor([0.0, 1.0]).view(2, 1, 1).expand(2, 2, 2)  # every cell points along name 1
    windows = (Window(0, 0, 4, 4), Window(0, 4, 4, 4))
    return ImageFeatures(
        features=torch.stack([left, right]),
        keys=torch.zeros(2, 1, 2, 2),
        windows=windows,
        resized=(4, 8),
        image_size=(4, 8),
        stride=2,
    )


def test_name_logits_are_each_windows_cosines_at_its_own_pixels() -> None:
    text = torch.eye(2)
    logits = name_logits(two_window_features(), text)
    assert logits.shape == (2, 4, 8)
    assert torch.allclose(logits[0, :, :4], torch.ones(4, 4)) and torch.allclose(logits[0, :, 4:], torch.zeros(4, 4))
    assert torch.allclose(logits[1, :, 4:], torch.ones(4, 4))


def test_synonyms_take_their_best_name_and_the_temperature_sets_confidence() -> None:
    text = torch.eye(2)
    owner = torch.tensor([1, 1])  # both names are synonyms of class 1; class 0 (background) has none
    labels = harness_labels(two_window_features(), text, owner, 2, Harness(logit_scale=40.0))
    assert (labels == 1).all()


def test_the_probability_threshold_sends_unsure_pixels_to_background() -> None:
    features = two_window_features()
    text = torch.eye(2)
    owner = torch.tensor([1, 2])  # class 0 unprompted: every pixel's top probability is softmax(s, 0)
    sure = harness_labels(features, text, owner, 3, Harness(logit_scale=40.0, prob_threshold=0.9))
    unsure = harness_labels(features, text, owner, 3, Harness(logit_scale=1.0, prob_threshold=0.9))
    assert (sure[:, :3] == 1).all() and (sure[:, 5:] == 2).all()
    assert (unsure == 0).all()  # softmax([1, 0]) tops out at 0.73 < 0.9


def test_classes_with_small_argmax_area_get_zero_probability() -> None:
    probs = torch.zeros(3, 10, 10)
    probs[0] = 0.5
    probs[1, :, :9] = 0.8  # class 1 wins 90 of 100 pixels
    probs[2, :, 9:] = 0.9  # class 2 wins 10: 10/100 of the foreground, at the 0.1 threshold
    dropped = _drop_small_classes(probs, Harness(area_threshold=0.1))
    assert torch.equal(dropped[2], torch.zeros(10, 10)) and torch.equal(dropped[1], probs[1])
    assert torch.equal(dropped[0], probs[0])  # the background class is never dropped
    kept = _drop_small_classes(probs, Harness(area_threshold=0.05))
    assert torch.equal(kept, probs)
    assert np.array_equal(dropped.argmax(0)[:, 9].numpy(), np.zeros(10, dtype=np.int64))
