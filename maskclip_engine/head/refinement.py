"""MaskCLIP's training-free refinement of one image (or window) on its feature grid: prompt denoising,
then key smoothing (:mod:`.prompt_denoising`, :mod:`.key_smoothing`).

Under every key-smoothing variant PD reads ``softmax(logit_scale * logits)`` and
the background threshold reads a probability (see :func:`refine`). One
deliberate difference from the released code: a class PD removed never wins a
location; there it keeps score 0 and can win where every kept class's raw
``W p`` is negative.

Slide inference either refines once on the windows' averaged logits and keys,
or (:func:`average_windows`) refines inside each window and averages the
windows' outputs at pixel resolution, as mmseg's ``slide_inference`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from maskclip_engine.head.key_smoothing import key_smoothing, key_smoothing_released, renormalised
from maskclip_engine.head.prompt_denoising import class_probabilities, prompt_denoising

if TYPE_CHECKING:
    from maskclip_engine.config import SegmentOptions


@dataclass(frozen=True)
class Refined:
    """Refinement of one image (or window) on its feature grid.

    ``probs`` ``[C, h, w]`` are probabilities (each location sums to one over the
    kept classes): confidence, the background threshold and scores read them.
    ``scores`` ``[C, h, w]``, when set, are what labels are the argmax of and are
    not probabilities (released key smoothing's raw ``W p``). ``kept`` ``[C]``
    are the classes prompt denoising kept.
    """

    probs: torch.Tensor
    kept: torch.Tensor
    scores: torch.Tensor | None = None

    @property
    def label_scores(self) -> torch.Tensor:
        """What the label is the argmax of: ``scores`` when set, else ``probs``."""
        return self.probs if self.scores is None else self.scores


def refine(
    logits: torch.Tensor,
    keys: torch.Tensor | None,
    *,
    logit_scale: float,
    prompt_denoise: bool,
    pd_threshold: float,
    key_smooth: bool,
    variant: str = "cosine",
    ks_threshold: float = 1.0,
) -> Refined:
    """Logits ``[C, h, w]`` to refined probabilities: PD first, then KS (as in MaskCLIP).

    PD reads ``softmax(logit_scale * logits)`` under every variant. With the
    ``released`` KS variant, labels follow the raw smoothed scores and the
    probabilities are those scores renormalised (:func:`renormalised`, falling
    back to the pre-smoothing probabilities), so the background threshold
    still compares a probability.
    """
    probs = class_probabilities(logits, logit_scale)
    kept = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if prompt_denoise:
        kept = prompt_denoising(probs, pd_threshold)
        if not bool(kept.all()):
            probs = class_probabilities(logits, logit_scale, kept)
    if not key_smooth or keys is None:
        return Refined(probs=probs, kept=kept)
    if variant == "released":
        scores = key_smoothing_released(probs, keys, ks_threshold)
        return Refined(probs=renormalised(scores, probs), kept=kept, scores=scores)
    return Refined(probs=key_smoothing(probs, keys), kept=kept)


def refine_with_options(logits: torch.Tensor, keys: torch.Tensor | None, options: SegmentOptions) -> Refined:
    """:func:`refine` with the refinement fields of ``options``: what ``segment`` runs on each grid."""
    return refine(
        logits,
        keys,
        logit_scale=options.logit_scale,
        prompt_denoise=options.prompt_denoising,
        pd_threshold=options.pd_threshold,
        key_smooth=options.key_smoothing,
        variant=options.key_smoothing_variant,
        ks_threshold=options.ks_threshold,
    )


# The value the released code gives a class prompt denoising removed: finite, so
# windows can still be averaged, and far below any cosine similarity.
REMOVED_LOGIT = -100.0


def window_output(logits: torch.Tensor, refined: Refined, key_smoothed: bool) -> torch.Tensor:
    """What one window contributes to the slide average, as the released head outputs it.

    Raw ``W p`` under released KS, the smoothed probabilities under cosine KS,
    and without KS the cosine logits with removed classes at ``REMOVED_LOGIT``.
    """
    if key_smoothed:
        return refined.label_scores
    return logits.masked_fill((~refined.kept).view(-1, *([1] * (logits.ndim - 1))), REMOVED_LOGIT)


def average_windows(
    windows: Sequence[tuple[tuple[int, int, int, int], Refined, torch.Tensor]],
    size: tuple[int, int],
    logit_scale: float | None = None,
) -> Refined:
    """Per-window refinements averaged over an image of ``size`` (h, w) pixels, as mmseg's slide inference does.

    Each window is ``((top, left, height, width), refined, output)``: its output
    (:func:`window_output`) is upsampled bilinearly to the window's pixels,
    summed and divided by how many windows cover each pixel; labels follow
    these averaged outputs. Probabilities (confidence, background threshold):
    when the outputs are logits (no key smoothing; pass ``logit_scale``), the
    softmax of the averaged logits, as the training-free evaluation harnesses
    compute it; otherwise the windows' probabilities averaged the same way. A
    class counts as kept if any window kept it; rows are returned for kept
    classes only.
    """
    kept = torch.stack([refined.kept for _, refined, _ in windows]).any(dim=0)
    index = torch.nonzero(kept).flatten()
    shared = all(output is refined.probs for _, refined, output in windows)
    averaged_probs = not shared and logit_scale is None
    device = windows[0][1].probs.device
    outputs = torch.zeros((len(index), *size), device=device)
    probs = torch.zeros_like(outputs) if averaged_probs else outputs
    count = torch.zeros(size, device=device)
    for (top, left, height, width), refined, output in windows:
        cells = (slice(None), slice(top, top + height), slice(left, left + width))
        outputs[cells] += _resize(output[index], (height, width))
        if averaged_probs:
            probs[cells] += _resize(refined.probs[index], (height, width))
        count[cells[1:]] += 1
    count = count.clamp_min(1)
    outputs /= count
    if shared:
        return Refined(probs=outputs, kept=kept)
    if logit_scale is not None:
        return Refined(probs=torch.softmax(outputs * logit_scale, dim=0), kept=kept, scores=outputs)
    return Refined(probs=probs / count, kept=kept, scores=outputs)


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]
