"""Released-code key smoothing and per-window slide refinement, against references written here.

The references follow MaskCLIP's released head and mmseg's slide inference step
by step on small tensors (their shapes and order of operations), independently
of the engine's code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskclip_engine import InvalidOptionError, Segmenter, SegmentOptions
from maskclip_engine.head.key_smoothing import key_smoothing_released
from maskclip_engine.head.refinement import refine
from maskclip_engine.result import result_from_probabilities
from tests.conftest import scene

LABELS = ["brick wall", "grass", "blue sky", "car"]


def released_head(logits: torch.Tensor, keys: torch.Tensor, pd: float, ks: float) -> torch.Tensor:
    """MaskCLIP's released ``refine_output`` on one window: logits ``[1, C, H, W]``, keys ``[1, L, K]``."""
    output = logits.clone()
    n, c, h, w = output.shape
    if pd > 0:
        conf = F.softmax(output * 100, dim=1).view(n, c, -1).max(dim=-1)[0]
        removed = (conf < pd)[:, :, None, None].expand(n, c, h, w)
        output[removed] = -100
    if ks > 0:
        output = F.softmax(output * 100, dim=1)
        output = output.view(n, c, -1).transpose(-2, -1)  # [N, L, C]
        k = F.normalize(keys, p=2)  # dim 1: over locations
        weight = k @ k.transpose(-2, -1)
        selected = (output.max(dim=-1, keepdim=True)[0] < ks).expand(-1, -1, c)
        smoothed = weight @ output
        output[selected] = smoothed[selected]
        output = output.transpose(-2, -1).reshape(n, c, h, w)
    return output


def test_released_smoothing_by_hand() -> None:
    # Two locations, two key channels: channel 0 = (3, 4) -> (0.6, 0.8), channel 1 = (1, 0) -> (1, 0).
    keys = torch.tensor([[3.0, 4.0], [1.0, 0.0]]).unsqueeze(1)  # [K=2, 1, N=2]
    probs = torch.tensor([[0.9, 0.2], [0.1, 0.8]]).unsqueeze(1)  # [C=2, 1, N=2]
    # W = [[0.36 + 1, 0.48], [0.48, 0.64]]
    w = torch.tensor([[1.36, 0.48], [0.48, 0.64]])
    expected = (w @ probs[:, 0].T).T  # not renormalised
    torch.testing.assert_close(key_smoothing_released(probs, keys)[:, 0], expected)
    # Scaling one channel's keys changes nothing: each channel is normalised over locations.
    torch.testing.assert_close(
        key_smoothing_released(probs, keys * torch.tensor([5.0, 0.1]).view(2, 1, 1)), expected.unsqueeze(1)
    )
    # A location whose top probability reaches the threshold keeps its own probabilities.
    gated = key_smoothing_released(probs, keys, threshold=0.85)[:, 0]
    torch.testing.assert_close(gated[:, 0], probs[:, 0, 0])
    torch.testing.assert_close(gated[:, 1], expected[:, 1])


@pytest.mark.parametrize("ks_threshold", [1.0, 0.7])
def test_released_variant_matches_the_released_head(ks_threshold: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 6, 7) * 0.02  # cosine logits: small differences, as from CLIP
    logits[4] -= 0.05  # a class absent from the image
    keys = torch.randn(8, 6, 7)
    ours = refine(
        logits,
        keys,
        logit_scale=100,
        prompt_denoise=True,
        pd_threshold=0.5,
        key_smooth=True,
        variant="released",
        ks_threshold=ks_threshold,
    )
    theirs = released_head(logits[None], keys.flatten(1).T[None], 0.5, ks_threshold)[0]
    assert ours.scores is not None
    removed = ~ours.kept
    assert removed.any() and not removed.all()  # the case exercises PD as well
    torch.testing.assert_close(ours.scores[~removed], theirs[~removed], rtol=1e-4, atol=1e-6)
    assert torch.equal(ours.scores.argmax(0), theirs.argmax(0))
    # The probabilities that thresholds read: non-negative, one per location, same winner.
    assert torch.all(ours.probs >= 0) and torch.all(ours.probs[removed] == 0)
    torch.testing.assert_close(ours.probs.sum(0), torch.ones(6, 7))
    positive = ours.scores.amax(0) > 0
    assert torch.equal(ours.probs.argmax(0)[positive], ours.scores.argmax(0)[positive])


def test_background_threshold_reads_probabilities_under_the_released_variant() -> None:
    # Raw scores far below any threshold; their shares are 0.8 and 0.6.
    scores = torch.tensor([[0.008, 0.004], [0.002, 0.006]]).unsqueeze(1)  # [C=2, 1, 2]
    probs = scores / scores.sum(0, keepdim=True)
    result = result_from_probabilities(probs, (1, 2), ["a", "b"], bg_threshold=0.7, scores=scores)
    assert result.label_map.tolist() == [[0, -1]]  # 0.8 stays labelled; 0.6 falls under the threshold
    assert result.confidence[0].tolist() == pytest.approx([0.8, 0.6])


def mmseg_slide(
    segmenter: Segmenter, image: np.ndarray, opts: SegmentOptions, released: bool, averaged: bool = False
) -> np.ndarray | torch.Tensor:
    """Labels by mmseg's slide inference with the released head (or the paper's cosine KS), step by step.

    With ``averaged``, the averaged head outputs ``[C, H, W]`` at the resized image's size instead.
    """
    s = segmenter.stride
    height = round(image.shape[0] * opts.short_side / min(image.shape[:2]) / s) * s
    width = round(image.shape[1] * opts.short_side / min(image.shape[:2]) / s) * s
    pixels = segmenter.normalize(image, (height, width))
    text = segmenter.text_embeddings(LABELS)
    preds = torch.zeros(len(LABELS), height, width)
    count = torch.zeros(1, height, width)
    h_grids = max(height - opts.crop + opts.stride - 1, 0) // opts.stride + 1
    w_grids = max(width - opts.crop + opts.stride - 1, 0) // opts.stride + 1
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * opts.stride + opts.crop, height), min(w_idx * opts.stride + opts.crop, width)
            y1, x1 = max(y2 - opts.crop, 0), max(x2 - opts.crop, 0)
            features, keys = segmenter.dense_features_and_keys(pixels[None, :, y1:y2, x1:x2])
            logits = torch.einsum("bdhw,cd->bchw", F.normalize(features, dim=1), text)
            if released:
                out = released_head(logits, keys.flatten(2).transpose(1, 2), opts.pd_threshold, opts.ks_threshold)
            else:  # PD as released, then the paper's KS: cosine weights, clipped and renormalised
                out = released_head(logits, keys.flatten(2).transpose(1, 2), opts.pd_threshold, 0)
                p = F.softmax(out * 100, dim=1).flatten(2)[0]  # [C, L]
                k = F.normalize(keys.flatten(2)[0], dim=0)  # [K, L]: per location
                smoothed = (p @ (k.T @ k)).clamp_min(0)
                out = (smoothed / smoothed.sum(0, keepdim=True)).view_as(logits)
            out = F.interpolate(out, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            preds += F.pad(out, (x1, width - x2, y1, height - y2))[0]
            count[:, y1:y2, x1:x2] += 1
    if averaged:
        return preds / count
    preds = F.interpolate((preds / count)[None], size=image.shape[:2], mode="bilinear", align_corners=False)
    return F.softmax(preds, dim=1).argmax(1)[0].numpy()


@pytest.mark.parametrize("variant", ["released", "cosine"])
def test_window_refinement_matches_mmseg_slide_inference(vit_segmenter: Segmenter, variant: str) -> None:
    image = scene(70, 110, seed=3)
    # One window per forward pass, as the reference runs them: batched matrix products differ in the
    # last bits, which softmax(100 x) amplifies enough to flip a near tie.
    opts = vit_segmenter.options.replace(
        mode="slide",
        crop=48,
        stride=32,
        short_side=64,
        slide_refine="window",
        key_smoothing_variant=variant,
        batch_size=1,
    )
    ours = vit_segmenter.segment(image, LABELS, **opts.to_dict()).label_map
    reference = mmseg_slide(vit_segmenter, image, opts, released=variant == "released")
    np.testing.assert_array_equal(ours, reference)
    whole = vit_segmenter.segment(image, LABELS, **opts.replace(slide_refine="whole").to_dict()).label_map
    assert not np.array_equal(whole, ours)  # the case tells the two apart


def test_window_refinement_without_smoothing_averages_logits(vit_segmenter: Segmenter) -> None:
    image = scene(64, 96, seed=4)
    opts = vit_segmenter.options.replace(
        mode="slide", crop=48, stride=16, short_side=64, slide_refine="window", key_smoothing=False, batch_size=1
    )
    result = vit_segmenter.segment(image, LABELS, **opts.to_dict())
    reference = mmseg_slide(vit_segmenter, image, opts.replace(ks_threshold=0.0), released=True)
    np.testing.assert_array_equal(result.label_map, reference)
    # Confidence is the softmax of the averaged logits (the image is its own resized size here, so no
    # final resampling), as the training-free harnesses threshold background.
    averaged = mmseg_slide(vit_segmenter, image, opts.replace(ks_threshold=0.0), released=True, averaged=True)
    expected = torch.softmax(averaged * opts.logit_scale, dim=0).amax(0).numpy()
    np.testing.assert_allclose(result.confidence, expected, atol=1e-5)


def test_variant_options_are_checked() -> None:
    with pytest.raises(InvalidOptionError, match="key_smoothing_variant"):
        SegmentOptions(key_smoothing_variant="paper")
    with pytest.raises(InvalidOptionError, match="slide_refine"):
        SegmentOptions(slide_refine="windows")
    with pytest.raises(InvalidOptionError, match="ks_threshold"):
        SegmentOptions(ks_threshold=1.5)
    with pytest.raises(InvalidOptionError, match="pamr"):
        SegmentOptions(pamr="yes")  # type: ignore[arg-type]


def test_whole_image_released_smoothing_through_segment(vit_segmenter: Segmenter) -> None:
    image = scene(64, 96, seed=6)
    opts = vit_segmenter.options.replace(short_side=64, key_smoothing_variant="released")
    result = vit_segmenter.segment(image, LABELS, **opts.to_dict())
    pixels = vit_segmenter.normalize(image, (64, 96))
    features, keys = vit_segmenter.dense_features_and_keys(pixels[None])
    logits = torch.einsum("bdhw,cd->bchw", F.normalize(features, dim=1), vit_segmenter.text_embeddings(LABELS))
    out = released_head(logits, keys.flatten(2).transpose(1, 2), opts.pd_threshold, opts.ks_threshold)
    up = F.interpolate(out, size=(64, 96), mode="bilinear", align_corners=False)[0]
    np.testing.assert_array_equal(result.label_map, up.argmax(0).numpy())
