"""MaskCLIP's two training-free refinements, applied per image on the feature grid.

* Prompt denoising (PD): a class whose probability never reaches the threshold
  anywhere in the image is taken to be absent and removed.
* Key smoothing (KS): each location's class probabilities become a
  key-similarity weighted sum of all locations' probabilities, so locations
  that the last attention layer sees as alike agree with each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Refined:
    """Class probabilities ``[C, h, w]`` after refinement and the classes PD kept ``[C]``."""

    probs: torch.Tensor
    kept: torch.Tensor


def class_probabilities(logits: torch.Tensor, logit_scale: float, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over classes (dim 0) of scaled cosine logits; removed classes get probability 0."""
    scaled = logits * logit_scale
    if kept is not None:
        mask = (~kept).view(-1, *([1] * (logits.ndim - 1)))
        scaled = scaled.masked_fill(mask, float("-inf"))
    return torch.softmax(scaled, dim=0)


def prompt_denoising(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which classes stay: those whose maximum probability over all locations reaches ``threshold``.

    ``probs`` is ``[C, ...]``. If no class reaches it, the most confident class
    stays, so an image never loses every label.
    """
    peak = probs.flatten(1).amax(dim=1)
    kept = peak >= threshold
    if not bool(kept.any()):
        kept[int(peak.argmax())] = True
    return kept


def key_smoothing(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``p'_i = sum_j cos(k_i, k_j) p_j`` over all locations, renormalised per location.

    ``probs`` is ``[C, h, w]``, ``keys`` ``[K, h, w]``. The weights are cosine
    similarities of per-location L2-normalised keys. The result is clipped at
    zero and renormalised to sum to one per location: the argmax is that of
    the plain weighted sum, and the values stay probabilities so the background
    threshold keeps its meaning. A location where no class scores above zero
    keeps its own probabilities.
    """
    num_classes = probs.shape[0]
    flat_keys = F.normalize(keys.flatten(1).float(), dim=0)  # [K, N]
    weights = flat_keys.T @ flat_keys  # [N, N], symmetric
    flat = probs.flatten(1)
    smoothed = (flat @ weights).clamp_min(0)  # [C, N]
    total = smoothed.sum(dim=0, keepdim=True)
    # Where dissimilar neighbours outweigh everything (no class above zero), the
    # location keeps its own prediction rather than an arbitrary one.
    degenerate = total <= 1e-12
    smoothed = torch.where(degenerate, flat, smoothed / total.clamp_min(1e-12))
    return smoothed.reshape(num_classes, *probs.shape[1:])


def refine(
    logits: torch.Tensor,
    keys: torch.Tensor | None,
    *,
    logit_scale: float,
    prompt_denoise: bool,
    pd_threshold: float,
    key_smooth: bool,
) -> Refined:
    """Logits ``[C, h, w]`` to refined probabilities: PD first, then KS (as in MaskCLIP)."""
    probs = class_probabilities(logits, logit_scale)
    kept = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if prompt_denoise:
        kept = prompt_denoising(probs, pd_threshold)
        if not bool(kept.all()):
            probs = class_probabilities(logits, logit_scale, kept)
    if key_smooth and keys is not None:
        probs = key_smoothing(probs, keys)
    return Refined(probs=probs, kept=kept)
