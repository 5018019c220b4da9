"""Prompt denoising (PD): a label whose probability never reaches a threshold anywhere in the image is
taken to be absent from it and removed; MaskCLIP runs it before key smoothing."""

from __future__ import annotations

import torch


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
