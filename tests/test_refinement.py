"""Prompt denoising and key smoothing on cases small enough to check by hand."""

from __future__ import annotations

import pytest
import torch

from maskclip_engine.head.key_smoothing import key_smoothing
from maskclip_engine.head.prompt_denoising import class_probabilities, prompt_denoising
from maskclip_engine.head.refinement import refine


def _logits_for(probs: list[list[float]], scale: float = 100.0) -> torch.Tensor:
    """Logits [C, 1, N] whose softmax at ``scale`` gives ``probs`` (given as [N][C])."""
    return (torch.tensor(probs).log() / scale).T.unsqueeze(1)


def test_absent_class_disappears_with_prompt_denoising() -> None:
    # Three locations, three classes. "ghost" (class 2) wins location 1 but never reaches 0.5.
    logits = _logits_for([[0.9, 0.05, 0.05], [0.3, 0.3, 0.4], [0.1, 0.8, 0.1]])
    plain = refine(logits, None, logit_scale=100, prompt_denoise=False, pd_threshold=0.5, key_smooth=False)
    assert plain.probs.argmax(0).flatten().tolist() == [0, 2, 1]
    assert plain.kept.tolist() == [True, True, True]

    denoised = refine(logits, None, logit_scale=100, prompt_denoise=True, pd_threshold=0.5, key_smooth=False)
    assert denoised.kept.tolist() == [True, True, False]
    assert torch.all(denoised.probs[2] == 0)
    # The remaining classes share location 1 as 0.3 : 0.3 renormalised.
    assert denoised.probs[:, 0, 1].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert 2 not in denoised.probs.argmax(0).flatten().tolist()


def test_prompt_denoising_threshold_is_configurable() -> None:
    probs = torch.tensor([[0.6, 0.2], [0.4, 0.8]])
    assert prompt_denoising(probs, 0.5).tolist() == [True, True]
    assert prompt_denoising(probs, 0.7).tolist() == [False, True]
    # Nothing reaches 0.9: the most confident class stays rather than none.
    assert prompt_denoising(probs, 0.9).tolist() == [False, True]


def test_key_smoothing_follows_key_similarity() -> None:
    # Location 1 is unsure (0.4 vs 0.6). Its key equals location 0's key in the first
    # case and location 2's in the second; smoothing pulls it toward that neighbour.
    probs = torch.tensor([[1.0, 0.4, 0.0], [0.0, 0.6, 1.0]]).unsqueeze(1)  # [C=2, 1, N=3]
    like_first = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).unsqueeze(1)  # keys [K=2, 1, N=3]
    like_last = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]).unsqueeze(1)

    smoothed = key_smoothing(probs, like_first)
    # W = [[1,1,0],[1,1,0],[0,0,1]]: p'_1 = p_0 + p_1 = (1.4, 0.6) -> (0.7, 0.3).
    assert smoothed[:, 0, 1].tolist() == pytest.approx([0.7, 0.3])
    assert smoothed[:, 0, 2].tolist() == pytest.approx([0.0, 1.0])
    assert smoothed.argmax(0).flatten().tolist() == [0, 0, 1]

    smoothed = key_smoothing(probs, like_last)
    assert smoothed[:, 0, 1].tolist() == pytest.approx([0.2, 0.8])
    assert smoothed.argmax(0).flatten().tolist() == [0, 1, 1]


def test_key_smoothing_uses_cosine_not_raw_dot_products() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).unsqueeze(1)
    keys = torch.tensor([[3.0, 4.0], [4.0, 3.0]]).unsqueeze(1)  # key of location 0 = (3, 4), of 1 = (4, 3)
    cos = (3 * 4 + 4 * 3) / 25  # 0.96, where the raw dot product would be 24
    expected = torch.tensor([[1.0, cos], [cos, 1.0]])
    expected = expected / expected.sum(0, keepdim=True)
    torch.testing.assert_close(key_smoothing(probs, keys).squeeze(1), expected)
    torch.testing.assert_close(key_smoothing(probs, keys * 7.0), key_smoothing(probs, keys))


def test_smoothed_values_stay_probabilities() -> None:
    torch.manual_seed(0)
    probs = class_probabilities(torch.randn(5, 4, 6), 10.0)
    smoothed = key_smoothing(probs, torch.randn(8, 4, 6))
    assert torch.all(smoothed >= 0)
    torch.testing.assert_close(smoothed.sum(0), torch.ones(4, 6))


def test_refine_applies_denoising_before_smoothing() -> None:
    logits = _logits_for([[0.9, 0.05, 0.05], [0.3, 0.3, 0.4], [0.1, 0.8, 0.1]])
    keys = torch.ones(2, 1, 3)  # every location alike: smoothing averages all three
    both = refine(logits, keys, logit_scale=100, prompt_denoise=True, pd_threshold=0.5, key_smooth=True)
    assert both.kept.tolist() == [True, True, False]
    assert torch.all(both.probs[2] == 0)
    expected = (torch.tensor([0.9, 0.05]) / 0.95 + torch.tensor([0.5, 0.5]) + torch.tensor([0.1, 0.8]) / 0.9) / 3
    for location in range(3):
        assert both.probs[:2, 0, location].tolist() == pytest.approx(expected.tolist(), rel=1e-4)
